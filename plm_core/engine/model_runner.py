"""The model runner: the only engine part that touches tensors.

It owns the weights, the paged KV cache, the vision-encoder outputs and the per-request samplers.
Each step it drops evicted encoder outputs, encodes the scheduled media in one batched vision
forward, builds the flattened batch (token embeddings with media features written over the
placeholder rows), runs the decoder over the paged cache and samples where a request is complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from plm_core.engine.block_manager import BlockCopy
from plm_core.engine.request import Request
from plm_core.engine.sampler import BatchSampler, Logprobs, SamplingState
from plm_core.engine.scheduler import SchedulerOutput
from plm_core.inputs import MediaItem
from plm_core.model.attention import AttentionMetadata, build_metadata
from plm_core.model.decode_graphs import DecodeGraphs
from plm_core.model.perception_lm import PerceptionLM, build_model
from plm_core.model_config import ModelConfig

log = logging.getLogger("plm_core.runner")


@dataclass
class RunnerOutput:
    """Sampled tokens of one step, keyed by request id."""

    token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, Logprobs | None] = field(default_factory=dict)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V, all layers, for one token."""
    t = cfg.text
    return (
        2
        * t.num_layers
        * t.num_kv_heads
        * t.head_dim
        * torch.tensor([], dtype=dtype).element_size()
    )


def copy_kv_blocks(
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[BlockCopy], block_size: int
) -> None:
    """Copies whole KV blocks, (source, destination), in every layer's K and V.

    Each cache is [num_slots, kv_heads, head_dim] with block b at slots [b * block_size, (b + 1) *
    block_size). All sources are read before any destination is written (a gather, then a
    scatter), so a block may be the destination of one copy and the source of a later one.
    """
    device = kv_caches[0][0].device
    offsets = torch.arange(block_size, device=device)
    src = torch.tensor([s for s, _ in copies], device=device)[:, None] * block_size + offsets
    dst = torch.tensor([d for _, d in copies], device=device)[:, None] * block_size + offsets
    src, dst = src.flatten(), dst.flatten()  # [C * block_size]
    for k, v in kv_caches:
        k[dst] = k[src]
        v[dst] = v[src]


