"""The caller's side of the Open Inference Protocol in tests: requests from torch tensors, responses back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from losswire.inference import grpc_predict_v2_pb2 as oip

# the protocol's datatype names, written out here rather than taken from the server's table
DATATYPES = {
    torch.float32: "FP32",
    torch.float64: "FP64",
    torch.float16: "FP16",
    torch.bfloat16: "BF16",
    torch.int64: "INT64",
    torch.int32: "INT32",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in DATATYPES.items()}


def raw(tensor: Tensor) -> bytes:
    """Raw little-endian row-major bytes (BF16 through a 16-bit view: numpy has no bfloat16)."""
    flat = tensor.contiguous()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def infer_request(
    model: str,
    inputs: dict[str, Tensor],
    config: dict[str, Any] | None = None,
    outputs: Sequence[str] = (),
    **parameters: Any,
) -> oip.ModelInferRequest:
    """A ModelInferRequest as tritonclient builds one: raw_input_contents in the order of inputs."""
    request = oip.ModelInferRequest(model_name=model, id="req-1")
    for name, tensor in inputs.items():
        request.inputs.add(name=name, datatype=DATATYPES[tensor.dtype], shape=list(tensor.shape))
        request.raw_input_contents.append(raw(tensor))
    for name in outputs:
        request.outputs.add(name=name)
    if config is not None:
        request.parameters["config"].string_param = json.dumps(config)
    for name, value in parameters.items():
        set_parameter(request.parameters[name], value)
    return request


def set_parameter(slot: oip.InferParameter, value: str | bool | int | float) -> None:
    """Fill an InferParameter with ``value`` in the field its type goes to (bool before int: a bool is one)."""
    if isinstance(value, str):
        slot.string_param = value
    elif isinstance(value, bool):
        slot.bool_param = value
    elif isinstance(value, int):
        slot.int64_param = value
    else:
        slot.double_param = value


def outputs_of(response: oip.ModelInferResponse) -> dict[str, Tensor]:
    """The response's outputs by name, decoded from raw_output_contents."""
    assert len(response.raw_output_contents) == len(response.outputs)
    decoded = {}
    for output, data in zip(response.outputs, response.raw_output_contents, strict=True):
        dtype = TORCH_DTYPES[output.datatype]
        carrier = torch.int16 if dtype == torch.bfloat16 else dtype
        array = np.frombuffer(data, dtype=torch.empty(0, dtype=carrier).numpy().dtype).copy()
        decoded[output.name] = torch.from_numpy(array).view(dtype).reshape(list(output.shape))
    return decoded
