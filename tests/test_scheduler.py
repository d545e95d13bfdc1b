"""Scheduler: batching, chunked prefill, preemption, policies, forks, prefix and encoder caching.

Every test drives the scheduler through `scheduler_harness.Harness`, a fake model runner that checks
the output and every invariant at each step, on the CPU without a model.
"""

from __future__ import annotations

import pytest
from scheduler_harness import (
    TOKEN,
    Harness,
    encoded,
    ids,
    image,
    key,
    make_choices,
    make_request,
    prompt_tokens,
    random_workload,
)

from plm_core.engine.request import RequestStatus
from plm_core.sampling import SamplingParams

# -- continuous batching ---------------------------------------------------------------------------


def test_requests_join_and_leave_between_steps():
    h = Harness(max_num_batched_tokens=64)
    a = make_request("a", prompt_len=10, max_tokens=3)
    h.add(a)
    out = h.step()
    assert (ids(out), out.start_positions, out.num_scheduled_tokens, out.sample) == (
        ["a"],
        [0],
        [10],
        [True],
    )
    b = make_request("b", prompt_len=6, max_tokens=3)
    h.add(b)
    out = h.step()  # b joins while a decodes
    assert (ids(out), out.start_positions, out.num_scheduled_tokens, out.sample) == (
        ["a", "b"],
        [10, 0],
        [1, 6],
        [True, True],
    )
    out = h.step()
    assert (ids(out), out.start_positions, out.num_scheduled_tokens) == (
        ["a", "b"],
        [11, 6],
        [1, 1],
    )
    assert (
        a.status is RequestStatus.FINISHED_LENGTH
        and a.output_token_ids == [TOKEN] * 3
        and a.block_ids == []
    )
    out = h.step()  # a left; its id reaches the runner once
    assert ids(out) == ["b"] and out.finished_request_ids == ["a"]
    assert b.is_finished
    out = h.step()
    assert out.is_empty and out.finished_request_ids == ["b"]
    assert h.step().finished_request_ids == []
    h.check_drained()


def test_chunked_prefill_positions_and_sample():
    h = Harness(max_num_batched_tokens=16)
    r = make_request("r", prompt_len=50, max_tokens=2)
    h.add(r)
    chunks = []
    while not r.is_finished:
        out = h.step()
        chunks.append((out.start_positions[0], out.num_scheduled_tokens[0], out.sample[0]))
    assert chunks == [
        (0, 16, False),
        (16, 16, False),
        (32, 16, False),
        (48, 2, True),
        (50, 1, True),
    ]
    h.run_until_done()


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    h = Harness(max_num_batched_tokens=16, chunked_prefill=False)
    a, b = (
        make_request("a", prompt_len=10, max_tokens=3),
        make_request("b", prompt_len=16, max_tokens=1),
    )
    h.add(a, b)
    out = h.step()
    assert ids(out) == ["a"]  # b's 16 tokens do not fit next to a's 10
    out = h.step()
    assert ids(out) == ["a"]  # nor next to a's decode
    out = h.step()
    assert ids(out) == ["a"] and a.is_finished
    out = h.step()
    assert (ids(out), out.num_scheduled_tokens) == (["b"], [16])
    h.run_until_done()


def test_decodes_go_first_and_run_every_step_while_a_long_prompt_prefills():
    h = Harness(max_num_batched_tokens=32)
    h.decodes_every_step = True
    a, b = (
        make_request("a", prompt_len=5, max_tokens=30),
        make_request("b", prompt_len=6, max_tokens=30),
    )
    h.add(a, b)
    h.step()
    c = make_request("c", prompt_len=200, max_tokens=2)
    d = make_request("d", prompt_len=3, max_tokens=2)
    h.add(c, d)
    prefill_steps = 0
    while not c.output_token_ids:
        remaining = c.num_tokens - c.num_computed_tokens
        out = h.step()
        prefill_steps += 1
        assert ids(out)[:3] == ["a", "b", "c"]
        assert out.num_scheduled_tokens[:3] == [1, 1, min(30, remaining)]
        assert out.sample[:2] == [True, True]
        if remaining > 30:
            assert ids(out) == ["a", "b", "c"]  # d waits behind c (FCFS), the budget is spent
        assert out.total_num_scheduled_tokens <= 32
    assert prefill_steps == 7  # 6 * 30 + 20
    assert "d" in ids(out)  # admitted in c's last prefill step, with the budget c left
    h.run_until_done()


