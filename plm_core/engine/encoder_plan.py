"""Encoder planning: the media tiles each scheduled chunk needs encoded, within a step's budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from plm_core.engine.encoder_cache import EncoderCacheManager
from plm_core.engine.request import Request
from plm_core.engine.step_budget import Allowance
from plm_core.inputs import MediaItem

# One item of a plan: the item, and the tiles [lo, hi) to encode this step (None: reference only).
PlannedItem = tuple[MediaItem, tuple[int, int] | None]


@dataclass
class EncoderPlan:
    """What one request's chunk needs from the vision encoder; built by `EncoderPlanner.plan`."""

    # tokens of the chunk whose media are complete by the end of the step (the chunk may shrink)
    num_tokens: int
    # every item the chunk touches, up to and including the first one not complete this step
    items: list[PlannedItem] = field(default_factory=list)

    @property
    def encodes(self) -> bool:
        """Whether the plan runs the encoder on any tile this step."""
        return any(tiles is not None for _, tiles in self.items)

    @property
    def num_tiles(self) -> int:
        """Tiles the plan runs through the encoder this step."""
        return sum(tiles[1] - tiles[0] for _, tiles in self.items if tiles is not None)


@dataclass
class EncoderStep:
    """The encoder work of one engine step, filled as chunks are planned and booked."""

    tile_budget: int  # tiles/frames the vision encoder may still run this step
    inputs: list[MediaItem] = field(default_factory=list)  # items encoded this step ...
    tile_ranges: list[tuple[int, int]] = field(default_factory=list)  # ... and which tiles
    evicted: list[str] = field(default_factory=list)  # cache keys evicted while booking

    def booked_end(self, key: str) -> int:
        """End of the tiles of `key` another request already booked this step (0 if none)."""
        return max(
            (hi for m, (_, hi) in zip(self.inputs, self.tile_ranges) if m.cache_key == key),
            default=0,
        )


class _Afford:
    """What a step budget's allowance leaves one chunk: the tokens before an item come first,
    then as many of its tiles as the rest pays for."""

    def __init__(self, allowance: Allowance | None, start: int):
        self.allowance = allowance
        self.start = start
        self.spent = 0.0  # token equivalents of the tiles taken so far

    def take(self, item: MediaItem, wanted: int) -> int:
        """How many of `wanted` tiles of `item` the allowance pays for; records them."""
        a = self.allowance
        if a is None or a.tile_tokens <= 0:
            return wanted
        left = a.available - max(0, item.offset - self.start) - self.spent
        if left < math.inf:
            wanted = min(wanted, max(0, math.floor(left / a.tile_tokens)))
        self.spent += wanted * a.tile_tokens
        return wanted

    def cap(self, plan: EncoderPlan) -> EncoderPlan:
        """Cuts the plan's tokens to what its tiles leave of the allowance, dropping the items the
        cut chunk no longer reaches (none of them encodes: the tokens before an item come first)."""
        a = self.allowance
        if a is None:
            return plan
        cap = a.available - self.spent
        if plan.num_tokens > cap:
            plan.num_tokens = max(0, math.floor(cap))
            end = self.start + plan.num_tokens
            plan.items = [(m, t) for m, t in plan.items if t is not None or m.offset < end]
        return plan


