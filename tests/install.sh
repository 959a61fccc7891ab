#!/usr/bin/env bash
# Installs everything the test suite needs, from nothing, into the repository root:
#   .venv/                  the project with its test extra (torch pinned first: see below)
#   examples/node/node_modules   the Node.js caller's packages, from the committed lockfile
#   .venv-oip/              Triton's client for the Open Inference Protocol tests; tritonclient[grpc]
#                           needs protobuf < 7, so it cannot share .venv (protobuf >= 7.35)
# Then: .venv/bin/python -m pytest -q   (README's Quick start; CI runs this script too)
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: this machine has a local CPU wheel of exactly 2.13.0; any other version
# (or an unpinned resolve) would pull gigabytes of CUDA packages.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'

npm ci --prefix examples/node --no-audit --no-fund

python3 -m venv .venv-oip
.venv-oip/bin/python -m pip install -q 'tritonclient[grpc]==2.73.0' numpy

# nginx for the proxy test (tests/operations/test_proxy.py): Debian's package where this user may install
# it; elsewhere the test skips (under CI=true it fails instead: CI runs as root and installs it)
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
