"""BlockManager: allocation, sharing, prefix hashing with media, LRU eviction, forks (CPU)."""

from __future__ import annotations

import random

import pytest

from plm_core.engine.block_manager import BlockManager, block_extra_keys, hash_block
from plm_core.engine.request import Request
from plm_core.inputs import ImageSettings, MediaItem
from plm_core.sampling import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], media: list[MediaItem] | None = None) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(),
        media=media or [],
    )


def image(
    content_hash: str = "hashA",
    offset: int = 2,
    num_tokens: int = 8,
    settings: ImageSettings = ImageSettings(),
) -> MediaItem:
    return MediaItem(
        "image", content_hash, settings, num_tiles=2, num_tokens=num_tokens, offset=offset
    )


def admit(bm: BlockManager, req: Request) -> int:
    """What the scheduler does for a new request: reuse cached blocks, allocate the rest."""
    blocks, num_cached = bm.get_computed_blocks(req)
    assert bm.allocate_slots(req, req.num_tokens - num_cached, blocks)
    req.num_computed_tokens = req.num_tokens
    bm.cache_blocks(req, req.num_computed_tokens)
    return num_cached


def media_prompt(n: int = 16) -> list[int]:
    tokens = list(range(100, 100 + n))
    tokens[2:10] = [7] * 8  # image placeholders at offset 2
    return tokens


# -- hashing -------------------------------------------------------------------------------------


def test_hash_block_is_chained_and_deterministic():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [5, 6]) != hash_block(None, [5, 6])
    assert hash_block(None, [1], (("k", 0),)) != hash_block(None, [1])
    assert isinstance(a, bytes)
    # the same on every machine and in every version (a stored hash must keep finding its block)
    golden = "c8e3305581280ba995c374d40afed5596fd048cc247a72b45bbe7c0422997047"
    assert hash_block(None, [1, 2, 3, 4], (("k", 0),)).hex() == golden


def test_block_extra_keys():
    req = make_request("r", media_prompt(), [image(offset=2, num_tokens=8)])
    assert block_extra_keys(req, 0, 2) == ()
    assert block_extra_keys(req, 0, 4) == ((req.media[0].cache_key, 0),)
    assert block_extra_keys(req, 4, 8) == ((req.media[0].cache_key, 2),)
    assert block_extra_keys(req, 8, 12) == ((req.media[0].cache_key, 6),)
    assert block_extra_keys(req, 12, 16) == ()


def test_block_hashes_chain_hash_block_as_the_request_grows():
    # two items over blocks 0-2, then outputs appended: hashes extend, never change
    req = make_request(
        "r", media_prompt(22), [image(offset=2, num_tokens=8), image("hashB", 14, 5)]
    )
    bm = BlockManager(8, BS)

    def expected() -> list[bytes]:
        chain: list[bytes] = []
        tokens = req.all_token_ids
        for i in range(req.num_tokens // BS):
            start, end = i * BS, (i + 1) * BS
            parent = chain[-1] if chain else None
            chain.append(hash_block(parent, tokens[start:end], block_extra_keys(req, start, end)))
        return chain

    assert bm.compute_block_hashes(req) == expected() and len(req.block_hashes) == 5
    req.output_token_ids += [2**31 - 1, -1, 0]  # the extremes of int32
    assert bm.compute_block_hashes(req) == expected() and len(req.block_hashes) == 6


# -- allocation ----------------------------------------------------------------------------------


def test_allocate_and_grow_across_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=BS)
    req = make_request("r", range(6))
    assert bm.allocate_slots(req, 6)
    assert len(req.block_ids) == 2 and bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(2 / 8)
    req.num_computed_tokens = 6
    for step, expect in [(1, 2), (1, 2), (1, 3), (4, 4)]:  # 7, 8, 9, 13 tokens
        assert bm.allocate_slots(req, step)
        req.num_computed_tokens += step
        assert len(req.block_ids) == expect
    assert len(set(req.block_ids)) == len(req.block_ids)
    bm.check_invariants()
    bm.free(req)
    assert req.block_ids == [] and bm.num_free_blocks == 8
    bm.free(req)  # idempotent
    bm.check_invariants()


def test_can_allocate_false_leaves_state_untouched():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(12))
    assert bm.allocate_slots(a, 12)
    b = make_request("b", range(50, 58))
    before = (list(bm.ref_counts), list(bm.free_queue), dict(bm.hash_to_block))
    assert not bm.can_allocate(b, 8)
    assert not bm.allocate_slots(b, 8)
    assert b.block_ids == []
    assert (list(bm.ref_counts), list(bm.free_queue), dict(bm.hash_to_block)) == before
    assert bm.can_allocate(b, 4) and bm.allocate_slots(b, 4)
    bm.free(a), bm.free(b)
    assert bm.num_free_blocks == 4


