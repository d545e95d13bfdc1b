"""OpenAI chat-completions wire format: the pydantic request model, its conversion to engine
types, and response helpers.

This is the only place pydantic meets the engine: `to_engine_inputs` turns a validated request into
plain `SamplingParams` and `MediaOptions`; everything inside plm_core stays dataclasses.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from plm_core.errors import InputError
from plm_core.processor import MediaOptions
from plm_core.sampling import SamplingParams
from server.structured import ConstraintError, structured_output


class APIError(Exception):
    """An error the client should see, in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    include_usage: bool = False


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
LOGPROB_FLOOR = -9999.0  # what a logprob of -inf is sent as


class ChatCompletionRequest(BaseModel):
    """The fields plm-serve reads; unknown fields are tolerated (as OpenAI-compatible servers do).

    Fields OpenAI's schema makes nullable take their default when sent as null."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's chat-template options: continue the final assistant message instead of a new turn
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    user: str | None = None
    # vLLM's scheduling priority (lower runs first); needs --scheduling-policy priority
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX, strict=True)
    # plm-serve extensions: tile budget per image, frames per video
    max_num_tiles: int | None = Field(None, ge=1, strict=True)
    num_frames: int | None = Field(None, ge=1, strict=True)
    fps: float | None = Field(None, gt=0, strict=True)

    @field_validator(
        "stream",
        "n",
        "logprobs",
        "ignore_eos",
        "min_tokens",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "add_generation_prompt",
        "continue_final_message",
        "priority",
        mode="before",
    )
    @classmethod
    def _null_is_default(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value


UNSUPPORTED = {  # request field -> why this server cannot honour it
    "tools": "PerceptionLM has no tool calling",
    "tool_choice": "PerceptionLM has no tool calling",
    "functions": "PerceptionLM has no tool calling",
    "function_call": "PerceptionLM has no tool calling",
    "audio": "PerceptionLM has no audio output",
    "prediction": "predicted outputs are not supported",
}


def to_engine_inputs(
    req: ChatCompletionRequest, *, default_max_tokens: int, vocab_size: int
) -> tuple[SamplingParams, MediaOptions, str | None]:
    """Validated request -> engine types, and the field its output constraint came from (for errors
    when it is compiled); raises APIError(400) for what the engine cannot honour."""
    _check_fields(req)
    try:
        constraint, constraint_field = structured_output(req.model_extra or {})
    except ConstraintError as e:
        raise APIError(400, str(e), param=e.param) from None
    try:
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=req.seed,
            max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=list(req.stop_token_ids or []),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            logit_bias=_logit_bias(req, vocab_size),
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            n=req.n,
            structured_output=constraint,
        )
    except InputError as e:  # SamplingParams names its field; the request's, where they agree
        param = e.param if e.param in ChatCompletionRequest.model_fields else None
        raise APIError(400, str(e), param=param) from None
    return params, media_options(req), constraint_field


def media_options(req: ChatCompletionRequest) -> MediaOptions:
    """The request-wide media budget (a part's own settings override it)."""
    return MediaOptions(max_num_tiles=req.max_num_tiles, num_frames=req.num_frames, fps=req.fps)


def _check_fields(req: ChatCompletionRequest) -> None:
    """APIError(400) for fields this server cannot honour, or that contradict each other."""
    extra = req.model_extra or {}
    for name, why in UNSUPPORTED.items():
        value = extra.get(name)
        if value not in (None, [], {}) and not (name == "tool_choice" and value == "none"):
            raise APIError(400, f"'{name}' is not supported by this server ({why})", param=name)
    if extra.get("modalities") not in (None, ["text"]):
        raise APIError(400, "only the 'text' output modality is supported", param="modalities")
    if req.stream_options is not None and not req.stream:
        message = "stream_options is only allowed when stream is true"
        raise APIError(400, message, param="stream_options")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")


def _logit_bias(req: ChatCompletionRequest, vocab_size: int) -> dict[int, float] | None:
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.strip().isdigit() or len(key.strip()) > 12 or int(key) >= vocab_size:
            message = f"logit_bias key {key!r} is not a token id in [0, {vocab_size})"
            raise APIError(400, message, param="logit_bias")
        if not -100 <= value <= 100:
            message = f"logit_bias values must be in [-100, 100], got {value} for {key}"
            raise APIError(400, message, param="logit_bias")
        bias[int(key)] = float(value)
    return bias or None


def completion_id(request_id: str | None = None) -> str:
    """`chatcmpl-` and the HTTP request's id (X-Request-Id), or a new one."""
    return f"chatcmpl-{request_id or uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def logprobs_content(entries, tokenizer) -> list[dict]:
    """OpenAI's `logprobs.content` from engine Logprobs entries: each token's text alone and its raw
    bytes (a token holding part of a multi-byte character has U+FFFD as text, but its true bytes, so
    the bytes of all tokens join into the content's UTF-8)."""

    def entry(token_id: int, logprob: float) -> dict:
        # -inf (a token a structured output forbids) is not JSON: vLLM's floor instead
        return {
            "token": tokenizer.token_text(token_id),
            "logprob": max(logprob, LOGPROB_FLOOR),
            "bytes": list(tokenizer.token_bytes(token_id)),
        }

    return [
        dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
        for lp in entries
        if lp is not None
    ]