def test_max_num_seqs_and_fcfs_admission():
    h = Harness(max_num_seqs=3)
    reqs = [make_request(f"r{i}", prompt_len=4 + i, max_tokens=2 + (i * 3) % 5) for i in range(8)]
    h.add(*reqs)
    out = h.step()
    assert ids(out) == ["r0", "r1", "r2"]
    max_running = 0
    first_seen: list[str] = list(ids(out))
    while h.sched.num_unfinished:
        out = h.step()
        max_running = max(max_running, len(out.requests))
        first_seen += [rid for rid in ids(out) if rid not in first_seen]
    assert max_running == 3
    assert first_seen == [f"r{i}" for i in range(8)]
    h.run_until_done()


def test_admission_waits_for_kv_blocks_head_of_line():
    h = Harness(num_blocks=10)  # 40 tokens
    a = make_request("a", prompt_len=24, max_tokens=4)  # 6 blocks, up to 7 while decoding
    b = make_request("b", prompt_len=20)  # 5 blocks: does not fit beside a
    c = make_request("c", prompt_len=4)  # 1 block: would fit, but waits behind b
    h.add(a, b, c)
    for _ in range(4):
        out = h.step()
        assert ids(out) == ["a"]
        assert list(h.sched.waiting) == [b, c]
    assert a.is_finished and h.blocks.num_free_blocks == 10
    out = h.step()
    assert ids(out) == ["b", "c"] and out.num_scheduled_tokens == [20, 4]
    h.run_until_done()


# -- preemption ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_growing_decodes_preempt_the_latest_request(prefix_caching):
    h = Harness(num_blocks=6, prefix_caching=prefix_caching)  # 24 tokens
    a, b = (
        make_request("a", prompt_len=7, max_tokens=10),
        make_request("b", prompt_len=7, max_tokens=10),
    )
    h.add(a, b)
    for _ in range(6):  # both grow to 3 blocks: the cache is full
        out = h.step()
        assert ids(out) == ["a", "b"] and not out.preempted
    assert h.blocks.num_free_blocks == 0 and a.num_computed_tokens == 12
    c = make_request("c", prompt_len=3)
    h.add(c)
    out = h.step()  # a needs a 4th block: b, the latest, gives its blocks up
    assert ids(out) == ["a"] and out.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and b.block_ids == [] and b.num_computed_tokens == 0
    assert list(h.sched.waiting) == [
        b,
        c,
    ]  # at the front, and nothing admitted in a preempting step
    assert b.num_preemptions == 1 and h.sched.num_preemptions == 1
    assert b.output_token_ids == [TOKEN] * 6  # outputs are kept and recomputed, not regenerated
    while not a.is_finished:
        out = h.step()
        assert "b" not in ids(out) or a.is_finished
    out = h.step()  # b resumes from its prompt + 6 outputs, then c joins
    assert ids(out)[0] == "b"
    start, n = out.start_positions[0], out.num_scheduled_tokens[0]
    assert start + n == 7 + 6 and out.sample[0]
    assert (start > 0) == prefix_caching  # its full blocks were still in the prefix cache
    assert b.num_cached_tokens == 0  # counts the first admission only
    assert len(b.output_token_ids) == 7
    h.run_until_done()
    assert b.output_token_ids == [TOKEN] * 10 and h.sched.num_preemptions == 1


def test_preemption_under_steady_pressure_finishes_everything():
    h = Harness(num_blocks=8, max_num_batched_tokens=16)
    reqs = [make_request(f"r{i}", prompt_len=5, max_tokens=12) for i in range(5)]
    h.add(*reqs)
    h.run_until_done()
    assert h.sched.num_preemptions > 0
    assert all(r.output_token_ids == [TOKEN] * 12 for r in reqs)


# -- prefix caching --------------------------------------------------------------------------------


def test_same_prompt_hits_the_prefix_cache():
    h = Harness()
    prompt = prompt_tokens(20)
    a = make_request("a", tokens=prompt, max_tokens=3)
    h.add(a)
    h.step()  # a's prompt is computed and its 5 full blocks cached
    b = make_request("b", tokens=prompt, max_tokens=2)
    h.add(b)
    out = h.step()
    assert ids(out) == ["a", "b"]
    assert (out.start_positions[1], out.num_scheduled_tokens[1]) == (16, 4)  # never the last token
    assert b.num_cached_tokens == 16 and a.num_cached_tokens == 0
    assert b.block_ids[:4] == a.block_ids[:4]  # shared while both run
    h.run_until_done()
    c = make_request("c", tokens=prompt, max_tokens=1)
    h.add(c)
    out = h.step()
    assert out.start_positions == [16] and c.num_cached_tokens == 16
    h.run_until_done()


