"""The engine core: one step = schedule, run the model, then append tokens and check stops.

    out = scheduler.schedule(); result = runner.execute(out); finish what stopped.

A request with `n` choices is added once: its choices are separate sequences that share one
prefill (choices 1..n-1 fork the first choice's prompt KV). Deltas carry the request's id and the
choice's index. `EngineCore` is synchronous and single-threaded; `AsyncEngine` (async_engine.py)
runs it in a thread for the server, and `LLM` (llm.py) drives it directly for offline batches.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from plm_core.config import EngineConfig
from plm_core.engine.block_manager import BlockManager
from plm_core.engine.cost_model import StepCostModel
from plm_core.engine.encoder_cache import EncoderCacheManager
from plm_core.engine.memory import encoder_cache_tokens, plan_kv_blocks, reserved_gpu_bytes
from plm_core.engine.model_runner import ModelRunner, kv_bytes_per_token
from plm_core.engine.output import OutputProcessor
from plm_core.engine.request import Request
from plm_core.engine.sampler import Logprobs
from plm_core.engine.scheduler import Scheduler, StepBudget
from plm_core.engine.structured_output import GrammarCompiler
from plm_core.errors import ContextLengthError, InputError, PromptError
from plm_core.inputs import ProcessedPrompt
from plm_core.model.perception_lm import PerceptionLM, build_model
from plm_core.model_config import ModelConfig
from plm_core.sampling import SamplingParams, StructuredOutput
from plm_core.tokenizer import PLMTokenizer

log = logging.getLogger("plm_core.engine")

# `step_latency_target auto`: a step that carries decodes may take this many times a plain decode
# step. A prompt then prefills at (1 - 1/factor) of full speed while streams run: with 2.5, about
# 1.7x its time alone, and no inter-token gap longer than 2.5 decode steps.
AUTO_STEP_FACTOR = 2.5


@dataclass
class RequestDelta:
    """What one choice of a request produced in one step (for streaming), and whether it is done."""

    request_id: str
    index: int  # the choice (0..n-1)
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[Logprobs | None]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string, when it stopped on one
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class EngineStats:
    """Counters and gauges for logs and /metrics (a prompt counts once, whatever its n)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache: dict[str, Any] = field(default_factory=dict)
    encoder_cache: dict[str, Any] = field(default_factory=dict)
    prefix_sharing: dict[str, Any] = field(default_factory=dict)
    steps: int = 0


