"""Requests found by black-box probing that crashed the server, got a 5xx, or differed from OpenAI.

One real `python -m server` process on the tiny checkpoint; each case checks the status, the error
envelope and `param`, and that the server still answers afterwards.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from server_proc import start_server, stop_server

MODEL = "plm-test"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def base():
    proc, url = start_server(
        "--max-pending-requests",
        "2",
        "--request-body-timeout",
        "2",
        "--allowed-origins",
        ORIGIN,
        "--max-receiving-mb",
        "1",
        "--max-request-body-mb",
        "0.9",
        model_name=MODEL,
    )
    yield url
    stop_server(proc)


def body(**change) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi."}],
        "max_tokens": 2,
        **change,
    }


def post(base: str, payload, **kw) -> httpx.Response:
    if isinstance(payload, (bytes, str)):
        return httpx.post(
            f"{base}/v1/chat/completions",
            content=payload,
            headers={"content-type": "application/json"},
            timeout=60,
            **kw,
        )
    return httpx.post(f"{base}/v1/chat/completions", json=payload, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None, match: str = "") -> dict:
    assert r.status_code == status, r.text[:400]
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"], err
    return err


@pytest.mark.parametrize(
    "raw",
    [
        '{"model": "plm-test", "messages": [{"role": "user", "content": "x"}], '
        '"logit_bias": {"5": NaN}}',
        '{"model": "plm-test", "messages": [{"role": "user", "content": "x"}], '
        '"temperature": Infinity}',
        '{"model": "plm-test", "messages": [{"role": "user", "content": "x"}], "x": '
        + "[" * 5000
        + "]" * 5000
        + "}",
    ],
    ids=["nan", "infinity", "deep-nesting"],
)
def test_not_json_is_400(base, raw):
    assert_error(post(base, raw), 400, None, "not valid JSON")
    assert post(base, body()).status_code == 200


def test_lone_surrogate_is_400_naming_the_spot(base):
    raw = (
        '{"model": "plm-test", "max_tokens": 2, '
        '"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    )
    assert_error(post(base, raw), 400, "messages[0].content", "lone surrogate")


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_seed_outside_int64_is_400_and_the_server_lives(base, seed):
    assert_error(post(base, body(seed=seed, temperature=1)), 400, "seed")
    assert httpx.get(f"{base}/ready").status_code == 200


def test_largest_seed_with_several_choices(base):
    r = post(base, body(seed=2**63 - 1, n=3, temperature=1))
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_tool_choice_none_without_tools_is_harmless(base):
    """Some client libraries always send tool_choice; "none" asks for nothing this server lacks."""
    assert post(base, body(tool_choice="none", tools=[])).status_code == 200
    assert_error(post(base, body(tool_choice="auto")), 400, "tool_choice", "no tool calling")


def test_nullable_fields_take_their_defaults(base):
    r = post(
        base,
        body(
            n=None,
            stream=None,
            logprobs=None,
            ignore_eos=None,
            min_tokens=None,
            seed=None,
            stop=None,
            top_p=None,
            include_stop_str_in_output=None,
            skip_special_tokens=None,
        ),
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


@pytest.mark.parametrize(
    "bias, match",
    [
        ({"5": 101}, "[-100, 100]"),
        ({"5": -1e9}, "[-100, 100]"),
        ({"99999999": 1}, "not a token id"),
        ({"-1": 1}, "not a token id"),
    ],
)
def test_logit_bias_outside_openai_range_is_400(base, bias, match):
    assert_error(post(base, body(logit_bias=bias)), 400, "logit_bias", match)


@pytest.mark.parametrize(
    "change, param, match",
    [
        (
            {"stream_options": {"include_usage": True}},
            "stream_options",
            "only allowed when stream is true",
        ),
        ({"modalities": ["text", "audio"]}, "modalities", "text"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "no audio output"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction", "predicted outputs"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "max_tokens"),
    ],
)
def test_unsupported_or_inconsistent_fields_name_the_field(base, change, param, match):
    assert_error(post(base, body(**change)), 400, param, match)


def test_context_overflow_has_openai_code_and_names_the_field_sent(base):
    err = assert_error(
        post(base, body(max_tokens=None, max_completion_tokens=11_519)),
        400,
        "max_completion_tokens",
    )
    assert err["code"] == "context_length_exceeded"


def test_model_retrieve_and_head(base):
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    r = httpx.get(f"{base}/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.head(f"{base}/health").status_code == 200
    assert httpx.head(f"{base}/ready").status_code == 200


def test_cors_preflight_for_an_allowed_origin_only(base):
    pre = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    r = httpx.options(f"{base}/v1/chat/completions", headers={"Origin": ORIGIN, **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(
        f"{base}/v1/chat/completions", headers={"Origin": "https://evil.example", **pre}
    )
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = post(base, body(), headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


def _stalled_upload(base: str, answers: list, sent: int = 8) -> None:
    """Sends headers and the first `sent` bytes of a 900 kB body, then nothing: a slow-loris
    client."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 900000\r\n\r\n" + b'{"model"'.ljust(sent)
        )
        s.settimeout(30)
        answers.append(s.recv(4096).split(b"\r\n", 1)[0])