def test_same_tokens_with_a_different_image_do_not_hit():
    x = image("x", offset=8, num_tokens=8)
    tokens = prompt_tokens(24, [x])
    h = Harness()
    a = make_request("a", tokens=tokens, media=[x], max_tokens=1)
    h.add(a)
    h.run_until_done()
    b = make_request("b", tokens=tokens, media=[image("y", offset=8, num_tokens=8)], max_tokens=1)
    h.add(b)
    out = h.step()
    assert out.start_positions == [8] and b.num_cached_tokens == 8  # the text before the image only
    assert [key(m) for m in out.encoder_inputs] == [key(b.media[0])]
    h.run_until_done()
    c = make_request("c", tokens=tokens, media=[image("x", offset=8, num_tokens=8)], max_tokens=1)
    h.add(c)
    out = h.step()
    assert out.start_positions == [20] and c.num_cached_tokens == 20
    assert out.encoder_inputs == []  # the image lies inside the cached prefix
    h.run_until_done()


# -- encoder scheduling ----------------------------------------------------------------------------


def test_each_item_is_encoded_once_in_the_step_its_chunk_first_touches_it():
    h = Harness(max_num_batched_tokens=10)
    x, y = image("x", offset=5), image("y", offset=25)  # [5, 13) and [25, 33), 2 tiles each
    r = make_request("r", prompt_len=40, media=[x, y], max_tokens=1)
    h.add(r)
    steps, held = [], []
    while not r.is_finished:
        out = h.step()
        steps.append(encoded(out))
        held.append(set(r.encoder_keys))
    assert steps == [[("x", 0, 2)], [], [("y", 0, 2)], []]
    # a reference lasts until the computed tokens pass the item: x after [10, 20), y after [30, 40)
    assert held == [{key(x)}, set(), {key(y)}, set()]
    assert h.encoder.has(key(x)) and h.encoder.has(key(y))  # unreferenced, still resident
    assert not h.encoder.refs[key(x)] and not h.encoder.refs[key(y)]
    h.run_until_done()


def test_the_same_image_twice_in_one_prompt_is_encoded_once():
    h = Harness(max_num_batched_tokens=8)
    first, second = image("x", offset=2), image("x", offset=14)  # [2, 10) and [14, 22)
    r = make_request("r", prompt_len=24, media=[first, second], max_tokens=1)
    h.add(r)
    assert encoded(h.step()) == [("x", 0, 2)]
    held = []
    while not r.is_finished:
        assert h.step().encoder_inputs == []
        held.append(set(r.encoder_keys))
    assert held == [{key(first)}, set()]  # after [8, 16): kept for the second copy; then finished
    h.run_until_done()


def test_a_second_request_with_the_same_image_is_an_encoder_hit():
    h = Harness(max_num_batched_tokens=20)
    a = make_request("a", prompt_len=30, media=[image("x", offset=5, num_tokens=20)], max_tokens=2)
    h.add(a)
    assert encoded(h.step()) == [("x", 0, 2)]  # a computes [0, 20) and holds x
    b = make_request("b", prompt_len=24, media=[image("x", offset=2, num_tokens=20)], max_tokens=2)
    h.add(b)
    out = h.step()  # a finishes its prompt, b starts on x while a still holds it
    assert ids(out) == ["a", "b"] and out.num_scheduled_tokens == [10, 10]
    assert out.encoder_inputs == []
    assert h.encoder.hits == 1 and h.encoder.misses == 1
    assert set(h.encoder.refs[key(a.media[0])]) == {"b"}  # a passed x and let go
    h.run_until_done()
    c = make_request("c", prompt_len=24, media=[image("x", offset=2, num_tokens=20)], max_tokens=1)
    h.add(c)
    assert h.step().encoder_inputs == []  # unreferenced but resident: still a hit
    assert h.encoder.hits == 2 and h.encoder.misses == 1
    h.run_until_done()


def test_a_chunk_stops_before_an_item_the_tile_budget_cannot_finish():
    h = Harness(max_encoder_tiles_per_step=4)
    x, y = (
        image("x", offset=2, num_tokens=6, num_tiles=3),
        image("y", offset=10, num_tokens=6, num_tiles=3),
    )
    r = make_request("r", prompt_len=20, media=[x, y], max_tokens=1)
    h.add(r)
    out = h.step()  # x whole, then y's first tile with what is left; tokens stop before y
    assert out.num_scheduled_tokens == [10] and encoded(out) == [("x", 0, 3), ("y", 0, 1)]
    out = h.step()
    assert (out.start_positions, out.num_scheduled_tokens) == ([10], [10])
    assert encoded(out) == [("y", 1, 3)]
    h.run_until_done()


