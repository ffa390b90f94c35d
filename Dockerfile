# syntax=docker/dockerfile:1
# Forge image. Default: CUDA runtime (the trainer and embedder use the GPU when one is
# reserved). CPU-only variant: docker build --build-arg VARIANT=cpu .
ARG VARIANT=cuda

# ---------------------------------------------------------------- bases (Python 3.11)
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS base-cuda
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv curl \
 && apt-get purge -y software-properties-common && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python3
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu124

FROM python:3.11-slim AS base-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------- build
FROM base-${VARIANT} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --upgrade pip \
 && pip install --index-url "$TORCH_INDEX" "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY forge ./forge
COPY consumers ./consumers
COPY schemas ./schemas
RUN pip install .

# ---------------------------------------------------------------- runtime
FROM base-${VARIANT} AS runtime
ARG FORGE_UID=10001
RUN useradd --system --uid "${FORGE_UID}" --create-home --home-dir /home/forge forge \
 && mkdir -p /models /cache /var/log/datapunk/forge /data \
 && chown -R forge:forge /models /cache /var/log/datapunk/forge /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    FORGE_HOME=/data \
    FORGE_MODEL_DIR=/models \
    FORGE_CACHE_DIR=/cache \
    FORGE_LOG_DIR=/var/log/datapunk/forge \
    FORGE_HTTP_HOST=0.0.0.0 \
    FORGE_HTTP_PORT=8080 \
    FORGE_LOG_FORMAT=json
VOLUME ["/models", "/cache", "/var/log/datapunk/forge"]
USER forge
WORKDIR /home/forge
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${FORGE_HTTP_PORT}/health" || exit 1
ENTRYPOINT ["forge"]
CMD ["worker"]
