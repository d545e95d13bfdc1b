"""One chat completion: checks that need the loaded model, media fetching and preprocessing off the
event loop, then the engine's deltas (all choices of one request) assembled as a JSON response or
an SSE stream in OpenAI's format."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from plm_core.engine.async_engine import AsyncEngine, EngineDeadError
from plm_core.engine.core import RequestDelta
from plm_core.errors import ContextLengthError, InputError
from plm_core.inputs import ProcessedPrompt
from plm_core.messages import MediaOptions
from plm_core.sampling import SamplingParams
from server.metrics import Metrics
from server.protocol import (
    APIError,
    ChatCompletionRequest,
    completion_id,
    logprobs_content,
    now,
    to_engine_inputs,
)
from server.request_ids import record_usage
from server.state import ServerState

log = logging.getLogger("plm_serve")
MEDIA_PART_TYPES = ("image_url", "video_url", "image", "video")


@dataclass
class Chat:
    """A request ready for the engine. request_id is the completion's id (`chatcmpl-` and the HTTP
    request's id); engine_id the engine's, unique even when clients reuse their X-Request-Id."""

    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    priority: int
    arrival: float
    engine_id: str = ""
    http_state: Any = None  # the HTTP request's state: the access log's token counts go there

    def __post_init__(self) -> None:
        self.engine_id = self.engine_id or self.request_id

    def record_usage(self, completion_tokens: int) -> None:
        if self.http_state is not None:
            record_usage(self.http_state, len(self.prompt.prompt_token_ids), completion_tokens)


async def chat_completion(
    state: ServerState, engine: AsyncEngine, request: Request, req: ChatCompletionRequest
) -> Response:
    """Validates, preprocesses and runs one parsed chat completion (JSON or SSE)."""
    rid = getattr(request.state, "request_id", None)
    chat = await prepare(state, engine, req, rid)
    if rid is not None and getattr(request.state, "request_id_given", False):
        chat.engine_id = f"{chat.request_id}-{secrets.token_hex(4)}"  # a client may reuse its id
    chat.http_state = request.state
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            stream_chunks(state, engine, chat, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    task = asyncio.create_task(complete(state, engine, chat))
    # a client that goes away aborts its request (and frees its KV) within a poll interval
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return JSONResponse(task.result())
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "client disconnected")


def input_error(e: InputError) -> APIError:
    """A client's fault, found by the engine or the processor, as a 400 naming the field."""
    code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
    return APIError(400, str(e), param=e.param, code=code)


def check_model(state: ServerState, model: str | None) -> None:
    """APIError 404 unless `model` is the served name (None: the served one)."""
    name = state.config.model_name
    if model is not None and model != name:
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server serves '{name}'",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )


def check_request(state: ServerState, req: ChatCompletionRequest) -> None:
    limit = state.config.max_media_per_request
    media_items = sum(
        1
        for m in req.messages
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") in MEDIA_PART_TYPES
    )
    if media_items > limit:
        raise APIError(
            400,
            f"the request has {media_items} images/videos; this server accepts at most "
            f"{limit} per request",
            param="messages",
        )
    check_model(state, req.model)
    policy = state.config.engine.scheduler.scheduling_policy
    if req.priority and policy != "priority":
        raise APIError(
            400,
            f"priority needs the priority scheduling policy (this server uses {policy}; start "
            "it with --scheduling-policy priority)",
            param="priority",
        )


async def prepare(
    state: ServerState,
    engine: AsyncEngine,
    req: ChatCompletionRequest,
    request_id: str | None = None,
) -> Chat:
    """The engine inputs of a request (its completion id from request_id, the HTTP request's id,
    when given); APIError 400/404 for what the client must fix."""
    arrival = time.perf_counter()
    check_request(state, req)
    ctx = engine.max_model_len
    vocab = engine.model_config.text.vocab_size
    params, media, constraint_field = to_engine_inputs(
        req, default_max_tokens=ctx, vocab_size=vocab
    )
    loop = asyncio.get_running_loop()
    try:
        if params.structured_output is not None:  # the engine's own compile then hits the cache
            spec = params.structured_output
            await loop.run_in_executor(state.grammar_pool, engine.compile_constraint, spec)
    except InputError as e:
        raise APIError(400, str(e), param=constraint_field) from None
    prompt = await process_messages(state, engine, req, media)
    n_prompt = len(prompt.prompt_token_ids)
    explicit = req.max_completion_tokens or req.max_tokens
    if explicit is None:
        params = dataclasses.replace(params, max_tokens=ctx - n_prompt)
    elif n_prompt + explicit > ctx:
        name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(
            400,
            f"this model's maximum context length is {ctx} tokens; the prompt has {n_prompt} "
            f"tokens and {name} asks for {explicit} more",
            param=name,
            code="context_length_exceeded",
        )
    return Chat(completion_id(request_id), prompt, params, req.priority, arrival)


async def process_messages(
    state: ServerState, engine: AsyncEngine, req: ChatCompletionRequest, media: MediaOptions
) -> ProcessedPrompt:
    """The request's messages as the prompt the engine runs: uuid references filled in, http(s)
    media fetched, the template rendered, media decoded and preprocessed (in the engine's threads);
    APIError 400 naming the field at fault."""
    try:
        messages = state.media_refs.resolve(req.messages)  # parts that send a uuid alone
        messages = await state.fetcher.fetch_request_media(messages)
        prompt = await engine.preprocess(
            messages,
            media,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )
    except InputError as e:
        raise input_error(e) from None
    state.media_refs.remember(messages)  # only media that preprocessed
    return prompt


