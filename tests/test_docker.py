"""The CPU image and the compose stack, for real, on a Docker engine (marker `docker`).

The image is built from this checkout by scripts/docker_build.sh (the production Dockerfile on a
Debian base made with debootstrap, wheels from this machine's package indexes). One container runs
the offline demo checkpoint on the host network: Docker's own health check must turn `healthy`, the
official client sends a photo chat, a streamed video chat and a bad request, the server runs as the
unprivileged user with a writable cache volume, and `docker stop` drains an in-flight stream.
Then docker-compose.yml's CPU profile runs under Compose v1 (Debian's docker-compose) with two
replicas behind HAProxy, whose image is built here from Debian's haproxy package (the release the
file names; no image can be pulled).

Skips with the reason when no Docker engine can be had; as root it installs Debian's docker.io and
starts dockerd itself, and stops the daemon it started at the end. Every container, network and
volume a test makes is removed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from media_sets import image_names, media_path, video_names
from support import REPO

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = os.environ.get("PLM_DOCKER_IMAGE", "plm-serve:cpu")
ROUTER_IMAGE = "plm-serve-haproxy:test"
PORT = 8000  # the image's port (ENTRYPOINT --port 8000), on the host network
UID = 10001  # the Dockerfile's `plm` user


def sh(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return done


def docker(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh("docker", *args, **kw)


def port_free(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        pass
    return False


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A Docker engine: the running one, else dockerd started here (stopped again at the end)."""
    env = REPO / "scripts" / "docker_env.sh"
    for step in ("install", "start"):
        if step == "start" and shutil.which("docker") is None:
            pytest.skip("no docker CLI")
        done = subprocess.run(["bash", str(env), step], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"no Docker engine here: {done.stderr.strip() or done.stdout.strip()}")
    started = done.stdout.strip() == "started"
    yield
    if started:
        subprocess.run(["bash", str(env), "stop"], timeout=120)


@pytest.fixture(scope="session")
def cpu_image(docker_engine) -> str:
    """plm-serve:cpu built from this checkout (PLM_DOCKER_IMAGE=name: use that image instead)."""
    if "PLM_DOCKER_IMAGE" not in os.environ:
        t0 = time.monotonic()
        done = sh("bash", str(REPO / "scripts" / "docker_build.sh"), IMAGE, timeout=3600)
        print(done.stdout.strip().splitlines()[-1], f"({time.monotonic() - t0:.0f} s here)")
    return IMAGE


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    """A photo and a video as data: URLs (the shared real files where present)."""
    folder = tmp_path_factory.mktemp("docker-media")
    photo = media_path(next(n for n in image_names() if n.endswith((".jpg", ".jpeg"))), folder)
    video = media_path(video_names()[0], folder)
    return {"photo": data_url(photo, "image/jpeg"), "video": data_url(video, "video/mp4")}


def wait_healthy(container: str, timeout_s: float = 300) -> float:
    """Seconds until Docker reports the container `healthy` (its image's own HEALTHCHECK)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        state = json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)
        assert state["Status"] == "running", docker("logs", container, check=False).stderr[-3000:]
        if state.get("Health", {}).get("Status") == "healthy":
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"not healthy after {timeout_s} s: {docker('logs', container).stderr}")


def wait_ready(base: str, container: str, timeout_s: float = 300) -> float:
    """Seconds until the server's /ready answers 200 (its model loaded)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready after {timeout_s} s: {docker('logs', container).stderr}")


