"""The FastAPI app: /v1/chat/completions (JSON or SSE), /v1/models, /health, with OpenAI's error envelope.

Request bodies are parsed and validated here, media are decoded in a worker thread (never on the
event loop), and each choice is one engine request streamed back from the `AsyncEngine`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from plm_core.engine.async_engine import AsyncEngine, EngineDeadError
from plm_core.llm import LLM, choice_params
from plm_core.media.errors import MediaError
from plm_core.processor import ContextLengthError, PromptError
from server.media_fetch import MediaFetcher
from server.metrics import Metrics
from server.protocol import (
    APIError,
    ChatCompletionRequest,
    completion_id,
    logprobs_content,
    now,
    to_engine_inputs,
)

log = logging.getLogger("plm_serve")
STARTED = int(time.time())  # the model cards' `created`


def _param_path(loc: tuple) -> str | None:
    """A pydantic error location as OpenAI writes `param`: the field, then list indices (`messages[0]`).
    Later string parts are pydantic's union-member tags (`str`, `list[str]`) or dict keys, not fields."""
    if not loc:
        return None
    return str(loc[0]) + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))


@dataclass
class ServerState:
    """What the routes need: the loaded model's processor and tokenizer, and the running engine.

    `llm` and `engine` stay None while the model loads (the server already answers /health, and
    /ready says "loading"); the engine is set last, which is what makes the server ready."""

    served_model_name: str
    llm: LLM | None = None
    engine: AsyncEngine | None = None
    api_key: str | None = None  # Bearer token required on every route but /health, /ready, /metrics
    max_pending: int = (
        256  # chat requests admitted at once (preprocessing, waiting or running); then 429
    )
    max_body_bytes: int = 64 << 20  # larger request bodies get 413 before they are parsed
    max_media_items: int = 8  # images + videos per request, checked before any fetch or decode
    body_timeout_s: float = (
        30.0  # a request body not received within this gets 408 (no slot held meanwhile)
    )
    allowed_origins: tuple[
        str, ...
    ] = ()  # CORS: browser origins allowed to call the API ("*" for any)
    receiving_bytes: int = 0  # bytes of request bodies being received right now (not yet parsed)
    max_receiving_bytes: int | None = (
        None  # cap on receiving_bytes; default max(1 GiB, 2 x max_body_bytes)
    )
    pending: int = 0
    draining: bool = False
    metrics: Metrics | None = None
    fetcher: MediaFetcher | None = None  # http(s) media; default: SSRF guard on, 32 MiB per item
    # output constraints compile here, apart from media preprocessing, so slow ones delay only each other
    grammar_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="plm-grammar")
    )

    @property
    def receiving_budget(self) -> int:
        """Most body bytes held while being received, all requests together; beyond it, 429."""
        return self.max_receiving_bytes or max(1 << 30, 2 * self.max_body_bytes)

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None

    @property
    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "draining"
        if self.engine is None:
            return "loading"
        if self.engine.dead is not None:
            return "engine failed"
        return None


