"""Runs the multi-turn scenario (serve_multiturn) on each setup in turn (replicas and a balancer,
started fresh, so every setup begins with cold caches) and writes results.json and report.md.

    .venv/bin/python benchmarks/serve_bench.py --scenario multiturn --model CHECKPOINT_DIR \\
        --setups single,round-robin,haproxy,haproxy-uuid --out multiturn

A setup is a balancer (serve_cluster), a replica count and what the client sends. `--kill-after N`
adds the kill run: the chosen router with X-Session-Id keys, one replica SIGKILLed once N requests
have finished; it reports the requests that failed after the kill and the conversations of live
replicas that changed replica.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
from serve_cluster import (
    Balancer,
    balancer_problem,
    served_counts,
    start_balancer,
    start_replicas,
    stop_replicas,
)
from serve_launchers import OPENAI
from serve_multiturn import MultiturnConfig, run_multiturn, summarize
from serve_photos import PhotoBook, TileBudget
from serve_results import command_line, environment, fmt_ms, report_head, write_json


@dataclass(frozen=True)
class Setup:
    balancer: str
    replicas: int
    key: str = "none"
    uuid_refs: bool = False
    label: str = ""


SETUPS = {
    "single": Setup("direct", 1, label="1 replica"),
    "round-robin": Setup("haproxy-rr", 3, label="3 replicas, round robin (HAProxy roundrobin)"),
    "haproxy": Setup("haproxy", 3, label="3 replicas, HAProxy, no client key (content key)"),
    "haproxy-body": Setup(
        "haproxy", 3, "body", label="3 replicas, HAProxy, prompt_cache_key in the body"
    ),
    "haproxy-uuid": Setup(
        "haproxy", 3, "header", True, label="3 replicas, HAProxy, X-Session-Id + uuid references"
    ),
    "vllm-router": Setup(
        "vllm-router", 3, "header", label="3 replicas, vllm-router consistent_hash, X-Session-Id"
    ),
    "vllm-router-nokey": Setup(
        "vllm-router", 3, label="3 replicas, vllm-router consistent_hash, no client key"
    ),
    "sglang-router": Setup(
        "sglang-router", 3, label="3 replicas, sglang-router cache_aware, no client key"
    ),
}
CHOSEN = "haproxy"


def add_multiturn_args(ap: argparse.ArgumentParser) -> None:
    d = MultiturnConfig()
    g = ap.add_argument_group("multiturn scenario (--scenario multiturn)")
    g.add_argument(
        "--setups",
        default="single,round-robin,haproxy,haproxy-uuid",
        help=f"comma-separated setups, each run on fresh replicas: {', '.join(SETUPS)} "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--kill-after",
        type=int,
        default=0,
        help="also run the kill test: the chosen router with X-Session-Id keys, one replica "
        "SIGKILLed after this many finished requests (default: 0, not run)",
    )
    for flag, default, text in (
        ("--conversations", d.conversations, "conversations, each with its own photo or video"),
        ("--turns", d.turns, "turns per conversation"),
        ("--video-every", d.video_every, "every n-th conversation is about a video (0: none)"),
        ("--multiturn-concurrency", d.concurrency, "requests in flight at once"),
    ):
        g.add_argument(flag, type=int, default=default, help=f"{text} (default: %(default)s)")


def _run_setup(name: str, setup: Setup, cfg: MultiturnConfig, args, book, out: Path, kill_after=0):
    work = out / "logs" / name
    replicas = start_replicas(args.model, setup.replicas, work, [], timeout_s=args.startup_timeout)
    bal: Balancer | None = None
    try:
        bal = start_balancer(setup.balancer, replicas, work)
        warm_up(replicas, book)
        before = served_counts(replicas)
        killed: list = []
        if kill_after:
            threading.Thread(
                target=_kill_when, args=(replicas, before, kill_after, killed), daemon=True
            ).start()
        url = f"{bal.url}/v1/chat/completions"
        rows, wall = asyncio.run(run_multiturn(url, "plm-bench", OPENAI, cfg, book))
        after = [a if r.alive else b for r, a, b in zip(replicas, served_counts(replicas), before)]
        per_replica = [a - b for a, b in zip(after, before)]
        summary = summarize(rows, per_replica if setup.replicas > 1 else [len(rows)], wall)
        if kill_after:
            summary["kill"] = kill_summary(rows, killed)
        return {"setup": asdict(setup), "config": asdict(cfg), "summary": summary, "rows": rows}
    finally:
        if bal is not None:
            bal.stop()
        stop_replicas(replicas)


def warm_up(replicas, book: PhotoBook) -> None:
    """One unmeasured photo chat and one text chat on each replica directly (its own photo)."""
    for i, r in enumerate(replicas):
        photo = book.get("multiturn-warmup", i)
        for content in ([photo.part(), {"type": "text", "text": "Hi."}], "Hello."):
            body = {"model": "plm-bench", "messages": [{"role": "user", "content": content}]}
            httpx.post(f"{r.base}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=300)


def _kill_when(replicas, before, after_n: int, killed: list) -> None:
    """SIGKILLs the replica that has served most, once the cluster has finished after_n requests;
    appends its name and the kill's time (perf_counter)."""
    while True:
        counts = served_counts(replicas)
        if sum(counts) - sum(before) >= after_n:
            victim = replicas[counts.index(max(counts))]
            victim.proc.kill()
            killed.extend([victim.name, time.perf_counter()])
            return
        time.sleep(0.05)


