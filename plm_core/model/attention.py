"""Attention over the paged KV cache for a mixed batch of prefill chunks and decode tokens.

The KV cache is one pair of tensors per layer, [num_blocks * block_size, kv_heads, head_dim]: a
token's KV lives at slot `block_id * block_size + position % block_size`. Each step the model
runner builds an `AttentionMetadata` (shared by all layers); every layer writes the step's new K/V
into their slots and attends each sequence's queries to its gathered context. Decode-only
sequences (one query each) are attended one by one like prefill chunks on CPU, where the padded
batch loses (benchmarks/bench_attention.py: the loop is as fast or faster in 34 of 36 measured
shapes, up to 29x on mixed context lengths, because gathering padded K/V costs more than the
attention), and in one padded batch on GPU, where per-call launch overhead dominates (not measured
yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step layout of the flattened batch (tokens of all sequences concatenated)."""

    slot_mapping: torch.Tensor  # [T] long: cache slot of each new token
    query_starts: list[int]  # start of each sequence's queries in the flattened batch
    query_lens: list[int]  # new tokens per sequence this step
    context_lens: list[int]  # tokens each sequence attends to: cached + new
    context_slots: list[torch.Tensor]  # per sequence, [context_len] long: slots of all its tokens
    decode_seqs: list[int]  # indices of sequences with exactly one query (batched together)
    prefill_seqs: list[int]  # indices of the others (attended one by one)
    decode_slots: torch.Tensor | None = None  # [D, max_ctx] long, padded with slot 0
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_ctx] bool, True where attended
    decode_rows: torch.Tensor | None = None  # [D] long: row in the flattened batch of each query


