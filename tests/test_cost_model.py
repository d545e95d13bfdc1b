"""The step cost model, fed synthetic step timings (no clock)."""

from __future__ import annotations

import random

import pytest

from plm_core.engine.cost_model import StepCostModel

BASE, DECODE, TOKEN, TILE = 0.020, 0.001, 0.0001, 0.010


def true_cost(decodes: int, tokens: int = 0, tiles: int = 0) -> float:
    return BASE + DECODE * decodes + TOKEN * tokens + TILE * tiles


def test_nothing_until_enough_decode_steps():
    model = StepCostModel(tokens_per_tile=256, min_steps=4)
    model.observe(0, 3000, 0, 0.5)  # a prefill alone is no decode step
    for n in (1, 2, 3):
        model.observe(n, 0, 0, 0.01 * n)
    assert not model.ready and model.costs() is None
    model.observe(4, 0, 0, 0.04)
    assert model.costs() is not None


def test_recovers_decode_prefill_and_tile_prices_with_noise():
    rng = random.Random(0)
    model = StepCostModel(tokens_per_tile=256)

    def noise() -> float:
        return rng.uniform(-1e-4, 1e-4)

    for _ in range(200):
        decodes = rng.choice([1, 4, 8, 16])
        model.observe(decodes, 0, 0, true_cost(decodes) + noise())
    for _ in range(50):  # prefill chunks, alone and beside decodes
        decodes, tokens = rng.choice([0, 4]), rng.choice([64, 512, 3000])
        model.observe(decodes, tokens, 0, true_cost(decodes, tokens) + noise())
    for _ in range(20):
        decodes, tokens, tiles = rng.choice([0, 4]), rng.choice([16, 3000]), rng.choice([1, 13])
        model.observe(decodes, tokens, tiles, true_cost(decodes, tokens, tiles) + noise())
    c = model.costs()
    assert c.base_s == pytest.approx(BASE, abs=1e-3)
    assert c.per_decode_s == pytest.approx(DECODE, rel=0.05)
    assert c.per_token_s == pytest.approx(TOKEN, rel=0.05)
    assert c.per_tile_s == pytest.approx(TILE, rel=0.05)
    assert c.step_s(4, 100, 2) == pytest.approx(true_cost(4, 100, 2), rel=0.05)


def test_a_long_prefill_does_not_make_tiles_free():
    """Decodes that cost ten prefill tokens each must not price a 3,000-token photo prefill at ten
    times its cost, which would leave nothing (or less) for its tiles and make them look free."""
    model = StepCostModel(tokens_per_tile=256)
    for decodes in (1, 4, 1, 4, 1, 4, 1, 4):
        model.observe(decodes, 0, 0, true_cost(decodes))
    model.observe(0, 3000, 13, true_cost(0, 3000, 13))  # the photo, alone, in one step
    c = model.costs()
    assert c.per_tile_s > 0
    # no prefill-only step seen yet: a prefill token is priced as a decode (cautious)
    assert c.per_token_s == pytest.approx(DECODE)
    model.observe(0, 2000, 0, true_cost(0, 2000))
    c = model.costs()
    assert c.per_token_s == pytest.approx(TOKEN)
    assert c.per_tile_s == pytest.approx(TILE)


def test_cautious_prices_until_seen_or_when_nothing_is_left():
    model = StepCostModel(tokens_per_tile=256)
    for decodes in range(1, 20):
        model.observe(decodes, 0, 0, true_cost(decodes))
    c = model.costs()
    assert c.per_token_s == pytest.approx(c.per_decode_s)
    assert c.per_tile_s == pytest.approx(256 * c.per_token_s)
    # a step faster than its decodes alone predict leaves nothing for its tokens: still cautious
    model.observe(4, 100, 0, 0.5 * true_cost(4))
    assert model.costs().per_token_s == pytest.approx(c.per_decode_s)


def test_no_spread_puts_the_time_on_the_decodes():
    """Steps all of one size cannot separate the fixed part: decodes take all of it (cautious)."""
    model = StepCostModel(tokens_per_tile=4)
    for _ in range(10):
        model.observe(8, 0, 0, 0.04)
    costs = model.costs()
    assert costs.base_s == 0 and costs.per_decode_s == pytest.approx(0.005)


def test_ignores_empty_steps_and_keeps_a_window():
    model = StepCostModel(tokens_per_tile=4, window=16, min_steps=4)
    model.observe(0, 0, 0, 0.5)
    model.observe(5, 0, 0, 0.0)
    assert not model.ready
    for decodes in range(1, 40):  # an old regime...
        model.observe(decodes, 0, 0, 1.0 * decodes)
    for decodes in range(1, 17):  # ...forgotten once the window holds only the new one
        model.observe(decodes, 0, 0, 0.001 * decodes)
    assert model.costs().per_decode_s == pytest.approx(0.001)
