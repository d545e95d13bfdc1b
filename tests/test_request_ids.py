"""Request ids (X-Request-Id in, out, in the completion id and in log lines), the access log, and
`--log-format json` from the real server process."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
from server_proc import server_output, start_server, stop_server
from support import served_state

from server.app import build_app
from server.request_ids import JsonFormatter, RequestIdFilter, request_id_var

MODEL = "plm-rid-test"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def state(tiny_checkpoint):
    with served_state(tiny_checkpoint, MODEL) as state:
        yield state


def call(state, requests: list[tuple[str, str, dict | None, dict]]) -> list[httpx.Response]:
    """(method, path, json body, headers) through the app in this process, all at once."""

    async def go():
        transport = httpx.ASGITransport(app=build_app(state), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await asyncio.gather(
                *(
                    client.request(m, path, json=body, headers=headers, timeout=60)
                    for m, path, body, headers in requests
                )
            )

    return asyncio.run(go())


def test_a_client_request_id_comes_back_and_names_the_completion(state):
    (r,) = call(state, [("POST", "/v1/chat/completions", BODY, {"X-Request-Id": "trace-42.a"})])
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-42.a"
    assert r.json()["id"] == "chatcmpl-trace-42.a"


def test_without_one_a_new_id_is_made_and_used_for_the_stream_too(state):
    stream = {**BODY, "stream": True}
    (r,) = call(state, [("POST", "/v1/chat/completions", stream, {})])
    rid = r.headers["x-request-id"]
    assert len(rid) == 32 and int(rid, 16) >= 0
    ids = {json.loads(x[6:])["id"] for x in r.text.splitlines() if x.startswith("data: {")}
    assert ids == {f"chatcmpl-{rid}"}


def test_invalid_ids_are_replaced_and_reused_ids_still_run(state):
    bad = "has spaces and\ttabs"
    responses = call(
        state,
        [("POST", "/v1/chat/completions", BODY, {"X-Request-Id": bad})]
        + [("POST", "/v1/chat/completions", BODY, {"X-Request-Id": "same"})] * 3,
    )
    assert responses[0].headers["x-request-id"] != bad
    # three requests in flight under one client id: the engine's ids stay distinct
    assert [r.status_code for r in responses] == [200] * 4
    assert {r.json()["id"] for r in responses[1:]} == {"chatcmpl-same"}


def test_every_response_carries_its_id(state):
    responses = call(
        state,
        [
            ("GET", "/health", None, {"X-Request-Id": "probe-1"}),
            ("GET", "/no/such/route", None, {}),
            ("POST", "/v1/chat/completions", {"model": "other", "messages": []}, {}),
        ],
    )
    assert responses[0].headers["x-request-id"] == "probe-1"
    assert [r.status_code for r in responses[1:]] == [404, 400]
    assert all(r.headers.get("x-request-id") for r in responses)


def test_the_access_line_has_method_path_status_tokens_and_latency(state, caplog):
    with caplog.at_level(logging.INFO, logger="plm_serve.access"):
        (r,) = call(state, [("POST", "/v1/chat/completions", BODY, {"X-Request-Id": "acc-1"})])
    usage = r.json()["usage"]
    (rec,) = [x for x in caplog.records if x.name == "plm_serve.access"]
    assert rec.access["method"] == "POST" and rec.access["path"] == "/v1/chat/completions"
    assert rec.access["status"] == 200 and rec.access["latency_ms"] > 0
    assert rec.access["prompt_tokens"] == usage["prompt_tokens"]
    assert rec.access["completion_tokens"] == usage["completion_tokens"] == 3
    text = rec.getMessage()
    assert text.startswith("POST /v1/chat/completions 200 tokens=") and text.endswith(" ms")


def test_log_records_carry_the_request_id_as_json():
    record = logging.LogRecord("plm_serve", logging.WARNING, __file__, 1, "hello %s", ("x",), None)
    token = request_id_var.set("rid-7")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    out = json.loads(JsonFormatter().format(record))
    assert out["request_id"] == "rid-7" and out["message"] == "hello x"
    assert out["level"] == "WARNING" and out["logger"] == "plm_serve"
    outside = logging.LogRecord("plm_serve", logging.INFO, __file__, 1, "idle", (), None)
    RequestIdFilter().filter(outside)
    assert outside.request_id == "-"


@pytest.mark.slow
def test_the_server_writes_json_lines_with_request_ids():
    proc, base = start_server("--log-format", "json", "--log-level", "info")
    try:
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={**BODY, "model": "plm-test"},
            headers={"X-Request-Id": "json-line-1"},
            timeout=60,
        )
        assert r.status_code == 200
        deadline = time.time() + 10
        while time.time() < deadline and "json-line-1" not in server_output(proc):
            time.sleep(0.1)
    finally:
        stop_server(proc)
    lines = [x for x in server_output(proc).splitlines() if x.strip()]
    records = [json.loads(x) for x in lines]  # every line is JSON, uvicorn's own included
    (access,) = [x for x in records if x.get("request_id") == "json-line-1" and "status" in x]
    assert access["path"] == "/v1/chat/completions" and access["status"] == 200
    assert access["completion_tokens"] == 3 and access["logger"] == "plm_serve.access"
    assert any(x["logger"].startswith("uvicorn") for x in records)