def test_reclaimed_computed_blocks_do_not_count_as_free_for_new_data():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(9))
    admit(bm, a)  # 3 blocks, 2 full and hashed
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_request("b", list(range(9)) + [99] * 8)  # 17 tokens: 2 cached blocks + 3 new
    blocks, n = bm.get_computed_blocks(b)
    assert n == 8 and len(blocks) == 2
    assert not bm.can_allocate(b, b.num_tokens - n, blocks)  # 4 free, but 2 are the cached blocks
    assert not bm.allocate_slots(b, b.num_tokens - n, blocks)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    bm.check_invariants()


# -- sharing and prefix hits ---------------------------------------------------------------------


def test_two_requests_share_a_prompt():
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a, b = make_request("a", prompt), make_request("b", prompt)
    assert admit(bm, a) == 0
    assert admit(bm, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [bm.ref_counts[i] for i in a.block_ids[:2]] == [2, 2]
    assert bm.num_free_blocks == 10 - 4
    bm.free(a)
    assert [bm.ref_counts[i] for i in b.block_ids[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10 and bm.num_cached_blocks == 2  # evictable, but still cached
    c = make_request("c", prompt)
    assert bm.get_computed_blocks(c)[1] == 8
    assert bm.stats() == {"queries": 30, "hits": 16, "hit_rate": pytest.approx(16 / 30)}
    bm.check_invariants()


def test_never_covers_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(8))  # exactly 2 full blocks
    admit(bm, make_request("a", prompt))
    blocks, n = bm.get_computed_blocks(make_request("b", prompt))
    assert (len(blocks), n) == (1, 4)
    assert bm.get_computed_blocks(make_request("c", prompt + [8]))[1] == 8


def test_same_image_hits_and_different_image_misses():
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = media_prompt()
    admit(bm, make_request("a", tokens, [image("hashA")]))
    assert bm.get_computed_blocks(make_request("same", tokens, [image("hashA")]))[1] == 12
    # Identical placeholder ids, different pixels: the image starts in block 0, so nothing hits.
    assert bm.get_computed_blocks(make_request("other", tokens, [image("hashB")]))[1] == 0
    # Same bytes, different preprocessing: cache_key differs.
    other_settings = image("hashA", settings=ImageSettings(max_num_tiles=16))
    assert bm.get_computed_blocks(make_request("tiles", tokens, [other_settings]))[1] == 0


def test_text_prefix_before_an_image_is_shared():
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = (
        list(range(100, 104)) + [7] * 8 + list(range(200, 205))
    )  # image at offset 4, block aligned
    admit(bm, make_request("a", tokens, [image("hashA", offset=4)]))
    assert bm.get_computed_blocks(make_request("b", tokens, [image("hashB", offset=4)]))[1] == 4
    assert bm.get_computed_blocks(make_request("c", tokens, [image("hashA", offset=4)]))[1] == 16


def test_output_tokens_extend_hashes():
    bm = BlockManager(num_blocks=8, block_size=BS)
    req = make_request("r", range(6))
    assert len(bm.compute_block_hashes(req)) == 1
    first = list(req.block_hashes)
    req.output_token_ids += [6, 7, 8]
    hashes = bm.compute_block_hashes(req)
    assert len(hashes) == 2 and hashes[0] == first[0]
    assert hashes[1] == hash_block(first[0], [4, 5, 6, 7])
    # A request whose prompt is the first request's prompt + outputs hits both blocks once computed.
    assert bm.allocate_slots(req, 9)
    req.num_computed_tokens = 9
    bm.cache_blocks(req, 9)
    assert bm.num_cached_blocks == 2
    assert bm.get_computed_blocks(make_request("s", range(9)))[1] == 8
    bm.free(req)
    bm.check_invariants()


def test_cache_blocks_only_registers_computed_full_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    req = make_request("r", range(13))
    assert bm.allocate_slots(req, 6)  # chunked prefill: first chunk of 6 tokens
    req.num_computed_tokens = 6
    bm.cache_blocks(req, 6)
    assert bm.num_cached_blocks == 1
    assert bm.allocate_slots(req, 7)
    req.num_computed_tokens = 13
    bm.cache_blocks(req, 13)
    assert bm.num_cached_blocks == 3
    assert [bm.hash_to_block[h] for h in req.block_hashes] == req.block_ids[:3]
    bm.free(req)
    bm.check_invariants()


def test_duplicate_hash_keeps_first_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_request("a", range(5)), make_request("b", range(5))
    for r in (a, b):  # both computed before either is cached: no sharing
        assert bm.allocate_slots(r, 5)
        r.num_computed_tokens = 5
    bm.cache_blocks(a, 5)
    bm.cache_blocks(b, 5)
    assert bm.hash_to_block[a.block_hashes[0]] == a.block_ids[0]
    bm.free(a)
    bm.free(b)
    bm.check_invariants()
    assert bm.num_free_blocks == 8


# -- eviction ------------------------------------------------------------------------------------


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=6, block_size=BS)
    old, new = make_request("old", range(12)), make_request("new", range(100, 112))
    admit(bm, old)  # 3 full cached blocks each
    admit(bm, new)
    old_ids, new_ids = list(old.block_ids), list(new.block_ids)
    bm.free(old)
    bm.free(new)
    assert bm.num_cached_blocks == 6
    assert (
        list(bm.free_queue) == old_ids[::-1] + new_ids[::-1]
    )  # older request first, tail before head

    filler = make_request("f", range(500, 524))
    taken = []
    for _ in range(4):  # take one block at a time
        assert bm.allocate_slots(filler, BS)
        filler.num_computed_tokens += BS
        taken.append(filler.block_ids[-1])
    assert taken == [old_ids[2], old_ids[1], old_ids[0], new_ids[2]]
    assert bm.get_computed_blocks(make_request("o", list(range(12)) + [0]))[1] == 0
    assert bm.get_computed_blocks(make_request("n", list(range(100, 112)) + [0]))[1] == 8
    bm.free(filler)
    bm.check_invariants()


def test_eviction_removes_the_hash():
    bm = BlockManager(num_blocks=3, block_size=BS)
    req = make_request("r", range(12))
    admit(bm, req)
    head, mid, tail = req.block_ids
    bm.free(req)
    f = make_request("f", range(50, 54))
    assert bm.allocate_slots(f, 4) and f.block_ids == [tail]
    assert bm.block_hash[tail] is None and bm.num_cached_blocks == 2
    assert (
        bm.get_computed_blocks(make_request("r2", list(range(12)) + [0]))[1] == 8
    )  # the tail now misses
    bm.free(f)
    bm.check_invariants()


def test_evicted_blocks_miss_after_reuse():
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = make_request("a", range(8))
    admit(bm, a)
    bm.free(a)
    b = make_request("b", range(50, 58))
    admit(bm, b)  # takes both blocks, evicting a's hashes
    assert bm.num_cached_blocks == 2
    assert bm.get_computed_blocks(make_request("a2", range(9)))[1] == 0
    bm.free(b)
    assert bm.get_computed_blocks(make_request("b2", range(50, 59)))[1] == 8
    bm.check_invariants()


def test_unhashed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(8))
    admit(bm, a)
    partial = make_request("p", range(50, 52))
    assert bm.allocate_slots(partial, 2)
    (partial_block,) = partial.block_ids
    bm.free(a)
    bm.free(partial)  # its block holds no full block: nobody can hit it, so it is reused first
    f = make_request("f", range(90, 94))
    assert bm.allocate_slots(f, 4) and f.block_ids == [partial_block]
    assert bm.num_cached_blocks == 2
    bm.free(f)
    bm.check_invariants()


