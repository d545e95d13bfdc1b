"""Engine benchmark against HF generate one request at a time, on the same prompts (not a test).

    .venv/bin/python benchmarks/bench_engine.py                  # bench checkpoint, CPU, fp32
    .venv/bin/python benchmarks/bench_engine.py --checkpoint DIR --device cuda --dtype bfloat16 \
        --out gpu.json

Prints, in one run:
  1. output tokens/s with N concurrent image chats (distinct images), plm-serve vs HF;
  2. time to first token for a repeated image with a new question versus a cold image;
  3. decode inter-token latency p50/p99 of running streams while a long image prompt prefills.
Prompts are preprocessed before timing on both sides; both generate exactly --max-tokens tokens
(ignore_eos / min_new_tokens), greedy.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from plm_core import LLM, SamplingParams  # noqa: E402

SHARED = REPO.parent / "shared" / "media"
QUESTIONS = [
    "Describe the image in detail.",
    "What colours dominate?",
    "What is in the background?",
    "Write a caption for this picture.",
    "What might happen next?",
    "Count the objects you see.",
]


def distinct_images(n: int) -> list[Image.Image]:
    """n different RGB images: the shared photos and flipped/rotated variants (or synthetic)."""
    base = []
    if SHARED.is_dir():
        for p in sorted(SHARED.iterdir()):
            if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
                base.append(Image.open(p).convert("RGB"))
    if not base:
        rng = np.random.default_rng(0)
        base = [
            Image.fromarray((rng.random((300 + 40 * i, 400, 3)) * 255).astype(np.uint8))
            for i in range(6)
        ]
    variants = [
        lambda im: im,
        ImageOps.mirror,
        ImageOps.flip,
        lambda im: im.rotate(90, expand=True),
    ]
    out = []
    for v in variants:
        for im in base:
            out.append(v(im))
            if len(out) == n:
                return out
    raise ValueError(f"cannot make {n} distinct images")


DETAIL = "high"


def chat(img: Image.Image, question: str) -> list[dict]:
    # detail "low": the 448-px thumbnail only, 256 tokens
    image = {"type": "image", "image": img, "detail": DETAIL}
    return [{"role": "user", "content": [image, {"type": "text", "text": question}]}]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# -- plm-serve -------------------------------------------------------------------------------------
def ours_throughput(llm: LLM, convs, max_tokens: int) -> dict:
    prompts = [llm.process(c) for c in convs]
    params = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)] * len(prompts)
    t0 = time.perf_counter()
    outs = llm.generate_prompts(prompts, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "prompt_tokens": sum(len(p.prompt_token_ids) for p in prompts),
        "ids": [o.token_ids for o in outs],
    }


def ours_ttft(llm: LLM, conv) -> float:
    core = llm.engine
    prompt = llm.process(conv)
    rid = f"ttft-{time.perf_counter_ns()}"
    t0 = time.perf_counter()
    core.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while core.has_unfinished():
        if any(d.request_id == rid for d in core.step()):
            break
    return time.perf_counter() - t0


def ours_itl(llm: LLM, long_conv, n_streams: int, warm_steps: int = 8) -> dict:
    """Steps the engine with n text streams decoding; adds the long image prompt; per-step ITLs."""
    core = llm.engine
    long_prompt = llm.process(long_conv)
    for i in range(n_streams):
        p = llm.process(
            [{"role": "user", "content": f"Stream {i}: tell a long story about the number {i}."}]
        )
        core.add_request(
            f"s{i}", p, SamplingParams(temperature=0, max_tokens=100_000 // 100, ignore_eos=True)
        )
    last = {}
    before, during = [], []
    step = 0
    added_at = first_at = None
    while True:
        deltas = core.step()
        now = time.perf_counter()
        for d in deltas:
            if d.request_id.startswith("s"):
                if d.request_id in last and step > 2:
                    (during if added_at is not None and first_at is None else before).append(
                        now - last[d.request_id]
                    )
                last[d.request_id] = now
            elif d.request_id == "long" and first_at is None:
                first_at = now
        step += 1
        if step == warm_steps:
            core.add_request(
                "long", long_prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
            )
            added_at = time.perf_counter()
        if first_at is not None:
            break
    for i in range(n_streams):
        core.abort(f"s{i}")
    return {
        "long_prompt_tokens": len(long_prompt.prompt_token_ids),
        "long_ttft_s": first_at - added_at,
        "decode_only_p50_ms": 1000 * pct(before, 50),
        "during_prefill_p50_ms": 1000 * pct(during, 50),
        "during_prefill_p99_ms": 1000 * pct(during, 99),
        "during_prefill_max_ms": 1000 * max(during),
        "samples": len(during),
        "p99_over_p50": pct(during, 99) / pct(during, 50),
    }


# -- HF reference ----------------------------------------------------------------------------------
def hf_prepare(path: str, convs):
    from hf_reference import hf_inputs

    vit = "vanilla" if DETAIL == "low" else "thumb+tile"  # HF's single tile = our thumbnail only
    return [hf_inputs(path, c, vision_input_type=vit) for c in convs]


@torch.inference_mode()
def hf_generate(model, inputs, n: int) -> list[int]:
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def fresh_llm(path: str, **kwargs) -> LLM:
    """An engine built after the previous one's memory is really free: on a GPU the KV cache takes
    85% of what is free, so a dead engine's tensors left in the caching allocator would shrink the
    next one's."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return LLM(path, **kwargs)


