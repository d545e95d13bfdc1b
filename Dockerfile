# syntax=docker/dockerfile:1
# plm-serve: the OpenAI-compatible PerceptionLM server.
#
#   docker build -t plm-serve:cuda .                          # NVIDIA GPUs (the default)
#   docker build --build-arg VARIANT=cpu -t plm-serve:cpu .   # machines without a GPU
#   docker run --gpus all -p 8000:8000 -v hf-cache:/cache -e HF_TOKEN plm-serve:cuda
#   docker run -p 8000:8000 -v hf-cache:/cache plm-serve:cpu --demo tiny
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
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN python -m pip install --no-cache-dir --upgrade pip "setuptools>=77"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY plm_core ./plm_core
COPY server ./server
# The project alone as a wheel (tests/test_deploy_files.py runs this very command on the repository).
RUN python -m pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .
# Then the wheel with its dependencies. The CPU variant takes torch/torchvision from PyTorch's CPU
# index (no CUDA libraries, a fraction of the size) and everything else from PyPI. xgrammar asks for
# triton (for its own GPU mask kernel, which plm-serve does not use); the CPU image drops it (~0.9 GB).
RUN --mount=type=cache,target=/root/.cache/pip \
    case "$VARIANT" in \
      cpu) index="--index-url $CPU_TORCH_INDEX --extra-index-url https://pypi.org/simple" ;; \
      *) index="" ;; \
    esac \
 && python -m pip install $index /wheels/plm_serve-*.whl \
 && if [ "$VARIANT" = cpu ]; then python -m pip uninstall -y triton; fi

# The image: Python, the virtualenv and nothing to build with.
FROM base AS runtime
RUN useradd --create-home --uid 10001 --user-group plm
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
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
