"""What the processor learned from media bytes it decoded before, so repeats skip decoding."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_RAW_CACHE_ENTRIES = 4096


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

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> MediaFacts | None:
        """The facts for `key` (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            facts = self._entries.get(key)
            if facts is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return facts

    def put(self, key: str, facts: MediaFacts) -> None:
        """Remembers `facts` for `key`, evicting the least recently used entries over the bound."""
        with self._lock:
            self._entries[key] = facts
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.evictions += 1

    def note_skipped(self) -> None:
        """Counts a hit whose pixels were skipped."""
        with self._lock:
            self.pixels_skipped += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

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
            }
