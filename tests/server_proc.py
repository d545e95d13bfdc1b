"""Starts the real `python -m server` process on a free loopback port for end-to-end tests.

The server's output goes to a temporary file, not a pipe nobody reads, so a chatty server can
never block on a full pipe; `server_output(proc)` reads it back.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time

import httpx
from support import REPO, checkpoint_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_output(proc: subprocess.Popen) -> str:
    """What the server printed so far (stdout and stderr together)."""
    log = getattr(proc, "log_file", None)
    if log is None:
        return ""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")


def spawn(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Popen with stdout and stderr going to a temporary file (kept as `proc.log_file`)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, **kwargs)
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def server_command(port: int, *extra: str, model_name: str = "plm-test") -> list[str]:
    """`python -m server` on the tiny checkpoint, CPU, quiet, on `port`, plus `extra` options."""
    model = str(checkpoint_path("tiny"))
    quiet = ["--device", "cpu", "--served-model-name", model_name, "--log-level", "warning"]
    return [sys.executable, "-m", "server", "--model", model, "--port", str(port), *quiet, *extra]


def start_server(
    *extra: str, model_name: str = "plm-test", timeout_s: float = 120
) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a server on the tiny checkpoint, once /ready answers 200."""
    port = free_port()
    cmd = server_command(port, *extra, model_name=model_name)
    proc = spawn(cmd)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {server_output(proc)[-2000:]}")
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start: {server_output(proc)[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
