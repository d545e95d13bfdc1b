"""Paged attention (plm_core.model.attention) against a plain per-sequence reference.

Each sequence's full K/V history is kept contiguous here; the cached part is scattered into the
paged cache through a shuffled, non-contiguous block table, the step's new part goes in as `k`,
`v`. The reference attends each sequence's queries to its contiguous K/V with torch SDPA and an
explicit causal mask (query at absolute position p sees keys 0..p), GQA by repeat_interleave of the
kv heads.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from plm_core.model.attention import build_metadata, paged_attention

BLOCK_SIZE = 16
ATOL = 1e-5


def slot_of(table: list[int], pos: int, block_size: int = BLOCK_SIZE) -> int:
    return table[pos // block_size] * block_size + pos % block_size


def reference(
    q: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, start: int
) -> torch.Tensor:
    """The attention output [n, nh, D] of q: [n, nh, D] at positions start..start+n-1.

    k_full, v_full: [start + n, nkv, D], the sequence's whole K/V.
    """
    n, nh, _ = q.shape
    ctx, nkv, _ = k_full.shape
    rep = nh // nkv
    # [nh, ctx, D]; head h uses kv head h // rep
    keys = k_full.transpose(0, 1).repeat_interleave(rep, dim=0)
    values = v_full.transpose(0, 1).repeat_interleave(rep, dim=0)
    q_pos = torch.arange(start, start + n)[:, None]
    mask = torch.arange(ctx)[None, :] <= q_pos  # [n, ctx]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask
    )[0]
    return o.transpose(0, 1)


def make_case(
    specs: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    seed: int = 0,
    extra_blocks: int = 7,
    spare_table_blocks: int = 2,
):
    """specs: (start, query_len) per sequence. Returns everything a step needs plus the
    per-sequence truth."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    needed = [-(-(s + n) // BLOCK_SIZE) + spare_table_blocks for s, n in specs]
    num_blocks = sum(needed) + extra_blocks
    ids = list(range(num_blocks))
    rng.shuffle(ids)  # block tables are shuffled and interleaved across sequences: none contiguous
    tables: list[list[int]] = [[] for _ in specs]
    while any(len(t) < m for t, m in zip(tables, needed)):  # dealt round-robin: tables interleave
        for t, m in zip(tables, needed):
            if len(t) < m:
                t.append(ids.pop())
    # Unused slots hold large garbage: any slot attended by mistake would show up in the output.
    k_cache = torch.randn(num_blocks * BLOCK_SIZE, kv_heads, head_dim, generator=gen) * 1e3
    v_cache = torch.randn(num_blocks * BLOCK_SIZE, kv_heads, head_dim, generator=gen) * 1e3
    k_full, v_full, qs, ks, vs = [], [], [], [], []
    for table, (start, n) in zip(tables, specs):
        kf = torch.randn(start + n, kv_heads, head_dim, generator=gen)
        vf = torch.randn(start + n, kv_heads, head_dim, generator=gen)
        for pos in range(start):  # the already-computed tokens are in the cache
            k_cache[slot_of(table, pos)] = kf[pos]
            v_cache[slot_of(table, pos)] = vf[pos]
        k_full.append(kf)
        v_full.append(vf)
        qs.append(torch.randn(n, heads, head_dim, generator=gen))
        ks.append(kf[start:])
        vs.append(vf[start:])
    return dict(
        tables=tables,
        starts=[s for s, _ in specs],
        lens=[n for _, n in specs],
        k_cache=k_cache,
        v_cache=v_cache,
        q=torch.cat(qs),
        k=torch.cat(ks),
        v=torch.cat(vs),
        k_full=k_full,
        v_full=v_full,
    )


def run_and_check(case: dict, batch_decodes: bool) -> torch.Tensor:
    meta = build_metadata(
        case["tables"],
        case["starts"],
        case["lens"],
        BLOCK_SIZE,
        torch.device("cpu"),
        batch_decodes=batch_decodes,
    )
    k_before, v_before = case["k_cache"].clone(), case["v_cache"].clone()
    out = paged_attention(case["q"], case["k"], case["v"], case["k_cache"], case["v_cache"], meta)
    assert out.shape == case["q"].shape and out.dtype == case["q"].dtype

    # The outputs, sequence by sequence.
    offset = 0
    for i, (start, n) in enumerate(zip(case["starts"], case["lens"])):
        expected = reference(
            case["q"][offset : offset + n], case["k_full"][i], case["v_full"][i], start
        )
        got = out[offset : offset + n]
        err = (got - expected).abs().max().item()
        where = f"sequence {i} (start {start}, query_len {n}, batch_decodes={batch_decodes})"
        assert err <= ATOL, f"{where}: max err {err}"
        offset += n

    # The new K/V landed in their slots, and nothing else in the cache changed.
    written = torch.zeros(case["k_cache"].shape[0], dtype=torch.bool)
    slots = []
    for i, (table, start, n) in enumerate(zip(case["tables"], case["starts"], case["lens"])):
        for pos in range(start, start + n):
            slot = slot_of(table, pos)
            slots.append(slot)
            assert not written[slot]
            written[slot] = True
            assert torch.equal(case["k_cache"][slot], case["k_full"][i][pos]), (i, pos)
            assert torch.equal(case["v_cache"][slot], case["v_full"][i][pos]), (i, pos)
    assert meta.slot_mapping.tolist() == slots
    assert torch.equal(case["k_cache"][~written], k_before[~written])
    assert torch.equal(case["v_cache"][~written], v_before[~written])
    return out


