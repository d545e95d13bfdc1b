#!/usr/bin/env bash
# Sets up .venv and runs plm-serve. Today that is the offline engine: one chat with an image,
# printed to the terminal. Default model: facebook/Perception-LM-1B (needs hub access and a GPU
# for good speed); `--demo` uses a random-weight demo checkpoint built offline under .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m plm_core "$@"
