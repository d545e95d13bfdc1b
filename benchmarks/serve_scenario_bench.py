"""Runs one named scenario (serve_scenarios) on each target in turn, and writes results.json and a
report.md with one column per target and their ratio."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from serve_launchers import Target, close_target, open_target, shown_command
from serve_photos import TileBudget
from serve_results import (
    command_line,
    environment,
    fmt_ms,
    load_average,
    report_head,
    write_json,
)
from serve_scenarios import (
    SCENARIOS,
    Endpoint,
    PhotoBook,
    ScenarioConfig,
    run_scenario,
    warm_up,
)

Row = tuple[str, Callable[[dict], float | None], str, bool]  # label, figure, format, ratio?


def add_scenario_args(ap: argparse.ArgumentParser) -> None:
    """The CLI's scenario options."""
    d = ScenarioConfig()
    g = ap.add_argument_group(
        "scenarios (instead of the concurrency sweep; --max-tokens: per photo chat, default 32)"
    )
    g.add_argument(
        "--scenario",
        choices=["sweep", *SCENARIOS, "multiturn"],
        default="sweep",
        help="sweep: the concurrency/rate sweep above; burst, repeat, interference: the named "
        "scenarios (see serve_scenarios.py); multiturn: conversations across replicas behind "
        "balancers (serve_multiturn.py) (default: %(default)s)",
    )
    for flag, default, text in (
        ("--burst-photos", d.burst_photos, "burst: photos"),
        ("--burst-questions", d.burst_questions, "burst: questions per photo, all sent at once"),
        (
            "--burst-repeats",
            d.burst_repeats,
            "burst: measured bursts, new photos each, after one unmeasured burst; the figures are "
            "the median burst's",
        ),
        ("--repeat-photos", d.repeat_photos, "repeat: repetitions, each with a new photo"),
        ("--repeat-warm", d.repeat_warm, "repeat: warm requests after each cold one"),
        ("--text-streams", d.text_streams, "interference: text streams"),
        ("--text-tokens", d.text_tokens, "interference: output tokens per text stream"),
        (
            "--steady-tokens",
            d.steady_tokens,
            "interference: the photo is sent once a text stream has streamed this many tokens",
        ),
        ("--interference-photos", d.interference_photos, "interference: repetitions"),
    ):
        g.add_argument(flag, type=int, default=default, help=f"{text} (default: %(default)s)")


def scenario_config(args) -> ScenarioConfig:
    """The scenario's sizes from the CLI's arguments."""
    return ScenarioConfig(
        max_tokens=args.max_tokens or 32,
        burst_photos=args.burst_photos,
        burst_questions=args.burst_questions,
        burst_repeats=args.burst_repeats,
        repeat_photos=args.repeat_photos,
        repeat_warm=args.repeat_warm,
        text_streams=args.text_streams,
        text_tokens=args.text_tokens,
        steady_tokens=args.steady_tokens,
        interference_photos=args.interference_photos,
        warmup=args.warmup,
        seed=args.seed,
    )


def checkpoint_info(model: str | None, budget: TileBudget) -> dict:
    info = {"path": model, **asdict(budget)}
    preset = Path(model, "plm_serve_preset.json") if model else None
    if preset and preset.exists():
        info["preset"] = json.loads(preset.read_text()).get("preset")
    return info


