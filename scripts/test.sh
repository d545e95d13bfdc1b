#!/usr/bin/env bash
# Sets up .venv, checks lint, format and types, then runs the test suite (builds small random
# checkpoints into .cache/ on first run). Extra arguments go to pytest: `-m "not slow"` is the
# fast subset for the edit-test loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
