"""CUDA graphs for decode-only steps: a captured forward per (batch, context) bucket, replayed.

A decode step launches hundreds of small kernels (16-32 layers x norms, projections, RoPE, gather,
attention); on a GPU their launch overhead, not the arithmetic, sets the step time. Graphs remove
it. A graph replays fixed shapes, so each step is padded up to a bucket: the batch to the next of
1, 2, 4, 8, 16, 24, 32, ... and the longest context to the next power of two (from 256). Inputs go
through static buffers; padded rows write their K/V into a scratch slot the block manager never
hands out and attend only to it, so they cannot touch real sequences, and their logits are dropped.
Buckets with more than `max_graph_tokens` batch x context fall back to the eager path.

With `capture=False` the same padded static-buffer forward runs eagerly: that is how the CPU tests
check that bucketing, padding and the scratch slot leave every token unchanged.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

from plm_core.model.attention import AttentionMetadata

if TYPE_CHECKING:
    from plm_core.model.perception_lm import PerceptionLM


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 16, 8))
    return sorted({min(s, max_batch) for s in sizes})


def context_buckets(max_context: int, smallest: int = 256) -> list[int]:
    sizes, c = [], smallest
    while c < max_context:
        sizes.append(c)
        c *= 2
    return sizes + [max_context]


class DecodeGraphs:
    """Static buffers and captured graphs for decode steps of `model` over `kv_caches`."""

    def __init__(
        self,
        model: PerceptionLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        scratch_slot: int,
        max_batch: int,
        max_context: int,
        capture: bool = True,
        max_graph_tokens: int = 1 << 18,
    ):
        self.model, self.kv_caches = model, kv_caches
        self.scratch = scratch_slot
        self.capture = capture
        self.batch_sizes = batch_buckets(max_batch)
        self.context_sizes = context_buckets(max_context)
        self.max_graph_tokens = max_graph_tokens
        ref = kv_caches[0][0]
        device, dtype = ref.device, ref.dtype
        hidden = model.language_model.cfg.hidden_size
        b, c = self.batch_sizes[-1], self.context_sizes[-1]
        self.embeds = torch.zeros(b, hidden, dtype=dtype, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((b,), scratch_slot, dtype=torch.long, device=device)
        self.context_slots = torch.full((b, c), scratch_slot, dtype=torch.long, device=device)
        self.mask = torch.zeros(b, 1, 1, c, dtype=torch.bool, device=device)
        self.rows = torch.arange(b, dtype=torch.long, device=device)
        # one output buffer shared by every bucket's graph (a graph per bucket holding its own
        # [b, V] fp32 logits would cost ~1 GB for PLM's 128k vocabulary at the default 64 sequences)
        self.logits = torch.zeros(b, model.lm_head.out_features, dtype=torch.float32, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.num_runs = 0  # decode steps served by this path (captured or eager)
        if capture:
            self._capture_all()

    def bucket(self, batch: int, context: int) -> tuple[int, int] | None:
        """The (batch, context) bucket a step fits, or None when it must run eagerly."""
        i = bisect.bisect_left(self.batch_sizes, batch)
        j = bisect.bisect_left(self.context_sizes, context)
        if i == len(self.batch_sizes) or j == len(self.context_sizes):
            return None
        b, c = self.batch_sizes[i], self.context_sizes[j]
        return (b, c) if b * c <= self.max_graph_tokens else None

    def _forward(self, b: int, c: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            query_starts=[],
            query_lens=[],
            context_lens=[],
            context_slots=[],
            decode_seqs=list(range(b)),
            prefill_seqs=[],
            decode_slots=self.context_slots[:b, :c],
            decode_mask=self.mask[:b, :, :, :c],
            decode_rows=self.rows[:b],
        )
        hidden = self.model.language_model(
            self.embeds[:b], self.positions[:b], self.kv_caches, meta
        )
        return self.logits[:b].copy_(self.model.lm_head(hidden))  # [b, V] fp32

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        # largest first, so smaller graphs fit in its memory pool
        for b in reversed(self.batch_sizes):
            for c in reversed(self.context_sizes):
                if b * c > self.max_graph_tokens:
                    continue
                self.mask[:b, :, :, 0] = True  # every row attends to the scratch slot only
                # torch.cuda.Stream.__new__ is unannotated
                side = torch.cuda.Stream()  # type: ignore[no-untyped-call, unused-ignore]
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._forward(b, c)  # warm-up: lazy kernel and workspace initialisation
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(b, c)
                pool = graph.pool()
                self.graphs[(b, c)] = graph
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        bucket: tuple[int, int],
    ) -> torch.Tensor:
        """Logits [n, V] of n decode tokens (meta from build_metadata, every sequence decoding)."""
        slots, mask = meta.decode_slots, meta.decode_mask
        assert slots is not None and mask is not None, "a decode step has padded decode slots"
        n, ctx = slots.shape
        b, c = bucket
        self.embeds[:n].copy_(embeds)
        self.positions[:n].copy_(positions)
        self.positions[n:b].zero_()
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:b].fill_(self.scratch)
        self.mask[:b, :, :, :c].zero_()
        # columns past ctx keep stale, masked slots
        self.context_slots[:n, :ctx].copy_(slots)
        self.mask[:n, :, :, :ctx].copy_(mask)
        self.context_slots[n:b, 0] = self.scratch
        self.mask[n:b, :, :, 0] = True
        self.num_runs += 1
        if self.capture:
            self.graphs[bucket].replay()
            logits = self.logits[:b]
        else:
            logits = self._forward(b, c)
        return logits[:n]
