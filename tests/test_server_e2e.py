"""End to end: the real `python -m server` process on the tiny checkpoint, driven by the official
openai client.

Responses and stream chunks are validated against OpenAI's published schemas
(../shared/openai-openapi.json) when that file is present.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from openai_schema import OPENAPI, openai_validator
from PIL import Image
from server_proc import start_server, stop_server
from support import checkpoint_path

MODEL = "plm-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    media = tmp_path_factory.mktemp("allowed")
    proc, base = start_server(
        "--allowed-local-media-path",
        str(media),
        "--max-request-body-mb",
        "1",
        "--max-media-per-request",
        "3",
        "--allow-private-media-hosts",
        "--allowed-media-domains",
        "127.0.0.1",
        "--max-media-mb",
        "0.5",
        "--max-image-pixels",
        "4000000",
        "--max-video-duration",
        "5",
        "--max-encoder-tiles-per-step",
        "3",
        model_name=MODEL,
    )
    yield base, media
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def validate():
    """validate(schema_name, obj) against OpenAI's schema; None when the file is absent."""
    return openai_validator()


def _data_url(size=(200, 150), color=(10, 200, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _check(validate, name, obj):
    """Validates against OpenAI's schema when it is present; the test's own assertions run either
    way."""
    if validate is not None:
        validate(name, obj)


def test_chat_response_matches_openai_schema(client, validate):
    if validate is None:
        pytest.skip(f"OpenAI's schema not found at {OPENAPI} (only in the project workspace)")
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True
    )
    validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))


def test_models_and_health(server):
    base, _ = server
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    models = httpx.get(f"{base}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_plain_chat(client, validate):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=6, temperature=0
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    _check(validate, "CreateChatCompletionResponse", r.model_dump(exclude_unset=True))


def test_image_chat_equals_offline_engine(client, server):
    from plm_core import LLM, SamplingParams

    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url()}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    offline = LLM(str(checkpoint_path("tiny")), device="cpu").chat(
        msgs, SamplingParams(temperature=0, max_tokens=8)
    )[0]
    assert r.choices[0].message.content == offline.text


def test_continue_final_message(client, server):
    """vLLM's continue_final_message: the reply continues the final assistant message's text, with
    the offline engine's tokens; without add_generation_prompt=false it is a 400 naming the
    field."""
    from plm_core import LLM, SamplingParams

    msgs = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "The colour is"},
    ]
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=6, temperature=0, extra_body=extra
    )
    llm = LLM(str(checkpoint_path("tiny")), device="cpu")
    offline = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=6), **extra)[0]
    assert r.choices[0].message.content == offline.text
    assert r.usage.prompt_tokens == len(offline.prompt_token_ids)
    # left open
    assert llm.process(msgs, **extra).prompt_text.endswith("<|end_header_id|>\n\nThe colour is")
    bad = httpx.post(
        f"{server[0]}/v1/chat/completions",
        json={"model": MODEL, "messages": msgs, "continue_final_message": True, "max_tokens": 2},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message", (
        bad.text
    )


def test_greedy_http_equals_hf_generate(client):
    """Greedy text over HTTP (image + system prompt + multi-turn) equals HF generate's for the same
    chat."""
    from hf_reference import hf_generate
    from transformers import AutoTokenizer

    path = str(checkpoint_path("tiny"))
    img = Image.new("RGB", (300, 200), (30, 90, 200))
    for x in range(0, 300, 25):
        img.paste((240, 200, 10), (x, 0, x + 10, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    wire = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is this?"},
            ],
        },
        {"role": "assistant", "content": "A pattern."},
        {"role": "user", "content": [{"type": "text", "text": "Which colours?"}]},
    ]
    hf_msgs = [dict(m) for m in wire]
    hf_msgs[1] = {
        "role": "user",
        "content": [
            {"type": "image", "image": Image.open(io.BytesIO(buf.getvalue()))},
            {"type": "text", "text": "What is this?"},
        ],
    }
    hf_msgs[2] = {"role": "assistant", "content": [{"type": "text", "text": "A pattern."}]}
    _, hf_ids = hf_generate(path, hf_msgs, 12)
    hf_text = AutoTokenizer.from_pretrained(path).decode(hf_ids, skip_special_tokens=True)
    r = client.chat.completions.create(model=MODEL, messages=wire, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == hf_text
    assert r.usage.completion_tokens == len(hf_ids)


def test_streaming_with_usage(client, validate):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count."}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count."}], max_tokens=5, temperature=0
    )
    assert text == plain.choices[0].message.content
    for c in chunks:
        _check(validate, "CreateChatCompletionStreamResponse", c.model_dump(exclude_unset=True))


