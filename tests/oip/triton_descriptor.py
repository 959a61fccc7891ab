"""Writes tritonclient's own ``grpc_service.proto`` descriptor (a serialized FileDescriptorProto) to a file.

Runs in the tritonclient virtualenv; tests/service/test_inference_protocol.py compares its messages with
losswire's ``protos/inference/grpc_predict_v2.proto`` field by field (wire compatibility):

    .venv-oip/bin/python tests/oip/triton_descriptor.py OUT.pb
"""

from __future__ import annotations

import sys
from pathlib import Path

from tritonclient.grpc import service_pb2

if __name__ == "__main__":
    Path(sys.argv[1]).write_bytes(service_pb2.DESCRIPTOR.serialized_pb)
