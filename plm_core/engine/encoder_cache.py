"""Which media items' vision-encoder outputs are resident, and which may be evicted (no tensors)."""

from __future__ import annotations

from collections import OrderedDict


class EncoderCacheManager:
    """Bookkeeping for the vision-encoder output cache, keyed by `MediaItem.cache_key`.

    The budget counts LM-space tokens (`MediaItem.num_tokens`). The model runner holds the tensors;
    this class decides what stays. An entry referenced by a request is pinned; unreferenced entries
    stay resident (a later request with the same media is a hit) until evicted, least recently used
    first. References are counted: each `allocate`/`acquire` is undone by one `release`, or by
    `release_all` for the request.
    """

    def __init__(self, budget_tokens: int):
        if budget_tokens < 0:
            raise ValueError(f"budget_tokens must be >= 0, got {budget_tokens}")
        self.budget_tokens = budget_tokens
        # key -> num_tokens, least recently used first
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.refs: dict[str, dict[str, int]] = {}  # key -> {request_id: reference count}
        self.request_keys: dict[str, set[str]] = {}  # request_id -> keys it references
        self._used_tokens = 0
        self._evictable_tokens = 0  # tokens held by unreferenced entries
        self.hits = 0
        self.misses = 0

    @property
    def used_tokens(self) -> int:
        """Tokens held by resident entries, referenced or not."""
        return self._used_tokens

    def has(self, key: str) -> bool:
        """Whether the entry is resident (referenced or not)."""
        return key in self.entries

    def is_referenced(self, key: str) -> bool:
        """True if a request holds the resident entry (so it cannot be evicted)."""
        return bool(self.refs.get(key))

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether free space plus the space of unreferenced (evictable) entries fits num_tokens."""
        return self.budget_tokens - self._used_tokens + self._evictable_tokens >= num_tokens

    def allocate(self, request_id: str, key: str, num_tokens: int) -> list[str]:
        """Makes `key` resident and referenced by the request (a miss); returns the keys it evicted.

        Evicts unreferenced entries, least recently used first. Raises ValueError if it cannot fit.
        If `key` is already resident this is an `acquire` and evicts nothing.
        """
        if key in self.entries:
            self.acquire(request_id, key)
            return []
        if not self.can_allocate(num_tokens):
            raise ValueError(
                f"encoder cache cannot fit {num_tokens} tokens for {key!r}: "
                f"{self._used_tokens}/{self.budget_tokens} used, {self._evictable_tokens} evictable"
            )
        evicted: list[str] = []
        for old in list(self.entries):
            if self.budget_tokens - self._used_tokens >= num_tokens:
                break
            if not self.refs[old]:
                size = self.entries.pop(old)
                del self.refs[old]
                self._used_tokens -= size
                self._evictable_tokens -= size
                evicted.append(old)
        self.entries[key] = num_tokens
        self.refs[key] = {}
        self._used_tokens += num_tokens
        self._evictable_tokens += num_tokens  # unreferenced until the line below
        self._add_ref(request_id, key)
        self.misses += 1
        return evicted

    def acquire(self, request_id: str, key: str) -> None:
        """Adds the request's reference to a resident entry (a hit), now most recently used."""
        if key not in self.entries:
            raise KeyError(f"{key!r} is not in the encoder cache")
        self._add_ref(request_id, key)
        self.entries.move_to_end(key)
        self.hits += 1

    def release(self, request_id: str, key: str) -> None:
        """Drops one of the request's references; the entry stays resident. No-op if none."""
        holders = self.refs.get(key)
        if not holders or request_id not in holders:
            return
        holders[request_id] -= 1
        if holders[request_id] == 0:
            del holders[request_id]
            keys = self.request_keys[request_id]
            keys.discard(key)
            if not keys:
                del self.request_keys[request_id]
            if not holders:
                self._evictable_tokens += self.entries[key]

    def release_all(self, request_id: str) -> None:
        """Drops every reference the request holds (on finish, abort or preemption)."""
        for key in list(self.request_keys.get(request_id, ())):
            holders = self.refs[key]
            del holders[request_id]
            if not holders:
                self._evictable_tokens += self.entries[key]
        self.request_keys.pop(request_id, None)

    def _add_ref(self, request_id: str, key: str) -> None:
        holders = self.refs[key]
        if not holders:
            self._evictable_tokens -= self.entries[key]
        holders[request_id] = holders.get(request_id, 0) + 1
        self.request_keys.setdefault(request_id, set()).add(key)

    def stats(self) -> dict[str, float]:
        """Hits, misses and hit_rate of lookups; used and budget tokens; resident entries."""
        lookups = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else 0.0,
            "used_tokens": self._used_tokens,
            "budget_tokens": self.budget_tokens,
            "entries": len(self.entries),
        }

    def check_invariants(self) -> None:
        """Asserts the entries, references and token counts agree (for tests)."""
        assert set(self.refs) == set(self.entries), "refs and entries disagree"
        assert self._used_tokens == sum(self.entries.values()) <= self.budget_tokens, (
            "used tokens wrong or over budget"
        )
        assert self._evictable_tokens == sum(
            n for k, n in self.entries.items() if not self.refs[k]
        ), "evictable wrong"
        pairs = {(r, k) for k, holders in self.refs.items() for r, c in holders.items() if c > 0}
        assert len(pairs) == sum(len(h) for h in self.refs.values()), "zero reference count kept"
        assert pairs == {(r, k) for r, keys in self.request_keys.items() for k in keys}, (
            "request index wrong"
        )
        assert all(self.request_keys.values()), "empty request entry kept"