@torch.inference_mode()
def profile_step_peak_bytes(
    model: PerceptionLM,
    cfg: ModelConfig,
    *,
    num_tokens: int,
    num_tiles: int,
    num_logit_rows: int,
    context_len: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> int | None:
    """Memory a worst-case step needs beyond the weights and the KV cache, measured by running one.

    The step encodes `num_tiles` tiles, then prefills a `num_tokens` chunk at the end of a
    `context_len` context (the largest attention it can meet) and takes `num_logit_rows` rows of
    logits, over a throwaway KV cache just large enough, whose own size is not counted. Returns the
    CUDA allocator's peak above what was allocated before, or None off CUDA (the step still runs,
    which is how CPU tests check it).
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    tile = cfg.processor.tile_size
    if num_tiles:
        model.encode_media(torch.zeros(num_tiles, 3, tile, tile, device=device, dtype=dtype))
    t = cfg.text
    ctx = max(num_tokens, context_len)
    blocks = -(-ctx // block_size)
    shape = (blocks * block_size, t.num_kv_heads, t.head_dim)
    kv = [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(t.num_layers)
    ]
    meta = build_metadata(
        [list(range(blocks))], [ctx - num_tokens], [num_tokens], block_size, device
    )
    embeds = torch.zeros(num_tokens, t.hidden_size, dtype=dtype, device=device)
    positions = torch.arange(ctx - num_tokens, ctx, device=device)
    rows = torch.arange(num_tokens - min(num_logit_rows, num_tokens), num_tokens, device=device)
    model(embeds, positions, kv, meta, rows)
    if not cuda:
        return None
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - 2 * t.num_layers * kv[0][0].nbytes
    del kv
    torch.cuda.empty_cache()
    return max(0, peak)


class ModelRunner:
    """Runs steps of the model for the scheduler's outputs."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        max_encoder_tiles_per_forward: int = 64,
        batch_decodes: bool | None = None,
        model: PerceptionLM | None = None,
        cuda_graphs: bool = False,
        max_num_seqs: int = 64,
        max_model_len: int = 8192,
    ):
        self.cfg = cfg
        self.device, self.dtype = device, dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_tiles_per_forward = max_encoder_tiles_per_forward
        # decode batching: a padded batch on GPU, a per-sequence loop on CPU (model/attention.py)
        self.batch_decodes = device.type == "cuda" if batch_decodes is None else batch_decodes
        self.model = model if model is not None else build_model(cfg, device=device, dtype=dtype)
        t = cfg.text
        # with decode graphs, one block past the block manager's range is the padded rows' scratch
        shape = ((num_blocks + int(cuda_graphs)) * block_size, t.num_kv_heads, t.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(t.num_layers)
        ]
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs:
            if device.type != "cuda":
                log.warning(
                    "CUDA graphs need a GPU; running the padded decode path eagerly on %s",
                    device.type,
                )
            self.batch_decodes = True
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                scratch_slot=num_blocks * block_size,
                max_batch=max_num_seqs,
                max_context=max_model_len,
                capture=device.type == "cuda",
            )
            if self.graphs.capture:
                log.info("captured %d decode CUDA graphs", len(self.graphs.graphs))
        self.encoder_outputs: dict[
            str, torch.Tensor
        ] = {}  # cache key -> [num_tokens, H], complete items
        self._partial: dict[
            str, torch.Tensor
        ] = {}  # cache key -> [num_tiles, tokens_per_tile, H] being filled
        self.samplers: dict[str, SamplingState] = {}
        self.sampler = BatchSampler()

    # -- one step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Runs one step: block copies, then encoder work, then the forward, then sampling."""
        for rid in sched.finished_request_ids:
            self.samplers.pop(rid, None)
        for key in sched.free_encoder_keys:
            self.encoder_outputs.pop(key, None)
            self._partial.pop(key, None)
        if sched.block_copies:  # forked n > 1 choices: before any forward writes the cache
            copy_kv_blocks(self.kv_caches, sched.block_copies, self.block_size)
        out = RunnerOutput()
        if sched.encoder_inputs:
            self._encode(sched.encoder_inputs, sched.encoder_tile_ranges)
        if sched.is_empty:
            return out

        embeds, positions, logit_rows = self._inputs(sched)
        meta = build_metadata(
            [r.block_ids for r in sched.requests],
            sched.start_positions,
            sched.num_scheduled_tokens,
            self.block_size,
            self.device,
            batch_decodes=self.batch_decodes,
        )
        sampled = [r for r, s in zip(sched.requests, sched.sample) if s]
        if not sampled:
            self.model.language_model(embeds, positions, self.kv_caches, meta)
            return out
        logits = self._decode_graph_logits(embeds, positions, meta, len(sampled))
        if logits is None:
            logits = self.model(embeds, positions, self.kv_caches, meta, logit_rows)  # [B, V] fp32
        states = [self._sampling_state(r) for r in sampled]
        tokens, logprobs = self.sampler(logits, states)
        for request, token, lp in zip(sampled, tokens, logprobs):
            out.token_ids[request.request_id] = token
            out.logprobs[request.request_id] = lp
        return out

    def _decode_graph_logits(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        num_sampled: int,
    ) -> torch.Tensor | None:
        """Logits from a decode graph when every sequence decodes one sampled token and a bucket
        fits."""
        if self.graphs is None or meta.prefill_seqs or num_sampled != len(meta.decode_seqs):
            return None
        if meta.decode_slots is None:  # batch_decodes off: no padded decode batch
            return None
        bucket = self.graphs.bucket(len(meta.decode_seqs), meta.decode_slots.shape[1])
        if bucket is None:
            return None
        return self.graphs.run(embeds, positions, meta, bucket)

    def _sampling_state(self, request: Request) -> SamplingState:
        state = self.samplers.get(request.request_id)
        if state is None:
            state = SamplingState.create(
                request.sampling_params,
                request.prompt_token_ids,
                request.output_token_ids,
                request.eos_token_ids,
                self.device,
                request.grammar,
            )
            self.samplers[request.request_id] = state
        return state

    def _encode(self, items: list[MediaItem], ranges: list[tuple[int, int]]) -> None:
        """Encodes the scheduled tiles in batched forwards; an item is usable once whole.

        An item the processor left without pixels (its encoder output was resident then, and has
        been evicted since) has them made here, on the engine thread, from its pixel source:
        correct, and rare, since the processor skips pixels only for resident items.
        """
        tiles = []
        for m, (lo, hi) in zip(items, ranges):
            if not m.has_pixels:
                log.debug("making the skipped pixels of %s %s", m.kind, m.cache_key[:32])
            tiles.append(m.pixels()[lo:hi])
        pixels = torch.cat(tiles).to(self.device, self.dtype)  # [N, 3, T, T]
        chunks = torch.split(pixels, self.max_tiles_per_forward)
        feats = torch.cat([self.model.encode_media(chunk) for chunk in chunks])
        parts = torch.split(feats, [hi - lo for lo, hi in ranges])
        for item, (lo, hi), part in zip(items, ranges, parts):
            key = item.cache_key
            if lo == 0 and hi == item.num_tiles:
                whole = part
            else:
                buf = self._partial.get(key)
                if buf is None:
                    buf = self._partial[key] = part.new_empty((item.num_tiles, *part.shape[1:]))
                buf[lo:hi] = part
                if hi < item.num_tiles:
                    continue
                whole = self._partial.pop(key)
            self.encoder_outputs[key] = whole.reshape(-1, whole.shape[-1])  # [num_tokens, H]

    def _inputs(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened token embeddings with media rows filled, positions, and rows to sample from."""
        ids: list[int] = []
        pos: list[int] = []
        logit_rows: list[int] = []
        fills: list[tuple[int, torch.Tensor]] = []  # (row in batch, features [k, H])
        for request, start, n, sample in zip(
            sched.requests, sched.start_positions, sched.num_scheduled_tokens, sched.sample
        ):
            row0 = len(ids)
            tokens = request.all_token_ids[start : start + n]
            ids.extend(tokens)
            pos.extend(range(start, start + n))
            if sample:
                logit_rows.append(len(ids) - 1)
            for item in request.media_in_range(start, start + n):
                feats = self.encoder_outputs.get(item.cache_key)
                if feats is None:
                    raise RuntimeError(
                        f"encoder output for {item.kind} {item.cache_key[:32]} is not resident"
                    )
                lo, hi = max(start, item.offset), min(start + n, item.offset + item.num_tokens)
                fills.append((row0 + lo - start, feats[lo - item.offset : hi - item.offset]))
        token_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        embeds = self.model.embed(token_ids)  # [T, H]
        if fills:
            embeds = embeds.clone()
            for row, feats in fills:
                embeds[row : row + feats.shape[0]] = feats.to(embeds.dtype)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        return embeds, positions, rows
