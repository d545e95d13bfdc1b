"""Serving benchmark: streams text, image and video chats at OpenAI-compatible servers.

It reports latency and throughput per server, for a sweep of load levels or a named scenario.

    # one command, both servers on the same workload (each started, measured and stopped in turn)
    .venv/bin/python benchmarks/serve_bench.py --launch plm-serve --launch hf-baseline \\
        --model CHECKPOINT_DIR --concurrency 1,4,8 --out serve-bench
    # a named scenario (burst, repeat, interference) against the real `transformers serve`
    .venv/bin/python benchmarks/serve_bench.py --scenario burst --launch plm-serve \\
        --launch transformers-serve --model CHECKPOINT_DIR --out serve-burst
    # conversations across 3 replicas behind each balancer (starts replicas and balancers itself)
    .venv/bin/python benchmarks/serve_bench.py --scenario multiturn --model CHECKPOINT_DIR \\
        --setups single,round-robin,haproxy,haproxy-uuid --out multiturn
    # servers already running
    .venv/bin/python benchmarks/serve_bench.py --target plm-serve=http://127.0.0.1:8000 \\
        --request-rate 2,inf
    # the report again from a results.json
    .venv/bin/python benchmarks/serve_bench.py --replot serve-bench

The scenarios (serve_scenarios.py) send synthetic photos (serve_photos.py) and write results.json
and a report.md with one column per target and their ratio; the servers and the request dialect
each speaks are in serve_launchers.py. The rest of this docstring is about the sweep.

Each load level (a concurrency limit and a request rate) gets its own deterministic workload, the
same for every target, and different from every other level's, so caches warmed by one level do not
help the next. Requests reuse an earlier image or video of their level with a new question at
--repeat-media-ratio (which the prefix and encoder caches can serve). Media are synthetic: seeded
PNG images of several sizes and h264 mp4 clips, sent as data: URLs. Every request streams
(temperature 0, ignore_eos, so each produces exactly --max-tokens tokens) and is timed from the
moment it is sent: TTFT to the first content chunk, ITL between content chunks, end-to-end to
[DONE]; output tokens come from the usage chunk. Failed requests (non-200, error events, broken
streams) are counted and listed, never dropped. --out gets results.json, report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw
from serve_client import (  # noqa: F401  (re-exported: the tests and older callers use them here)
    BenchRequest,
    RequestRecord,
    StreamParser,
    distribution,
    http_client,
    rounded,
    send,
)
from serve_launchers import (  # noqa: F401
    OPENAI,
    SERVER_KINDS,
    Dialect,
    Target,
    chat_body,
    close_target,
    dialect_for,
    free_port,
    launch,
    open_target,
    served_model,
    server_command,
    shown_command,
    start_server,
    stop,
    stop_server,
)
from serve_multiturn_bench import add_multiturn_args, bench_multiturn
from serve_multiturn_bench import report_markdown as multiturn_report
from serve_results import (  # noqa: F401
    command_line,
    environment,
    environment_lines,
    fmt_ms,
    load_average,
    report_head,
    write_json,
)
from serve_scenario_bench import add_scenario_args, bench_scenario
from serve_scenario_bench import report_markdown as scenario_report
from tqdm import tqdm

KINDS = ("text", "image", "video")
IMAGE_SIZES = [(640, 480), (800, 600), (1024, 768), (480, 640), (1280, 720), (448, 448)]
VIDEO_SIZE = (320, 240)
VIDEO_FPS = 8
WORDS = (
    "river stone lantern orbit maple signal copper harbor violet engine meadow cipher falcon "
    "glacier ember tunnel quartz willow beacon canyon thread marble comet forest prism anchor "
    "velvet summit"
).split()
QUESTIONS = [
    "Describe this in detail.",
    "What colours dominate?",
    "What shapes can you see?",
    "Write a caption for it.",
    "What is in the background?",
    "Count the objects you see.",
    "What might happen next?",
    "Summarise it in one sentence.",
]


# -- workload --------------------------------------------------------------------------------------
@dataclass
class WorkloadConfig:
    """What the requests look like; every level draws its own requests from this."""

    num_prompts: int = 32
    mix: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "image": 2.0, "video": 1.0})
    image_detail: str = "low"
    num_frames: int = 8  # frames the server samples per video
    video_frames: int = 16  # frames in each synthetic clip
    max_tokens: int = 64
    repeat_media_ratio: float = 0.25
    ignore_eos: bool = True
    seed: int = 0


def parse_mix(spec: str) -> dict[str, float]:
    """'text=1,image=2,video=1' -> weights; kinds not named get 0."""
    mix = {}
    for item in spec.split(","):
        name, _, weight = item.partition("=")
        name = name.strip()
        if name not in KINDS or not weight:
            raise ValueError(
                f"bad --mix item {item!r}: use kind=weight with kind in {', '.join(KINDS)}"
            )
        mix[name] = float(weight)
    if sum(mix.values()) <= 0 or any(w < 0 for w in mix.values()):
        raise ValueError("--mix weights must be non-negative and not all zero")
    return mix


def kind_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """Exact request counts per kind in proportion to the weights (largest remainder)."""
    total = sum(mix.values())
    share = {k: n * mix.get(k, 0) / total for k in KINDS}
    counts = {k: int(share[k]) for k in KINDS}
    for k in sorted(KINDS, key=lambda k: share[k] - counts[k], reverse=True)[
        : n - sum(counts.values())
    ]:
        counts[k] += 1
    return counts


def synthetic_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth colour noise under a few random rectangles, ellipses and lines."""
    w, h = size
    noise = (rng.random((h // 32 + 2, w // 32 + 2, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(0, w, 2).tolist())
        y0, y1 = sorted(rng.integers(0, h, 2).tolist())
        colour = tuple(rng.integers(0, 256, 3).tolist())
        shape = int(rng.integers(3))
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), outline=colour, width=int(rng.integers(2, 12)))
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 12)))
    return img


