"""The offline Python API, vLLM-style: `LLM(model).chat(conversations, SamplingParams(...))`.

For now requests run one at a time: preprocess, encode media, prefill the prompt into a KV cache,
then decode token by token until an eos/stop token or max_tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import count

import torch

from plm_core.checkpoint import resolve_checkpoint
from plm_core.config import EngineConfig, load_model_config
from plm_core.inputs import ProcessedPrompt
from plm_core.model.llama import KVCache
from plm_core.model.perception_lm import PerceptionLM, build_model
from plm_core.processor import MediaLimits, MediaOptions, PLMProcessor, PromptError
from plm_core.sampling import Sampler, SamplingParams
from plm_core.tokenizer import PLMTokenizer

log = logging.getLogger("plm_core")


@dataclass
class CompletionOutput:
    """One generated continuation."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or stop token) or "length" (max_tokens or context full)


@dataclass
class RequestOutput:
    """The result of one conversation: its prompt and its completion(s)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
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


def pick_device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """cuda when available (bf16) else cpu (fp32, since bf16 matmuls are slow on CPUs), unless asked."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        dt = names[dtype]
    return dev, dt


class LLM:
    """Loads a PerceptionLM checkpoint (local directory or hub id) and generates chat completions."""

    def __init__(self, model: str = EngineConfig.model, *, revision: str | None = None, device: str = "auto",
                 dtype: str = "auto", max_model_len: int | None = None, max_num_tiles: int | None = None,
                 default_num_frames: int = 32, max_num_frames: int = 64, download_dir: str | None = None,
                 limits: MediaLimits | None = None):
        self.engine_config = EngineConfig(model=model, revision=revision, device=device, dtype=dtype,
                                          max_model_len=max_model_len, max_num_tiles=max_num_tiles,
                                          default_num_frames=default_num_frames, max_num_frames=max_num_frames,
                                          download_dir=download_dir)
        t0 = time.perf_counter()
        path = resolve_checkpoint(model, revision=revision, cache_dir=download_dir)
        self.model_config = load_model_config(path)
        self.device, self.dtype = pick_device_and_dtype(device, dtype)
        self.max_model_len = min(max_model_len or self.model_config.max_model_len, self.model_config.max_model_len)
        self.tokenizer = PLMTokenizer(path, self.model_config.chat_template,
                                      bos_token_id=self.model_config.bos_token_id,
                                      eos_token_ids=self.model_config.eos_token_ids)
        limits = limits or MediaLimits(max_video_frames=max_num_frames)
        self.processor = PLMProcessor(self.model_config, self.tokenizer, max_num_tiles=max_num_tiles,
                                      default_num_frames=default_num_frames, limits=limits)
        self.model: PerceptionLM = build_model(self.model_config, device=self.device, dtype=self.dtype)
        self._ids = count()
        log.info("loaded %s on %s (%s) in %.1fs", path, self.device, self.dtype, time.perf_counter() - t0)

    # -- public API ---------------------------------------------------------------------------------
    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             media_options: MediaOptions | None = None) -> list[RequestOutput]:
        """Generates for one conversation (a list of messages) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(conversations):
                raise ValueError("give one SamplingParams, or one per conversation")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(conversations)
        return [self._generate(conv, p, media_options) for conv, p in zip(conversations, params)]

    def process(self, messages: list[dict], media_options: MediaOptions | None = None) -> ProcessedPrompt:
        """The prompt token ids and preprocessed media of one conversation (no generation)."""
        return self.processor.process(messages, media_options, max_prompt_len=self.max_model_len - 1)

    # -- generation ---------------------------------------------------------------------------------
    def _generate(self, messages, params: SamplingParams, media_options) -> RequestOutput:
        t0 = time.perf_counter()
        prompt = self.process(messages, media_options)
        return self.generate_prompt(prompt, params, t_start=t0)

    @torch.inference_mode()
    def generate_prompt(self, prompt: ProcessedPrompt, params: SamplingParams, *, t_start: float | None = None
                        ) -> RequestOutput:
        t0 = t_start if t_start is not None else time.perf_counter()
        request_id = f"req-{next(self._ids)}"
        n_prompt = len(prompt.prompt_token_ids)
        if n_prompt >= self.max_model_len:
            raise PromptError(f"the prompt has {n_prompt} tokens but the context allows {self.max_model_len}")
        max_new = min(params.max_tokens, self.max_model_len - n_prompt)

        embeds = self._prompt_embeddings(prompt)  # [1, S, H]
        cache = KVCache.allocate(self.model_config.text, n_prompt + max_new, dtype=self.dtype, device=self.device)
        positions = torch.arange(n_prompt, device=self.device)[None]
        logits = self.model(embeds, positions, cache)[0]
        t_first = time.perf_counter()

        sampler = Sampler(params, self.device)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.model_config.eos_token_ids)
        out: list[int] = []
        finish = "length"
        while True:
            token = sampler(logits)
            out.append(token)
            if token in stop_ids:
                finish = "stop"
                break
            if len(out) >= max_new:
                break
            step = torch.tensor([[token]], device=self.device)
            pos = torch.tensor([[n_prompt + len(out) - 1]], device=self.device)
            logits = self.model(self.model.embed(step), pos, cache)[0]
        text_ids = out[:-1] if finish == "stop" else out
        text = self.tokenizer.decode(text_ids)
        t_end = time.perf_counter()
        metrics = {"ttft_s": t_first - t0, "e2e_s": t_end - t0, "prompt_tokens": n_prompt, "completion_tokens": len(out)}
        return RequestOutput(request_id, prompt.prompt_token_ids, [CompletionOutput(0, text, out, finish)], metrics)

    def _prompt_embeddings(self, prompt: ProcessedPrompt) -> torch.Tensor:
        ids = torch.tensor(prompt.prompt_token_ids, device=self.device)
        embeds = self.model.embed(ids).clone()  # [S, H]
        for item in prompt.media:
            pixels = item.pixel_values.to(self.device, self.dtype)
            feats = self.model.encode_media(pixels).reshape(-1, embeds.shape[-1])  # [tiles * tok, H]
            if feats.shape[0] != item.num_tokens:
                raise RuntimeError(f"{item.kind} produced {feats.shape[0]} features for {item.num_tokens} tokens")
            embeds[item.offset:item.offset + item.num_tokens] = feats.to(embeds.dtype)
        return embeds[None]