def bench_scenario(args, targets: list[Target], argv: list[str]) -> int:
    """Each target in turn: started if asked, warmed up, the scenario run, stopped."""
    cfg = scenario_config(args)
    budget = TileBudget.of_checkpoint(args.model) if args.model else TileBudget()
    book = PhotoBook(budget, cfg.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in targets]
    results: dict = {
        "command": command_line(argv),
        "environment": environment(),
        "scenario": args.scenario,
        "config": asdict(cfg),
        "checkpoint": checkpoint_info(args.model, budget),
        "baseline": args.baseline if args.baseline in names else names[-1],
        "notes": args.note,
        "targets": {},
        "results": {},
        "photos": [],
    }
    for target in targets:
        opened = open_target(target, args, out / "logs")
        try:
            url = f"{opened.base}/v1/chat/completions"
            ep = Endpoint(url, opened.model, opened.dialect, args.request_timeout)
            warm = asyncio.run(warm_up(ep, cfg, book))
            if not all(r.ok for r in warm):
                print(f"[{target.name}] warmup failures: {[r.error for r in warm if not r.ok]}")
            load_before = load_average()
            result = run_scenario(args.scenario, ep, cfg, book)
            result["load_average"] = [load_before, load_average()]
        finally:
            close_target(opened)
        results["targets"][target.name] = {
            "url": opened.base,
            "model": opened.model,
            "fixed_length": opened.dialect.describe(),
            "server": opened.launched.describe() if opened.launched else None,
        }
        results["results"][target.name] = result
        results["photos"] = book.made()
        print(f"[{target.name}] {args.scenario}: {one_line(args.scenario, result['summary'])}")
        write_json(results, out / "results.json")  # after every target: a crash keeps it
    (out / "report.md").write_text(report_markdown(results))
    failed = sum(r["summary"]["failed"] for r in results["results"].values())
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}; {failed} failed requests")
    return 1 if failed else 0


# -- report ----------------------------------------------------------------------------------------
def _get(*keys: str) -> Callable[[dict], float | None]:
    def figure(summary: dict) -> float | None:
        value = summary
        for key in keys:
            if value is None:
                return None
            value = value.get(key)
        return value

    return figure


ROWS: dict[str, list[Row]] = {
    "burst": [
        ("completed requests", _get("completed"), "n", False),
        ("failed requests", _get("failed"), "n", False),
        ("output tokens per request (min)", _get("output_tokens_min"), "n", False),
        ("prompt tokens per request (mean)", _get("prompt_tokens_mean"), "n", False),
        ("wall time s", _get("wall_s"), "s", True),
        ("output tok/s", _get("output_throughput"), "f1", True),
        ("TTFT p50 ms", _get("ttft_s", "p50"), "ms", True),
        ("TTFT p99 ms", _get("ttft_s", "p99"), "ms", True),
        ("ITL p50 ms", _get("itl_s", "p50"), "ms", True),
        ("ITL p99 ms", _get("itl_s", "p99"), "ms", True),
    ],
    "repeat": [
        ("completed requests", _get("completed"), "n", False),
        ("failed requests", _get("failed"), "n", False),
        ("cold TTFT p50 ms (new photo)", _get("cold_ttft_s", "p50"), "ms", True),
        ("warm TTFT p50 ms (same photo, new question)", _get("warm_ttft_s", "p50"), "ms", True),
        ("cold / warm TTFT", _get("cold_over_warm"), "x", True),
    ],
    "interference": [
        ("completed requests", _get("completed"), "n", False),
        ("failed requests", _get("failed"), "n", False),
        ("text ITL p50 ms in the photo's prefill window", _get("itl_window_s", "p50"), "ms", True),
        ("text ITL p99 ms in the photo's prefill window", _get("itl_window_s", "p99"), "ms", True),
        ("text token gaps in the window", _get("itl_window_s", "count"), "n", False),
        ("text streams decoding in the window", _get("streams_decoding_in_window"), "n", False),
        ("text ITL p50 ms before the photo was sent", _get("itl_before_s", "p50"), "ms", True),
        ("photo TTFT ms with the text streams", _get("photo_ttft_s", "p50"), "ms", True),
        ("photo TTFT ms alone on the idle server", _get("alone_ttft_s", "p50"), "ms", True),
        ("photo TTFT with streams / alone", _get("ttft_over_alone"), "x", True),
    ],
}


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "ms":
        return fmt_ms(value)
    if kind == "s":
        return f"{value:.2f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "f1":
        return f"{value:.1f}"
    return f"{value:g}"


