"""KV-cache sizing: how many blocks fit, from a fixed budget on the CPU or the GPU's free memory."""

from __future__ import annotations

import logging
import math

import torch

from plm_core.config import EngineConfig
from plm_core.engine.model_runner import kv_bytes_per_token, profile_step_peak_bytes
from plm_core.model.perception_lm import PerceptionLM
from plm_core.model_config import ModelConfig

log = logging.getLogger("plm_core.engine")

# CUDA graphs, sampler copies, cuBLAS workspaces, allocator fragmentation
GPU_MARGIN_BYTES = 1 << 30


def encoder_cache_tokens(config: EngineConfig, max_model_len: int) -> int:
    """The vision-encoder cache budget in LM tokens: as configured, else max(65536, 2 x ctx)."""
    return config.cache.encoder_cache_tokens or max(65536, 2 * max_model_len)


def gpu_kv_budget(total: int, free: int, own: int, reserved: int, utilization: float) -> int:
    """Bytes for the KV cache on a GPU: this engine's share, `utilization` of the card, less what it
    already holds (`own`: the weights), `reserved` (a step's activations, the encoder cache) and a
    fixed margin; never more than is free, so other processes on the card are respected."""
    return min(int(utilization * total) - own, free) - reserved - GPU_MARGIN_BYTES


def reserved_gpu_bytes(
    model: PerceptionLM,
    model_config: ModelConfig,
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
) -> int:
    """A measured worst-case step's activations plus the encoder cache at its budget (GPU only)."""
    sched = config.scheduler
    # None only off a GPU, where nothing is reserved
    step = (
        profile_step_peak_bytes(
            model,
            model_config,
            num_tokens=sched.max_num_batched_tokens,
            num_tiles=sched.max_encoder_tiles_per_step,
            num_logit_rows=sched.max_num_seqs,
            context_len=max_model_len,
            block_size=config.cache.block_size,
            device=device,
            dtype=dtype,
        )
        or 0
    )
    encoder = encoder_cache_tokens(config, max_model_len) * model_config.text.hidden_size
    encoder *= dtype.itemsize
    log.info(
        "a worst-case step needs %.2f GiB of activations; the encoder cache up to %.2f GiB",
        step / 2**30,
        encoder / 2**30,
    )
    return step + encoder


def plan_kv_blocks(
    model_config: ModelConfig,
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    reserved_bytes: int = 0,
) -> int:
    """Number of KV blocks: from cache.kv_cache_memory_gb, else 2 GiB on CPU; on a GPU, what
    `gpu_kv_budget` leaves once the weights are loaded (`reserved_bytes`: `reserved_gpu_bytes`)."""
    cache = config.cache
    per_token = kv_bytes_per_token(model_config, dtype)
    detail = ""
    if cache.kv_cache_memory_gb is not None:
        budget = cache.kv_cache_memory_gb * 2**30
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        own = torch.cuda.memory_reserved(device)
        share = cache.gpu_memory_utilization
        budget = max(0, gpu_kv_budget(total, free, own, reserved_bytes, share))
        detail = (
            f" ({share:.0%} of {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), less "
            f"{own / 2**30:.1f} GiB of weights, {reserved_bytes / 2**30:.1f} GiB for a step's "
            f"activations and the encoder cache, {GPU_MARGIN_BYTES / 2**30:.0f} GiB margin)"
        )
    else:
        budget = 2 * 2**30
    blocks = int(budget // (per_token * cache.block_size))
    needed = math.ceil(max_model_len / cache.block_size) + 1
    if blocks < needed:
        raise ValueError(
            f"the KV cache holds {blocks * cache.block_size} tokens{detail}, less than one request "
            f"of max_model_len={max_model_len}; give more memory (--gpu-memory-utilization, "
            "--kv-cache-memory-gb) or a smaller --max-model-len"
        )
    return blocks
