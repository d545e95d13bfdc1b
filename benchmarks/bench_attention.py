"""CPU cost of the decode part of a step: batched padded SDPA vs a per-sequence SDPA loop.

Run: python benchmarks/bench_attention.py [--runs N] [--shapes bench,1b] [--budget SECONDS]

plm_core.model.attention attends decode-only sequences (query_len 1) either
  (a) batch_decodes=True:  gathered into one [B, max_ctx] padded batch, one masked SDPA call, or
  (b) batch_decodes=False: one by one, like prefill chunks (one unmasked SDPA call per sequence).
For each attention shape (the `bench` checkpoint's 8 heads / 2 kv heads / head_dim 32, 4 layers;
PLM-1B's 32 / 8 / 64, 16 layers), decode batch sizes 1, 4, 16, 32 and context lengths 512, 2048,
9600 (all equal), `mixed` (uniform random in [256, 9600]) and `skew` (one 9600, the others 512),
fp32, block_size 16, shuffled block tables over a shared cache, it times:
  meta   build_metadata for the step (once a step, shared by all layers),
  attn   one layer's paged_attention (KV write + gather + SDPA),
  step   meta + layers * attn: the attention part of one whole forward step.
Then one step that mixes a 512-token prefill chunk (after 1536 cached tokens) with 16 decodes.
Times are medians of --runs runs after one warm-up run, (a) and (b) interleaved; fewer runs (at
least 3) for the slowest cases, see --budget. On a machine shared with other work, expect noise:
the load average is printed before and after. Memory: PLM-1B's B=32 x 9600 rows allocate ~6 GiB of
temporaries per call under (a) (the gathered, GQA-expanded K and V).

Both paths copy K/V twice per layer (index_select gather, then the GQA expand); under glibc's
malloc, blocks over its mmap threshold (at most 32 MiB) are fresh pages on every call, and page
faults, not SDPA, make most of (a)'s extra cost. To see the allocator's share, rerun with e.g.
MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=100000000000 (the settings are printed).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plm_core.model.attention import build_metadata, paged_attention  # noqa: E402

BLOCK_SIZE = 16
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    layers: int


SHAPES = {
    "bench": Shape("bench", 8, 2, 32, 4),
    "1b": Shape("1b", 32, 8, 64, 16),
}
BATCHES = (1, 4, 16, 32)
MAX_CTX = 9600


def median_times(fns: dict, runs: int, budget_s: float) -> dict:
    """Median seconds of each fn, runs interleaved (a, b, a, b, ...) so that load on the machine
    hits all alike. One warm-up call each first, unless that call alone took over a second (it then
    counts as a run); stops after 3 rounds once budget_s has passed."""
    times: dict = {name: [] for name in fns}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        first = time.perf_counter() - t
        if first > 1.0:
            times[name].append(first)
    start = time.perf_counter()
    for r in range(runs):
        if r >= 3 and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            if len(times[name]) < r + 1:  # a counted warm-up puts a fn one round ahead
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


class Cache:
    """One layer's paged KV cache, room for 32 sequences of 9600 tokens plus a prefill; random."""

    def __init__(self, shape: Shape, seed: int = 0):
        self.shape = shape
        self.num_blocks = 32 * (MAX_CTX // BLOCK_SIZE + 1) + 256
        gen = torch.Generator().manual_seed(seed)
        slots = self.num_blocks * BLOCK_SIZE
        self.k = torch.randn(slots, shape.kv_heads, shape.head_dim, generator=gen)
        self.v = torch.randn(slots, shape.kv_heads, shape.head_dim, generator=gen)
        self.rng = random.Random(seed)

    def tables(self, contexts: list[int]) -> list[list[int]]:
        """Shuffled block tables: blocks drawn at random from the whole cache, dealt round-robin."""
        needed = [-(-c // BLOCK_SIZE) for c in contexts]
        ids = self.rng.sample(range(self.num_blocks), sum(needed))
        tables: list[list[int]] = [[] for _ in contexts]
        while any(len(t) < m for t, m in zip(tables, needed)):
            for t, m in zip(tables, needed):
                if len(t) < m:
                    t.append(ids.pop())
        return tables


@dataclass
class Result:
    meta_ms: float
    attn_ms: float
    layers: int

    @property
    def step_ms(self) -> float:
        return self.meta_ms + self.layers * self.attn_ms


def time_step(
    cache: Cache, starts: list[int], query_lens: list[int], runs: int, budget_s: float
) -> tuple[Result, Result]:
    """(a) batch_decodes=True and (b) batch_decodes=False for one step, same tables and inputs."""
    s = cache.shape
    tables = cache.tables([a + n for a, n in zip(starts, query_lens)])
    total = sum(query_lens)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(total, s.heads, s.head_dim, generator=gen)
    k = torch.randn(total, s.kv_heads, s.head_dim, generator=gen)
    v = torch.randn(total, s.kv_heads, s.head_dim, generator=gen)

    def meta(batch_decodes: bool):
        return lambda: build_metadata(
            tables, starts, query_lens, BLOCK_SIZE, CPU, batch_decodes=batch_decodes
        )

    metas = {"a": meta(True)(), "b": meta(False)()}

    def attn(name: str):
        return lambda: paged_attention(q, k, v, cache.k, cache.v, metas[name])

    with torch.inference_mode():
        meta_s = median_times({"a": meta(True), "b": meta(False)}, runs, budget_s / 4)
        attn_s = median_times({"a": attn("a"), "b": attn("b")}, runs, budget_s)
    return tuple(Result(meta_s[n] * 1e3, attn_s[n] * 1e3, s.layers) for n in ("a", "b"))


def decode_cases(batch: int, rng: random.Random) -> list[tuple[str, list[int]]]:
    cases = [(str(c), [c] * batch) for c in (512, 2048, MAX_CTX)]
    if batch > 1:
        cases.append(("mixed", [rng.randint(256, MAX_CTX) for _ in range(batch)]))
        cases.append(("skew", [MAX_CTX] + [512] * (batch - 1)))
    return cases


def padding_ratio(contexts: list[int]) -> float:
    """Tokens the padded batch gathers and attends over, relative to the tokens really attended."""
    return len(contexts) * max(contexts) / sum(contexts)


def load_note() -> str:
    """Other runnable tasks right now (from /proc/loadavg) and the 1-minute load average."""
    try:
        # runnable tasks, less this process
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        running = -1
    others = running if running >= 0 else "?"
    note = f"load average {os.getloadavg()[0]:.2f}, other runnable tasks now: {others}"
    return note + ("  ** the machine is busy: timings will be noisy **" if running > 0 else "")


def winner(ratio: float) -> str:
    return "~" if 0.95 <= ratio <= 1.05 else ("a" if ratio > 1 else "b")


def fmt(x: float) -> str:
    return f"{x:8.2f}" if x < 1000 else f"{x:8.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=7, help="timed runs per measurement (median reported)"
    )
    parser.add_argument(
        "--shapes", default="bench,1b", help="comma-separated: " + ", ".join(SHAPES)
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=1.5,
        help="seconds of timed runs per measurement before stopping early (min 3 runs)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{os.cpu_count()} CPUs; " + load_note())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
        f"block_size {BLOCK_SIZE}; times in ms, medians of up to {args.runs} runs"
    )
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if malloc_env:
        print("allocator settings:", " ".join(f"{k}={v}" for k, v in sorted(malloc_env.items())))
    print(
        "(a) batch_decodes=True: one padded, masked SDPA   "
        "(b) batch_decodes=False: one SDPA per sequence"
    )
    print("attn = one layer; step = meta + layers * attn; pad = padded tokens / real tokens\n")

    header = (
        f"{'shape':6s} {'B':>3s} {'ctx':>6s} {'pad':>5s} | "
        f"{'meta a':>8s} {'attn a':>8s} {'step a':>8s} | "
        f"{'meta b':>8s} {'attn b':>8s} {'step b':>8s} | {'winner':>6s} {'b/a':>5s}"
    )
    rows: list[dict] = []
    t_start = time.perf_counter()
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        cache = Cache(shape)
        print(
            f"== {shape.name}: {shape.heads} heads, {shape.kv_heads} kv heads, "
            f"head_dim {shape.head_dim}, {shape.layers} layers"
        )
        print(header)
        rng = random.Random(42)
        for batch in BATCHES:
            for label, contexts in decode_cases(batch, rng):
                starts, lens = [c - 1 for c in contexts], [1] * batch
                a, b = time_step(cache, starts, lens, args.runs, args.budget)
                ratio = b.step_ms / a.step_ms
                row = dict(
                    shape=shape.name,
                    batch=batch,
                    label=label,
                    pad=padding_ratio(contexts),
                    a=a,
                    b=b,
                    ratio=ratio,
                )
                rows.append(row)
                print(
                    f"{shape.name:6s} {batch:3d} {label:>6s} {row['pad']:5.2f} | "
                    f"{fmt(a.meta_ms)} {fmt(a.attn_ms)} {fmt(a.step_ms)} | "
                    f"{fmt(b.meta_ms)} {fmt(b.attn_ms)} {fmt(b.step_ms)} | "
                    f"{winner(ratio):>6s} {ratio:5.2f}",
                    flush=True,
                )
        print()

    print("== one step: a 512-token prefill chunk (positions 1536..2047) + 16 decodes")
    print(
        f"{'shape':6s} {'decodes':>8s} | {'meta a':>8s} {'attn a':>8s} {'step a':>8s} | "
        f"{'meta b':>8s} {'attn b':>8s} {'step b':>8s} | {'winner':>6s} {'b/a':>5s}"
    )
    mixed_rows = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        cache = Cache(shape)
        rng = random.Random(7)
        for label, contexts in (
            ("2048", [2048] * 16),
            ("mixed", [rng.randint(256, MAX_CTX) for _ in range(16)]),
        ):
            starts, lens = [1536] + [c - 1 for c in contexts], [512] + [1] * 16
            a, b = time_step(cache, starts, lens, args.runs, args.budget)
            ratio = b.step_ms / a.step_ms
            mixed_rows.append(dict(shape=shape.name, label=label, a=a, b=b, ratio=ratio))
            print(
                f"{shape.name:6s} {label:>8s} | "
                f"{fmt(a.meta_ms)} {fmt(a.attn_ms)} {fmt(a.step_ms)} | "
                f"{fmt(b.meta_ms)} {fmt(b.attn_ms)} {fmt(b.step_ms)} | "
                f"{winner(ratio):>6s} {ratio:5.2f}",
                flush=True,
            )
        del cache

    summarize(rows, mixed_rows)
    print(f"\n(total {time.perf_counter() - t_start:.0f} s; {load_note()})")


def summarize(rows: list[dict], mixed_rows: list[dict]) -> None:
    print(
        "\n== summary (b/a > 1: the batched padded call (a) is faster; "
        "< 1: the per-sequence loop (b) is; winner ~: within 5%)"
    )
    groups = {
        "B=1": [r for r in rows if r["batch"] == 1],
        "B>1, equal contexts": [
            r for r in rows if r["batch"] > 1 and r["label"] not in ("mixed", "skew")
        ],
        "B>1, mixed contexts": [r for r in rows if r["label"] == "mixed"],
        "B>1, skewed contexts": [r for r in rows if r["label"] == "skew"],
    }
    for name, group in groups.items():
        if not group:
            continue
        wins = sum(r["ratio"] > 1 for r in group)
        ratios = [r["ratio"] for r in group]
        print(
            f"  {name:22s}: a wins {wins}/{len(group)}; b/a min {min(ratios):.2f}, "
            f"median {statistics.median(ratios):.2f}, max {max(ratios):.2f}"
        )
    for r in mixed_rows:
        print(f"  prefill + 16 decodes ({r['shape']}, {r['label']}): b/a {r['ratio']:.2f}")

    # What choosing per step could buy: the oracle takes the faster of the two in every row; the
    # rules are the simple hybrids "batch the decodes when their contexts are similar in length,
    # else loop".
    a_total = sum(r["a"].step_ms for r in rows)
    b_total = sum(r["b"].step_ms for r in rows)
    oracle = sum(min(r["a"].step_ms, r["b"].step_ms) for r in rows)

    def vs(x: float) -> str:
        return f"{x:.0f} ms = {x / a_total:.2f} x always-a, {x / b_total:.2f} x always-b"

    print("  sum of step times over all decode rows:")
    print(f"    always a                      {a_total:.0f} ms")
    print(f"    always b                      {b_total:.0f} ms")
    print(f"    best of both in every row     {vs(oracle)}")
    rules = {}
    for threshold in (1.1, 1.5, 2.0):
        rules[threshold] = sum((r["a"] if r["pad"] <= threshold else r["b"]).step_ms for r in rows)
        print(f"    hybrid: a if pad <= {threshold:<4} else b {vs(rules[threshold])}")

    print("\nrecommendation:")
    best_rule = min(rules.values())
    if b_total < a_total:
        worst = min(rows, key=lambda r: r["ratio"])
        a_wins = sum(r["ratio"] > 1.05 for r in rows)
        print(
            f"  batch_decodes=False (b): its steps sum to {b_total / a_total:.2f} x (a)'s; "
            f"(a) wins {a_wins}/{len(rows)} decode rows by more than 5%, and loses up to "
            f"{1 / worst['ratio']:.0f}x ({worst['shape']} B={worst['batch']} ctx={worst['label']})."
        )
    else:
        print(f"  batch_decodes=True (a): (b)'s steps sum to {b_total / a_total:.2f} x (a)'s.")
    default_total = min(a_total, b_total)
    if best_rule >= default_total * 0.95:
        print(
            "  A hybrid on context-length similarity is not worth it: the best rule above sums to "
            f"{best_rule / default_total:.2f} x the better fixed setting "
            f"(the oracle: {oracle / default_total:.2f} x)."
        )
    else:
        saved, oracle_saved = 1 - best_rule / default_total, 1 - oracle / default_total
        print(
            f"  A hybrid on context-length similarity saves {100 * saved:.0f}% over the "
            f"better fixed setting (the oracle: {100 * oracle_saved:.0f}%): worth considering."
        )


if __name__ == "__main__":
    main()
