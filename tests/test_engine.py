"""Engine fidelity: greedy tokens under batching equal running alone and HF generate, whatever else
runs.

Requests (text, images with different tile counts, video) arrive at different steps into an engine
with a small token budget (chunked prefill), a small KV cache (preemption), prefix-cache and
encoder-cache hits, and aborts; afterwards every KV block must be free again.
"""

from __future__ import annotations

import asyncio

import pytest
from hf_reference import hf_generate
from media_sets import image_names, media_path, video_names
from support import checkpoint_path

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def path():
    return str(checkpoint_path("tiny"))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-media")


@pytest.fixture(scope="module")
def solo(path):
    """A roomy engine that runs one request at a time: the 'alone' reference."""
    from plm_core import LLM

    return LLM(path, device="cpu", dtype="float32")


def _conversations(media_dir):
    imgs = [str(media_path(n, media_dir)) for n in image_names()]
    video = str(media_path(video_names()[0], media_dir))
    return [
        [{"role": "user", "content": "Tell me a story about a lighthouse."}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": imgs[0]},
                    {"type": "text", "text": "Describe it."},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": imgs[-1]},
                    {"type": "image", "image": imgs[1]},
                    {"type": "text", "text": "Compare them."},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": video, "num_frames": 8}},
                    {"type": "text", "text": "What happens?"},
                ],
            }
        ],
        # the same image as request 1 with a new question: prefix-cache and encoder-cache hits
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": imgs[0]},
                    {"type": "text", "text": "What colour?"},
                ],
            }
        ],
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "image", "image": imgs[2]}, {"type": "text", "text": "Hi"}],
            },
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "And now?"},
        ],
    ]


def _tight_llm(path, **options):
    """An engine whose limits make batching hard: a 64-token step budget chunks every image
    prompt, 5 encoder tiles per step spread each image over several steps, and a small KV cache
    forces preemptions."""
    from plm_core import LLM

    return LLM(
        path,
        device="cpu",
        dtype="float32",
        max_num_batched_tokens=64,
        max_model_len=560,
        kv_cache_memory_gb=36 * 16 * 512 / 2**30,
        max_num_seqs=8,
        max_encoder_tiles_per_step=5,
        **options,
    )


def _greedy(max_tokens=MAX_TOKENS):
    from plm_core import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _alone(solo, conversations):
    return [solo.chat(conv, _greedy())[0].token_ids for conv in conversations]


def _run_staggered(llm, prompts, arrivals, abort_at=None):
    """Adds prompt i at step arrivals[i]; optionally aborts ('x', step) requests; returns tokens by
    index."""
    core = llm.engine
    tokens = {i: [] for i in range(len(prompts))}
    step = 0
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    while pending or core.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            core.add_request(f"r{i}", prompts[i], _greedy())
        if abort_at and step in abort_at:
            core.abort(abort_at[step])
        for delta in core.step():
            tokens[int(delta.request_id[1:])].extend(delta.new_token_ids)
        step += 1
        assert step < 10_000
    return tokens


def test_staggered_batch_equals_alone_and_hf(path, solo, media_dir):
    convs = _conversations(media_dir)
    expected = _alone(solo, convs)
    llm = _tight_llm(path)
    prompts = [llm.process(c) for c in convs]
    got = _run_staggered(llm, prompts, arrivals=[0, 0, 3, 5, 9, 12])
    for i, exp in enumerate(expected):
        assert got[i] == exp, f"request {i} differs under batching"
    core = llm.engine
    assert core.stats.prefix_cache["hits"] > 0
    assert core.stats.encoder_cache["hits"] > 0
    blocks = core.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    blocks.check_invariants()
    core.scheduler.encoder_cache.check_invariants()
    # and the reference itself equals HF generate (text, one image, multi-turn; video is in
    # test_parity)
    for i in (0, 1, 5):
        hf_msgs = [dict(m) for m in convs[i]]
        for m in hf_msgs:
            if isinstance(m["content"], str) and m["role"] != "system":
                m["content"] = [{"type": "text", "text": m["content"]}]
        _, hf_out = hf_generate(path, hf_msgs, MAX_TOKENS)
        assert hf_out == expected[i][: len(hf_out)]


