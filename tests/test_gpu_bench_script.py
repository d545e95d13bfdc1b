"""The prepared GPU run (benchmarks/gpu_bench.sh + gpu_wheels.sh) must work on an offline CUDA host.

Device time is scarce, so what can be checked here is: both scripts parse, and every third-party
package imported by the engine, the server, the benchmarks and the tests the GPU run starts (with
the local helpers they import) is either fetched as a wheel by gpu_wheels.sh or named in its header
as one the host brings.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
BENCH = REPO / "benchmarks"
SCRIPTS = [REPO / "benchmarks" / "gpu_bench.sh", REPO / "benchmarks" / "gpu_wheels.sh"]
# import name -> distribution name, where they differ
DIST = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "jinja2": "jinja2",
    "prometheus_client": "prometheus-client",
    "huggingface_hub": "huggingface-hub",
    "pydantic_core": "pydantic-core",
}
# this repository's packages, and every module in tests/ (conftest, support, the helpers, the tests)
# the project's own packages, test helpers and benchmark modules (benchmarks import each other)
LOCAL = {"plm_core", "server"} | {p.stem for p in (*TESTS.glob("*.py"), *BENCH.glob("*.py"))}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def wheel_lists() -> tuple[set[str], set[str]]:
    text = SCRIPTS[1].read_text()
    fetched = set(re.search(r'PKGS="([^"]+)"', text).group(1).split())
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    host = re.search(r"must already have (.+?)\.", header).group(1)
    return fetched, {name.strip() for name in host.split(",")}


def imports(path: Path) -> set[str]:
    """The top-level names of every module `path` imports (relative imports left out)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def gpu_test_modules() -> set[str]:
    """The test modules gpu_bench.sh runs with pytest, with conftest and the local helpers they
    import (transitively)."""
    todo = ["conftest", *re.findall(r"tests/(\w+)\.py", SCRIPTS[0].read_text())]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [n for n in imports(TESTS / f"{name}.py") if (TESTS / f"{n}.py").exists()]
    return seen


def third_party_imports() -> set[str]:
    paths = [
        p for folder in ("plm_core", "server", "benchmarks") for p in (REPO / folder).rglob("*.py")
    ]
    paths += [TESTS / f"{name}.py" for name in gpu_test_modules()]
    names = {"pytest"}  # gpu_bench.sh runs `python -m pytest`
    for path in paths:
        names |= imports(path)
    return {n for n in names if n not in sys.stdlib_module_names and n not in LOCAL}


def test_every_import_is_fetched_or_on_the_host():
    fetched, host = wheel_lists()
    assert "torch" in host and "transformers" in fetched
    missing = {
        n for n in third_party_imports() if DIST.get(n, n).replace("_", "-") not in fetched | host
    }
    assert not missing, f"imported but neither fetched by gpu_wheels.sh nor on the host: {missing}"


def test_the_gpu_tests_and_their_helpers_are_found():
    modules = gpu_test_modules()
    assert {"test_sampler", "test_engine", "test_structured_output", "conftest"} <= modules
    assert "support" in modules  # a helper reached through the tests' own imports
