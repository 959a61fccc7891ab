"""The Open Inference Protocol (KServe v2 / Triton gRPC) endpoint of the same server.

Two kinds of caller, both against the real in-process server (``server`` fixture, ephemeral port):

- our own generated stubs (``losswire.inference``): ModelInfer for several losses and datatypes,
  compared with the engine (``LOSSES.build(cfg)`` + torch autograd); metadata, readiness; every
  class of bad request gets its status code and a field path;
- Triton's own client, ``tritonclient[grpc]``, which needs protobuf < 7 and so runs in its own
  virtualenv (``LOSSWIRE_OIP_PYTHON``, default ``.venv-oip/bin/python``): ``tests/oip/triton_check.py``
  calls ``is_server_live``, ``is_model_ready``, ``get_model_metadata`` and ``infer()`` and compares
  with the values computed here. Without that virtualenv these tests skip (fail under ``CI=true``).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from support.calls import field_of
from support.loss_cases import boxes
from support.oip import DATATYPES, infer_request, outputs_of, raw
from support.paths import OIP_SCRIPTS, ROOT
from torch import Tensor

from losswire.inference import grpc_predict_v2_pb2 as oip
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from losswire.server import __version__
from losswire.server.losses import LOSSES

PROTO = ROOT / "protos" / "inference" / "grpc_predict_v2.proto"
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
SUBPROCESS_TIMEOUT = 120


# -- the caller's side: requests from torch tensors, responses back to torch ----------------------------


def engine(model: str, config: dict[str, Any], **kwargs: Any) -> Any:
    """The loss computed in this process by the engine itself."""
    return LOSSES.build({"type": model, **config})(**kwargs)


def gradients(output: Tensor, *leaves: Tensor) -> tuple[Tensor, ...]:
    """d(sum(output))/d(leaf): what the server returns for an upstream gradient of ones."""
    return torch.autograd.grad(output.sum(), leaves, retain_graph=True)


def assert_close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def stub(target: str) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))


def labels(n: int, high: int, seed: int) -> Tensor:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed))


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# -- the contract ---------------------------------------------------------------------------------------


def test_generated_stubs_are_fresh(tmp_path):
    """The checked-in stubs describe exactly the .proto (regenerate: bash protos/generate.sh)."""
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    code = protoc.main(["protoc", f"-Ilosswire/inference={PROTO.parent}", f"--descriptor_set_out={out}", str(PROTO)])
    assert code == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    drop_json_names(fresh.message_type)  # the Python plugin does not embed them
    assert fresh == descriptor_pb2.FileDescriptorProto.FromString(oip.DESCRIPTOR.serialized_pb), (
        "stubs are stale: run `bash protos/generate.sh`"
    )
    assert oip.DESCRIPTOR.package == "inference" and "GRPCInferenceService" in oip.DESCRIPTOR.services_by_name


def drop_json_names(messages: Sequence[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        drop_json_names(message.nested_type)


# -- ModelInfer compared with the engine --------------------------------------------------------------


def test_focal_loss_with_class_indices(stub):
    pred, target = randn(8, 5, seed=1), labels(8, 6, seed=2)  # 5 = background
    config = {"gamma": 1.5, "alpha": 0.3}
    response = stub.ModelInfer(
        infer_request("FocalLoss", {"pred": pred, "target": target}, config, avg_factor=3.0), timeout=30
    )
    got = outputs_of(response)
    assert list(got) == ["loss", "grad_pred"]  # the default outputs
    assert response.model_name == "FocalLoss" and response.model_version == "1" and response.id == "req-1"
    leaf = pred.clone().requires_grad_()
    expected = engine("FocalLoss", config, pred=leaf, target=target, avg_factor=3.0)
    assert got["loss"].shape == () and got["loss"].dtype == torch.float32
    assert_close(got["loss"], expected)
    assert_close(got["grad_pred"], *gradients(expected, leaf))


def test_giou_loss_elementwise_with_weight_and_target_gradient(stub):
    pred, target = boxes(torch.Generator().manual_seed(3), 6, torch.float32)
    weight = torch.rand(6, generator=torch.Generator().manual_seed(4)) + 0.1
    config = {"reduction": "none", "loss_weight": 2.0}
    outputs = ["grad_target", "loss", "grad_pred"]
    request = infer_request("GIoULoss", {"pred": pred, "target": target, "weight": weight}, config, outputs)
    got = outputs_of(stub.ModelInfer(request, timeout=30))
    assert list(got) == outputs  # exactly the outputs named, in that order
    leaves = pred.clone().requires_grad_(), target.clone().requires_grad_()
    expected = engine("GIoULoss", config, pred=leaves[0], target=leaves[1], weight=weight)
    assert got["loss"].shape == (6,)
    assert_close(got["loss"], expected)
    grad_pred, grad_target = gradients(expected, *leaves)
    assert_close(got["grad_pred"], grad_pred)
    assert_close(got["grad_target"], grad_target)


def test_cross_entropy_fp64_by_forward_names_with_parameters(stub):
    """cls_score / label (the forward names) work as well as pred / target; ints and strings as parameters."""
    cls_score, label = randn(6, 4, seed=5, dtype=torch.float64), labels(6, 4, seed=6)
    request = infer_request(
        "CrossEntropyLoss", {"cls_score": cls_score, "label": label}, {}, reduction_override="sum", ignore_index=2
    )
    got = outputs_of(stub.ModelInfer(request, timeout=30))
    leaf = cls_score.clone().requires_grad_()
    expected = engine("CrossEntropyLoss", {}, cls_score=leaf, label=label, reduction_override="sum", ignore_index=2)
    assert got["loss"].dtype == torch.float64
    assert_close(got["loss"], expected)
    assert_close(got["grad_pred"], *gradients(expected, leaf))


def test_tuple_target_members(stub):
    """QualityFocalLoss's (label, score) target as target[0] / target[1]; the score's gradient on request."""
    pred, label = randn(6, 5, seed=7), labels(6, 6, seed=8)
    score = torch.rand(6, generator=torch.Generator().manual_seed(9)) * 0.9 + 0.05
    inputs = {"pred": pred, "target[0]": label, "target[1]": score}
    got = outputs_of(stub.ModelInfer(infer_request("QualityFocalLoss", inputs, {}, ["loss", "grad_target[1]"])))
    leaf = score.clone().requires_grad_()
    expected = engine("QualityFocalLoss", {}, pred=pred, target=(label, leaf))
    assert list(got) == ["loss", "grad_target[1]"]
    assert_close(got["loss"], expected)
    assert_close(got["grad_target[1]"], *gradients(expected, leaf))


def test_several_parts_and_a_json_parameter(stub):
    """AssociativeEmbeddingLoss returns (pull, push): loss_0 / loss_1 with per-part gradients; match as JSON."""
    pred, target = randn(1, 1, 4, 4, seed=10), randn(1, 1, 4, 4, seed=11)
    match = [[[[0, 0], [2, 3]], [[1, 1], [3, 2]]]]
    response = stub.ModelInfer(
        infer_request("AssociativeEmbeddingLoss", {"pred": pred, "target": target}, {}, match=json.dumps(match))
    )
    got = outputs_of(response)
    assert sorted(got) == ["grad_pred_0", "grad_pred_1", "loss_0", "loss_1"]
    leaf = pred.clone().requires_grad_()
    pull, push = engine("AssociativeEmbeddingLoss", {}, pred=leaf, target=target, match=match)
    assert_close(got["loss_0"], pull)
    assert_close(got["loss_1"], push)
    assert_close(got["grad_pred_0"], *gradients(pull, leaf))
    assert_close(got["grad_pred_1"], *gradients(push, leaf))


def test_typed_contents_and_avg_factor_tensor(stub):
    """Inputs in typed contents (fp32_contents...) instead of raw bytes; avg_factor as a 1-element tensor."""
    pred, target = randn(3, 2, seed=12), randn(3, 2, seed=13)
    request = oip.ModelInferRequest(model_name="L1Loss")
    for name, tensor in (("pred", pred), ("target", target)):
        message = request.inputs.add(name=name, datatype="FP32", shape=[3, 2])
        message.contents.fp32_contents.extend(tensor.reshape(-1).tolist())
    request.inputs.add(name="avg_factor", datatype="FP64", shape=[1]).contents.fp64_contents.append(4.0)
    got = outputs_of(stub.ModelInfer(request, timeout=30))
    leaf = pred.clone().requires_grad_()
    expected = engine("L1Loss", {}, pred=leaf, target=target, avg_factor=4.0)
    assert_close(got["loss"], expected)
    assert_close(got["grad_pred"], *gradients(expected, leaf))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_travels_raw(stub, dtype):
    pred, target = randn(4, 3, seed=14, dtype=dtype), randn(4, 3, seed=15, dtype=dtype)
    got = outputs_of(stub.ModelInfer(infer_request("SmoothL1Loss", {"pred": pred, "target": target})))
    leaf = pred.clone().requires_grad_()
    expected = engine("SmoothL1Loss", {}, pred=leaf, target=target)
    assert got["loss"].dtype == dtype and got["grad_pred"].dtype == dtype
    torch.testing.assert_close(got["loss"], expected.detach())
    torch.testing.assert_close(got["grad_pred"], gradients(expected, leaf)[0])


def test_only_the_loss_means_no_gradient(stub):
    pred, target = randn(4, 3, seed=16), labels(4, 3, seed=17)
    got = outputs_of(stub.ModelInfer(infer_request("FocalLoss", {"pred": pred, "target": target}, {}, ["loss"])))
    assert list(got) == ["loss"]
    assert_close(got["loss"], engine("FocalLoss", {}, pred=pred, target=target))


# -- health, metadata, unimplemented methods --------------------------------------------------------------


def test_server_live_ready_and_metadata(stub):
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    metadata = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert (metadata.name, metadata.version, list(metadata.extensions)) == ("losswire", __version__, [])


@pytest.mark.parametrize(
    "name, version, ready",
    [("FocalLoss", "", True), ("FocalLoss", "1", True), ("FocalLoss", "2", False), ("FocalLos", "", False)],
)
def test_model_ready(stub, name, version, ready):
    assert stub.ModelReady(oip.ModelReadyRequest(name=name, version=version)).ready is ready


def test_model_metadata(stub):
    metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="CrossEntropyLoss"))
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("CrossEntropyLoss", ["1"], "losswire")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs == {
        "pred": ("FP32", [-1]),
        "target": ("FP32", [-1]),
        "weight": ("FP32", [-1]),
        "avg_factor": ("FP32", [1]),
    }
    assert [t.name for t in metadata.outputs] == ["loss", "grad_pred", "grad_target"]
    bounded = stub.ModelMetadata(oip.ModelMetadataRequest(name="BoundedIoULoss", version="1"))
    assert [t.name for t in bounded.outputs] == ["loss", "grad_pred"]  # its target has no gradient


@pytest.mark.parametrize(
    "request_, field",
    [
        (oip.ModelMetadataRequest(name="GIoU"), "name"),
        (oip.ModelMetadataRequest(name="GIoULoss", version="7"), "version"),
    ],
)
def test_model_metadata_of_unknown_model_is_not_found(stub, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(request_)
    assert info.value.code() == NOT_FOUND and field_of(info.value) == field


def test_other_triton_methods_are_unimplemented(target):
    """Methods of Triton's service that this proto lacks: gRPC answers UNIMPLEMENTED."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelConfig")
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_lists_the_service(target):
    with grpc.insecure_channel(target) as channel:
        assert "inference.GRPCInferenceService" in ProtoReflectionDescriptorDatabase(channel).get_services()