def test_padded_decode_graph_path_keeps_tokens(path, solo, media_dir):
    """The CUDA-graph decode path (run eagerly on CPU: same buckets, static buffers, padded rows and
    scratch slot, only no capture) gives the same tokens under batching, preemption and caching."""
    convs = _conversations(media_dir)
    expected = _alone(solo, convs)
    llm = _tight_llm(path, cuda_graphs=True)
    graphs = llm.engine.runner.graphs
    assert (
        graphs is not None
        and graphs.batch_sizes == [1, 2, 4, 8]
        and graphs.context_sizes == [256, 512, 560]
    )
    got = _run_staggered(llm, [llm.process(c) for c in convs], arrivals=[0, 0, 3, 5, 9, 12])
    for i, exp in enumerate(expected):
        assert got[i] == exp, f"request {i} differs on the decode-graph path"
    assert graphs.num_runs > 10
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    # long decode-only stretches with 3 and then 5 streams (padded to 4 and 8) while block 0 is in
    # use
    from plm_core import SamplingParams

    texts = [[{"role": "user", "content": f"Stream {i}: " + "tell me more " * i}] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [solo.chat(c, params)[0].token_ids for c in texts]
    core, runs = llm.engine, graphs.num_runs
    for i, conv in enumerate(texts[:3]):
        core.add_request(f"t{i}", llm.process(conv), params)
    tokens = {i: [] for i in range(5)}
    step = 0
    while core.has_unfinished():
        if step == 8:
            for i in (3, 4):
                core.add_request(f"t{i}", llm.process(texts[i]), params)
        for delta in core.step():
            tokens[int(delta.request_id[1:])].extend(delta.new_token_ids)
        step += 1
    assert [tokens[i] for i in range(5)] == expected
    assert graphs.num_runs - runs > 20


def test_decode_graph_buckets():
    from plm_core.model.decode_graphs import batch_buckets, context_buckets

    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert context_buckets(11520) == [256, 512, 1024, 2048, 4096, 8192, 11520]
    assert context_buckets(256) == [256]


def test_preemption_keeps_outputs(path, solo):
    """All prompts fit the KV cache, their growth does not: requests are preempted and
    recomputed."""
    from plm_core import LLM, SamplingParams

    convs = [
        [{"role": "user", "content": f"Request {i}: write about the number {i} at length."}]
        for i in range(4)
    ]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [solo.chat(c, params)[0].token_ids for c in convs]
    llm = LLM(
        path,
        device="cpu",
        dtype="float32",
        max_model_len=400,
        kv_cache_memory_gb=26 * 16 * 512 / 2**30,
    )
    outs = llm.chat(convs, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


def test_aborts_free_everything(path, media_dir):
    from plm_core import LLM

    convs = _conversations(media_dir)
    llm = LLM(
        path,
        device="cpu",
        dtype="float32",
        max_num_batched_tokens=48,
        max_model_len=1024,
        kv_cache_memory_gb=120 * 16 * 512 / 2**30,
    )
    prompts = [llm.process(c) for c in convs]
    _run_staggered(
        llm, prompts, arrivals=[0, 0, 1, 2, 4, 4], abort_at={2: "r1", 6: "r3", 7: "r0", 9: "r9"}
    )
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    blocks.check_invariants()
    assert not llm.engine.scheduler.requests


def test_prefix_cache_hit_skips_prompt_and_encoder(path, media_dir):
    from plm_core import LLM

    img = str(media_path(image_names()[0], media_dir))
    llm = LLM(path, device="cpu", dtype="float32")
    first = llm.chat(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": img}, {"type": "text", "text": "A?"}],
            }
        ],
        _greedy(),
    )[0]
    encoded_before = llm.engine.stats.encoder_cache["misses"]
    second = llm.chat(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": img}, {"type": "text", "text": "B?"}],
            }
        ],
        _greedy(),
    )[0]
    image_end = max(i for i, t in enumerate(second.prompt_token_ids) if t == 128002) + 1
    # everything up to the image's last full block
    assert second.num_cached_tokens >= image_end - 16
    assert llm.engine.stats.encoder_cache["misses"] == encoded_before  # not encoded again
    assert first.num_cached_tokens == 0


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("max_tokens", [6, 1])
def test_n_choices_fork_one_prefill(path, prefix_caching, max_tokens):
    """Choices 1..n-1 fork choice 0's prompt KV (with or without prefix caching): each computes
    only the last prompt token, and each equals a request of its own with seed + index."""
    from plm_core import LLM, SamplingParams

    llm = LLM(path, device="cpu", dtype="float32", enable_prefix_caching=prefix_caching)
    conv = [{"role": "user", "content": "Name three colours."}]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=max_tokens)
    out = llm.chat(conv, params)[0]
    assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    n_prompt = len(out.prompt_token_ids)
    assert llm.engine.stats.prefix_cache["hits"] == 2 * (n_prompt - 1)
    assert llm.engine.stats.prompt_tokens == n_prompt  # a prompt counts once
    assert out.num_cached_tokens == n_prompt - 1  # the forked choices' figure
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    alone = [
        llm.chat(conv, SamplingParams(temperature=1.0, seed=7 + i, max_tokens=max_tokens))[
            0
        ].token_ids
        for i in range(3)
    ]
    assert [c.token_ids for c in out.outputs] == alone