def build_metadata(
    block_tables: list[list[int]],
    starts: list[int],
    query_lens: list[int],
    block_size: int,
    device: torch.device,
    *,
    batch_decodes: bool = True,
) -> AttentionMetadata:
    """Metadata for sequences computing positions [start, start + query_len) of these tables."""
    slots_all: list[torch.Tensor] = []
    new_slots: list[torch.Tensor] = []
    q_starts: list[int] = []
    ctx_lens: list[int] = []
    offset = 0
    for table, start, n in zip(block_tables, starts, query_lens):
        ctx = start + n
        blocks = torch.tensor(table[: (ctx + block_size - 1) // block_size], dtype=torch.long)
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]
        slots_all.append(slots)
        new_slots.append(slots[start:ctx])
        q_starts.append(offset)
        ctx_lens.append(ctx)
        offset += n
    decode = [i for i, n in enumerate(query_lens) if n == 1] if batch_decodes else []
    prefill = [i for i in range(len(query_lens)) if i not in set(decode)]
    meta = AttentionMetadata(
        slot_mapping=torch.cat(new_slots).to(device),
        query_starts=q_starts,
        query_lens=list(query_lens),
        context_lens=ctx_lens,
        context_slots=[s.to(device) for s in slots_all],
        decode_seqs=decode,
        prefill_seqs=prefill,
    )
    if decode:
        max_ctx = max(ctx_lens[i] for i in decode)
        padded = torch.zeros(len(decode), max_ctx, dtype=torch.long)
        mask = torch.zeros(len(decode), 1, 1, max_ctx, dtype=torch.bool)
        for row, i in enumerate(decode):
            padded[row, : ctx_lens[i]] = slots_all[i]
            mask[row, 0, 0, : ctx_lens[i]] = True
        meta.decode_slots = padded.to(device)
        meta.decode_mask = mask.to(device)
        meta.decode_rows = torch.tensor(
            [q_starts[i] for i in decode], dtype=torch.long, device=device
        )
    return meta


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    # x: [..., kv_heads, S, D] -> [..., n_heads, S, D]
    # (each kv head shared by n_heads / kv_heads query heads)
    kv = x.shape[-3]
    if kv == n_heads:
        return x
    rep = n_heads // kv
    return (
        x.unsqueeze(-3)
        .expand(*x.shape[:-2], rep, *x.shape[-2:])
        .reshape(*x.shape[:-3], n_heads, *x.shape[-2:])
    )


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """Attention of a prompt chunk to `prefix` cached tokens plus itself (causal).

    q: [nh, n, D]; k, v: [nkv, ctx, D], each kv head shared by nh / nkv query heads. On CPU the
    two parts run in the flash kernel (the cached part unmasked, the chunk causal) and are merged
    with their log-sum-exps; an explicit bottom-right causal mask would force SDPA's much slower
    math kernel (measured: 0.51 s vs 0.55 s for a 2048-token chunk at 9,500 tokens of context, and
    the gap grows with the chunk). The cached part takes each kv head's query heads as more
    queries, so its keys and values are never copied per query head; only the chunk's are.
    Elsewhere: SDPA with the boolean mask.
    """
    nh, n, dim = q.shape
    nkv, ctx = k.shape[0], k.shape[1]
    if q.device.type == "cpu" and _CPU_FLASH is not None and prefix > 0:
        grouped = q.reshape(nkv, (nh // nkv) * n, dim)  # [nkv, group * n, D]
        o1, lse1 = _CPU_FLASH(grouped[None], k[None, :, :prefix], v[None, :, :prefix])[:2]
        o1, lse1 = o1.reshape(1, nh, n, dim), lse1.reshape(1, nh, n)
        own_k, own_v = _expand_kv(k[:, prefix:], nh), _expand_kv(v[:, prefix:], nh)
        o2, lse2 = _CPU_FLASH(q[None], own_k[None], own_v[None], is_causal=True)[:2]
        m = torch.maximum(lse1, lse2)
        w1, w2 = torch.exp(lse1 - m)[..., None], torch.exp(lse2 - m)[..., None]
        merged: torch.Tensor = ((o1.float() * w1 + o2.float() * w2) / (w1 + w2))[0]
        return merged.to(q.dtype)
    mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
    return F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, enable_gqa=True
    )[0]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Writes the step's K/V into the cache and attends.

    q: [T, nh, D]; k, v: [T, nkv, D] -> [T, nh, D].
    """
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    n_heads = q.shape[1]
    out = torch.empty_like(q)
    for i in meta.prefill_seqs:
        s, n, ctx = meta.query_starts[i], meta.query_lens[i], meta.context_lens[i]
        slots = meta.context_slots[i]
        keys = k_cache.index_select(0, slots).transpose(0, 1)  # [nkv, ctx, D]
        values = v_cache.index_select(0, slots).transpose(0, 1)
        query = q[s : s + n].transpose(0, 1)  # [nh, n, D]
        if n == ctx:  # the whole sequence at once: plain causal
            o = F.scaled_dot_product_attention(
                query[None], keys[None], values[None], is_causal=True, enable_gqa=True
            )[0]
        elif n == 1:
            o = F.scaled_dot_product_attention(
                query[None], keys[None], values[None], enable_gqa=True
            )[0]
        else:  # a chunk after cached tokens: query j sees keys up to (ctx - n) + j
            o = chunk_attention(query, keys, values, ctx - n)
        out[s : s + n] = o.transpose(0, 1)
    if meta.decode_seqs:
        rows, padded = meta.decode_rows, meta.decode_slots
        assert rows is not None and padded is not None, "build_metadata sets them with decode_seqs"
        d, max_ctx = padded.shape
        flat = padded.flatten()
        # [B, nkv, C, D]
        keys = k_cache.index_select(0, flat).view(d, max_ctx, *k_cache.shape[1:]).transpose(1, 2)
        values = v_cache.index_select(0, flat).view(d, max_ctx, *v_cache.shape[1:]).transpose(1, 2)
        # each kv head's query heads become its queries ([B, nkv, group, D]), the mask broadcasting
        # over them: GQA with no K/V expansion and no enable_gqa, which not every GPU kernel takes
        nkv = k_cache.shape[1]
        query = q.index_select(0, rows).view(d, nkv, n_heads // nkv, q.shape[-1])
        o = F.scaled_dot_product_attention(query, keys, values, attn_mask=meta.decode_mask)
        out.index_copy_(0, rows, o.reshape(d, n_heads, q.shape[-1]))
    return out
