"""The engine core: one step = schedule, run the model, then append tokens, detokenize and check stops.

    out = scheduler.schedule(); result = runner.execute(out); finish what stopped.

`EngineCore` is synchronous and single-threaded; `AsyncEngine` (async_engine.py) runs it in a
thread for the server, and `LLM` (llm.py) drives it directly for offline batches.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from plm_core.config import EngineConfig, ModelConfig
from plm_core.engine.block_manager import BlockManager
from plm_core.engine.detokenizer import IncrementalDetokenizer
from plm_core.engine.encoder_cache import EncoderCacheManager
from plm_core.engine.model_runner import ModelRunner, kv_bytes_per_token, profile_step_peak_bytes
from plm_core.engine.request import Request, RequestStatus
from plm_core.engine.sampler import Logprobs
from plm_core.engine.scheduler import Scheduler, SchedulerConfig
from plm_core.engine.structured_output import GrammarCompiler
from plm_core.inputs import ProcessedPrompt
from plm_core.model.perception_lm import build_model
from plm_core.sampling import SamplingParams
from plm_core.tokenizer import PLMTokenizer

log = logging.getLogger("plm_core.engine")


@dataclass
class RequestDelta:
    """What one request produced in one step (for streaming), and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[Logprobs | None]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string, when it stopped on one
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class EngineStats:
    """Counters and gauges for logs and /metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache: dict = field(default_factory=dict)
    encoder_cache: dict = field(default_factory=dict)
    steps: int = 0


GPU_MARGIN_BYTES = (
    1 << 30
)  # CUDA graphs, sampler copies, cuBLAS workspaces, allocator fragmentation


def gpu_kv_budget(total: int, free: int, own: int, reserved: int, utilization: float) -> int:
    """Bytes for the KV cache on a GPU: this engine's share, `utilization` of the card, less what it
    already holds (`own`: the weights), `reserved` (a step's activations, the encoder cache) and a
    fixed margin; never more than is free, so other processes on the card are respected."""
    return min(int(utilization * total) - own, free) - reserved - GPU_MARGIN_BYTES


def plan_kv_blocks(
    model_config: ModelConfig,
    engine: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    reserved_bytes: int = 0,
) -> int:
    """Number of KV blocks: from engine.kv_cache_memory_gb, else 2 GiB on CPU; on a GPU, what
    `gpu_kv_budget` leaves once the weights are loaded (`reserved_bytes`: see EngineCore)."""
    per_token = kv_bytes_per_token(model_config, dtype)
    detail = ""
    if engine.kv_cache_memory_gb is not None:
        budget = engine.kv_cache_memory_gb * 2**30
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        own = torch.cuda.memory_reserved(device)
        budget = max(
            0, gpu_kv_budget(total, free, own, reserved_bytes, engine.gpu_memory_utilization)
        )
        detail = (
            f" ({engine.gpu_memory_utilization:.0%} of {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), "
            f"less {own / 2**30:.1f} GiB of weights, {reserved_bytes / 2**30:.1f} GiB for a step's "
            f"activations and the encoder cache, {GPU_MARGIN_BYTES / 2**30:.0f} GiB margin)"
        )
    else:
        budget = 2 * 2**30
    blocks = int(budget // (per_token * engine.block_size))
    needed = math.ceil(max_model_len / engine.block_size) + 1
    if blocks < needed:
        raise ValueError(
            f"the KV cache holds {blocks * engine.block_size} tokens{detail}, less than one request of "
            f"max_model_len={max_model_len}; give more memory (--gpu-memory-utilization, "
            f"--kv-cache-memory-gb) or a smaller --max-model-len"
        )
    return blocks


class EngineCore:
    """Owns the scheduler, the model runner and each request's detokenizer."""

    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: PLMTokenizer,
        engine: EngineConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        model=None,
    ):
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        tiles_per_step = max(1, engine.max_encoder_tiles_per_step)
        encoder_tokens = engine.encoder_cache_tokens or max(65536, 2 * max_model_len)
        if model is None:  # weights first, so that the GPU KV budget sees them in use
            model = build_model(model_config, device=device, dtype=dtype)
        reserved = 0
        if device.type == "cuda" and engine.kv_cache_memory_gb is None:
            step = profile_step_peak_bytes(
                model,
                model_config,
                num_tokens=engine.max_num_batched_tokens,
                num_tiles=tiles_per_step,
                num_logit_rows=engine.max_num_seqs,
                context_len=max_model_len,
                block_size=engine.block_size,
                device=device,
                dtype=dtype,
            )
            encoder_cache = encoder_tokens * model_config.text.hidden_size * dtype.itemsize
            reserved = step + encoder_cache
            log.info(
                "a worst-case step needs %.2f GiB of activations; the encoder cache up to %.2f GiB",
                step / 2**30,
                encoder_cache / 2**30,
            )
        num_blocks = plan_kv_blocks(model_config, engine, device, dtype, max_model_len, reserved)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=engine.max_num_seqs,
                max_num_batched_tokens=engine.max_num_batched_tokens,
                max_encoder_tiles_per_step=tiles_per_step,
            ),
            BlockManager(
                num_blocks, engine.block_size, enable_prefix_caching=engine.enable_prefix_caching
            ),
            EncoderCacheManager(encoder_tokens),
        )
        self.runner = ModelRunner(
            model_config,
            device=device,
            dtype=dtype,
            num_blocks=num_blocks,
            block_size=engine.block_size,
            max_encoder_tiles_per_forward=tiles_per_step,
            model=model,
            cuda_graphs=engine.cuda_graphs,
            max_num_seqs=engine.max_num_seqs,
            max_model_len=max_model_len,
        )
        self.num_kv_blocks = num_blocks
        self.kv_capacity_tokens = num_blocks * engine.block_size
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self.grammars = GrammarCompiler(
            tokenizer, model_config.text.vocab_size, model_config.eos_token_ids
        )
        self.stats = EngineStats()
        log.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB); encoder cache %d tokens",
            num_blocks,
            engine.block_size,
            self.kv_capacity_tokens,
            num_blocks * engine.block_size * kv_bytes_per_token(model_config, dtype) / 2**30,
            encoder_tokens,
        )

    # -- requests -------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        *,
        prefix_parent: str | None = None,
    ) -> None:
        """Queues one sequence. The caller fans `n > 1` out into several ids; choices after the first
        name the first as `prefix_parent` and are admitted once its prompt KV is cached, sharing it."""
        n_prompt = len(prompt.prompt_token_ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n_prompt} tokens but the context allows {self.max_model_len}"
            )
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self._check_token_ids(prompt, params)
        eos = self.model_config.eos_token_ids
        request = Request(
            request_id,
            list(prompt.prompt_token_ids),
            params,
            media=prompt.media,
            eos_token_ids=eos,
            prefix_parent=prefix_parent,
        )
        if (
            params.structured_output is not None
        ):  # ValueError for a bad schema (the server checked it already)
            request.grammar = self.grammars.grammar(params.structured_output)
        self._detok[request_id] = IncrementalDetokenizer(
            self.tokenizer._tok,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop or [],
            include_stop_str_in_output=params.include_stop_str_in_output,
            prompt_token_ids=request.prompt_token_ids,
            min_tokens=params.min_tokens,
        )
        self.scheduler.add_request(request)
        self.stats.prompt_tokens += n_prompt

    def _check_token_ids(self, prompt: ProcessedPrompt, params: SamplingParams) -> None:
        """ValueError for token ids the model has no row for (they would fail, or be ignored, in a step)."""
        vocab = self.model_config.text.vocab_size
        ids = prompt.prompt_token_ids
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab})")
        outside = sorted(t for t in params.logit_bias or () if t >= vocab)
        if outside:
            raise ValueError(
                f"logit_bias has token ids outside the vocabulary [0, {vocab}): {outside[:8]}"
            )

    def abort(self, request_id: str) -> bool:
        """Drops a request and frees its KV blocks and encoder references now."""
        request = self.scheduler.abort(request_id)
        self._detok.pop(request_id, None)
        self._refresh_stats()
        return request is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- one step -------------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched)
        self.scheduler.update_after_step(sched)
        deltas = []
        for request in sched.requests:
            token = result.token_ids.get(request.request_id)
            if token is None or request.is_finished:
                continue
            deltas.append(self._append(request, token, result.logprobs.get(request.request_id)))
        self._update_stats()
        return deltas

    def _append(self, request: Request, token: int, logprobs: Logprobs | None) -> RequestDelta:
        request.output_token_ids.append(token)
        self.stats.generation_tokens += 1
        params = request.sampling_params
        detok = self._detok[request.request_id]
        n_out = len(request.output_token_ids)
        status, text, stop_token = None, "", None
        grammar_done = False
        if request.grammar is not None:
            if not request.grammar.accept(
                token
            ):  # only the stop token of a grammar with no way forward
                log.warning(
                    "request %s: its structured-output grammar allows no token here; stopping it at "
                    "token %d",
                    request.request_id,
                    token,
                )
                grammar_done = True
            # complete and closed with a stop token; with ignore_eos or min_tokens the stop token does
            # not end the request by itself, but nothing can follow it
            grammar_done = grammar_done or request.grammar.is_terminated
        # an eos or stop token's text is not part of the output, unless include_stop_str_in_output (vLLM's rule)
        if n_out >= params.min_tokens and not params.ignore_eos and token in request.eos_token_ids:
            status, stop_token = RequestStatus.FINISHED_STOPPED, token
        elif n_out >= params.min_tokens and token in params.stop_token_ids:
            status, request.stop_reason, stop_token = RequestStatus.FINISHED_STOPPED, token, token
        else:
            text = detok.add(token)
            if detok.stop_reason is not None:
                status, request.stop_reason = RequestStatus.FINISHED_STOPPED, detok.stop_reason
            elif grammar_done:
                status = RequestStatus.FINISHED_STOPPED
            elif n_out >= params.max_tokens or request.num_tokens >= self.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
        delta = RequestDelta(
            request.request_id,
            [token],
            text,
            [logprobs],
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=n_out,
        )
        if status is not None:
            if detok.stop_reason is None:
                delta.new_text += detok.flush(
                    stop_token if params.include_stop_str_in_output else None
                )
            self.scheduler.finish(request, status)
            self._detok.pop(request.request_id, None)
            delta.finished, delta.finish_reason, delta.stop_reason = (
                True,
                status.value,
                request.stop_reason,
            )
        return delta

    def _update_stats(self) -> None:
        self.stats.steps += 1
        self._refresh_stats()

    def _refresh_stats(self) -> None:
        s = self.stats
        s.num_running, s.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.kv_usage = self.scheduler.blocks.usage
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache = self.scheduler.blocks.stats()
        s.encoder_cache = self.scheduler.encoder_cache.stats()

    def run_until_done(self, *, timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.has_unfinished():
            self.step()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("engine did not finish in time")
