"""The offline Python API, vLLM-style: `LLM(model).chat(conversations, SamplingParams(...))`.

All conversations of one call are preprocessed, queued together and run by the same
continuous-batching engine the server uses; outputs come back in input order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch

from plm_core.config import DEFAULT_MODEL, EngineConfig
from plm_core.engine.core import EngineCore, RequestDelta
from plm_core.engine.sampler import Logprobs
from plm_core.inputs import ProcessedPrompt
from plm_core.processor import MediaOptions, PLMProcessor
from plm_core.runtime import Runtime, RuntimeView, load_runtime
from plm_core.sampling import SamplingParams


@dataclass
class CompletionOutput:
    """One generated continuation."""

    index: int
    text: str
    token_ids: list[int]
    # "stop" (eos, stop token or stop string) or "length" (max_tokens or context full)
    finish_reason: str
    stop_reason: int | str | None = None
    logprobs: list[Logprobs | None] | None = None


@dataclass
class RequestOutput:
    """The result of one conversation: its prompt and its completion(s)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


class LLM(RuntimeView):
    """Loads a PerceptionLM checkpoint (local directory or hub id) and generates chat completions.

    Keyword options are the `EngineConfig` tree's fields by name (device, dtype, max_model_len,
    max_num_seqs, block_size, enable_prefix_caching, max_num_tiles, ...), or pass `config=`.
    Unlike the server, the offline API reads local media paths anywhere unless
    `allowed_local_media_path` says otherwise.
    """

    def __init__(
        self, model: str = DEFAULT_MODEL, *, config: EngineConfig | None = None, **options: Any
    ):
        if config is None:
            options.setdefault("allowed_local_media_path", "/")
            config = EngineConfig.from_flat(model=model, **options)
        elif options or model != DEFAULT_MODEL:
            raise TypeError("give either config= or the model and options, not both")
        self.runtime: Runtime = load_runtime(config)
        self._ids = count()

    # -- what was loaded ---------------------------------------------------------------------------
    @property
    def engine_config(self) -> EngineConfig:
        return self.runtime.config

    @property
    def engine(self) -> EngineCore:
        return self.runtime.core

    @property
    def processor(self) -> PLMProcessor:
        return self.runtime.processor

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runtime.dtype

    @property
    def model(self) -> torch.nn.Module:
        return self.runtime.core.runner.model

    # -- public API --------------------------------------------------------------------------------
    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        media_options: MediaOptions | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Generates for one conversation (a list of messages) or a list of conversations, batched.

        `continue_final_message=True, add_generation_prompt=False` continues the final assistant
        message."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(conversations):
                raise ValueError("give one SamplingParams, or one per conversation")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(conversations)
        prompts = [
            self.process(
                conv,  # type: ignore[arg-type]
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
        return self.runtime.process(
            messages,
            media_options,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )

    def generate_prompts(
        self, prompts: list[ProcessedPrompt], params: list[SamplingParams]
    ) -> list[RequestOutput]:
        """Runs already-processed prompts through the engine together; returns outputs in order."""
        t0 = time.perf_counter()
        core = self.engine
        outputs: dict[str, RequestOutput] = {}
        try:
            for prompt, p in zip(prompts, params):
                rid = f"offline-{next(self._ids)}"
                outputs[rid] = RequestOutput(rid, prompt.prompt_token_ids, _choices(p))
                core.add_request(rid, prompt, p)
            while core.has_unfinished():
                for delta in core.step():
                    _merge(outputs[delta.request_id], delta, time.perf_counter() - t0)
        except BaseException:  # a rejected request, an error or Ctrl-C: leave none queued
            for rid in outputs:
                core.abort(rid)
            raise
        return list(outputs.values())


def _choices(params: SamplingParams) -> list[CompletionOutput]:
    lps = params.logprobs is not None
    return [CompletionOutput(i, "", [], "", logprobs=[] if lps else None) for i in range(params.n)]


def _merge(out: RequestOutput, delta: RequestDelta, elapsed_s: float) -> None:
    """Adds one delta to its choice, and keeps the request's timing figures."""
    c = out.outputs[delta.index]
    c.text += delta.new_text
    c.token_ids.extend(delta.new_token_ids)
    if c.logprobs is not None:
        c.logprobs.extend(delta.new_logprobs)
    out.num_cached_tokens = max(out.num_cached_tokens, delta.num_cached_tokens)
    m = out.metrics
    m.setdefault("ttft_s", elapsed_s)
    m["prompt_tokens"] = len(out.prompt_token_ids)
    m["completion_tokens"] = sum(len(c.token_ids) for c in out.outputs)
    if delta.finished:
        c.finish_reason, c.stop_reason = delta.finish_reason or "stop", delta.stop_reason
        m["e2e_s"] = elapsed_s