def kill_summary(rows: list[dict], killed: list) -> dict:
    """After the kill: requests that failed, and conversations of live replicas that moved."""
    if not killed:
        return {"killed": None}
    victim, kill_at = killed
    by_conv: dict[int, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["sent_at"]):
        by_conv.setdefault(r["conversation"], []).append(r)
    after = [r for r in rows if r["sent_at"] > kill_at]
    moved_live, live_convs = 0, 0
    for turns in by_conv.values():
        first = turns[0]["served_by"]
        if first and first != victim:
            live_convs += 1
            moved_live += any(t["served_by"] != first for t in turns if t["ok"])
    return {
        "killed": victim,
        "requests_after_kill": len(after),
        "failed_after_kill": sum(not r["ok"] for r in after),
        "retried_after_kill": sum(r.get("connection_retries", 0) > 0 for r in after),
        "failed_in_all": sum(not r["ok"] for r in rows),
        "live_conversations": live_convs,
        "live_conversations_moved": moved_live,
    }


def bench_multiturn(args, argv: list[str]) -> int:
    if not args.model:
        raise SystemExit("--scenario multiturn needs --model CHECKPOINT_DIR")
    names = [s for s in args.setups.split(",") if s]
    unknown = [s for s in names if s not in SETUPS]
    if unknown:
        raise SystemExit(f"unknown setups {unknown}: choose from {', '.join(SETUPS)}")
    base = MultiturnConfig(
        conversations=args.conversations,
        turns=args.turns,
        video_every=args.video_every,
        concurrency=args.multiturn_concurrency,
        max_tokens=args.max_tokens or MultiturnConfig.max_tokens,
        seed=args.seed,
    )
    book = PhotoBook(TileBudget.of_checkpoint(args.model), base.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "command": command_line(argv),
        "environment": environment(),
        "scenario": "multiturn",
        "kill_after": args.kill_after,
        "config": asdict(base),
        "checkpoint": args.model,
        "notes": args.note,
        "setups": {},
    }
    runs = [(n, SETUPS[n], 0) for n in names]
    if args.kill_after:
        runs.append(("kill", replace(SETUPS[CHOSEN], key="header", label="kill"), args.kill_after))
    for name, setup, kill_after in runs:
        problem = balancer_problem(setup.balancer)
        if problem:
            print(f"[{name}] skipped: {problem}")
            results["setups"][name] = {"setup": asdict(setup), "skipped": problem}
            continue
        cfg = replace(base, key=setup.key, uuid_refs=setup.uuid_refs)
        results["setups"][name] = _run_setup(name, setup, cfg, args, book, out, kill_after)
        print(f"[{name}] {one_line(results['setups'][name]['summary'])}")
        write_json(results, out / "results.json")
    (out / "report.md").write_text(report_markdown(results))
    failed = sum(
        s["summary"]["failed"]
        for n, s in results["setups"].items()
        if "summary" in s and n != "kill"
    )
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}; {failed} failed requests")
    return 1 if failed else 0


# -- report ----------------------------------------------------------------------------------------
def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def one_line(s: dict) -> str:
    t = s["ttft_follow_ups_s"]
    return (
        f"hit rate {_pct(s['hit_rate'])}, follow-up TTFT p50 {fmt_ms(t['p50'])} ms "
        f"p90 {fmt_ms(t['p90'])} ms, per replica {[int(x) for x in s['per_replica']]}, "
        f"uploaded {s['bytes_uploaded'] / 1e6:.1f} MB, failed {s['failed']}"
    )


