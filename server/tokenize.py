"""`POST /tokenize` and `POST /detokenize`, in vLLM's shapes, plus what each image or video costs.

/tokenize takes a chat (`messages`, with the chat completion's media options: `max_num_tiles`,
`num_frames`, `fps`, per request or per part, `add_generation_prompt`, `continue_final_message`) or
a plain `prompt`, and answers `count`, `max_model_len` and `tokens` (the prompt's token ids, media
placeholders expanded, exactly what a chat completion would prefill) and, for chats, `items`: per
image or video its kind, the tiles or frames the processor chose, and their tokens. The media go
through the same path as a chat's (fetching, uuid references, decoding, tiling or frame sampling,
in the engine's threads), so their errors are the same 400s; the model does not run. /detokenize
turns `tokens` back into text (`prompt`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from plm_core.engine.async_engine import AsyncEngine
from plm_core.inputs import ProcessedPrompt
from plm_core.tokenizer import InvalidTextError
from server.body import off_loop_if_large, parse_json, validated
from server.chat import check_model, check_request, process_messages
from server.protocol import APIError, ChatCompletionRequest, media_options
from server.state import ServerState


class TokenizePrompt(BaseModel):
    """A plain-text prompt to tokenize (vLLM's completion form)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def media_breakdown(prompt: ProcessedPrompt) -> list[dict[str, Any]]:
    """Per image or video of the prompt: kind, tiles (images: thumbnail included) or frames
    (videos), tokens, and where its placeholder tokens start."""
    items = []
    for index, item in enumerate(prompt.media):
        unit = "tiles" if item.kind == "image" else "frames"
        items.append(
            {
                "index": index,
                "kind": item.kind,
                unit: item.num_tiles,
                "tokens": item.num_tokens,
                "offset": item.offset,
            }
        )
    return items


async def tokenize(state: ServerState, engine: AsyncEngine, body: bytes) -> dict[str, Any]:
    """The /tokenize answer for a raw request body; APIError 400/404 as for a chat."""
    data = await off_loop_if_large(parse_json, body)
    ctx = engine.max_model_len
    if "messages" in data:
        req = validated(ChatCompletionRequest, {"model": state.config.model_name, **data})
        check_request(state, req)
        prompt = await process_messages(state, engine, req, media_options(req))
        ids, items = list(prompt.prompt_token_ids), media_breakdown(prompt)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": ctx, "tokens": ids}
        return {**out, "items": items}
    if "prompt" not in data:
        raise APIError(400, "give `messages` (a chat) or `prompt` (text) to tokenize", param=None)
    req_text = validated(TokenizePrompt, data)
    check_model(state, req_text.model)
    tok = engine.tokenizer
    try:
        ids = tok.encode(req_text.prompt)
    except InvalidTextError as e:
        raise APIError(400, str(e), param="prompt") from None
    if req_text.add_special_tokens and tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    return {"count": len(ids), "max_model_len": ctx, "tokens": ids}


def detokenize(state: ServerState, engine: AsyncEngine, body: bytes) -> dict[str, Any]:
    """The /detokenize answer: the text of `tokens`, special tokens included."""
    req = validated(DetokenizeRequest, parse_json(body))
    check_model(state, req.model)
    vocab = engine.model_config.text.vocab_size
    bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400, f"tokens[{bad}] is {req.tokens[bad]}, not a token id below {vocab}", param="tokens"
        )
    return {"prompt": engine.tokenizer.decode(req.tokens, skip_special_tokens=False)}
