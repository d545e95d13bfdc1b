"""The scheduler: continuous batching with one token budget per step, chunked prefill, preemption.

There is no prefill phase and decode phase: every step each request moves `num_computed_tokens`
towards `num_tokens` within a shared token budget. Running requests go first (decodes cost one
token, so streams keep flowing while a long image prompt prefills chunk by chunk), then waiting
requests are admitted in arrival order while KV blocks, sequence slots and encoder space allow.
When blocks run out, the latest-arrived running request is preempted: its blocks are freed and it
is recomputed later from its prompt and outputs, which changes none of its tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from plm_core.engine.block_manager import BlockManager
from plm_core.engine.encoder_cache import EncoderCacheManager
from plm_core.engine.request import Request, RequestStatus
from plm_core.inputs import MediaItem


@dataclass
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 64  # running sequences at most
    max_num_batched_tokens: int = 2048  # tokens (prefill chunks + decodes) per step
    max_encoder_tiles_per_step: int = 64  # vision-tower tiles/frames encoded per step (at least one item's)
    enable_chunked_prefill: bool = True


@dataclass
class SchedulerOutput:
    """Everything the model runner does in one step; built by `Scheduler.schedule`."""

    # Requests computing tokens this step, in batch order.
    requests: list[Request] = field(default_factory=list)
    # First position each request computes this step (its num_computed_tokens before the step).
    start_positions: list[int] = field(default_factory=list)
    # How many tokens each request computes this step (same order as `requests`).
    num_scheduled_tokens: list[int] = field(default_factory=list)
    # Requests that reach their last token this step: the runner samples one token for each.
    sample: list[bool] = field(default_factory=list)
    # Media items whose vision-encoder outputs the runner computes this step (in one batched forward).
    encoder_inputs: list[MediaItem] = field(default_factory=list)
    # Encoder-cache entries (cache keys) the runner drops before this step.
    free_encoder_keys: list[str] = field(default_factory=list)
    # Requests preempted while building this step: KV freed, to be recomputed later.
    preempted: list[Request] = field(default_factory=list)
    # Requests finished or aborted since the previous step: the runner drops their per-request state.
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    """Owns the waiting and running queues, the block manager and the encoder-cache bookkeeping."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, encoder_cache: EncoderCacheManager):
        self.config = config
        self.blocks = block_manager
        self.encoder_cache = encoder_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self._evicted_encoder_keys: list[str] = []
        self.num_preemptions = 0

    # -- queue ----------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Frees everything the request holds at once; returns it, or None if unknown or done."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.blocks.free(request)
        self._release_encoder(request)
        self.requests.pop(request.request_id, None)
        self._finished_ids.append(request.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- scheduling -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        encoder_budget = [self.config.max_encoder_tiles_per_step]
        scheduled: set[str] = set()

        # 1. Running requests, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk_size(request, budget)
            n = self._fit_encoder(request, n, encoder_budget, out)
            if n == 0:
                i += 1
                continue
            while not self.blocks.allocate_slots(request, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    n = 0
                    break
            if n == 0 or request.status is not RequestStatus.RUNNING:
                break
            self._add(out, request, n)
            scheduled.add(request.request_id)
            budget -= n
            i += 1

        # 2. Waiting requests in arrival order, while there is room.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            request = self.waiting[0]
            computed_blocks, num_cached = self.blocks.get_computed_blocks(request)
            request.num_computed_tokens = num_cached  # for sizing the chunk only
            n = self._chunk_size(request, budget)
            n = self._fit_encoder(request, n, encoder_budget, out, dry_run=True)
            request.num_computed_tokens = 0  # allocate_slots counts the computed blocks itself
            if n == 0 or not self.blocks.allocate_slots(request, n, computed_blocks):
                break
            request.num_computed_tokens = num_cached
            self._fit_encoder(request, n, encoder_budget, out)
            self.waiting.popleft()
            if request.num_preemptions == 0 and request.num_cached_tokens == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add(out, request, n)
            budget -= n

        # an entry allocated and then evicted within this step (its request was preempted) is not computed
        out.encoder_inputs = [m for m in out.encoder_inputs if self.encoder_cache.has(m.cache_key)]
        out.free_encoder_keys = self._evicted_encoder_keys
        self._evicted_encoder_keys = []
        out.finished_request_ids = self._finished_ids
        self._finished_ids = []
        for request, n in zip(out.requests, out.num_scheduled_tokens):
            request.num_computed_tokens += n
        return out

    def _chunk_size(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if not self.config.enable_chunked_prefill and remaining > budget:
            return 0
        return min(remaining, budget)

    def _fit_encoder(self, request: Request, n: int, encoder_budget: list[int], out: SchedulerOutput,
                     *, dry_run: bool = False) -> int:
        """Shrinks the chunk so every media item it touches has (or gets) its encoder output.

        An item is encoded whole, in the step its first token is computed; a chunk stops before an
        item that does not fit this step's encoder budget or the encoder cache.
        """
        start = request.num_computed_tokens
        budget = encoder_budget[0]
        needed_tokens = 0
        queued = {m.cache_key for m in out.encoder_inputs}
        for item in request.media_in_range(start, start + n):
            key = item.cache_key
            if self.encoder_cache.has(key) or key in queued:
                continue
            # a lone item larger than the per-step budget still runs, in a step of its own
            too_big = item.num_tiles > budget and budget < self.config.max_encoder_tiles_per_step
            if too_big or not self.encoder_cache.can_allocate(needed_tokens + item.num_tokens):
                n = max(0, item.offset - start)  # stop the chunk before this item
                break
            budget -= item.num_tiles
            needed_tokens += item.num_tokens
            queued.add(key)
        if dry_run:
            return n
        encoder_budget[0] = budget
        for item in request.media_in_range(start, start + n):
            key = item.cache_key
            if key in request.encoder_keys:
                continue
            if self.encoder_cache.has(key):
                self.encoder_cache.acquire(request.request_id, key)
            else:
                self._evicted_encoder_keys += self.encoder_cache.allocate(request.request_id, key, item.num_tokens)
                out.encoder_inputs.append(item)
            request.encoder_keys.add(key)
        return n

    def _add(self, out: SchedulerOutput, request: Request, n: int) -> None:
        out.requests.append(request)
        out.start_positions.append(request.num_computed_tokens)
        out.num_scheduled_tokens.append(n)
        out.sample.append(request.num_computed_tokens + n == request.num_tokens)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.blocks.free(request)
        self._release_encoder(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)

    def _release_encoder(self, request: Request) -> None:
        self.encoder_cache.release_all(request.request_id)
        request.encoder_keys.clear()

    # -- after the step -------------------------------------------------------------------------------
    def update_after_step(self, out: SchedulerOutput) -> None:
        """Registers newly full blocks in the prefix cache and releases encoder outputs no longer needed."""
        for request in out.requests:
            if request.is_finished:
                continue
            self.blocks.cache_blocks(request, request.num_computed_tokens)
            if request.encoder_keys:
                pending = {m.cache_key for m in request.media
                           if m.offset + m.num_tokens > request.num_computed_tokens}
                for key in request.encoder_keys - pending:
                    self.encoder_cache.release(request.request_id, key)
                request.encoder_keys &= pending
