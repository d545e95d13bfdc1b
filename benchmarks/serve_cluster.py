"""Several plm-serve replicas behind a real balancer, on loopback: for the multi-turn benchmark and
the router tests.

Balancers (each an existing binary, run on its own configuration):
- `haproxy`: deploy/haproxy/haproxy.cfg as committed (consistent hashing on the routing key), with
  only addresses changed: the `bind` ports and one `server` line per replica instead of the DNS
  `server-template`. `haproxy-rr` is the same file with `balance roundrobin`.
- `vllm-router`: `vllm-router --policy consistent_hash` (X-Session-ID header, else the body's
  `user`, else a hash of the whole body), health checks on /ready.
- `sglang-router`: `sglang-router launch --policy cache_aware` (a prefix tree of each request's
  text).
- `direct`: no balancer, one replica's own URL.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from serve_launchers import REPO, free_port, server_command, start_server, stop_server

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
BALANCERS = ("direct", "haproxy", "haproxy-rr", "vllm-router", "sglang-router")
SERVED = "plm:e2e_request_latency_seconds_count"  # one per finished completion choice
SERVED_NAME = "plm-bench"  # the model name every replica serves


@dataclass
class Replica:
    """One plm-serve process: its name on the balancer (r0, r1, ...), URL and process."""

    name: str
    base: str
    proc: subprocess.Popen

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on this replica's /metrics (0 when absent)."""
        total = 0.0
        for line in httpx.get(f"{self.base}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_replica(
    name: str, model: str, port: int, log_dir: Path, extra: list[str], timeout_s: float = 300
) -> Replica:
    """One plm-serve replica on `port` (a restart: the port it had), once /ready answers."""
    base = f"http://127.0.0.1:{port}"
    cmd = server_command("plm-serve", model, port, SERVED_NAME, extra)
    proc = start_server(cmd, base, ["/ready"], log_dir / f"replica-{name}.log", timeout_s)
    return Replica(name, base, proc)


def start_replicas(
    model: str, n: int, log_dir: Path, extra: list[str], timeout_s: float = 300
) -> list[Replica]:
    """n plm-serve replicas on free ports, started together; all ready or none left running."""

    def one(i: int) -> Replica:
        return start_replica(f"r{i}", model, free_port(), log_dir, extra, timeout_s)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
    replicas = [f.result() for f in futures if f.exception() is None]
    if len(replicas) < n:
        stop_replicas(replicas)
        raise next(f.exception() for f in futures if f.exception() is not None)
    return replicas


def stop_replicas(replicas: list[Replica]) -> None:
    for r in replicas:
        if r.alive:
            stop_server(r.proc)


# -- balancers -------------------------------------------------------------------------------------
def haproxy_config(replicas: list[Replica], port: int, stats_port: int, policy: str = "") -> str:
    """deploy/haproxy/haproxy.cfg with loopback addresses: the API on `port`, the stats page on
    `stats_port`, and a `server` line per replica (named like the replica) for the DNS template.
    policy: a `balance` line to use instead of the file's (e.g. "roundrobin")."""
    text = HAPROXY_CFG.read_text()
    text, n_api = re.subn(r"(?m)^(\s+)bind :8000$", rf"\1bind 127.0.0.1:{port}", text)
    text, n_stats = re.subn(r"(?m)^(\s+)bind :8404$", rf"\1bind 127.0.0.1:{stats_port}", text)
    servers = "\n".join(f"    server {r.name} {r.base.removeprefix('http://')}" for r in replicas)
    text, n_srv = re.subn(r"(?m)^\s+server-template .*$", servers, text)
    if policy:
        text, n_bal = re.subn(r"(?m)^(\s+)balance .*$", rf"\1balance {policy}", text)
        assert n_bal == 1
    if (n_api, n_stats, n_srv) != (1, 1, 1):
        raise RuntimeError(f"{HAPROXY_CFG} no longer has the lines this script rewrites")
    return text


def router_binary(name: str) -> str | None:
    """A console script installed beside this Python, else on PATH."""
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which(name, path=scripts)
        if found:
            return found
    return shutil.which(name)