# -- bad requests -------------------------------------------------------------------------------------


def good_request() -> oip.ModelInferRequest:
    """A valid FocalLoss request: pred FP32 [4, 3], target INT64 [4]; the cases below break one thing."""
    return infer_request("FocalLoss", {"pred": randn(4, 3, seed=18), "target": labels(4, 4, seed=19)}, {})


def mutated(change: Callable[[oip.ModelInferRequest], Any]) -> oip.ModelInferRequest:
    request = good_request()
    change(request)
    return request


def set_parameter(name: str, kind: str, value: Any) -> Callable[[oip.ModelInferRequest], None]:
    return lambda r: setattr(r.parameters[name], kind, value)


def set_config(text: str) -> Callable[[oip.ModelInferRequest], None]:
    return set_parameter("config", "string_param", text)


def add_input(name: str, tensor: Tensor) -> Callable[[oip.ModelInferRequest], None]:
    def change(request: oip.ModelInferRequest) -> None:
        request.inputs.add(name=name, datatype=DATATYPES[tensor.dtype], shape=list(tensor.shape))
        request.raw_input_contents.append(raw(tensor))

    return change


def drop_target(request: oip.ModelInferRequest) -> None:
    del request.inputs[1]
    del request.raw_input_contents[1]


def drop_pred(request: oip.ModelInferRequest) -> None:
    del request.inputs[0]
    del request.raw_input_contents[0]