def report_markdown(results: dict) -> str:
    setups = {n: s for n, s in results["setups"].items() if "summary" in s and n != "kill"}
    lines = report_head("Multi-turn conversations across replicas", results)
    cfg = results["config"]
    lines += [
        "",
        f"{cfg['conversations']} conversations x {cfg['turns']} turns (1 in {cfg['video_every']} "
        f"about a video, the others a photo), {cfg['concurrency']} requests in flight, "
        f"{cfg['max_tokens']} output tokens per turn; checkpoint `{results['checkpoint']}`.",
        "Hit rate: cached / prompt tokens over all requests (usage.prompt_tokens_details). "
        "Follow-up: turns 2 and later.",
        "",
        "| setup | hit rate | hit rate, follow-ups | follow-up TTFT p50 / p90 (ms) | "
        "turn-1 TTFT p50 (ms) | requests per replica | max / mean | MB uploaded | "
        "MB per video conversation | failed | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in setups.items():
        m = s["summary"]
        f, t1, v = m["ttft_follow_ups_s"], m["ttft_first_turns_s"], m["video_conversation_bytes"]
        video_mb = f"{v['mean'] / 1e6:.2f}" if v else "-"
        lines.append(
            f"| {s['setup']['label']} (`{name}`) | {_pct(m['hit_rate'])} | "
            f"{_pct(m['hit_rate_follow_ups'])} | {fmt_ms(f['p50'])} / {fmt_ms(f['p90'])} | "
            f"{fmt_ms(t1['p50'])} | {' / '.join(str(int(x)) for x in m['per_replica'])} | "
            f"{m['max_over_mean']:.2f} | {m['bytes_uploaded'] / 1e6:.1f} | "
            f"{video_mb} | {m['failed']} | {m['wall_s']:.0f} |"
        )
    lines += ["", *checks(setups)]
    kill = results["setups"].get("kill")
    if kill and "summary" in kill:
        k = kill["summary"]["kill"]
        lines += [
            "",
            "## One of three replicas killed mid-run (HAProxy, X-Session-Id keys)",
            "",
            f"- killed `{k['killed']}` (SIGKILL) after {results.get('kill_after', '')} finished "
            f"requests; {k['requests_after_kill']} requests were sent after the kill, "
            f"{k['failed_after_kill']} of them failed ({k['failed_in_all']} failed in all: "
            "requests in flight on the killed replica); "
            f"{k.get('retried_after_kill', 0)} needed a client retry after a connection error "
            "(the OpenAI SDK's rule, see serve_multiturn.CONNECTION_RETRIES)",
            f"- conversations that started on a live replica: {k['live_conversations']}; of them "
            f"changed replica: {k['live_conversations_moved']}",
        ]
    skipped = {n: s["skipped"] for n, s in results["setups"].items() if "skipped" in s}
    lines += [f"- `{n}` not run: {why}" for n, why in skipped.items()]
    return "\n".join(lines) + "\n"


def checks(setups: dict) -> list[str]:
    """The issue's targets, where the setups they compare were run."""
    out = ["## Targets", ""]
    s = {n: v["summary"] for n, v in setups.items()}
    rr, chosen, single = s.get("round-robin"), s.get(CHOSEN), s.get("single")
    if rr and chosen:
        a, b = rr["ttft_follow_ups_s"]["p50"], chosen["ttft_follow_ups_s"]["p50"]
        out.append(f"- follow-up TTFT p50, round robin / {CHOSEN}: {a / b:.1f}x (target >= 5x)")
    if single and chosen and single["hit_rate"]:
        out.append(
            f"- cluster hit rate / single-replica hit rate: "
            f"{chosen['hit_rate'] / single['hit_rate']:.2f} (target >= 0.90)"
        )
    if chosen:
        out.append(f"- max / mean requests per replica: {chosen['max_over_mean']:.2f} (<= 1.3)")
    uuid = s.get("haproxy-uuid")
    if uuid and uuid["video_conversation_bytes"]:
        each = uuid["video_bytes_each"]["mean"]
        conv = uuid["video_conversation_bytes"]["mean"]
        out.append(
            f"- with uuid references a 4-turn video conversation uploads {conv / 1e3:.1f} KB for a "
            f"{each / 1e3:.1f} KB first turn (the video once: {conv / each:.2f}x the first turn)"
        )
    return out