def test_free_on_abort_mid_prefill_returns_everything():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", range(20))
    assert bm.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    bm.cache_blocks(a, 10)
    b = make_request("b", range(20))
    admit(bm, b)
    bm.free(a)  # abort
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


# -- forks ---------------------------------------------------------------------------------------


def computed(bm: BlockManager, rid: str, tokens: list[int]) -> Request:
    """A request whose tokens are all computed in fresh blocks (and cached, if enabled)."""
    req = make_request(rid, tokens)
    assert bm.allocate_slots(req, req.num_tokens)
    req.num_computed_tokens = req.num_tokens
    bm.cache_blocks(req, req.num_computed_tokens)
    return req


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_fork_shares_full_blocks_and_copies_the_partial_one(prefix_caching):
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=prefix_caching)
    parent = computed(bm, "p", list(range(10)))  # blocks: [0, 4) [4, 8) [8, 10)
    child = make_request("c", range(10))
    assert bm.can_fork(9) and bm.can_fork(9, 1)
    copy = bm.fork(parent, child, 9)
    assert child.block_ids[:2] == parent.block_ids[:2] and len(child.block_ids) == 3
    assert copy == (parent.block_ids[2], child.block_ids[2]) and copy[0] != copy[1]
    assert [bm.ref_counts[b] for b in parent.block_ids] == [2, 2, 1]
    assert bm.ref_counts[child.block_ids[2]] == 1 and bm.num_free_blocks == 8 - 4
    assert bm.stats()["hits"] == 9
    assert bm.stats()["queries"] == 10  # the child's tokens (`computed` looked nothing up)
    # the child grows on its own copy, then into a fresh block
    child.num_computed_tokens = 9
    assert bm.allocate_slots(child, 3) and len(child.block_ids) == 3
    child.num_computed_tokens = 12
    assert bm.allocate_slots(child, 1) and len(child.block_ids) == 4
    bm.check_invariants()
    bm.free(parent)
    assert [bm.ref_counts[b] for b in child.block_ids] == [1, 1, 1, 1]
    bm.free(child)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_fork_of_whole_blocks_needs_no_copy():
    bm = BlockManager(num_blocks=3, block_size=BS, enable_prefix_caching=False)
    parent = computed(bm, "p", list(range(9)))
    child = make_request("c", range(9))
    assert bm.can_fork(8) and not bm.can_fork(8, 1)  # no block left for the child's next token
    assert bm.fork(parent, child, 8) is None
    assert child.block_ids == parent.block_ids[:2] and bm.num_free_blocks == 0
    bm.free(child)  # freeing the child first leaves the parent's table whole
    assert [bm.ref_counts[b] for b in parent.block_ids] == [1, 1, 1]
    bm.free(parent)
    bm.check_invariants()


