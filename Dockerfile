# plm-serve: the OpenAI-compatible PerceptionLM server. Needs BuildKit (Docker 23+, or
# DOCKER_BUILDKIT=1 with Docker 20.10); no `# syntax` line, so no frontend image is pulled.
#
#   docker build -t plm-serve:cuda .                          # NVIDIA GPUs (the default)
#   docker build --build-arg VARIANT=cpu -t plm-serve:cpu .   # machines without a GPU
#   docker run --gpus all -p 8000:8000 -v hf-cache:/cache -e HF_TOKEN plm-serve:cuda
#   docker run -p 8000:8000 -v hf-cache:/cache plm-serve:cpu --demo tiny
#
# Offline or behind a proxy: scripts/docker_build.sh builds the CPU image on a Debian base made with
# debootstrap (CPU_IMAGE), installs the wheels from local package indexes (CPU_TORCH_INDEX,
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL) and passes a CA bundle to pip as the `pip_ca` build secret.
#
# Arguments after the image name replace CMD (the model) and are appended to the ENTRYPOINT, which
# keeps --host 0.0.0.0 --port 8000. tests/test_deploy_files.py runs this file's wheel build,
# ENTRYPOINT + CMD and HEALTHCHECK commands outside Docker.

# cuda or cpu: picks the base image and where PyTorch comes from.
ARG VARIANT=cuda
# The `base` flavour (CUDA runtime entry point, driver checks, GPU visibility settings) is enough:
# PyPI's torch==2.14.1 wheels are built for CUDA 13.0 and install their own CUDA libraries, so the
# `runtime` flavour's copies would only add gigabytes. Use a 13.x image.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-cuda
FROM ${CPU_IMAGE} AS base-cpu

# What both stages share: Ubuntu's Python (the virtualenv copied below points at /usr/bin/python3).
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Builder: a virtualenv with plm-serve and its pinned dependencies, as scripts/setup.sh makes .venv
# (without the editable install and the test extras). Every dependency is a binary wheel: no
# compiler needed here either.
FROM base AS builder
ARG VARIANT
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Where every other package comes from, and further indexes (space-separated; a local mirror, for
# one). pip reads both from the environment, and takes a version that several indexes list from the
# first of them.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
# The optional `pip_ca` secret is a CA bundle for pip (a proxy's own CA); it is not kept in the image.
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && python -m pip install --no-cache-dir --upgrade pip "setuptools>=77"
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so that a rebuild after a code change reuses this
# (by far the largest) layer. The CPU variant takes torch/torchvision from PyTorch's CPU index (no
# CUDA libraries, a fraction of the size) and everything else from PIP_INDEX_URL. xgrammar asks for
# triton (for its own GPU mask kernel, which plm-serve does not use); the CPU image drops it (~0.9 GB).
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip_ca \
    if [ "$VARIANT" = cpu ]; then \
      export PIP_EXTRA_INDEX_URL="$PIP_INDEX_URL $PIP_EXTRA_INDEX_URL" PIP_INDEX_URL="$CPU_TORCH_INDEX"; \
    fi \
 && if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
 && python -m pip install -r /tmp/requirements.txt \
 && if [ "$VARIANT" = cpu ]; then python -m pip uninstall -y triton; fi
COPY README.md ./
COPY plm_core ./plm_core
COPY server ./server
# The project alone as a wheel (tests/test_deploy_files.py runs this very command on the repository),
# installed apart from the virtualenv (its `plm-serve` script runs the virtualenv's Python), so that
# the image's copy of the virtualenv stays the same layer when only the code changes.
RUN python -m pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .
RUN PYTHONDONTWRITEBYTECODE=1 python -m pip install --no-cache-dir --no-deps \
      --target /opt/plm-serve /wheels/plm_serve-*.whl

# The image: Python, the virtualenv and nothing to build with.
FROM base AS runtime
RUN useradd --create-home --uid 10001 --user-group plm
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/plm-serve /opt/plm-serve
ENV PATH=/opt/plm-serve/bin:/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/plm-serve \
    HOME=/home/plm \
    HF_HOME=/cache/huggingface \
    PLM_SERVE_CACHE=/cache/plm-serve
# /cache holds the hub cache (HF_HOME) and the --demo checkpoints (PLM_SERVE_CACHE).
RUN install -d -o plm -g plm /cache
# Mount a named volume (or a PersistentVolume) here so weights are downloaded once and shared.
VOLUME ["/cache"]
USER plm
WORKDIR /home/plm
EXPOSE 8000
# Liveness: /health answers as soon as the port is open (the model loads in the background) and
# while the engine is busy; the start period covers Python's start. Readiness (/ready: 503 while
# loading or draining) is for load balancers: docker-compose.yml swaps this check for /ready, so
# Traefik only discovers loaded replicas.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# SIGTERM (docker stop): readiness 503, the listener closes, in-flight requests get --drain-timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["plm-serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "facebook/Perception-LM-1B"]
