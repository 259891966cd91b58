# syntax=docker/dockerfile:1
# Veil edge proxy, for teams that run a shared edge instead of one per laptop.
# Build from the repository root:
#   docker build -f docker/edge.Dockerfile -t veil-edge:0.1.0 .
# The edge holds the secret rotation Q and API keys: run it only where you
# trust the operator. Mount its home (edge bundle, bundle key, policy store) at
# /var/lib/veil; no bundle, key or weights are baked in.

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Embedding and LM head run on the CPU at the edge.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY . .
# The local project, not a registry package: nothing to pin here.
# hadolint ignore=DL3013
RUN pip install ".[edge]" \
 && veil --help >/dev/null

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS runtime
LABEL org.opencontainers.image.title="veil-edge" \
      org.opencontainers.image.description="Veil edge proxy: OpenAI-compatible API that cloaks prompts before the core"
RUN groupadd --system --gid 10001 veil \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin veil \
 && mkdir -p /var/lib/veil \
 && chown 10001:10001 /var/lib/veil
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/veil-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1 \
    VEIL_HOME=/var/lib/veil \
    VEIL_EDGE_HOST=0.0.0.0 \
    VEIL_EDGE_PORT=8000
VOLUME ["/var/lib/veil"]
EXPOSE 8000
USER 10001:10001
# /healthz: the process serves (its /readyz also checks the core).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/usr/local/bin/veil-healthcheck", "--port-env", "VEIL_EDGE_PORT", "/healthz"]
ENTRYPOINT ["veil", "edge"]