def test_fork_refused_without_a_block_for_the_copy_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=BS)
    parent = computed(bm, "p", list(range(10)))  # all 3 blocks
    child = make_request("c", range(10))
    before = (list(bm.ref_counts), list(bm.free_queue), bm.stats())
    assert not bm.can_fork(9)
    with pytest.raises(ValueError, match="no free block"):
        bm.fork(parent, child, 9)
    assert (
        child.block_ids == [] and (list(bm.ref_counts), list(bm.free_queue), bm.stats()) == before
    )
    with pytest.raises(ValueError, match="cannot fork"):
        bm.fork(parent, child, 13)  # more than the parent holds
    bm.check_invariants()


def test_a_forked_child_caches_its_own_blocks_and_a_duplicate_keeps_the_first():
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent = computed(bm, "p", list(range(10)))
    child = make_request("c", range(10))
    bm.fork(parent, child, 9)
    child.num_computed_tokens = 9
    child.output_token_ids += [50, 51]  # 12 tokens: its copied block is now full
    assert bm.allocate_slots(child, 3)
    child.num_computed_tokens = 12
    bm.cache_blocks(child, 12)
    h = child.block_hashes[2]
    assert bm.hash_to_block[h] == child.block_ids[2] and bm.block_hash[parent.block_ids[2]] is None
    parent.output_token_ids += [50, 51]  # the same content: the first block keeps the hash
    assert bm.allocate_slots(parent, 2)
    parent.num_computed_tokens = 12
    bm.cache_blocks(parent, 12)
    assert bm.hash_to_block[h] == child.block_ids[2]
    assert bm.get_computed_blocks(make_request("d", list(range(10)) + [50, 51, 52]))[1] == 12
    bm.free(parent)
    bm.free(child)
    bm.check_invariants()


def test_the_runner_copies_whole_blocks_in_every_layer():
    torch = pytest.importorskip("torch")
    from plm_core.engine.model_runner import copy_kv_blocks

    num_blocks, bs = 4, 2
    kv = [
        (
            torch.arange(num_blocks * bs * 3, dtype=torch.float32).reshape(num_blocks * bs, 1, 3)
            + 100 * layer,
            -torch.arange(num_blocks * bs * 3, dtype=torch.float32).reshape(num_blocks * bs, 1, 3),
        )
        for layer in range(2)
    ]
    before = [(k.clone(), v.clone()) for k, v in kv]
    # block 1 is a destination and then a source: every source is read before any write
    copy_kv_blocks(kv, [(1, 3), (0, 1)], bs)
    for (k, v), (k0, v0) in zip(kv, before):
        for cache, old in ((k, k0), (v, v0)):
            assert torch.equal(cache[6:8], old[2:4])  # block 3 <- block 1 as it was
            assert torch.equal(cache[2:4], old[0:2])  # block 1 <- block 0
            assert torch.equal(cache[0:2], old[0:2]) and torch.equal(cache[4:6], old[4:6])


