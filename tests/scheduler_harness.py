"""The scheduler test harness: a fake model runner that checks every step, and random workloads.

A fake runner loop drives the scheduler the way `EngineCore.step` does: schedule (with the
harness's step budget, if any), "run" (track which encoder outputs are resident and check every
chunk finds the ones it needs; copy the forked blocks and check every chunk reads the KV its own
tokens would have written), update_after_step, then append a sampled token to each request that
reached its last token and finish it at max_tokens. Everything runs on the CPU without a model.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

from plm_core.config import SchedulerConfig
from plm_core.engine.block_manager import BlockManager
from plm_core.engine.encoder_cache import EncoderCacheManager
from plm_core.engine.policy import priority_key
from plm_core.engine.request import Request, RequestStatus
from plm_core.engine.scheduler import Scheduler, SchedulerOutput
from plm_core.engine.step_budget import FLOOR_TOKENS, StepBudget
from plm_core.inputs import ImageSettings, MediaItem
from plm_core.sampling import SamplingParams

BS = 4  # tokens per KV block
TOKEN = 7  # what the fake runner samples
PLACEHOLDER = 5  # media placeholder token id

_prompt_bases = itertools.count(1)
# one step as the harness records it: ids, start positions, scheduled tokens, encoded tiles
# (`encoded`) and preempted ids
TraceStep = tuple[list[str], list[int], list[int], list[tuple[str, int, int]], list[str]]


def image(content_hash: str, offset: int, num_tokens: int = 8, num_tiles: int = 2) -> MediaItem:
    return MediaItem(
        "image",
        content_hash,
        ImageSettings(),
        num_tiles=num_tiles,
        num_tokens=num_tokens,
        offset=offset,
    )


def prompt_tokens(n: int, media: list[MediaItem] = ()) -> list[int]:
    """n distinct text tokens (no accidental prefix hits) with placeholders where the media go."""
    base = 1000 * next(_prompt_bases)
    tokens = list(range(base, base + n))
    for m in media:
        tokens[m.offset : m.offset + m.num_tokens] = [PLACEHOLDER] * m.num_tokens
    return tokens


def make_request(
    rid: str,
    prompt_len: int = 8,
    max_tokens: int = 4,
    media: list[MediaItem] = (),
    tokens: list[int] | None = None,
    priority: int = 0,
) -> Request:
    tokens = prompt_tokens(prompt_len, media) if tokens is None else list(tokens)
    return Request(
        rid, tokens, SamplingParams(max_tokens=max_tokens), media=list(media), priority=priority
    )


def make_choices(leader: Request, n: int, max_tokens: int | None = None) -> list[Request]:
    """The leader and n - 1 more choices of its prompt, as the engine core creates them."""
    children = [
        Request(
            f"{leader.request_id}#{i}",
            list(leader.prompt_token_ids),
            SamplingParams(max_tokens=max_tokens or leader.sampling_params.max_tokens),
            media=[
                image(m.content_hash, m.offset, m.num_tokens, m.num_tiles) for m in leader.media
            ],
            priority=leader.priority,
            prefix_parent=leader.request_id,
        )
        for i in range(1, n)
    ]
    return [leader, *children]


def ids(out: SchedulerOutput) -> list[str]:
    return [r.request_id for r in out.requests]


def key(item: MediaItem) -> str:
    return item.cache_key


def encoded(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    """(content hash, first tile, end tile) of each encoder input of a step."""
    return [
        (m.content_hash, lo, hi) for m, (lo, hi) in zip(out.encoder_inputs, out.encoder_tile_ranges)
    ]


def kv_contents(request: Request) -> list[int]:
    """What the KV at each position of a request depends on: a chained hash of its tokens, with
    media placeholders standing for their item's content."""
    media_at = {
        p: (m.cache_key, p - m.offset)
        for m in request.media
        for p in range(m.offset, m.offset + m.num_tokens)
    }
    contents, h = [], 0
    for p, token in enumerate(request.all_token_ids):
        h = hash((h, token, media_at.get(p)))
        contents.append(h)
    return contents


