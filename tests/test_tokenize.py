"""/tokenize and /detokenize: vLLM's shapes, the same prompt a chat completion prefills, a per-media
breakdown, and the chat's 400s for bad media."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from support import served_state

from server.app import build_app
from server.state import ServerState

MODEL = "plm-tok-test"


@pytest.fixture(scope="module")
def state(tiny_checkpoint):
    with served_state(tiny_checkpoint, MODEL) as state:
        yield state


def post(state: ServerState, path: str, body: dict) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=build_app(state), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.post(path, json=body, timeout=60)

    return asyncio.run(go())


def png_url(seed: int, size=(300, 200)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def video_url(frames: int = 12) -> str:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = np.full((48, 64, 3), i * 20 % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe them."}]}]


def test_a_chat_counts_what_the_completion_prefills_with_a_breakdown_per_item(state):
    image = {"type": "image_url", "image_url": {"url": png_url(1)}}
    video = {"type": "video_url", "video_url": {"url": video_url(), "num_frames": 4}}
    messages = chat_messages(image, video)
    r = post(state, "/tokenize", {"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    out = r.json()
    chat = post(
        state, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1}
    )
    assert out["count"] == len(out["tokens"]) == chat.json()["usage"]["prompt_tokens"]
    assert out["max_model_len"] == state.engine.max_model_len
    first, second = out["items"]
    per_tile = state.engine.model_config.processor.tokens_per_tile
    assert first["kind"] == "image" and first["tiles"] >= 1
    assert first["tokens"] == first["tiles"] * per_tile
    assert second == {**second, "kind": "video", "frames": 4, "tokens": 4 * per_tile}
    # each item's placeholder tokens sit where its offset says, one id repeated
    for item in out["items"]:
        span = out["tokens"][item["offset"] : item["offset"] + item["tokens"]]
        assert len(span) == item["tokens"] and len(set(span)) == 1
    assert second["offset"] >= first["offset"] + first["tokens"]


def test_media_options_change_the_cost(state):
    url = png_url(2, size=(900, 600))
    low = {"type": "image_url", "image_url": {"url": url, "detail": "low"}}
    high = {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
    (a,) = post(state, "/tokenize", {"messages": chat_messages(low)}).json()["items"]
    (b,) = post(state, "/tokenize", {"messages": chat_messages(high)}).json()["items"]
    assert a["tiles"] == 1 and b["tiles"] > 1  # low: the thumbnail alone


def test_a_prompt_round_trips_through_detokenize(state):
    r = post(state, "/tokenize", {"prompt": "river lantern orbit"})
    out = r.json()
    tok = state.engine.tokenizer
    assert out["tokens"][0] == tok.bos_token_id and out["count"] == len(out["tokens"])
    bare = post(state, "/tokenize", {"prompt": "river lantern orbit", "add_special_tokens": False})
    assert bare.json()["tokens"] == out["tokens"][1:]
    text = post(state, "/detokenize", {"tokens": bare.json()["tokens"]}).json()["prompt"]
    assert text == "river lantern orbit"


def test_errors_are_the_chats(state):
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    r = post(state, "/tokenize", {"messages": chat_messages(broken)})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[0].content[0].image_url"
    wrong = post(state, "/tokenize", {"model": "other", "prompt": "x"})
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"
    assert post(state, "/tokenize", {"model": MODEL}).status_code == 400
    vocab = state.engine.model_config.text.vocab_size
    bad = post(state, "/detokenize", {"tokens": [1, vocab]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_not_ready_is_a_503(state):
    idle = ServerState(state.config)
    r = post(idle, "/tokenize", {"prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"


def test_at_capacity_it_is_refused_like_a_chat(state):
    state.live.pending += state.config.max_pending_requests  # as if that many were in flight
    try:
        r = post(state, "/tokenize", {"prompt": "x"})
    finally:
        state.live.pending -= state.config.max_pending_requests
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert post(state, "/tokenize", {"prompt": "x"}).status_code == 200
