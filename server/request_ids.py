"""Request ids and the access log: every HTTP request gets an id (the client's `X-Request-Id`, or a
new one), returned in the `X-Request-Id` response header, carried by every log line written while
the request is handled, and used in its completion id; one access-log line per request with method,
path, status, prompt/completion tokens and latency. `--log-format json` writes each log line as a
JSON object for log shippers.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

HEADER = b"x-request-id"
# what a client's id may be: a header-safe token (UUIDs, trace ids, ...), at most 128 characters
VALID_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
request_id_var: ContextVar[str | None] = ContextVar("plm_request_id", default=None)
access_log = logging.getLogger("plm_serve.access")


def new_request_id() -> str:
    return uuid.uuid4().hex


def client_request_id(scope: Scope) -> str | None:
    """The client's X-Request-Id if it is a valid id, else None (a new one is made)."""
    for name, value in scope.get("headers") or ():
        if name == HEADER:
            text = value.decode("latin-1").strip()
            return text if VALID_ID.fullmatch(text) else None
    return None


class RequestIdMiddleware:
    """Outermost ASGI middleware: gives each HTTP request its id (scope["state"]["request_id"],
    and `request_id_var` for log lines), adds the X-Request-Id header to the response, and writes
    the access-log line when the response ends."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = client_request_id(scope)
        rid = given or new_request_id()
        scope.setdefault("state", {}).update(request_id=rid, request_id_given=given is not None)
        token = request_id_var.set(rid)
        started, status = time.perf_counter(), [500]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode())]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                _log_access(scope, status[0], time.perf_counter() - started)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def record_usage(scope_state: Any, prompt_tokens: int, completion_tokens: int) -> None:
    """Called by the chat route: the tokens the access-log line reports."""
    scope_state.usage = (prompt_tokens, completion_tokens)


def _log_access(scope: Scope, status: int, seconds: float) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    usage = scope.get("state", {}).get("usage")
    fields = {
        "method": scope.get("method"),
        "path": scope.get("path"),
        "status": status,
        "prompt_tokens": usage[0] if usage else None,
        "completion_tokens": usage[1] if usage else None,
        "latency_ms": round(seconds * 1000, 1),
    }
    tokens = f" tokens={usage[0]}+{usage[1]}" if usage else ""
    access_log.info(
        "%s %s %d%s %.1f ms",
        fields["method"],
        fields["path"],
        status,
        tokens,
        fields["latency_ms"],
        extra={"access": fields},
    )


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or "-") on every log record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, and the access fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        out.update(getattr(record, "access", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str, fmt: str) -> None:
    """The root logger's handler: text (with the request id) or JSON lines (--log-format)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
