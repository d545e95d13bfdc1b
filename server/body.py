"""Request bodies: read within the size, time and server-wide byte budgets, then parsed as strict
JSON and validated into a `ChatCompletionRequest` (off the event loop when large)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from server.protocol import APIError, ChatCompletionRequest
from server.state import ServerState
from server.upload_turns import receive_body

# larger bodies (media as data: URLs) are parsed in a worker thread: megabytes of JSON would stall
# every stream on the event loop
INLINE_PARSE_BYTES = 256 << 10


def too_busy(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", headers={"Retry-After": "1"})


T = TypeVar("T")


async def off_loop_if_large(parse: Callable[[bytes], T], body: bytes) -> T:
    """parse(body), in a worker thread when the body is large (media as data: URLs)."""
    if len(body) > INLINE_PARSE_BYTES:
        return await asyncio.to_thread(parse, body)
    return parse(body)


async def parse_request(body: bytes) -> ChatCompletionRequest:
    """The body as the validated request (off the event loop when large); APIError 400."""
    return await off_loop_if_large(validate_body, body)


async def read_body(request: Request, state: ServerState) -> bytes:
    """The raw body, within the size, time and byte budgets; APIError 408/413/429 otherwise."""
    timeout_s = state.config.request_body_timeout
    try:
        return await asyncio.wait_for(_read_body(request, state), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s") from None


async def _read_body(request: Request, state: ServerState) -> bytes:
    """The whole body, read in turns with the other uploads (server/upload_turns.py), within the
    size limit and the server-wide budget of bytes being received."""
    limit, live = state.config.max_body_bytes, state.live
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0

    def take(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)
        live.receiving_bytes += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the {limit}-byte limit")
        # many large uploads at once, stalled or not
        if live.receiving_bytes > state.config.receiving_budget:
            state.metrics.rejected.labels("capacity").inc()
            raise too_busy("the server is receiving too many request bodies at once; retry later")
        chunks.append(chunk)

    try:
        await receive_body(state.uploads, request.receive, take)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request body") from None
    finally:
        live.receiving_bytes -= size
    return b"".join(chunks)


def parse_json(body: bytes) -> dict[str, Any]:
    """Strict JSON (no NaN or Infinity, no lone surrogates, bounded nesting), an object."""
    try:
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
    return data


def validate_body(body: bytes) -> ChatCompletionRequest:
    """The body (strict JSON, see parse_json) as the request."""
    return validated(ChatCompletionRequest, parse_json(body))


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: dict[str, Any]) -> M:
    """data as the pydantic model; APIError 400 naming the first field at fault otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = param_path(err.get("loc", ()))
        message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        raise APIError(400, message, param=param) from None


def param_path(loc: tuple[Any, ...]) -> str | None:
    """A pydantic error location as OpenAI writes `param`: the field, then list indices
    (`messages[0]`). Later string parts are pydantic's union-member tags (`str`, `list[str]`) or
    dict keys, not fields."""
    if not loc:
        return None
    return str(loc[0]) + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))


def _not_json_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _find_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (valid JSON escapes, not
    Unicode text)."""
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
