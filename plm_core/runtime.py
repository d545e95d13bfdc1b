"""The loaded engine: `load_runtime(config)` resolves the checkpoint and builds the model facts,
tokenizer, processor and engine core that `LLM` (offline) and `AsyncEngine` (server) both wrap."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from plm_core.checkpoint import resolve_checkpoint
from plm_core.config import EngineConfig
from plm_core.engine.core import EngineCore
from plm_core.inputs import ProcessedPrompt
from plm_core.model_config import ModelConfig, load_model_config
from plm_core.processor import MediaOptions, PLMProcessor
from plm_core.tokenizer import PLMTokenizer

log = logging.getLogger("plm_core")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device_and_dtype(
    device: str = "auto", dtype: str = "auto"
) -> tuple[torch.device, torch.dtype]:
    """cuda when available (bf16) else cpu (fp32: bf16 matmuls are slow on CPUs), unless asked."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return dev, _DTYPES[dtype]


@dataclass
class Runtime:
    """Everything one loaded model needs to turn conversations into tokens."""

    config: EngineConfig
    model_config: ModelConfig
    tokenizer: PLMTokenizer
    processor: PLMProcessor
    core: EngineCore
    device: torch.device
    dtype: torch.dtype

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def process(
        self,
        messages: list[dict],
        options: MediaOptions | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> ProcessedPrompt:
        """One conversation's prompt token ids and preprocessed media (blocking: decodes media).
        A repeated image or video the engine still holds the encoder output of is not decoded
        again: it gets no pixels, only a way to make them (see PLMProcessor.process)."""
        return self.processor.process(
            messages,
            options,
            max_prompt_len=self.max_model_len - 1,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            is_resident=self.core.is_media_resident,
        )


class RuntimeView:
    """What a front over a Runtime (`LLM`, `AsyncEngine`) shows of the loaded model."""

    runtime: Runtime

    @property
    def model_config(self) -> ModelConfig:
        return self.runtime.model_config

    @property
    def tokenizer(self) -> PLMTokenizer:
        return self.runtime.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.runtime.max_model_len


def load_runtime(config: EngineConfig) -> Runtime:
    """Resolves `config.model` (a local directory or a hub id), loads it and starts nothing else."""
    t0 = time.perf_counter()
    path = resolve_checkpoint(config.model, revision=config.revision, cache_dir=config.download_dir)
    model_config = load_model_config(path)
    device, dtype = pick_device_and_dtype(config.device, config.dtype)
    max_model_len = min(
        config.max_model_len or model_config.max_model_len, model_config.max_model_len
    )
    tokenizer = PLMTokenizer.for_model(model_config)
    processor = PLMProcessor(
        model_config,
        tokenizer,
        config.media,
        raw_cache_entries=config.media.raw_media_cache_entries,
    )
    core = EngineCore(
        model_config, tokenizer, config, device=device, dtype=dtype, max_model_len=max_model_len
    )
    log.info("loaded %s on %s (%s) in %.1fs", path, device, dtype, time.perf_counter() - t0)
    return Runtime(config, model_config, tokenizer, processor, core, device, dtype)
