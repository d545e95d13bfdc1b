"""The app in process (httpx over ASGI, the tiny checkpoint's engine): which errors are the
client's (400 naming the field) and which are ours (500, logged with a traceback), and the
`priority` field against the scheduling policy."""

from __future__ import annotations

import asyncio
import logging
import sys

import httpx
import pytest

from plm_core.config import EngineConfig
from plm_core.engine.async_engine import AsyncEngine
from plm_core.errors import MediaError
from plm_core.runtime import load_runtime
from server.app import build_app
from server.config import ServerConfig
from server.state import ServerState

MODEL = "plm-app-test"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    config = EngineConfig.from_flat(model=str(tiny_checkpoint), device="cpu", max_num_seqs=4)
    engine = AsyncEngine(load_runtime(config))
    yield engine
    engine.shutdown()


def asgi_chat(state: ServerState, body: dict) -> httpx.Response:
    """One chat completion through the app in this process (no socket); errors as responses."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(state), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.post("/v1/chat/completions", json=body, timeout=60)

    return asyncio.run(go())


def _post(engine: AsyncEngine, body: dict, **server) -> httpx.Response:
    config = ServerConfig(served_model_name=MODEL, engine=engine.runtime.config, **server)
    state = ServerState(config)
    state.engine = engine
    return asgi_chat(state, body)


def test_a_chat_completes(engine):
    r = _post(engine, BODY)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_input_errors_carry_their_field(engine, monkeypatch):
    def bad_media(*args, **kwargs):
        raise MediaError("the image is broken", param="messages[0].content[1].image_url")

    monkeypatch.setattr(engine.runtime.processor, "process", bad_media)
    r = _post(engine, BODY)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url"
    assert error["type"] == "invalid_request_error" and error["message"] == "the image is broken"


def test_a_bug_is_a_logged_500_not_a_client_error(engine, monkeypatch, caplog):
    def bug(*args, **kwargs):
        raise ValueError("an internal invariant broke")  # a plain ValueError is not the client's

    monkeypatch.setattr(engine.runtime.processor, "process", bug)
    with caplog.at_level(logging.ERROR, logger="plm_serve"):
        r = _post(engine, BODY)
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert any(rec.exc_info and "invariant broke" in str(rec.exc_info[1]) for rec in caplog.records)


def test_an_engine_bug_refusing_a_request_is_a_500_and_the_engine_lives(engine, monkeypatch):
    core = engine.runtime.core

    def bug(*args, **kwargs):
        raise KeyError("bookkeeping")

    monkeypatch.setattr(core, "add_request", bug)
    assert _post(engine, BODY).status_code == 500
    monkeypatch.undo()
    assert engine.dead is None
    assert _post(engine, BODY).status_code == 200


def test_priority_needs_the_priority_policy(engine):
    r = _post(engine, {**BODY, "priority": -5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    assert "--scheduling-policy priority" in r.json()["error"]["message"]
    r = _post(engine, {**BODY, "priority": 0})
    assert r.status_code == 200
    r = _post(engine, {**BODY, "priority": "high"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


def test_priority_is_honoured_with_the_priority_policy(tiny_checkpoint):
    config = EngineConfig.from_flat(
        model=str(tiny_checkpoint), device="cpu", scheduling_policy="priority"
    )
    engine = AsyncEngine(load_runtime(config))
    try:
        r = _post(engine, {**BODY, "priority": -5})
        assert r.status_code == 200, r.text
    finally:
        engine.shutdown()


def test_preprocessing_leaves_the_engine_threads_alone(engine):
    """Preprocessing threads must not change torch's thread settings: torch.set_num_threads(1) in
    a worker also changed the default of threads that had not run torch yet (the engine thread's,
    for instance), which made a cold photo's engine work 1.8x slower (bench checkpoint: 880-913 ms
    against 490-530 ms)."""
    import threading

    import torch

    def fresh_thread_threads() -> int:
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return seen[0]

    before = fresh_thread_threads()
    assert _post(engine, BODY).status_code == 200
    assert fresh_thread_threads() == before


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")
def test_uvicorn_takes_uvloop_and_httptools():
    """The server's HTTP edge runs on uvloop and httptools (dependencies in pyproject.toml), which
    uvicorn picks by itself: without them it falls back to asyncio's loop and h11, slower."""
    import uvicorn

    config = uvicorn.Config(build_app(ServerState(ServerConfig())))
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
    loop = config.get_loop_factory()()
    try:
        assert type(loop).__module__.startswith("uvloop"), type(loop)
    finally:
        loop.close()


def test_loading_freezes_the_startup_heap(tiny_checkpoint):
    """Once the engine is up, the objects that live as long as the process are out of the
    collector's full passes (gc.freeze), which otherwise stalled every stream for 100-250 ms."""
    import gc
    from types import SimpleNamespace

    from server.cli import _load

    engine_config = EngineConfig.from_flat(model=str(tiny_checkpoint), device="cpu")
    state = ServerState(ServerConfig(served_model_name=MODEL, engine=engine_config))
    gc.unfreeze()
    failed: list[BaseException] = []
    try:
        _load(state, SimpleNamespace(should_exit=False), failed)  # type: ignore[arg-type]
        assert not failed and state.engine is not None
        # the engine's own objects are among the frozen ones
        assert gc.get_freeze_count() > 10_000
        assert all(o is not state.engine for o in gc.get_objects())
    finally:
        gc.unfreeze()
        if state.engine is not None:
            state.engine.shutdown()


def test_a_burst_parsed_at_once_gets_no_more_slots_than_the_limit(engine, monkeypatch):
    """--max-pending-requests 2 and six chats whose bodies are all in before any is parsed: the
    slot is taken before the (slow) parse, so two are admitted and four get 429, not six 200s."""
    import server.app

    real_parse = server.app.parse_request

    async def slow_parse(body):
        await asyncio.sleep(0.3)
        return await real_parse(body)

    monkeypatch.setattr(server.app, "parse_request", slow_parse)
    config = ServerConfig(
        served_model_name=MODEL, engine=engine.runtime.config, max_pending_requests=2
    )
    state = ServerState(config)
    state.engine = engine

    async def go() -> list[int]:
        transport = httpx.ASGITransport(app=build_app(state), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            rs = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=BODY, timeout=60) for _ in range(6))
            )
        return sorted(r.status_code for r in rs)

    assert asyncio.run(go()) == [200, 200, 429, 429, 429, 429]
    assert state.live.pending == 0
