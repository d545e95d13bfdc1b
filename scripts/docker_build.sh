#!/usr/bin/env bash
# Builds the CPU image (plm-serve:cpu) from this checkout with the production Dockerfile, on a
# machine that cannot pull images: as root, on Debian.
#
#   bash scripts/docker_build.sh [TAG]          # default tag plm-serve:cpu
#
# - Docker: Debian's docker.io is installed and dockerd started if none answers (scripts/docker_env.sh).
# - Base image: BASE_IMAGE (default plm-base:bookworm). When that default is missing it is made from
#   Debian's own packages with debootstrap (python3, python3-venv, ca-certificates; under a minute)
#   and loaded with `docker import`. BASE_IMAGE=ubuntu:24.04 builds on the Dockerfile's own base.
# - Wheels: local package indexes named as file:// URLs in pip's configuration (or in LOCAL_INDEXES,
#   space-separated directories of "simple" indexes) are served on loopback while the build runs; the
#   one that has torch becomes CPU_TORCH_INDEX, the others extra indexes, so pip takes the wheels
#   already on this disk before downloading anything. Without local indexes the Dockerfile's
#   defaults apply (PyTorch's CPU index and PyPI).
# - Trust: the CA bundle pip uses here (pip's `cert` setting, else the system bundle) goes to the
#   build as the `pip_ca` secret, so a proxy's own CA is trusted without entering the image.
#
# The build uses the host network. It prints the build time and the image size, and removes the
# image the tag named before (the build cache stays: `docker builder prune` empties it).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-plm-serve:cpu}
BASE_IMAGE=${BASE_IMAGE:-plm-base:bookworm}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PYTHON:-python3}

bash scripts/docker_env.sh install
bash scripts/docker_env.sh start >/dev/null
DOCKER=$(bash scripts/docker_env.sh cli)

if [ "$BASE_IMAGE" = plm-base:bookworm ] && ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  root=$(mktemp -d)
  echo "making $BASE_IMAGE with debootstrap ($DEBIAN_SUITE from $DEBIAN_MIRROR)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" >/dev/null
  tar -C "$root" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
fi

servers=()
cleanup() { for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

if [ -z "${LOCAL_INDEXES+x}" ]; then
  LOCAL_INDEXES=$("$PY" -m pip config list 2>/dev/null | "$PY" -c '
import sys
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    if key.endswith("index-url"):
        for url in value.strip("\"'"'"'").split():
            if url.startswith("file://"):
                print(url[len("file://"):])
' | tr '\n' ' ')
fi
args=(--build-arg VARIANT=cpu --build-arg "CPU_IMAGE=$BASE_IMAGE")
torch_index="" extra=""
for dir in $LOCAL_INDEXES; do
  [ -d "$dir" ] || continue
  # fixed ports: the index URLs are build arguments, so they must not change between builds for
  # the dependency layer to be reused (a port in use falls back to a free one: a full rebuild)
  port=$((${LOCAL_INDEX_PORT:-39401} + ${#servers[@]}))
  if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
  # serve the index's parent: its pages link to the files with relative paths (../../files/...)
  "$PY" -m http.server --bind 127.0.0.1 --directory "$(dirname "$dir")" "$port" >/dev/null 2>&1 &
  servers+=($!)
  url="http://127.0.0.1:$port/$(basename "$dir")/"
  if [ -z "$torch_index" ] && [ -e "$dir/torch" ]; then torch_index=$url; else extra="$extra $url"; fi
done
if [ -n "$torch_index" ]; then
  args+=(--build-arg "CPU_TORCH_INDEX=$torch_index")
  echo "torch from $torch_index (local); other local indexes:${extra:- none}"
fi
[ -n "$extra" ] && args+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra# }")
for _ in $(seq 50); do  # the index servers are up
  ok=1
  for url in $torch_index $extra; do curl -sf -o /dev/null "$url" || ok=0; done
  [ "$ok" = 1 ] && break
  sleep 0.1
done

ca=${PIP_CA:-$("$PY" -m pip config get global.cert 2>/dev/null || true)}
[ -n "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
[ -f "$ca" ] && args+=(--secret "id=pip_ca,src=$ca")

old=$("$DOCKER" image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)
start=$(date +%s)
DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain "${args[@]}" -t "$TAG" .
end=$(date +%s)
size=$("$DOCKER" image inspect -f '{{.Size}}' "$TAG")
# the image this tag named before is left untagged by the build: remove it (each holds GBs); one
# still tagged otherwise or used by a container stays
new=$("$DOCKER" image inspect -f '{{.Id}}' "$TAG")
if [ -n "$old" ] && [ "$old" != "$new" ] \
  && [ "$("$DOCKER" image inspect -f '{{len .RepoTags}}' "$old" 2>/dev/null)" = 0 ]; then
  "$DOCKER" image rm "$old" >/dev/null 2>&1 || true
fi
echo "built $TAG in $((end - start)) s; image size $((size / 1000000)) MB"
