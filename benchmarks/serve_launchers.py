"""The servers the serving benchmark starts (plm-serve, the HF baseline, the real `transformers
serve`) and the request dialect each one speaks.

Each launched server gets the checkpoint, a free loopback port and its default flags; the only
flags set are those it needs to run here at all (device and dtype, host and port), and the report
names them. `transformers serve` is the CLI from the installed transformers, started offline on the
local checkpoint (its FORCE_MODEL argument) with an empty hub cache of its own: it lists that cache
on GET /v1/models and fails when the folder is missing. It loads with `device_map`, which needs the
`accelerate` package; directories given with --transformers-serve-pythonpath are put on its
PYTHONPATH (e.g. one made with `pip install --target DIR accelerate psutil`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SERVER_KINDS = ("plm-serve", "hf-baseline", "transformers-serve")


# -- what each server accepts ----------------------------------------------------------------------
@dataclass(frozen=True)
class Dialect:
    """What a kind of server accepts beyond OpenAI's chat completions, and how its streams end."""

    # how every request is made to produce exactly max_tokens tokens: "ignore_eos" (vLLM's field),
    # "generation_config" (transformers serve's own field, a JSON GenerationConfig with
    # min_new_tokens), or "" (no way)
    fixed_length: str = "ignore_eos"
    sends_done: bool = True  # the stream ends with `data: [DONE]`
    stream_options: bool = True  # honours stream_options.include_usage (else sends usage anyway)

    def describe(self) -> str:
        """One line for the report: how fixed-length outputs were asked for."""
        if self.fixed_length == "ignore_eos":
            return "`ignore_eos: true` (honoured)"
        if self.fixed_length == "generation_config":
            return (
                "no `ignore_eos` or `min_tokens` (HTTP 422: unexpected field); sent its own "
                "`generation_config` field with `min_new_tokens` = `max_new_tokens` = max_tokens"
            )
        return "nothing: outputs may stop early at end-of-sequence"


OPENAI = Dialect()
DIALECTS = {
    "plm-serve": OPENAI,
    "hf-baseline": OPENAI,
    "transformers-serve": Dialect("generation_config", sends_done=False, stream_options=False),
}


# the flags a launched server gets besides the checkpoint and its port, and why
FLAGS_SET = {
    "plm-serve": "`--device` (where to run), `--served-model-name`, `--log-level warning`",
    "hf-baseline": "`--device` (where to run; fp32 on CPU, bf16 on GPU), `--served-model-name`, "
    "`--log-level warning`",
    "transformers-serve": "`--device` (where to run), `--dtype` (plm-serve's default on that "
    "device: float32 on CPU, bfloat16 on GPU; its own `auto` takes the checkpoint's), `--host "
    "127.0.0.1` (its default `localhost` may resolve to ::1); no `--continuous-batching` (off by "
    "default)",
}


def dialect_for(name: str) -> Dialect:
    """The dialect of a target: its kind's if the name is a server kind, else OpenAI's."""
    return DIALECTS.get(name, OPENAI)


def chat_body(
    messages: list[dict], model: str, max_tokens: int, dialect: Dialect, fixed_length: bool = True
) -> dict:
    """A greedy streamed chat completion request in the target's dialect."""
    body: dict = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if dialect.stream_options:
        body["stream_options"] = {"include_usage": True}
    if fixed_length and dialect.fixed_length == "ignore_eos":
        body["ignore_eos"] = True
    elif fixed_length and dialect.fixed_length == "generation_config":
        body["generation_config"] = json.dumps(
            {"min_new_tokens": max_tokens, "max_new_tokens": max_tokens}
        )
    return body


