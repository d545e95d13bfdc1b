"""Deployment files: Dockerfile, docker-compose.yml, deploy/ (HAProxy, k8s, Prometheus, Grafana).

Each file is parsed and checked against the server it runs (its CLI flags, port, routes and metric
names), and the Dockerfile's own commands run here: its wheel build, its ENTRYPOINT + CMD on the
demo checkpoint and its HEALTHCHECK, so this test breaks when the Dockerfile changes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from server_proc import free_port
from support import REPO, checkpoint_path

DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
PLM_SERVICES = ("plm-gpu0", "plm-gpu1", "plm-cpu")
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
# apt packages only a build needs: none may reach the final image
BUILD_PACKAGES = {
    "build-essential",
    "gcc",
    "g++",
    "clang",
    "make",
    "cmake",
    "ninja-build",
    "git",
    "cuda-toolkit",
    "cuda-nvcc",
    "python3-pip",
    "python3-venv",
}


# --- a small Dockerfile parser --------------------------------------------------------------------


@dataclass
class Stage:
    name: str | None
    base: str  # the FROM argument, variables not yet expanded
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]

    def one(self, instruction: str) -> str:
        found = self.all(instruction)
        assert len(found) == 1, f"{instruction} appears {len(found)} times in stage {self.name}"
        return found[0]


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARGs (before the first FROM) and their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def chain(self, name: str, **build_args: str) -> tuple[list[Stage], str]:
        """The stages a stage builds on (itself first) and the external image at the bottom."""
        values = {**self.args, **build_args}
        stages, stage = [], self.stage(name)
        while True:
            stages.append(stage)
            base = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], stage.base
            )
            if not any(s.name == base for s in self.stages):
                return stages, base
            stage = self.stage(base)


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped (also inside continuations,
    as Docker does)."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            logical.append(current + line)
            current = ""
    args, stages = {}, []
    for line in logical:
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            base, _, name = rest.partition(" AS ")
            stages.append(Stage(name.strip() or None, base.strip()))
        elif instruction == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return Dockerfile(args, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_healthcheck(compose: dict, service: str) -> list[str]:
    test = compose["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return test[1:]


def exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD in exec (JSON) form: no shell between Docker and plm-serve for SIGTERM."""
    assert args.startswith("["), f"not in exec form: {args}"
    return json.loads(args)


def healthcheck_command(df: Dockerfile) -> list[str]:
    args = df.stages[-1].one("HEALTHCHECK")
    return exec_form(args[args.index("CMD") + 3 :].strip())


def entrypoint_and_cmd(df: Dockerfile) -> list[str]:
    final = df.stages[-1]
    return exec_form(final.one("ENTRYPOINT")) + exec_form(final.one("CMD"))


def server_args(argv: list[str]):
    """plm-serve's own parser on a command line: unknown flags fail here as in the container."""
    from server.config import parse_config

    assert argv[0] == "plm-serve"
    return parse_config(argv[1:])


def apt_packages(run: str) -> list[str]:
    packages = []
    for command in re.split(r"&&|;", run):
        words = command.split()
        if words[:2] == ["apt-get", "install"]:
            packages += [w for w in words[2:] if not w.startswith("-")]
    return packages


# --- the Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_stages_and_bases(dockerfile):
    final = dockerfile.stages[-1]
    assert any(args.startswith("--from=builder ") for args in final.all("COPY")), (
        "the final stage copies the build"
    )
    cuda_stages, cuda_image = dockerfile.chain(final.name)
    assert dockerfile.args["VARIANT"] == "cuda"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(base|runtime)-ubuntu[\d.]+", cuda_image), cuda_image
    _, cpu_image = dockerfile.chain(final.name, VARIANT="cpu")
    assert "nvidia" not in cpu_image and cpu_image.startswith("ubuntu:"), cpu_image
    # builder and image share their base, so the copied virtualenv finds the same /usr/bin/python3
    builder_stages, _ = dockerfile.chain("builder")
    assert builder_stages[1] is cuda_stages[1]


def test_dockerfile_final_stage_has_no_build_tools(dockerfile):
    stages, image = dockerfile.chain(dockerfile.stages[-1].name)
    assert "devel" not in image
    runs = [run for s in stages for run in s.all("RUN")]
    packages = [p for run in runs for p in apt_packages(run)]
    assert packages, "the base installs Python with apt-get"
    tools = [p for p in packages if p in BUILD_PACKAGES or p.endswith("-dev")]
    assert not tools, f"build tools in the final image: {tools}"
    assert not any("pip " in run for run in runs), (
        "the final stage copies the virtualenv instead of installing"
    )


