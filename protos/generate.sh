#!/usr/bin/env bash
# Regenerates the Python stubs next to the .proto files. Run after editing a .proto:
#     bash protos/generate.sh
# tests/test_protocol.py fails when the checked-in stubs do not match the .proto.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. losswire/v1/loss_service.proto
# losswire.inference (protos/inference/): the Open Inference Protocol. The -I mapping files the proto
# as losswire/inference/..., so the generated _grpc module imports `losswire.inference`; protoc writes
# under that name, hence a scratch folder and a move next to the .proto.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python -m grpc_tools.protoc -Ilosswire/inference=inference --python_out="$scratch" --pyi_out="$scratch" \
    --grpc_python_out="$scratch" inference/grpc_predict_v2.proto
mv "$scratch"/losswire/inference/* inference/