class EngineCore:
    """Owns the scheduler, the model runner and the output processor."""

    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: PLMTokenizer,
        config: EngineConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        model: PerceptionLM | None = None,
    ):
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        if model is None:  # weights first, so that the GPU KV budget sees them in use
            model = build_model(model_config, device=device, dtype=dtype)
        reserved = 0
        if device.type == "cuda" and config.cache.kv_cache_memory_gb is None:
            reserved = reserved_gpu_bytes(model, model_config, config, device, dtype, max_model_len)
        num_blocks = plan_kv_blocks(model_config, config, device, dtype, max_model_len, reserved)
        sched, cache = config.scheduler, config.cache
        encoder_tokens = encoder_cache_tokens(config, max_model_len)
        self.scheduler = Scheduler(
            sched,
            BlockManager(
                num_blocks, cache.block_size, enable_prefix_caching=cache.enable_prefix_caching
            ),
            EncoderCacheManager(encoder_tokens),
        )
        self.runner = ModelRunner(
            model_config,
            device=device,
            dtype=dtype,
            num_blocks=num_blocks,
            block_size=cache.block_size,
            max_encoder_tiles_per_forward=sched.max_encoder_tiles_per_step,
            model=model,
            cuda_graphs=config.cuda_graphs,
            max_num_seqs=sched.max_num_seqs,
            max_model_len=max_model_len,
        )
        self.kv_capacity_tokens = num_blocks * cache.block_size
        self.output = OutputProcessor(tokenizer, max_model_len)
        self.grammars = GrammarCompiler(
            tokenizer, model_config.text.vocab_size, model_config.eos_token_ids
        )
        self.stats = EngineStats()
        self.costs = StepCostModel(model_config.processor.tokens_per_tile)
        self._latency_target = sched.step_latency_target
        self._choices: dict[str, list[str]] = {}  # request id -> its unfinished choices' ids
        self._choice_of: dict[str, tuple[str, int]] = {}  # choice id -> (request id, index)
        kv_gib = self.kv_capacity_tokens * kv_bytes_per_token(model_config, dtype) / 2**30
        log.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB); encoder cache %d tokens",
            num_blocks,
            cache.block_size,
            self.kv_capacity_tokens,
            kv_gib,
            encoder_tokens,
        )

    # -- requests ----------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        *,
        priority: int = 0,
    ) -> None:
        """Queues a request's `params.n` choices. Choice 0 has `request_id` as its sequence id,
        choice i > 0 `f"{request_id}#{i}"`; choices after the first fork choice 0's prompt KV.

        Raises InputError (a client's fault: too long, token ids outside the vocabulary, a bad
        constraint) or ValueError for a request id already in flight (the caller's bug)."""
        if request_id in self._choices:
            raise ValueError(f"request id {request_id!r} is already in flight")
        self._check_prompt(prompt, params)
        constraint = params.structured_output
        if constraint is not None:
            self._check_constraint(constraint)
        ids = [request_id] + [f"{request_id}#{i}" for i in range(1, params.n)]
        for index, choice_id in enumerate(ids):
            request = Request(
                choice_id,
                list(prompt.prompt_token_ids),
                params.for_choice(index) if params.n > 1 else params,
                media=prompt.media,
                eos_token_ids=self.model_config.eos_token_ids,
                prefix_parent=request_id if index else None,
                priority=priority,
            )
            if constraint is not None:
                request.grammar = self.grammars.grammar(constraint)
            self.output.add(request)
            self.scheduler.add_request(request)
            self._choice_of[choice_id] = (request_id, index)
        self._choices[request_id] = ids
        self.stats.prompt_tokens += len(prompt.prompt_token_ids)

    def _check_prompt(self, prompt: ProcessedPrompt, params: SamplingParams) -> None:
        """InputError for a prompt that does not fit, or token ids the model has no row for (they
        would fail, or be ignored, in a step)."""
        ids = prompt.prompt_token_ids
        if len(ids) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the context allows {self.max_model_len}",
                param="messages",
            )
        vocab = self.model_config.text.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise PromptError(
                f"the prompt has token ids outside the vocabulary [0, {vocab})", param="messages"
            )
        outside = sorted(t for t in params.logit_bias or () if t >= vocab)
        if outside:
            raise PromptError(
                f"logit_bias has token ids outside the vocabulary [0, {vocab}): {outside[:8]}",
                param="logit_bias",
            )

    def _check_constraint(self, constraint: StructuredOutput) -> None:
        try:  # cached: the server compiled it already
            self.grammars.compile(constraint)
        except ValueError as e:
            raise InputError(str(e)) from None

    def abort(self, request_id: str) -> bool:
        """Drops a request's unfinished choices and frees their KV blocks and encoder references."""
        found = False
        for choice_id in self._choices.pop(request_id, []):
            found = self.scheduler.abort(choice_id) is not None or found
            self.output.remove(choice_id)
            self._choice_of.pop(choice_id, None)
        self._refresh_stats()
        return found

    def is_media_resident(self, cache_key: str) -> bool:
        """Whether the encoder output of a media item is cached (so its pixels will not be needed
        unless it is evicted first). Safe to call from other threads: one dict lookup."""
        return self.scheduler.encoder_cache.has(cache_key)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        started = time.perf_counter()
        sched = self.scheduler.schedule(self._step_budget())
        result = self.runner.execute(sched)
        self.scheduler.update_after_step(sched)
        deltas = []
        for request in sched.requests:
            token = result.token_ids.get(request.request_id)
            if token is None or request.is_finished:
                continue
            deltas.append(self._append(request, token, result.logprobs.get(request.request_id)))
        elapsed = time.perf_counter() - started
        # priced as a decode: every row that samples (a decode, or a prompt's last chunk, whose
        # last token goes through the LM head too); the other tokens as prefill tokens
        decodes = sum(sched.sample)
        prefill = sched.total_num_scheduled_tokens - decodes
        self.costs.observe(decodes, prefill, sched.total_num_encoder_tiles, elapsed)
        self.stats.steps += 1
        self._refresh_stats()
        return deltas

    def _step_budget(self) -> StepBudget | None:
        """The time budget of the next step while sequences decode (see SchedulerConfig's
        step_latency_target): `auto` lets a step take AUTO_STEP_FACTOR x a plain decode step of
        the running batch, as measured; None when off, not yet measured or nothing decodes."""
        costs = self.costs.costs()
        if self._latency_target == "off" or costs is None:
            return None
        decodes = sum(
            1 for r in self.scheduler.running if r.num_tokens - r.num_computed_tokens == 1
        )
        if not decodes:
            return None
        decode_s = costs.step_s(decodes)
        if self._latency_target == "auto":
            target_s = AUTO_STEP_FACTOR * decode_s
        else:
            target_s = max(float(self._latency_target) / 1000, decode_s)
        return StepBudget(
            target_s, costs.base_s, costs.per_token_s, costs.per_tile_s, costs.per_decode_s
        )

    def _append(self, request: Request, token: int, logprobs: Logprobs | None) -> RequestDelta:
        text, status = self.output.append(request, token)
        self.stats.generation_tokens += 1
        request_id, index = self._choice_of[request.request_id]
        delta = RequestDelta(
            request_id,
            index,
            [token],
            text,
            [logprobs],
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
        )
        if status is not None:
            self.scheduler.finish(request, status)
            self._close_choice(request.request_id)
            delta.finished, delta.finish_reason = True, status.value
            delta.stop_reason = request.stop_reason
        return delta

    def _close_choice(self, choice_id: str) -> None:
        request_id, _ = self._choice_of.pop(choice_id)
        open_ids = self._choices[request_id]
        open_ids.remove(choice_id)
        if not open_ids:
            del self._choices[request_id]

    def _refresh_stats(self) -> None:
        s = self.stats
        s.num_running, s.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.kv_usage = self.scheduler.blocks.usage
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache = self.scheduler.blocks.stats()
        s.encoder_cache = self.scheduler.encoder_cache.stats()
        s.prefix_sharing = self.scheduler.sharing.stats()

    def snapshot_stats(self) -> EngineStats:
        """A copy of the stats, safe to read from another thread."""
        return dataclasses.replace(self.stats)
