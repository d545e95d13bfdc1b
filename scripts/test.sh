#!/usr/bin/env bash
# Sets up .venv and runs the test suite (builds small random checkpoints into .cache/ on first run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