def test_dockerfile_runtime_settings(dockerfile):
    final = dockerfile.stages[-1]
    user = final.all("USER")[-1]
    assert user not in ("root", "0")
    uid = re.search(r"useradd .*--uid (\d+) .*\b" + user + r"\b", " ".join(final.all("RUN")))
    assert uid and int(uid.group(1)) >= 1000
    volume = json.loads(final.one("VOLUME"))
    assert volume == ["/cache"]
    env = " ".join(final.all("ENV"))
    assert "HF_HOME=/cache/" in env, "the hub cache lives on the volume"
    assert "PLM_SERVE_CACHE=/cache/" in env, "so do the --demo checkpoints"
    # the dependencies' virtualenv and the project beside it, both on PATH, the project importable
    assert "--from=builder /opt/venv /opt/venv" in final.all("COPY")
    assert "--from=builder /opt/plm-serve /opt/plm-serve" in final.all("COPY")
    assert "PATH=/opt/plm-serve/bin:/opt/venv/bin:" in env
    assert "PYTHONPATH=/opt/plm-serve " in env + " "
    argv = entrypoint_and_cmd(dockerfile)
    assert argv[0] == "plm-serve"
    args = server_args(argv)
    assert args.host == "0.0.0.0"
    assert final.one("EXPOSE") == str(args.port)
    check = " ".join(healthcheck_command(dockerfile))
    assert f"http://127.0.0.1:{args.port}/health" in check


