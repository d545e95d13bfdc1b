"""Where a decode step's time goes with 16 streams: the model, and everything around it.

Run: python benchmarks/bench_step_overhead.py [--checkpoint DIR] [--streams 16] [--steps 40]
     [--out FILE.json]

The workload is the `burst` scenario's: photo chats (4 photos x 4 questions by default) prefilled,
then every stream decoding. Once all decode, `--steps` engine steps are timed, greedy and sampled
(temperature 0.8, top_p 0.95: an ordinary chat client's settings), each step split into

  schedule  Scheduler.schedule (admission, block tables, the step budget)
  inputs    the step's token ids, positions, media rows and attention metadata
  model     the forward: the language model and the LM head (the logits)
  sample    BatchSampler: processors, top-k/top-p, the draws
  other     the rest of EngineCore.step: appending tokens, detokenizing, stop checks, stats

"outside the model" is everything but `model`. Then the sampler alone, on 16 rows of the
checkpoint's vocabulary shaped two ways: `flat` rows (what a random-weight checkpoint gives: top-p
keeps most of the vocabulary) and `peaked` rows (a trained model's usual shape: top-p 0.95 keeps
tens to hundreds of tokens). Streaming to HTTP clients is not in a step: it runs on the server's
event loop, and the serving scenarios (serve_bench.py) include it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_photos import PhotoBook, TileBudget  # noqa: E402

from plm_core import LLM, SamplingParams  # noqa: E402
from plm_core.engine import model_runner as runner_module  # noqa: E402
from plm_core.engine.sampler import BatchSampler, SamplingState  # noqa: E402

QUESTIONS = ["Describe this photo.", "What colours dominate?", "What shapes?", "Write a caption."]
MODES = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=0.8, top_p=0.95),
}
PHASES = ("schedule", "inputs", "model", "sample", "other")


class PhaseClock:
    """Wraps the engine's parts with timers; `spent` holds seconds per phase since `reset`."""

    def __init__(self, llm: LLM):
        self.spent: dict[str, float] = defaultdict(float)
        core = llm.engine
        runner = core.runner
        self._wrap(core.scheduler, "schedule", "schedule")
        self._wrap(runner, "_inputs", "inputs")
        self._wrap(runner.model, "forward", "model")
        build = runner_module.build_metadata
        runner_module.build_metadata = self._timed(build, "inputs")  # type: ignore[assignment]
        sampler = runner.sampler
        runner.sampler = self._timed(sampler, "sample")  # type: ignore[assignment]
        self._wrap(core, "step", "step")

    def _timed(self, fn, phase: str):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[phase] += time.perf_counter() - t0

        return timed

    def _wrap(self, obj, name: str, phase: str) -> None:
        setattr(obj, name, self._timed(getattr(obj, name), phase))

    def reset(self) -> None:
        self.spent.clear()

    def split(self, steps: int) -> dict[str, float]:
        """Milliseconds per step, by phase, with the step's total and the share outside the
        model."""
        total = self.spent["step"]
        parts = {p: self.spent[p] for p in PHASES if p != "other"}
        parts["other"] = total - sum(parts.values())
        out = {p: 1000 * v / steps for p, v in parts.items()}
        out["step"] = 1000 * total / steps
        out["outside_model_share"] = 1 - parts["model"] / total
        return out


def decode_split(llm: LLM, clock: PhaseClock, args, mode: str, tag: str) -> dict:
    """Prefills the streams, then times --steps steps in which every stream decodes."""
    core = llm.engine
    book = PhotoBook(TileBudget.of_checkpoint(args.checkpoint), seed=hash(tag) & 0xFFFF)
    photos = [book.get(tag, i) for i in range(max(1, args.streams // len(QUESTIONS)))]
    chats = [
        [{"role": "user", "content": [p.part(), {"type": "text", "text": q}]}]
        for q in QUESTIONS
        for p in photos
    ][: args.streams]
    params = dict(MODES[mode], max_tokens=args.steps + 64, ignore_eos=True)
    for i, chat in enumerate(chats):
        core.add_request(f"{tag}-{i}", llm.process(chat), SamplingParams(seed=i, **params))
    while not all(r.num_tokens - r.num_computed_tokens == 1 for r in core.scheduler.running) or (
        len(core.scheduler.running) < len(chats)
    ):
        core.step()
    for _ in range(3):  # warm
        core.step()
    clock.reset()
    for _ in range(args.steps):
        core.step()
    split = clock.split(args.steps)
    for i in range(len(chats)):
        core.abort(f"{tag}-{i}")
    while core.has_unfinished():
        core.step()
    return split


def sampler_alone(vocab: int, rows: int, runs: int = 10) -> dict:
    """The sampler's milliseconds for one step of `rows` sampled rows, flat and peaked."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "flat": torch.randn(rows, vocab, generator=g),
        # a handful of likely tokens, a few hundred plausible ones, a long unlikely tail
        "peaked": torch.cat(
            [
                torch.randn(rows, 8, generator=g) + 12,
                torch.randn(rows, 300, generator=g) + 6,
                torch.randn(rows, vocab - 308, generator=g),
            ],
            dim=1,
        )[:, torch.randperm(vocab, generator=g)],
    }
    sampler, out = BatchSampler(), {}
    for name, logits in shapes.items():
        for mode, params in MODES.items():
            states = [
                SamplingState.create(SamplingParams(seed=i, **params), [], [], ())
                for i in range(rows)
            ]
            sampler(logits, states)
            t0 = time.perf_counter()
            for _ in range(runs):
                sampler(logits, states)
            out[f"{name} {mode}"] = 1000 * (time.perf_counter() - t0) / runs
    return out


def main() -> int:
    from plm_core.demo import demo_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the `tiny` demo checkpoint")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None, help="also write the figures here as JSON")
    args = ap.parse_args()
    args.checkpoint = args.checkpoint or str(demo_checkpoint("tiny"))
    llm = LLM(args.checkpoint)  # default engine flags
    clock = PhaseClock(llm)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result: dict = {
        "checkpoint": args.checkpoint,
        "streams": args.streams,
        "steps": args.steps,
        "commit": commit,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "decode_ms": {},
    }
    print(
        f"{args.checkpoint}: {args.streams} streams decoding, {args.steps} steps (commit {commit})"
    )
    for mode in MODES:
        split = decode_split(llm, clock, args, mode, mode)
        result["decode_ms"][mode] = split
        parts = ", ".join(f"{p} {split[p]:.2f}" for p in PHASES)
        print(
            f"  {mode:8s} step {split['step']:.2f} ms = {parts}; "
            f"outside the model {100 * split['outside_model_share']:.0f}%"
        )
    vocab = llm.model_config.text.vocab_size
    result["sampler_alone_ms"] = sampler_alone(vocab, args.streams)
    print(f"  the sampler alone, {args.streams} rows x {vocab} tokens (ms a step):")
    for name, ms in result["sampler_alone_ms"].items():
        print(f"    {name:16s} {ms:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