class Harness:
    """A scheduler plus a fake model runner; checks the output and every invariant at each step."""

    def __init__(
        self,
        *,
        num_blocks: int = 64,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_encoder_tiles_per_step: int = 64,
        encoder_tokens: int = 1024,
        prefix_caching: bool = True,
        chunked_prefill: bool = True,
        policy: str = "fcfs",
    ):
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_encoder_tiles_per_step=max_encoder_tiles_per_step,
            enable_chunked_prefill=chunked_prefill,
            scheduling_policy=policy,
        )
        self.blocks = BlockManager(num_blocks, BS, enable_prefix_caching=prefix_caching)
        self.encoder = EncoderCacheManager(encoder_tokens)
        self.sched = Scheduler(self.config, self.blocks, self.encoder)
        self.complete: set[str] = set()  # encoder outputs the fake runner holds
        # cache key -> tiles encoded so far, for items not complete yet
        self.partial: dict[str, int] = {}
        # block -> what each slot holds (`kv_contents` of the request that wrote it)
        self.kv: dict[int, list[int | None]] = {}
        self.arrival: dict[str, int] = {}
        self.finished: dict[str, Request] = {}
        self.forked: list[str] = []  # children that started by forking their leader's KV
        # check: a running request one token short is in every batch
        self.decodes_every_step = False
        self.budget: StepBudget | None = None  # passed to every `schedule`, and checked
        self.budget_steps = 0  # steps the budget applied to (they carried decodes)
        # requests that waited for a prefix another request was computing (they start out of
        # arrival order); ids in the order they first waited
        self.waited: list[str] = []
        self.trace: list[TraceStep] = []

    # -- driving ----------------------------------------------------------------------------------
    def add(self, *requests: Request) -> None:
        for r in requests:
            self.arrival[r.request_id] = len(self.arrival)
            self.sched.add_request(r)

    def abort(self, rid: str) -> Request | None:
        request = self.sched.abort(rid)
        if request is not None:
            self.finished[rid] = request
        self.check_invariants()
        return request

    def step(self) -> SchedulerOutput:
        s = self.sched
        before = {rid: r.num_computed_tokens for rid, r in s.requests.items()}
        was_running = {r.request_id for r in s.running}
        decoding = [r for r in s.running if r.num_tokens - r.num_computed_tokens == 1]
        out = s.schedule(self.budget)
        self.waited += sorted(s.sharing.waited - set(self.waited))
        self.check_budget(out, decoding)
        preempted = [r.request_id for r in out.preempted]
        self.trace.append(
            (ids(out), out.start_positions, out.num_scheduled_tokens, encoded(out), preempted)
        )
        if self.decodes_every_step:
            for r in decoding:
                assert r in out.requests or r in out.preempted, (
                    f"decode {r.request_id} got no token this step"
                )
        self.check_output(out, before, was_running)
        self.run(out)
        running = {r.request_id for r in s.running}
        s.update_after_step(out)
        for r in s.running:  # forked after the step, to compute from the next one
            if r.request_id not in running:
                self.check_fork(r)
        for request, sample in zip(out.requests, out.sample):
            if sample and not request.is_finished:
                request.output_token_ids.append(TOKEN)
                if len(request.output_token_ids) >= request.sampling_params.max_tokens:
                    s.finish(request, RequestStatus.FINISHED_LENGTH)
                    self.finished[request.request_id] = request
        self.check_invariants()
        return out

    def run_until_done(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if not self.sched.num_unfinished:
                break
            self.step()
        assert not self.sched.num_unfinished, f"not done after {max_steps} steps"
        self.step()  # reports the last finished ids
        self.check_drained()

    def run(self, out: SchedulerOutput) -> None:
        """The model runner's view: drop freed encoder outputs, encode the booked tiles, copy the
        forked blocks, then check every chunk's media and context and write its KV."""
        for rid in out.finished_request_ids:
            assert rid not in self.sched.requests
        assert len(out.encoder_inputs) == len(out.encoder_tile_ranges)
        for k in out.free_encoder_keys:
            self.complete.discard(k)
            self.partial.pop(k, None)
        tiles = 0
        for item, (lo, hi) in zip(out.encoder_inputs, out.encoder_tile_ranges):
            k = key(item)
            assert k not in self.complete, f"{k} encoded again while its output is resident"
            assert lo == self.partial.get(k, 0) and lo < hi <= item.num_tiles, (
                f"{k}: tiles [{lo}, {hi}) out of turn"
            )
            tiles += hi - lo
            if hi == item.num_tiles:
                self.partial.pop(k, None)
                self.complete.add(k)
            else:
                self.partial[k] = hi
        assert tiles <= self.config.max_encoder_tiles_per_step
        for request, start, n in zip(out.requests, out.start_positions, out.num_scheduled_tokens):
            for item in request.media_in_range(start, start + n):
                assert key(item) in self.complete, (
                    f"{request.request_id} computes {key(item)} before it is encoded"
                )
        # the scheduler's idea of each entry's progress matches what the runner holds
        progress = self.sched.encoder_planner.partial
        assert self.complete | set(self.partial) <= set(self.encoder.entries)
        for k in self.encoder.entries:
            if k in progress:
                assert k not in self.complete and self.partial.get(k, 0) == progress[k]
            else:
                assert k in self.complete, (
                    f"{k} resident and complete for the scheduler, not for the runner"
                )
        self.run_kv(out)

    def run_kv(self, out: SchedulerOutput) -> None:
        """Block copies (all read, then all written), then each chunk reads its context and writes
        its tokens: a stale or shared-and-overwritten block shows as a wrong content."""
        owners = Counter(b for r in self.sched.running for b in r.block_ids)
        copied = [list(self.kv.get(src, [None] * BS)) for src, _ in out.block_copies]
        for (src, dst), data in zip(out.block_copies, copied):
            assert src != dst and owners[dst] == 1 == self.blocks.ref_counts[dst], (
                f"copy into block {dst}, which is not one running request's own"
            )
            self.kv[dst] = data
        writes = []
        for request, start, n in zip(out.requests, out.start_positions, out.num_scheduled_tokens):
            want = kv_contents(request)
            got = [
                self.kv.get(request.block_ids[p // BS], [None] * BS)[p % BS] for p in range(start)
            ]
            assert got == want[:start], f"{request.request_id} reads KV it did not compute"
            for p in range(start, start + n):
                block = request.block_ids[p // BS]
                assert self.blocks.ref_counts[block] == 1, (
                    f"{request.request_id} writes a shared block"
                )
                writes.append((block, p % BS, want[p]))
        for block, slot, content in writes:
            self.kv.setdefault(block, [None] * BS)[slot] = content

    # -- checks -----------------------------------------------------------------------------------
    def check_fork(self, child: Request) -> None:
        """A child started by a fork: the leader's prompt KV but its last token, cached."""
        leader = self.sched.requests.get(child.prefix_parent or "")
        assert leader is not None and leader.prompt_token_ids == child.prompt_token_ids
        p = child.num_prompt_tokens
        assert child.num_computed_tokens == p - 1 and not child.encoder_keys
        assert len(child.block_ids) == self.blocks.num_blocks_for(p - 1)
        full = (p - 1) // BS
        assert child.block_ids[:full] == leader.block_ids[:full]
        if child.num_preemptions == 0:
            assert child.num_cached_tokens == p - 1
        self.forked.append(child.request_id)

    def check_budget(self, out: SchedulerOutput, decoding: list[Request]) -> None:
        """A step with decodes adds at most the prefill work the budget leaves, or the floor."""
        budget = self.budget
        if budget is None or not decoding:
            return
        self.budget_steps += 1
        decodes = {r.request_id for r in decoding}
        prefill_tokens = [
            n for r, n in zip(out.requests, out.num_scheduled_tokens) if r.request_id not in decodes
        ]
        tiles = out.total_num_encoder_tiles * budget.tile_tokens
        prefill = sum(prefill_tokens) + tiles
        allowed = (budget.target_s - budget.base_s) / budget.per_token_s - len(decoding)
        if self.config.enable_chunked_prefill:  # the floor: 16 tokens or a tile
            allowed = max(allowed, FLOOR_TOKENS, budget.tile_tokens)
        else:  # the floor: the first prefill whole
            allowed = max(allowed, prefill_tokens[0] + tiles if prefill_tokens else tiles)
        assert prefill <= allowed + 1e-9, f"prefill work {prefill} over the budget's {allowed}"

    def check_output(
        self, out: SchedulerOutput, before: dict[str, int], was_running: set[str]
    ) -> None:
        s, cfg = self.sched, self.config
        assert (
            len(out.requests)
            == len(out.start_positions)
            == len(out.num_scheduled_tokens)
            == len(out.sample)
        )
        assert len(set(ids(out))) == len(out.requests)
        assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(s.running) <= cfg.max_num_seqs
        for request, start, n, sample in zip(
            out.requests, out.start_positions, out.num_scheduled_tokens, out.sample
        ):
            assert n >= 1 and request.status is RequestStatus.RUNNING and request in s.running
            if request.request_id in was_running:
                assert start == before[request.request_id]  # continues where it left off
            elif request.prefix_parent and start == request.num_prompt_tokens - 1 > 0:
                pass  # admitted by a fork (checked below)
            else:  # admitted this step: from scratch or after a prefix hit
                assert start % BS == 0 and start < request.num_tokens
                if not self.blocks.enable_prefix_caching:
                    assert start == 0
            assert request.num_computed_tokens == start + n <= request.num_tokens
            assert sample == (start + n == request.num_tokens)
            if not cfg.enable_chunked_prefill:
                assert start + n == request.num_tokens
            assert len(request.block_ids) == self.blocks.num_blocks_for(start + n)
        if out.preempted:
            assert set(ids(out)) <= was_running, "admitted new requests in a step that preempted"
        for request in out.preempted:
            assert request.status is RequestStatus.PREEMPTED and request in s.waiting
            assert (
                request.block_ids == []
                and request.num_computed_tokens == 0
                and not request.encoder_keys
            )
            assert request not in out.requests
        for r in s.running:  # a running request not in the batch computes nothing this step
            if r in out.requests:
                continue
            if r.request_id in was_running:
                assert r.num_computed_tokens == before[r.request_id]
            else:  # admitted to encode its image first: holds only its prefix hit, if any
                assert r.num_computed_tokens % BS == 0 and r.encoder_keys
            assert len(r.block_ids) == self.blocks.num_blocks_for(r.num_computed_tokens)
        self.check_admitted_forks(out, was_running)

    def check_admitted_forks(self, out: SchedulerOutput, was_running: set[str]) -> None:
        for request, start in zip(out.requests, out.start_positions):
            if request.request_id in was_running or not request.prefix_parent:
                continue
            if start == request.num_prompt_tokens - 1 > 0 and start % BS:
                # a fork admitted this step (a prefix hit starts on a block boundary)
                assert any(dst == request.block_ids[start // BS] for _, dst in out.block_copies)
                self.forked.append(request.request_id)

    def check_invariants(self) -> None:
        s, bm, ec = self.sched, self.blocks, self.encoder
        bm.check_invariants()
        ec.check_invariants()
        live = list(s.running) + list(s.waiting)
        assert {r.request_id for r in live} == set(s.requests)
        if s.policy.name == "fcfs":
            # those that waited for an in-flight prefix were passed over by later ones
            order = [self.arrival[r.request_id] for r in live if r.request_id not in self.waited]
            assert order == sorted(order), "running + waiting not in arrival order (FCFS)"
        else:
            keys = [priority_key(r) for r in s.waiting]
            assert keys == sorted(keys), "waiting not in (priority, arrival) order"
        for r in s.running:
            assert r.status is RequestStatus.RUNNING
        for r in s.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert r.block_ids == [] and r.num_computed_tokens == 0 and not r.encoder_keys
        tables = Counter(b for r in live for b in r.block_ids)
        assert all(bm.ref_counts[b] == c for b, c in tables.items())
        assert sum(bm.ref_counts) == sum(tables.values())
        assert bm.num_free_blocks == bm.num_blocks - len(tables)
        for r in live:
            assert ec.request_keys.get(r.request_id, set()) == r.encoder_keys
            assert len(set(r.block_ids)) == len(r.block_ids)
        assert set(ec.request_keys) <= set(s.requests)
        for r in self.finished.values():
            assert r.is_finished and r.block_ids == [] and not r.encoder_keys

    def check_drained(self) -> None:
        s = self.sched
        assert not s.running and not s.waiting and not s.requests
        assert self.blocks.num_free_blocks == self.blocks.num_blocks
        assert not any(self.encoder.refs.values()) and not self.encoder.request_keys
        self.blocks.check_invariants()
        self.encoder.check_invariants()


# -- randomized ------------------------------------------------------------------------------------


def random_prompt(rng: random.Random, made: list[Request], max_media: int, rid: str) -> Request:
    """A prompt of text and up to max_media images, or the same prompt as an earlier request."""
    # a small pool of images, some larger than the tile budget: hits, misses and evictions happen
    pool = {f"img{i}": (tiles, 2 * tiles) for i, tiles in enumerate([1, 2, 3, 4, 6, 8])}
    media, end = [], 0
    for _ in range(rng.randrange(0, max_media + 1)):
        name = rng.choice(sorted(pool))
        tiles, ntok = pool[name]
        media.append(
            image(name, offset=end + rng.randrange(0, 8), num_tokens=ntok, num_tiles=tiles)
        )
        end = media[-1].offset + ntok
    prompt_len = max(end + rng.randrange(0, 10), rng.randrange(1, 30))
    req = make_request(rid, prompt_len=prompt_len, media=media, max_tokens=rng.randrange(1, 16))
    if rng.random() < 0.2 and made:  # same prompt as an earlier one: prefix hits
        twin = rng.choice(made)
        media = [image(m.content_hash, m.offset, m.num_tokens, m.num_tiles) for m in twin.media]
        req = make_request(
            rid, tokens=twin.prompt_token_ids, media=media, max_tokens=rng.randrange(1, 16)
        )
    return req


def random_group(rng: random.Random, req: Request, *, choices: bool, policy: str) -> list[Request]:
    """The request alone, or with more choices of its prompt (each its own max_tokens)."""
    if policy == "priority":
        req.priority = rng.randrange(3)
    if not choices or rng.random() < 0.6:
        return [req]
    group = make_choices(req, rng.randrange(2, 5))
    for child in group[1:]:
        child.sampling_params = SamplingParams(max_tokens=rng.randrange(1, 16))
    return group


def random_workload(
    seed: int,
    max_media: int,
    *,
    decodes_every_step: bool = False,
    choices: bool = False,
    policy: str = "fcfs",
    prefix_caching: bool = True,
    budget: StepBudget | None = None,
) -> Harness:
    """Random arrivals (text, images, repeated prompts, n > 1 choices), random aborts, small KV
    and encoder budgets."""
    rng = random.Random(seed)
    h = Harness(
        num_blocks=24,
        max_num_seqs=5,
        max_num_batched_tokens=20,
        max_encoder_tiles_per_step=5,
        encoder_tokens=24,
        prefix_caching=prefix_caching,
        policy=policy,
    )
    h.decodes_every_step = decodes_every_step
    h.budget = budget
    made: list[Request] = []
    aborted: set[str] = set()
    for step in range(400):
        if step < 250 and rng.random() < 0.35:
            req = random_prompt(rng, made, max_media, f"s{seed}r{len(made)}")
            # a prompt's media fit the encoder cache (the engine's default budget guarantees it)
            if (
                sum({m.content_hash: m.num_tokens for m in req.media}.values())
                <= h.encoder.budget_tokens
            ):
                group = random_group(rng, req, choices=choices, policy=policy)
                made += group
                h.add(*group)
        if h.sched.requests and rng.random() < 0.04:
            rid = rng.choice(sorted(h.sched.requests))
            assert h.abort(rid) is not None
            aborted.add(rid)
        if step >= 250 and not h.sched.num_unfinished:
            break
        h.step()
    h.run_until_done(max_steps=500)
    assert made and h.sched.num_preemptions > 0
    for r in made:
        if r.request_id in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
        else:
            assert r.status is RequestStatus.FINISHED_LENGTH
            assert len(r.output_token_ids) == r.sampling_params.max_tokens
    assert h.encoder.hits > 0 and h.blocks.prefix_cache_hits > 0 and aborted
    assert bool(h.forked) == choices
    return h
