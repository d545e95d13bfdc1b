"""`plm-serve` / `python -m server`: load a PerceptionLM checkpoint and serve the OpenAI chat API.

The server listens at once and loads the model in a thread (/ready says "loading" meanwhile);
SIGTERM makes it not-ready, closes the listeners and lets in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
import sys
import threading
from types import FrameType
from typing import Any

import uvicorn

from plm_core.config import EngineConfig
from server.app import build_app
from server.config import ServerConfig, parse_config
from server.request_ids import configure_logging
from server.state import ServerState

log = logging.getLogger("plm_serve")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    configure_logging(config.log_level, config.log_format)
    state = ServerState(config)
    uv_config = uvicorn.Config(
        build_app(state),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        log_config=None,  # uvicorn's loggers go through ours (text or JSON, with request ids)
        access_log=False,  # server/request_ids.py writes the access lines
        timeout_graceful_shutdown=math.ceil(config.drain_timeout),
        timeout_keep_alive=config.timeout_keep_alive,
    )
    server = DrainingServer(uv_config, state)
    load_failed: list[BaseException] = []
    threading.Thread(
        target=_load, args=(state, server, load_failed), name="plm-load", daemon=True
    ).start()
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.shutdown()
    if load_failed:
        return 1
    if state.engine is not None and state.engine.dead is not None:
        log.error("exiting because the engine failed: %r", state.engine.dead)
        return 1
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, whose SIGTERM/SIGINT makes readiness 503 and closes the listeners at once
    (not at uvicorn's next 0.1 s tick): a balancer's new connection is then refused, and retried
    elsewhere, instead of getting a 503 it would not retry. In-flight requests finish."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.live.draining = True
        super().handle_exit(sig, frame)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._close_listeners)

    def _close_listeners(self) -> None:
        for listener in getattr(self, "servers", []):
            listener.close()

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)


def _load(state: ServerState, server: DrainingServer, load_failed: list[BaseException]) -> None:
    """Loads the model and starts the engine (in a thread); a failure ends the process."""
    from plm_core.engine.async_engine import AsyncEngine
    from plm_core.runtime import load_runtime

    config = state.config
    try:
        if config.debug_load_delay:  # lets the tests watch the loading state
            import time

            time.sleep(config.debug_load_delay)
        runtime = load_runtime(_engine_config(config))
        if config.debug_fail_after_steps is not None:  # fault injection for the failure tests
            _fail_after(runtime.core, config.debug_fail_after_steps)
        engine = AsyncEngine(runtime)
    except BaseException as e:  # noqa: BLE001 - any load failure ends the process with a message
        load_failed.append(e)
        if isinstance(e, ValueError):  # ConfigError, CheckpointError, a bad option value
            print(f"error: {e}", file=sys.stderr)
        else:
            log.exception("loading the model failed")
        server.should_exit = True
        return
    engine.on_dead = lambda: setattr(server, "should_exit", True)  # an orchestrator restarts us
    freeze_startup_heap()
    state.engine = engine  # from here on /ready is 200
    log.info(
        "serving %s as '%s' on %s (%s); KV cache %d tokens; max_model_len %d; http://%s:%d",
        runtime.config.model,
        config.model_name,
        runtime.device,
        runtime.dtype,
        engine.kv_capacity_tokens,
        engine.max_model_len,
        config.host,
        config.port,
    )


def freeze_startup_heap() -> None:
    """Moves every object alive now (the model's modules, the tokenizer's vocabulary, the KV
    cache's bookkeeping: hundreds of thousands) out of the garbage collector's reach, as vLLM's
    engine does after it starts. They live as long as the process, and the collector's full passes
    over them stopped every thread for 100-250 ms at random moments (measured on the tiny
    checkpoint: one 196 ms pass over 436,000 objects, a 248 ms gap in four streams)."""
    gc.collect()
    gc.freeze()


def _engine_config(config: ServerConfig) -> EngineConfig:
    """The engine's config, pointed at the demo checkpoint (built once) when --demo is given."""
    if not config.demo:
        return config.engine
    from plm_core.demo import demo_checkpoint

    path = str(demo_checkpoint(config.demo))
    return dataclasses.replace(config.engine, model=path, revision=None)


def _fail_after(core: Any, steps: int) -> None:
    step = core.step
    count = [0]

    def failing_step() -> Any:
        count[0] += 1
        if count[0] > steps:
            raise RuntimeError("injected engine failure (--debug-fail-after-steps)")
        return step()

    core.step = failing_step


if __name__ == "__main__":
    sys.exit(main())