OPEN_PATHS = ("/health", "/ready", "/metrics")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="plm-serve", docs_url=None, redoc_url=None)
    app.state.plm = state
    state.metrics = Metrics(state)
    if state.fetcher is None:
        state.fetcher = MediaFetcher()

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        return _error_response(APIError(400, str(e.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("unhandled error")
        return _error_response(APIError(500, "internal server error", type="server_error"))

    app.add_middleware(_APIKeyMiddleware, state=state)
    if state.allowed_origins:  # added last, so it runs first: preflights need no API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            max_age=600,
        )

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(
            state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/ready")
    async def ready():
        if not state.ready:
            return JSONResponse(
                {"status": "unavailable", "reason": state.not_ready_reason}, status_code=503
            )
        return {"status": "ready"}

    for path, route in (
        ("/health", health),
        ("/ready", ready),
    ):  # HEAD too, as load balancers may probe with it
        app.add_api_route(path, route, methods=["HEAD"], include_in_schema=False)

    def model_card() -> dict:
        card = {
            "id": state.served_model_name,
            "object": "model",
            "created": STARTED,
            "owned_by": "plm-serve",
        }
        if state.llm is not None:
            card["max_model_len"] = state.llm.max_model_len
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.served_model_name:
            raise APIError(
                404,
                f"the model '{model_id}' does not exist; this server serves "
                f"'{state.served_model_name}'",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if not state.ready:
            state.metrics.rejected.labels("not_ready").inc()
            raise APIError(
                503,
                f"the server is not ready ({state.not_ready_reason})",
                type="server_error",
                headers={"Retry-After": "5"},
            )
        if state.pending >= state.max_pending:  # refuse before reading a body when already full
            state.metrics.rejected.labels("capacity").inc()
            raise APIError(
                429,
                f"the server is at capacity ({state.max_pending} requests in flight); retry later",
                type="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        try:
            req = await _parse(request, state)
        except APIError:
            state.metrics.rejected.labels("invalid").inc()
            raise
        if (
            state.pending >= state.max_pending
        ):  # admission once the body is in: a stalled upload holds no slot
            state.metrics.rejected.labels("capacity").inc()
            raise APIError(
                429,
                f"the server is at capacity ({state.max_pending} requests in flight); retry later",
                type="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        state.pending += 1
        try:
            response = await _chat(state, request, req)
        except BaseException as e:
            state.pending -= 1
            if isinstance(e, APIError) and e.status < 500:
                state.metrics.rejected.labels("invalid").inc()
            raise
        if isinstance(response, StreamingResponse):  # the slot is released when the stream ends
            response.body_iterator = _release_after(response.body_iterator, state)
        else:
            state.pending -= 1
        return response

    return app


class _APIKeyMiddleware:
    """Plain ASGI middleware (not BaseHTTPMiddleware, which hides client disconnects from the routes)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        key = self.state.api_key
        if scope["type"] == "http" and key is not None and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            token = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, key.encode()):
                response = _error_response(
                    APIError(
                        401,
                        "invalid or missing API key (send 'Authorization: Bearer <key>')",
                        code="invalid_api_key",
                    )
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _release_after(stream, state: ServerState):
    try:
        async for part in stream:
            yield part
    finally:
        state.pending -= 1


async def _chat(state: ServerState, request: Request, req: ChatCompletionRequest):
    """Validates, preprocesses and runs one parsed chat completion (JSON or SSE)."""
    arrival = time.perf_counter()
    media_items = sum(
        1
        for m in req.messages
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") in ("image_url", "video_url", "image", "video")
    )
    if media_items > state.max_media_items:
        raise APIError(
            400,
            f"the request has {media_items} images/videos; this server accepts at most "
            f"{state.max_media_items} per request",
            param="messages",
        )
    if req.model != state.served_model_name:
        raise APIError(
            404,
            f"the model '{req.model}' does not exist; this server serves "
            f"'{state.served_model_name}'",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
    llm = state.llm
    prompt_len_cap = llm.max_model_len - 1
    params, media, constraint_field = to_engine_inputs(
        req, default_max_tokens=llm.max_model_len, vocab_size=llm.model_config.text.vocab_size
    )
    if (
        params.structured_output is not None
    ):  # compiled off the event loop; the engine's own compile hits the cache
        try:
            await asyncio.get_running_loop().run_in_executor(
                state.grammar_pool, llm.engine.grammars.compile, params.structured_output
            )
        except ValueError as e:
            raise APIError(400, str(e), param=constraint_field) from None
    try:
        messages = await state.fetcher.fetch_request_media(req.messages)
        prompt = await asyncio.to_thread(
            llm.processor.process,
            messages,
            media,
            max_prompt_len=prompt_len_cap,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )
    except (PromptError, MediaError) as e:
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
        raise APIError(400, str(e), param=_message_param(str(e)), code=code) from None
    n_prompt = len(prompt.prompt_token_ids)
    explicit = req.max_completion_tokens or req.max_tokens
    if explicit is None:
        params.max_tokens = llm.max_model_len - n_prompt
    elif n_prompt + explicit > llm.max_model_len:
        name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(
            400,
            f"this model's maximum context length is {llm.max_model_len} tokens; the prompt "
            f"has {n_prompt} tokens and {name} asks for {explicit} more",
            param=name,
            code="context_length_exceeded",
        )
    rid = completion_id()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _stream(state, rid, prompt, params, include_usage, arrival),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    task = asyncio.create_task(_complete(state, rid, prompt, params, arrival))
    while (
        True
    ):  # a client that goes away aborts its request (and frees its KV) within a poll interval
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return JSONResponse(task.result())
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "client disconnected")


async def _read_body(request: Request, state: ServerState) -> bytes:
    """The whole body, within the size limit and the server-wide budget of bytes being received."""
    limit = state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            state.receiving_bytes += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body exceeds the {limit}-byte limit")
            if (
                state.receiving_bytes > state.receiving_budget
            ):  # many large uploads at once, stalled or not
                state.metrics.rejected.labels("capacity").inc()
                raise APIError(
                    429,
                    "the server is receiving too many request bodies at once; retry later",
                    type="rate_limit_error",
                    headers={"Retry-After": "1"},
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request body") from None
    finally:
        state.receiving_bytes -= size
    return b"".join(chunks)


def _message_param(message: str) -> str:
    """`param` for a prompt or media error: the spot its message starts with (`messages[1].content[0]`,
    or a request-level field such as `max_num_tiles`), else `messages`."""
    m = re.match(
        r"messages\[\d+\](?:\.content(?:\[\d+\])?)?|"
        r"(max_num_tiles|num_frames|fps|continue_final_message)\b",
        message,
    )
    return m.group(0) if m else "messages"


def _not_json_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _find_lone_surrogate(value, path: str = "") -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (valid JSON escapes, not Unicode text)."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return p
        elif isinstance(v, dict):
            stack.extend((x, f"{p}.{k}" if p else str(k)) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, f"{p}[{i}]") for i, x in enumerate(v))
    return None


INLINE_PARSE_BYTES = 256 << 10  # larger bodies (media as data: URLs) are parsed in a worker thread


async def _parse(request: Request, state: ServerState) -> ChatCompletionRequest:
    timeout_s = state.body_timeout_s
    try:
        body = await asyncio.wait_for(_read_body(request, state), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    if (
        len(body) > INLINE_PARSE_BYTES
    ):  # megabytes of JSON would stall every stream on the event loop
        return await asyncio.to_thread(_validate_body, body)
    return _validate_body(body)


def _validate_body(body: bytes) -> ChatCompletionRequest:
    try:  # strict JSON: NaN and Infinity are not JSON; absurd nesting is refused, not a crash
        data = json.loads(body, parse_constant=_not_json_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    bad = _find_lone_surrogate(data)
    if bad is not None:
        raise APIError(
            400, f"{bad} contains a lone surrogate escape, which is not Unicode text", param=bad
        )
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param_path(err.get("loc", ()))
        raise APIError(
            400, f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param=param
        ) from None


def _choices(state: ServerState, rid: str, prompt, params):
    return [
        (i, state.engine.generate(f"{rid}-{i}", prompt, choice_params(params, i)))
        for i in range(params.n)
    ]


class _Timer:
    """Records TTFT, inter-token latency and end-to-end latency of one choice."""

    def __init__(self, metrics: Metrics, arrival: float):
        self.metrics, self.arrival, self.last = metrics, arrival, None

    def token(self) -> None:
        now_ = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now_ - self.arrival)
        else:
            self.metrics.itl.observe(now_ - self.last)
        self.last = now_

    def done(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)


async def _complete(state: ServerState, rid: str, prompt, params, arrival: float) -> dict:
    async def run(i, gen):
        text, ids, lps, finish, cached = "", [], [], None, 0
        timer = _Timer(state.metrics, arrival)
        async for d in gen:
            timer.token()
            if d.finished:
                timer.done()
            text += d.new_text
            ids.extend(d.new_token_ids)
            lps.extend(d.new_logprobs)
            finish = d.finish_reason if d.finished else finish
            cached = d.num_cached_tokens
        return i, text, ids, lps, finish, cached

    try:
        results = await asyncio.gather(
            *(run(i, g) for i, g in _choices(state, rid, prompt, params))
        )
    except EngineDeadError as e:
        raise APIError(500, f"the engine failed: {e}", type="server_error") from None
    except ValueError as e:  # the engine refused the request before running it
        raise APIError(400, str(e)) from None
    choices = []
    for i, text, ids, lps, finish, _ in results:
        choice = {
            "index": i,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "finish_reason": finish if finish in ("stop", "length") else "stop",
            "logprobs": None,
        }
        if params.logprobs is not None:
            choice["logprobs"] = {
                "content": logprobs_content(lps, state.llm.tokenizer),
                "refusal": None,
            }
        choices.append(choice)
    completion = sum(len(r[2]) for r in results)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": state.served_model_name,
        "choices": choices,
        "usage": _usage(prompt, completion, results[0][5]),
    }


def _usage(prompt, completion: int, cached: int) -> dict:
    """OpenAI's usage; `cached_tokens`: the prompt tokens the prefix cache served (of the first choice)."""
    n_prompt = len(prompt.prompt_token_ids)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": completion,
        "total_tokens": n_prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream(
    state: ServerState, rid: str, prompt, params, include_usage: bool, arrival: float
):
    created, model = now(), state.served_model_name
    timers = [_Timer(state.metrics, arrival) for _ in range(params.n)]
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, gen):
        try:
            async for d in gen:
                await queue.put((i, d))
        except Exception as e:  # noqa: BLE001 — reported to the client as an error event
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    def chunk(choices, usage=None):
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = usage
        return _sse(body)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in _choices(state, rid, prompt, params)]
    completion, cached = 0, 0
    try:
        for i in range(params.n):
            yield chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        open_choices = params.n
        while open_choices:
            i, d = await queue.get()
            if d is None:
                open_choices -= 1
                continue
            if isinstance(d, Exception):
                err = APIError(500, f"the engine failed: {d}", type="server_error")
                yield _sse(err.body())
                break
            completion += len(d.new_token_ids)
            cached = d.num_cached_tokens if i == 0 else cached
            timers[i].token()
            if d.finished:
                timers[i].done()
            choice = {
                "index": i,
                "delta": {"content": d.new_text} if d.new_text else {},
                "logprobs": None,
                "finish_reason": None,
            }
            if params.logprobs is not None:
                choice["logprobs"] = {
                    "content": logprobs_content(d.new_logprobs, state.llm.tokenizer),
                    "refusal": None,
                }
            if d.finished:
                choice["finish_reason"] = (
                    d.finish_reason if d.finish_reason in ("stop", "length") else "stop"
                )
            if choice["delta"] or choice["finish_reason"] or params.logprobs is not None:
                yield chunk([choice])
        if include_usage:
            yield chunk([], _usage(prompt, completion, cached))
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:  # a client that went away aborts its requests
            t.cancel()
