#!/usr/bin/env bash
# Regenerates the Python stubs next to the .proto files. Run after editing a .proto:
#     bash protos/generate.sh
# tests/test_protocol.py fails when the checked-in stubs do not match the .proto.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. losswire/v1/loss_service.proto
