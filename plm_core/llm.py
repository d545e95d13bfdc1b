"""The offline Python API, vLLM-style: `LLM(model).chat(conversations, SamplingParams(...))`.

All conversations of one call are preprocessed, queued together and run by the same
continuous-batching engine the server uses; outputs come back in input order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from itertools import count

import torch

from plm_core.checkpoint import resolve_checkpoint
from plm_core.config import EngineConfig, load_model_config
from plm_core.engine.core import EngineCore
from plm_core.engine.sampler import Logprobs
from plm_core.inputs import ProcessedPrompt
from plm_core.processor import MediaLimits, MediaOptions, PLMProcessor
from plm_core.sampling import SEED_MAX, SamplingParams
from plm_core.tokenizer import PLMTokenizer

log = logging.getLogger("plm_core")


@dataclass
class CompletionOutput:
    """One generated continuation."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: (
        str  # "stop" (eos, stop token or stop string) or "length" (max_tokens or context full)
    )
    stop_reason: int | str | None = None
    logprobs: list[Logprobs] | None = None


@dataclass
class RequestOutput:
    """The result of one conversation: its prompt and its completion(s)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


def pick_device_and_dtype(
    device: str = "auto", dtype: str = "auto"
) -> tuple[torch.device, torch.dtype]:
    """cuda when available (bf16) else cpu (fp32, since bf16 matmuls are slow on CPUs), unless asked."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        names = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        dt = names[dtype]
    return dev, dt


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice `index` of an n-choice request: n=1 and, with a seed, seed + index.

    seed + index past SEED_MAX wraps around by 2**64 (to 0, 1, ...): torch reads seeds modulo 2**64,
    so that is the generator seed + index stands for, and the seed stays in the range torch accepts.
    """
    seed = None
    if params.seed is not None:
        seed = params.seed + index
        if seed > SEED_MAX:
            seed -= 2**64
    return replace(params, n=1, seed=seed)


class LLM:
    """Loads a PerceptionLM checkpoint (local directory or hub id) and generates chat completions.

    Keyword arguments are `EngineConfig` fields (device, dtype, max_model_len, max_num_tiles,
    kv_cache_memory_gb, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, ...).
    """

    def __init__(
        self, model: str = EngineConfig.model, *, limits: MediaLimits | None = None, **engine_kwargs
    ):
        self.engine_config = EngineConfig(model=model, **engine_kwargs)
        ec = self.engine_config
        t0 = time.perf_counter()
        path = resolve_checkpoint(model, revision=ec.revision, cache_dir=ec.download_dir)
        self.model_config = load_model_config(path)
        self.device, self.dtype = pick_device_and_dtype(ec.device, ec.dtype)
        self.max_model_len = min(
            ec.max_model_len or self.model_config.max_model_len, self.model_config.max_model_len
        )
        self.tokenizer = PLMTokenizer(
            path,
            self.model_config.chat_template,
            bos_token_id=self.model_config.bos_token_id,
            eos_token_ids=self.model_config.eos_token_ids,
        )
        limits = limits or MediaLimits(max_video_frames=ec.max_num_frames)
        self.processor = PLMProcessor(
            self.model_config,
            self.tokenizer,
            max_num_tiles=ec.max_num_tiles,
            default_num_frames=ec.default_num_frames,
            limits=limits,
        )
        self.engine = EngineCore(
            self.model_config,
            self.tokenizer,
            ec,
            device=self.device,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
        )
        self._ids = count()
        log.info(
            "loaded %s on %s (%s) in %.1fs", path, self.device, self.dtype, time.perf_counter() - t0
        )

    @property
    def model(self):
        return self.engine.runner.model

    # -- public API ---------------------------------------------------------------------------------
    def chat(
        self,
        messages,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        media_options: MediaOptions | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Generates for one conversation (a list of messages) or a list of conversations, batched.

        `continue_final_message=True, add_generation_prompt=False` continues the final assistant message."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(conversations):
                raise ValueError("give one SamplingParams, or one per conversation")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(conversations)
        prompts = [
            self.process(
                conv,
                media_options,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
            for conv in conversations
        ]
        return self.generate_prompts(prompts, params)

    def process(
        self,
        messages: list[dict],
        media_options: MediaOptions | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> ProcessedPrompt:
        """The prompt token ids and preprocessed media of one conversation (no generation)."""
        return self.processor.process(
            messages,
            media_options,
            max_prompt_len=self.max_model_len - 1,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )

    def generate_prompts(
        self, prompts: list[ProcessedPrompt], params: list[SamplingParams]
    ) -> list[RequestOutput]:
        """Runs already-processed prompts through the engine together; returns outputs in order."""
        t0 = time.perf_counter()
        results: list[RequestOutput] = []
        by_id: dict[str, tuple[RequestOutput, int]] = {}
        first_token: dict[str, float] = {}
        try:
            for prompt, p in zip(prompts, params):
                rid = f"offline-{next(self._ids)}"
                out = RequestOutput(rid, prompt.prompt_token_ids, [])
                results.append(out)
                for i in range(p.n):
                    lps = [] if p.logprobs is not None else None
                    out.outputs.append(CompletionOutput(i, "", [], "", logprobs=lps))
                    child = f"{rid}#{i}"
                    self.engine.add_request(
                        child, prompt, choice_params(p, i), prefix_parent=f"{rid}#0" if i else None
                    )
                    by_id[child] = (out, i)
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    out, i = by_id[delta.request_id]
                    first_token.setdefault(out.request_id, time.perf_counter() - t0)
                    c = out.outputs[i]
                    c.text += delta.new_text
                    c.token_ids.extend(delta.new_token_ids)
                    if c.logprobs is not None:
                        c.logprobs.extend(delta.new_logprobs)
                    out.num_cached_tokens = max(out.num_cached_tokens, delta.num_cached_tokens)
                    if delta.finished:
                        c.finish_reason, c.stop_reason = delta.finish_reason, delta.stop_reason
                        out.metrics["e2e_s"] = time.perf_counter() - t0
        except (
            BaseException
        ):  # a rejected request (e.g. a prompt too long), an error or Ctrl-C: leave none queued
            for child in by_id:
                self.engine.abort(child)
            raise
        for out in results:
            out.metrics.update(
                prompt_tokens=len(out.prompt_token_ids),
                ttft_s=first_token.get(out.request_id),
                completion_tokens=sum(len(c.token_ids) for c in out.outputs),
            )
        return results
