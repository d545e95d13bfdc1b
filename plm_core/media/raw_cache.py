"""What the processor learned from media bytes it decoded before, so repeats skip decoding; the
hashes of `data:` URL texts' bytes, so repeats skip base64 too; and the pixels requests in flight
hold, so that requests arriving together decode an item once."""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

DEFAULT_RAW_CACHE_ENTRIES = 4096

V = TypeVar("V")


def _lru_get(entries: OrderedDict[str, V], key: str) -> V | None:
    """entries[key], now the most recently used, or None."""
    value = entries.get(key)
    if value is not None:
        entries.move_to_end(key)
    return value


def _lru_put(entries: OrderedDict[str, V], key: str, value: V, bound: int) -> int:
    """Sets entries[key] as the most recently used; evicts the least recently used entries over
    `bound` and returns how many."""
    entries[key] = value
    entries.move_to_end(key)
    evicted = 0
    while len(entries) > bound:
        entries.popitem(last=False)
        evicted += 1
    return evicted


@dataclass(frozen=True)
class MediaFacts:
    """All a MediaItem needs besides its pixels, as decoding its bytes with its settings gave it."""

    num_tiles: int
    num_tokens: int
    meta: Mapping[str, Any]  # e.g. source size, frame indices

    def fresh_meta(self) -> dict[str, Any]:
        """A copy of meta (lists copied too) for one item, so items never share mutable state."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self.meta.items()}


class RawMediaCache:
    """MediaFacts by `MediaItem.cache_key` (kind, sha256 of the source bytes, settings), least
    recently used first, at most `max_entries` of them; safe to share between threads.

    An entry is a few hundred bytes (a video's meta lists at most max_num_frames indices), so the
    default 4096 entries hold about a megabyte. Only media read from bytes (data: URLs, files,
    fetched URLs) is cached: in-memory images and frames have no bytes to hash before decoding.
    Beside them, as many `data:` URL texts' hashes map to their bytes' hashes (two hashes each).
    """

    def __init__(self, max_entries: int = DEFAULT_RAW_CACHE_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, MediaFacts] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.pixels_skipped = 0  # hits whose pixels the processor did not make (engine had them)
        self.pixels_shared = 0  # pixels taken from another request in flight, not made again
        # pixels of items some request holds now: alive as long as one does
        self._live: dict[str, weakref.ref[torch.Tensor]] = {}
        self._loading: dict[str, threading.Event] = {}  # keys a thread is decoding right now
        # sha256 of a data: URL's text -> sha256 of its bytes, least recently used first
        self._text_hashes: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str, *, count: bool = True) -> MediaFacts | None:
        """The facts for `key` (now most recently used), or None; counts a hit or a miss unless
        `count` is False."""
        with self._lock:
            facts = _lru_get(self._entries, key)
            if count:
                self.hits += facts is not None
                self.misses += facts is None
            return facts

    def count(self, *, hit: bool) -> None:
        """Counts a lookup made with count=False (decided after waiting for a concurrent decode)."""
        with self._lock:
            self.hits += hit
            self.misses += not hit

    def content_hash_of(self, text_key: str) -> str | None:
        """The bytes' hash remembered for a text's hash (now most recently used), or None."""
        with self._lock:
            return _lru_get(self._text_hashes, text_key)

    def remember_content_hash(self, text_key: str, content_hash: str) -> None:
        """Remembers that the text hashed `text_key` holds the bytes hashed `content_hash`."""
        with self._lock:
            _lru_put(self._text_hashes, text_key, content_hash, self.max_entries)

    def put(self, key: str, facts: MediaFacts) -> None:
        """Remembers `facts` for `key`, evicting the least recently used entries over the bound."""
        with self._lock:
            self.evictions += _lru_put(self._entries, key, facts, self.max_entries)

    @contextmanager
    def loading(self, key: str) -> Iterator[bool]:
        """Single flight for decoding `key`: yields True to the one thread that should decode it
        (others calling meanwhile wait until it is done, then get False and look again)."""
        with self._lock:
            event = self._loading.get(key)
            first = event is None
            if first:
                event = self._loading[key] = threading.Event()
        assert event is not None
        if not first:
            event.wait()
            yield False
            return
        try:
            yield True
        finally:
            with self._lock:
                del self._loading[key]
            event.set()

    def share(self, key: str, pixels: torch.Tensor) -> torch.Tensor:
        """Offers `pixels` of `key` to later requests while some request holds them."""
        with self._lock:
            self._live[key] = weakref.ref(pixels, functools.partial(self._forget, key))
        return pixels

    def shared_pixels(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The pixels of `key` another request holds, else `make()`'s (made once at a time: a
        concurrent caller for the same key waits and takes them)."""
        for _ in range(2):  # the second look follows another thread's decode
            with self._lock:
                ref = self._live.get(key)
                pixels = ref() if ref is not None else None
                if pixels is not None:
                    self.pixels_shared += 1
                    return pixels
            with self.loading(key) as first:
                if first:
                    return self.share(key, make())
        return self.share(key, make())

    def _forget(self, key: str, ref: weakref.ref[torch.Tensor]) -> None:
        with self._lock:
            if self._live.get(key) is ref:
                del self._live[key]

    def note_skipped(self) -> None:
        """Counts a hit whose pixels were skipped."""
        with self._lock:
            self.pixels_skipped += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._live.clear()
            self._text_hashes.clear()

    def stats(self) -> dict[str, int]:
        """Counters for metrics and logs."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "max_entries": self.max_entries,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "pixels_skipped": self.pixels_skipped,
                "pixels_shared": self.pixels_shared,
            }
