"""The real router: HAProxy (Debian's package) on deploy/haproxy/haproxy.cfg, in front of three
plm-serve processes, as benchmarks/serve_cluster.py runs it (only the addresses change).

Affinity: every turn of a conversation reaches the replica that holds its media and history, by
X-Session-Id, by prompt_cache_key, or, with no key at all, by the media at the start of the body;
uuid references work across turns. Failures: a killed replica moves only its own keys and new
requests succeed; a draining one gets no new requests while its stream completes; SSE is not
buffered.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from support import REPO, checkpoint_path

sys.path.insert(0, str(REPO / "benchmarks"))
from serve_cluster import (  # noqa: E402
    HAPROXY_CFG,
    balancer_problem,
    haproxy_config,
    router_binary,
    start_balancer,
    start_replica,
    start_replicas,
    stop_replicas,
)

pytestmark = pytest.mark.slow
MODEL = "plm-bench"  # the name serve_cluster's replicas serve
CHAT = "/v1/chat/completions"
KEYS = [f"session-{i}" for i in range(24)]
REPLICA_FLAGS = ["--drain-timeout", "120"]


def png_url(seed: int, size=(160, 120)) -> str:
    """A noise PNG (incompressible: its data: URL is longer than the 8 KB content key)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(url: str, messages, headers=None, max_tokens: int = 2, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **extra}
    return httpx.post(url + CHAT, json=body, headers=headers or {}, timeout=120)


def text(msg: str) -> list[dict]:
    return [{"role": "user", "content": msg}]


def served_by(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.headers["x-served-by"]


def key_map(url: str, keys=KEYS) -> dict[str, str]:
    """The replica each X-Session-Id key goes to now."""
    return {k: served_by(chat(url, text("Hi."), {"X-Session-Id": k})) for k in keys}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    problem = balancer_problem("haproxy")
    if problem:
        pytest.skip(f"{problem}; scripts/test.sh installs it where it runs as root")
    work = tmp_path_factory.mktemp("router")
    replicas = start_replicas(str(checkpoint_path("tiny")), 3, work, REPLICA_FLAGS)
    try:
        bal = start_balancer("haproxy", replicas, work)
    except BaseException:
        stop_replicas(replicas)
        raise
    bal.work = work  # type: ignore[attr-defined]  # where a restarted replica logs
    yield bal
    bal.stop()
    stop_replicas(replicas)


def test_the_committed_file_is_valid_and_the_tests_change_only_addresses(tmp_path):
    haproxy = router_binary("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    check = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    class R:  # the replica fields haproxy_config reads
        def __init__(self, i):
            self.name, self.base = f"r{i}", f"http://127.0.0.1:{9000 + i}"

    rendered = haproxy_config([R(0), R(1)], 18000, 18404).splitlines()
    committed = HAPROXY_CFG.read_text().splitlines()
    changed = {line.strip() for line in committed} - {line.strip() for line in rendered}
    assert changed == {
        "bind :8000",
        "bind :8404",
        "server-template plm 8 plm:8000 resolvers docker init-addr none",
    }
    assert "server r1 127.0.0.1:9001" in [line.strip() for line in rendered]


def test_a_session_header_keeps_every_turn_on_one_replica(cluster):
    first = key_map(cluster.url)
    assert key_map(cluster.url) == first  # a second turn of every session: same replica
    assert len(set(first.values())) == 3, f"24 keys should reach all three replicas: {first}"


def test_prompt_cache_key_and_user_route_like_a_session(cluster):
    for field in ("prompt_cache_key", "user"):
        seen = {
            k: {served_by(chat(cluster.url, text(f"Turn {t}."), **{field: k})) for t in range(3)}
            for k in KEYS[:8]
        }
        assert all(len(s) == 1 for s in seen.values()), (field, seen)
        assert len(set().union(*seen.values())) >= 2, f"{field}: every key on one replica"


def test_without_a_key_a_conversation_follows_its_image(cluster):
    """Inline images, history resent each turn, no key: the content key keeps each conversation on
    one replica, and its later turns come from the prefix cache."""
    replicas = set()
    for conv in range(6):
        part = {"type": "image_url", "image_url": {"url": png_url(conv)}}
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "Describe it."}]}]
        seen, cached = set(), []
        for turn in range(3):
            resp = chat(cluster.url, messages, max_tokens=3)
            seen.add(served_by(resp))
            cached.append(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
            answer = resp.json()["choices"][0]["message"]["content"]
            messages = [
                *messages,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": f"And turn {turn + 2}?"},
            ]
        assert len(seen) == 1, f"conversation {conv} moved: {seen}"
        assert cached[1] > 0 and cached[2] > cached[1], cached
        replicas |= seen
    assert len(replicas) >= 2, "six different images all went to one replica"


def test_uuid_references_work_across_turns_with_a_session_key(cluster):
    for conv in range(6):
        headers = {"X-Session-Id": f"uuid-conversation-{conv}"}
        name = f"photo-{conv}-{time.time_ns()}"
        part = {"type": "image_url", "image_url": {"url": png_url(100 + conv)}, "uuid": name}
        ask = {"type": "text", "text": "Describe it."}
        first = chat(cluster.url, [{"role": "user", "content": [part, ask]}], headers)
        ref = {"type": "image_url", "image_url": None, "uuid": name}
        later = chat(cluster.url, [{"role": "user", "content": [ref, ask]}], headers)
        assert served_by(later) == served_by(first)
        assert later.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_streams_pass_through_unbuffered(cluster):
    body = {"model": MODEL, "messages": text("Hello."), "max_tokens": 300, "ignore_eos": True}
    arrivals = []
    t0 = time.perf_counter()
    with httpx.stream("POST", cluster.url + CHAT, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.perf_counter() - t0, line))
    assert arrivals[-1][1] == "data: [DONE]"
    total = arrivals[-1][0]
    assert total > 0.5, f"the stream took {total:.2f} s: too short to tell streaming from buffering"
    assert arrivals[1][0] < 0.25 * total, f"first chunk at {arrivals[1][0]:.2f} of {total:.2f} s"
    assert len({int(t / 0.05) for t, _ in arrivals}) >= 10


