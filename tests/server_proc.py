"""Starts the real `python -m server` process on a free loopback port for end-to-end tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
from conftest import REPO, checkpoint_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    *extra: str, model_name: str = "plm-test", timeout_s: float = 120
) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a server on the tiny checkpoint, once /ready answers 200 (model loaded)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--model",
        str(checkpoint_path("tiny")),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--served-model-name",
        model_name,
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
