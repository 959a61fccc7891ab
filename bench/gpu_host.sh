#!/usr/bin/env bash
# Runs a command from this checkout on a GPU host that has Python, torch (CUDA) and Triton but not losswire
# nor its dependencies, and may reach no package index: the dependencies come as wheels in a folder.
#
#   # here, with a venv: the wheels for the GPU host's Python (3.12 shown)
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#       -d .whl grpcio grpcio-tools grpcio-health-checking grpcio-reflection grpcio-status protobuf \
#       googleapis-common-protos python-json-logger prometheus-client mmengine-lite addict termcolor yapf \
#       platformdirs hypothesis==6.170.15 attrs sortedcontainers pytest-xdist execnet numpy
#   # there, from the checkout's root (.whl/ is gitignored; carry it with the tree):
#   WHEELS=.whl bash bench/gpu_host.sh python3 bench/gpu.py --out "$OUT"
#   WHEELS=.whl bash bench/gpu_host.sh python3 -m pytest -n 12 -rfE --tb=short tests/engine
#
# It installs the wheels into $SITE (numpy, pytest and the like only where the host lacks them, so that
# the host's own builds, which its torch was built against, stay first), lays the checkout out as the
# `losswire` namespace the package installs (symlinks under $LAYOUT, no pip install), puts a `losswire`
# command on PATH, sets LOSSWIRE_TEST_DEVICE=cuda, and runs the command.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/losswire-site}
LAYOUT=${LAYOUT:-/tmp/losswire-layout}
PYTHON=${PYTHON:-python3}

mkdir -p "$SITE" "$LAYOUT/losswire" "$LAYOUT/bin"
# once per $SITE (a second command on the same host starts at once), in one pip call: wheels that share a
# top-level package (protobuf's and googleapis-common-protos' google/) are merged, where one --target
# install per wheel would replace the folder the previous one made
if [[ ! -e "$SITE/.losswire-wheels" ]]; then
    wanted=()
    for wheel in "$WHEELS"/*.whl; do
        [[ -e "$wheel" ]] || break
        name=$(basename "$wheel")
        module=${name%%-*}
        case "$module" in
        numpy | pytest | pytest_xdist | execnet | pluggy | iniconfig | packaging | prometheus_client)
            [[ "$module" == pytest_xdist ]] && module=xdist
            "$PYTHON" -c "import $module" 2>/dev/null && continue
            ;;
        esac
        wanted+=("$wheel")
    done
    if ((${#wanted[@]})); then
        "$PYTHON" -m pip install --quiet --no-deps --target "$SITE" "${wanted[@]}"
    fi
    touch "$SITE/.losswire-wheels"
fi
# the package's layout (pyproject.toml's package-dir)
ln -sfn "$ROOT/server" "$LAYOUT/losswire/server"
ln -sfn "$ROOT/client" "$LAYOUT/losswire/client"
ln -sfn "$ROOT/protos/wire" "$LAYOUT/losswire/wire"
ln -sfn "$ROOT/protos/losswire/v1" "$LAYOUT/losswire/v1"
ln -sfn "$ROOT/protos/inference" "$LAYOUT/losswire/inference"
printf '#!/bin/sh\nexec %s -c "from losswire.server.cli import main; main()" "$@"\n' "$PYTHON" >"$LAYOUT/bin/losswire"
chmod +x "$LAYOUT/bin/losswire"

export PYTHONPATH="$LAYOUT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$LAYOUT/bin:$PATH"
export LOSSWIRE_TEST_DEVICE=${LOSSWIRE_TEST_DEVICE:-cuda}
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
fi
"$PYTHON" -c "import sys, torch, losswire.server; print('python', sys.version.split()[0], 'torch', torch.__version__)"
exec "$@"
