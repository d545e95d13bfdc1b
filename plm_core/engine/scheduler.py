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
    max_encoder_tiles_per_step: int = (
        64  # vision-tower tiles/frames encoded per step; big items span steps
    )
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
    # Media items whose tiles/frames the vision encoder runs this step (all in one batched forward) ...
    encoder_inputs: list[MediaItem] = field(default_factory=list)
    # ... and which of each item's tiles: [lo, hi). An item is usable once its last tile is encoded.
    encoder_tile_ranges: list[tuple[int, int]] = field(default_factory=list)
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

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        encoder_cache: EncoderCacheManager,
    ):
        self.config = config
        self.blocks = block_manager
        self.encoder_cache = encoder_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self._evicted_encoder_keys: list[str] = []
        self._encoder_progress: dict[
            str, int
        ] = {}  # tiles encoded so far of entries not yet complete
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

        # 1. Running requests, oldest first; preempt the newest when blocks run out. A prefill chunk
        #    leaves one token of budget for every decode behind it, so streams never skip a step.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            decodes_behind = sum(
                1 for r in self.running[i + 1 :] if r.num_tokens - r.num_computed_tokens == 1
            )
            n = self._chunk_size(
                request, max(1, budget - decodes_behind) if request.is_prefill else budget
            )
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
            budget -= n
            i += 1

        # 2. Waiting requests in arrival order, while there is room.
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
            and not out.preempted
        ):
            request = self.waiting[0]
            if self._waits_for_sibling(request):
                break
            computed_blocks, num_cached = self.blocks.get_computed_blocks(request)
            request.num_computed_tokens = num_cached  # for sizing the chunk only
            n = self._chunk_size(request, budget)
            n, plan = self._plan_encoder(request, n, encoder_budget[0], out)
            request.num_computed_tokens = 0  # allocate_slots counts the computed blocks itself
            encoding = any(rng for _, rng in plan)
            if (n == 0 and not encoding) or not self.blocks.allocate_slots(
                request, n, computed_blocks
            ):
                break
            request.num_computed_tokens = num_cached
            self._apply_encoder_plan(request, plan, encoder_budget, out)
            self.waiting.popleft()
            if request.num_preemptions == 0 and request.num_cached_tokens == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if (
                n
            ):  # a request may join while its image is still being encoded, computing no token yet
                self._add(out, request, n)
                budget -= n

        # an entry allocated and then evicted within this step (its request was preempted) is not computed
        kept = [i for i, m in enumerate(out.encoder_inputs) if self.encoder_cache.has(m.cache_key)]
        out.encoder_inputs = [out.encoder_inputs[i] for i in kept]
        out.encoder_tile_ranges = [out.encoder_tile_ranges[i] for i in kept]
        out.free_encoder_keys = self._evicted_encoder_keys
        self._evicted_encoder_keys = []
        out.finished_request_ids = self._finished_ids
        self._finished_ids = []
        for request, n in zip(out.requests, out.num_scheduled_tokens):
            request.num_computed_tokens += n
        return out

    def _waits_for_sibling(self, request: Request) -> bool:
        """Choices 2..n of a request wait until choice 1 has computed the shared prompt, then hit its blocks."""
        parent = self.requests.get(request.prefix_parent) if request.prefix_parent else None
        return (
            parent is not None
            and self.blocks.enable_prefix_caching
            and not parent.is_finished
            and parent.status is RequestStatus.RUNNING
            and parent.num_computed_tokens < parent.num_prompt_tokens
        )

    def _chunk_size(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if not self.config.enable_chunked_prefill and remaining > budget:
            return 0
        return min(remaining, budget)

    def _fit_encoder(
        self, request: Request, n: int, encoder_budget: list[int], out: SchedulerOutput
    ) -> int:
        """Plans and books the encoder work for a running request's chunk; returns the chunk size."""
        n, plan = self._plan_encoder(request, n, encoder_budget[0], out)
        self._apply_encoder_plan(request, plan, encoder_budget, out)
        return n

    def _encoded_tiles(self, item: MediaItem) -> int:
        key = item.cache_key
        if not self.encoder_cache.has(key):
            return 0
        return self._encoder_progress.get(key, item.num_tiles)

    def _plan_encoder(
        self, request: Request, n: int, tile_budget: int, out: SchedulerOutput
    ) -> tuple[int, list[tuple[MediaItem, tuple[int, int] | None]]]:
        """Shrinks the chunk so every media item it touches is fully encoded by the end of this step.

        Items are encoded a few tiles per step within the encoder budget, so a 37-tile image or a
        32-frame video never stalls running streams for a whole encoder pass; the chunk stops before
        an item that is not complete yet (or does not fit the encoder cache). Returns the chunk size
        and the plan: (item, tiles to encode this step or None if it only needs a reference).
        """
        start = request.num_computed_tokens
        plan: list[tuple[MediaItem, tuple[int, int] | None]] = []
        needed_tokens = 0
        seen: set[str] = set()
        for item in request.media_in_range(start, start + n):
            key = item.cache_key
            if key in seen:
                continue
            seen.add(key)
            done = self._encoded_tiles(item)
            for m, (lo, hi) in zip(out.encoder_inputs, out.encoder_tile_ranges):
                if m.cache_key == key:
                    done = max(done, hi)  # another request books these tiles this step
            # a new entry, or an unreferenced one this request is about to pin, takes room that
            # another item of the same chunk might otherwise have evicted or used
            cache = self.encoder_cache
            if key not in request.encoder_keys and (
                not cache.has(key) or not cache.is_referenced(key)
            ):
                if not cache.can_allocate(needed_tokens + item.num_tokens):
                    return max(0, item.offset - start), plan
                needed_tokens += item.num_tokens
            if done >= item.num_tiles:
                plan.append((item, None))
                continue
            take = min(item.num_tiles - done, tile_budget)
            plan.append((item, (done, done + take) if take > 0 else None))
            tile_budget -= take
            if done + take < item.num_tiles:
                return max(0, item.offset - start), plan  # tokens wait until the item is complete
        return n, plan

    def _apply_encoder_plan(
        self, request: Request, plan, encoder_budget: list[int], out: SchedulerOutput
    ) -> None:
        # pin the resident entries first, so that allocating the new ones cannot evict them
        for item, tiles in sorted(plan, key=lambda p: not self.encoder_cache.has(p[0].cache_key)):
            key = item.cache_key
            if key not in request.encoder_keys:
                if self.encoder_cache.has(key):
                    self.encoder_cache.acquire(request.request_id, key)
                else:
                    evicted = self.encoder_cache.allocate(request.request_id, key, item.num_tokens)
                    for k in evicted:
                        self._encoder_progress.pop(k, None)
                    self._evicted_encoder_keys += evicted
                    self._encoder_progress[key] = 0
                request.encoder_keys.add(key)
            if tiles is not None:
                out.encoder_inputs.append(item)
                out.encoder_tile_ranges.append(tiles)
                encoder_budget[0] -= tiles[1] - tiles[0]
                if tiles[1] >= item.num_tiles:
                    self._encoder_progress.pop(key, None)
                else:
                    self._encoder_progress[key] = tiles[1]

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
                # hold an entry only while the request is inside the item or it is still being
                # encoded; a later repeat of the same image re-acquires (or re-encodes) it
                computed = request.num_computed_tokens
                pending = {
                    m.cache_key
                    for m in request.media
                    if m.offset + m.num_tokens > computed
                    and (m.offset < computed or m.cache_key in self._encoder_progress)
                }
                for key in request.encoder_keys - pending:
                    self.encoder_cache.release(request.request_id, key)
                request.encoder_keys &= pending
