"""Scheduler: requests arriving together share a prompt prefix (and its image) in flight.

A waiting request whose next uncached full block another running request is computing waits
(holding nothing) until those blocks are cached, then starts with them as prefix hits.
"""

from __future__ import annotations

import random

import pytest
from scheduler_harness import (
    TOKEN,
    Harness,
    encoded,
    ids,
    image,
    make_request,
    prompt_tokens,
)

from plm_core.engine.request import Request, RequestStatus
from plm_core.engine.step_budget import StepBudget


def photo(name: str = "x", offset: int = 4, num_tokens: int = 16, num_tiles: int = 4):
    return image(name, offset=offset, num_tokens=num_tokens, num_tiles=num_tiles)


def chats(prefix: list[int], item_args: dict, *rids: str, suffix: int = 8, **kw) -> list[Request]:
    """Requests with the same prefix (holding one image) and each their own question."""
    return [
        make_request(rid, tokens=prefix + prompt_tokens(suffix), media=[photo(**item_args)], **kw)
        for rid in rids
    ]


def two_chats(suffix: int = 8, **kw) -> tuple[Request, Request]:
    """a and b: a 32-token prefix with a 4-tile image at [4, 20), then 8 tokens of their own."""
    prefix = prompt_tokens(32, [photo()])
    a, b = chats(prefix, {}, "a", "b", suffix=suffix, **kw)
    return a, b


def test_a_request_waits_for_the_prefix_a_running_request_computes_then_hits_it():
    h = Harness(max_encoder_tiles_per_step=2)  # a's image takes two steps
    a, b = two_chats(max_tokens=4)
    c = make_request("c", prompt_len=10, max_tokens=2)
    h.add(a, b, c)
    out = h.step()  # b waits for a's blocks; c, behind it, is admitted past it
    assert ids(out) == ["a", "c"] and encoded(out) == [("x", 0, 2)]
    assert h.sched.sharing.waited == {"b"} and list(h.sched.waiting) == [b]
    out = h.step()
    assert ids(out) == ["a", "c"] and b.status is RequestStatus.WAITING
    out = h.step()  # a's 8 full prompt blocks are cached: b starts at the end of the prefix
    assert (ids(out), out.start_positions, out.num_scheduled_tokens) == (
        ["a", "b"],
        [40, 32],
        [1, 8],  # b computes its own 8 prompt tokens only
    )
    assert b.num_cached_tokens == 32 and b.block_ids[:8] == a.block_ids[:8]
    h.run_until_done()
    assert h.encoder.misses == 1 and h.encoder.hits == 0  # the image went through the encoder once
    assert h.blocks.stats()["hits"] == 32
    assert h.sched.sharing.stats() == {"waits": 1, "shared_tokens": 32}
    assert h.waited == ["b"] and not h.sched.sharing.waited


def test_a_request_aborted_while_it_waits_leaks_nothing():
    h = Harness(max_encoder_tiles_per_step=2)
    a, b = two_chats()
    h.add(a, b)
    h.step()
    assert h.sched.sharing.waited == {"b"}
    assert h.abort("b") is b  # checks the invariants
    assert not h.sched.sharing.waited and b.block_ids == [] and not b.encoder_keys
    out = h.step()
    assert out.finished_request_ids == ["b"]
    h.run_until_done()


def test_the_waiter_goes_ahead_when_the_computing_request_is_aborted():
    h = Harness(max_encoder_tiles_per_step=2)
    a, b = two_chats(max_tokens=1)
    h.add(a, b)
    h.step()  # a computed its first 4 tokens (1 block), and half its image
    h.abort("a")
    out = h.step()  # b starts on its own, from a's cached block, and finishes the image
    assert (ids(out), out.start_positions, encoded(out)) == (["b"], [4], [("x", 2, 4)])
    assert b.num_cached_tokens == 4 and h.sched.sharing.stats() == {"waits": 1, "shared_tokens": 4}
    h.run_until_done()
    assert b.output_token_ids == [TOKEN]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_preempted_computing_request_lets_the_waiter_go_or_is_waited_for_again(policy):
    h = Harness(num_blocks=5, max_encoder_tiles_per_step=2, policy=policy)
    x = make_request("x", prompt_len=12, max_tokens=6)  # grows to 5 blocks
    # a's image takes 6 steps; it holds one block meanwhile
    prefix = prompt_tokens(16, [photo(offset=4, num_tokens=8, num_tiles=12)])
    item = dict(offset=4, num_tokens=8, num_tiles=12)
    a, b = chats(prefix, item, "a", "b", suffix=4, max_tokens=1)  # 5 blocks each
    a.priority, b.priority = 1, 0
    h.add(x, a)
    h.step()
    h.add(b)
    for _ in range(4):
        assert ids(h.step()) == ["x"] and h.sched.sharing.waited == {"b"}
    out = h.step()  # x needs a block: a, the victim under both policies, yields
    assert ids(out) == ["x"] and out.preempted == [a] and x.is_finished
    out = h.step()
    if policy == "priority":  # b is ahead of a: it goes on its own; a now waits for b
        assert ids(out) == ["b"] and out.start_positions == [0]
        assert h.sched.sharing.waited == {"a"}
        out = h.step()
        assert (ids(out), out.start_positions) == (["a"], [16])
    else:  # a is back at the front: it recomputes and b waits for it again
        assert ids(out) == ["a"] and out.start_positions == [0]
        out = h.step()
        assert (ids(out), out.start_positions) == (["b"], [16])
    assert h.sched.sharing.stats()["shared_tokens"] == 16
    h.run_until_done()
    assert h.encoder.misses == 1  # the half-encoded image survived the preemption


