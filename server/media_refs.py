"""Media by reference: a client-chosen `uuid` beside an image or video part names its media, so a
later request (the next turn of a chat) sends the `uuid` alone and the server uses what it holds.

A part names its media as `{"type": "image_url", "image_url": {"url": ...}, "uuid": "photo-1"}`
(as vLLM takes it); a later part `{"type": "image_url", "image_url": null, "uuid": "photo-1"}` (or
with no `url`) stands for the same media. The server keeps the source it was sent (the `data:`
URL's text, or the bytes it fetched) within a byte budget, least recently used first; the caches
behind it are keyed by the bytes' content hash as always, so a repeat is cheap and no name can
make cached work stand for other bytes.

The rules:
- a `uuid` the server does not hold (never sent, evicted, another replica, a restart) is a 400 with
  code `media_not_cached`, naming the part: send the media again;
- one namespace per server (one API key): a `uuid` that holds media is not given other media
  (400 `media_uuid_conflict`); names are the client's to make unguessable (e.g. UUID4);
- a name is remembered only once its request was preprocessed, so a refused image is never held.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from server.protocol import APIError

MEDIA_PART_KINDS = {"image_url": "image", "video_url": "video"}
MAX_UUID_CHARS = 256


class MediaRefs:
    """Sources by uuid, at most `max_bytes` of them, least recently used first (thread-safe)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._held: OrderedDict[str, tuple[str, str | bytes]] = OrderedDict()  # uuid -> kind, src
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0  # uuid-only parts filled with media the server held
        self.misses = 0  # uuid-only parts the server did not hold

    def __len__(self) -> int:
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        return self._size

    def resolve(self, messages: list[Any]) -> list[Any]:
        """A new list of the messages with each uuid-only part given the media its uuid holds
        (only a message with such a part is copied); an APIError names the first part whose uuid
        is bad or not held."""
        out = list(messages)
        for i, msg in enumerate(messages):
            if not (isinstance(msg, dict) and isinstance(msg.get("content"), list)):
                continue
            parts = msg["content"]
            for j, part in enumerate(msg["content"]):
                where = f"messages[{i}].content[{j}]"
                named = _named(part, where)
                if named is not None and named[2] is None:
                    if parts is msg["content"]:  # the first filled part: copy this message
                        parts = list(parts)
                        out[i] = dict(msg, content=parts)
                    parts[j] = self._filled(part, named[0], named[1], where)
        return out

    def remember(self, messages: list[Any]) -> None:
        """Holds the media of every part that carries both a uuid and its media (after http(s)
        media was fetched: its bytes); a uuid holding other media is refused."""
        named: list[tuple[str, str, str | bytes, str]] = []
        for i, msg in enumerate(messages):
            if isinstance(msg, dict) and isinstance(msg.get("content"), list):
                for j, part in enumerate(msg["content"]):
                    where = f"messages[{i}].content[{j}]"
                    found = _named(part, where)
                    if found is not None and found[2] is not None:
                        named.append((found[0], found[1], found[2], where))
        with self._lock:
            for uuid, kind, source, where in named:
                held = self._held.get(uuid)
                if held is not None and held != (kind, source):
                    raise APIError(
                        400,
                        f"uuid {uuid!r} already names other media on this server; send this "
                        "media under a new uuid",
                        param=f"{where}.uuid",
                        code="media_uuid_conflict",
                    )
            for uuid, kind, source, _ in named:
                self._put(uuid, kind, source)

    def _filled(self, part: dict[str, Any], uuid: str, kind: str, where: str) -> dict[str, Any]:
        with self._lock:
            held = self._held.get(uuid)
            if held is not None:
                self._held.move_to_end(uuid)
            self.hits += held is not None
            self.misses += held is None
        if held is None:
            raise APIError(
                400,
                f"no media is held under uuid {uuid!r} (never sent to this server, evicted, or "
                "sent to another replica): send the media again with its url",
                param=f"{where}.uuid",
                code="media_not_cached",
            )
        if held[0] != kind:
            raise APIError(
                400, f"uuid {uuid!r} names {_a(held[0])}, not {_a(kind)}", param=f"{where}.uuid"
            )
        key = part["type"]
        spec = part.get(key)
        spec = dict(spec) if isinstance(spec, dict) else {}
        spec["url"] = held[1]
        return dict(part, **{key: spec})

    def _put(self, uuid: str, kind: str, source: str | bytes) -> None:
        size = len(source)
        if size > self.max_bytes:
            return
        old = self._held.pop(uuid, None)
        if old is not None:
            self._size -= len(old[1])
        self._held[uuid] = (kind, source)
        self._size += size
        while self._size > self.max_bytes:
            _, (_, dropped) = self._held.popitem(last=False)
            self._size -= len(dropped)


def _a(kind: str) -> str:
    return f"an {kind}" if kind == "image" else f"a {kind}"


def _named(part: Any, where: str) -> tuple[str, str, str | bytes | None] | None:
    """(uuid, kind, source or None when left out) of an image_url/video_url part with a uuid."""
    if not isinstance(part, dict) or part.get("type") not in MEDIA_PART_KINDS or "uuid" not in part:
        return None
    uuid = part["uuid"]
    if uuid is None:
        return None
    if not isinstance(uuid, str) or not uuid or len(uuid) > MAX_UUID_CHARS:
        raise APIError(
            400, f"{where}.uuid must be a string of 1 to {MAX_UUID_CHARS} characters",
            param=f"{where}.uuid",
        )  # fmt: skip
    spec = part.get(part["type"])
    source = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(source, (str, bytes)) or not source:
        source = None
    return uuid, MEDIA_PART_KINDS[part["type"]], source