# -- commands --------------------------------------------------------------------------------------
@dataclass
class Target:
    """A server under test: a base URL, or a kind this script starts."""

    name: str
    url: str | None = None
    launch: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformers_cli() -> str | None:
    """The `transformers` console script beside this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "transformers"
    return str(beside) if beside.exists() else shutil.which("transformers")


def server_command(
    kind: str, model: str, port: int, name: str, extra: list[str], device: str = "cpu"
) -> list[str]:
    """The command line that starts a server of this kind on the checkpoint at 127.0.0.1:port."""
    if kind == "transformers-serve":
        # its --dtype auto is the checkpoint's dtype; plm-serve's auto is fp32 on CPU, bf16 on GPU
        dtype = "float32" if device == "cpu" else "bfloat16"
        cli = transformers_cli() or "transformers"
        return [
            *(cli, "serve", model, "--device", device, "--dtype", dtype),
            *("--host", "127.0.0.1", "--port", str(port), *extra),
        ]
    if kind == "plm-serve":
        head = [sys.executable, "-m", "server"]
    elif kind == "hf-baseline":
        head = [sys.executable, str(REPO / "benchmarks" / "hf_baseline_server.py")]
    else:
        raise ValueError(f"unknown server kind {kind!r}: one of {', '.join(SERVER_KINDS)}")
    return [
        *head,
        "--model",
        model,
        "--port",
        str(port),
        "--device",
        device,
        "--served-model-name",
        name,
        "--log-level",
        "warning",
        *extra,
    ]


def transformers_serve_env(hf_home: Path, pythonpath: list[str]) -> dict[str, str]:
    """The variables `transformers serve` runs with: offline, an empty hub cache of its own, and
    the extra import directories."""
    hub = hf_home / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return env


def transformers_serve_problem(pythonpath: list[str]) -> str | None:
    """Why `transformers serve` cannot start here, or None if it can."""
    if transformers_cli() is None:
        return "the `transformers` CLI is not installed beside this Python nor on PATH"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)} if pythonpath else None
    probe = subprocess.run(
        [sys.executable, "-c", "import accelerate, fastapi, uvicorn, openai"],
        env=env,
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        missing = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "?"
        return (
            f"`transformers serve` cannot load a model here ({missing}): it loads with device_map, "
            "which needs `accelerate` (pip install accelerate psutil, or --target DIR and pass DIR "
            "with --transformers-serve-pythonpath)"
        )
    return None


# -- processes -------------------------------------------------------------------------------------
def start_server(
    cmd: list[str],
    base: str,
    ready_paths: list[str],
    log_path: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Starts a server (output to log_path; env added to this process's environment); waits until
    every path in ready_paths answers 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None,
        )
    deadline = time.time() + timeout_s
    pending = list(ready_paths)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited ({proc.returncode}); last log lines:\n"
                + log_path.read_text(errors="replace")[-2000:]
            )
        if time.time() > deadline:
            stop_server(proc)
            raise RuntimeError(f"server not ready within {timeout_s:.0f} s: {shlex.join(cmd)}")
        try:
            if httpx.get(base + pending[0], timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def served_model(base: str) -> str:
    """The first model id of the server's /v1/models."""
    resp = httpx.get(f"{base}/v1/models", timeout=30)
    models = resp.json().get("data") if resp.status_code == 200 else None
    if not models:
        raise RuntimeError(
            f"{base}/v1/models lists no model (HTTP {resp.status_code}): give --model-name"
        )
    return models[0]["id"]


@dataclass
class Launched:
    """A server this script started: where it listens, what to call the model, how it was run."""

    kind: str
    proc: subprocess.Popen
    base: str
    model: str  # the model name requests carry
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # variables set besides the inherited ones
    scratch: str | None = None  # a temporary folder removed at stop

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "command": self.command,
            "env": self.env,
            "model": self.model,
            "flags_set": FLAGS_SET[self.kind],
        }


def launch(
    kind: str,
    checkpoint: str,
    *,
    device: str,
    served_name: str,
    extra: list[str],
    log_path: Path,
    timeout_s: float,
    pythonpath: list[str] | None = None,
) -> Launched:
    """Starts a server of this kind on the checkpoint and waits until it is ready."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = server_command(kind, checkpoint, port, served_name, extra, device)
    env: dict[str, str] = {}
    scratch = None
    if kind == "transformers-serve":
        problem = transformers_serve_problem(pythonpath or [])
        if problem:
            raise RuntimeError(problem)
        scratch = tempfile.mkdtemp(prefix="transformers-serve-home-")
        env = transformers_serve_env(Path(scratch), pythonpath or [])
    ready = ["/health", "/ready"] if kind == "plm-serve" else ["/health"]
    print(f"[{kind}] starting: {shlex.join(cmd)}", file=sys.stderr)
    try:
        proc = start_server(cmd, base, ready, log_path, timeout_s, env)
    except BaseException:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    # transformers serve is pinned to its FORCE_MODEL and takes that string (or no model) only
    model = checkpoint if kind == "transformers-serve" else served_name
    return Launched(kind, proc, base, model, cmd, env, scratch)


def stop(launched: Launched) -> None:
    stop_server(launched.proc)
    if launched.scratch:
        shutil.rmtree(launched.scratch, ignore_errors=True)


@dataclass
class Opened:
    """A target ready for requests: its base URL, model name and dialect; `launched` if this script
    started it (stop it with close_target)."""

    name: str
    base: str
    model: str
    dialect: Dialect
    launched: Launched | None = None


def open_target(target: Target, args, log_dir: Path) -> Opened:
    """Starts the target if it is one to launch (from the CLI's arguments), and names its model."""
    if not target.launch:
        assert target.url is not None
        model = args.model_name or served_model(target.url)
        return Opened(target.name, target.url, model, dialect_for(target.name))
    extra = shlex.split(args.plm_serve_args) if target.launch == "plm-serve" else []
    launched = launch(
        target.launch,
        args.model,
        device=args.device,
        served_name=args.served_model_name,
        extra=extra,
        log_path=log_dir / f"{target.name}.log",
        timeout_s=args.startup_timeout,
        pythonpath=[p for p in args.transformers_serve_pythonpath.split(os.pathsep) if p],
    )
    model = args.model_name or launched.model
    return Opened(target.name, launched.base, model, DIALECTS[target.launch], launched)


def shown_command(server: dict) -> str:
    """A launched server's command line for a report: its variables first, paths from the
    repository root, the temporary HF home folder named as such."""
    env = server.get("env") or {}
    home = env.get("HF_HOME")
    shown = [f"{k}={v.replace(home, '<temporary folder>') if home else v}" for k, v in env.items()]
    return " ".join([*shown, shlex.join(server["command"]).replace(f"{REPO}/", "")])


def close_target(opened: Opened) -> None:
    if opened.launched is not None:
        stop(opened.launched)
