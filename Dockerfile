# losswire server image: `losswire serve` on 0.0.0.0:50051, CUDA when the container sees a GPU, else the CPU.
#
#   docker build -t losswire .
#   docker run --gpus all -p 50051:50051 losswire
#
# torch comes from PyPI, whose Linux wheel bundles the CUDA runtime: the host needs only the NVIDIA
# driver and the NVIDIA container toolkit. Stages: `requirements` (the dependency list alone),
# `deps` (a venv with torch and the dependencies), `build` (the losswire wheel) and the runtime stage,
# which copies the venv and installs the wheel on top, so a source change rebuilds one small layer.
# Any base with python3 >= 3.11 (tomllib) and the venv module works; tests/container/smoke.sh builds on
# a debootstrapped Debian (python3 in /usr/bin) where no registry is reachable. See docs/deployment.md.
ARG BASE_IMAGE=python:3.11-slim

# The dependency list alone: the layers that install it are keyed on this file's content, so a
# pyproject.toml edit that keeps the dependencies (version, tool settings) keeps them cached.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /build
COPY pyproject.toml ./
RUN python3 -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('requirements.txt', 'w').write(chr(10).join(deps) + chr(10))"

# Wheels that pip may take from the build context's .docker-wheels/ folder (gitignored; absent in a
# normal build). The smoke test hard-links the local CPU torch wheel there. .dockerignore is a file
# that always exists, so this COPY succeeds without the folder, and it rarely changes (cache key).
FROM scratch AS local-wheels
COPY .dockerignore .docker-wheels* /wheels/

FROM ${BASE_IMAGE} AS deps
# A venv rather than the base's site-packages: the same layout whether python lives in /usr/local
# (python:*-slim) or /usr (Debian's python3), and one directory to copy into the runtime stage.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# TORCH_SPEC: what pip installs as torch (PyPI's default Linux build is the CUDA one).
# TORCH_INDEX_URL: another index for torch, e.g. https://download.pytorch.org/whl/cu126 (default PyPI).
# PIP_CERT: a CA bundle for pip behind an intercepting proxy; pass it as the BuildKit secret
# `pip_cert` and set PIP_CERT=/run/secrets/pip_cert (build stages only, never in the image).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=""
ARG PIP_CERT
# torch first and alone: the largest layer (gigabytes with CUDA) and the one that changes least.
# DL3013 (unpinned pip install): the pin is TORCH_SPEC's value, which hadolint cannot read.
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert \
    --mount=type=bind,from=local-wheels,source=/wheels,target=/wheels \
    pip install --find-links /wheels ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
COPY --from=requirements /build/requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert \
    pip install -r /tmp/requirements.txt

# The losswire wheel, built from the sources alone (explicit COPYs keep the tests and wheels out).
FROM deps AS build
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY client client
COPY server server
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert \
    pip wheel --no-deps --wheel-dir /dist .

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="losswire" \
      org.opencontainers.image.description="gRPC service that evaluates MMDetection-style losses and their gradients" \
      org.opencontainers.image.licenses="Apache-2.0"
# NVIDIA_DRIVER_CAPABILITIES: compute gives torch libcuda (the NVIDIA toolkit's default is utility
# alone); utility gives nvidia-smi. Metrics on 9464 (Prometheus text at /metrics). MALLOC_ARENA_MAX:
# each of gRPC's threads would otherwise get a glibc arena of its own, which callers' floods of HTTP/2
# frames grow and keep (12 connections of ignored frames: 1.18 GB, 772 MB kept; with 2 arenas 672 / 451 MB).
# TRITON_CACHE_DIR: the GPU kernels torch.compile builds go to /tmp (an emptyDir under Kubernetes'
# read-only root file system), not to the read-only home.
ENV PATH=/opt/venv/bin:$PATH \
    MALLOC_ARENA_MAX=2 \
    TRITON_CACHE_DIR=/tmp/triton \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LOSSWIRE_METRICS_PORT=9464
RUN groupadd --system --gid 10001 losswire \
    && useradd --system --uid 10001 --gid losswire --no-log-init --create-home --home-dir /home/losswire losswire
# The GPU kernels' toolchain: Triton builds a small C launcher for each GPU kernel at its first call, with
# the system's C compiler and Python's headers (python:*-slim carries its headers; a Debian python3 needs
# libpython3.X-dev). Without them the fused kernels answer on a GPU, 2-12x slower (docs/deployment.md);
# GPU_KERNEL_TOOLCHAIN=no leaves them out of an image that will never see a GPU.
ARG GPU_KERNEL_TOOLCHAIN=yes
# DL3008: Debian's gcc of the base's release (a pin would break with each point release)
# hadolint ignore=DL3008
RUN if [ "$GPU_KERNEL_TOOLCHAIN" = yes ]; then \
        include="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"; \
        headers=""; \
        [ -f "$include/Python.h" ] || headers="libpython$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')-dev"; \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev ${headers:+"$headers"} \
        && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi
# The venv is root-owned, read-only to the server; dependencies and the package are separate layers.
COPY --from=deps /opt/venv /opt/venv
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-cache-dir --no-deps /dist/*.whl
# numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd
USER 10001:10001
WORKDIR /home/losswire
# 50051: gRPC (LOSSWIRE_PORT); 9464: Prometheus metrics (LOSSWIRE_METRICS_PORT; "none" turns it off).
EXPOSE 50051 9464
# The standard gRPC health service, asked for losswire.v1.LossService by `losswire health` (Python,
# no grpc_health_probe download), which finds the server by the same settings as `serve`: the
# LOSSWIRE_* variables and LOSSWIRE_CONFIG (a port given only as a `serve` flag is not seen by it).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["losswire", "health", "--timeout", "5"]
ENTRYPOINT ["losswire", "serve"]
