"""The serving benchmark (benchmarks/serve_bench.py and its serve_* modules) and its HF baseline
server (benchmarks/hf_baseline_server.py).

Fast tests of the statistics, SSE timing, workload, request dialects, photos, scenario figures and
report on synthetic data; then the real thing on the tiny checkpoint: plm-serve and the baseline on
one workload, the baseline's greedy stream against plm-serve's, the three named scenarios, and the
real `transformers serve` launched beside plm-serve (skipped where it cannot start).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import av
import httpx
import pytest
from PIL import Image
from server_proc import start_server, stop_server
from support import REPO, checkpoint_path

sys.path.insert(0, str(REPO / "benchmarks"))
import hf_baseline_server as hfb  # noqa: E402
import serve_bench as sb  # noqa: E402
import serve_launchers as sl  # noqa: E402
import serve_photos as sp  # noqa: E402
import serve_scenarios as ss  # noqa: E402


def record(
    index: int,
    *,
    ok=True,
    ttft=0.1,
    e2e=1.0,
    itl=(0.05, 0.07),
    prompt=100,
    output=3,
    kind="text",
    error=None,
) -> sb.RequestRecord:
    return sb.RequestRecord(
        index,
        kind,
        ok=ok,
        status=200 if ok else 500,
        error=error,
        ttft_s=ttft,
        e2e_s=e2e,
        itl_s=list(itl),
        prompt_tokens=prompt,
        output_tokens=output,
        text=f"out {index}",
    )


# -- statistics ------------------------------------------------------------------------------------
def test_distribution_percentiles_and_empty():
    d = sb.distribution([float(x) for x in range(1, 101)])
    assert d["count"] == 100 and d["mean"] == pytest.approx(50.5) and d["max"] == 100
    assert (d["p50"], d["p90"], d["p99"]) == pytest.approx((50.5, 90.1, 99.01))
    assert sb.distribution([]) == {
        "count": 0,
        "mean": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
    }


def test_summarize_counts_failures_and_divides_by_wall_time():
    records = [
        record(0, ttft=0.1, e2e=1.0),
        record(1, ttft=0.3, e2e=2.0, kind="image"),
        record(2, ttft=0.2, e2e=1.5, itl=(0.1,)),
        record(
            3,
            ok=False,
            ttft=None,
            e2e=0.01,
            itl=(),
            prompt=None,
            output=None,
            error="HTTP 500: boom",
        ),
    ]
    s = sb.summarize(records, duration_s=4.0)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["errors"] == ["#3 (text): HTTP 500: boom"]
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["output_throughput"] == pytest.approx(9 / 4)
    assert s["total_token_throughput"] == pytest.approx((9 + 300) / 4)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2) and s["ttft_s"]["count"] == 3
    assert s["itl_s"]["count"] == 5  # pooled over requests
    assert s["e2e_s"]["max"] == pytest.approx(2.0)  # the failed request's time is not a latency
    assert s["tpot_s"]["p50"] == pytest.approx((1.5 - 0.2) / 2)
    assert set(s["per_kind"]) == {"text", "image"} and s["per_kind"]["text"]["completed"] == 2


# -- SSE timing ------------------------------------------------------------------------------------
def chunk(content=None, finish=None, usage=None) -> str:
    choices = (
        []
        if content is None and finish is None
        else [
            {
                "index": 0,
                "delta": {} if content is None else {"content": content},
                "finish_reason": finish,
            }
        ]
    )
    return "data: " + json.dumps({"choices": choices, "usage": usage})


def parse(lines: list[tuple[float, str]], end: float) -> sb.RequestRecord:
    parser = sb.StreamParser(sb.RequestRecord(0, "text"), sent_at=1.0)
    for t, line in lines:
        parser.feed(line, t)
    return parser.finish(end)


def test_stream_parser_times_first_token_and_gaps():
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    rec = parse(
        [
            (1.1, chunk("")),
            (1.1, ""),
            (1.5, chunk("Hel")),
            (1.5, ""),
            (1.7, chunk("lo")),
            (2.0, chunk(" there")),
            (2.0, chunk(finish="length")),
            (2.1, chunk(usage=usage)),
            (2.1, "data: [DONE]"),
        ],
        end=2.2,
    )
    assert rec.ok and rec.error is None
    assert rec.ttft_s == pytest.approx(0.5)  # the empty role chunk is not a token
    assert rec.itl_s == pytest.approx([0.2, 0.3])
    assert rec.e2e_s == pytest.approx(1.2)
    assert (rec.prompt_tokens, rec.output_tokens, rec.content_chunks) == (12, 3, 3)
    assert rec.text == "Hello there" and rec.finish_reason == "length"


def test_stream_parser_failures_are_recorded():
    usage = {"prompt_tokens": 1, "completion_tokens": 1}
    err = parse(
        [
            (1.2, chunk("a")),
            (1.3, 'data: {"error": {"message": "the engine failed"}}'),
            (1.3, "data: [DONE]"),
        ],
        end=1.4,
    )
    assert not err.ok and "the engine failed" in err.error
    cut = parse([(1.2, chunk("a")), (1.3, chunk(usage=usage))], end=1.4)
    assert not cut.ok and "[DONE]" in cut.error
    no_usage = parse([(1.2, chunk("a")), (1.3, "data: [DONE]")], end=1.4)
    assert not no_usage.ok and "usage" in no_usage.error


# -- workload --------------------------------------------------------------------------------------
def test_mix_and_kind_counts():
    assert sb.parse_mix("text=1,image=2,video=1") == {"text": 1.0, "image": 2.0, "video": 1.0}
    assert sb.kind_counts({"text": 1, "image": 2, "video": 1}, 8) == {
        "text": 2,
        "image": 4,
        "video": 2,
    }
    counts = sb.kind_counts({"text": 1, "image": 1, "video": 1}, 7)
    assert sum(counts.values()) == 7 and max(counts.values()) - min(counts.values()) == 1
    assert sb.kind_counts({"image": 1}, 5) == {"text": 0, "image": 5, "video": 0}
    for bad in ("audio=1", "text", "text=0,image=0"):
        with pytest.raises(ValueError):
            sb.parse_mix(bad)


def decode_data_url(url: str) -> tuple[str, bytes]:
    header, _, payload = url.partition(",")
    return header, base64.b64decode(payload)


def test_workload_is_deterministic_and_its_media_open():
    cfg = sb.WorkloadConfig(
        num_prompts=8,
        image_detail="high",
        num_frames=3,
        video_frames=5,
        repeat_media_ratio=0.5,
        seed=7,
    )
    a, b = sb.make_workload(cfg, "c1"), sb.make_workload(cfg, "c1")
    assert [r.messages for r in a] == [r.messages for r in b]
    assert [r.messages for r in sb.make_workload(cfg, "c2")] != [r.messages for r in a]
    assert [r.kind for r in a].count("image") == 4 and [r.kind for r in a].count("video") == 2
    first_bytes = {}
    for req in a:
        content = req.messages[0]["content"]
        if req.kind == "text":
            assert isinstance(content, str) and req.media_id is None
            continue
        part, question = content
        assert question["type"] == "text" and f"request {req.index}" in question["text"]
        if req.kind == "image":
            assert part["image_url"]["detail"] == "high"
            header, data = decode_data_url(part["image_url"]["url"])
            assert header == "data:image/png;base64"
            with Image.open(io.BytesIO(data)) as img:
                assert img.format == "PNG" and img.size in sb.IMAGE_SIZES
        else:
            assert part["video_url"]["num_frames"] == 3
            header, data = decode_data_url(part["video_url"]["url"])
            assert header == "data:video/mp4;base64"
            with av.open(io.BytesIO(data)) as container:
                assert container.streams.video[0].codec_context.name == "h264"
                assert sum(1 for _ in container.decode(video=0)) == 5
        # the same media id is the same bytes; a reused id appeared earlier
        assert req.reused == (req.media_id in first_bytes)
        first_bytes.setdefault(req.media_id, data)
        assert first_bytes[req.media_id] == data
    body = json.loads(sb.request_body(a[0], "m", cfg))
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["ignore_eos"] and body["max_tokens"] == cfg.max_tokens


def test_arrival_times():
    import random

    assert sb.arrival_times(4, math.inf, random.Random(0)) == [0.0] * 4
    times = sb.arrival_times(4000, 5.0, random.Random(1))
    assert times == sb.arrival_times(4000, 5.0, random.Random(1))
    assert times[0] == 0 and all(b > a for a, b in zip(times, times[1:]))
    # seeded: not a timing check
    assert times[-1] / (len(times) - 1) == pytest.approx(1 / 5.0, rel=0.1)


# -- report ----------------------------------------------------------------------------------------
def fake_results() -> dict:
    runs = []
    for target, scale in (("plm-serve", 1.0), ("hf-baseline", 3.0)):
        for conc in (1, 4):
            records = [
                record(i, ttft=0.1 * scale * (i + 1), e2e=scale * (i + 1), kind=sb.KINDS[i % 3])
                for i in range(6)
            ]
            if target == "hf-baseline" and conc == 4:
                records.append(
                    record(6, ok=False, ttft=None, e2e=0.1, itl=(), error="HTTP 503: busy")
                )
            runs.append(
                {
                    "target": target,
                    "url": "http://x",
                    "model": "m",
                    "concurrency": conc,
                    "request_rate": None,
                    "workload": f"c{conc}-rinf",
                    "load_average": [0.5, 1.5],
                    "summary": sb.summarize(records, duration_s=2.0 * scale),
                    "records": [asdict(r) for r in records],
                }
            )
    return {
        "command": "python benchmarks/serve_bench.py --launch plm-serve",
        "environment": sb.environment(),
        "workload": asdict(sb.WorkloadConfig()),
        "baseline": "hf-baseline",
        "notes": ["2-core CPU, random weights"],
        "servers": {},
        "runs": runs,
    }


def test_report_files_from_fake_results(tmp_path):
    results = fake_results()
    sb.write_json(results, tmp_path / "results.json")
    sb.write_report(json.loads((tmp_path / "results.json").read_text()), tmp_path)
    for name in ("throughput.png", "ttft_cdf.png", "e2e_cdf.png", "itl_cdf.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.size[0] > 400
    report = (tmp_path / "report.md").read_text()
    assert "python benchmarks/serve_bench.py --launch plm-serve" in report
    assert "Note: 2-core CPU, random weights" in report
    assert "| plm-serve | c=4 | 6 | 0 |" in report and "| hf-baseline | c=4 | 6 | 1 |" in report
    assert "| 0.5 / 1.5 |" in report  # the load average before / after
    # same tokens in a third of the time
    assert "| plm-serve | c=1 | 3.00x | 3.00x | 3.00x | 3.00x |" in report
    assert "hf-baseline c=4: #6 (text): HTTP 503: busy" in report
    assert "![TTFT CDF](ttft_cdf.png)" in report


# -- the baseline's request handling (no model) ----------------------------------------------------
def png_url(size=(32, 24)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_baseline_conversation_conversion():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_url(), "detail": "low"}},
                {"type": "text", "text": "What?"},
            ],
        },
    ]
    conv, images, videos, vit = hfb.hf_conversation(msgs)
    assert conv[0] == {"role": "system", "content": "Be brief."}
    # HF's template would drop a plain string
    assert conv[1]["content"] == [{"type": "text", "text": "Hi"}]
    assert conv[2]["content"] == [{"type": "image"}, {"type": "text", "text": "What?"}]
    assert len(images) == 1 and images[0].size == (32, 24) and videos == [] and vit == "vanilla"
    mixed = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_url(), "detail": "low"}},
                {"type": "image_url", "image_url": {"url": png_url()}},
            ],
        }
    ]
    for bad in (
        mixed,
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
            }
        ],
        [{"role": "user", "content": [{"type": "audio"}]}],
    ):
        with pytest.raises(hfb.BadRequest):
            hfb.hf_conversation(bad)


# -- end to end on the tiny checkpoint -------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(plm-serve base URL, baseline base URL), both on the tiny checkpoint."""
    tiny = str(checkpoint_path("tiny"))
    plm, plm_base = start_server(model_name="plm-bench")
    port = sb.free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        baseline = sb.start_server(
            sb.server_command("hf-baseline", tiny, port, "plm-bench", []),
            base,
            ["/health"],
            tmp_path_factory.mktemp("baseline") / "server.log",
            timeout_s=120,
        )
    except BaseException:
        stop_server(plm)
        raise
    yield plm_base, base
    sb.stop_server(baseline)
    stop_server(plm)


