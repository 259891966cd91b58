# syntax=docker/dockerfile:1
# Veil core server: the decoder blocks, the KV cache and the sealed step API
# (an HPKE handshake from enrolled edges, then AES-256-GCM frames) on 8001, with
# Prometheus /metrics on its own port, 9100.
# Build from the repository root (the context is filtered by .dockerignore):
#   docker build -f docker/core.Dockerfile --build-arg VARIANT=cuda -t veil-core:0.1.0-cuda .
#   docker build -f docker/core.Dockerfile --build-arg VARIANT=cpu  -t veil-core:0.1.0-cpu  .
# No model weights are baked in: mount the core bundle from `veil cloak` and point
# VEIL_CORE_BUNDLE at it (the Helm chart in helm/veil-core does this). No keys
# either: mount the identity key (VEIL_CORE_IDENTITY_KEY_FILE; `veil-core keygen`
# makes one) and the allowed-edges file (VEIL_CORE_ALLOWED_EDGES).
# Only veil/ (errors, settings, wire, bundle, http, logs, model maths) and
# core_server/ are copied: the core ships without tokenizer, embedding, sampling,
# cloaking or policy code, and without the `veil` composition root; its command
# is `veil-core` (core_server/cli.py).

ARG VARIANT=cuda

# Bases are pinned by tag and multi-platform digest; bump both together.
# torch's own wheels carry the CUDA user-space libraries; the base brings a
# matching runtime and the NVIDIA container-toolkit env (NVIDIA_DRIVER_CAPABILITIES).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04@sha256:828c4d878adcaa4265d80c95d8ec877149b49bb2419a4cf3bb6aa889bbb7ca2e AS base-cuda
# Ubuntu's python3 (3.12) in a venv; apt packages follow the pinned base.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS base-cpu
RUN python -m venv /opt/venv

# ---- build: torch first (pinned), then the veil package with the core's deps ----
# base-${VARIANT} is a stage above, pinned there.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The default index serves the CUDA build on Linux; the CPU build is much smaller.
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    else \
      pip install "torch==${TORCH_VERSION}"; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY veil ./veil
COPY core_server ./core_server
RUN pip install . \
 && veil-core --help >/dev/null

# ---- runtime: the venv, a non-root user, nothing else ----
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="veil-core" \
      org.opencontainers.image.description="Veil core server: cloaked decoder blocks behind a sealed step API" \
      dev.veil.variant="${VARIANT}"
RUN groupadd --system --gid 10001 veil \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin veil \
 && mkdir -p /var/lib/veil/bundle
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/veil-healthcheck
# The core writes only under /tmp, so a read-only root filesystem works.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    VEIL_CORE_HOST=0.0.0.0 \
    VEIL_CORE_PORT=8001 \
    VEIL_CORE_DEVICE=auto \
    VEIL_CORE_BUNDLE=/var/lib/veil/bundle \
    VEIL_CORE_METRICS_HOST=0.0.0.0 \
    VEIL_CORE_METRICS_PORT=9100
# 8001: handshakes, sealed steps, /healthz, /readyz, /v1/info; 9100: /metrics.
EXPOSE 8001 9100
USER 10001:10001
# Healthy once the bundle is loaded (/readyz); large models take minutes to load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "/usr/local/bin/veil-healthcheck", "--port-env", "VEIL_CORE_PORT", "/readyz"]
ENTRYPOINT ["veil-core"]