def synthetic_video(rng: np.random.Generator, frames: int) -> bytes:
    """An h264 mp4 clip: shapes moving across a fixed noisy background."""
    w, h = VIDEO_SIZE
    background = np.asarray(synthetic_image(rng, VIDEO_SIZE))
    movers = [
        (rng.integers(0, w, 2), rng.integers(-12, 13, 2), tuple(rng.integers(0, 256, 3).tolist()))
        for _ in range(3)
    ]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264", rate=VIDEO_FPS, options={"preset": "veryfast", "crf": "28", "threads": "1"}
        )
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(frames):
            img = Image.fromarray(background)
            draw = ImageDraw.Draw(img)
            for (x, y), (dx, dy), colour in movers:
                cx, cy = (x + dx * t) % w, (y + dy * t) % h
                draw.ellipse((cx - 20, cy - 20, cx + 20, cy + 20), fill=colour)
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def text_prompt(rng: random.Random) -> str:
    passage = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 240)))
    return f"Notes #{rng.randint(0, 10**6)}: {passage}\nWrite a story that uses these words."


def make_workload(cfg: WorkloadConfig, salt: str) -> list[BenchRequest]:
    """The requests of one level: the same for the same (config, salt), on any machine."""
    rng = random.Random(f"{cfg.seed}:{salt}")
    np_rng = np.random.default_rng(rng.getrandbits(64))
    kinds = [k for k, n in kind_counts(cfg.mix, cfg.num_prompts).items() for _ in range(n)]
    rng.shuffle(kinds)
    seen: dict[str, list[tuple[str, dict]]] = {"image": [], "video": []}  # kind -> [(id, part)]
    out = []
    for i, kind in enumerate(kinds):
        if kind == "text":
            out.append(BenchRequest(i, kind, [{"role": "user", "content": text_prompt(rng)}]))
            continue
        reused = bool(seen[kind]) and rng.random() < cfg.repeat_media_ratio
        if reused:
            media_id, part = rng.choice(seen[kind])
        else:
            media_id = f"{kind}-{len(seen[kind])}"
            if kind == "image":
                img = synthetic_image(np_rng, IMAGE_SIZES[int(np_rng.integers(len(IMAGE_SIZES)))])
                part = {
                    "type": "image_url",
                    "image_url": {
                        "url": data_url("image/png", png_bytes(img)),
                        "detail": cfg.image_detail,
                    },
                }
            else:
                part = {
                    "type": "video_url",
                    "video_url": {
                        "url": data_url("video/mp4", synthetic_video(np_rng, cfg.video_frames)),
                        "num_frames": cfg.num_frames,
                    },
                }
            seen[kind].append((media_id, part))
        question = f"{rng.choice(QUESTIONS)} (request {i}, {rng.choice(WORDS)})"
        content = [part, {"type": "text", "text": question}]
        out.append(BenchRequest(i, kind, [{"role": "user", "content": content}], media_id, reused))
    return out


