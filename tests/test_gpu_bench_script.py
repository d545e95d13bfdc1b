"""The prepared GPU run (benchmarks/gpu_bench.sh + gpu_wheels.sh) must work on an offline CUDA host.

Device time is scarce, so what can be checked here is: both scripts parse, and every third-party
package the engine, server and benchmarks import is either fetched as a wheel by gpu_wheels.sh or
named in its header as one the host brings.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
LOCAL = {
    "plm_core",
    "server",
    "conftest",
    "hf_reference",
    "media_http",
    "media_sets",
    "server_proc",
}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def wheel_lists() -> tuple[set[str], set[str]]:
    text = SCRIPTS[1].read_text()
    fetched = set(re.search(r'PKGS="([^"]+)"', text).group(1).split())
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    host = re.search(r"must already have (.+?)\.", header).group(1)
    return fetched, {name.strip() for name in host.split(",")}


def third_party_imports() -> set[str]:
    names = set()
    for folder in ("plm_core", "server", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in LOCAL}


def test_every_import_is_fetched_or_on_the_host():
    fetched, host = wheel_lists()
    assert "torch" in host and "transformers" in fetched
    missing = {
        n for n in third_party_imports() if DIST.get(n, n).replace("_", "-") not in fetched | host
    }
    assert not missing, (
        f"imported but neither fetched by gpu_wheels.sh nor named as on the host: {missing}"
    )