def test_the_tile_budget_is_shared_across_requests_in_a_step():
    h = Harness(max_encoder_tiles_per_step=4)
    a = make_request(
        "a", prompt_len=12, media=[image("p", offset=2, num_tokens=6, num_tiles=3)], max_tokens=1
    )
    b = make_request(
        "b", prompt_len=12, media=[image("q", offset=4, num_tokens=6, num_tiles=3)], max_tokens=1
    )
    h.add(a, b)
    out = h.step()
    assert ids(out) == ["a", "b"] and out.num_scheduled_tokens == [12, 4]  # b stops before q
    assert encoded(out) == [("p", 0, 3), ("q", 0, 1)]
    out = h.step()
    assert ids(out) == ["b"] and out.num_scheduled_tokens == [8] and encoded(out) == [("q", 1, 3)]
    h.run_until_done()


def test_an_item_larger_than_the_tile_budget_spans_steps_while_decodes_flow():
    h = Harness(max_encoder_tiles_per_step=4)
    h.decodes_every_step = True
    d = make_request("d", prompt_len=3, max_tokens=10)
    h.add(d)
    h.step()
    big = image("big", offset=2, num_tokens=20, num_tiles=10)
    b = make_request("b", prompt_len=30, media=[big], max_tokens=1)
    c = make_request(
        "c", prompt_len=12, media=[image("c", offset=0, num_tokens=6, num_tiles=3)], max_tokens=1
    )
    h.add(b, c)
    out = h.step()
    assert ids(out) == ["d", "b"] and out.num_scheduled_tokens == [1, 2]  # b stops before big
    assert encoded(out) == [("big", 0, 4)]
    assert c.status is RequestStatus.WAITING  # no tiles left for c's image and no token before it
    out = h.step()
    assert ids(out) == ["d"] and encoded(out) == [("big", 4, 8)]
    assert b in h.sched.running and b.num_computed_tokens == 2
    out = (
        h.step()
    )  # big completes: b computes its prompt; c joins with its image's first tiles only
    assert (
        ids(out) == ["d", "b"]
        and out.num_scheduled_tokens == [1, 28]
        and out.sample == [True, True]
    )
    assert encoded(out) == [("big", 8, 10), ("c", 0, 2)]
    assert c in h.sched.running and c.num_computed_tokens == 0  # running, computing no token yet
    out = h.step()
    assert ids(out) == ["d", "c"] and encoded(out) == [("c", 2, 3)]
    h.run_until_done()


def test_two_requests_share_the_encoding_of_one_item():
    h = Harness(max_encoder_tiles_per_step=4)
    a = make_request(
        "a", prompt_len=20, media=[image("z", offset=2, num_tokens=12, num_tiles=6)], max_tokens=1
    )
    b = make_request(
        "b", prompt_len=20, media=[image("z", offset=4, num_tokens=12, num_tiles=6)], max_tokens=1
    )
    h.add(a, b)
    out = h.step()
    assert (
        ids(out) == ["a", "b"]
        and out.num_scheduled_tokens == [2, 4]
        and encoded(out) == [("z", 0, 4)]
    )
    out = h.step()
    assert (
        ids(out) == ["a", "b"]
        and out.num_scheduled_tokens == [18, 16]
        and encoded(out) == [("z", 4, 6)]
    )
    assert h.encoder.misses == 1
    h.run_until_done()


def test_a_half_encoded_item_outlives_its_aborted_request():
    h = Harness(max_encoder_tiles_per_step=4)
    a = make_request("a", prompt_len=30, media=[image("z", offset=2, num_tokens=20, num_tiles=10)])
    h.add(a)
    assert encoded(h.step()) == [("z", 0, 4)]
    h.abort("a")
    assert h.encoder.has(key(a.media[0])) and not h.encoder.refs[key(a.media[0])]
    b = make_request(
        "b", prompt_len=24, media=[image("z", offset=0, num_tokens=20, num_tiles=10)], max_tokens=1
    )
    h.add(b)
    assert encoded(h.step()) == [("z", 4, 8)]  # picks up where a left off
    out = h.step()
    assert encoded(out) == [("z", 8, 10)] and ids(out) == ["b"]
    h.run_until_done()


def test_encoder_evictions_reach_the_runner():
    h = Harness(encoder_tokens=16)
    x = image("x", offset=2, num_tokens=8)
    y = image("y", offset=2, num_tokens=12)
    h.add(make_request("a", prompt_len=12, media=[x], max_tokens=1))
    h.run_until_done()
    assert h.encoder.has(key(x))
    h.add(make_request("b", prompt_len=16, media=[y], max_tokens=1))
    out = h.step()
    assert out.free_encoder_keys == [key(x)] and encoded(out) == [("y", 0, 2)]
    assert not h.encoder.has(key(x))
    h.run_until_done()
    h.add(
        make_request("c", prompt_len=12, media=[image("x", offset=2, num_tokens=8)], max_tokens=1)
    )
    out = h.step()  # x again: a miss now, and y makes room
    assert out.free_encoder_keys == [key(y)] and encoded(out) == [("x", 0, 2)]
    h.run_until_done()


