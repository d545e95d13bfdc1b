"""The FastAPI app: routes (/v1/chat/completions, /v1/models, /tokenize, /detokenize, /health,
/ready, /metrics), admission (429 when full, 503 while not ready), the request-id, API-key and
CORS middleware, and OpenAI's error envelope.

Bodies are read and validated in server/body.py; a chat completion runs in server/chat.py.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plm_core.engine.async_engine import AsyncEngine
from server.body import parse_request, read_body, too_busy
from server.chat import chat_completion, check_model
from server.openapi import install as install_openapi
from server.protocol import APIError
from server.request_ids import ASGIApp, RequestIdMiddleware, Scope
from server.state import ServerState
from server.tokenize import detokenize, tokenize

log = logging.getLogger("plm_serve")
STARTED = int(time.time())  # the model cards' `created`
OPEN_PATHS = ("/", "/health", "/ready", "/metrics")  # the page itself: its API calls send the key
PLAYGROUND = Path(__file__).parent / "static" / "playground.html"


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="plm-serve", docs_url=None, redoc_url=None)
    install_openapi(app, state.config.model_name)
    _add_error_handlers(app)
    app.add_middleware(_APIKeyMiddleware, state=state)
    origins = state.config.allowed_origins
    if origins:  # added last, so it runs first: preflights need no API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            max_age=600,
        )
    # added last, so it runs first: every response (401s, CORS preflights, errors) gets its id
    app.add_middleware(RequestIdMiddleware)
    _add_probe_routes(app, state)
    _add_model_routes(app, state)
    _add_chat_route(app, state)
    _add_tokenize_routes(app, state)
    if state.config.playground:
        _add_playground_route(app)
    return app


def _add_playground_route(app: FastAPI) -> None:
    page = PLAYGROUND.read_bytes()  # read once: the package's own file, no network fetch

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, str(e.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=e)
        return _error_response(APIError(500, "internal server error", type="server_error"))


def _add_probe_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        media_type = "text/plain; version=0.0.4; charset=utf-8"
        return Response(state.metrics.render(), media_type=media_type)

    @app.get("/ready")
    async def ready() -> Any:
        if not state.ready:
            body = {"status": "unavailable", "reason": state.not_ready_reason}
            return JSONResponse(body, status_code=503)
        return {"status": "ready"}

    # HEAD too, as load balancers may probe with it
    for path, route in (("/health", health), ("/ready", ready)):
        app.add_api_route(path, route, methods=["HEAD"], include_in_schema=False)


def _add_model_routes(app: FastAPI, state: ServerState) -> None:
    name = state.config.model_name

    def model_card() -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": STARTED,
            "owned_by": "plm-serve",
        }
        if state.engine is not None:
            card["max_model_len"] = state.engine.max_model_len
        return card

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(state, model_id)
        return model_card()


def admit(state: ServerState) -> None:
    """A 429 with Retry-After when --max-pending-requests requests are already in flight."""
    capacity = state.config.max_pending_requests
    if state.live.pending >= capacity:
        state.metrics.rejected.labels("capacity").inc()
        raise too_busy(f"the server is at capacity ({capacity} requests in flight); retry later")


async def admitted_body(request: Request, state: ServerState) -> bytes:
    """The raw body of a request admitted in flight: it holds one of --max-pending-requests slots
    (`live.pending`; the caller gives it back), or an APIError (429 when full, 408/413/...)."""
    admit(state)  # refuse before reading a body when already full
    try:
        body = await read_body(request, state)
    except APIError as e:
        if e.status != 429:
            state.metrics.rejected.labels("invalid").inc()
        raise
    # admission once the body is in (a stalled upload holds no slot) and before it is parsed: a
    # burst's refusals cost no JSON parsing, which holds the GIL. The slot is taken at once, before
    # any await, so requests parsed meanwhile cannot pass the same check.
    admit(state)
    state.live.pending += 1
    return body


def _add_chat_route(app: FastAPI, state: ServerState) -> None:
    live, rejected = state.live, state.metrics.rejected

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        engine = ready_engine(state)
        body = await admitted_body(request, state)
        try:
            req = await parse_request(body)
            response = await chat_completion(state, engine, request, req)
        except BaseException as e:
            live.pending -= 1
            if isinstance(e, APIError) and e.status < 500:
                rejected.labels("invalid").inc()
            raise
        if isinstance(response, StreamingResponse):  # the slot is released when the stream ends
            response.body_iterator = _release_after(response.body_iterator, state)
        else:
            live.pending -= 1
        return response


def ready_engine(state: ServerState) -> AsyncEngine:
    """The engine, or a 503 with Retry-After while loading, draining or failed."""
    engine = state.engine
    if engine is None or not state.ready:
        state.metrics.rejected.labels("not_ready").inc()
        raise APIError(
            503,
            f"the server is not ready ({state.not_ready_reason})",
            type="server_error",
            headers={"Retry-After": "5"},
        )
    return engine


def _add_tokenize_routes(app: FastAPI, state: ServerState) -> None:
    """/tokenize and /detokenize (server/tokenize.py); /tokenize preprocesses media, so it is
    admitted and counted in flight like a chat."""
    live = state.live

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        engine = ready_engine(state)
        body = await admitted_body(request, state)
        try:
            return JSONResponse(await tokenize(state, engine, body))
        finally:
            live.pending -= 1

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        engine = ready_engine(state)
        return JSONResponse(detokenize(state, engine, await read_body(request, state)))


async def _release_after(stream: AsyncIterable[Any], state: ServerState) -> AsyncIterator[Any]:
    try:
        async for part in stream:
            yield part
    finally:
        state.live.pending -= 1


class _APIKeyMiddleware:
    """Plain ASGI middleware (not BaseHTTPMiddleware, which hides client disconnects from the
    routes)."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        key = self.state.config.api_key
        if scope["type"] == "http" and key is not None and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            token = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, key.encode()):
                message = "invalid or missing API key (send 'Authorization: Bearer <key>')"
                response = _error_response(APIError(401, message, code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