def test_usage_reports_prefix_cached_tokens(client, validate):
    """The same image with a new question: its KV comes from the prefix cache, and usage says so
    (OpenAI's prompt_tokens_details.cached_tokens), streamed or not."""
    image = {
        "type": "image_url",
        "image_url": {"url": _data_url(size=(96, 64), color=(201, 13, 77))},
    }

    def ask(question, **kw):
        return client.chat.completions.create(
            model=MODEL,
            max_tokens=2,
            temperature=0,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": question}]}],
            **kw,
        )

    text_only = client.chat.completions.create(
        model=MODEL,
        max_tokens=1,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Is it square?"}]}],
    )
    cold = ask("What colour is it?")
    warm = ask("Is it square?")
    image_tokens = warm.usage.prompt_tokens - text_only.usage.prompt_tokens
    # never seen
    assert image_tokens > 16 and cold.usage.prompt_tokens_details.cached_tokens < image_tokens
    cached = warm.usage.prompt_tokens_details.cached_tokens
    # whole KV blocks of 16, up to the new question: the image's tokens are in them
    assert image_tokens - 16 < cached < warm.usage.prompt_tokens and cached % 16 == 0, (
        cached,
        image_tokens,
    )
    _check(validate, "CreateChatCompletionResponse", warm.model_dump(exclude_unset=True))
    streamed = list(ask("Is it round?", stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens >= cached


def test_n_seed_and_logprobs(client, validate):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick."}],
        max_tokens=4,
        temperature=1.0,
        seed=11,
    )
    a = client.chat.completions.create(n=3, logprobs=True, top_logprobs=2, **kw)
    b = client.chat.completions.create(n=3, logprobs=True, top_logprobs=2, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert all(
        len(c.logprobs.content) == 4 and len(c.logprobs.content[0].top_logprobs) == 2
        for c in a.choices
    )
    _check(validate, "CreateChatCompletionResponse", a.model_dump(exclude_unset=True))


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_n_choices_share_one_prefill(client, server):
    """n=4 with an image: the image is encoded once and the prompt computed once (the other three
    choices fork its KV: prefix hits), the prompt counts once, and each choice equals a request of
    its own with seed + index (as choices were sampled before they shared a prefill)."""
    base = server[0]
    names = ("plm:encoder_cache_misses_total", "plm:prefix_cache_hits_total")
    names += ("plm:prompt_tokens_total",)
    before = {n: _metric(base, n) for n in names}
    kw = dict(model=MODEL, max_tokens=5, temperature=1.0)
    content = [
        {"type": "image_url", "image_url": {"url": _data_url((120, 90), (200, 17, 99))}},
        {"type": "text", "text": "Four guesses?"},
    ]
    messages = [{"role": "user", "content": content}]
    r = client.chat.completions.create(messages=messages, n=4, seed=21, **kw)
    after = {n: _metric(base, n) for n in names}
    n_prompt = r.usage.prompt_tokens
    assert after["plm:encoder_cache_misses_total"] - before["plm:encoder_cache_misses_total"] == 1
    assert after["plm:prompt_tokens_total"] - before["plm:prompt_tokens_total"] == n_prompt
    hits = after["plm:prefix_cache_hits_total"] - before["plm:prefix_cache_hits_total"]
    assert hits >= 3 * (n_prompt - 1), (hits, n_prompt)
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    alone = [
        client.chat.completions.create(messages=messages, seed=21 + i, **kw).choices[0]
        for i in range(4)
    ]
    assert texts == [c.message.content for c in alone]


def test_stop_string(client):
    free = (
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Go."}], max_tokens=8, temperature=0
        )
        .choices[0]
        .message.content
    )
    word = free.split()[2]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Go."}],
        max_tokens=8,
        temperature=0,
        stop=[word],
    )
    assert r.choices[0].finish_reason == "stop" and word not in r.choices[0].message.content


