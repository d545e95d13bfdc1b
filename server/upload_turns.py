"""Turns at receiving request bodies, so that a burst of uploads cannot stall the event loop.

uvicorn stops reading a connection once 64 KB of its body wait unread; the loop reads only the
sockets whose bodies some request is consuming. Without turns, a burst of a thousand image chats
has a thousand bodies consumed at once: every loop pass then reads from hundreds of sockets, and
`/health` waited 100-250 ms for its turn (a plain Starlette app behind uvicorn did the same).

`UploadTurns` lets a few bodies be read at once, in arrival order. A body keeps its turn while its
bytes flow; it passes the turn on when others wait and it has either waited `IDLE_S` for more bytes
(a slow or stalled client) or held the turn for `SLICE_S` (a long upload, or a drip-feeding one),
then queues again. So stalled clients cannot lock out the others, and the total upload rate is
what the clients send, not `SLOTS` times one client's rate: a paused connection's bytes wait in the
kernel's buffer, to be read at its next turn.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect

SLOTS = 8  # bodies read at once
IDLE_S = 0.01  # a turn's holder waiting this long for bytes gives way to a waiting body
SLICE_S = 0.25  # the longest a turn is held while others wait


class UploadTurns:
    """At most `slots` holders at once; the others wait in arrival order (plain asyncio, one event
    loop)."""

    def __init__(self, slots: int = SLOTS):
        self._free = slots
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def contended(self) -> bool:
        """Whether some body waits for a turn."""
        return bool(self._waiting)

    async def take(self) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give()  # handed over just as this waiter was cancelled: pass it on
            elif turn in self._waiting:  # give() may have dropped it since it was cancelled
                self._waiting.remove(turn)
            raise

    def give(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


async def receive_body(
    turns: UploadTurns,
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    on_chunk: Callable[[bytes], None],
) -> None:
    """Reads one request's body in turns, handing each chunk to on_chunk (which may raise to stop);
    raises ClientDisconnect if the client goes. The caller bounds the whole with a timeout:
    cancelling is safe at any point (a pending ASGI receive() is cancelled only while it waits)."""
    loop = asyncio.get_running_loop()
    holding, pending = False, None
    try:
        while True:
            if not holding:
                # no receive() before the turn: a waiting body's connection stays paused
                await turns.take()
                holding, held_since = True, loop.time()
            pending = asyncio.ensure_future(receive())
            while not pending.done() or not holding:
                if not holding:
                    await turns.take()  # the bytes may arrive meanwhile; they wait in memory
                    holding, held_since = True, loop.time()
                    continue
                await asyncio.wait({pending}, timeout=IDLE_S)
                if not pending.done() and turns.contended:
                    turns.give()  # a slow client gives way while its bytes trickle in
                    holding = False
            message, pending = pending.result(), None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            on_chunk(message.get("body", b""))
            if not message.get("more_body", False):
                return
            if turns.contended and loop.time() - held_since > SLICE_S:
                turns.give()  # a long upload lets the waiting bodies in, then queues again
                holding = False
    finally:
        if pending is not None:
            pending.cancel()
        if holding:
            turns.give()