def test_bench_runs_both_servers_on_one_workload(servers, tmp_path):
    plm, baseline = servers
    rc = sb.main(
        [
            "--target",
            f"plm-serve={plm}",
            "--target",
            f"hf-baseline={baseline}",
            "--num-prompts",
            "6",
            "--concurrency",
            "1,2",
            "--max-tokens",
            "4",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--note",
            "test",
        ]
    )
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["target"], r["concurrency"]) for r in results["runs"]] == [
        ("plm-serve", 1),
        ("plm-serve", 2),
        ("hf-baseline", 1),
        ("hf-baseline", 2),
    ]
    texts = {}
    for run in results["runs"]:
        s = run["summary"]
        assert (s["completed"], s["failed"]) == (6, 0), s["errors"]
        assert s["output_tokens"] == 6 * 4  # ignore_eos: every request runs to max_tokens
        throughputs = ("request_throughput", "output_throughput", "total_token_throughput")
        assert all(s[name] > 0 for name in throughputs)
        assert {r["kind"] for r in run["records"]} == {"text", "image", "video"}
        texts[run["target"], run["workload"]] = [r["text"] for r in run["records"]]
    # greedy and token-identical to HF: the same text, media included
    for workload in ("c1-rinf", "c2-rinf"):
        ours = texts["plm-serve", workload]
        assert all(ours) and ours == texts["hf-baseline", workload]
    assert (tmp_path / "report.md").exists() and (tmp_path / "throughput.png").exists()