def mixed_contents(request: oip.ModelInferRequest) -> None:
    request.inputs[0].contents.fp32_contents.extend([0.0] * 12)


def typed_contents(datatype: str, field: str, values: list[Any]) -> Callable[[oip.ModelInferRequest], None]:
    """The request with its inputs in typed contents, the target as ``datatype`` from ``values``."""

    def change(request: oip.ModelInferRequest) -> None:
        pred = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
        del request.raw_input_contents[:]
        request.inputs[0].contents.fp32_contents.extend(pred.tolist())
        request.inputs[1].datatype = datatype
        getattr(request.inputs[1].contents, field).extend(values)

    return change


BAD_REQUESTS = {
    "unknown model": (
        lambda r: setattr(r, "model_name", "FocalLos"),
        NOT_FOUND,
        "model_name",
        "did you mean FocalLoss",
    ),
    "unknown version": (lambda r: setattr(r, "model_version", "2"), NOT_FOUND, "model_version", "version '1' only"),
    "bad datatype": (lambda r: setattr(r.inputs[0], "datatype", "FP8"), INVALID, "inputs[0].datatype", "input 'pred'"),
    "BYTES datatype": (lambda r: setattr(r.inputs[1], "datatype", "BYTES"), INVALID, "inputs[1].datatype", "'target'"),
    "raw byte count": (
        lambda r: r.raw_input_contents.__setitem__(1, b"\0" * 24),
        INVALID,
        "raw_input_contents[1]",
        "input 'target' (inputs[1]): raw_input_contents[1] holds 24 bytes; INT64 [4] needs 4 x 8 = 32",
    ),
    "raw entry missing": (
        lambda r: r.raw_input_contents.pop(),
        INVALID,
        "raw_input_contents",
        "1 entries for 2 inputs",
    ),
    "negative size": (lambda r: r.inputs[0].shape.__setitem__(0, -4), INVALID, "inputs[0].shape", "non-negative"),
    "shape mismatch": (
        lambda r: r.inputs[1].shape.__setitem__(0, 2) or r.raw_input_contents.__setitem__(1, b"\0" * 16),
        INVALID,
        "target",
        "target of class indices must have shape [N] = [4] for pred [4, 3], got [2]",
    ),
    "missing target": (drop_target, INVALID, "target", "needs input 'target'"),
    "missing pred": (drop_pred, INVALID, "pred", "needs input tensor 'pred'"),
    "unknown input": (add_input("weights", torch.ones(4)), INVALID, "inputs[2].name", "no input tensor 'weights'"),
    "input twice": (add_input("pred", torch.ones(4, 3)), INVALID, "inputs[2].name", "'pred' is given twice"),
    "contents and raw": (mixed_contents, INVALID, "inputs[0].contents", "send every input one way"),
    "contents overflow": (
        typed_contents("INT8", "int_contents", [0, 1, 300, 2]),
        INVALID,
        "inputs[1].contents.int_contents",
        "values that do not fit INT8",
    ),
    "contents count": (
        typed_contents("INT64", "int64_contents", [0, 1, 2]),
        INVALID,
        "inputs[1].contents",
        "inputs[1].contents holds 24 bytes; INT64 [4] needs 4 x 8 = 32",
    ),
    "values in another type's field": (
        typed_contents("INT64", "fp32_contents", [0.0, 1.0, 2.0, 0.0]),
        INVALID,
        "inputs[1].contents.fp32_contents",
        "is INT64, whose values go in contents.int64_contents; got values in contents.fp32_contents",
    ),
    "bytes contents": (
        typed_contents("INT64", "bytes_contents", [b"0", b"1", b"2", b"0"]),
        INVALID,
        "inputs[1].contents.bytes_contents",
        "got values in contents.bytes_contents",
    ),
    "FP16 in contents": (
        typed_contents("FP16", "fp32_contents", [0.0] * 4),
        INVALID,
        "inputs[1].contents",
        "raw_input_contents only",
    ),
    "tuple members with a gap": (
        lambda r: setattr(r.inputs[1], "name", "target[1]"),
        INVALID,
        "target",
        "input 'target' has members [1]: they are numbered from 0 without a gap, and target[0] is missing",
    ),
    "bad JSON config": (set_config('{"gamma": 2'), INVALID, "parameters[config]", "not valid JSON"),
    "config not an object": (set_config("[2.0]"), INVALID, "parameters[config]", "must be a JSON object"),
    "config of another loss": (set_config('{"type": "GIoULoss"}'), INVALID, "config.type", "the model is 'FocalLoss'"),
    "bad config value": (set_config('{"gamma": "high"}'), INVALID, "config.gamma", "FocalLoss.gamma must be a float"),
    "config as an int": (
        set_parameter("config", "int64_param", 3),
        INVALID,
        "parameters[config]",
        "JSON object string",
    ),
    "unknown parameter": (
        set_parameter("reduction", "string_param", "sum"),
        INVALID,
        "parameters[reduction]",
        "no parameter 'reduction'",
    ),
    "bad reduction_override": (
        set_parameter("reduction_override", "string_param", "avg"),
        INVALID,
        "reduction_override",
        "must be one of ['none', 'mean', 'sum'], got 'avg'",
    ),
    "avg_factor twice": (
        lambda r: (
            add_input("avg_factor", torch.tensor([2.0]))(r) or set_parameter("avg_factor", "double_param", 2.0)(r)
        ),
        INVALID,
        "parameters[avg_factor]",
        "both as a tensor and as a parameter",
    ),
    "avg_factor of two numbers": (
        add_input("avg_factor", torch.tensor([2.0, 3.0])),
        INVALID,
        "inputs[2].shape",
        "one number",
    ),
    "unknown output": (lambda r: r.outputs.add(name="grad_weight"), INVALID, "outputs[0].name", "'grad_weight'"),
    "gradient of class indices": (
        lambda r: r.outputs.add(name="grad_target"),
        INVALID,
        "outputs[0].name",
        "its outputs are: loss, plus grad_<input> for a float input among pred, target",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_request_status(stub, case):
    change, code, field, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(mutated(change), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    assert field_of(info.value) == field
    # the server is unharmed and answers the good request
    assert "loss" in outputs_of(stub.ModelInfer(good_request(), timeout=30))


def test_triton_parameters_are_ignored(stub):
    """tritonclient may send priority / timeout / sequence_* / triton_*: accepted, not refused."""
    request = good_request()
    request.parameters["priority"].uint64_param = 1
    request.parameters["timeout"].int64_param = 10_000
    request.parameters["triton_enable_empty_final_response"].bool_param = False
    assert "loss" in outputs_of(stub.ModelInfer(request, timeout=30))


# -- Triton's own client, in its own virtualenv ----------------------------------------------------------


def oip_python() -> str:
    """The tritonclient virtualenv's interpreter; skip (fail under CI=true) when there is none."""
    python = Path(os.environ.get("LOSSWIRE_OIP_PYTHON", ROOT / ".venv-oip" / "bin" / "python"))
    if python.exists():
        return str(python)
    reason = (
        f"no tritonclient virtualenv at {python} (LOSSWIRE_OIP_PYTHON); create it with: "
        "python3 -m venv .venv-oip && .venv-oip/bin/pip install 'tritonclient[grpc]==2.73.0' numpy"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def run_oip(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [oip_python(), str(OIP_SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


def tensor_spec(tensor: Tensor) -> dict[str, Any]:
    tensor = tensor.detach()
    return {"datatype": DATATYPES[tensor.dtype], "shape": list(tensor.shape), "data": tensor.reshape(-1).tolist()}


def triton_case(case_id: str, model: str, config: dict[str, Any], inputs: dict[str, Tensor], **options: Any) -> dict:
    """A case for triton_check.py, its expected outputs computed here with the engine and autograd.

    ``options``: ``parameters`` (forward inputs sent as request parameters), ``outputs`` (the
    outputs to request; default: the server's, loss and grad_pred).
    """
    parameters, outputs = options.get("parameters", {}), options.get("outputs")
    names = [spec.name for spec in LOSSES.describe(model).inputs]
    forward = dict(zip(names, inputs.values(), strict=False))  # pred, target... by the forward names
    keys = dict(zip(names, inputs, strict=False))
    wanted = [n.removeprefix("grad_") for n in outputs or ["grad_pred"] if n.startswith("grad_")]
    leaves = {k: forward[n].clone().requires_grad_() for n, k in keys.items() if k in wanted}
    loss = engine(model, config, **{**forward, **{n: leaves[k] for n, k in keys.items() if k in leaves}}, **parameters)
    grads = dict(zip(leaves, gradients(loss, *leaves.values()), strict=True))
    expected = {"loss": tensor_spec(loss), **{f"grad_{k}": tensor_spec(g) for k, g in grads.items()}}
    return {
        "id": case_id,
        "model": model,
        "config": config,
        "parameters": parameters,
        "inputs": [{"name": name, **tensor_spec(tensor)} for name, tensor in inputs.items()],
        "outputs": outputs,
        "expected": {name: expected[name] for name in outputs or expected},
    }


def triton_cases() -> dict[str, Any]:
    pred_boxes, target_boxes = boxes(torch.Generator().manual_seed(20), 6, torch.float32)
    focal_inputs = {"pred": randn(8, 5, seed=21), "target": labels(8, 6, seed=22)}
    return {
        "cases": [
            triton_case(
                "FocalLoss, INT64 class indices, avg_factor as a float parameter",
                "FocalLoss",
                {"gamma": 1.5, "alpha": 0.3},
                focal_inputs,
                parameters={"avg_factor": 3.0},
            ),
            triton_case(
                "GIoULoss, reduction none, weight, the target's gradient",
                "GIoULoss",
                {"reduction": "none"},
                {"pred": pred_boxes, "target": target_boxes, "weight": torch.linspace(0.5, 1.5, 6)},
                outputs=["loss", "grad_pred", "grad_target"],
            ),
            triton_case(
                "CrossEntropyLoss, FP64 scores, INT64 labels, reduction_override sum",
                "CrossEntropyLoss",
                {},
                {"pred": randn(6, 4, seed=23, dtype=torch.float64), "target": labels(6, 4, seed=24)},
                parameters={"reduction_override": "sum"},
            ),
        ],
        "errors": [
            {**triton_case("unknown model", "FocalLoss", {}, focal_inputs), "model": "NoSuchLoss"}
            | {"status": "StatusCode.NOT_FOUND", "message": "unknown loss type 'NoSuchLoss'"},
            {
                **triton_case("bad config", "FocalLoss", {}, focal_inputs),
                "config": {"gamma": "high"},
                "status": "StatusCode.INVALID_ARGUMENT",
                "message": "gamma",
            },
        ],
        "not_ready": ["NoSuchLoss"],
    }


def test_tritonclient_infers_what_the_engine_computes(target, tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(triton_cases()))
    result = run_oip("triton_check.py", "--url", target, "--cases", str(cases))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and result.stdout.count("ok  ") == 3 + 3 * 2 + 2


def test_tritonclient_check_can_fail(target, tmp_path):
    """A wrong expected value makes triton_check.py exit non-zero and say which output differs."""
    content = triton_cases()
    content["cases"][0]["expected"]["grad_pred"]["data"][3] += 0.01
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(content))
    result = run_oip("triton_check.py", "--url", target, "--cases", str(cases))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL FocalLoss" in result.stdout and "grad_pred: values differ" in result.stdout


def test_proto_is_wire_compatible_with_tritonclient(tmp_path):
    """Every message of our proto has exactly Triton's fields (names, numbers, types); methods too."""
    out = tmp_path / "triton.pb"
    result = run_oip("triton_descriptor.py", str(out))
    assert result.returncode == 0, result.stderr
    triton = descriptor_pb2.FileDescriptorProto.FromString(out.read_bytes())
    ours = descriptor_pb2.FileDescriptorProto.FromString(oip.DESCRIPTOR.serialized_pb)
    assert ours.package == triton.package == "inference"

    def fields(message: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
        own = {f.number: (f.name, f.type, f.label, f.type_name) for f in message.field}
        return {"fields": own, "nested": {n.name: fields(n) for n in message.nested_type}}

    theirs = {m.name: fields(m) for m in triton.message_type}
    for message in ours.message_type:
        assert fields(message) == theirs[message.name], message.name
    triton_methods = {m.name: (m.input_type, m.output_type) for m in triton.service[0].method}
    for method in ours.service[0].method:
        assert triton_methods[method.name] == (method.input_type, method.output_type), method.name