class _Timer:
    """Records TTFT, inter-token latency and end-to-end latency of one choice."""

    def __init__(self, metrics: Metrics, arrival: float):
        self.metrics, self.arrival = metrics, arrival
        self.last: float | None = None

    def token(self, finished: bool) -> None:
        now_ = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now_ - self.arrival)
        else:
            self.metrics.itl.observe(now_ - self.last)
        self.last = now_
        if finished:
            self.metrics.e2e.observe(now_ - self.arrival)


async def _deltas(
    state: ServerState, engine: AsyncEngine, chat: Chat
) -> AsyncIterator[RequestDelta]:
    """The engine's deltas for the chat, timed; engine failures as APIErrors."""
    timers = [_Timer(state.metrics, chat.arrival) for _ in range(chat.params.n)]
    stream = engine.generate(chat.engine_id, chat.prompt, chat.params, priority=chat.priority)
    n_prompt = len(chat.prompt.prompt_token_ids)
    try:
        async for delta in stream:
            timers[delta.index].token(delta.finished)
            if delta.finished and delta.index == 0 and n_prompt:
                state.metrics.cached_ratio.observe(delta.num_cached_tokens / n_prompt)
            yield delta
    except EngineDeadError as e:
        raise APIError(500, f"the engine failed: {e}", type="server_error") from None
    except InputError as e:
        raise input_error(e) from None
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # an abandoned stream aborts


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _usage(chat: Chat, completion: int, cached: int) -> dict[str, Any]:
    """OpenAI's usage: the prompt counts once whatever n is; `cached_tokens` are the prompt tokens
    the first choice did not compute (the prefix cache's, or the first choice's for the others)."""
    n_prompt = len(chat.prompt.prompt_token_ids)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": completion,
        "total_tokens": n_prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def complete(state: ServerState, engine: AsyncEngine, chat: Chat) -> dict[str, Any]:
    """The whole chat.completion object."""
    n = chat.params.n
    texts, ids = [""] * n, [[] for _ in range(n)]  # type: list[str], list[list[int]]
    lps: list[list[Any]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    cached = 0
    async for d in _deltas(state, engine, chat):
        texts[d.index] += d.new_text
        ids[d.index].extend(d.new_token_ids)
        lps[d.index].extend(d.new_logprobs)
        if d.finished:
            finish[d.index] = d.finish_reason
        if d.index == 0:
            cached = d.num_cached_tokens
    completion_tokens = sum(len(x) for x in ids)
    chat.record_usage(completion_tokens)
    choices = []
    for i in range(n):
        choice: dict[str, Any] = {
            "index": i,
            "message": {"role": "assistant", "content": texts[i], "refusal": None},
            "finish_reason": _finish_reason(finish[i]),
            "logprobs": None,
        }
        if chat.params.logprobs is not None:
            content = logprobs_content(lps[i], engine.tokenizer)
            choice["logprobs"] = {"content": content, "refusal": None}
        choices.append(choice)
    return {
        "id": chat.request_id,
        "object": "chat.completion",
        "created": now(),
        "model": state.config.model_name,
        "choices": choices,
        "usage": _usage(chat, completion_tokens, cached),
    }


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def stream_chunks(
    state: ServerState, engine: AsyncEngine, chat: Chat, include_usage: bool
) -> AsyncIterator[str]:
    """SSE events: a role chunk per choice, content deltas, finish reasons, usage, [DONE]."""
    created, model, params = now(), state.config.model_name, chat.params

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body = {"id": chat.request_id, "object": "chat.completion.chunk", "created": created}
        body.update(model=model, choices=choices)
        if include_usage:
            body["usage"] = usage
        return _sse(body)

    for i in range(params.n):
        role = {"role": "assistant", "content": ""}
        yield chunk([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}])
    completion, cached = 0, 0
    try:
        async for d in _deltas(state, engine, chat):
            completion += len(d.new_token_ids)
            cached = d.num_cached_tokens if d.index == 0 else cached
            choice: dict[str, Any] = {
                "index": d.index,
                "delta": {"content": d.new_text} if d.new_text else {},
                "logprobs": None,
                "finish_reason": _finish_reason(d.finish_reason) if d.finished else None,
            }
            if params.logprobs is not None:
                content = logprobs_content(d.new_logprobs, engine.tokenizer)
                choice["logprobs"] = {"content": content, "refusal": None}
            if choice["delta"] or choice["finish_reason"] or params.logprobs is not None:
                yield chunk([choice])
    except APIError as e:  # the stream has started: the error is an event before [DONE]
        yield _sse(e.body())
    except Exception:  # noqa: BLE001 - a bug of ours: logged, and the client told
        log.exception("chat stream %s failed", chat.request_id)
        yield _sse(APIError(500, "internal server error", type="server_error").body())
    else:
        if include_usage:
            yield chunk([], _usage(chat, completion, cached))
    chat.record_usage(completion)
    yield "data: [DONE]\n\n"
