"""End to end: the real `python -m server` process on the tiny checkpoint, driven by the official openai client.

Responses and stream chunks are validated against OpenAI's published schemas
(../shared/openai-openapi.json) when that file is present.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from conftest import REPO, checkpoint_path
from server_proc import start_server, stop_server

OPENAPI = REPO.parent / "shared" / "openai-openapi.json"
MODEL = "plm-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    media = tmp_path_factory.mktemp("allowed")
    proc, base = start_server("--allowed-local-media-path", str(media), "--max-request-body-mb", "1",
                              "--max-media-per-request", "3", "--allow-private-media-hosts",
                              "--allowed-media-domains", "127.0.0.1", "--max-media-mb", "0.5", model_name=MODEL)
    yield base, media
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def validate():
    """validate(schema_name, obj) against OpenAI's schema; a no-op with a reason when the file is absent."""
    if not OPENAPI.exists():
        return None
    import jsonschema

    spec = json.loads(OPENAPI.read_text())

    def convert(node):  # OpenAPI 3.0 `nullable` -> JSON Schema null types
        if isinstance(node, dict):
            node = {k: convert(v) for k, v in node.items()}
            if node.pop("nullable", False):
                node = {"anyOf": [node, {"type": "null"}]}
            return node
        if isinstance(node, list):
            return [convert(v) for v in node]
        if isinstance(node, str):
            return node.replace("#/components/schemas/", "#/$defs/")
        return node

    defs = convert(spec["components"]["schemas"])

    def check(name: str, obj: dict) -> None:
        # OpenAPI 3.0 schemas are draft-4 style (boolean exclusiveMinimum)
        jsonschema.Draft4Validator({"$ref": f"#/$defs/{name}", "$defs": defs}).validate(obj)

    return check


def _data_url(size=(200, 150), color=(10, 200, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _check(validate, name, obj):
    if validate is None:
        pytest.skip(f"OpenAI's schema not found at {OPENAPI} (only present in the project workspace)")
    validate(name, obj)


def test_models_and_health(server):
    base, _ = server
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    models = httpx.get(f"{base}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_plain_chat(client, validate):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}],
                                       max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    _check(validate, "CreateChatCompletionResponse", r.model_dump(exclude_unset=True))


def test_image_chat_equals_offline_engine(client, server):
    from plm_core import LLM, SamplingParams

    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url()}},
                                         {"type": "text", "text": "What is this?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    offline = LLM(str(checkpoint_path("tiny")), device="cpu").chat(msgs, SamplingParams(temperature=0, max_tokens=8))[0]
    assert r.choices[0].message.content == offline.text


def test_streaming_with_usage(client, validate):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count."}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count."}],
                                           max_tokens=5, temperature=0)
    assert text == plain.choices[0].message.content
    for c in chunks:
        _check(validate, "CreateChatCompletionStreamResponse", c.model_dump(exclude_unset=True))


def test_n_seed_and_logprobs(client, validate):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Pick."}], max_tokens=4, temperature=1.0, seed=11)
    a = client.chat.completions.create(n=3, logprobs=True, top_logprobs=2, **kw)
    b = client.chat.completions.create(n=3, logprobs=True, top_logprobs=2, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert all(len(c.logprobs.content) == 4 and len(c.logprobs.content[0].top_logprobs) == 2 for c in a.choices)
    _check(validate, "CreateChatCompletionResponse", a.model_dump(exclude_unset=True))


def test_stop_string(client):
    free = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go."}],
                                          max_tokens=8, temperature=0).choices[0].message.content
    word = free.split()[2]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go."}],
                                       max_tokens=8, temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop" and word not in r.choices[0].message.content


def test_video_from_allowed_local_path(client, server):
    from media_sets import write_synthetic_video

    _, media = server
    video = write_synthetic_video(media / "clip.mp4", frames=20, size=(64, 48))
    r = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{video}", "num_frames": 4}},
        {"type": "text", "text": "What happens?"}]}])
    assert r.usage.prompt_tokens > 16


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 1000}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}).encode(),
     400, "max_tokens"),
    (json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(), 400, "tools"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}).encode(), 400, "messages"),
])
def test_bad_requests_get_openai_errors(server, validate, body, status, param):
    _post_and_check(server, validate, body, status, param)


def test_too_many_images_and_oversized_body(server, validate):
    image = {"type": "image_url", "image_url": {"url": _data_url(size=(8, 8))}}
    many = {"model": MODEL, "messages": [{"role": "user", "content": [image] * 4}]}
    _post_and_check(server, validate, json.dumps(many).encode(), 400, "messages")
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    _post_and_check(server, validate, json.dumps(huge).encode(), 413, None)


def _post_and_check(server, validate, body, status, param):
    base, _ = server
    r = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
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
    return {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Colour?"}]}]}


def test_http_image_equals_data_url(server, media_http):
    base, _ = server
    via_http = httpx.post(f"{base}/v1/chat/completions", json=_image_request(f"{media_http.base}/file/red.png"),
                          timeout=60)
    data_url = "data:image/png;base64," + base64.b64encode(media_http.files["red.png"]).decode()
    via_data = httpx.post(f"{base}/v1/chat/completions", json=_image_request(data_url), timeout=60)
    assert via_http.status_code == 200, via_http.text
    assert via_http.json()["choices"][0]["message"] == via_data.json()["choices"][0]["message"]
    redirected = httpx.post(f"{base}/v1/chat/completions", timeout=60, json=_image_request(
        f"{media_http.base}/redirect?to=/file/red.png"))
    assert redirected.status_code == 200


@pytest.mark.parametrize("path, match", [
    ("/gzip/red.png", "content-encoding gzip"),
    ("/file/big.bin", "limit"),
    ("/file/missing.png", "HTTP 404"),
    ("/redirect?to=http://localhost:{port}/file/red.png", "not in the allowed media domains"),
])
def test_http_media_refusals(server, media_http, validate, path, match):
    base, _ = server
    url = media_http.base + path.format(port=media_http.port)
    r = httpx.post(f"{base}/v1/chat/completions", json=_image_request(url), timeout=60)
    assert r.status_code == 400 and match in r.json()["error"]["message"]
    _check(validate, "ErrorResponse", r.json())
