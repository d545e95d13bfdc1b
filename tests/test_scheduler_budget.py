"""Scheduler step budget: steps that carry decodes stay within a time target (stall-free batching).

A fake cost model in round numbers (no timing): a step costs base_s, plus per_token_s per LM token,
plus per_tile_s per encoder tile. The harness checks the budget (or its floor) on every step.
"""

from __future__ import annotations

import math

import pytest
from scheduler_harness import (
    Harness,
    TraceStep,
    encoded,
    ids,
    image,
    make_request,
    random_workload,
)

from plm_core.engine.scheduler import StepBudget as SchedulerStepBudget
from plm_core.engine.step_budget import FLOOR_TOKENS, StepBudget

# 32 seconds beside the fixed cost: 32 tokens' worth, a tile costs 4 tokens
BUDGET = StepBudget(target_s=42.0, base_s=10.0, per_token_s=1.0, per_tile_s=4.0)
# nothing beside the fixed cost: every step with decodes falls back to the floor
TIGHT = StepBudget(target_s=10.0, base_s=10.0, per_token_s=1.0, per_tile_s=4.0)


def cost(out) -> float:
    return BUDGET.cost_s(out.total_num_scheduled_tokens, out.total_num_encoder_tiles)


def with_two_decodes(budget: StepBudget | None, **config) -> Harness:
    """A harness whose requests a and b decode from the second step on."""
    h = Harness(**config)
    h.decodes_every_step = True
    h.budget = budget
    h.add(make_request("a", 5, 40), make_request("b", 6, 40))
    assert h.step().num_scheduled_tokens == [5, 6]  # no decode yet: the budget does not apply
    return h


def test_the_step_budget_is_a_frozen_dataclass_checked_at_creation():
    assert SchedulerStepBudget is StepBudget  # the scheduler module exports it too
    with pytest.raises(AttributeError):
        BUDGET.target_s = 1.0  # type: ignore[misc]
    assert BUDGET.tile_tokens == 4.0 and BUDGET.cost_s(10, 2) == 28.0
    bads = (dict(per_token_s=0.0), dict(per_tile_s=-1.0), dict(base_s=-1.0), dict(per_decode_s=-1))
    for bad in bads:
        with pytest.raises(ValueError):
            StepBudget(**{**dict(target_s=1.0, base_s=0.1, per_token_s=0.1, per_tile_s=0), **bad})


def test_decodes_are_paid_at_their_own_price():
    """A decode (a sampled row through the LM head) may cost many prefill tokens: the allowance
    left for prefill is what the decodes at their price leave, in prefill tokens."""
    dear = StepBudget(target_s=42.0, base_s=10.0, per_token_s=1.0, per_tile_s=4.0, per_decode_s=3.0)
    assert dear.allowance(2, chunked_prefill=True).tokens == 42 - 10 - 2 * 3.0
    assert BUDGET.allowance(2, chunked_prefill=True).tokens == 42 - 10 - 2 * 1.0
    assert dear.cost_s(5, 1, num_decodes=2) == 10 + 5 + 4 + 6


def test_prefill_chunks_next_to_decodes_fit_the_budget():
    h = with_two_decodes(BUDGET)
    c = make_request("c", prompt_len=100, max_tokens=1)
    h.add(c)
    chunks = []
    while not c.is_finished:
        out = h.step()
        assert ids(out)[:2] == ["a", "b"] and out.num_scheduled_tokens[:2] == [1, 1]
        assert cost(out) <= BUDGET.target_s
        chunks.append(out.num_scheduled_tokens[2])
    assert chunks == [30, 30, 30, 10]  # 32 tokens' worth, 2 of them the decodes
    h.run_until_done()


def test_admissions_share_the_budget():
    h = with_two_decodes(BUDGET)
    h.add(*(make_request(rid, prompt_len=20, max_tokens=1) for rid in "cde"))
    out = h.step()
    assert (ids(out), out.start_positions, out.num_scheduled_tokens) == (
        ["a", "b", "c", "d"],
        [5, 6, 0, 0],
        [1, 1, 20, 10],
    )
    assert cost(out) == BUDGET.target_s and h.sched.waiting.peek().request_id == "e"
    h.run_until_done()


def test_encoder_tiles_are_charged_in_the_same_budget():
    h = with_two_decodes(BUDGET)
    x = image("x", offset=4, num_tokens=16, num_tiles=8)
    c = make_request("c", prompt_len=40, media=[x], max_tokens=1)
    h.add(c)
    out = h.step()  # 30 tokens' worth: the 4 tokens before x, then 6 tiles (24); nothing after x
    assert out.num_scheduled_tokens == [1, 1, 4] and encoded(out) == [("x", 0, 6)]
    out = h.step()  # x's last 2 tiles (8), then 22 tokens
    assert out.num_scheduled_tokens == [1, 1, 22] and encoded(out) == [("x", 6, 8)]
    assert cost(out) == BUDGET.target_s
    h.run_until_done()