def request_body(
    req: BenchRequest, model: str, cfg: WorkloadConfig, dialect: Dialect = OPENAI
) -> bytes:
    body = chat_body(req.messages, model, cfg.max_tokens, dialect, fixed_length=cfg.ignore_eos)
    return json.dumps(body).encode()


# -- one run: a workload at one load level ---------------------------------------------------------
def arrival_times(n: int, rate: float, rng: random.Random) -> list[float]:
    """Seconds after the start at which each request is due: Poisson arrivals, or all at 0 for
    rate=inf."""
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run_level(
    url: str,
    requests: list[BenchRequest],
    bodies: list[bytes],
    concurrency: int,
    rate: float,
    seed: str,
    timeout_s: float,
    progress: tqdm,
    expect_done: bool = True,
) -> tuple[list[RequestRecord], float]:
    """Sends the requests as they fall due, at most `concurrency` in flight (0: no limit).

    Returns (records, seconds).
    """
    slots = asyncio.Semaphore(concurrency) if concurrency > 0 else None
    due = arrival_times(len(requests), rate, random.Random(seed))
    async with http_client(timeout_s) as client:
        start = time.perf_counter()

        async def one(req: BenchRequest, body: bytes, at: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            if slots is None:
                rec = await send(client, url, req, body, start, expect_done)
            else:
                async with slots:
                    rec = await send(client, url, req, body, start, expect_done)
            progress.update(1)
            return rec

        records = await asyncio.gather(*(one(r, b, at) for r, b, at in zip(requests, bodies, due)))
        return list(records), time.perf_counter() - start


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    """Throughputs over the run's wall time (completed requests only) and latency distributions."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    per_kind = {}
    for kind in KINDS:
        mine = [r for r in ok if r.kind == kind]
        if mine:
            per_kind[kind] = {
                "completed": len(mine),
                "prompt_tokens_mean": float(np.mean([r.prompt_tokens or 0 for r in mine])),
                "ttft_s": distribution([r.ttft_s for r in mine if r.ttft_s is not None]),
                "e2e_s": distribution([r.e2e_s for r in mine]),
            }
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": [f"#{r.index} ({r.kind}): {r.error}" for r in records if not r.ok],
        "duration_s": duration_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (out_tokens + prompt_tokens) / duration_s,
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": distribution([x for r in ok for x in r.itl_s]),
        "e2e_s": distribution([r.e2e_s for r in ok]),
        "tpot_s": distribution(
            [
                (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)
                for r in ok
                if r.ttft_s is not None and (r.output_tokens or 0) > 1
            ]
        ),
        "per_kind": per_kind,
    }


# -- the whole benchmark ---------------------------------------------------------------------------
def level_label(concurrency: int, rate: float | None) -> str:
    """'c=4', 'c=all rate=2/s': rate None or inf means all requests at once."""
    c = "all" if concurrency <= 0 else str(concurrency)
    return f"c={c}" + ("" if rate is None or math.isinf(rate) else f" rate={rate:g}/s")


def bench_target(
    target: Target, args, cfg: WorkloadConfig, workloads: dict, results: dict, out: Path
) -> None:
    """Starts the target if asked, warms it up, runs each of its load levels, stops it."""
    opened = open_target(target, args, out / "logs")
    if opened.launched is not None:
        results["servers"][target.name] = opened.launched.describe()
    try:
        base, model, dialect = opened.base, opened.model, opened.dialect
        url = f"{base}/v1/chat/completions"

        def measure(reqs: list[BenchRequest], concurrency: int, rate: float, salt: str, desc: str):
            bar = tqdm(
                total=len(reqs), desc=f"{target.name} {desc}", unit="req", disable=args.no_progress
            )
            try:
                return asyncio.run(
                    run_level(
                        url,
                        reqs,
                        [request_body(r, model, cfg, dialect) for r in reqs],
                        concurrency,
                        rate,
                        salt,
                        args.request_timeout,
                        bar,
                        dialect.sends_done,
                    )
                )
            finally:
                bar.close()

        if args.warmup:
            warm = make_workload(
                WorkloadConfig(**{**asdict(cfg), "num_prompts": args.warmup}), "warmup"
            )
            records, _ = measure(warm, 1, math.inf, "warmup", "warmup")
            if not all(r.ok for r in records):
                print(
                    f"[{target.name}] warmup failures: {[r.error for r in records if not r.ok]}",
                    file=sys.stderr,
                )
        levels = (
            args.baseline_concurrency
            if target.name == args.baseline and args.baseline_concurrency
            else args.concurrency
        )
        for concurrency in levels:
            for rate in args.request_rate:
                salt, label = f"c{concurrency}-r{rate:g}", level_label(concurrency, rate)
                if salt not in workloads:
                    workloads[salt] = make_workload(cfg, salt)
                load_before = load_average()
                records, duration = measure(workloads[salt], concurrency, rate, salt, label)
                summary = summarize(records, duration)
                results["runs"].append(
                    {
                        "target": target.name,
                        "url": base,
                        "model": model,
                        "concurrency": concurrency,
                        "request_rate": None if math.isinf(rate) else rate,
                        "workload": salt,
                        "load_average": [load_before, load_average()],
                        "summary": summary,
                        "records": [rounded(asdict(r)) for r in records],
                    }
                )
                print(
                    f"[{target.name}] {label}: {summary['completed']}/{summary['requests']} ok "
                    f"in {duration:.1f} s, {summary['request_throughput']:.2f} req/s, "
                    f"{summary['output_throughput']:.1f} out tok/s, "
                    f"TTFT p50 {fmt_ms(summary['ttft_s']['p50'])} ms, "
                    f"E2E p50 {fmt_ms(summary['e2e_s']['p50'])} ms",
                    file=sys.stderr,
                )
                # after every run: a crash keeps what was measured
                write_json(results, out / "results.json")
    finally:
        close_target(opened)


def parse_levels(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def parse_rates(spec: str) -> list[float]:
    return [float(x) for x in spec.split(",") if x.strip()]


# -- report ----------------------------------------------------------------------------------------
def _run_level(run: dict) -> str:
    return level_label(run["concurrency"], run["request_rate"])


def _level_order(run: dict) -> tuple:
    c = run["concurrency"]
    return (c <= 0, c, run["request_rate"] is None, run["request_rate"] or 0)


COLOUR_MAPS = ["Blues", "Oranges", "Greens", "Purples", "Reds", "Greys"]


def _target_colours(runs: list[dict]) -> dict[str, str]:
    """A colour map name per target, in order of first appearance."""
    targets = dict.fromkeys(r["target"] for r in runs)
    return {t: COLOUR_MAPS[i % len(COLOUR_MAPS)] for i, t in enumerate(targets)}


def _colours(runs: list[dict]) -> dict[tuple[str, str], tuple]:
    """A colour per (target, level): the target's colour map, darker for heavier load."""
    from matplotlib import colormaps

    out = {}
    for target, cmap in _target_colours(runs).items():
        mine = sorted((r for r in runs if r["target"] == target), key=_level_order)
        for li, run in enumerate(mine):
            shade = 0.45 + 0.5 * li / max(1, len(mine) - 1)
            out[(target, _run_level(run))] = colormaps[cmap](shade)
    return out


def plot_cdf(
    runs: list[dict], values, path: Path, title: str, ylabel: str = "fraction of requests"
) -> None:
    """One empirical CDF line per (target, level) of values(run) in seconds, log x axis."""
    import matplotlib.pyplot as plt

    colours = _colours(runs)
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        xs = np.sort(np.asarray(values(run), dtype=float))
        if len(xs) == 0:
            continue
        ys = np.arange(len(xs) + 1) / len(xs)
        ax.step(
            np.r_[xs[0], xs],
            ys,
            where="post",
            color=colours[(run["target"], _run_level(run))],
            label=f"{run['target']} {_run_level(run)}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("seconds (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(runs: list[dict], path: Path) -> None:
    """Output tok/s, req/s and E2E p50 against the load level, one line per target."""
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    levels = [_run_level(r) for r in sorted(runs, key=_level_order)]
    levels = list(dict.fromkeys(levels))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    panels = [
        ("output_throughput", "output tokens/s"),
        ("request_throughput", "requests/s"),
        ("e2e_p50", "end-to-end latency p50 (s)"),
    ]
    for target, cmap in _target_colours(runs).items():
        mine = sorted((r for r in runs if r["target"] == target), key=_level_order)
        xs = [levels.index(_run_level(r)) for r in mine]
        for ax, (key, label) in zip(axes, panels):
            ys = [
                r["summary"]["e2e_s"]["p50"] if key == "e2e_p50" else r["summary"][key]
                for r in mine
            ]
            ax.plot(xs, ys, marker="o", label=target, color=colormaps[cmap](0.75))
            ax.set_ylabel(label)
    for ax in axes:
        ax.set_xticks(range(len(levels)), levels, rotation=30 if len(levels) > 6 else 0)
        ax.set_xlabel("load level (concurrency limit)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms(dist: dict, keys=("mean", "p50", "p90", "p99")) -> str:
    return " / ".join(fmt_ms(dist[k]) for k in keys)


def _s(dist: dict, keys=("mean", "p50", "p90", "p99")) -> str:
    return " / ".join("-" if dist[k] is None else f"{dist[k]:.2f}" for k in keys)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def report_markdown(results: dict) -> str:
    """The Markdown report: command, environment, workload, tables, speedups, failures, plots."""
    targets = list(dict.fromkeys(r["target"] for r in results["runs"]))
    runs = sorted(results["runs"], key=lambda r: (targets.index(r["target"]), _level_order(r)))
    wl = results["workload"]
    lines = report_head(f"Serving benchmark: {', '.join(targets)}", results)
    for name, server in (results.get("servers") or {}).items():
        # paths as seen from the repository root
        lines.append(f"- `{name}` was started as `{shown_command(server)}`")
    counts = kind_counts(wl["mix"], wl["num_prompts"])
    mix = ", ".join(f"{n} {k}" for k, n in counts.items())
    lines += [
        "",
        "## Workload",
        "",
        f"{wl['num_prompts']} streamed chats per load level ({mix}),"
        f" {wl['max_tokens']} output tokens each (temperature 0, ignore_eos {wl['ignore_eos']}); "
        f"images with detail `{wl['image_detail']}`, videos of {wl['video_frames']} frames sampled "
        f"to {wl['num_frames']}; an image/video chat reuses an earlier item of its level with a "
        f"new question with probability {wl['repeat_media_ratio']}; seed {wl['seed']}. Every "
        "level has its own media and texts, identical across targets. Concurrency c = at most c "
        "requests in flight, the next sent as one finishes; all are due at once unless a request "
        "rate is shown.",
        "",
        "Timing from the moment a request is sent: TTFT to the first content chunk, ITL = gaps "
        "between content chunks (about one per token on both servers), E2E to `[DONE]`. "
        "Throughputs count completed requests over the run's wall time; total tokens = prompt + "
        "output tokens (from `usage`). The load average (1 minute, before and after each run) "
        "shows other work on the machine.",
        "",
    ]
    kinds_tokens = {}
    for run in results["runs"]:
        for kind, k in run["summary"]["per_kind"].items():
            kinds_tokens.setdefault(kind, []).append(k["prompt_tokens_mean"])
    if kinds_tokens:
        lines += [
            "Mean prompt tokens: "
            + ", ".join(f"{k} {np.mean(v):.0f}" for k, v in kinds_tokens.items()),
            "",
        ]
    lines += [
        "## Results",
        "",
        "| target | level | ok | failed | wall s | req/s | output tok/s | total tok/s | "
        "TTFT ms mean / p50 / p90 / p99 | ITL ms mean / p50 / p90 / p99 | "
        "E2E s mean / p50 / p90 / p99 | load avg before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = r["summary"]
        lines.append(
            f"| {r['target']} | {_run_level(r)} | {s['completed']} | {s['failed']} | "
            f"{s['duration_s']:.1f} | {s['request_throughput']:.3f} | "
            f"{s['output_throughput']:.1f} | "
            f"{s['total_token_throughput']:.0f} | {_ms(s['ttft_s'])} | {_ms(s['itl_s'])} | "
            f"{_s(s['e2e_s'])} | "
            + " / ".join(
                "-" if x is None else f"{x:.1f}" for x in r.get("load_average") or [None, None]
            )
            + " |"
        )
    base = results.get("baseline")
    base_runs = {_run_level(r): r["summary"] for r in runs if r["target"] == base}
    others = [r for r in runs if r["target"] != base and _run_level(r) in base_runs]
    lines += ["", f"## Speedup over {base}", ""]
    if not others:
        lines.append(f"No level was run on both `{base}` and another target.")
    else:
        lines += [
            "| target | level | output tok/s | req/s | TTFT p50 (lower by) | E2E p50 (lower by) |",
            "|---|---|---|---|---|---|",
        ]
        for r in others:
            s, b = r["summary"], base_runs[_run_level(r)]
            lines.append(
                f"| {r['target']} | {_run_level(r)} | "
                f"{_ratio(s['output_throughput'], b['output_throughput'])} | "
                f"{_ratio(s['request_throughput'], b['request_throughput'])} | "
                f"{_ratio(b['ttft_s']['p50'], s['ttft_s']['p50'])} | "
                f"{_ratio(b['e2e_s']['p50'], s['e2e_s']['p50'])} |"
            )
    lines += [
        "",
        "## By request kind",
        "",
        "TTFT p50 ms / E2E p50 s (completed requests)",
        "",
        "| target | level | " + " | ".join(KINDS) + " |",
        "|---|---|" + "---|" * len(KINDS),
    ]
    for r in runs:
        pk = r["summary"]["per_kind"]
        cells = [
            f"{fmt_ms(pk[k]['ttft_s']['p50'])} / {pk[k]['e2e_s']['p50']:.2f} ({pk[k]['completed']})"
            if k in pk
            else "-"
            for k in KINDS
        ]
        lines.append(f"| {r['target']} | {_run_level(r)} | " + " | ".join(cells) + " |")
    failed = [(r, e) for r in runs for e in r["summary"]["errors"]]
    lines += ["", "## Failed requests", ""]
    lines += [f"- {r['target']} {_run_level(r)}: {e}" for r, e in failed] or ["None."]
    lines += [
        "",
        "## Plots",
        "",
        "![throughput and latency against load](throughput.png)",
        "",
        "![TTFT CDF](ttft_cdf.png)",
        "",
        "![E2E latency CDF](e2e_cdf.png)",
        "",
        "![ITL CDF](itl_cdf.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> None:
    """report.md and its PNG plots in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    runs = results["runs"]
    ok = lambda run: [r for r in run["records"] if r["ok"]]  # noqa: E731
    plot_throughput(runs, out / "throughput.png")
    plot_cdf(
        runs,
        lambda run: [r["ttft_s"] for r in ok(run) if r["ttft_s"] is not None],
        out / "ttft_cdf.png",
        "Time to first token",
    )
    plot_cdf(
        runs, lambda run: [r["e2e_s"] for r in ok(run)], out / "e2e_cdf.png", "End-to-end latency"
    )
    plot_cdf(
        runs,
        lambda run: [x for r in ok(run) for x in r["itl_s"]],
        out / "itl_cdf.png",
        "Inter-token latency (gaps between content chunks)",
        "fraction of gaps",
    )
    (out / "report.md").write_text(report_markdown(results))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    srv = ap.add_argument_group("servers")
    srv.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a running server by base URL, e.g. plm-serve=http://127.0.0.1:8000; a NAME that is "
        "a server kind (plm-serve, hf-baseline, transformers-serve) picks that server's request "
        "dialect (repeatable; default: none)",
    )
    srv.add_argument(
        "--launch",
        action="append",
        default=[],
        choices=SERVER_KINDS,
        help="start this server on --model, benchmark it, stop it; repeatable, run in the order "
        "given, after the --target servers; transformers-serve is the installed transformers' "
        "`transformers serve` CLI (default: none)",
    )
    srv.add_argument(
        "--model", default=None, help="checkpoint directory for --launch (default: none)"
    )
    srv.add_argument(
        "--device",
        default="cpu",
        help="device of the launched servers: cpu (fp32), or cuda (bf16 on all) "
        "(default: %(default)s)",
    )
    srv.add_argument(
        "--served-model-name",
        default="plm-bench",
        help="model name the launched servers serve (default: %(default)s)",
    )
    srv.add_argument(
        "--model-name",
        default=None,
        help="model name to send; default: the first id of the target's /v1/models",
    )
    srv.add_argument(
        "--plm-serve-args",
        default="",
        help="extra command-line arguments for a launched plm-serve, as one string (default: none)",
    )
    srv.add_argument(
        "--transformers-serve-pythonpath",
        default="",
        metavar="DIRS",
        help="directories (os.pathsep-separated) put on a launched transformers serve's "
        "PYTHONPATH, e.g. where `pip install --target DIR accelerate psutil` put the "
        "accelerate package it needs when the environment lacks it (default: none)",
    )
    srv.add_argument(
        "--baseline",
        default="hf-baseline",
        help="target name the speedups are measured against (default: %(default)s)",
    )
    srv.add_argument(
        "--startup-timeout",
        type=float,
        default=600,
        help="seconds a launched server may take to become ready (default: %(default)s)",
    )
    wl = ap.add_argument_group("workload")
    wl.add_argument(
        "--num-prompts", type=int, default=32, help="requests per load level (default: %(default)s)"
    )
    wl.add_argument(
        "--mix",
        default="text=1,image=2,video=1",
        help="relative weights of text, image and video chats (default: %(default)s)",
    )
    wl.add_argument(
        "--image-detail",
        choices=["low", "high", "auto"],
        default="low",
        help="image_url.detail: low = one 448-px thumbnail (256 tokens), high/auto = up to 36 "
        "tiles + thumbnail (default: %(default)s)",
    )
    wl.add_argument(
        "--num-frames",
        type=int,
        default=8,
        help="video_url.num_frames: frames the server samples per video, 256 tokens each "
        "(default: %(default)s)",
    )
    wl.add_argument(
        "--video-frames",
        type=int,
        default=16,
        help=f"frames in each synthetic {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} {VIDEO_FPS}-fps clip "
        "(default: %(default)s)",
    )
    wl.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="output tokens per request (default: 64; 32 per photo chat in the scenarios)",
    )
    wl.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let requests stop at end-of-sequence (default: ignore_eos, fixed output length)",
    )
    wl.add_argument(
        "--repeat-media-ratio",
        type=float,
        default=0.25,
        help="chance that an image/video chat reuses an earlier item of its level with a new "
        "question (default: %(default)s)",
    )
    wl.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    load = ap.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=parse_levels,
        default=[1, 4, 8],
        help="comma-separated concurrency limits, one run each; 0 = no limit (default: 1,4,8)",
    )
    load.add_argument(
        "--baseline-concurrency",
        type=parse_levels,
        default=None,
        help="levels for the --baseline target instead of --concurrency (default: the same)",
    )
    load.add_argument(
        "--request-rate",
        type=parse_rates,
        default=[math.inf],
        help="comma-separated request rates (req/s, Poisson arrivals), one run each with every "
        "concurrency; inf = all at once (default: inf)",
    )
    load.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="unmeasured requests (own media) sent one by one before a target's runs "
        "(default: %(default)s)",
    )
    add_scenario_args(ap)
    add_multiturn_args(ap)
    load.add_argument(
        "--request-timeout",
        type=float,
        default=900,
        help="seconds per request (default: %(default)s)",
    )
    outg = ap.add_argument_group("output")
    outg.add_argument(
        "--out",
        default="serve-bench-out",
        help="directory for results.json, report.md, plots and server logs (default: %(default)s)",
    )
    outg.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line for the report's notes, e.g. about the hardware (repeatable; default: none)",
    )
    outg.add_argument(
        "--no-progress", action="store_true", help="no progress bars (default: bars on stderr)"
    )
    outg.add_argument(
        "--replot",
        metavar="DIR",
        default=None,
        help="only rewrite report.md and the plots from DIR/results.json (default: off)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.replot:
        out = Path(args.replot)
        results = json.loads((out / "results.json").read_text())
        if results.get("scenario") == "multiturn":
            (out / "report.md").write_text(multiturn_report(results))
        elif "scenario" in results:
            (out / "report.md").write_text(scenario_report(results))
        else:
            write_report(results, out)
        print(f"wrote {out / 'report.md'}", file=sys.stderr)
        return 0
    argv_used = sys.argv[1:] if argv is None else argv
    if args.scenario == "multiturn":  # starts its own replicas and balancers
        return bench_multiturn(args, argv_used)
    targets = []
    for spec in args.target:
        name, sep, url = spec.partition("=")
        if not sep or not url.startswith("http"):
            ap.error(f"--target wants NAME=URL, got {spec!r}")
        targets.append(Target(name, url=url.rstrip("/")))
    targets += [Target(kind, launch=kind) for kind in args.launch]
    if not targets:
        ap.error("nothing to benchmark: give --target NAME=URL or --launch KIND")
    if args.launch and not args.model:
        ap.error("--launch needs --model CHECKPOINT_DIR")
    if len({t.name for t in targets}) != len(targets):
        ap.error("target names must be distinct")
    if args.scenario != "sweep":
        return bench_scenario(args, targets, argv_used)
    try:
        mix = parse_mix(args.mix)
    except ValueError as e:
        ap.error(str(e))
    cfg = WorkloadConfig(
        args.num_prompts,
        mix,
        args.image_detail,
        args.num_frames,
        args.video_frames,
        args.max_tokens or 64,
        args.repeat_media_ratio,
        args.ignore_eos,
        args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "command": command_line(argv_used),
        "environment": environment(),
        "workload": asdict(cfg),
        "baseline": args.baseline,
        "notes": args.note,
        "servers": {},
        "runs": [],
    }
    workloads: dict[str, list[BenchRequest]] = {}
    for target in targets:
        bench_target(target, args, cfg, workloads, results, out)
    write_json(results, out / "results.json")
    write_report(results, out)
    failed = sum(r["summary"]["failed"] for r in results["runs"])
    print(
        f"wrote {out / 'results.json'} and {out / 'report.md'}; {failed} failed requests",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
