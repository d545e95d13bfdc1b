#!/usr/bin/env bash
# Sets up .venv and starts the OpenAI-compatible server (plm-serve) on 127.0.0.1:8000.
# Default model: facebook/Perception-LM-1B (gated on the hub; a GPU is advised); `--demo` serves a
# random-weight demo checkpoint built offline under ~/.cache/plm-serve (or $PLM_SERVE_CACHE). `--help` lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m server "$@"