def test_stop_conditions(path):
    from plm_core import LLM, SamplingParams

    llm = LLM(path, device="cpu", dtype="float32")
    conv = [{"role": "user", "content": "Go."}]
    free = llm.chat(conv, _greedy(8))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stop_tok = free.token_ids[3]
    out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == free.token_ids[:4] and out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_tok
    word = free.text.split()[2]
    out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=8, stop=[word]))[0]
    assert out.finish_reason == "stop" and word not in out.text and free.text.startswith(out.text)


def test_async_engine_streams_and_abort(path):
    from plm_core import LLM
    from plm_core.engine.async_engine import AsyncEngine

    llm = LLM(path, device="cpu", dtype="float32")
    engine = AsyncEngine(llm.runtime)
    prompt = llm.process([{"role": "user", "content": "Count slowly."}])

    async def main():
        async def collect(rid, n):
            toks = []
            async for d in engine.generate(rid, prompt, _greedy(n)):
                toks.extend(d.new_token_ids)
            return toks

        a, b = await asyncio.gather(collect("a", 6), collect("b", 6))
        assert a == b and len(a) == 6
        # abort by leaving the stream early
        gen = engine.generate("c", prompt, _greedy(500))
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not llm.engine.has_unfinished():
                break
        blocks = llm.engine.scheduler.blocks
        assert blocks.num_free_blocks == blocks.num_blocks

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_async_engine_failure_reaches_streams(path, monkeypatch):
    from plm_core import LLM
    from plm_core.engine.async_engine import AsyncEngine, EngineDeadError

    llm = LLM(path, device="cpu", dtype="float32")
    engine = AsyncEngine(llm.runtime)
    prompt = llm.process([{"role": "user", "content": "Hi."}])

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(llm.engine.runner, "execute", boom)

    async def main():
        with pytest.raises(EngineDeadError, match="injected failure"):
            async for _ in engine.generate("x", prompt, _greedy(5)):
                pass
        assert engine.dead is not None

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_logprobs_through_the_engine(path):
    import math

    from plm_core import LLM, SamplingParams

    llm = LLM(path, device="cpu", dtype="float32")
    out = llm.chat(
        [{"role": "user", "content": "Hello there."}],
        SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
    )[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 5
    for tok, lp in zip(out.token_ids, lps):
        assert lp.token_id == tok and lp.rank == 1  # greedy picks the most likely token
        assert len(lp.top) == 3 and lp.top[0][0] == tok and math.isclose(lp.top[0][1], lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0


def test_seeded_sampling_same_alone_and_batched(path, solo, media_dir):
    from plm_core import SamplingParams

    img = str(media_path(image_names()[1], media_dir))
    conv = [
        {
            "role": "user",
            "content": [{"type": "image", "image": img}, {"type": "text", "text": "Guess."}],
        }
    ]
    p = SamplingParams(
        temperature=0.8,
        top_p=0.95,
        top_k=100,
        min_p=0.01,
        presence_penalty=0.5,
        repetition_penalty=1.1,
        seed=42,
        max_tokens=12,
        ignore_eos=True,
    )
    alone = solo.chat(conv, p)[0].token_ids
    others = [[{"role": "user", "content": f"Other request {i}."}] for i in range(3)]
    batch = solo.chat(
        others[:2] + [conv] + others[2:],
        [SamplingParams(temperature=1.0, seed=i, max_tokens=20) for i in range(2)]
        + [p]
        + [SamplingParams(temperature=0, max_tokens=5)],
    )
    assert batch[2].token_ids == alone


def test_gpu_kv_budget_counts_weights_activations_and_other_users():
    from plm_core.engine.memory import GPU_MARGIN_BYTES, gpu_kv_budget

    gib, m = 2**30, GPU_MARGIN_BYTES
    # an 80 GiB card to itself: 16 GiB of weights (8B), 3 GiB reserved for a step and the encoder
    # cache
    assert (
        gpu_kv_budget(80 * gib, 63 * gib, 16 * gib, 3 * gib, 0.9)
        == int(0.9 * 80 * gib) - 16 * gib - 3 * gib - m
    )
    # a second replica at 0.45 beside one already holding 0.45 of the card: its own share, not the
    # first's
    assert (
        gpu_kv_budget(80 * gib, 41 * gib, 3 * gib, gib, 0.45)
        == int(0.45 * 80 * gib) - 3 * gib - gib - m
    )
    # other processes leave less free than the share: only what is free
    assert gpu_kv_budget(80 * gib, 20 * gib, 3 * gib, gib, 0.9) == 20 * gib - gib - m
    # weights beyond the share: nothing (plan_kv_blocks then refuses, with the numbers)
    assert gpu_kv_budget(24 * gib, 7 * gib, 17 * gib, gib, 0.7) < 0


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_profile_step_runs_the_worst_case_step(path, device):
    """The GPU KV budget's profiling step (a tile batch, then the last chunk of a full context)
    runs; on CUDA it measures a positive peak, off CUDA nothing."""
    import torch

    from plm_core.engine.model_runner import profile_step_peak_bytes
    from plm_core.model.perception_lm import build_model
    from plm_core.model_config import load_model_config

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = load_model_config(path)
    dev = torch.device(device)
    model = build_model(cfg, device=dev, dtype=torch.float32)
    got = profile_step_peak_bytes(
        model,
        cfg,
        num_tokens=48,
        num_tiles=3,
        num_logit_rows=4,
        context_len=100,
        block_size=16,
        device=dev,
        dtype=torch.float32,
    )
    assert got is None if device == "cpu" else got > 0


class _FixedCosts:
    """A cost model that has 'measured' fixed figures (no clock in tests)."""

    def __init__(self, base_s, per_decode_s, per_token_s, per_tile_s):
        from plm_core.engine.cost_model import StepCosts

        self.figures = StepCosts(base_s, per_decode_s, per_token_s, per_tile_s)

    def observe(self, decodes, tokens, tiles, seconds):
        pass

    def costs(self):
        return self.figures


@pytest.mark.parametrize("target", ["auto", "30"])
def test_steps_with_decodes_keep_to_the_latency_target(path, media_dir, solo, target):
    """While streams decode, an image prompt's prefill and encoding are cut to the step budget the
    cost model gives; tokens are the same as alone (chunk boundaries never change results)."""
    from plm_core import LLM

    llm = LLM(path, device="cpu", dtype="float32", step_latency_target=target)
    llm.engine.costs = _FixedCosts(0.002, 0.001, 0.0005, 0.004)
    scheduler = llm.engine.scheduler
    schedule, steps = scheduler.schedule, []

    def record(budget=None):
        running = scheduler.running
        decodes = sum(1 for r in running if r.num_tokens - r.num_computed_tokens == 1)
        out = schedule(budget)
        steps.append((budget, out, decodes))
        return out

    scheduler.schedule = record
    img = str(media_path(image_names()[0], media_dir))
    convs = [[{"role": "user", "content": f"Count to {n}."}] for n in (20, 30)]
    convs.append(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": img}},
                    {"type": "text", "text": "Describe it."},
                ],
            }
        ]
    )
    outs = llm.chat(convs, _greedy(12))
    budgeted = [step for step in steps if step[0] is not None]
    assert budgeted, "no step got a budget"
    limited = 0
    for budget, out, decodes in budgeted:
        if target == "auto":
            assert budget.target_s == pytest.approx(2.5 * (0.002 + 0.001 * decodes))
        else:
            assert budget.target_s == pytest.approx(max(0.030, 0.002 + 0.001 * decodes))
        prefill = out.total_num_scheduled_tokens - decodes  # decodes at their own price
        cost = budget.cost_s(prefill, out.total_num_encoder_tiles, num_decodes=decodes)
        floor = budget.cost_s(16, 1, num_decodes=decodes)
        assert cost <= max(budget.target_s, floor) + 1e-9
        limited += (
            out.total_num_scheduled_tokens < llm.engine_config.scheduler.max_num_batched_tokens
        )
    assert limited
    assert [o.token_ids for o in outs] == [solo.chat(c, _greedy(12))[0].token_ids for c in convs]


def test_no_budget_when_off_or_unmeasured(path):
    from plm_core import LLM

    off = LLM(path, device="cpu", dtype="float32", step_latency_target="off")
    off.engine.costs = _FixedCosts(0.002, 0.001, 0.0005, 0.004)
    assert off.engine._step_budget() is None
    fresh = LLM(path, device="cpu", dtype="float32")
    assert fresh.engine.costs.costs() is None and fresh.engine._step_budget() is None