def test_encoder_cache_space_stops_a_chunk_until_a_holder_lets_go():
    h = Harness(encoder_tokens=16, max_num_batched_tokens=12)
    a = make_request("a", prompt_len=30, media=[image("x", offset=2, num_tokens=16)], max_tokens=1)
    b = make_request("b", prompt_len=10, media=[image("y", offset=0, num_tokens=8)], max_tokens=1)
    h.add(a, b)
    out = h.step()
    assert ids(out) == ["a"]  # b's first token is y, which does not fit beside x (pinned by a)
    out = h.step()
    assert ids(out) == ["a"]
    out = h.step()  # a passed x at the end of the last step: b's y now evicts it
    assert ids(out) == ["a", "b"] and out.free_encoder_keys == [key(a.media[0])]
    h.run_until_done()


@pytest.mark.parametrize("hit_first", [True, False])
def test_a_chunk_with_an_unreferenced_hit_and_a_miss(hit_first):
    h = Harness(encoder_tokens=16)
    h.add(
        make_request("a", prompt_len=12, media=[image("x", offset=2, num_tokens=8)], max_tokens=1)
    )
    h.run_until_done()  # x resident, unreferenced: 8 used, 8 evictable
    x, y = image("x", offset=2, num_tokens=8), image("y", offset=12, num_tokens=10)
    if not hit_first:
        y, x = image("y", offset=2, num_tokens=10), image("x", offset=14, num_tokens=8)
    b = make_request("b", prompt_len=26, media=sorted([x, y], key=lambda m: m.offset), max_tokens=1)
    h.add(b)
    h.run_until_done()  # x and y cannot both be resident: they must go in different steps
    assert b.output_token_ids == [TOKEN]


def test_a_miss_does_not_evict_a_hit_of_the_same_chunk():
    h = Harness(encoder_tokens=24)
    h.add(
        make_request("a", prompt_len=12, media=[image("x", offset=2, num_tokens=8)], max_tokens=1)
    )
    h.add(
        make_request("a2", prompt_len=12, media=[image("z", offset=2, num_tokens=8)], max_tokens=1)
    )
    h.run_until_done()  # x (least recently used) and z resident, unreferenced
    media = [image("y", offset=2, num_tokens=14), image("x", offset=16, num_tokens=8)]
    b = make_request("b", prompt_len=26, media=media, max_tokens=1)
    h.add(b)
    h.run_until_done()
    assert b.output_token_ids == [TOKEN]


def test_a_repeated_image_is_not_pinned_across_the_gap():
    h = Harness(encoder_tokens=24, max_num_batched_tokens=8)
    media = [
        image("x", offset=2, num_tokens=16),
        image("y", offset=20, num_tokens=12),
        image("x", offset=34, num_tokens=16),
    ]
    r = make_request("r", prompt_len=52, media=media, max_tokens=1)
    h.add(r)
    h.run_until_done(max_steps=40)
    assert r.output_token_ids == [TOKEN]


def test_a_decode_is_not_starved_by_a_prefill_admitted_before_it():
    h = Harness(max_num_batched_tokens=32, max_encoder_tiles_per_step=4)
    a = make_request(
        "a",
        prompt_len=100,
        max_tokens=1,
        media=[
            image("x", offset=2, num_tokens=8, num_tiles=4),
            image("y", offset=12, num_tokens=8, num_tiles=4),
        ],
    )
    b = make_request("b", prompt_len=4, max_tokens=10)
    h.add(a, b)
    out = h.step()
    assert ids(out) == ["a", "b"] and out.num_scheduled_tokens == [
        12,
        4,
    ]  # a stops before y; b decodes next
    h.decodes_every_step = True
    h.run_until_done()


# -- abort -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["waiting", "prefill", "decode", "preempted"])
def test_abort_frees_everything_at_once(state):
    h = Harness(num_blocks=10, max_num_batched_tokens=8)
    a = make_request("a", prompt_len=7, max_tokens=10)
    b = make_request("b", prompt_len=20, max_tokens=10, media=[image("x", offset=8, num_tokens=8)])
    h.add(a, b)
    if state == "prefill":
        while not b.encoder_keys:
            h.step()
        assert 8 < b.num_computed_tokens < 16  # holds x, mid-prompt
    elif state == "decode":
        while not b.output_token_ids:
            h.step()
        assert b.status is RequestStatus.RUNNING and b.block_ids
    elif state == "preempted":
        while not b.num_preemptions:
            h.step()
        assert b.status is RequestStatus.PREEMPTED and b.output_token_ids
    assert b.status.value == {"waiting": "waiting", "preempted": "preempted"}.get(state, "running")
    assert h.abort("b") is b
    assert b.status is RequestStatus.FINISHED_ABORTED and b.block_ids == [] and not b.encoder_keys
    assert "b" not in h.encoder.request_keys and not any(h.encoder.refs.values())
    assert h.blocks.num_free_blocks == h.blocks.num_blocks - len(a.block_ids)
    assert h.abort("b") is None and h.abort("nobody") is None
    out = h.step()
    assert out.finished_request_ids == ["b"] and "b" not in ids(out)
    h.run_until_done()
    assert a.output_token_ids == [TOKEN] * 10


