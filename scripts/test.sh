#!/usr/bin/env bash
# Sets up .venv, checks lint, format and types, then runs the test suite (builds small random
# checkpoints into .cache/ on first run). Extra arguments go to pytest: `-m "not slow"` is the
# fast subset for the edit-test loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The router tests run Debian's haproxy (the balancer docker-compose.yml uses) and the playground's
# browser tests Debian's headless Chromium and its driver: installed here (one apt-get run) when
# this runs as root with apt; elsewhere those tests skip and say how to install them.
missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
{ command -v chromium && command -v chromedriver; } >/dev/null || missing+=(chromium chromium-driver)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
    >/dev/null 2>&1 || echo "could not install ${missing[*]}: their tests will skip" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
