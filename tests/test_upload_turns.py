"""Turns at receiving request bodies (server/upload_turns.py), with fake ASGI receive() callables:
at most SLOTS bodies at once in arrival order, cancellation never leaks a turn, and a stalled or
long upload gives way to waiting ones."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect

from server import upload_turns
from server.upload_turns import UploadTurns, receive_body


def run(coro):
    return asyncio.run(coro)


def test_turns_are_bounded_and_taken_in_arrival_order():
    async def go():
        turns, order, holding, most = UploadTurns(2), [], [0], [0]

        async def body(i):
            await turns.take()
            order.append(i)
            holding[0] += 1
            most[0] = max(most[0], holding[0])
            await asyncio.sleep(0.01)
            holding[0] -= 1
            turns.give()

        await asyncio.gather(*(body(i) for i in range(7)))
        return order, most[0], turns

    order, most, turns = run(go())
    assert order == list(range(7)) and most == 2
    assert not turns.contended and turns._free == 2


def test_a_cancelled_waiter_leaks_no_turn():
    async def go():
        turns = UploadTurns(1)
        await turns.take()
        waiter = asyncio.ensure_future(turns.take())
        await asyncio.sleep(0)
        assert turns.contended
        waiter.cancel()  # cancelled while queued
        await asyncio.gather(waiter, return_exceptions=True)
        assert not turns.contended
        late = asyncio.ensure_future(turns.take())
        await asyncio.sleep(0)
        turns.give()  # hands the turn to `late`...
        late.cancel()  # ...which is cancelled before it runs: the turn must pass on
        await asyncio.gather(late, return_exceptions=True)
        await asyncio.wait_for(turns.take(), 1)  # free again
        turns.give()
        return turns

    turns = run(go())
    assert turns._free == 1 and not turns.contended


def test_a_waiter_cancelled_just_before_a_give_leaks_nothing():
    """Cancelling a waiting task cancels its queued turn at once, but the task runs its cleanup
    only later: a give() in between (another body timing out) drops that turn from the queue
    first. The cancelled waiter must still end cancelled (no error) and the turn stay free."""

    async def go():
        turns = UploadTurns(1)
        await turns.take()
        waiter = asyncio.ensure_future(turns.take())
        await asyncio.sleep(0)
        waiter.cancel()
        turns.give()  # the holder leaves before the waiter has run its cleanup
        (outcome,) = await asyncio.gather(waiter, return_exceptions=True)
        assert isinstance(outcome, asyncio.CancelledError), repr(outcome)
        await asyncio.wait_for(turns.take(), 1)
        turns.give()
        return turns

    turns = run(go())
    assert turns._free == 1 and not turns.contended


def _receive(chunks, gaps_s=0.0, stall_after=None):
    """A fake ASGI receive(): the chunks, the last with more_body false; sleeps gaps_s before each;
    after `stall_after` chunks it never answers again."""
    sent = []

    async def receive():
        if stall_after is not None and len(sent) >= stall_after:
            await asyncio.Event().wait()
        await asyncio.sleep(gaps_s)
        i = len(sent)
        sent.append(i)
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    return receive


def test_a_body_is_received_whole_and_gives_its_turn_back():
    async def go():
        turns, got = UploadTurns(1), []
        await receive_body(turns, _receive([b"ab", b"cd", b"e"]), got.append)
        return b"".join(got), turns

    data, turns = run(go())
    assert data == b"abcde" and turns._free == 1


def test_a_stalled_body_gives_way_to_a_waiting_one():
    async def go():
        turns, done = UploadTurns(1), []
        stalled = asyncio.ensure_future(
            receive_body(turns, _receive([b"x", b"y"], stall_after=1), lambda c: None)
        )
        await asyncio.sleep(0.05)
        await asyncio.wait_for(receive_body(turns, _receive([b"ok"]), done.append), 1)
        assert not stalled.done()  # still waiting for its bytes
        stalled.cancel()
        await asyncio.gather(stalled, return_exceptions=True)
        return done, turns

    done, turns = run(go())
    assert done == [b"ok"] and turns._free == 1 and not turns.contended


def test_a_long_upload_lets_waiting_ones_in_after_its_slice(monkeypatch):
    monkeypatch.setattr(upload_turns, "SLICE_S", 0.05)

    async def go():
        turns, finished = UploadTurns(1), []

        async def body(name, chunks):
            await receive_body(turns, _receive([b"."] * chunks, gaps_s=0.005), lambda c: None)
            finished.append(name)

        long = asyncio.ensure_future(body("long", 100))  # ~0.5 s of steady bytes
        await asyncio.sleep(0.02)
        await body("short", 2)
        await long
        return finished

    assert run(go()) == ["short", "long"]


def test_disconnects_and_refusals_end_the_body_and_free_the_turn():
    async def disconnect():
        return {"type": "http.disconnect"}

    def refuse(chunk):
        raise ValueError("too big")

    async def go():
        turns = UploadTurns(1)
        with pytest.raises(ClientDisconnect):
            await receive_body(turns, disconnect, lambda c: None)
        with pytest.raises(ValueError):
            await receive_body(turns, _receive([b"a", b"b"]), refuse)
        return turns

    turns = run(go())
    assert turns._free == 1 and not turns.contended