# -- disabled prefix caching ---------------------------------------------------------------------


def test_disabled_prefix_caching():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a, b = make_request("a", range(10)), make_request("b", range(10))
    assert admit(bm, a) == 0
    assert admit(bm, b) == 0
    assert not set(a.block_ids) & set(b.block_ids)
    assert bm.num_cached_blocks == 0 and bm.stats()["queries"] == 0
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


# -- randomized ----------------------------------------------------------------------------------


def fork_and_compute(bm: BlockManager, parent: Request, rid: str) -> Request | None:
    """What the scheduler does for a choice once its leader computed the prompt: fork all of it
    but the last token, then compute that one; None if the parent is not there yet or no room."""
    p = parent.num_prompt_tokens
    if parent.num_computed_tokens < p or p < 2 or not bm.can_fork(p - 1, 1):
        return None
    child = make_request(rid, parent.prompt_token_ids, list(parent.media))
    copy = bm.fork(parent, child, p - 1)
    assert (copy is None) == ((p - 1) % BS == 0)
    assert child.block_ids[: (p - 1) // BS] == parent.block_ids[: (p - 1) // BS]
    child.num_computed_tokens = p - 1
    assert bm.allocate_slots(child, 1)
    child.num_computed_tokens = p
    bm.cache_blocks(child, p)
    return child


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_workload(seed, prefix_caching):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=BS, enable_prefix_caching=prefix_caching)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    images = ["hashA", "hashB"]
    running: list[Request] = []
    for op in range(400):
        action = rng.random()
        if action < 0.35 or not running:
            prompt = rng.choice(prefixes) + [
                rng.randrange(1000) for _ in range(rng.randrange(0, 10))
            ]
            media = []
            if len(prompt) >= 6 and rng.random() < 0.5:
                start = rng.randrange(0, len(prompt) - 4)
                prompt[start : start + 4] = [7] * 4
                media = [image(rng.choice(images), offset=start, num_tokens=4)]
            req = make_request(f"r{op}", prompt, media)
            blocks, n = bm.get_computed_blocks(req)
            assert n < req.num_tokens and n == len(blocks) * BS
            chunk = rng.randrange(1, req.num_tokens - n + 1)
            if bm.allocate_slots(req, chunk, blocks):
                req.num_computed_tokens = n + chunk
                bm.cache_blocks(req, req.num_computed_tokens)
                running.append(req)
        elif action < 0.45:  # another choice of a running prompt
            child = fork_and_compute(bm, rng.choice(running), f"r{op}")
            if child is not None:
                running.append(child)
        elif action < 0.8:  # one step: finish the prompt chunk by chunk, then decode a token
            req = rng.choice(running)
            if req.num_computed_tokens < req.num_tokens:
                step = rng.randrange(1, req.num_tokens - req.num_computed_tokens + 1)
            else:
                req.output_token_ids.append(rng.randrange(1000))
                step = 1
            if bm.allocate_slots(req, step):
                req.num_computed_tokens += step
                bm.cache_blocks(req, req.num_computed_tokens)
                assert len(req.block_ids) * BS >= req.num_computed_tokens
            else:  # preempt: free and recompute later
                bm.free(req)
                req.num_computed_tokens = 0
                running.remove(req)
        else:  # finish or abort
            req = running.pop(rng.randrange(len(running)))
            bm.free(req)
        bm.check_invariants()
        held = sum(len(set(r.block_ids)) for r in running)
        assert held >= bm.num_blocks - bm.num_free_blocks
    for req in running:
        bm.free(req)
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    if prefix_caching:
        assert bm.stats()["hits"] > 0


def test_cached_prefix_counts_no_query():
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(10))
    a = make_request("a", prompt)
    assert bm.cached_prefix(a) == [] and bm.max_cached_blocks(a) == 2
    admit(bm, a)
    b = make_request("b", prompt + [99])
    assert bm.cached_prefix(b) == a.block_ids[:2]  # the partial third block is not cached
    assert bm.stats()["queries"] == 10  # a's admission only
    assert len(b.block_hashes) == 2  # hashes the request's full blocks on the way
    assert BlockManager(8, BS, enable_prefix_caching=False).cached_prefix(b) == []
