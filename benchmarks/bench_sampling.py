"""Sampled decoding throughput, unconstrained and under a structured-output constraint.

Run: python benchmarks/bench_sampling.py [--checkpoint DIR] [--streams 16] [--max-tokens 64]
     [--runs 2]

(a) the sampler's draw alone: one step of `--streams` rows over the checkpoint's vocabulary;
(b) `--streams` chats decoding `--max-tokens` sampled tokens each, in one batch, with no constraint
    and with a JSON schema that cannot end early (an array of at least 40 lowercase strings), so
    both runs produce the same number of tokens. Each run is timed on its own; nothing is averaged
    away.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plm_core import LLM, SamplingParams, StructuredOutput  # noqa: E402
from plm_core.engine.sampler import _draw  # noqa: E402

LONG_SCHEMA = {"type": "array", "items": {"type": "string", "pattern": "^[a-z ]+$"}, "minItems": 40}


def bench_draw(vocab: int, rows: int, runs: int = 10) -> float:
    probs = torch.softmax(
        torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    _draw(probs, generators)
    t = time.perf_counter()
    for _ in range(runs):
        _draw(probs, generators)
    return (time.perf_counter() - t) / runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="a checkpoint directory (default: the bench preset, built into .cache/ on first use)",
    )
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    path = args.checkpoint
    if path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from support import checkpoint_path

        path = str(checkpoint_path("bench"))
    llm = LLM(path, device="cpu", dtype="float32")
    vocab = llm.model_config.text.vocab_size
    threads = torch.get_num_threads()
    print(f"checkpoint {path}; vocabulary {vocab}; torch {torch.__version__}, {threads} threads")
    draw_ms = bench_draw(vocab, args.streams) * 1e3
    print(f"(a) draw of {args.streams} rows: {draw_ms:.1f} ms per step")

    convs = [
        [{"role": "user", "content": f"Request {i}: describe the number {i}."}]
        for i in range(args.streams)
    ]
    spec = StructuredOutput(json=json.dumps(LONG_SCHEMA))
    cases = {
        "unconstrained": SamplingParams(
            temperature=1.0, seed=0, max_tokens=args.max_tokens, ignore_eos=True
        ),
        "json_schema": SamplingParams(
            temperature=1.0,
            seed=0,
            max_tokens=args.max_tokens,
            ignore_eos=True,
            structured_output=spec,
        ),
    }
    llm.chat(convs[:2], cases["json_schema"])  # warm-up; builds the grammar tables once
    print(f"(b) {args.streams} streams x {args.max_tokens} sampled tokens")
    for run in range(args.runs):
        for name, params in cases.items():
            t = time.perf_counter()
            outs = llm.chat(convs, params)
            dt = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            print(f"    run {run + 1} {name:14s} {n} tokens in {dt:.2f} s = {n / dt:.1f} tok/s")


if __name__ == "__main__":
    main()
