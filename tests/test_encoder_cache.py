"""EncoderCacheManager: hits and misses, pinning by references, LRU eviction, budget (CPU)."""

from __future__ import annotations

import random

import pytest

from plm_core.engine.encoder_cache import EncoderCacheManager
from plm_core.engine.encoder_plan import EncoderPlanner
from plm_core.engine.request import Request
from plm_core.engine.step_budget import Allowance
from plm_core.inputs import ImageSettings, MediaItem
from plm_core.sampling import SamplingParams


def test_miss_then_hit():
    cache = EncoderCacheManager(budget_tokens=100)
    item = MediaItem("image", "hashA", ImageSettings(), num_tiles=2, num_tokens=8, offset=5)
    assert not cache.has(item.cache_key)
    assert cache.allocate("r1", item.cache_key, item.num_tokens) == []
    assert cache.has(item.cache_key) and cache.used_tokens == 8
    cache.release("r1", item.cache_key)
    assert cache.has(item.cache_key)  # stays resident, now evictable
    cache.acquire("r2", item.cache_key)
    assert cache.stats() == {
        "hits": 1,
        "misses": 1,
        "hit_rate": 0.5,
        "used_tokens": 8,
        "budget_tokens": 100,
        "entries": 1,
    }
    cache.check_invariants()


def test_references_prevent_eviction():
    cache = EncoderCacheManager(budget_tokens=20)
    cache.allocate("r1", "a", 12)
    assert not cache.can_allocate(10)
    with pytest.raises(ValueError):
        cache.allocate("r2", "b", 10)
    assert cache.has("a") and cache.used_tokens == 12
    cache.acquire("r2", "a")
    cache.release("r1", "a")
    assert not cache.can_allocate(10)  # r2 still holds it
    cache.release("r2", "a")
    assert cache.can_allocate(10)
    assert cache.allocate("r3", "b", 10) == ["a"]
    assert not cache.has("a") and cache.used_tokens == 10
    cache.check_invariants()


def test_lru_eviction_of_unreferenced_entries():
    cache = EncoderCacheManager(budget_tokens=30)
    for key in "abc":
        cache.allocate("r", key, 10)
    cache.release_all("r")
    cache.acquire("s", "a")  # a becomes most recently used and pinned
    cache.release("s", "a")
    assert cache.allocate("t", "d", 10) == ["b"]
    assert cache.allocate("t", "e", 20) == ["c", "a"]
    assert cache.stats()["entries"] == 2 and cache.used_tokens == 30
    cache.check_invariants()


def test_eviction_skips_referenced_entries():
    cache = EncoderCacheManager(budget_tokens=30)
    cache.allocate("r1", "a", 10)
    cache.allocate("r2", "b", 10)
    cache.allocate("r3", "c", 10)
    cache.release("r2", "b")
    cache.release("r3", "c")
    assert cache.allocate("r4", "d", 15) == ["b", "c"]  # "a" is older but pinned
    assert cache.has("a") and cache.used_tokens == 25
    cache.check_invariants()


def test_release_all():
    cache = EncoderCacheManager(budget_tokens=40)
    cache.allocate("r1", "a", 10)
    cache.allocate("r1", "b", 10)
    cache.acquire("r2", "b")
    cache.release_all("r1")
    cache.check_invariants()
    assert cache.can_allocate(30) and not cache.can_allocate(31)  # b is still held by r2
    cache.release_all("r1")  # idempotent
    cache.release_all("r2")
    assert cache.can_allocate(40)
    cache.check_invariants()


def test_references_are_counted():
    cache = EncoderCacheManager(budget_tokens=10)
    cache.allocate("r", "a", 10)
    cache.acquire("r", "a")  # the same image twice in one prompt
    cache.release("r", "a")
    assert not cache.can_allocate(1)  # the second use still pins it
    cache.release("r", "a")
    cache.release("r", "a")  # extra release: no-op
    assert cache.can_allocate(10)
    cache.check_invariants()


def test_allocate_of_resident_key_is_a_hit():
    cache = EncoderCacheManager(budget_tokens=10)
    cache.allocate("r1", "a", 10)
    assert cache.allocate("r2", "a", 10) == []
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    cache.release_all("r1")
    assert not cache.can_allocate(1)
    cache.check_invariants()


def test_item_larger_than_budget():
    cache = EncoderCacheManager(budget_tokens=16)
    assert not cache.can_allocate(17)
    with pytest.raises(ValueError):
        cache.allocate("r", "big", 17)
    assert cache.used_tokens == 0 and not cache.has("big")
    with pytest.raises(KeyError):
        cache.acquire("r", "missing")
    cache.check_invariants()