def test_dockerfile_cpu_variant_uses_the_cpu_torch_index(dockerfile):
    builder = dockerfile.stage("builder")
    defaults = dict(a.partition("=")[::2] for a in builder.all("ARG"))
    assert defaults["CPU_TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert defaults["PIP_INDEX_URL"] == "https://pypi.org/simple"
    install = dependency_install(dockerfile)
    assert (
        'export PIP_EXTRA_INDEX_URL="$PIP_INDEX_URL $PIP_EXTRA_INDEX_URL" '
        'PIP_INDEX_URL="$CPU_TORCH_INDEX"' in install
    )


def dependency_install(dockerfile) -> str:
    """The builder's RUN that installs the dependencies (from pyproject.toml, before the code)."""
    builder = dockerfile.stage("builder")
    return next(run for run in builder.all("RUN") if "pip install -r" in run)


def test_dependencies_install_before_the_code_is_copied(dockerfile):
    """A code change must not invalidate the dependency layer: only pyproject.toml comes first."""
    steps = dockerfile.stage("builder").instructions
    copies = [i for i, (ins, _) in enumerate(steps) if ins == "COPY"]
    install = next(i for i, (ins, a) in enumerate(steps) if ins == "RUN" and "pip install -r" in a)
    assert steps[copies[0]][1].split() == ["pyproject.toml", "./"]
    assert copies[0] < install < copies[1]
    tomllib = pytest.importorskip("tomllib")  # the image's Python has it (3.11+)
    # the list installed is the project's dependencies as pyproject.toml gives them
    code = install_requirements_code(steps[install][1])
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert done.stdout.splitlines() == deps


def install_requirements_code(run: str) -> str:
    """The Python one-liner in the dependency RUN that prints the requirements."""
    argv = shlex.split(run)
    return argv[argv.index("-c") + 1]


def test_cpu_image_drops_triton_which_structured_outputs_never_import(dockerfile):
    install = dependency_install(dockerfile)
    assert 'if [ "$VARIANT" = cpu ]; then python -m pip uninstall -y triton; fi' in install
    # triton is hidden as if it were not installed (torch and xgrammar import it only when present)
    code = (
        "import sys\nclass NoTriton:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "from plm_core.llm import LLM\n"
        "from plm_core.sampling import SamplingParams, StructuredOutput\n"
        f"llm = LLM({str(checkpoint_path('tiny'))!r}, device='cpu')\n"
        "out = llm.chat([{'role': 'user', 'content': 'x'}], "
        "SamplingParams(max_tokens=8, structured_output="
        "StructuredOutput(choice=('yes', 'no'))))[0].outputs[0]\n"
        "assert out.text in ('yes', 'no'), out.text\nassert 'triton' not in sys.modules"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_dockerignore_keeps_what_the_build_copies(dockerfile):
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", ".cache"} <= ignored
    for args in dockerfile.stage("builder").all("COPY"):
        for source in args.split()[:-1]:
            assert source not in ignored and source.rstrip("/") not in ignored, source


def test_dockerfile_wheel_build_runs_here(dockerfile, tmp_path):
    """The builder's COPY lines and `pip wheel` command, run on this checkout."""
    builder = dockerfile.stage("builder")
    src = tmp_path / "src"
    src.mkdir()
    assert builder.one("WORKDIR") == "/src"
    for args in builder.all("COPY"):
        *sources, dest = args.split()
        for source in sources:
            target = src / dest if dest != "./" else src / source
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / source, target)
    wheel_run = next(run for run in builder.all("RUN") if "pip wheel" in run)
    argv = shlex.split(wheel_run)
    assert argv[:4] == ["python", "-m", "pip", "wheel"] and "--no-deps" in argv
    wheels = argv[argv.index("--wheel-dir") + 1]
    argv = [sys.executable] + argv[1:]
    argv[argv.index(wheels)] = str(tmp_path / "wheels")
    done = subprocess.run(argv, cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("plm_serve-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(
            next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        ).decode()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert re.search(r"^plm-serve = server\.cli:main$", entry_points, re.M)
    modules = {
        p.relative_to(src).as_posix()
        for package in ("plm_core", "server")
        for p in (src / package).rglob("*.py")
    }
    assert modules and modules <= names, sorted(modules - names)
    assert "Requires-Dist: torch==2.14.1" in metadata


def plm_serve_executable() -> str:
    found = shutil.which("plm-serve", path=sysconfig.get_path("scripts")) or shutil.which(
        "plm-serve", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("plm-serve is not installed in this environment (pip install -e .)")
    return found


def run_check(command: list[str]) -> int:
    return subprocess.run(command, capture_output=True, timeout=30).returncode


def check_here(command: list[str], image_port: int, port: int) -> list[str]:
    """A container health check (`python -c ...` on the image's port) for a server on this port,
    with this Python."""
    assert command[0] == "python"
    return [sys.executable] + [a.replace(f":{image_port}/", f":{port}/") for a in command[1:]]


def wait_until_passes(command: list[str], proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while run_check(command) != 0:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline, f"never passed: {command}"
        time.sleep(0.5)


def test_dockerfile_entrypoint_and_healthchecks_run_here(dockerfile, compose, tmp_path):
    """The image's ENTRYPOINT + CMD with the demo checkpoint (as the compose cpu profile adds), on
    loopback, watched by the image's HEALTHCHECK (liveness) and by the readiness check
    docker-compose.yml puts instead. The image's cache variables point into a temporary folder
    standing in for the /cache volume."""
    port = free_port()
    env = dict(os.environ)
    for assignment in re.findall(r"(\w+)=(/cache\S*)", " ".join(dockerfile.stages[-1].all("ENV"))):
        name, value = assignment
        env[name] = str(tmp_path / value.lstrip("/"))
    argv = entrypoint_and_cmd(dockerfile) + ["--demo", "tiny", "--device", "cpu"]
    image_port = server_args(argv).port
    argv[0] = plm_serve_executable()
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    liveness = check_here(healthcheck_command(dockerfile), image_port, port)
    readiness = check_here(compose_healthcheck(compose, "plm-cpu"), image_port, port)
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_until_passes(liveness, proc)  # the port is open; the model may still be loading
        wait_until_passes(readiness, proc)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "plm-demo-tiny"
        # the demo checkpoint was built into the cache volume
        checkpoints = tmp_path / "cache" / "plm-serve" / "checkpoints"
        assert list(checkpoints.glob("tiny-*/config.json"))
        proc.send_signal(signal.SIGTERM)  # docker stop
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert run_check(liveness) != 0 and run_check(readiness) != 0, (
            "a check passes with no server"
        )
    finally:
        if proc.poll() is None:
            proc.kill()


# --- docker-compose.yml and the HAProxy file ---------------------------------------------------


def load(path: Path):
    return yaml.safe_load(path.read_text())


def test_compose_replicas_and_profiles(compose):
    services = compose["services"]
    assert set(PLM_SERVICES) <= set(services)
    gpus = []
    for name in ("plm-gpu0", "plm-gpu1"):
        service = services[name]
        assert service["profiles"] == ["gpu"] and service["build"]["args"]["VARIANT"] == "cuda"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)) == 2, "each GPU replica gets its own device"
    cpu = services["plm-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert cpu["deploy"]["replicas"] >= 2
    assert server_args(["plm-serve"] + cpu["command"]).demo == "tiny"
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    assert "profiles" not in services["router"]


def test_compose_replicas_match_the_server(compose, dockerfile):
    entrypoint = exec_form(dockerfile.stages[-1].one("ENTRYPOINT"))
    for name in PLM_SERVICES:
        service = compose["services"][name]
        args = server_args(
            entrypoint + [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in service["command"]]
        )
        # HAProxy finds every replica by the shared alias, on the port the server listens on
        assert service["networks"]["default"]["aliases"] == [router_replicas()[0]]
        assert router_replicas()[1] == args.port
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace and int(grace.group(1)) > args.drain_timeout, (
            "docker stop must outwait the drain"
        )
        # one named volume holds the hub cache of every replica, where the image keeps it
        assert service["volumes"] == [
            "hf-cache:" + json.loads(dockerfile.stages[-1].one("VOLUME"))[0]
        ]
        # Docker's health says when a replica can serve: "ready", after a first download
        health = service["healthcheck"]
        assert f"http://127.0.0.1:{args.port}/ready" in " ".join(compose_healthcheck(compose, name))
        start_period = re.fullmatch(r"(\d+)m", health["start_period"])
        assert start_period and int(start_period.group(1)) >= 10
    assert "hf-cache" in compose["volumes"]


def server_routes() -> set[str]:
    from server.app import build_app
    from server.state import ServerState

    return {route.path for route in build_app(ServerState()).routes}


def haproxy_lines() -> list[str]:
    """deploy/haproxy/haproxy.cfg without comments and blank lines, stripped."""
    lines = [line.split("#", 1)[0].strip() for line in HAPROXY_CFG.read_text().splitlines()]
    return [line for line in lines if line]


def router_replicas() -> tuple[str, int]:
    """The DNS name and port of the replicas in haproxy.cfg's server-template line."""
    (line,) = [x for x in haproxy_lines() if x.startswith("server-template ")]
    name, port = line.split()[3].split(":")
    return name, int(port)


def test_compose_router_settings(compose):
    """The router's file keeps what the balancer must do: readiness checks, consistent hashing
    on the routing key, retries only when a replica could not be reached, no response timeout a
    stream could hit."""
    lines = haproxy_lines()
    assert "option httpchk GET /ready" in lines and "/ready" in server_routes()
    assert "http-check expect status 200" in lines
    assert "balance hash var(txn.route_key)" in lines and "hash-type consistent" in lines
    assert "option http-buffer-request" in lines  # the body's first bytes hold the key
    # only connection failures are retried: a request that reached a replica is never re-run
    assert [x for x in lines if x.startswith("retry-on")] == ["retry-on conn-failure"]
    assert "option redispatch 1" in lines
    # a fresh connection per request: none is written onto one the replica is closing
    assert "http-reuse never" in lines
    timeouts = dict(x.split()[1:3] for x in lines if x.startswith("timeout "))
    assert timeouts["server"] == timeouts["client"] == "1h"
    router = compose["services"]["router"]
    assert router["image"].startswith("haproxy:")
    assert "./deploy/haproxy:/usr/local/etc/haproxy:ro" in router["volumes"]
    binds = [x.split()[1] for x in lines if x.startswith("bind ")]
    published = {p.rsplit(":", 1)[-1] for p in router["ports"]}
    assert {b.removeprefix(":") for b in binds} == published
    haproxy = shutil.which("haproxy")
    if haproxy:  # the tests run Debian's HAProxy: compose names the same release
        version = subprocess.run([haproxy, "-v"], capture_output=True, text=True).stdout
        release = re.search(r"version (\d+\.\d+)", version).group(1)
        assert router["image"] == f"haproxy:{release}"


def compose_clis() -> list[list[str]]:
    """The Compose CLIs here: v2 (`docker compose`) and v1 (Debian's `docker-compose`)."""
    found = []
    if shutil.which("docker") is not None:
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if v2.returncode == 0:
            found.append(["docker", "compose"])
    if shutil.which("docker-compose") is not None:
        found.append(["docker-compose"])
    return found


def test_compose_config_parses_with_docker():
    """Every profile's services, with each Compose here: the file is kept to what v1 and v2 both
    take (the project name is in .env, not a v2-only top-level `name:`)."""
    clis = compose_clis()
    if not clis:
        pytest.skip("no Compose here (neither `docker compose` nor `docker-compose`)")
    for cli in clis:
        profiles = ["--profile", "gpu", "--profile", "cpu", "--profile", "monitoring"]
        done = subprocess.run(
            [*cli, "-f", str(COMPOSE), *profiles, "config"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert done.returncode == 0, (cli, done.stderr)
        config = yaml.safe_load(done.stdout)
        expected = {"router", "plm-gpu0", "plm-gpu1", "plm-cpu", "prometheus", "grafana"}
        assert set(config["services"]) == expected, cli


def test_compose_project_name_is_set_for_v1_and_v2():
    env = dict(
        line.split("=", 1)
        for line in (REPO / ".env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert env["COMPOSE_PROJECT_NAME"] == "plm-serve"
    assert "name" not in yaml.safe_load(COMPOSE.read_text())


# --- Prometheus and Grafana -----------------------------------------------------------------------


class _Zeros:
    """Engine stats whose every field reads 0."""

    def __getattr__(self, name):
        return 0


def exposed_metric_names() -> set[str]:
    """Every sample name server/metrics.py exposes, from a render of its registry."""
    from prometheus_client.parser import text_string_to_metric_families

    from server.state import ServerState

    state = ServerState()
    state.engine = SimpleNamespace(stats=_Zeros, dead=None)  # loaded: engine figures too
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names = set()
    for family in text_string_to_metric_families(state.metrics.render().decode()):
        names |= {family.name + s for s in suffixes[family.type]}
    return names


def test_prometheus_scrapes_every_replica(compose):
    config = load(DEPLOY / "prometheus" / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "plm-serve")
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    alias, port = router_replicas()
    routed = {
        name
        for name, s in compose["services"].items()
        if alias in s.get("networks", {}).get("default", {}).get("aliases", [])
    }
    assert routed == set(PLM_SERVICES) and sd["names"] == [alias] and sd["type"] == "A"
    assert sd["port"] == port
    router = next(j for j in config["scrape_configs"] if j["job_name"] == "router")
    assert router["static_configs"][0]["targets"] == ["router:8404"]
    assert "bind :8404" in haproxy_lines() and "prometheus-exporter" in HAPROXY_CFG.read_text()
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_dashboard_uses_real_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "plm-serve.json").read_text())
    datasource = load(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ][0]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"plm:[A-Za-z0-9_:]+", e)}
    exposed = exposed_metric_names()
    assert len(used) >= 10
    assert used <= exposed, f"not exposed by server/metrics.py: {sorted(used - exposed)}"
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}


# --- Kubernetes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    """plm-serve's own objects, one per kind. Where a kind has several (router.yaml adds Services
    and a Deployment), the one named plm-serve; tests/test_k8s_manifests.py covers the others."""
    docs = [
        d
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(set(names)) == len(names), "two objects of one kind share a name"
    by_kind = {}
    for d in docs:
        if sum(kind == d["kind"] for kind, _ in names) == 1 or d["metadata"]["name"] == "plm-serve":
            by_kind[d["kind"]] = d
    assert {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
    } <= set(by_kind)
    return by_kind


def test_k8s_deployment_probes_and_shutdown(k8s, dockerfile):
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = server_args(exec_form(dockerfile.stages[-1].one("ENTRYPOINT")) + container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.port
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health"
    assert {"/ready", "/health"} <= server_routes()
    assert all(ports[p["port"]] == args.port for p in probes.values())
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    margin = pod["terminationGracePeriodSeconds"] - int(pre_stop[1]) - args.drain_timeout
    assert margin >= 10, f"grace period leaves {margin} s after preStop + --drain-timeout"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    uid = re.search(r"--uid (\d+)", " ".join(dockerfile.stages[-1].all("RUN"))).group(1)
    security = pod["securityContext"]
    assert security["runAsUser"] == int(uid) and security["runAsNonRoot"]
    cache = next(m for m in container["volumeMounts"] if m["mountPath"] == "/cache")
    volume = next(v for v in pod["volumes"] if v["name"] == cache["name"])
    claim = k8s["PersistentVolumeClaim"]["metadata"]["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim


def test_k8s_service_and_hpa_target_the_deployment(k8s):
    deployment = k8s["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = k8s["Service"]["spec"]["selector"]
    assert selector.items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert k8s["Service"]["spec"]["ports"][0]["targetPort"] in {
        p["name"] for p in container["ports"]
    }
    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["metrics"]
    # the custom-metrics adapter renames plm:<name> to plm_<name> (see the comment in hpa.yaml)
    assert metric["pods"]["metric"]["name"].replace("plm_", "plm:", 1) in exposed_metric_names()
