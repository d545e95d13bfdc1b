"""An asyncio front for the engine: the engine loop runs in its own thread; callers await per-request streams.

    engine = AsyncEngine(core)            # starts the engine thread
    async for delta in engine.generate(request_id, prompt, params):
        ...                               # RequestDelta objects, the last one has finished=True
    engine.abort(request_id)              # from any thread; frees the request's KV within one step

The event loop never waits on the model: adds and aborts are queued to the engine thread, which
hands each step's deltas back with `call_soon_threadsafe`. If a step raises, every in-flight
stream gets an `EngineDeadError` and `dead` becomes True (a server then reports not-ready and exits).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from plm_core.engine.core import EngineCore, RequestDelta
from plm_core.inputs import ProcessedPrompt
from plm_core.sampling import SamplingParams

log = logging.getLogger("plm_core.async")


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can complete."""


@dataclass
class _Add:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class AsyncEngine:
    """Runs an `EngineCore` in a background thread and streams its outputs to asyncio tasks."""

    def __init__(self, core: EngineCore, *, idle_wait_s: float = 0.05):
        self.core = core
        self.on_dead = None  # optional callable, run in the engine thread after a failure
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._idle_wait_s = idle_wait_s
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="plm-engine", daemon=True)
        self._thread.start()

    # -- caller side (any thread / event loop) --------------------------------------------------------
    async def generate(
        self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams
    ) -> AsyncIterator[RequestDelta]:
        """Queues one sequence and yields its deltas; cancelling the iterator aborts the request."""
        if self.dead is not None:
            raise EngineDeadError(f"engine is dead: {self.dead!r}")
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = (loop, stream)
        self._commands.put(_Add(request_id, prompt, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._commands.put(_Stop())
        self._thread.join(timeout_s)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # -- engine thread --------------------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _handle(self, command) -> bool:
        if isinstance(command, _Stop):
            return False
        if isinstance(command, _Add):
            try:
                self.core.add_request(command.request_id, command.prompt, command.params)
            except ValueError as e:
                self._deliver(command.request_id, e)
        elif isinstance(command, _Abort):
            self.core.abort(command.request_id)
        return True

    def _loop(self) -> None:
        try:
            while True:
                block = not self.core.has_unfinished()
                try:
                    command = (
                        self._commands.get(timeout=self._idle_wait_s)
                        if block
                        else self._commands.get_nowait()
                    )
                    if not self._handle(command):
                        return
                    while True:  # drain whatever else arrived
                        if not self._handle(self._commands.get_nowait()):
                            return
                except queue.Empty:
                    pass
                if self.core.has_unfinished():
                    for delta in self.core.step():
                        self._deliver(delta.request_id, delta)
        except BaseException as e:  # noqa: BLE001 — any failure kills the engine; streams must hear of it
            log.exception("engine loop failed")
            self.dead = e
            error = EngineDeadError(f"engine failed: {e!r}")
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(rid, error)
            if self.on_dead is not None:
                self.on_dead()