def stream_chat(base: str, content, max_tokens: int, on_chunk=None, model="plm") -> dict:
    """One streamed chat with the official client: the text, finish reason and chunk count."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    text, finish, chunks = [], None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if on_chunk is not None:
            on_chunk(chunks)
    return {"text": "".join(text), "finish_reason": finish, "chunks": chunks}


# -- one container ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def container(cpu_image) -> Iterator[str]:
    """The image on the host network with the demo checkpoint and a fresh cache volume."""
    if not port_free(PORT):
        pytest.skip(f"port {PORT} (the image's) is taken on this machine")
    name = f"plm-smoke-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-cache"
    docker("volume", "create", volume)
    docker(
        "run", "-d", "--name", name, "--network", "host", "-v", f"{volume}:/cache",
        "--stop-timeout", "45", cpu_image, "--demo", "tiny", "--served-model-name", "plm",
        "--drain-timeout", "30",
    )  # fmt: skip
    try:
        took = wait_healthy(name)
        # the image's check is liveness (/health answers while the model loads); requests need
        # readiness, as a load balancer's check would
        ready = wait_ready(f"http://127.0.0.1:{PORT}", name)
        print(f"healthy {took:.1f} s and ready {took + ready:.1f} s after `docker run`")
        yield name
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def test_photo_chat_video_stream_and_a_bad_request(container, media):
    from openai import BadRequestError, OpenAI

    base = f"http://127.0.0.1:{PORT}"
    client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    photo = client.chat.completions.create(
        model="plm",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": media["photo"]}},
                    {"type": "text", "text": "What is in this photo?"},
                ],
            }
        ],
        max_tokens=8,
        temperature=0,
    )
    assert photo.choices[0].message.content and photo.usage.completion_tokens > 0
    assert photo.usage.prompt_tokens > 50  # the photo's tiles are in the prompt
    video = stream_chat(
        base,
        [
            {"type": "video_url", "video_url": {"url": media["video"]}},
            {"type": "text", "text": "What happens?"},
        ],
        max_tokens=8,
    )
    assert video["finish_reason"] == "length" and video["text"] and video["chunks"] > 3
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(
            model="plm",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    ],
                }
            ],
        )
    assert e.value.status_code == 400 and "image" in str(e.value.body).lower()


def test_runs_as_the_unprivileged_user_with_a_writable_cache(container):
    status = docker("exec", container, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {str(UID)}, uids  # PID 1 is plm-serve itself, as `plm`
    cmdline = docker("exec", container, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert "plm-serve" in cmdline[1] or "plm-serve" in cmdline[0], cmdline
    # the demo checkpoint was written into the volume, and the volume takes more
    listing = docker(
        "exec", container, "sh", "-c", "ls /cache/plm-serve && touch /cache/w && rm /cache/w"
    )
    assert listing.stdout.strip()


def test_docker_stop_drains_an_in_flight_stream(container, media):
    """SIGTERM while a stream runs: the stream completes, the container exits 0 within its grace."""
    base = f"http://127.0.0.1:{PORT}"
    streaming = threading.Event()
    result: dict = {}

    def run() -> None:
        try:
            result.update(
                stream_chat(base, "Count slowly.", 400, lambda n: n >= 5 and streaming.set())
            )
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = repr(e)
        finally:
            streaming.set()

    worker = threading.Thread(target=run)
    worker.start()
    assert streaming.wait(120)
    assert "error" not in result, result
    t0 = time.monotonic()
    docker("stop", container, timeout=120)  # SIGTERM, then SIGKILL after --stop-timeout 45
    stopped_s = time.monotonic() - t0
    worker.join(60)
    assert result.get("finish_reason") == "length", result
    state = json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert stopped_s < 45, stopped_s  # drained, not killed at the grace period's end
    print(f"docker stop took {stopped_s:.1f} s with a stream in flight")


# -- the compose stack -----------------------------------------------------------------------------

COMPOSE = REPO / "docker-compose.yml"
SERVED = "plm:e2e_request_latency_seconds_count"  # one per finished completion choice
BALANCER = "http://127.0.0.1:8000"  # HAProxy's published port in docker-compose.yml
ROUTER_STATS = "http://127.0.0.1:8404/stats;csv"


@pytest.fixture(scope="module")
def router_image(cpu_image, tmp_path_factory) -> str:
    """HAProxy from Debian's package (bookworm's 2.6, the release docker-compose.yml names) in an
    image built here, reading its file where the official image does. Its base is the Debian one
    docker_build.sh made."""
    have_base = docker("image", "inspect", "plm-base:bookworm", check=False).returncode == 0
    context = tmp_path_factory.mktemp("router-image")
    (context / "Dockerfile").write_text(
        f"FROM {'plm-base:bookworm' if have_base else cpu_image}\nUSER root\n"
        "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
        "--no-install-recommends haproxy >/dev/null && rm -rf /var/lib/apt/lists/*\n"
        "USER haproxy\nHEALTHCHECK NONE\n"
        'ENTRYPOINT ["haproxy", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]\nCMD []\n'
    )
    cli = sh("bash", str(REPO / "scripts" / "docker_env.sh"), "cli").stdout.strip()
    env = dict(os.environ, DOCKER_BUILDKIT="1")
    sh(cli, "build", "--network", "host", "-t", ROUTER_IMAGE, str(context), timeout=600, env=env)
    return ROUTER_IMAGE


class Stack:
    """docker-compose.yml's CPU profile under Compose v1, as one project of its own."""

    def __init__(self, compose: list[str], project: str):
        self.compose, self.project = compose, project

    def replicas(self) -> list[str]:
        """The plm-cpu containers (running or not), by name."""
        out = docker(
            "ps", "-a", "--format", "{{.Names}}",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", "label=com.docker.compose.service=plm-cpu",
        ).stdout  # fmt: skip
        return sorted(out.split())

    def served(self, container: str) -> float:
        """Completions the replica finished, from its /metrics (read inside its container)."""
        code = (
            "import urllib.request\nfor line in urllib.request.urlopen("
            f"'http://127.0.0.1:{PORT}/metrics', timeout=5).read().decode().splitlines():\n"
            f"    if line.startswith('{SERVED} '): print(line.split()[-1])"
        )
        return float(docker("exec", container, "python", "-c", code).stdout)

    def router_status(self) -> list[str]:
        """HAProxy's view of the replicas DNS names: UP or DOWN, one per filled server slot
        (empty slots and replicas DNS no longer names are in maintenance and left out)."""
        try:
            rows = httpx.get(ROUTER_STATS, timeout=5).text.splitlines()
        except httpx.HTTPError:
            return []
        if not rows:
            return []
        head = rows[0].lstrip("# ").split(",")
        cells = [dict(zip(head, row.split(","), strict=False)) for row in rows[1:]]
        return sorted(
            c["status"]
            for c in cells
            if c.get("pxname") == "plm"
            and c.get("svname") != "BACKEND"
            and not c.get("status", "").startswith("MAINT")
        )

    def wait(self, what, want, timeout_s: float = 300) -> None:
        deadline, got = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            got = what()
            if got == want:
                return
            time.sleep(0.5)
        logs = docker("logs", "--tail", "30", self.project + "_router_1", check=False)
        raise AssertionError(f"{what.__name__}: {got}, expected {want}\n{logs.stderr[-3000:]}")

    def health(self) -> list[str]:
        return sorted(
            json.loads(docker("inspect", "-f", "{{json .State}}", c).stdout)
            .get("Health", {})
            .get("Status", "none")
            for c in self.replicas()
        )