def test_abort_everything_mid_workload():
    h = Harness(num_blocks=12, max_num_batched_tokens=10, max_encoder_tiles_per_step=3)
    reqs = [
        make_request(
            f"r{i}", prompt_len=9, max_tokens=6, media=[image(f"h{i % 2}", offset=1 + i % 3)]
        )
        for i in range(6)
    ]
    h.add(*reqs)
    for _ in range(3):
        h.step()
    for r in reqs:
        h.abort(r.request_id)
    out = h.step()
    assert out.is_empty and sorted(out.finished_request_ids) == sorted(r.request_id for r in reqs)
    h.check_drained()


# -- scheduling policies ---------------------------------------------------------------------------


def first_scheduled(h: Harness) -> list[str]:
    """Runs the harness to the end; the ids in the order they first compute a token."""
    order: list[str] = []
    while h.sched.num_unfinished:
        order += [rid for rid in ids(h.step()) if rid not in order]
    h.run_until_done()
    return order


def test_fcfs_is_the_default_and_an_unknown_policy_is_refused():
    assert Harness().sched.policy.name == "fcfs"
    with pytest.raises(ValueError, match="lifo"):
        Harness(policy="lifo")


def test_priority_admits_lower_values_first_then_by_arrival():
    h = Harness(policy="priority", max_num_seqs=1)
    priorities = [2, 0, 1, 0, 2, -1]
    h.add(*[make_request(f"r{i}", 4, 2, priority=p) for i, p in enumerate(priorities)])
    assert [r.request_id for r in h.sched.waiting] == ["r5", "r1", "r3", "r2", "r0", "r4"]
    assert first_scheduled(h) == ["r5", "r1", "r3", "r2", "r0", "r4"]


def test_priority_ties_go_by_arrival_time_then_by_queue_order():
    h = Harness(policy="priority", max_num_seqs=1)
    reqs = [make_request(rid, 4, 1, priority=1) for rid in "abcd"]
    for r, t in zip(reqs, [5.0, 5.0, 5.0, 1.0]):
        r.arrival_time = t
    h.add(*reqs)
    assert first_scheduled(h) == ["d", "a", "b", "c"]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_the_policy_picks_the_victim_and_the_readmission_order(policy):
    h = Harness(num_blocks=5, policy=policy)  # 20 tokens
    a = make_request("a", prompt_len=9, max_tokens=8, priority=1)  # 3 blocks
    b = make_request("b", prompt_len=7, max_tokens=8, priority=0)  # 2 blocks
    h.add(a, b)
    h.step()
    h.step()
    assert h.blocks.num_free_blocks == 0 and (a.num_computed_tokens, b.num_computed_tokens) == (
        10,
        8,
    )
    out = h.step()  # b needs a third block
    if policy == "fcfs":  # the latest admitted yields: b itself
        assert ids(out) == ["a"] and out.preempted == [b]
    else:  # the largest (priority, arrival) yields, although it was scheduled first this step
        assert ids(out) == ["b"] and out.preempted == [a] and out.start_positions == [8]
        assert a.num_computed_tokens == 0 and a.output_token_ids == [TOKEN] * 2
    c = make_request("c", prompt_len=4, max_tokens=2, priority=0)
    d = make_request("d", prompt_len=4, max_tokens=2, priority=2)
    h.add(c, d)
    victim = out.preempted[0]
    if policy == "fcfs":  # back to the front: it arrived before the others
        assert list(h.sched.waiting) == [victim, c, d]
        assert first_scheduled(h) == ["a", "b", "c", "d"]
    else:  # back in (priority, arrival) order: c, which arrived later, outranks it
        assert list(h.sched.waiting) == [c, victim, d]
        assert first_scheduled(h) == ["b", "c", "a", "d"]
    assert all(r.output_token_ids == [TOKEN] * r.sampling_params.max_tokens for r in (a, b, c, d))