def test_with_prefix_caching_off_nothing_waits_and_the_image_is_encoded_once():
    h = Harness(max_encoder_tiles_per_step=2, prefix_caching=False)
    a, b = two_chats()
    h.add(a, b)
    out = h.step()  # both start; the second reads the tiles the first booked
    assert ids(out) == ["a", "b"] and encoded(out) == [("x", 0, 2)]
    out = h.step()
    assert ids(out) == ["a", "b"] and encoded(out) == [("x", 2, 4)]
    h.run_until_done()
    assert h.encoder.misses == 1 and h.sched.sharing.stats() == {"waits": 0, "shared_tokens": 0}
    assert not h.waited


def test_the_same_image_after_different_text_is_encoded_once_in_one_step():
    h = Harness()
    reqs = [make_request(rid, prompt_len=30, media=[photo()], max_tokens=1) for rid in "ab"]
    h.add(*reqs)
    out = h.step()  # no block in common: nothing waits; the image is encoded once
    assert ids(out) == ["a", "b"] and encoded(out) == [("x", 0, 4)]
    assert h.encoder.misses == 1 and h.encoder.hits == 1
    h.run_until_done()
    assert not h.waited


@pytest.mark.parametrize(
    ("shared", "own", "waits"),
    [
        (3, 10, False),  # the first block differs
        (4, 0, False),  # the block holding the last token is never a hit
        (4, 1, True),
    ],
)
def test_a_request_waits_only_to_gain_a_full_block(shared, own, waits):
    h = Harness(max_encoder_tiles_per_step=2)
    a, _ = two_chats()
    b = make_request("b", tokens=a.prompt_token_ids[:shared] + prompt_tokens(own), max_tokens=1)
    h.add(a, b)
    out = h.step()
    assert ids(out) == (["a"] if waits else ["a", "b"]) and h.waited == (["b"] if waits else [])
    h.run_until_done()


def test_a_burst_over_four_photos_computes_each_prefix_once():
    h = Harness()
    prefixes = [prompt_tokens(24, [photo(f"p{i}")]) for i in range(4)]
    burst = [
        chats(prefixes[i % 4], dict(name=f"p{i % 4}"), f"r{i}", suffix=6, max_tokens=3)[0]
        for i in range(16)
    ]
    h.add(*burst)
    out = h.step()  # one chat per photo; the other twelve wait for its blocks
    assert ids(out) == ["r0", "r1", "r2", "r3"] and out.total_num_scheduled_tokens == 4 * 30
    assert len(h.sched.sharing.waited) == 12
    out = h.step()  # they start with the 6 blocks of their photo's prefix
    assert out.start_positions == [30] * 4 + [24] * 12
    h.run_until_done()
    prompt_tokens_computed = sum(
        n for t in h.trace for n, s in zip(t[2], t[1]) if s < 30
    )  # every prompt ends at 30
    assert prompt_tokens_computed == 4 * 30 + 12 * 6  # instead of 16 * 30
    assert h.encoder.misses == 4 and h.encoder.hits == 0
    assert h.sched.sharing.stats() == {"waits": 12, "shared_tokens": 12 * 24}
    assert h.blocks.stats()["hits"] == 12 * 24


def random_bursts(seed: int, policy: str, budget: StepBudget | None = None) -> Harness:
    """Bursts of chats over a few of eight photos (prefixes of 2 to 6 blocks, images of 2 to 6
    tiles), with aborts, preemptions and prefix-cache evictions."""
    rng = random.Random(seed)
    h = Harness(
        num_blocks=16,
        max_num_seqs=6,
        max_num_batched_tokens=32,
        max_encoder_tiles_per_step=2,
        encoder_tokens=48,
        policy=policy,
    )
    h.decodes_every_step = True
    h.budget = budget
    photos = {f"p{i}": (dict(name=f"p{i}", num_tiles=2 + i % 5), 8 + 4 * (i % 4)) for i in range(8)}
    prefixes = {name: prompt_tokens(n, [photo(**item)]) for name, (item, n) in photos.items()}
    made: list[Request] = []
    for step in range(300):
        if step < 200 and rng.random() < 0.15:
            for _ in range(rng.randrange(1, 6)):
                name = rng.choice(sorted(photos))
                (r,) = chats(
                    prefixes[name],
                    photos[name][0],
                    f"s{seed}r{len(made)}",
                    suffix=rng.randrange(1, 10),
                    max_tokens=rng.randrange(1, 12),
                    priority=rng.randrange(2),
                )
                made.append(r)
                h.add(r)
        if h.sched.requests and rng.random() < 0.03:
            h.abort(rng.choice(sorted(h.sched.requests)))
        h.step()
    h.run_until_done()
    assert all(r.is_finished for r in made)
    return h


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_random_bursts_share_prefixes_and_keep_every_invariant(policy):
    for seed in range(4):
        h = random_bursts(seed, policy)
        assert len(h.waited) > 5 and h.sched.num_preemptions > 0
        assert h.sched.sharing.stats()["shared_tokens"] > 0


def test_random_bursts_under_a_step_budget():
    budget = StepBudget(target_s=0.03, base_s=0.01, per_token_s=0.001, per_tile_s=0.004)
    for seed in range(3):
        h = random_bursts(seed, "fcfs", budget)
        assert h.waited and h.budget_steps > 0