def balancer_problem(kind: str) -> str | None:
    """Why this balancer cannot run here, or None."""
    binary = {"haproxy": "haproxy", "haproxy-rr": "haproxy"}.get(kind, kind)
    if kind != "direct" and router_binary(binary) is None:
        how = {
            "haproxy": "apt-get install haproxy",
            "vllm-router": "pip install vllm-router",
            "sglang-router": "pip install sglang-router",
        }[binary]
        return f"`{binary}` is not installed ({how})"
    return None


@dataclass
class Balancer:
    """A running balancer: where clients send requests, and what to stop."""

    kind: str
    url: str
    replicas: list[Replica]
    proc: subprocess.Popen | None = None
    stats: str | None = None  # HAProxy's stats page (CSV at stats + ";csv")
    log: Path | None = None
    notes: list[str] = field(default_factory=list)

    def server_status(self) -> dict[str, str]:
        """HAProxy's view of each replica by name: UP, DOWN, MAINT, ..."""
        if self.stats is None:
            return {}
        rows = httpx.get(self.stats + ";csv", timeout=5).text.splitlines()
        head = rows[0].lstrip("# ").split(",")
        out = {}
        for row in rows[1:]:
            cells = dict(zip(head, row.split(","), strict=False))
            if cells.get("pxname") == "plm" and cells.get("svname") not in ("BACKEND", None):
                out[cells["svname"]] = cells["status"].split(" ")[0]
        return out

    def wait_status(self, want: dict[str, str], timeout_s: float = 20) -> None:
        deadline, status = time.time() + timeout_s, {}
        while time.time() < deadline:
            try:
                status = self.server_status()
            except httpx.HTTPError:
                pass
            if all(status.get(k) == v for k, v in want.items()):
                return
            time.sleep(0.05)
        raise AssertionError(f"the balancer reports {status}, expected {want}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_answers(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"balancer exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"balancer at {url} not answering within {timeout_s:.0f} s")


def start_balancer(kind: str, replicas: list[Replica], work_dir: Path) -> Balancer:
    """Starts `kind` in front of the replicas; returns once it routes to all of them."""
    if kind == "direct":
        return Balancer(kind, replicas[0].base, replicas[:1])
    problem = balancer_problem(kind)
    if problem:
        raise RuntimeError(problem)
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work_dir / f"{kind}.log"
    urls = [r.base for r in replicas]
    stats = None
    if kind in ("haproxy", "haproxy-rr"):
        stats_port = free_port()
        stats = f"http://127.0.0.1:{stats_port}/stats"
        cfg = work_dir / f"{kind}.cfg"
        policy = "roundrobin" if kind == "haproxy-rr" else ""
        cfg.write_text(haproxy_config(replicas, port, stats_port, policy))
        cmd = [router_binary("haproxy"), "-db", "-f", str(cfg)]
    elif kind == "vllm-router":
        cmd = [
            *(router_binary("vllm-router"), "--host", "127.0.0.1", "--port", str(port)),
            *("--worker-urls", *urls, "--policy", "consistent_hash"),
            *("--health-check-endpoint", "/ready", "--prometheus-port", str(free_port())),
        ]
    elif kind == "sglang-router":
        cmd = [
            router_binary("sglang-router"),
            "launch",
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--worker-urls", *urls, "--policy", "cache_aware"),
            *("--health-check-endpoint", "/ready", "--prometheus-port", str(free_port())),
        ]
    else:
        raise ValueError(f"unknown balancer {kind!r}: one of {', '.join(BALANCERS)}")
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    bal = Balancer(kind, url, replicas, proc, stats, log)
    try:
        _wait_answers(url, proc, log, 60)
        if stats:
            bal.wait_status({r.name: "UP" for r in replicas})
    except BaseException:
        bal.stop()
        raise
    return bal


def served_counts(replicas: list[Replica]) -> list[float]:
    """Completions each live replica has finished so far (None-free: a dead replica counts 0)."""
    return [r.metric(SERVED) if r.alive else 0.0 for r in replicas]
