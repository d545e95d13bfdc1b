"""The OpenAPI document at /openapi.json, true to what the routes take and return.

The routes read their bodies themselves (size, time and byte budgets, strict JSON: server/body.py),
so FastAPI cannot see their shapes; this module states them: the request bodies (the chat request
as server/protocol.py validates it, /tokenize's two forms, /detokenize), the JSON and SSE
responses, OpenAI's error envelope for every error status a route gives, and /metrics as
text/plain. The models below only describe; tests check real responses against them.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from server.protocol import ChatCompletionRequest
from server.tokenize import DetokenizeRequest, TokenizePrompt


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Doc):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Doc):
    """OpenAI's error envelope, for every 4xx and 5xx."""

    error: ErrorBody


class TopLogprob(_Doc):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Doc):
    content: list[TokenLogprob] | None
    refusal: None


class AssistantMessage(_Doc):
    role: Literal["assistant"]
    content: str | None
    refusal: None


class Choice(_Doc):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None


class PromptTokensDetails(_Doc):
    cached_tokens: int


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(_Doc):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Doc):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(_Doc):
    """One `data:` event of a stream (the stream ends with `data: [DONE]`; an error after the
    stream started is an event holding the error envelope)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeChat(BaseModel):
    """/tokenize's chat form: a chat completion's messages and media options (its other fields
    are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    max_num_tiles: int | None = None
    num_frames: int | None = None
    fps: float | None = None


class MediaCost(_Doc):
    index: int
    kind: Literal["image", "video"]
    tiles: int | None = None  # images: thumbnail included
    frames: int | None = None  # videos
    tokens: int
    offset: int


class TokenizeResponse(_Doc):
    count: int
    max_model_len: int
    tokens: list[int]
    items: list[MediaCost] | None = None  # chats only


class DetokenizeResponse(_Doc):
    prompt: str


class Status(_Doc):
    status: str
    reason: str | None = None


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    why = {
        400: "invalid request (param names the field)",
        401: "missing or wrong API key (--api-key)",
        404: "unknown model or route",
        408: "the body did not arrive in time",
        413: "body over --max-request-body-mb",
        429: "at capacity; Retry-After says when to retry",
        500: "the engine failed",
        503: "loading, draining or failed; Retry-After",
    }
    return {str(s): _json(_ref(ErrorResponse), why[s]) for s in statuses}


def _operations() -> dict[tuple[str, str], dict[str, Any]]:
    """(path, method) -> the requestBody and responses of that operation."""
    auth = (401,)
    body_errors = (400, 404, 408, 413, 429, 500, 503)
    chat_ok = {
        "description": "the completion (JSON), or with `stream: true` server-sent events: "
        "`data: {ChatCompletionChunk}` lines, then `data: [DONE]`",
        "content": {
            "application/json": {"schema": _ref(ChatCompletion)},
            # one schema per event (OpenAPI 3.2's itemSchema reading, which schemathesis uses)
            "text/event-stream": {"schema": SSE_EVENT},
        },
    }
    return {
        ("/v1/chat/completions", "post"): {
            "summary": "Chat completion with images and videos (OpenAI's API)",
            "requestBody": {"required": True, **_json(_ref(ChatCompletionRequest), "the chat")},
            "responses": {"200": chat_ok, **_errors(*body_errors, *auth)},
        },
        ("/tokenize", "post"): {
            "summary": "Token ids of a chat or a prompt, with each image's and video's cost",
            "requestBody": {
                "required": True,
                **_json({"anyOf": [_ref(TokenizeChat), _ref(TokenizePrompt)]}, "a chat or a text"),
            },
            "responses": {
                "200": _json(_ref(TokenizeResponse), "the tokens"),
                **_errors(*body_errors, *auth),
            },
        },
        ("/detokenize", "post"): {
            "summary": "Text of token ids",
            "requestBody": {"required": True, **_json(_ref(DetokenizeRequest), "token ids")},
            "responses": {
                "200": _json(_ref(DetokenizeResponse), "the text"),
                **_errors(400, 404, 408, 413, 503, *auth),
            },
        },
        ("/v1/models", "get"): {
            "responses": {"200": _json(_ref(ModelList), "the served model"), **_errors(*auth)}
        },
        ("/v1/models/{model_id}", "get"): {
            "responses": {"200": _json(_ref(ModelCard), "the model"), **_errors(404, *auth)}
        },
        ("/health", "get"): {"responses": {"200": _json(_ref(Status), "the process is up")}},
        ("/ready", "get"): {
            "responses": {
                "200": _json(_ref(Status), "ready for requests"),
                "503": _json(_ref(Status), "loading, draining or failed (reason says)"),
            }
        },
        ("/metrics", "get"): {
            "responses": {
                "200": {
                    "description": "Prometheus text exposition",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            }
        },
    }


SSE_EVENT = {
    "type": "object",
    "description": "one server-sent event: `data` is a ChatCompletionChunk as JSON, an error "
    "envelope (an error after the stream started), or `[DONE]` (the last event)",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
    },
}
_URL = {"type": "string", "description": "http(s), data: (base64) or file:// (when allowed)"}


def _media_part(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """An image_url or video_url part: its spec (url and settings; null or url-less with a
    uuid that names media sent before), and the uuid."""
    spec = {"type": ["object", "null"], "properties": {"url": _URL, **settings}}
    return {
        "type": "object",
        "required": ["type", kind],
        "properties": {
            "type": {"const": kind},
            kind: spec,
            "uuid": {"type": "string", "description": "names the media for later requests"},
        },
    }


_PARTS = [
    {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    },
    _media_part(
        "image_url",
        {
            "detail": {"enum": ["auto", "low", "high"]},
            "max_num_tiles": {"type": "integer", "minimum": 1},
        },
    ),
    _media_part(
        "video_url",
        {
            "num_frames": {"type": "integer", "minimum": 1},
            "fps": {"type": "number", "exclusiveMinimum": 0},
        },
    ),
]
MESSAGE = {  # OpenAI's chat message, as far as this server reads it
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": _PARTS}}]},
    },
}

DOC_MODELS: tuple[type[BaseModel], ...] = (
    ErrorResponse, ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, ModelList,
    ModelCard, TokenizeChat, TokenizePrompt, TokenizeResponse, DetokenizeRequest,
    DetokenizeResponse, Status,
)  # fmt: skip


def build_openapi(app: FastAPI, model_name: str) -> dict[str, Any]:
    """FastAPI's document of the routes, with the shapes above and `model` as the one name this
    server serves (any other is a 404); built once, then cached."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title="plm-serve", version="1", routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in DOC_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    served = {"type": "string", "enum": [model_name]}
    schemas["ChatCompletionRequest"]["properties"]["model"] = served
    for name in ("TokenizeChat", "TokenizePrompt", "DetokenizeRequest"):
        schemas[name]["properties"]["model"] = {"anyOf": [served, {"type": "null"}]}
    schemas["Message"] = MESSAGE
    for name in ("ChatCompletionRequest", "TokenizeChat"):
        messages = schemas[name]["properties"]["messages"]
        messages["items"] = {"$ref": "#/components/schemas/Message"}
    for (path, method), operation in _operations().items():
        route = spec["paths"].get(path, {}).get(method)
        if route is None:
            continue  # a route this server was built without
        route.update(operation)
    # FastAPI's own error shapes (422) that no route answers with: the server says 400, above
    text = str(spec["paths"])
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"/{unused}'" not in text:
            schemas.pop(unused, None)
    app.openapi_schema = spec
    return spec


def install(app: FastAPI, model_name: str) -> None:
    app.openapi = lambda: build_openapi(app, model_name)  # type: ignore[method-assign]