def ours_variant(args, path: str, images, convs, graphs: bool) -> dict:
    """Throughput, cached-image TTFT and ITL of one engine configuration (eager or graph decode)."""
    global DETAIL
    tag = "CUDA-graph decode" if graphs else "eager decode"
    DETAIL = args.detail
    llm = fresh_llm(
        path,
        device=args.device,
        dtype=args.dtype,
        max_num_batched_tokens=args.throughput_chunk,
        cuda_graphs=graphs,
    )
    llm.chat(chat(images[-1], "warm up"), SamplingParams(temperature=0, max_tokens=2))
    ours = ours_throughput(llm, convs, args.max_tokens)
    print(
        f"\n1. [{tag}] {args.concurrency} concurrent image chats (detail={args.detail}), "
        f"{args.max_tokens} tokens each ({ours['prompt_tokens']} prompt tokens in all; "
        f"max_num_batched_tokens={args.throughput_chunk})"
    )
    print(
        f"   plm-serve: {ours['output_tokens']} tokens in {ours['wall_s']:.1f} s "
        f"= {ours['tokens_per_s']:.2f} tok/s"
    )
    DETAIL = "high"  # TTFT and ITL runs use full-size images
    cold_img = images[args.concurrency]
    cold = ours_ttft(llm, chat(cold_img, QUESTIONS[0]))
    warm = ours_ttft(llm, chat(cold_img, QUESTIONS[1]))
    print(
        f"2. [{tag}] time to first token: cold image {cold * 1000:.0f} ms; same image, "
        f"new question {warm * 1000:.1f} ms: {cold / warm:.1f}x lower (target 20x)"
    )
    ttft = {"cold_s": cold, "repeat_s": warm, "ratio": cold / warm}
    del llm
    llm = fresh_llm(
        path,
        device=args.device,
        dtype=args.dtype,
        max_num_batched_tokens=args.chunk,
        cuda_graphs=graphs,
        max_encoder_tiles_per_step=args.encoder_tiles,
    )
    llm.chat(chat(images[-1], "warm up"), SamplingParams(temperature=0, max_tokens=2))
    itl = ours_itl(llm, chat(images[args.concurrency + 1], QUESTIONS[2]), args.itl_streams)
    print(
        f"3. [{tag}] {args.itl_streams} streams decoding while a "
        f"{itl['long_prompt_tokens']}-token image prompt prefills "
        f"(max_num_batched_tokens={args.chunk}, {args.encoder_tiles} encoder tiles per step)"
    )
    print(
        f"   ITL before it arrives p50 {itl['decode_only_p50_ms']:.1f} ms; while it prefills p50 "
        f"{itl['during_prefill_p50_ms']:.1f} ms, p99 {itl['during_prefill_p99_ms']:.1f} ms "
        f"(max {itl['during_prefill_max_ms']:.1f} ms, {itl['samples']} samples): p99/p50 = "
        f"{itl['p99_over_p50']:.2f} (target <= 3); "
        f"the long prompt's TTFT {itl['long_ttft_s']:.1f} s"
    )
    if graphs and llm.engine.runner.graphs is not None:
        g = llm.engine.runner.graphs
        itl["graph_steps"] = g.num_runs
        print(
            f"   decode steps served by graphs in this run: {g.num_runs} "
            f"({len(g.graphs)} graphs captured)"
        )
    return {
        "throughput": {k: v for k, v in ours.items() if k != "ids"},
        "ids": ours["ids"],
        "ttft": ttft,
        "itl": itl,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--checkpoint", default=None, help="checkpoint dir (default: build the bench preset)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--itl-streams", type=int, default=8)
    ap.add_argument(
        "--throughput-chunk",
        type=int,
        default=8192,
        help="max_num_batched_tokens for the throughput and TTFT runs",
    )
    ap.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens for the ITL run")
    ap.add_argument(
        "--encoder-tiles", type=int, default=4, help="max_encoder_tiles_per_step for the ITL run"
    )
    ap.add_argument(
        "--detail",
        choices=["high", "low"],
        default="high",
        help="image detail for the throughput run: high = up to 36 tiles + thumbnail, "
        "low = thumbnail",
    )
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--cuda-graphs",
        choices=["off", "on", "both"],
        default="off",
        help="decode with CUDA graphs: off, on, or both (eager first, then graphs, one HF run; the "
        "graph run's tokens are compared with the eager run's) (default: %(default)s)",
    )
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    if args.checkpoint is None:
        from support import checkpoint_path

        args.checkpoint = str(checkpoint_path("bench"))
    path = args.checkpoint
    torch.manual_seed(0)
    print(
        f"checkpoint {path}; device {args.device} {args.dtype}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    results: dict = {
        "checkpoint": path,
        "device": args.device,
        "dtype": args.dtype,
        "cuda_graphs": args.cuda_graphs,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
    }
    global DETAIL
    images = distinct_images(args.concurrency + 3)  # the last one is only for warming up
    DETAIL = args.detail
    convs = [chat(images[i], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.concurrency)]

    variants = {"off": [False], "on": [True], "both": [False, True]}[args.cuda_graphs]
    runs = {}
    for graphs in variants:
        name = "graphs" if graphs else "eager"
        try:
            runs[name] = ours_variant(args, path, images, convs, graphs)
        except Exception as e:  # a failed graph capture must not cost a GPU run's other figures
            if len(variants) == 1:
                raise
            traceback.print_exc()
            results[f"{name}_error"] = f"{type(e).__name__}: {e}"
            continue
        results[name] = {k: v for k, v in runs[name].items() if k != "ids"}
    if len(runs) == 2:
        same = sum(a == b for a, b in zip(runs["eager"]["ids"], runs["graphs"]["ids"]))
        e, g = results["eager"], results["graphs"]
        g_itl, e_itl = g["itl"]["decode_only_p50_ms"], e["itl"]["decode_only_p50_ms"]
        results["graphs_vs_eager"] = {
            "identical_requests": same,
            "throughput_ratio": g["throughput"]["tokens_per_s"] / e["throughput"]["tokens_per_s"],
            "decode_only_itl_ratio": g_itl / e_itl,
        }
        print(
            f"\nCUDA graphs vs eager: {same}/{len(convs)} requests token-identical; throughput "
            f"{results['graphs_vs_eager']['throughput_ratio']:.2f}x; decode-only ITL p50 "
            f"{g_itl:.1f} ms vs {e_itl:.1f} ms"
        )

    if not args.skip_hf:
        from transformers import PerceptionLMForConditionalGeneration

        DETAIL = args.detail
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        dtype = getattr(torch, args.dtype)
        hf = PerceptionLMForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa"
        )
        hf = hf.to(args.device).eval()
        hf_in = hf_prepare(path, convs)
        hf_generate(hf, hf_prepare(path, [chat(images[-1], "warm up")])[0], 2)
        t0 = time.perf_counter()
        hf_ids = [hf_generate(hf, x, args.max_tokens) for x in hf_in]
        wall = time.perf_counter() - t0
        tps = sum(map(len, hf_ids)) / wall
        print("\nHF generate, one request at a time on the same prompts:")
        print(f"1. {sum(map(len, hf_ids))} tokens in {wall:.1f} s = {tps:.2f} tok/s")
        results["hf"] = {"wall_s": wall, "tokens_per_s": tps}
        for name, run in runs.items():
            same = sum(a == b for a, b in zip(hf_ids, run["ids"]))
            speedup = run["throughput"]["tokens_per_s"] / tps
            print(
                f"   plm-serve ({name}) speedup {speedup:.2f}x (target >= 6x); "
                f"{same}/{len(hf_ids)} requests token-identical to HF"
            )
            results[name]["throughput"].update(speedup=speedup, identical_to_hf=same)
        DETAIL = "high"
        x = hf_prepare(path, [chat(images[args.concurrency], QUESTIONS[1])])[0]
        t0 = time.perf_counter()
        hf_generate(hf, x, 1)
        hf_ttft = time.perf_counter() - t0
        print(f"2. HF generate TTFT for the repeated image: {hf_ttft * 1000:.0f} ms (no caching)")
        results["hf"]["ttft_repeat_s"] = hf_ttft
        x = hf_prepare(path, [chat(images[args.concurrency + 1], QUESTIONS[2])])[0]
        t0 = time.perf_counter()
        hf_generate(hf, x, 1)
        t1 = time.perf_counter()
        hf_generate(hf, x, 33)
        t2 = time.perf_counter()
        per_token = ((t2 - t1) - (t1 - t0)) / 32
        print(
            f"3. HF one at a time: a stream waits the whole {t1 - t0:.2f} s prefill of the other "
            f"request; its own decode step is {per_token * 1000:.1f} ms"
        )
        results["hf"].update(prefill_s=t1 - t0, decode_step_ms=per_token * 1000)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