def test_priority_victim_among_equals_is_the_latest_admitted():
    h = Harness(num_blocks=5, policy="priority")
    a, b = make_request("a", prompt_len=9, max_tokens=8), make_request("b", prompt_len=7)
    a.arrival_time = b.arrival_time = 1.0
    h.add(a, b)
    h.step()
    h.step()
    out = h.step()  # b needs a third block; equal keys: b, admitted last, yields
    assert ids(out) == ["a"] and out.preempted == [b]
    h.run_until_done()


# -- n > 1 choices fork the leader's prompt --------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_choices_fork_the_leaders_prompt_kv(prefix_caching):
    h = Harness(prefix_caching=prefix_caching)
    leader, c1, c2 = make_choices(make_request("a", prompt_len=10, max_tokens=3), 3)
    h.add(leader, c1, c2)
    out = h.step()
    assert ids(out) == ["a"] and out.block_copies == []  # the choices wait for the prompt
    # forked right after: they share the 2 full blocks and own a copy of the partial one
    assert h.forked == ["a#1", "a#2"] and c1.status is c2.status is RequestStatus.RUNNING
    assert [h.blocks.ref_counts[b] for b in leader.block_ids] == [3, 3, 1]
    assert len({leader.block_ids[2], c1.block_ids[2], c2.block_ids[2]}) == 3
    assert (c1.num_cached_tokens, c2.num_cached_tokens, leader.num_cached_tokens) == (9, 9, 0)
    out = h.step()  # each choice computes the last prompt token itself and samples
    assert ids(out) == ["a", "a#1", "a#2"] and out.start_positions == [10, 9, 9]
    assert out.num_scheduled_tokens == [1, 1, 1] and out.sample == [True] * 3
    src = leader.block_ids[2]
    assert out.block_copies == [(src, c1.block_ids[2]), (src, c2.block_ids[2])]
    lookups = 10 if prefix_caching else 0  # the leader's own lookup
    assert h.blocks.stats()["queries"] == lookups + 2 * 10
    assert h.blocks.stats()["hits"] == 2 * 9
    h.run_until_done()
    assert c1.output_token_ids == c2.output_token_ids == [TOKEN] * 3


def test_a_block_aligned_prompt_forks_without_a_copy():
    h = Harness(prefix_caching=False)
    leader, child = make_choices(make_request("a", prompt_len=9, max_tokens=2), 2)
    h.add(leader, child)
    h.step()
    shared = leader.block_ids[:2]
    assert child.block_ids == shared and child.num_computed_tokens == 8
    out = h.step()
    assert out.block_copies == [] and out.start_positions == [9, 8]
    assert child.block_ids[:2] == shared and len(child.block_ids) == 3
    h.run_until_done()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_leader_finishing_in_its_prompt_step_still_shares_the_prompt(prefix_caching):
    h = Harness(num_blocks=6, prefix_caching=prefix_caching)
    leader, child = make_choices(make_request("a", prompt_len=10, max_tokens=1), 2, max_tokens=2)
    h.add(leader, child)
    h.step()  # the child forked before the leader finished
    assert leader.is_finished and h.forked == ["a#1"] and child.num_computed_tokens == 9
    filler = make_request("f", prompt_len=12, max_tokens=2)
    h.add(filler)
    out = h.step()
    assert ids(out) == ["a#1", "f"] and out.start_positions == [9, 0]
    ((src, dst),) = out.block_copies
    # the leader's partial block went back to the free queue and is rewritten in this very step:
    # the runner copies before the forward (the fake runner checks what the child reads)
    assert dst == child.block_ids[2] and src in filler.block_ids
    h.run_until_done()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_choices_of_an_aborted_leader_run_on_their_own(prefix_caching):
    h = Harness(max_num_batched_tokens=8, prefix_caching=prefix_caching)
    leader, c1, c2 = make_choices(make_request("a", prompt_len=20, max_tokens=2), 3)
    h.add(leader, c1, c2)
    h.step()
    h.step()
    assert leader.num_computed_tokens == 16 and c1.status is RequestStatus.WAITING
    h.abort("a")
    out = h.step()
    if prefix_caching:  # the leader's full blocks are cached: both hit them
        assert ids(out) == ["a#1", "a#2"] and out.start_positions == [16, 16]
        assert c1.num_cached_tokens == c2.num_cached_tokens == 16
    else:
        assert ids(out) == ["a#1"] and out.start_positions == [0]
    h.run_until_done()
    assert not h.forked


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_choices_of_a_preempted_leader_fork_from_its_recompute(prefix_caching):
    h = Harness(num_blocks=6, max_num_batched_tokens=4, prefix_caching=prefix_caching)
    x = make_request("x", prompt_len=5, max_tokens=8)
    leader, c1, c2 = make_choices(make_request("a", prompt_len=14, max_tokens=3), 3)
    h.add(x, leader, c1, c2)
    starts: dict[str, int] = {}
    while h.sched.num_unfinished:
        out = h.step()
        if leader in out.preempted:
            assert not leader.output_token_ids and not h.forked  # mid-prompt
        for r, start in zip(out.requests, out.start_positions):
            starts.setdefault(r.request_id, start)
    h.run_until_done()
    assert leader.num_preemptions == 1 and h.forked == ["a#1", "a#2"]
    assert starts["a#1"] == starts["a#2"] == 13 and c1.num_cached_tokens == 13


