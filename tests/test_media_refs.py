"""Media by reference: a part's `uuid` names its media; later parts send the uuid alone."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from support import served_state
from test_server_app import asgi_chat

from server.media_refs import MediaRefs
from server.protocol import APIError
from server.state import ServerState

MODEL = "plm-refs-test"


def png_url(seed: int, size=(96, 64)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url: str | None, uuid: str | None = None, **spec) -> dict:
    """An image part; with url None, its media left out (`image_url: null`, or only settings)."""
    spec = {"url": url, **spec} if url is not None else spec
    part: dict = {"type": "image_url", "image_url": spec or None}
    if uuid is not None:
        part["uuid"] = uuid
    return part


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe it."}]}]


# -- the store -------------------------------------------------------------------------------------


def test_a_named_part_is_held_and_fills_a_uuid_only_part():
    refs = MediaRefs(1 << 20)
    url = png_url(1)
    refs.remember(user(image_part(url, "a", detail="low")))
    (later,) = refs.resolve(user(image_part(None, "a", detail="high")))
    # the held media, the later part's own settings
    assert later["content"][0]["image_url"] == {"url": url, "detail": "high"}
    (no_url,) = refs.resolve(user({"type": "image_url", "image_url": {}, "uuid": "a"}))
    assert no_url["content"][0]["image_url"] == {"url": url}


def test_a_uuid_not_held_is_a_400_that_names_the_part():
    refs = MediaRefs(1 << 20)
    messages = [{"role": "system", "content": "x"}, *user(image_part(None, "nope"))]
    with pytest.raises(APIError) as e:
        refs.resolve(messages)
    assert e.value.status == 400 and e.value.code == "media_not_cached"
    assert e.value.param == "messages[1].content[0].uuid"
    assert refs.misses == 1


def test_a_uuid_holding_other_media_is_refused_and_kept():
    refs = MediaRefs(1 << 20)
    first, other = png_url(2), png_url(3)
    refs.remember(user(image_part(first, "x")))
    refs.remember(user(image_part(first, "x")))  # the same media again: fine
    with pytest.raises(APIError) as e:
        refs.remember(user(image_part(other, "x")))
    assert e.value.code == "media_uuid_conflict"
    (held,) = refs.resolve(user(image_part(None, "x")))
    assert held["content"][0]["image_url"]["url"] == first  # not poisoned


def test_a_video_uuid_is_not_an_image():
    refs = MediaRefs(1 << 20)
    refs.remember(
        user({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}, "uuid": "v"})
    )
    with pytest.raises(APIError, match="names a video, not an image"):
        refs.resolve(user(image_part(None, "v")))


def test_held_media_stays_within_its_byte_budget():
    urls = [png_url(s) for s in range(4)]
    refs = MediaRefs(2 * len(urls[0]) + 10)
    for i, url in enumerate(urls[:3]):
        refs.remember(user(image_part(url, f"u{i}")))
    assert len(refs) == 2 and refs.held_bytes <= refs.max_bytes
    with pytest.raises(APIError, match="u0"):  # the least recently used went first
        refs.resolve(user(image_part(None, "u0")))
    refs.resolve(user(image_part(None, "u1")))  # u1 now the most recently used
    refs.remember(user(image_part(urls[3], "u3")))
    refs.resolve(user(image_part(None, "u1")))
    with pytest.raises(APIError, match="u2"):
        refs.resolve(user(image_part(None, "u2")))
    MediaRefs(10).remember(user(image_part(urls[0], "big")))  # larger than the budget: not held


@pytest.mark.parametrize("uuid", [5, "", "x" * 257, ["a"]])
def test_a_bad_uuid_is_a_400(uuid):
    with pytest.raises(APIError) as e:
        MediaRefs(1 << 20).resolve(user({"type": "image_url", "image_url": None, "uuid": uuid}))
    assert e.value.status == 400 and e.value.param.endswith(".uuid")


def test_parts_without_a_uuid_are_left_alone():
    refs = MediaRefs(1 << 20)
    messages = user(
        image_part(png_url(4)), {"type": "image_url", "image_url": {"url": "x"}, "uuid": None}
    )
    assert refs.resolve(messages) == messages
    refs.remember(messages)
    assert len(refs) == 0


# -- through the server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state(tiny_checkpoint):
    with served_state(tiny_checkpoint, MODEL) as state:
        yield state


def post(state: ServerState, messages: list[dict]) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}
    return asgi_chat(state, body)


def test_a_second_turn_sends_the_uuid_alone_and_gets_the_same_prompt(state):
    url = png_url(10, size=(300, 200))
    first = post(state, user(image_part(url, "turn-photo")))
    assert first.status_code == 200, first.text
    by_ref = post(state, user(image_part(None, "turn-photo")))
    again = post(state, user(image_part(url)))
    assert by_ref.status_code == 200, by_ref.text
    # the same prompt (tokens, media) as sending the photo itself, so the same greedy answer
    assert by_ref.json()["usage"]["prompt_tokens"] == again.json()["usage"]["prompt_tokens"]
    text = [r.json()["choices"][0]["message"]["content"] for r in (first, by_ref, again)]
    assert text[0] == text[1] == text[2]
    assert by_ref.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert state.media_refs.hits >= 1
    metrics = state.metrics.render().decode()
    assert f'plm:media_ref_lookups_total{{result="hit"}} {float(state.media_refs.hits)}' in metrics


def test_an_unknown_uuid_and_a_conflict_are_400s_the_client_can_act_on(state):
    missing = post(state, user(image_part(None, "never-sent")))
    assert missing.status_code == 400
    error = missing.json()["error"]
    assert error["code"] == "media_not_cached" and error["param"] == "messages[0].content[0].uuid"
    assert post(state, user(image_part(png_url(11), "mine"))).status_code == 200
    conflict = post(state, user(image_part(png_url(12), "mine")))
    assert conflict.status_code == 400 and conflict.json()["error"]["code"] == "media_uuid_conflict"


def test_media_that_fails_to_preprocess_is_not_held(state):
    bad = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
    assert post(state, user(image_part(bad, "broken"))).status_code == 400
    missing = post(state, user(image_part(None, "broken")))
    assert missing.json()["error"]["code"] == "media_not_cached"


def _ratio_buckets(state: ServerState) -> dict[str, float]:
    """plm:request_cached_prompt_ratio's cumulative bucket counts by `le`."""
    out = {}
    for line in state.metrics.render().decode().splitlines():
        if line.startswith("plm:request_cached_prompt_ratio_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def test_each_request_records_the_share_of_its_prompt_that_was_cached(state):
    """A first sight of a photo is a miss (at most the chat template's opening tokens, shared with
    earlier requests, are cached); the next turn on the same replica is mostly cached; the
    histogram counts one observation per request, in the right buckets."""
    before = _ratio_buckets(state)
    url = png_url(20, size=(300, 200))
    first = post(state, user(image_part(url)))
    after_first = _ratio_buckets(state)
    usage = first.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"] < 0.25
    assert after_first["0.25"] == before.get("0.25", 0) + 1
    answer = first.json()["choices"][0]["message"]["content"]
    turn2 = [*user(image_part(url)), {"role": "assistant", "content": answer}]
    turn2.append({"role": "user", "content": "And the colours?"})
    second = post(state, turn2)
    usage = second.json()["usage"]
    ratio = usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"]
    after_second = _ratio_buckets(state)
    assert ratio > 0.75
    assert after_second["+Inf"] == after_first["+Inf"] + 1
    assert after_second["0.75"] == after_first["0.75"]  # above 0.75: not in that bucket
    assert after_second["1.0"] == after_first["1.0"] + 1