def one_line(scenario: str, summary: dict) -> str:
    rows = [r for r in ROWS[scenario] if r[3]]
    return "; ".join(f"{label} {_fmt(fig(summary), kind)}" for label, fig, kind, _ in rows)


def results_table(results: dict) -> list[str]:
    """Rows = figures, columns = targets, then each other target over the baseline."""
    names = list(results["results"])
    base = results["baseline"]
    others = [n for n in names if n != base]
    head = names + [f"{n} / {base}" for n in others]
    lines = ["| | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    summaries = {n: results["results"][n]["summary"] for n in names}
    for label, figure, kind, ratio in ROWS[results["scenario"]]:
        values = {n: figure(summaries[n]) for n in names}
        cells = [_fmt(values[n], kind) for n in names]
        for n in others:
            a, b = values[n], values[base]
            cells.append(f"{a / b:.3g}" if ratio and a is not None and b else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    loads = [results["results"][n].get("load_average") or [None, None] for n in names]
    cells = [" / ".join("-" if x is None else f"{x:.1f}" for x in load) for load in loads]
    lines.append("| load average before / after | " + " | ".join(cells + [""] * len(others)) + " |")
    return lines


def detail_table(results: dict) -> list[str]:
    """Per burst (burst), per photo (repeat) or per repetition (interference)."""
    scenario, out = results["scenario"], []
    if scenario == "burst":
        out += ["| target | burst | wall s | output tok/s | completed | failed |", "|---" * 6 + "|"]
        for name, res in results["results"].items():
            for i, b in enumerate(res["summary"].get("bursts", []), 1):
                out.append(
                    f"| {name} | {i} | {b['wall_s']:.2f} | {b['output_throughput']:.1f} | "
                    f"{b['completed']} | {b['failed']} |"
                )
    elif scenario == "repeat":
        out += ["| target | photo | cold TTFT ms | warm TTFT ms | cold / warm |", "|---" * 5 + "|"]
        for name, res in results["results"].items():
            for p in res["summary"]["per_photo"]:
                warm = ", ".join(fmt_ms(t) for t in p["warm_ttft_s"]) or "-"
                out.append(
                    f"| {name} | {p['photo']} | {fmt_ms(p['cold_ttft_s'])} | {warm} | "
                    f"{_fmt(p['cold_over_warm'], 'x')} |"
                )
    elif scenario == "interference":
        out += [
            "| target | photo | window ms | ITL p50 / p99 ms in window (gaps) | "
            "ITL p50 ms before | TTFT ms with streams / alone |",
            "|---" * 6 + "|",
        ]
        for name, res in results["results"].items():
            for x in res["summary"]["repetitions"]:
                w = x["itl_window"]
                out.append(
                    f"| {name} | {x['photo']} | {fmt_ms(x['window_s'])} | {fmt_ms(w['p50'])} / "
                    f"{fmt_ms(w['p99'])} ({w['count']}) | {fmt_ms(x['itl_before']['p50'])} | "
                    f"{fmt_ms(x['photo_ttft_s'])} / {fmt_ms(x['alone_ttft_s'])} |"
                )
    return out


def workload_lines(results: dict) -> list[str]:
    c, scenario = results["config"], results["scenario"]
    if scenario == "burst":
        n = c["burst_photos"] * c["burst_questions"]
        text = (
            f"{n} streamed photo chats sent at once: {c['burst_photos']} photos, each asked "
            f"{c['burst_questions']} different questions; {c['max_tokens']} output tokens each. "
            "Output tok/s = output tokens of the completed requests over the wall time from the "
            "first send to the last end of stream; ITL pooled over the burst's requests. "
            f"{c.get('burst_repeats', 1)} measured burst(s), each with new photos, after one "
            "unmeasured burst of the same shape with its own photos (it warms the server's "
            "concurrent paths, not its caches); the table gives the median burst (by output "
            "tok/s), and every burst is listed under it."
        )
    elif scenario == "repeat":
        text = (
            f"{c['repeat_photos']} repetitions, each with a photo the server has never seen: one "
            f"cold chat, then {c['repeat_warm']} warm chats with new questions on the same photo, "
            f"one at a time; {c['max_tokens']} output tokens each. The ratio is cold p50 over warm "
            "p50."
        )
    else:
        text = (
            f"{c['text_streams']} text-only streams of {c['text_tokens']} output tokens are sent "
            f"at once; when one of them has streamed {c['steady_tokens']} tokens, a cold photo "
            f"chat ({c['max_tokens']} output tokens) is sent. The prefill window runs from the "
            "photo's send to its first token; the text streams' gaps between tokens that overlap "
            "it give the in-window ITL. Before that, another photo of the same size was sent "
            f"alone on the idle server. {c['interference_photos']} repetition(s), new photos each."
        )
    return [
        text,
        "",
        "Every request is greedy (temperature 0) and streamed; TTFT is timed from the send to the "
        "first content chunk, ITL between content chunks. "
        f"{c['warmup']} unmeasured warmup request(s) (own photos) went to each target first.",
    ]


def photo_lines(results: dict) -> list[str]:
    ck = results["checkpoint"]
    lines = [
        f"Photos: synthetic JPEGs (gradient, shapes, noise; quality 85), sent as base64 data: "
        f"URLs. Tile counts from `plm_core.media.tiling` for {ck['tile_size']}-px tiles and the "
        f"checkpoint's default budget of {ck['max_num_tiles']} tiles, thumbnail included; "
        f"{ck['tokens_per_tile']} tokens per tile.",
        "",
        "| photo | shape | pixels | grid | tiles | image tokens | JPEG KB |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in results["photos"]:
        lines.append(
            f"| {p['id']} | {p['shape']} | {p['width']}x{p['height']} | "
            f"{p['grid'][0]}x{p['grid'][1]} | {p['tiles']} | {p['image_tokens']} | "
            f"{p['jpeg_bytes'] / 1024:.0f} |"
        )
    return lines


def target_lines(results: dict) -> list[str]:
    lines = []
    for name, t in results["targets"].items():
        server = t["server"]
        if server:
            lines.append(f"- `{name}` was started as `{shown_command(server)}`")
            lines.append(f"  - flags set: {server['flags_set']}")
        else:
            lines.append(f"- `{name}`: a running server at {t['url']}")
        lines.append(
            f"  - model name sent: `{t['model']}`; fixed output length: {t['fixed_length']}"
        )
    return lines


def report_markdown(results: dict) -> str:
    names = list(results["results"])
    ck = results["checkpoint"]
    preset = f" (the `{ck['preset']}` preset: random weights)" if ck.get("preset") else ""
    lines = [
        *report_head(f"Serving scenario `{results['scenario']}`: {', '.join(names)}", results),
        f"- Checkpoint: `{ck['path']}`{preset}",
        "- Each server runs with its default flags: no batching, caching or scheduling flag is "
        "set on any of them; the flags set are only those each needs to run here (named below).",
        *target_lines(results),
        "",
        "## Workload",
        "",
        *workload_lines(results),
        "",
        *photo_lines(results),
        "",
        "## Results",
        "",
        f"Ratios are each target's figure divided by {results['baseline']}'s: above 1 is better "
        "for tok/s, below 1 is better for times. The load average (1 minute, before and after "
        "each target's run) shows other work on the machine.",
        "",
        *results_table(results),
        "",
    ]
    detail = detail_table(results)
    if detail:
        heading = {"burst": "## Per burst", "repeat": "## Per photo"}.get(results["scenario"])
        lines += [heading or "## Per repetition", ""]
        lines += [*detail, ""]
    failed = [(n, e) for n in names for e in results["results"][n]["summary"]["errors"]]
    lines += ["## Failed requests", ""]
    lines += [f"- {n}: {e}" for n, e in failed] or ["None."]
    lines += [""]
    return "\n".join(lines)
