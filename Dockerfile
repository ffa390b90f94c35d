# syntax=docker/dockerfile:1
# Forge image (names as deploy/kubernetes expects them):
#   GPU (default):  docker build -t forge:0.1.0 .
#   CPU only:       docker build -t forge-cpu:0.1.0 --build-arg VARIANT=cpu .
#
# The virtual environment is built on the very base image it runs on (the build stage
# derives from the runtime base of the chosen variant). A venv records the absolute
# path of its interpreter, and compiled wheels link against the base's libc, so a venv
# built on python:3.11 (/usr/local/bin, Debian) would not run on the CUDA base
# (/usr/bin, Ubuntu). Build-only tools live in the build stage alone.
ARG VARIANT=cuda
# Overridable to match the cluster's driver. Not the -cudnn flavour: torch's CUDA wheels
# bring their own cuDNN, so the base only provides the driver hooks and CUDA runtime.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

# ------------------------------------------------------------ runtime bases (Python 3.11)
FROM ${CUDA_IMAGE} AS cuda-runtime
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu 22.04 ships 3.10; deadsnakes has a maintained 3.11. The PPA tooling is needed
# only to add the repository, so it is purged in the same layer.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gnupg ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv curl \
 && apt-get purge -y software-properties-common gnupg \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python3

FROM python:3.11-slim AS cpu-runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/*

# ------------------------------------------------------------ build tools per variant
FROM cuda-runtime AS cuda-build
ARG DEBIAN_FRONTEND=noninteractive
# deadsnakes keeps Python.h out of python3.11; sdists with C extensions need it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
# PyPI's Linux torch wheels are the CUDA builds (CUDA libraries come as wheels).
ARG TORCH_INDEX=https://pypi.org/simple
ENV TORCH_INDEX=${TORCH_INDEX}

FROM cpu-runtime AS cpu-build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
# The CPU index keeps several GB of CUDA wheels out of the CPU image.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX=${TORCH_INDEX}

# ------------------------------------------------------------ build
FROM ${VARIANT}-build AS build
# Same version as CI (.ci/run) so the image runs what the tests ran.
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# pip itself as the locks pin it, before anything else is installed through them.
COPY requirements-pip.lock ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes -r requirements-pip.lock
ENV PATH=/opt/venv/bin:$PATH
# torch first and on its own: it is the largest layer and changes least often. The
# runtime lock leaves torch out, so each variant takes its own build of this version.
RUN pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"
# Every other package exactly as CI tested it: versions and hashes from the lock.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml ./
COPY forge ./forge
COPY consumers ./consumers
# --no-deps: the lock already installed them all, so nothing unpinned comes in here.
# The entry point's own smoke test: a broken install fails the build, not the pod.
RUN pip install --no-deps . \
 && forge --version

# ------------------------------------------------------------ runtime
FROM ${VARIANT}-runtime AS runtime
# Numeric, so Kubernetes can enforce runAsNonRoot without a runAsUser.
ARG FORGE_UID=10001
RUN groupadd --system --gid "${FORGE_UID}" forge \
 && useradd --system --uid "${FORGE_UID}" --gid forge --create-home --home-dir /home/forge forge \
 && mkdir -p /models /cache /var/log/datapunk/forge /data \
 && chown -R forge:forge /models /cache /var/log/datapunk/forge /data
COPY --from=build /opt/venv /opt/venv
# Volumes inherit this ownership when they are first mounted, so the user can write.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    FORGE_HOME=/data \
    FORGE_MODEL_DIR=/models \
    FORGE_CACHE_DIR=/cache \
    FORGE_LOG_DIR=/var/log/datapunk/forge \
    FORGE_HTTP_HOST=0.0.0.0 \
    FORGE_HTTP_PORT=8080 \
    FORGE_SERVE_HOST=0.0.0.0 \
    FORGE_SERVE_PORT=8000 \
    FORGE_LOG_FORMAT=json
VOLUME ["/models", "/cache", "/var/log/datapunk/forge"]
USER ${FORGE_UID}:${FORGE_UID}
WORKDIR /home/forge
# 8080: a worker's /health and /metrics. 8000: the HTTP API of `forge serve`, which
# listens beyond loopback here and so refuses to start without FORGE_API_TOKEN.
EXPOSE 8080 8000
# A worker answers /health on FORGE_HTTP_PORT, `forge serve` on FORGE_SERVE_PORT, and
# nothing listens on the other one (refused at once), so one check fits both commands.
# The ports are read at probe time, so a changed port is still probed. Models load
# before the endpoint is up, hence the long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["sh", "-c", "curl -fsS --max-time 4 \"http://127.0.0.1:${FORGE_HTTP_PORT}/health\" >/dev/null || curl -fsS --max-time 4 \"http://127.0.0.1:${FORGE_SERVE_PORT}/health\" >/dev/null || exit 1"]
ENTRYPOINT ["forge"]
CMD ["worker"]