def test_video_from_allowed_local_path(client, server):
    from media_sets import write_synthetic_video

    _, media = server
    video = write_synthetic_video(media / "clip.mp4", frames=20, size=(64, 48))
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=3,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{video}", "num_frames": 4}},
                    {"type": "text", "text": "What happens?"},
                ],
            }
        ],
    )
    assert r.usage.prompt_tokens > 16


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
        (
            json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 1000}
            ).encode(),
            400,
            "n",
        ),
        (
            json.dumps(
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 10**6,
                }
            ).encode(),
            400,
            "max_tokens",
        ),
        (
            json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
            "model",
        ),
        (
            json.dumps(
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"type": "function", "function": {"name": "f"}}],
                }
            ).encode(),
            400,
            "tools",
        ),
        (
            json.dumps(
                {
                    "model": MODEL,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {"url": "data:image/png;base64,aGVsbG8="},
                                }
                            ],
                        }
                    ],
                }
            ).encode(),
            400,
            "messages[0].content[0].image_url",
        ),
        (
            json.dumps(
                {
                    "model": MODEL,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
                            ],
                        }
                    ],
                }
            ).encode(),
            400,
            "messages[0].content[0].image_url",
        ),
    ],
)
def test_bad_requests_get_openai_errors(server, validate, body, status, param):
    _post_and_check(server, validate, body, status, param)


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_bomb(side: int = 30_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (900 M for the default) that compresses to
    ~100 kB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" + bytes((side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


TEXT = {"type": "text", "text": "x"}
IMAGE_PART = "messages[0].content[0].image_url"  # param: the part at fault, as OpenAI writes it
WRONG_TYPES = [
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"stream": "maybe"}, "stream"),
    ({"n": 0}, "n"),
    ({"stop": 5}, "stop"),
    ({"top_p": 0}, "top_p"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}
            ]
        },
        "messages[0].content[0].type",
    ),
    ({"messages": _user({"type": "image_url"})}, IMAGE_PART),
    ({"messages": _user({"type": "image_url", "image_url": {"url": 5}})}, IMAGE_PART),
    (
        {"messages": _user({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}})},
        IMAGE_PART,
    ),
    (
        {
            "messages": _user(
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}
            )
        },
        IMAGE_PART,
    ),
    (
        {
            "messages": _user(
                {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
            )
        },
        "messages[0].content[0].video_url",
    ),
    ({"model": 7}, "model"),
]


@pytest.mark.parametrize(
    "change, param", WRONG_TYPES, ids=[str(i) for i in range(len(WRONG_TYPES))]
)
def test_wrong_types_and_shapes_get_400(server, validate, change, param):
    body = dict(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}, **change
    )
    _post_and_check(server, validate, json.dumps(body).encode(), 400, param)