def test_bench_counts_failed_requests(servers, tmp_path):
    plm, _ = servers
    rc = sb.main(
        [
            "--target",
            f"plm-serve={plm}",
            "--model-name",
            "no-such-model",
            "--num-prompts",
            "3",
            "--concurrency",
            "2",
            "--max-tokens",
            "2",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 1
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert (run["summary"]["completed"], run["summary"]["failed"]) == (0, 3)
    assert all(r["status"] == 404 and "no-such-model" in r["error"] for r in run["records"])
    assert "#0" in (tmp_path / "report.md").read_text()


def stream_text(base: str, prompt: str) -> tuple[str, dict]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    text, usage = "", None
    for event in client.chat.completions.create(
        model="plm-bench",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        if event.choices:
            text += event.choices[0].delta.content or ""
        if event.usage:
            usage = event.usage.model_dump()
    return text, usage


def test_baseline_greedy_stream_matches_plm_serve(servers):
    plm, baseline = servers
    prompt = "Tell me about the lantern by the river."
    ours, ours_usage = stream_text(plm, prompt)
    hf, hf_usage = stream_text(baseline, prompt)
    assert hf and hf == ours
    assert hf_usage["completion_tokens"] == ours_usage["completion_tokens"] == 12
    assert hf_usage["prompt_tokens"] == ours_usage["prompt_tokens"]
    non_stream = httpx.post(
        f"{baseline}/v1/chat/completions",
        timeout=60,
        json={
            "model": "x",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
        },
    ).json()
    assert non_stream["choices"][0]["message"]["content"] == hf
    assert non_stream["choices"][0]["finish_reason"] == "length"


# -- request dialects, photos and scenario figures (no server) -------------------------------------
def test_chat_body_in_each_dialect():
    messages = [{"role": "user", "content": "hi"}]
    ours = sl.chat_body(messages, "m", 7, sl.dialect_for("plm-serve"))
    assert ours["ignore_eos"] is True and ours["stream_options"] == {"include_usage": True}
    assert (ours["max_tokens"], ours["temperature"], ours["stream"]) == (7, 0, True)
    hf = sl.chat_body(messages, "m", 7, sl.dialect_for("transformers-serve"))
    # transformers serve answers 422 to fields it does not know (ignore_eos, min_tokens)
    assert "ignore_eos" not in hf and "stream_options" not in hf and "min_tokens" not in hf
    assert json.loads(hf["generation_config"]) == {"min_new_tokens": 7, "max_new_tokens": 7}
    assert "generation_config" not in sl.chat_body(
        messages, "m", 7, sl.DIALECTS["transformers-serve"], fixed_length=False
    )
    assert sl.dialect_for("my-server") == sl.OPENAI


def test_stream_parser_without_done():
    usage = {"prompt_tokens": 5, "completion_tokens": 2}
    lines = [(1.2, chunk("a")), (1.3, chunk("b")), (1.3, chunk(finish="length", usage=usage))]
    parser = sb.StreamParser(sb.RequestRecord(0, "text", start_s=2.0), 1.0, expect_done=False)
    for t, line in lines:
        parser.feed(line, t)
    rec = parser.finish(1.4)
    assert rec.ok and rec.output_tokens == 2 and rec.chunk_at_s == pytest.approx([2.2, 2.3])
    cut = sb.StreamParser(sb.RequestRecord(0, "text"), 1.0, expect_done=False)
    cut.feed(chunk("a"), 1.1)
    cut.feed(chunk(usage=usage), 1.2)
    assert "finish_reason" in cut.finish(1.3).error


def test_transformers_serve_command_and_environment(tmp_path):
    cmd = sl.server_command("transformers-serve", "/ckpt", 1234, "ignored", [], "cpu")
    assert cmd[1:] == [
        "serve",
        "/ckpt",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        "1234",
    ]
    assert Path(cmd[0]).name == "transformers"
    assert sl.server_command("transformers-serve", "/c", 1, "x", [], "cuda")[6] == "bfloat16"
    env = sl.transformers_serve_env(tmp_path / "home", ["/extra"])
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONPATH"] == "/extra"
    assert Path(env["HF_HUB_CACHE"]).is_dir()  # it lists this folder and fails if it is missing


def test_photos_are_deterministic_jpegs_with_plm_tile_counts():
    from plm_core.media.tiling import num_image_tiles

    budget = sp.TileBudget(tile_size=56, max_num_tiles=36, tokens_per_tile=4)
    book, again = sp.PhotoBook(budget, seed=3), sp.PhotoBook(budget, seed=3)
    photos = [book.get("burst", i) for i in range(4)]
    assert [p.url for p in photos] == [again.get("burst", i).url for i in range(4)]
    assert len({p.url for p in photos} | {book.get("repeat", 0).url}) == 5
    for p in photos:
        header, data = decode_data_url(p.url)
        assert header == "data:image/jpeg;base64" and len(data) == p.jpeg_bytes
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and img.size == (p.width, p.height)
        tiles = num_image_tiles(p.width, p.height, tile_size=56, max_num_tiles=36)
        assert p.tiles == tiles == 1 + p.grid[0] * p.grid[1] and p.image_tokens == 4 * tiles
    # the fewest tiles PLM's tiling gives at photo aspect ratios under a budget of 36
    assert [p.tiles for p in photos] == [13, 16, 11, 13]
    assert [d["id"] for d in book.made()] == [
        "burst-0",
        "burst-1",
        "burst-2",
        "burst-3",
        "repeat-0",
    ]


def test_window_figures_take_the_gaps_overlapping_the_prefill_window():
    text = sb.RequestRecord(0, "text", ok=True, chunk_at_s=[1.0, 1.1, 1.2, 1.9, 2.0, 2.1])
    late = sb.RequestRecord(1, "text", ok=True, chunk_at_s=[2.5, 2.6])  # queued behind the rest
    photo = sb.RequestRecord(2, "image", "interfere-0", ok=True, start_s=1.15, ttft_s=0.8)
    alone = sb.RequestRecord(3, "image", "alone-0", ok=True, ttft_s=0.4)
    rep = ss.window_figures([text, late], photo, alone)
    # the window is 1.15 .. 1.95: the gaps 1.1-1.2, 1.2-1.9 and 1.9-2.0 overlap it
    assert rep["itl_window_s"] == pytest.approx([0.1, 0.7, 0.1])
    assert rep["itl_before_s"] == pytest.approx([0.1])
    assert rep["streams_decoding_in_window"] == 1 and rep["window_s"] == pytest.approx(0.8)
    summary = ss.interference_summary([rep])
    assert summary["ttft_over_alone"] == pytest.approx(2.0)
    assert summary["itl_window_s"]["count"] == 3 and summary["failed"] == 0


# -- the scenarios end to end on the tiny checkpoint -----------------------------------------------
SCENARIO_SIZES = [
    "--max-tokens",
    "3",
    "--burst-photos",
    "2",
    "--burst-questions",
    "2",
    "--burst-repeats",
    "2",
    "--repeat-photos",
    "2",
    "--repeat-warm",
    "1",
    "--text-streams",
    "2",
    "--text-tokens",
    "24",
    "--steady-tokens",
    "3",
    "--warmup",
    "1",
    "--no-progress",
]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def check_scenario(out: Path, scenario: str, targets: list[str]) -> dict:
    """results.json and report.md are well formed; every figure is there and positive."""
    results = json.loads((out / "results.json").read_text())
    assert results["scenario"] == scenario and list(results["results"]) == targets
    assert results["checkpoint"]["tile_size"] == 56 and results["photos"]
    report = (out / "report.md").read_text()
    assert f"# Serving scenario `{scenario}`" in report and "## Failed requests\n\nNone." in report
    assert "| " + " | ".join(targets) in report
    if len(targets) > 1:
        assert f"| {targets[0]} / {targets[-1]} |" in report
    for name in targets:
        s = results["results"][name]["summary"]
        assert s["failed"] == 0 and s["completed"] == s["requests"] > 0, s["errors"]
        assert results["results"][name]["records"]
        if scenario == "burst":
            figures = [s["output_throughput"], s["ttft_s"]["p50"], s["ttft_s"]["p99"]]
            figures += [s["itl_s"]["p50"], s["itl_s"]["p99"]]
        elif scenario == "repeat":
            figures = [s["cold_ttft_s"]["p50"], s["warm_ttft_s"]["p50"], s["cold_over_warm"]]
        else:
            figures = [s["itl_window_s"]["p50"], s["itl_window_s"]["p99"]]
            figures += [s["photo_ttft_s"]["p50"], s["alone_ttft_s"]["p50"], s["ttft_over_alone"]]
        assert all(positive(x) for x in figures), figures
    return results


@pytest.mark.parametrize("scenario", ss.SCENARIOS)
def test_scenarios_run_end_to_end(servers, tmp_path, scenario):
    plm, _ = servers
    tiny = str(checkpoint_path("tiny"))
    argv = ["--scenario", scenario, "--target", f"plm-serve={plm}", "--target", f"again={plm}"]
    assert sb.main([*argv, "--model", tiny, *SCENARIO_SIZES, "--out", str(tmp_path)]) == 0
    results = check_scenario(tmp_path, scenario, ["plm-serve", "again"])
    s = results["results"]["plm-serve"]["summary"]
    if scenario == "burst":
        assert s["requests"] == 4 and s["output_tokens_min"] == s["output_tokens_max"] == 3
        # two measured bursts (new photos each) after an unmeasured one; the upper median's figures
        rates = sorted(b["output_throughput"] for b in s["bursts"])
        assert len(rates) == 2 and s["output_throughput"] == rates[1]
        records = results["results"]["plm-serve"]["records"]
        assert len(records) == 8 and len({r["media_id"] for r in records}) == 4
        assert "## Per burst" in (tmp_path / "report.md").read_text()
    elif scenario == "repeat":
        assert [p["photo"] for p in s["per_photo"]] == ["repeat-0", "repeat-1"]
        assert all(len(p["warm_ttft_s"]) == 1 for p in s["per_photo"])
    else:
        assert s["text_output_tokens_min"] == 24 and s["itl_window_s"]["count"] > 0
    # the report again from results.json
    (tmp_path / "report.md").unlink()
    assert sb.main(["--replot", str(tmp_path)]) == 0 and (tmp_path / "report.md").exists()


def transformers_serve_pythonpath() -> list[str]:
    """Extra import directories for transformers serve (where accelerate was installed with pip
    --target when the environment lacks it), from TRANSFORMERS_SERVE_PYTHONPATH."""
    return [p for p in os.environ.get("TRANSFORMERS_SERVE_PYTHONPATH", "").split(os.pathsep) if p]


def check_fixed_length(tiny: str, log: Path) -> None:
    """transformers serve takes min_new_tokens in its generation_config field: a greedy chat
    pushed towards end-of-sequence stops at once without it, and runs to max_tokens with it."""
    launched = sl.launch(
        "transformers-serve",
        tiny,
        device="cpu",
        served_name="unused",
        extra=[],
        log_path=log,
        timeout_s=120,
        pythonpath=transformers_serve_pythonpath(),
    )
    try:
        dialect, messages = sl.DIALECTS["transformers-serve"], [{"role": "user", "content": "Hi"}]
        eos = json.loads(Path(tiny, "generation_config.json").read_text())["eos_token_id"]
        usage = []
        for fixed in (False, True):
            body = sl.chat_body(messages, launched.model, 6, dialect, fixed_length=fixed)
            body.update(stream=False, logit_bias={str(eos[-1]): 100.0})
            resp = httpx.post(f"{launched.base}/v1/chat/completions", json=body, timeout=60)
            usage.append(resp.json()["usage"]["completion_tokens"])
        assert usage == [1, 6]
        refused = sl.chat_body(messages, launched.model, 6, sl.OPENAI)  # ignore_eos
        resp = httpx.post(f"{launched.base}/v1/chat/completions", json=refused, timeout=60)
        assert resp.status_code == 422 and "ignore_eos" in resp.text
    finally:
        sl.stop(launched)


def test_transformers_serve_launches_and_serves_photos(tmp_path):
    problem = sl.transformers_serve_problem(transformers_serve_pythonpath())
    if problem:
        pytest.skip(f"{problem}; TRANSFORMERS_SERVE_PYTHONPATH=DIR points the test at one")
    tiny = str(checkpoint_path("tiny"))
    check_fixed_length(tiny, tmp_path / "probe.log")
    rc = sb.main(
        [
            "--scenario",
            "burst",
            "--launch",
            "plm-serve",
            "--launch",
            "transformers-serve",
            "--model",
            tiny,
            "--transformers-serve-pythonpath",
            os.pathsep.join(transformers_serve_pythonpath()),
            "--startup-timeout",
            "120",
            *SCENARIO_SIZES,
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    results = check_scenario(tmp_path, "burst", ["plm-serve", "transformers-serve"])
    ours, hf = (results["results"][n] for n in ("plm-serve", "transformers-serve"))
    # it read the photos (data: URLs) and tiled them as PLM does: the same prompt lengths
    assert [r["prompt_tokens"] for r in hf["records"]] == [
        r["prompt_tokens"] for r in ours["records"]
    ]
    assert hf["summary"]["output_tokens_min"] == 3  # min_new_tokens via generation_config
    server = results["targets"]["transformers-serve"]
    assert server["model"] == tiny and server["server"]["env"]["HF_HUB_OFFLINE"] == "1"
    assert "transformers serve" in (tmp_path / "report.md").read_text()
