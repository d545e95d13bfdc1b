"""The step cost model, fed synthetic step timings (no clock)."""

from __future__ import annotations

import random

import pytest

from plm_core.engine.cost_model import StepCostModel


def test_nothing_until_enough_steps():
    model = StepCostModel(tokens_per_tile=256, min_steps=4)
    for n in (1, 2, 3):
        model.observe(n, 0, 0.01 * n)
    assert not model.ready and model.costs() is None
    model.observe(4, 0, 0.04)
    assert model.costs() is not None


def test_recovers_a_linear_cost_with_noise():
    rng = random.Random(0)
    model = StepCostModel(tokens_per_tile=256)
    for _ in range(200):
        tokens = rng.choice([4, 8, 16, 200, 512])
        model.observe(tokens, 0, 0.020 + 0.0005 * tokens + rng.uniform(-1e-4, 1e-4))
    for _ in range(20):
        tokens, tiles = rng.choice([4, 8]), rng.choice([1, 2, 4])
        model.observe(tokens, tiles, 0.020 + 0.0005 * tokens + 0.030 * tiles)
    costs = model.costs()
    assert costs.base_s == pytest.approx(0.020, abs=1e-3)
    assert costs.per_token_s == pytest.approx(0.0005, rel=0.02)
    assert costs.per_tile_s == pytest.approx(0.030, rel=0.05)
    assert costs.step_s(10, 2) == pytest.approx(0.020 + 0.005 + 0.060, rel=0.05)


def test_a_tile_costs_its_tokens_until_one_is_seen():
    model = StepCostModel(tokens_per_tile=256)
    for tokens in range(1, 20):
        model.observe(tokens, 0, 0.01 + 0.001 * tokens)
    costs = model.costs()
    assert costs.per_tile_s == pytest.approx(256 * costs.per_token_s)


def test_no_spread_puts_the_time_on_the_tokens():
    """Steps all of one size cannot separate the fixed part: tokens take all of it (cautious)."""
    model = StepCostModel(tokens_per_tile=4)
    for _ in range(10):
        model.observe(8, 0, 0.04)
    costs = model.costs()
    assert costs.base_s == 0 and costs.per_token_s == pytest.approx(0.005)


def test_ignores_empty_steps_and_keeps_a_window():
    model = StepCostModel(tokens_per_tile=4, window=16, min_steps=4)
    model.observe(0, 0, 0.5)
    model.observe(5, 0, 0.0)
    assert not model.ready
    for tokens in range(1, 40):  # an old regime...
        model.observe(tokens, 0, 1.0 * tokens)
    for tokens in range(1, 17):  # ...forgotten once the window holds only the new one
        model.observe(tokens, 0, 0.001 * tokens)
    assert model.costs().per_token_s == pytest.approx(0.001)
