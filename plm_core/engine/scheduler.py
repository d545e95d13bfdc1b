"""The scheduler: continuous batching in token and time budgets, chunked prefill, preemption.

There is no prefill phase and decode phase: every step each request moves `num_computed_tokens`
towards `num_tokens` within a shared token budget. Running requests go first (decodes cost one
token, so streams keep flowing while a long image prompt prefills chunk by chunk), then waiting
requests are admitted in the policy's order (policy.py) while KV blocks, sequence slots and encoder
space allow. When blocks run out, the policy's victim is preempted: its blocks are freed and it is
recomputed later from its prompt and outputs, which changes none of its tokens.

Choices 1..n-1 of an `n > 1` request (`Request.prefix_parent` names choice 0, the leader) wait
while the leader computes the prompt, then fork its KV (`BlockManager.fork`): they share its full
blocks, copy its last partial block (`SchedulerOutput.block_copies`) and compute only the last
prompt token themselves. Forking happens after the step the leader completes its prompt in
(`update_after_step`, before the engine may finish the leader) or at admission while the leader
runs; a child whose leader is gone (finished, aborted) runs on its own, with prefix-cache hits or a
full prefill. A leader preempted before its children fork is ahead of them in the queue: they
wait for it again and fork from its recompute.

Requests that arrive together with the same image or prompt prefix share it in flight
(prefix_sharing.py): a waiting request whose next uncached full block a running request is
computing right now waits, holding nothing, until those blocks are cached, then starts with them as
prefix hits (its image, inside the prefix, is not encoded again). Such a waiter keeps its place in
the queue and is re-checked every step, but it does not hold the queue up: admission continues past
it (FCFS, or the priority order, among the others; the first request that cannot start for lack of
room still stops the rest). It goes ahead on its own once nobody computes its next block (that
request finished, was aborted or preempted). With prefix caching off nothing waits.

A step budget (`schedule(StepBudget)`, step_budget.py) keeps steps that carry decodes short, as
Sarathi-Serve's stall-free batching does: such a step adds only the prefill tokens and encoder
tiles whose predicted time, with the decodes (at their own price) and the fixed cost, fits
`target_s` (a tile costs `per_tile_s / per_token_s` prefill tokens). Decodes are never cut for
it; the token and tile limits of the config still apply; and so that prompts always progress, the
step's first prefill work may use at least the floor (16 tokens, or one tile if that costs more;
its whole prompt with chunked prefill off). A step without decodes ignores the budget. Chunk
boundaries change no result.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from plm_core.config import SchedulerConfig
from plm_core.engine.block_manager import BlockCopy, BlockManager
from plm_core.engine.encoder_cache import EncoderCacheManager
from plm_core.engine.encoder_plan import EncoderPlan, EncoderPlanner, EncoderStep
from plm_core.engine.policy import RequestQueue, make_policy
from plm_core.engine.prefix_sharing import PrefixSharing
from plm_core.engine.request import Request, RequestStatus
from plm_core.engine.step_budget import Allowance
from plm_core.engine.step_budget import StepBudget as StepBudget
from plm_core.inputs import MediaItem


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
    # Media items whose tiles/frames the vision encoder runs this step (one batched forward) ...
    encoder_inputs: list[MediaItem] = field(default_factory=list)
    # ... and which of each item's tiles: [lo, hi). An item is usable once its last tile is encoded.
    encoder_tile_ranges: list[tuple[int, int]] = field(default_factory=list)
    # Encoder-cache entries (cache keys) the runner drops before this step.
    free_encoder_keys: list[str] = field(default_factory=list)
    # KV blocks the runner copies, (source, destination), in every layer's K and V, in this order
    # and before this step's forward: the last partial prompt block of each forked choice.
    block_copies: list[BlockCopy] = field(default_factory=list)
    # Requests preempted while building this step: KV freed, to be recomputed later.
    preempted: list[Request] = field(default_factory=list)
    # Requests finished or aborted since the previous step: the runner drops per-request state.
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        """Tokens computed this step, all requests together."""
        return sum(self.num_scheduled_tokens)

    @property
    def total_num_encoder_tiles(self) -> int:
        """Tiles/frames the vision encoder runs this step."""
        return sum(hi - lo for lo, hi in self.encoder_tile_ranges)

    @property
    def is_empty(self) -> bool:
        """True when no request computes a token this step."""
        return not self.requests


@dataclass
class _Step:
    """What one `schedule` call is building, and the budgets it has left."""

    out: SchedulerOutput
    token_budget: int
    encoder: EncoderStep
    # prefill tokens and tiles a step with decodes may still add under a StepBudget (None: no limit)
    allowance: Allowance | None = None


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
        self.encoder_planner = EncoderPlanner(encoder_cache)
        self.policy = make_policy(config.scheduling_policy)
        self.sharing = PrefixSharing(block_manager)
        self.waiting: RequestQueue = self.policy.new_queue()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        # copies of forks made after the last step, sent with the next step: (child, copy)
        self._pending_copies: list[tuple[Request, BlockCopy]] = []

    # -- queue -------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queues a new request (the choices of an n > 1 request right after their leader)."""
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def abort(self, request_id: str) -> Request | None:
        """Frees everything the request holds at once; returns it, or None if unknown or done."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Ends a request: frees its KV blocks and encoder references; the next step reports it."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.blocks.free(request)
        self.encoder_planner.release_all(request)
        self.sharing.forget(request)
        self.requests.pop(request.request_id, None)
        self._finished_ids.append(request.request_id)

    @property
    def num_unfinished(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.running)

    # -- scheduling --------------------------------------------------------------------------------
    def schedule(self, budget: StepBudget | None = None) -> SchedulerOutput:
        """Builds the next step: running requests first, then admissions, within the budgets.

        With a `budget`, a step that carries decodes adds only the prefill tokens and encoder
        tiles the budget's time allows (at least its floor); without decodes it is ignored.
        """
        step = _Step(
            SchedulerOutput(),
            self.config.max_num_batched_tokens,
            self.encoder_planner.begin_step(self.config.max_encoder_tiles_per_step),
            self._allowance(budget),
        )
        self._schedule_running(step)
        if not step.out.preempted:
            self._schedule_waiting(step)
        return self._close(step)

    def _schedule_running(self, step: _Step) -> None:
        """Running requests in admission order; the policy's victims yield when blocks run out."""
        for request in list(self.running):
            if step.token_budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this step
                continue
            n = self._running_chunk(request, step)
            if n > 0 and self._reserve(request, n, step):
                self._add(step, request, n)

    def _allowance(self, budget: StepBudget | None) -> Allowance | None:
        """What a step budget leaves for prefill work: None without one or without decodes."""
        num_decodes = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        if budget is None or num_decodes == 0:
            return None
        return budget.allowance(num_decodes, chunked_prefill=self.config.enable_chunked_prefill)

    def _running_chunk(self, request: Request, step: _Step) -> int:
        """Sizes and books a running request's chunk. A prefill chunk leaves one token of budget
        for every decode behind it, so streams never skip a step; a decode is never cut by the
        step budget (the allowance paid for it up front)."""
        behind = self.running[self.running.index(request) + 1 :]
        decodes_behind = sum(1 for r in behind if r.num_tokens - r.num_computed_tokens == 1)
        decode = not request.is_prefill
        budget = step.token_budget if decode else max(1, step.token_budget - decodes_behind)
        allowance = None if decode else step.allowance
        plan = self._plan(request, request.num_computed_tokens, budget, step, allowance)
        self._book(request, plan, step, decode=decode)
        return plan.num_tokens

    def _plan(
        self, request: Request, start: int, budget: int, step: _Step, allowance: Allowance | None
    ) -> EncoderPlan:
        """Plans the chunk from `start` within `budget` tokens and the step budget's allowance."""
        if allowance is not None:
            budget = allowance.token_cap(budget)
        num_tokens = self._chunk_size(request, start, budget)
        return self.encoder_planner.plan(request, start, num_tokens, step.encoder, allowance)

    def _book(self, request: Request, plan: EncoderPlan, step: _Step, decode: bool = False) -> None:
        """Books a chunk's encoder work and charges it to the step budget's allowance (a running
        decode's token was paid for up front)."""
        self.encoder_planner.apply(request, plan, step.encoder)
        if step.allowance is not None:
            step.allowance.charge(0 if decode else plan.num_tokens, plan.num_tiles)

    def _reserve(self, request: Request, n: int, step: _Step) -> bool:
        """KV slots for n more tokens of a running request, preempting the policy's victims until
        they fit; False if the request itself had to yield."""
        while not self.blocks.allocate_slots(request, n):
            victim = self.policy.victim(self.running)
            self._preempt(victim, step)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, step: _Step) -> None:
        """Admits waiting requests in the policy's order while there is room; the first that
        cannot start stops the rest, so none overtakes it. A request waiting for a prefix that a
        running request computes keeps its place and is passed over (re-checked next step)."""
        for request in self._candidates():
            if step.token_budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            if self._waits_for_leader(request):
                return
            if self._fork_source(request) is None and self.sharing.waits(request, self.running):
                continue
            if not self._admit(request, step):
                return

    def _candidates(self) -> Iterator[Request]:
        """The waiting requests in the policy's order; the caller admits or passes over each."""
        passed: set[str] = set()
        while True:
            request = next((r for r in self.waiting if r.request_id not in passed), None)
            if request is None:
                return
            yield request
            passed.add(request.request_id)

    def _admit(self, request: Request, step: _Step) -> bool:
        """Starts the head of the queue if its first chunk fits: forked from its leader, or from
        the longest prefix-cache hit. A request may start while its image is still being encoded,
        computing no token yet."""
        leader = self._fork_source(request)
        computed_blocks: list[int] = []
        if leader is not None:
            start = leader.num_prompt_tokens - 1
        else:
            computed_blocks, start = self.blocks.get_computed_blocks(request)
        plan = self._plan(request, start, step.token_budget, step, step.allowance)
        n = plan.num_tokens
        if n == 0 and not plan.encodes:
            return False
        if leader is not None:
            if not self.blocks.can_fork(start, n):
                return False
            self._fork(request, leader)
            allocated = self.blocks.allocate_slots(request, n)
            assert allocated, "can_fork promised the blocks"
        elif self.blocks.allocate_slots(request, n, computed_blocks):
            request.num_computed_tokens = start
            self._count_cached(request, start)
            self.sharing.started(request, start)
        else:
            return False
        self._book(request, plan, step)
        self._start(request)
        if n:
            self._add(step, request, n)
        return True

    def _start(self, request: Request) -> None:
        """Moves a waiting request to the running ones."""
        self.waiting.remove(request)
        self.sharing.forget(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    @staticmethod
    def _count_cached(request: Request, num_tokens: int) -> None:
        """Reports the prompt tokens served without computing them, on the first admission only."""
        if request.num_preemptions == 0 and request.num_cached_tokens == 0:
            request.num_cached_tokens = num_tokens

    def _chunk_size(self, request: Request, start: int, budget: int) -> int:
        remaining = request.num_tokens - start
        if not self.config.enable_chunked_prefill and remaining > budget:
            return 0
        return min(remaining, budget)

    def _add(self, step: _Step, request: Request, n: int) -> None:
        out = step.out
        out.requests.append(request)
        out.start_positions.append(request.num_computed_tokens)
        out.num_scheduled_tokens.append(n)
        out.sample.append(request.num_computed_tokens + n == request.num_tokens)
        step.token_budget -= n

    def _preempt(self, request: Request, step: _Step) -> None:
        """Frees a running request's KV and encoder references and queues it to be recomputed."""
        out = step.out
        if request in out.requests:  # scheduled earlier in this step: give its tokens back
            i = out.requests.index(request)
            step.token_budget += out.num_scheduled_tokens[i]
            for column in (out.requests, out.start_positions, out.num_scheduled_tokens, out.sample):
                del column[i]
        self.running.remove(request)
        self.blocks.free(request)
        self.encoder_planner.release_all(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.requeue(request)
        out.preempted.append(request)

    def _close(self, step: _Step) -> SchedulerOutput:
        """Fills the output's encoder work, block copies and finished ids; advances the requests."""
        out = step.out
        self.encoder_planner.end_step(step.encoder)
        out.encoder_inputs = step.encoder.inputs
        out.encoder_tile_ranges = step.encoder.tile_ranges
        out.free_encoder_keys = step.encoder.evicted
        # a fork undone since (its child aborted or preempted) is not copied
        out.block_copies = [c for child, c in self._pending_copies if c[1] in child.block_ids]
        self._pending_copies = []
        out.finished_request_ids, self._finished_ids = self._finished_ids, []
        for request, n in zip(out.requests, out.num_scheduled_tokens):
            request.num_computed_tokens += n
        return out

    # -- forks of n > 1 choices --------------------------------------------------------------------
    def _leader(self, child: Request) -> Request | None:
        """The live leader whose prompt KV `child` (holding no blocks) can fork, or None."""
        if child.prefix_parent is None or child.block_ids:
            return None
        leader = self.requests.get(child.prefix_parent)
        if leader is None or leader is child or leader.num_prompt_tokens < 2:
            return None
        same_prompt = leader.prompt_token_ids == child.prompt_token_ids and [
            (m.cache_key, m.offset) for m in leader.media
        ] == [(m.cache_key, m.offset) for m in child.media]
        return leader if same_prompt else None

    def _waits_for_leader(self, child: Request) -> bool:
        """Whether `child` waits for its running leader to finish computing the prompt."""
        leader = self._leader(child)
        return (
            leader is not None
            and leader.status is RequestStatus.RUNNING
            and leader.num_computed_tokens < leader.num_prompt_tokens
        )

    def _fork_source(self, child: Request) -> Request | None:
        """The leader `child` forks from now: running with its prompt computed; else None."""
        leader = self._leader(child)
        if (
            leader is None
            or leader.status is not RequestStatus.RUNNING
            or leader.num_computed_tokens < leader.num_prompt_tokens
        ):
            return None
        return leader

    def _fork(self, child: Request, leader: Request) -> None:
        """Gives `child` the leader's KV of all prompt tokens but the last, which it computes."""
        num_tokens = leader.num_prompt_tokens - 1
        copy = self.blocks.fork(leader, child, num_tokens)
        if copy is not None:
            self._pending_copies.append((child, copy))
        child.num_computed_tokens = num_tokens
        self._count_cached(child, num_tokens)

    def _fork_ready_children(self) -> None:
        """Forks the children at the head of the queue whose running leader has its prompt
        computed, and starts them; they compute from the next step.

        Runs after each step, before the engine may finish a leader (max_tokens=1, eos) and free
        its blocks. A child that cannot fork now (no sequence slot, no KV block, or a request
        ahead of it) forks at admission while its leader runs, else runs on its own.
        """
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            child = self.waiting.peek()
            leader = self._fork_source(child)
            if leader is None or not self.blocks.can_fork(leader.num_prompt_tokens - 1, 1):
                return
            self._fork(child, leader)
            self._start(child)

    # -- after the step ----------------------------------------------------------------------------
    def update_after_step(self, out: SchedulerOutput) -> None:
        """After the model ran `out`: registers newly full blocks in the prefix cache, releases
        encoder outputs no longer needed and forks the choices whose leader computed its prompt."""
        for request in out.requests:
            if request.is_finished:
                continue
            self.blocks.cache_blocks(request, request.num_computed_tokens)
            self.encoder_planner.release_passed(request)
        self._fork_ready_children()
