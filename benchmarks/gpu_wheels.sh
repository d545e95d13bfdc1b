#!/usr/bin/env bash
# Fetches, into .whl/ (git-ignored), the wheels a GPU host without network needs beside its own
# PyTorch stack, at the versions this checkout's .venv runs (so the GPU run uses what CI tests).
# The tests gpu_bench.sh runs need pytest and jsonschema, fetched here too.
# Run it here, where the package registry is reachable; benchmarks/gpu_bench.sh installs them there
# with `pip install --no-index --target` when it finds .whl/. Targets CPython 3.12 on x86-64 Linux
# (override with PYVER=3.11 etc.). The host must already have torch, torchvision, numpy, pillow,
# tokenizers, huggingface-hub, safetensors, httpx, prometheus-client, pyyaml, matplotlib, jinja2, tqdm.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
VENV_PY=${VENV_PY:-.venv/bin/python}
PKGS="transformers timm fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection
      typing-extensions opentelemetry-api uvicorn av regex xgrammar apache-tvm-ffi
      pytest pluggy iniconfig pygments jsonschema jsonschema-specifications referencing rpds-py attrs"
pins=$($VENV_PY - $PKGS <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{name}=={m.version(name)}" for name in sys.argv[1:]))
EOF
)
rm -rf .whl && mkdir -p .whl
plats=()
for n in 28 27 17; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
# shellcheck disable=SC2086
$VENV_PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${plats[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
ls .whl
du -sh .whl