class Stream(threading.Thread):
    """A streamed chat through the router, read in the background. 4,000 tokens, so that it is still
    running after a kill or a drain has been noticed and the keys mapped again (the tiny checkpoint
    makes a token in ~2.5 ms: 300 were sometimes done before the drain test's check)."""

    def __init__(self, url: str, key: str, max_tokens: int = 4000):
        super().__init__(daemon=True)
        self.url, self.key, self.max_tokens = url, key, max_tokens
        self.lines: list[str] = []
        self.served_by: str | None = None
        self.error: Exception | None = None
        self.started = threading.Event()

    def run(self):
        body = {
            "model": MODEL,
            "messages": text("Tell a long story."),
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        headers = {"X-Session-Id": self.key}
        try:
            with httpx.stream(
                "POST", self.url + CHAT, json=body, headers=headers, timeout=120
            ) as r:
                assert r.status_code == 200, r.read()
                self.served_by = r.headers["x-served-by"]
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        if len(self.lines) >= 3:
                            self.started.set()
        except Exception as e:  # noqa: BLE001
            self.error = e  # a killed replica cuts the stream; the test looks at it
        finally:
            self.started.set()

    def finish_reasons(self) -> list[str]:
        chunks = [json.loads(x[6:]) for x in self.lines if x.startswith("data: {")]
        return [
            c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]
        ]


def test_a_killed_replica_moves_only_its_keys_and_gets_them_back(cluster):
    """SIGKILL on the replica running a stream: new requests all succeed, before and after the
    health check notices; keys of the live replicas keep their replica, the dead one's move; when
    it returns (same address) it gets exactly its own keys back and nothing else moves."""
    before = key_map(cluster.url)
    stream = Stream(cluster.url, KEYS[0])
    stream.start()
    assert stream.started.wait(60) and stream.served_by, stream.error
    victim = next(r for r in cluster.replicas if r.name == stream.served_by)
    victim.proc.kill()
    victim.proc.wait(10)
    # at once (the health check has not noticed: connection refused, retried elsewhere) and after
    right_after = key_map(cluster.url)
    cluster.wait_status({victim.name: "DOWN"}, timeout_s=10)
    after = key_map(cluster.url)
    for now in (right_after, after):
        assert victim.name not in now.values()
        assert {k: v for k, v in now.items() if before[k] != victim.name} == {
            k: v for k, v in before.items() if v != victim.name
        }
    stream.join(30)
    assert not stream.lines or stream.lines[-1] != "data: [DONE]"
    port = int(victim.base.rsplit(":", 1)[1])
    back = start_replica(
        victim.name, str(checkpoint_path("tiny")), port, cluster.work, REPLICA_FLAGS
    )
    cluster.replicas[cluster.replicas.index(victim)] = back
    cluster.wait_status({victim.name: "UP"}, timeout_s=20)
    assert key_map(cluster.url) == before


def test_a_draining_replica_gets_no_new_requests_and_finishes_its_stream(cluster):
    live = [r for r in cluster.replicas if r.alive]
    if len(live) < 2:
        pytest.skip("needs two live replicas")
    draining = live[0]
    before = key_map(cluster.url)
    key = next(k for k in KEYS if before[k] == draining.name)
    stream = Stream(cluster.url, key)
    stream.start()
    assert stream.started.wait(60) and stream.served_by == draining.name, stream.error
    draining.proc.send_signal(signal.SIGTERM)
    cluster.wait_status({draining.name: "DOWN"}, timeout_s=10)
    lines_then = len(stream.lines)
    # its own keys go elsewhere, every other key stays where it was
    after = key_map(cluster.url)
    assert draining.name not in after.values()
    assert {k: v for k, v in after.items() if before[k] != draining.name} == {
        k: v for k, v in before.items() if v != draining.name
    }
    assert draining.alive and len(stream.lines) > lines_then, "the stream ended too soon to test"
    stream.join(120)
    assert stream.error is None, stream.error
    assert stream.lines[-1] == "data: [DONE]" and stream.finish_reasons() == ["length"]
    assert draining.proc.wait(30) in (0, -signal.SIGTERM)