def test_aborting_a_forked_choice_keeps_the_shared_blocks():
    h = Harness()
    leader, c1, c2 = make_choices(make_request("a", prompt_len=10, max_tokens=4), 3)
    h.add(leader, c1, c2)
    h.step()
    h.abort("a#1")  # before its copy reached the runner
    assert [h.blocks.ref_counts[b] for b in leader.block_ids] == [2, 2, 1]
    out = h.step()
    assert ids(out) == ["a", "a#2"] and out.block_copies == [(leader.block_ids[2], c2.block_ids[2])]
    h.abort("a")
    assert [h.blocks.ref_counts[b] for b in c2.block_ids] == [1, 1, 1]
    h.run_until_done()
    assert c2.output_token_ids == [TOKEN] * 4


def test_choices_without_a_sequence_slot_fork_later_while_the_leader_runs():
    h = Harness(max_num_seqs=2)
    leader, c1, c2 = make_choices(make_request("a", prompt_len=10, max_tokens=6), 3, max_tokens=1)
    c2.sampling_params = SamplingParams(max_tokens=2)
    h.add(leader, c1, c2)
    h.step()
    assert h.forked == ["a#1"] and c2.status is RequestStatus.WAITING
    assert ids(h.step()) == ["a", "a#1"] and c1.is_finished
    out = h.step()  # a slot is free: c2 forks at admission, its copy in the same step
    assert ids(out) == ["a", "a#2"] and out.start_positions == [11, 9]
    assert out.block_copies == [(leader.block_ids[2], c2.block_ids[2])]
    h.run_until_done()
    assert h.forked == ["a#1", "a#2"] and c2.num_cached_tokens == 9


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_choices_without_a_slot_run_on_their_own_once_the_leader_is_gone(prefix_caching):
    h = Harness(max_num_seqs=2, prefix_caching=prefix_caching)
    leader, c1, c2 = make_choices(make_request("a", prompt_len=10, max_tokens=1), 3, max_tokens=3)
    h.add(leader, c1, c2)
    h.step()
    assert leader.is_finished and h.forked == ["a#1"]
    out = h.step()
    assert ids(out) == ["a#1", "a#2"]
    assert out.start_positions == [9, 8 if prefix_caching else 0]
    h.run_until_done()


def test_choices_fork_once_a_kv_block_is_free():
    h = Harness(num_blocks=4)
    other = make_request("o", prompt_len=3, max_tokens=2)
    leader, child = make_choices(make_request("a", prompt_len=10, max_tokens=4), 2)
    h.add(other, leader, child)
    h.step()  # the cache is full: no block for the child's copy
    assert h.blocks.num_free_blocks == 0 and child.status is RequestStatus.WAITING
    h.step()  # o finishes, after the step
    out = h.step()
    assert ids(out) == ["a", "a#1"] and out.start_positions == [11, 9]
    assert out.block_copies == [(leader.block_ids[2], child.block_ids[2])]
    h.run_until_done()


def test_a_choice_with_another_prompt_does_not_wait_or_fork():
    h = Harness()
    leader = make_request("a", prompt_len=10, max_tokens=2)
    other = make_request("b", prompt_len=10, max_tokens=2)
    other.prefix_parent = "a"
    h.add(leader, other)
    assert ids(h.step()) == ["a", "b"]
    h.run_until_done()
    assert not h.forked


@pytest.mark.parametrize("seed", range(6))
def test_random_workload(seed):
    random_workload(seed, max_media=1)


def test_random_workload_keeps_every_decode_flowing():
    for seed in range(6):
        random_workload(seed, max_media=1, decodes_every_step=True)


def test_random_workload_with_several_images_per_prompt():
    for seed in range(6):
        random_workload(seed, max_media=3)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_random_workload_with_choices(policy, prefix_caching):
    for seed in range(6):
        random_workload(
            seed,
            max_media=2,
            choices=True,
            policy=policy,
            prefix_caching=prefix_caching,
            decodes_every_step=True,
        )


@pytest.mark.parametrize("seed", range(3))
def test_random_workload_with_priorities(seed):
    random_workload(seed, max_media=1, policy="priority", decodes_every_step=seed == 0)
