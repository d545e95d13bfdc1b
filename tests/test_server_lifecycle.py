"""Server lifecycle over real processes: API-key auth, admission limit (429), readiness, engine
failure exit."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_proc import start_server, stop_server

BODY = {"model": "plm-test", "messages": [{"role": "user", "content": "Hello."}], "max_tokens": 3}


@pytest.fixture(scope="module")
def keyed():
    proc, base = start_server("--api-key", "s3cret")
    yield base
    stop_server(proc)


@pytest.mark.parametrize("method, path", [("get", "/v1/models"), ("post", "/v1/chat/completions")])
def test_api_key_required(keyed, method, path):
    kw = {"json": BODY} if method == "post" else {}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = getattr(httpx, method)(f"{keyed}{path}", headers=headers, **kw)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = getattr(httpx, method)(
        f"{keyed}{path}", headers={"Authorization": "Bearer s3cret"}, timeout=60, **kw
    )
    assert r.status_code == 200


def test_open_routes_need_no_key(keyed):
    assert httpx.get(f"{keyed}/health").status_code == 200
    assert httpx.get(f"{keyed}/ready").json() == {"status": "ready"}


def test_full_admission_gets_429_quickly():
    proc, base = start_server("--max-pending-requests", "1")
    try:
        long = dict(BODY, max_tokens=400, ignore_eos=True, stream=True)
        started = threading.Event()

        def hold():
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=long, timeout=120) as r:
                for _ in r.iter_lines():
                    started.set()

        t = threading.Thread(target=hold)
        t.start()
        assert started.wait(60)
        t0 = time.perf_counter()
        r = httpx.post(f"{base}/v1/chat/completions", json=BODY, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert time.perf_counter() - t0 < 2
        t.join(120)
        assert httpx.post(f"{base}/v1/chat/completions", json=BODY, timeout=60).status_code == 200
    finally:
        stop_server(proc)


def test_engine_failure_fails_requests_and_exits_nonzero():
    proc, base = start_server("--debug-fail-after-steps", "2")
    try:
        ok = httpx.post(f"{base}/v1/chat/completions", json=dict(BODY, max_tokens=1), timeout=60)
        assert ok.status_code == 200
        r = httpx.post(f"{base}/v1/chat/completions", json=dict(BODY, max_tokens=50), timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert proc.wait(30) != 0
    finally:
        if proc.poll() is None:
            stop_server(proc)


def test_engine_failure_mid_stream_sends_an_error_event_then_done():
    proc, base = start_server("--debug-fail-after-steps", "6")
    try:
        body = dict(BODY, max_tokens=50, ignore_eos=True, stream=True)
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "engine failed" in error["message"]
        tokens = [json.loads(e) for e in events[:-2]]
        assert any(c["choices"][0]["delta"].get("content") for c in tokens)  # it failed mid-stream
        assert proc.wait(30) != 0
    finally:
        if proc.poll() is None:
            stop_server(proc)


def test_listens_while_loading_then_ready():
    from server_proc import free_port, server_command, spawn

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = spawn(server_command(port, "--debug-load-delay", "6"))
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                health = httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert health.status_code == 200
        ready = httpx.get(f"{base}/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == "loading"
        r = httpx.post(f"{base}/v1/chat/completions", json=BODY)
        assert (
            r.status_code == 503
            and r.headers["retry-after"]
            and "loading" in r.json()["error"]["message"]
        )
        assert _metric(base, "plm:server_ready") == 0
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "plm-test"
        while httpx.get(f"{base}/ready").status_code != 200:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.2)
        assert httpx.post(f"{base}/v1/chat/completions", json=BODY, timeout=60).status_code == 200
        assert _metric(base, "plm:server_ready") == 1
    finally:
        stop_server(proc)


def test_load_failure_exits_nonzero_with_the_reason(tmp_path):
    import subprocess
    import sys

    from support import REPO

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "--model",
            str(tmp_path / "missing"),
            "--port",
            "0",
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "error:" in out.stderr and "missing" in out.stderr


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_and_disconnect_frees_kv(keyed):
    auth = {"Authorization": "Bearer s3cret"}
    before = _metric(keyed, "plm:generation_tokens_total")
    assert (
        httpx.post(f"{keyed}/v1/chat/completions", json=BODY, headers=auth, timeout=60).status_code
        == 200
    )
    assert _metric(keyed, "plm:generation_tokens_total") == before + 3
    assert _metric(keyed, "plm:time_to_first_token_seconds_count") >= 1
    assert _metric(keyed, "plm:e2e_request_latency_seconds_count") >= 1
    for name in (
        "plm:num_requests_running",
        "plm:num_requests_waiting",
        "plm:kv_cache_usage_perc",
        "plm:prompt_tokens_total",
        "plm:prefix_cache_queries_total",
        "plm:prefix_cache_hits_total",
        "plm:encoder_cache_hits_total",
        "plm:inter_token_latency_seconds_count",
    ):
        _metric(keyed, name)
    # a non-streaming client that gives up: its request is aborted and its KV blocks freed
    long = dict(BODY, max_tokens=5000, ignore_eos=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{keyed}/v1/chat/completions", json=long, headers=auth, timeout=2)
    for _ in range(50):
        if (
            _metric(keyed, "plm:num_requests_running") == 0
            and _metric(keyed, "plm:kv_cache_usage_perc") == 0
        ):
            break
        time.sleep(0.1)
    assert _metric(keyed, "plm:num_requests_running") == 0
    assert _metric(keyed, "plm:kv_cache_usage_perc") == 0
    assert _metric(keyed, "plm:generation_tokens_total") < before + 3 + 5000


def test_ssrf_guard_refuses_internal_targets(keyed):
    from media_http import MediaServer

    srv = MediaServer()
    srv.files["a.png"] = b"\x89PNG"
    auth = {"Authorization": "Bearer s3cret"}
    try:
        # only loopback targets over the wire; other private ranges are checked without traffic
        # below
        for url in (
            f"{srv.base}/file/a.png",
            f"http://localhost:{srv.port}/file/a.png",
            f"http://[::1]:{srv.port}/x.png",
            f"http://0.0.0.0:{srv.port}/file/a.png",
        ):
            body = dict(
                BODY,
                messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
                ],
            )
            r = httpx.post(f"{keyed}/v1/chat/completions", json=body, headers=auth, timeout=30)
            assert r.status_code == 400, (url, r.text)
            assert "private or reserved" in r.json()["error"]["message"]
        assert srv.hits == 0
    finally:
        srv.close()


def test_address_classification_without_traffic():
    from server.media_fetch import is_public_address

    for addr in (
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "fc00::1",
        "224.0.0.1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "100.64.0.1",
        "240.0.0.1",
    ):
        assert not is_public_address(addr), addr
    for addr in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert is_public_address(addr), addr


def test_health_answers_while_a_big_image_decodes(keyed):
    import base64
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (2400, 3200, 3), dtype=np.uint8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = dict(
        BODY,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    )
    done = threading.Event()

    def post():
        httpx.post(
            f"{keyed}/v1/chat/completions",
            json=body,
            headers={"Authorization": "Bearer s3cret"},
            timeout=120,
        )
        done.set()

    t = threading.Thread(target=post)
    t.start()
    worst = 0.0
    while not done.is_set():
        t0 = time.perf_counter()
        assert httpx.get(f"{keyed}/health", timeout=10).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.05)
    t.join()
    assert worst < 0.5, f"/health took {worst:.2f} s while an image was being decoded"


def test_sigterm_drains_in_flight_streams():
    import signal

    proc, base = start_server("--drain-timeout", "60")
    try:
        body = dict(BODY, max_tokens=60, ignore_eos=True, stream=True)
        lines = []
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                if not lines:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                lines.append(line)
        assert lines[-1] == "data: [DONE]"
        finish = [
            json.loads(x[5:])["choices"][0]["finish_reason"]
            for x in lines
            if x.startswith("data: {") and json.loads(x[5:])["choices"]
        ]
        assert finish[-1] == "length"
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown: a clean exit by that
        # signal
        assert proc.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if proc.poll() is None:
            stop_server(proc)