# (start, query_len) per sequence, in batch order. Decodes: start = context - 1, query_len 1.
MIXED = [
    (37, 1),  # decode, context 38
    (100, 60),  # prefill chunk after 100 cached tokens, unaligned start, spans several blocks
    (15, 1),  # decode whose token is the last slot of its first block (context 16)
    (0, 45),  # whole prompt at once
    (16, 1),  # decode starting a new block (context 17)
    (300, 1),  # long decode
    (0, 1),  # a one-token prompt: query_len 1 and no cache
    (48, 16),  # block-aligned chunk of exactly one block
    (129, 1),
    (63, 1),
]

SHAPES = [(8, 2, 32), (4, 4, 16), (6, 1, 8)]  # (heads, kv_heads, head_dim): GQA 4:1, plain MHA, MQA


@pytest.mark.parametrize("batch_decodes", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_mixed_batch(shape, batch_decodes):
    run_and_check(make_case(MIXED, *shape, seed=1), batch_decodes)


@pytest.mark.parametrize("batch_decodes", [True, False])
def test_decodes_only(batch_decodes):
    specs = [(c - 1, 1) for c in (1, 17, 200, 33, 512, 64, 5, 129)]
    run_and_check(make_case(specs, 8, 2, 32, seed=2), batch_decodes)


@pytest.mark.parametrize("batch_decodes", [True, False])
def test_single_decode(batch_decodes):
    run_and_check(make_case([(90, 1)], 8, 2, 32, seed=3), batch_decodes)


@pytest.mark.parametrize("batch_decodes", [True, False])
def test_prefills_only(batch_decodes):
    specs = [(0, 70), (32, 40), (17, 2), (5, 100)]
    run_and_check(make_case(specs, 8, 2, 32, seed=4), batch_decodes)


@pytest.mark.parametrize("seed", range(5))
def test_random_batches_both_modes_agree(seed):
    """Random mixes: both settings match the reference and (within tolerance) each other."""
    rng = random.Random(100 + seed)
    specs = []
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.6:
            specs.append((rng.randint(0, 400), 1))
        else:
            specs.append((rng.choice([0, rng.randint(1, 300)]), rng.randint(2, 80)))
    outs = [
        run_and_check(make_case(specs, 8, 2, 32, seed=seed), batch_decodes)
        for batch_decodes in (True, False)
    ]
    assert (outs[0] - outs[1]).abs().max().item() <= ATOL


def test_metadata_layout():
    case = make_case(MIXED, 8, 2, 32, seed=5)
    cpu = torch.device("cpu")
    batched = build_metadata(
        case["tables"], case["starts"], case["lens"], BLOCK_SIZE, cpu, batch_decodes=True
    )
    looped = build_metadata(
        case["tables"], case["starts"], case["lens"], BLOCK_SIZE, cpu, batch_decodes=False
    )
    decodes = [i for i, n in enumerate(case["lens"]) if n == 1]
    assert batched.decode_seqs == decodes
    assert sorted(batched.decode_seqs + batched.prefill_seqs) == list(range(len(MIXED)))
    assert looped.decode_seqs == [] and looped.prefill_seqs == list(range(len(MIXED)))
    assert looped.decode_slots is None and looped.decode_mask is None and looped.decode_rows is None
    ctx = [s + n for s, n in MIXED]
    assert batched.context_lens == ctx == looped.context_lens
    for i, table in enumerate(case["tables"]):
        expected = torch.tensor([slot_of(table, p) for p in range(ctx[i])])
        assert torch.equal(batched.context_slots[i], expected)
    max_ctx = max(ctx[i] for i in decodes)
    assert batched.decode_slots.shape == (len(decodes), max_ctx)
    assert batched.decode_mask.shape == (len(decodes), 1, 1, max_ctx)
    for row, i in enumerate(decodes):
        assert batched.decode_mask[row, 0, 0].sum().item() == ctx[i]
        assert torch.equal(batched.decode_slots[row, : ctx[i]], batched.context_slots[i])
        assert batched.decode_rows[row].item() == batched.query_starts[i]
    slot_mapping = [
        slot_of(t, p)
        for t, s, n in zip(case["tables"], case["starts"], case["lens"])
        for p in range(s, s + n)
    ]
    assert batched.slot_mapping.tolist() == slot_mapping == looped.slot_mapping.tolist()
