"""An asyncio front for the engine: the engine loop runs in its own thread; callers await streams.

    engine = AsyncEngine(load_runtime(config))   # starts the engine thread
    async for delta in engine.generate(request_id, prompt, params):
        ...                                      # RequestDeltas of all n choices, by `index`
    engine.abort(request_id)                     # from any thread; frees the KV within one step

The event loop never waits on the model: adds and aborts are queued to the engine thread, which
hands each step's deltas back with `call_soon_threadsafe`. If a step raises, every in-flight
stream gets an `EngineDeadError` and `dead` becomes True (a server then reports not-ready and
exits). Everything a server needs goes through this class's public methods.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from plm_core.engine.core import EngineStats, RequestDelta
from plm_core.errors import InputError
from plm_core.inputs import ProcessedPrompt
from plm_core.processor import MediaOptions
from plm_core.runtime import Runtime, RuntimeView
from plm_core.sampling import SamplingParams, StructuredOutput

log = logging.getLogger("plm_core.async")


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can complete."""


@dataclass
class _Add:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    priority: int


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


_Command = _Add | _Abort | _Stop
_Stream = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[RequestDelta | BaseException]"]


class AsyncEngine(RuntimeView):
    """Runs a runtime's `EngineCore` in a background thread and streams outputs to asyncio tasks."""

    def __init__(self, runtime: Runtime, *, idle_wait_s: float = 0.05):
        self.runtime = runtime
        self.on_dead: Callable[[], None] | None = None  # run in the engine thread after a failure
        self.dead: BaseException | None = None
        self._core = runtime.core
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._idle_wait_s = idle_wait_s
        self._media_pool = ThreadPoolExecutor(
            max_workers=min(32, (os.cpu_count() or 1) + 4),
            thread_name_prefix="plm-media",
        )
        self._thread = threading.Thread(target=self._loop, name="plm-engine", daemon=True)
        self._thread.start()

    # -- what the server reads ------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self._core.kv_capacity_tokens

    def stats(self) -> EngineStats:
        """The engine's counters and gauges as of its last step (a copy)."""
        return self._core.snapshot_stats()

    async def preprocess(
        self,
        messages: list[dict[str, Any]],
        options: MediaOptions | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> ProcessedPrompt:
        """`Runtime.process` (decodes and preprocesses media) in the engine's pool of
        preprocessing threads, so the event loop goes on meanwhile."""
        call = functools.partial(
            self.runtime.process,
            messages,
            options,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        return await asyncio.get_running_loop().run_in_executor(self._media_pool, call)

    def compile_constraint(self, spec: StructuredOutput) -> None:
        """Compiles an output constraint ahead of its request (cached for the engine thread).
        Blocking: call it from a worker thread. InputError when it does not compile."""
        try:
            self._core.grammars.compile(spec)
        except ValueError as e:
            raise InputError(str(e)) from None

    # -- requests (any thread / event loop) -----------------------------------------------------
    async def generate(
        self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams, *, priority: int = 0
    ) -> AsyncIterator[RequestDelta]:
        """Queues a request and yields the deltas of all its choices until every choice has
        finished; cancelling the iterator aborts the request. Raises InputError when the engine
        refuses the request, EngineDeadError when the engine has failed."""
        if self.dead is not None:
            raise EngineDeadError(f"engine is dead: {self.dead!r}")
        stream: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(_Add(request_id, prompt, params, priority))
        open_choices = params.n
        try:
            while open_choices:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                open_choices -= item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if open_choices:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._commands.put(_Stop())
        self._thread.join(timeout_s)
        self._media_pool.shutdown(wait=False, cancel_futures=True)

    # -- engine thread --------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestDelta | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _handle(self, command: _Command) -> bool:
        if isinstance(command, _Stop):
            return False
        if isinstance(command, _Add):
            try:
                self._core.add_request(
                    command.request_id, command.prompt, command.params, priority=command.priority
                )
            except InputError as e:  # the client's fault: its stream reports it
                self._deliver(command.request_id, e)
            except Exception as e:  # noqa: BLE001 - a bug refusing one request: log, report, go on
                log.exception("adding request %s failed", command.request_id)
                self._core.abort(command.request_id)
                self._deliver(command.request_id, e)
        else:
            self._core.abort(command.request_id)
        return True

    def _drain_commands(self) -> bool:
        """Handles queued commands (waiting a little when idle); False once told to stop."""
        try:
            if self._core.has_unfinished():
                command = self._commands.get_nowait()
            else:
                command = self._commands.get(timeout=self._idle_wait_s)
            while True:
                if not self._handle(command):
                    return False
                command = self._commands.get_nowait()
        except queue.Empty:
            return True

    def _loop(self) -> None:
        try:
            while self._drain_commands():
                if self._core.has_unfinished():
                    for delta in self._core.step():
                        self._deliver(delta.request_id, delta)
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine; streams must hear
            log.exception("engine loop failed")
            self.dead = e
            error = EngineDeadError(f"engine failed: {e!r}")
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(rid, error)
            if self.on_dead is not None:
                self.on_dead()