def test_stalled_uploads_hold_no_slot_and_time_out(base):
    """With 2 admission slots and more stalled uploads than turns at receiving bodies, a valid
    request is neither refused nor kept waiting behind them (it is answered while they are all
    still stalled), and they do not stay forever."""
    from server.upload_turns import SLOTS

    stalled = SLOTS + 2
    answers: list[bytes] = []
    threads = [
        threading.Thread(target=_stalled_upload, args=(base, answers)) for _ in range(stalled)
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert post(base, body()).status_code == 200  # not 429
    assert answers == []  # answered before the stalled uploads' 2 s body timeout
    for t in threads:
        t.join(30)
    assert answers == [b"HTTP/1.1 408 Request Timeout"] * stalled


def _png(size) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mp4(tmp_path) -> str:
    import base64

    from media_sets import write_synthetic_video

    data = write_synthetic_video(tmp_path / "clip.mp4", frames=12, size=(64, 48)).read_bytes()
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("where", ["request", "part"])
def test_absurd_tile_budget_is_refused_at_once(base, where):
    image = {"url": _png((64, 48))}
    change = {"max_num_tiles": 10**30}
    if where == "part":
        image, change = dict(image, max_num_tiles=10**30), {}
    t0 = time.perf_counter()
    r = post(
        base,
        body(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": image}]}],
            **change,
        ),
    )
    assert r.status_code == 400 and time.perf_counter() - t0 < 5, r.text[:300]
    assert "at most 36" in r.json()["error"]["message"]


@pytest.mark.parametrize("where", ["request", "part"])
def test_absurd_fps_is_400_not_500(base, tmp_path, where):
    video = {"url": _mp4(tmp_path)}
    change = {"fps": 1e308}
    if where == "part":
        video, change = dict(video, fps=1e308), {}
    r = post(
        base,
        body(
            messages=[{"role": "user", "content": [{"type": "video_url", "video_url": video}]}],
            **change,
        ),
    )
    assert r.status_code in (200, 400), r.text[
        :300
    ]  # every frame up to the ceiling, or refused; never a 5xx


def test_elongated_image_is_refused_before_decoding(base):
    r = post(
        base,
        body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": _png((1, 40_000))}}],
                }
            ]
        ),
    )
    err = assert_error(r, 400, "messages[0].content[0].image_url", "longer than the limit of 32768")
    assert "0x" not in err["message"]


def test_boolean_frame_and_tile_counts_are_400(base):
    assert_error(post(base, body(num_frames=True)), 400, "num_frames")
    assert_error(post(base, body(max_num_tiles=True)), 400, "max_num_tiles")


@pytest.mark.parametrize("stream", [False, True])
def test_logprob_bytes_are_the_tokens_raw_bytes(base, stream):
    """Tokens 127 and 102 of the test vocabulary are the two bytes of "é" (byte-level BPE); each
    token's `bytes` must be its own byte, so all of them join into the content's UTF-8."""
    payload = body(
        logit_bias={"127": 100, "102": 100},
        temperature=0,
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        stream=stream,
    )
    if stream:
        content, entries = "", []
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    content += choice["delta"].get("content", "")
                    entries += (choice["logprobs"] or {}).get("content", [])
    else:
        choice = post(base, payload).json()["choices"][0]
        content, entries = choice["message"]["content"], choice["logprobs"]["content"]
    raw = [bytes(e["bytes"]) for e in entries]
    assert set(raw) <= {b"\xc3", b"\xa9"} and len(raw) == 4, raw
    assert b"".join(raw).decode("utf-8", "replace") == content and "é" in content
    assert all(
        len(e["top_logprobs"]) == 2 and all(t["bytes"] for t in e["top_logprobs"]) for e in entries
    )


def test_bodies_being_received_have_a_server_wide_budget(base):
    """--max-receiving-mb 1: a second 600 kB stalled upload is refused at once (429) instead of both
    pinning memory until the body timeout; small requests still pass."""
    answers: list[bytes] = []
    first = threading.Thread(target=_stalled_upload, args=(base, answers, 600_000))
    first.start()
    time.sleep(0.5)
    _stalled_upload(base, answers, 600_000)
    assert answers == [b"HTTP/1.1 429 Too Many Requests"]
    assert post(base, body()).status_code == 200
    first.join(30)
    assert answers[1] == b"HTTP/1.1 408 Request Timeout"


@pytest.mark.parametrize(
    "change, param",
    [
        ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
        ({"fps": True}, "fps"),
        ({"fps": "2"}, "fps"),
        ({"max_num_tiles": 37}, "max_num_tiles"),
    ],
)
def test_more_bad_values_name_their_field(base, change, param):
    assert_error(post(base, body(**change)), 400, param)


def test_text_prompt_over_the_context_is_context_length_exceeded(base):
    err = assert_error(
        post(base, body(messages=[{"role": "user", "content": "word " * 12_000}])), 400, "messages"
    )
    assert err["code"] == "context_length_exceeded" and "media" not in err["message"], err
