#!/usr/bin/env bash
# Docker on this machine, for scripts/docker_build.sh and the container tests (tests/test_docker.py).
#
#   bash scripts/docker_env.sh install   # as root: Debian's docker.io, debootstrap, docker-compose
#   bash scripts/docker_env.sh start     # starts dockerd unless one answers; prints "started" or "running"
#   bash scripts/docker_env.sh stop      # stops the dockerd that `start` started (and only that one)
#   bash scripts/docker_env.sh cli       # the docker CLI that can build with BuildKit here
#
# Exits non-zero with the reason on stderr when Docker cannot be had (not root, no package, no
# daemon): callers skip then.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${PLM_DOCKER_STATE:-.cache/docker}
PIDFILE=$STATE/dockerd.pid

answers() { docker info >/dev/null 2>&1; }

install() {
  if command -v dockerd >/dev/null && command -v debootstrap >/dev/null \
    && command -v docker-compose >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || { echo "installing Docker needs root" >&2; exit 1; }
  command -v apt-get >/dev/null || { echo "no apt-get: install Docker yourself" >&2; exit 1; }
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap docker-compose >/dev/null
}

start() {
  if answers; then echo running; return 0; fi
  command -v dockerd >/dev/null || { echo "no dockerd (bash scripts/docker_env.sh install)" >&2; exit 1; }
  [ "$(id -u)" = 0 ] || { echo "starting dockerd needs root" >&2; exit 1; }
  mkdir -p "$STATE"
  # setsid: the daemon outlives this script, in its own session (the tests stop it at the end)
  setsid dockerd >"$STATE/dockerd.log" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  for _ in $(seq 60); do
    if answers; then echo started; return 0; fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then break; fi
    sleep 0.5
  done
  echo "dockerd did not start; its log ($STATE/dockerd.log) ends with:" >&2
  tail -5 "$STATE/dockerd.log" >&2 || true
  exit 1
}

stop() {
  [ -f "$PIDFILE" ] || return 0
  pid=$(cat "$PIDFILE")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$PIDFILE"
}

# Docker 23+ builds with buildx; the CLI Debian ships with its 20.10 daemon builds with
# DOCKER_BUILDKIT=1 and no plugin. Another, newer CLI earlier on PATH without buildx cannot.
cli() {
  if docker buildx version >/dev/null 2>&1; then echo docker; return 0; fi
  for c in docker /usr/bin/docker; do
    major=$("$c" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) || continue
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then echo "$c"; return 0; fi
  done
  echo "no docker CLI here can build with BuildKit: install the buildx plugin" >&2
  exit 1
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  cli) cli ;;
  *) echo "usage: $0 install|start|stop|cli" >&2; exit 2 ;;
esac