def served_model() -> str:
    """The model name the stack's replicas serve (the file's command sets none)."""
    (model,) = httpx.get(f"{BALANCER}/v1/models", timeout=10).json()["data"]
    return model["id"]


def post_many(n: int) -> list[int]:
    """n chats, each its own conversation (X-Session-Id): spread over the replicas by the hash."""
    body = {
        "model": served_model(),
        "messages": [{"role": "user", "content": "Hi."}],
        "max_tokens": 3,
    }
    return [
        httpx.post(
            f"{BALANCER}/v1/chat/completions",
            json=body,
            headers={"X-Session-Id": f"conversation-{uuid.uuid4().hex}"},
            timeout=60,
        ).status_code
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def stack(cpu_image, router_image, tmp_path_factory) -> Iterator[Stack]:
    if shutil.which("docker-compose") is None:
        pytest.skip("no docker-compose (Compose v1): bash scripts/docker_env.sh install")
    for port in (8000, 8404):
        if not port_free(port):
            pytest.skip(f"port {port}, which docker-compose.yml publishes, is taken here")
    # The test's override: locally built images only. The stack keeps its own network (two
    # replicas of one service cannot share the host network's port 8000); the test's traffic goes
    # to the ports it publishes on this machine.
    override = tmp_path_factory.mktemp("compose") / "compose.test.yml"
    override.write_text(
        f"services:\n  router:\n    image: {router_image}\n  plm-cpu:\n    image: {cpu_image}\n"
    )
    project = f"plmtest{uuid.uuid4().hex[:6]}"
    compose = ["docker-compose", "-p", project, "-f", str(COMPOSE), "-f", str(override)]
    compose += ["--profile", "cpu"]
    t0 = time.monotonic()
    sh(*compose, "up", "-d", "--no-build", timeout=600, cwd=REPO)
    s = Stack(compose, project)
    try:
        assert len(s.replicas()) == 2, s.replicas()  # deploy.replicas, as the file says
        s.wait(s.health, ["healthy", "healthy"])
        s.wait(s.router_status, ["UP", "UP"])
        print(f"two replicas healthy and routed {time.monotonic() - t0:.0f} s after `up`")
        yield s
    finally:
        sh(*compose, "down", "-v", "--remove-orphans", "-t", "5", timeout=300, check=False)


def test_requests_through_the_balancer_reach_both_replicas(stack):
    before = {c: stack.served(c) for c in stack.replicas()}
    assert post_many(16) == [200] * 16
    after = {c: stack.served(c) for c in stack.replicas()}
    assert sum(after.values()) - sum(before.values()) == 16
    # 16 conversations hashed over two replicas: both get some (all on one: 1 in ~33,000)
    assert all(after[c] > before[c] for c in after), (before, after)


def test_sse_arrives_unbuffered_through_the_stack(stack):
    arrivals: list[float] = []
    t0 = time.perf_counter()
    body = {
        "model": served_model(),
        "messages": [{"role": "user", "content": "Hello."}],
        "max_tokens": 300,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{BALANCER}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        last = ""
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.perf_counter() - t0)
                last = line
    assert last == "data: [DONE]"
    total = arrivals[-1]
    assert total > 0.5, f"the stream took {total:.2f} s: too short to tell streaming from buffering"
    assert arrivals[1] < 0.25 * total, f"first token chunk at {arrivals[1]:.2f} s of {total:.2f} s"
    assert len({int(t / 0.05) for t in arrivals}) >= 10  # spread out, not delivered at once


def test_a_killed_replica_leaves_requests_succeeding_and_rejoins_when_ready(stack):
    victim, survivor = stack.replicas()
    docker("kill", victim)  # SIGKILL, mid-run
    assert post_many(6) == [200] * 6  # before the health check noticed: retried on the survivor
    stack.wait(stack.router_status, ["UP"], timeout_s=30)  # HAProxy drops what Docker stopped
    assert post_many(6) == [200] * 6
    docker("start", victim)
    # back in the balancer only once its health check (/ready) passes
    stack.wait(stack.health, ["healthy", "healthy"])
    stack.wait(stack.router_status, ["UP", "UP"], timeout_s=30)
    before = stack.served(victim)
    assert post_many(16) == [200] * 16
    assert stack.served(victim) > before