@pytest.mark.parametrize("seed", [0, 1])
def test_random_workload(seed):
    rng = random.Random(seed)
    cache = EncoderCacheManager(budget_tokens=64)
    sizes = {f"k{i}": rng.choice([4, 8, 16, 32]) for i in range(12)}
    held: dict[str, list[str]] = {}
    for _ in range(400):
        action = rng.random()
        rid = f"r{rng.randrange(8)}"
        if action < 0.6:
            key = rng.choice(list(sizes))
            if cache.has(key):
                cache.acquire(rid, key)
                held.setdefault(rid, []).append(key)
            elif cache.can_allocate(sizes[key]):
                evicted = cache.allocate(rid, key, sizes[key])
                assert key not in evicted
                assert not any(k in keys for keys in held.values() for k in evicted)
                held.setdefault(rid, []).append(key)
        elif action < 0.85 and held.get(rid):
            key = held[rid].pop(rng.randrange(len(held[rid])))
            cache.release(rid, key)
        else:
            cache.release_all(rid)
            held.pop(rid, None)
        cache.check_invariants()
        for keys in held.values():
            assert all(cache.has(k) for k in keys)
    for rid in list(held):
        cache.release_all(rid)
    assert cache.can_allocate(64)
    assert cache.stats()["hits"] > 0 and cache.stats()["misses"] > 0
    cache.check_invariants()


# -- planning --------------------------------------------------------------------------------------


def test_planning_changes_nothing_until_the_plan_is_applied():
    cache = EncoderCacheManager(budget_tokens=64)
    planner = EncoderPlanner(cache)
    item = MediaItem("image", "x", ImageSettings(), num_tiles=3, num_tokens=12, offset=2)
    req = Request("r", list(range(20)), SamplingParams(), media=[item])
    step = planner.begin_step(tile_budget=2)
    plan = planner.plan(req, 0, 20, step)
    # 2 of the 3 tiles fit this step: the chunk stops before the item
    assert plan.num_tokens == 2 and plan.items == [(item, (0, 2))] and plan.encodes
    assert req.num_computed_tokens == 0 and not req.encoder_keys and not cache.has(item.cache_key)
    assert step.tile_budget == 2 and step.inputs == []
    planner.apply(req, plan, step)
    assert step.tile_budget == 0 and step.inputs == [item] and step.tile_ranges == [(0, 2)]
    assert planner.partial == {item.cache_key: 2} and req.encoder_keys == {item.cache_key}
    assert planner.plan(req, 2, 18, step).num_tokens == 0  # no budget left this step
    step = planner.begin_step(tile_budget=2)
    plan = planner.plan(req, 2, 18, step)  # the last tile: the chunk runs through the item
    assert plan.num_tokens == 18 and plan.items == [(item, (2, 3))]
    planner.apply(req, plan, step)
    assert planner.partial == {} and step.tile_budget == 1
    req.num_computed_tokens = 20
    planner.release_passed(req)
    assert not req.encoder_keys and cache.has(item.cache_key)
    assert not cache.is_referenced(item.cache_key)
    cache.check_invariants()


def test_an_allowance_pays_for_the_tokens_before_an_item_then_its_tiles():
    cache = EncoderCacheManager(budget_tokens=64)
    planner = EncoderPlanner(cache)
    x = MediaItem("image", "x", ImageSettings(), num_tiles=4, num_tokens=8, offset=6)
    y = MediaItem("image", "y", ImageSettings(), num_tiles=1, num_tokens=4, offset=20)
    req = Request("r", list(range(30)), SamplingParams(), media=[x, y])
    step = planner.begin_step(tile_budget=8)
    # 20 token equivalents, a tile costs 3: 6 tokens before x, then 4 tiles (12), 2 tokens left
    allowance = Allowance(tokens=20.0, tile_tokens=3.0, floor=0.0)
    plan = planner.plan(req, 0, 20, step, allowance)
    assert plan.num_tokens == 8 and plan.items == [(x, (0, 4))] and plan.num_tiles == 4
    # 14: the tokens before x, then 2 tiles; the chunk stops before x
    plan = planner.plan(req, 0, 14, step, Allowance(tokens=14.0, tile_tokens=3.0, floor=0.0))
    assert plan.num_tokens == 6 and plan.items == [(x, (0, 2))]
    # y is complete (no tiles), but the cut chunk does not reach it: it is not referenced
    planner.apply(req, planner.plan(req, 0, 30, planner.begin_step(8)), step)
    req.num_computed_tokens = 18
    plan = planner.plan(req, 18, 12, planner.begin_step(8), Allowance(2.0, 3.0, 0.0))
    assert plan.num_tokens == 2 and plan.items == []
    assert planner.plan(req, 18, 12, planner.begin_step(8), None).items == [(y, None)]


def test_the_allowance_floor_serves_the_first_work_only():
    allowance = Allowance(tokens=-5.0, tile_tokens=4.0, floor=16.0)
    assert allowance.available == 16 and allowance.token_cap(10) == 10
    allowance.charge(0, 0)  # no work: the floor stays
    assert allowance.token_cap(100) == 16
    allowance.charge(0, 2)
    assert allowance.tokens == -13.0 and allowance.available == 0 and allowance.token_cap(9) == 0