def test_a_step_with_no_room_left_still_makes_the_floor_of_prefill_progress():
    h = with_two_decodes(TIGHT)
    c = make_request("c", prompt_len=40, max_tokens=1)
    d = make_request("d", prompt_len=4, max_tokens=1)
    h.add(c, d)
    chunks = []
    while not c.is_finished:
        out = h.step()
        assert ids(out)[:2] == ["a", "b"]
        chunks.append((ids(out)[2:], out.num_scheduled_tokens[2:]))
    # the oldest prefill gets the floor, 16 tokens (or what it has left); nothing else
    assert chunks == [(["c"], [16]), (["c"], [16]), (["c"], [8])]
    assert d.num_computed_tokens == 0
    h.run_until_done()


def test_the_floor_is_one_tile_when_a_tile_costs_more_than_its_tokens():
    pricey = StepBudget(target_s=10.0, base_s=10.0, per_token_s=1.0, per_tile_s=20.0)
    h = with_two_decodes(pricey)
    c = make_request("c", prompt_len=30, media=[image("x", 0, num_tiles=3)], max_tokens=1)
    h.add(c)
    steps = [(h.step(), c.num_computed_tokens) for _ in range(4)]
    assert [encoded(out) for out, _ in steps] == [[("x", 0, 1)], [("x", 1, 2)], [("x", 2, 3)], []]
    # a tile's worth (20 tokens) once x is complete
    assert [computed for _, computed in steps] == [0, 0, 0, 20]
    h.run_until_done()


def test_without_chunked_prefill_the_floor_is_the_first_whole_prompt():
    h = with_two_decodes(TIGHT, chunked_prefill=False)
    c = make_request("c", prompt_len=40, max_tokens=1)
    d = make_request("d", prompt_len=4, max_tokens=1)
    h.add(c, d)
    out = h.step()
    assert ids(out) == ["a", "b", "c"] and out.num_scheduled_tokens == [1, 1, 40]
    out = h.step()
    assert ids(out) == ["a", "b", "d"]
    h.run_until_done()


def test_the_config_limits_still_apply_under_a_generous_budget():
    roomy = StepBudget(target_s=1e6, base_s=0.0, per_token_s=1.0, per_tile_s=1.0)
    h = with_two_decodes(roomy, max_num_batched_tokens=32, max_encoder_tiles_per_step=4)
    c = make_request("c", prompt_len=60, media=[image("x", 2, num_tiles=6)], max_tokens=1)
    h.add(c)
    out = h.step()
    assert out.num_scheduled_tokens == [1, 1, 2] and encoded(out) == [("x", 0, 4)]
    out = h.step()
    assert out.num_scheduled_tokens == [1, 1, 30] and encoded(out) == [("x", 4, 6)]
    h.run_until_done()


def run_to_first_token(budget: StepBudget | None) -> list[TraceStep]:
    h = Harness(max_num_batched_tokens=64)
    h.budget = budget
    x = image("x", offset=10, num_tokens=16, num_tiles=8)
    h.add(make_request("a", prompt_len=100, media=[x]), make_request("b", prompt_len=60))
    while not h.sched.running or not any(r.output_token_ids for r in h.sched.running):
        h.step()
    assert h.budget_steps == 0
    return h.trace


def test_a_step_without_decodes_ignores_the_budget():
    trace = run_to_first_token(TIGHT)
    assert [(t[0], t[2]) for t in trace] == [(["a"], [64]), (["a", "b"], [36, 28])]
    assert trace == run_to_first_token(None)


def budget_trace(budget: StepBudget | None, seed: int) -> list[TraceStep]:
    return random_workload(seed, max_media=2, budget=budget, decodes_every_step=True).trace


@pytest.mark.parametrize("seed", range(3))
def test_a_budget_that_never_binds_changes_nothing(seed):
    never = StepBudget(target_s=math.inf, base_s=0.0, per_token_s=1.0, per_tile_s=1.0)
    assert budget_trace(never, seed) == budget_trace(None, seed)


@pytest.mark.parametrize(
    "budget",
    [
        BUDGET,
        TIGHT,  # the floor every step
        StepBudget(target_s=0.012, base_s=0.004, per_token_s=0.001, per_tile_s=0.0025),
        StepBudget(target_s=30.0, base_s=10.0, per_token_s=1.0, per_tile_s=0.0),  # free tiles
        StepBudget(target_s=10.0, base_s=5.0, per_token_s=1.0, per_tile_s=20.0),  # pricey tiles
    ],
)
def test_random_workload_with_a_step_budget(budget):
    for seed in range(4):
        h = random_workload(seed, max_media=2, budget=budget, decodes_every_step=True)
        assert h.budget_steps > 0


def test_random_workload_with_choices_and_priorities_under_a_budget():
    for seed in range(3):
        h = random_workload(
            seed,
            max_media=2,
            choices=True,
            policy="priority",
            budget=TIGHT,
            decodes_every_step=True,
        )
        assert h.budget_steps > 0


def test_the_floor_covers_sixteen_tokens():
    assert FLOOR_TOKENS == 16
    allowance = TIGHT.allowance(3, chunked_prefill=True)
    assert allowance.available == 16 and allowance.token_cap(100) == 16
    allowance.charge(16, 0)
    assert allowance.available == 0 and allowance.token_cap(100) == 0
