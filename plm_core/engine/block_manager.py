"""Paged KV-cache bookkeeping: block tables, reference counts, prefix cache, forks (no tensors)."""

from __future__ import annotations

import array
import hashlib
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plm_core.engine.request import Request

_NO_PARENT = b"\0" * 32

# Media keys of one block: (MediaItem.cache_key, index in the item of the block's first placeholder)
ExtraKeys = tuple[tuple[str, int], ...]
# A block copy for the model runner: (source block, destination block), every layer's K and V.
BlockCopy = tuple[int, int]


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_keys: ExtraKeys = ()) -> bytes:
    """Chained content hash of one block: the parent block's hash, its token ids and media keys.

    Deterministic across processes and machines (blake2b over little-endian int32 tokens and the
    repr of `extra_keys`, which holds only strings and ints).
    """
    return _hash_packed(parent, len(token_ids), _le_int32(token_ids), extra_keys)


def _le_int32(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian int32 bytes."""
    packed = array.array("i", token_ids)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _hash_packed(parent: bytes | None, n: int, packed: bytes, extra_keys: ExtraKeys) -> bytes:
    """hash_block of `n` tokens already packed by _le_int32."""
    h = hashlib.blake2b(digest_size=32)
    h.update(parent if parent is not None else _NO_PARENT)
    h.update(n.to_bytes(4, "little"))
    h.update(packed)
    h.update(repr(extra_keys).encode())
    return h.digest()


def block_extra_keys(request: Request, start: int, end: int) -> ExtraKeys:
    """Media keys of the block covering token positions [start, end).

    One `(cache_key, index of the block's first placeholder within the item)` per overlapping
    item, so placeholder tokens hash by the media's content and preprocessing, not their ids.
    """
    return tuple(
        (m.cache_key, max(start, m.offset) - m.offset) for m in request.media_in_range(start, end)
    )


class BlockManager:
    """Owns the KV cache's `num_blocks` blocks of `block_size` tokens and every block table.

    A block is in use while its reference count is above zero; blocks at zero wait in an LRU free
    queue, and if they hold a full hashed block they stay findable in the prefix cache until a new
    allocation takes (evicts) them. Requests that share a prompt prefix share its full blocks, and
    a forked request (another choice of the same prompt) shares its parent's full blocks and gets a
    copy of the last, partial one.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # content hash of a full, computed block
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}  # the prefix cache
        # blocks with no references, least recently used first
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # request id -> leading blocks of its table already hashed
        self._num_hashed: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up (forks included)
        self.prefix_cache_hits = 0  # tokens found (forked tokens included)

    # -- state -----------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no references, including cached blocks that may still be reused by hash."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Share of the blocks in use (referenced by a request)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable in the prefix cache, in use or not."""
        return len(self.hash_to_block)

    def stats(self) -> dict[str, float]:
        """Prefix-cache counters in tokens: queries, hits and hit_rate (forks count as hits)."""
        q, h = self.prefix_cache_queries, self.prefix_cache_hits
        return {"queries": q, "hits": h, "hit_rate": h / q if q else 0.0}

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    # -- prefix cache ----------------------------------------------------------------------------

    def compute_block_hashes(self, request: Request) -> list[bytes]:
        """Extends `request.block_hashes` to every full block of prompt + outputs; returns it."""
        hashes = request.block_hashes
        bs = self.block_size
        num_full = request.num_tokens // bs
        first = len(hashes)
        if first < num_full:
            # the new blocks' tokens packed at once (a long prompt has hundreds of blocks)
            packed = _le_int32(request.all_token_ids[first * bs : num_full * bs])
            size = 4 * bs
            for i in range(first, num_full):
                start, end = i * bs, (i + 1) * bs
                chunk = packed[(i - first) * size : (i - first + 1) * size]
                extra = block_extra_keys(request, start, end) if request.media else ()
                hashes.append(_hash_packed(hashes[-1] if hashes else None, bs, chunk, extra))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request's full blocks: (block ids, tokens they cover).

        Never covers the last token, which the model must compute to produce logits. Takes no
        references; pass the blocks to `allocate_slots` to claim them.
        """
        if not self.enable_prefix_caching:
            return [], 0
        blocks = self.cached_prefix(request)
        num_tokens = len(blocks) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_tokens
        return blocks, num_tokens

    def cached_prefix(self, request: Request) -> list[int]:
        """Block ids of the longest cached prefix of the request's full blocks, never covering its
        last token; empty with prefix caching off. Counts no query (see `get_computed_blocks`)."""
        if not self.enable_prefix_caching:
            return []
        hashes = self.compute_block_hashes(request)
        blocks: list[int] = []
        for h in hashes[: self.max_cached_blocks(request)]:
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def max_cached_blocks(self, request: Request) -> int:
        """Full blocks a prefix hit may cover: those before the block holding the last token."""
        return (request.num_tokens - 1) // self.block_size

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Registers the request's full blocks in [0, num_computed_tokens) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        n = min(num_computed_tokens // self.block_size, len(request.block_ids))
        first = self._num_hashed.get(request.request_id, 0)
        if n <= first:
            return
        hashes = self.compute_block_hashes(request)
        for i in range(first, n):
            block_id = request.block_ids[i]
            if self.block_hash[block_id] is None:
                self.block_hash[block_id] = hashes[i]
                # a duplicate keeps the first block
                self.hash_to_block.setdefault(hashes[i], block_id)
        self._num_hashed[request.request_id] = n

    # -- allocation ------------------------------------------------------------------------------

    def _num_new_blocks(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int]
    ) -> int:
        if computed_blocks and request.block_ids:
            raise ValueError(
                f"request {request.request_id} already has blocks; computed blocks only go first"
            )
        total = (
            request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        )
        return max(0, self.num_blocks_for(total) - len(request.block_ids) - len(computed_blocks))

    def can_allocate(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Whether `allocate_slots` with the same arguments would succeed."""
        num_new = self._num_new_blocks(request, num_new_tokens, computed_blocks)
        # free, but not for new data
        reclaimed = sum(1 for b in computed_blocks if self.ref_counts[b] == 0)
        return num_new <= self.num_free_blocks - reclaimed

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Grows `request.block_ids` to hold num_computed_tokens + computed blocks + num_new_tokens.

        `computed_blocks` (from `get_computed_blocks`, only for a request without blocks) become the
        head of the table. New blocks come from the front of the free queue; a hashed one is evicted
        from the prefix cache. Returns False, changing nothing, if there are too few free blocks.
        """
        if not self.can_allocate(request, num_new_tokens, computed_blocks):
            return False
        num_new = self._num_new_blocks(request, num_new_tokens, computed_blocks)
        for block_id in computed_blocks:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1
            request.block_ids.append(block_id)
        if computed_blocks:
            self._num_hashed[request.request_id] = len(computed_blocks)
        for _ in range(num_new):
            request.block_ids.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        self._evict(block_id)
        self.ref_counts[block_id] = 1
        return block_id

    # -- forks -----------------------------------------------------------------------------------

    def can_fork(self, num_tokens: int, num_new_tokens: int = 0) -> bool:
        """Whether `fork` of num_tokens tokens, then `allocate_slots(child, num_new_tokens)`, fit"""
        copy = 1 if num_tokens % self.block_size else 0
        grow = self.num_blocks_for(num_tokens + num_new_tokens) - self.num_blocks_for(num_tokens)
        return copy + grow <= self.num_free_blocks

    def fork(self, parent: Request, child: Request, num_tokens: int) -> BlockCopy | None:
        """Gives `child` (no blocks yet) the parent's KV of its first num_tokens tokens.

        The full blocks are shared by reference count; a last, partial block is copied on write
        into a fresh block, since both will append to it. Returns that copy, (parent's block,
        child's block), which the model runner makes before its next forward, or None when
        num_tokens fills whole blocks. Counts the forked tokens as prefix-cache queries and hits.
        Raises ValueError if the child holds blocks, the parent too few, or no block is free.
        """
        bs = self.block_size
        num_full, partial = divmod(num_tokens, bs)
        if child.block_ids or len(parent.block_ids) < self.num_blocks_for(num_tokens):
            raise ValueError(
                f"cannot fork {num_tokens} tokens of {parent.request_id} "
                f"({len(parent.block_ids)} blocks) into {child.request_id}"
            )
        if not self.can_fork(num_tokens):
            raise ValueError(f"no free block to fork {parent.request_id} into {child.request_id}")
        for block_id in parent.block_ids[:num_full]:
            self.ref_counts[block_id] += 1
            child.block_ids.append(block_id)
        if self.enable_prefix_caching:
            self._num_hashed[child.request_id] = min(
                num_full, self._num_hashed.get(parent.request_id, 0)
            )
        self.prefix_cache_queries += child.num_tokens
        self.prefix_cache_hits += num_tokens
        if not partial:
            return None
        block_id = self._take_free_block()
        child.block_ids.append(block_id)
        return parent.block_ids[num_full], block_id

    def _evict(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            if self.hash_to_block.get(h) == block_id:
                del self.hash_to_block[h]
            self.block_hash[block_id] = None

    def free(self, request: Request) -> None:
        """Drops the request's references, tail first, so its tail is evicted before its head.

        Freed blocks join the end (most recently used) of the free queue and stay in the prefix
        cache; blocks with no hash go to the front, since nobody can find them again.
        """
        for block_id in reversed(request.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None
                if self.block_hash[block_id] is None:
                    self.free_queue.move_to_end(block_id, last=False)
        request.block_ids = []
        self._num_hashed.pop(request.request_id, None)

    # -- tests -----------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Asserts the reference counts, free queue and prefix cache agree (for tests)."""
        assert all(r >= 0 for r in self.ref_counts), "negative reference count"
        assert set(self.free_queue) == {b for b, r in enumerate(self.ref_counts) if r == 0}, (
            "free queue != ref-0 blocks"
        )
        for h, block_id in self.hash_to_block.items():
            assert self.block_hash[block_id] == h, (
                f"block {block_id} mapped by a hash it does not hold"
            )
        if not self.enable_prefix_caching:
            assert not self.hash_to_block, "prefix cache filled while disabled"
