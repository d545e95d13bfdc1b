"""/openapi.json tells the truth: real responses of every route conform to the server's own
document, and a bounded property-based fuzz run (schemathesis, from that document) finds no 5xx and
no response outside it. The server runs for real, with a short context so generated requests stay
cheap."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from PIL import Image
from server_proc import start_server, stop_server

MODEL = "plm-test"  # server_proc's served name


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--max-model-len", "512", "--max-num-seqs", "8")
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def spec(server):
    return httpx.get(f"{server}/openapi.json", timeout=10).json()


def conforms(spec: dict, path: str, method: str, resp: httpx.Response) -> None:
    """The response's body matches the document's schema for its status and content type."""
    import jsonschema

    op = spec["paths"][path][method]
    documented = op["responses"].get(str(resp.status_code))
    assert documented, f"{method.upper()} {path} answered {resp.status_code}, not in the document"
    ctype = resp.headers["content-type"].split(";")[0]
    media = documented["content"].get(ctype)
    assert media, f"{ctype} not documented for {resp.status_code} of {path}"
    body = resp.json() if ctype == "application/json" else resp.text
    schema = {**media["schema"], "components": spec["components"]}
    jsonschema.validate(body, schema)


def png_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_every_route_answers_as_documented(server, spec):
    image = {"type": "image_url", "image_url": {"url": png_url()}}
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}],
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 2,
    }
    calls = [
        ("/v1/chat/completions", "post", chat),
        ("/v1/chat/completions", "post", {**chat, "model": "nope"}),
        ("/v1/chat/completions", "post", {"model": MODEL, "messages": []}),
        ("/tokenize", "post", {"messages": chat["messages"]}),
        ("/tokenize", "post", {"prompt": "hello"}),
        ("/detokenize", "post", {"tokens": [1, 2, 3]}),
        ("/v1/models", "get", None),
        ("/health", "get", None),
        ("/ready", "get", None),
        ("/metrics", "get", None),
    ]
    for path, method, body in calls:
        resp = httpx.request(method, server + path, json=body, timeout=60)
        conforms(spec, path, method, resp)
    card = httpx.get(f"{server}/v1/models/{MODEL}", timeout=10)
    conforms(spec, "/v1/models/{model_id}", "get", card)
    # each event of a stream is a documented chunk (or the error envelope)
    import jsonschema

    with httpx.stream(
        "POST",
        f"{server}/v1/chat/completions",
        json={**chat, "stream": True, "stream_options": {"include_usage": True}},
        timeout=60,
    ) as r:
        events = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunk = {"$ref": "#/components/schemas/ChatCompletionChunk", "components": spec["components"]}
    for event in events[:-1]:
        jsonschema.validate(httpx.Response(200, content=event).json(), chunk)


def test_metrics_are_documented_as_text(spec):
    (ctype,) = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert ctype == "text/plain"


@pytest.mark.slow
def test_fuzzing_from_the_document_finds_no_5xx_and_nothing_undocumented(server):
    """schemathesis generates requests from /openapi.json (bounded: 100 examples per operation,
    every chat capped at 8 output tokens and 2 choices) and checks every answer: no 5xx, a
    documented status, a body that conforms."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import (
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    config = settings(
        max_examples=100,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )

    statuses: dict[str, dict[int, int]] = {}

    def fuzz(operation) -> None:
        seen = statuses.setdefault(f"{operation.method.upper()} {operation.path}", {})

        @config
        @given(case=operation.as_strategy())
        def run(case):
            if isinstance(case.body, dict):  # bounded: every generated chat is cheap to run
                case.body["max_tokens"] = min(case.body.get("max_tokens") or 8, 8)
                case.body.pop("max_completion_tokens", None)
                case.body["n"] = min(case.body.get("n") or 1, 2)
            response = case.call_and_validate(checks=checks, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1

        run()

    failures: list[str] = []
    started, operations = time.monotonic(), 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        try:
            fuzz(operation)
        except Exception as e:  # noqa: BLE001 - collect every operation's failure
            failures.append(f"{operation.method.upper()} {operation.path}: {str(e)[:1500]}")
    print(f"fuzzed {operations} operations in {time.monotonic() - started:.0f} s: {statuses}")
    assert operations == 8
    assert sum(sum(s.values()) for s in statuses.values()) >= 8 * 10, statuses
    assert not failures, "\n\n".join(failures)