class EncoderPlanner:
    """Plans and books vision-encoder work against the encoder cache; tracks partly encoded items.

    Items are encoded a few tiles per step within the step's tile budget, so a 37-tile image or a
    32-frame video never stalls running streams for a whole encoder pass. An entry is allocated in
    the cache when its first tiles are booked and is usable once its last tile is encoded; a chunk
    stops before any item that is not complete by the end of its step.
    """

    def __init__(self, cache: EncoderCacheManager):
        self.cache = cache
        # cache key -> tiles encoded so far, for resident entries not complete yet
        self.partial: dict[str, int] = {}

    def begin_step(self, tile_budget: int) -> EncoderStep:
        """A fresh per-step context with the whole tile budget."""
        return EncoderStep(tile_budget)

    def _encoded_tiles(self, item: MediaItem) -> int:
        key = item.cache_key
        if not self.cache.has(key):
            return 0
        return self.partial.get(key, item.num_tiles)

    def plan(
        self,
        request: Request,
        start: int,
        num_tokens: int,
        step: EncoderStep,
        allowance: Allowance | None = None,
    ) -> EncoderPlan:
        """Plans the chunk [start, start + num_tokens) of a request; changes nothing.

        The chunk shrinks to stop before the first item that is not fully encoded by the end of
        this step (the tile budget runs out) or does not fit the encoder cache. With an
        `allowance` (a step budget), the chunk's tokens plus its tiles' cost stay within it:
        the tokens before an item come first, then as many of its tiles as the rest affords.
        """
        plan = EncoderPlan(num_tokens)
        afford = _Afford(allowance, start)
        tile_budget = step.tile_budget
        needed_tokens = 0
        seen: set[str] = set()
        for item in request.media_in_range(start, start + num_tokens):
            key = item.cache_key
            if key in seen:
                continue
            seen.add(key)
            done = max(self._encoded_tiles(item), step.booked_end(key))
            # a new entry, or an unreferenced one this request is about to pin, takes room that
            # another item of the same chunk might otherwise have evicted or used
            cache = self.cache
            if key not in request.encoder_keys and (
                not cache.has(key) or not cache.is_referenced(key)
            ):
                if not cache.can_allocate(needed_tokens + item.num_tokens):
                    plan.num_tokens = max(0, item.offset - start)
                    return afford.cap(plan)
                needed_tokens += item.num_tokens
            if done >= item.num_tiles:
                plan.items.append((item, None))
                continue
            take = afford.take(item, min(item.num_tiles - done, tile_budget))
            plan.items.append((item, (done, done + take) if take > 0 else None))
            tile_budget -= take
            if done + take < item.num_tiles:  # tokens wait until the item is complete
                plan.num_tokens = max(0, item.offset - start)
                return afford.cap(plan)
        return afford.cap(plan)

    def apply(self, request: Request, plan: EncoderPlan, step: EncoderStep) -> None:
        """Books a plan: references (or allocates) the request's entries, spends the tile budget."""
        # pin the resident entries first, so that allocating the new ones cannot evict them
        for item, tiles in sorted(plan.items, key=lambda p: not self.cache.has(p[0].cache_key)):
            key = item.cache_key
            if key not in request.encoder_keys:
                if self.cache.has(key):
                    self.cache.acquire(request.request_id, key)
                else:
                    evicted = self.cache.allocate(request.request_id, key, item.num_tokens)
                    for k in evicted:
                        self.partial.pop(k, None)
                    step.evicted += evicted
                    self.partial[key] = 0
                request.encoder_keys.add(key)
            if tiles is not None:
                step.inputs.append(item)
                step.tile_ranges.append(tiles)
                step.tile_budget -= tiles[1] - tiles[0]
                if tiles[1] >= item.num_tiles:
                    self.partial.pop(key, None)
                else:
                    self.partial[key] = tiles[1]

    def end_step(self, step: EncoderStep) -> None:
        """Drops booked tiles of entries evicted later in the same step (their request was
        preempted): they are not encoded."""
        kept = [i for i, m in enumerate(step.inputs) if self.cache.has(m.cache_key)]
        step.inputs = [step.inputs[i] for i in kept]
        step.tile_ranges = [step.tile_ranges[i] for i in kept]

    def release_passed(self, request: Request) -> None:
        """After a step: drops the request's references to items it has computed past.

        An entry is held only while the request is inside the item or the item is still being
        encoded; a later repeat of the same image re-acquires (or re-encodes) it.
        """
        if not request.encoder_keys:
            return
        computed = request.num_computed_tokens
        pending = {
            m.cache_key
            for m in request.media
            if m.offset + m.num_tokens > computed
            and (m.offset < computed or m.cache_key in self.partial)
        }
        for key in request.encoder_keys - pending:
            self.cache.release(request.request_id, key)
        request.encoder_keys &= pending

    def release_all(self, request: Request) -> None:
        """Drops every reference the request holds (finish, abort, preemption)."""
        self.cache.release_all(request.request_id)
        request.encoder_keys.clear()