def test_non_image_bytes_and_bombs_are_refused_before_decoding(server, validate, media_http):
    from media_sets import write_synthetic_video

    _, media = server
    # 7 s
    video = write_synthetic_video(media / "long.mp4", frames=14, size=(32, 32), fps=2).read_bytes()
    bomb = png_bomb()
    media_http.files["bomb.png"] = bomb
    media_http.files["page.png"] = b"<html><body>not an image</body></html>"
    cases = [
        (_b64(b"%PDF-1.4 not an image"), "unsupported image format"),
        # a video sent as an image: checked by content, not label
        (_b64(video), "unsupported image format"),
        # the server's cap
        (_b64(png_bomb(2100)), "2100x2100 = 4410000 pixels, over the limit of 4000000"),
        (_b64(bomb), "900000000 pixels"),  # Pillow's own bomb guard fires first at this size
        (f"{media_http.base}/file/bomb.png", "900000000 pixels"),
        (f"{media_http.base}/file/page.png", "unsupported image format"),
    ]
    for url, match in cases:
        body = {
            "model": MODEL,
            "max_tokens": 2,
            "messages": _user({"type": "image_url", "image_url": {"url": url}}, TEXT),
        }
        r = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and match in r.json()["error"]["message"], (
            url[:40],
            r.text[:300],
        )
        assert "base64" not in r.json()["error"]["message"]
        _check(validate, "ErrorResponse", r.json())
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": _user(
            {"type": "video_url", "video_url": {"url": _b64(video, "video/mp4")}}, TEXT
        ),
    }
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "over the limit of 5 s" in r.json()["error"]["message"], r.text[
        :300
    ]


def test_context_overflow_names_both_numbers(server, validate):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 11_515}
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_tokens"
    assert "11520" in err["message"] and "11515" in err["message"], err["message"]
    long_prompt = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "word " * 12_000}],
        "max_tokens": 2,
    }
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=long_prompt, timeout=60)
    assert r.status_code == 400 and "the context allows 11519" in r.json()["error"]["message"], (
        r.text[:300]
    )
    _check(validate, "ErrorResponse", r.json())


def test_too_many_images_and_oversized_body(server, validate):
    image = {"type": "image_url", "image_url": {"url": _data_url(size=(8, 8))}}
    many = {"model": MODEL, "messages": [{"role": "user", "content": [image] * 4}]}
    _post_and_check(server, validate, json.dumps(many).encode(), 400, "messages")
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    _post_and_check(server, validate, json.dumps(huge).encode(), 413, None)


def _post_and_check(server, validate, body, status, param):
    base, _ = server
    r = httpx.post(
        f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["param"] == param, err
    assert "aGVsbG8" not in err["message"]
    _check(validate, "ErrorResponse", r.json())


@pytest.fixture(scope="module")
def media_http():
    from media_http import MediaServer

    srv = MediaServer()
    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (200, 40, 40)).save(buf, format="PNG")
    srv.files["red.png"] = buf.getvalue()
    srv.files["big.bin"] = b"\x89PNG\r\n\x1a\n" + bytes(1 << 20)
    yield srv
    srv.close()


def _image_request(url):
    return {
        "model": MODEL,
        "max_tokens": 4,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Colour?"},
                ],
            }
        ],
    }


def test_http_image_equals_data_url(server, media_http):
    base, _ = server
    via_http = httpx.post(
        f"{base}/v1/chat/completions",
        json=_image_request(f"{media_http.base}/file/red.png"),
        timeout=60,
    )
    data_url = "data:image/png;base64," + base64.b64encode(media_http.files["red.png"]).decode()
    via_data = httpx.post(f"{base}/v1/chat/completions", json=_image_request(data_url), timeout=60)
    assert via_http.status_code == 200, via_http.text
    assert via_http.json()["choices"][0]["message"] == via_data.json()["choices"][0]["message"]
    redirected = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=60,
        json=_image_request(f"{media_http.base}/redirect?to=/file/red.png"),
    )
    assert redirected.status_code == 200


@pytest.mark.parametrize(
    "path, match",
    [
        ("/gzip/red.png", "content-encoding gzip"),
        ("/file/big.bin", "limit"),
        ("/file/missing.png", "HTTP 404"),
        ("/redirect?to=http://localhost:{port}/file/red.png", "not in the allowed media domains"),
    ],
)
def test_http_media_refusals(server, media_http, validate, path, match):
    base, _ = server
    url = media_http.base + path.format(port=media_http.port)
    r = httpx.post(f"{base}/v1/chat/completions", json=_image_request(url), timeout=60)
    assert r.status_code == 400 and match in r.json()["error"]["message"]
    _check(validate, "ErrorResponse", r.json())
