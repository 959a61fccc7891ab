"""Every class of bad request gets its status code and a message naming the field; the server
keeps serving and answers the next good request correctly."""

from __future__ import annotations

import grpc
import pytest
import torch
from support.calls import field_of
from support.oip import infer_request

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

INVALID, NOT_FOUND, EXHAUSTED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def term(config, pred=None, target=None, **fields) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest()
    message = request.terms.add(name=fields.pop("name", ""))
    codec.encode_config(config, message.config)
    if pred is not None:
        codec.encode_tensor(pred, message.pred)
    if target is not None:
        codec.encode_value(target, message.target)
    for key, value in fields.items():
        if key == "weight":
            codec.encode_tensor(value, message.weight)
        elif key == "grad_output":
            codec.encode_tensor(value, message.grad_output)
        elif key == "gradients":
            message.gradients.extend(value)
        elif key in ("avg_factor", "reduction_override"):
            setattr(message, key, value)
        else:
            codec.encode_value(value, message.inputs[key])
    return request


def logits():
    return torch.randn(4, 3)


def labels():
    return torch.tensor([0, 1, 2, 3])


def in_session(request: pb.EvaluateRequest) -> pb.EvaluateRequest:
    """``request`` with its first term in a session: autograd's path answers it, not a fused kernel."""
    request.terms[0].session = "errors-session"
    return request


BOXES = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 4], [0, 0, 1, 1], [2, 2, 5, 5]])


def without_sampler(name: str) -> pb.EvaluateRequest:
    """A FocalLoss term without config.sampler that sends ``name`` (sample_labels or sample_groups)."""
    request = term({"type": "FocalLoss"}, logits(), labels())
    codec.encode_tensor(torch.zeros(4, dtype=torch.long), getattr(request.terms[0], name))
    return request


def raw(mutate) -> pb.EvaluateRequest:
    """A good L1 request, then `mutate(term)` breaks it at the protobuf level."""
    request = term({"type": "L1Loss"}, torch.ones(2, 3), torch.zeros(2, 3))
    mutate(request.terms[0])
    return request


CASES = {
    "unknown loss": (
        term({"type": "FocalLos"}, logits(), labels()),
        NOT_FOUND,
        "terms[0].config.type",
        "did you mean FocalLoss",
    ),
    "no type": (term({"gamma": 2.0}, logits(), labels()), INVALID, "terms[0].config.type", "no 'type' key"),
    "unknown parameter": (
        term({"type": "FocalLoss", "gama": 2}, logits(), labels()),
        INVALID,
        "terms[0].config.gama",
        "valid parameters: use_sigmoid",
    ),
    "ill-typed parameter": (
        term({"type": "FocalLoss", "gamma": "high"}, logits(), labels()),
        INVALID,
        "terms[0].config.gamma",
        "FocalLoss.gamma must be a float, got str 'high'",
    ),
    "shape mismatch": (
        term({"type": "L1Loss"}, torch.ones(2, 3), torch.ones(3, 2)),
        INVALID,
        "terms[0].target",
        r"shape of pred [2, 3], got [3, 2]",
    ),
    "label out of range": (
        term({"type": "FocalLoss"}, logits(), torch.tensor([0, 1, 7, 2])),
        INVALID,
        "terms[0].target",
        "got values in [0, 7]",
    ),
    "float labels for indices": (
        term({"type": "CrossEntropyLoss"}, logits(), torch.rand(4)),
        INVALID,
        "terms[0].label",
        "shape of cls_score",
    ),
    "dtype unspecified": (
        raw(lambda t: setattr(t.pred, "dtype", pb.DTYPE_UNSPECIFIED)),
        INVALID,
        "terms[0].pred.dtype",
        "got DTYPE_UNSPECIFIED",
    ),
    "unknown dtype number": (raw(lambda t: setattr(t.pred, "dtype", 99)), INVALID, "terms[0].pred.dtype", "got 99"),
    "byte length": (
        raw(lambda t: setattr(t.pred, "data", t.pred.data[:-1])),
        INVALID,
        "terms[0].pred.data",
        "must hold 6 x 4 = 24 bytes for dtype FLOAT32 and shape [2, 3], got 23 bytes",
    ),
    "huge declared shape, few bytes": (
        raw(lambda t: t.pred.shape.extend([10**6, 10**6])),
        EXHAUSTED,
        "terms[0].pred.shape",
        "--max-message-bytes",
    ),
    "negative dimension": (
        raw(lambda t: t.pred.shape.__setitem__(0, -2)),
        INVALID,
        "terms[0].pred.shape",
        "non-negative",
    ),
    "too many dimensions": (raw(lambda t: t.pred.shape.extend([1] * 20)), INVALID, "terms[0].pred.shape", "at most"),
    "missing pred": (raw(lambda t: t.ClearField("pred")), INVALID, "terms[0].pred", "pred is missing"),
    "missing target": (raw(lambda t: t.ClearField("target")), INVALID, "terms[0].target", "needs input 'target'"),
    "no terms": (pb.EvaluateRequest(), INVALID, "terms", "no terms"),
    "empty config": (raw(lambda t: t.ClearField("config")), INVALID, "terms[0].config", "config is empty"),
    "bad reduction_override": (
        term({"type": "L1Loss"}, torch.ones(2), torch.zeros(2), reduction_override="avg"),
        INVALID,
        "terms[0].reduction_override",
        "must be one of ['none', 'mean', 'sum'], got 'avg'",
    ),
    "avg_factor with sum": (
        term({"type": "L1Loss", "reduction": "sum"}, torch.ones(2), torch.zeros(2), avg_factor=2.0),
        INVALID,
        "terms[0].avg_factor",
        "avg_factor can not be used with reduction='sum'",
    ),
    "unknown input": (
        term({"type": "L1Loss"}, torch.ones(2), torch.zeros(2), label_weight=torch.ones(2)),
        INVALID,
        "terms[0].label_weight",
        "L1Loss has no input 'label_weight'; its inputs are: pred, target, weight",
    ),
    "ill-typed input": (
        term({"type": "CrossEntropyLoss"}, logits(), torch.tensor([0, 1, 2, 0]), ignore_index="two"),
        INVALID,
        "terms[0].ignore_index",
        "must be an integer, got str",
    ),
    # an integral number past int64 for an integer input, on the fused path and autograd's
    **{
        f"integer input {value!r}{' in a session' if session else ''}": (
            (in_session if session else lambda r: r)(
                term({"type": "CrossEntropyLoss"}, logits(), torch.tensor([0, 1, 2, 0]), ignore_index=value)
            ),
            INVALID,
            "terms[0].ignore_index",
            f"CrossEntropyLoss input 'ignore_index' must be an int64, in [-2**63, 2**63 - 1], got float {value!r}",
        )
        for value in (1e308, 1e19, -1e19)
        for session in (False, True)
    },
    # a config value torch cannot convert to pred's dtype: the fused kernel fails as autograd's path does
    **{
        f"GIoULoss eps {eps!r} past float32": (
            term({"type": "GIoULoss", "eps": eps}, BOXES, BOXES + 1),
            INVALID,
            None,
            "GIoULoss failed on these inputs: value cannot be converted to type float without overflow",
        )
        for eps in (1e39, 1e308)
    },
    "gradient of class indices": (
        term({"type": "FocalLoss"}, logits(), labels(), gradients=["target"]),
        INVALID,
        "terms[0].gradients",
        "holds no floating-point tensor (torch.int64)",
    ),
    "gradient of unknown input": (
        term({"type": "FocalLoss"}, logits(), labels(), gradients=["avg_factor"]),
        INVALID,
        "terms[0].gradients",
        "returns gradients for its floating-point tensor inputs ['pred', 'target', 'weight'] only",
    ),
    "gradient of a weight not sent": (
        term({"type": "FocalLoss"}, logits(), labels(), gradients=["weight"]),
        INVALID,
        "terms[0].gradients",
        "gradient of 'weight' requested but that input was not sent",
    ),
    "gradients none with a name": (
        term({"type": "FocalLoss"}, logits(), labels(), gradients=["none", "pred"]),
        INVALID,
        "terms[0].gradients",
        "'none' asks for the loss alone, so it comes alone; got ['none', 'pred']",
    ),
    **{
        f"{name} without a sampler": (
            without_sampler(name),
            INVALID,
            f"terms[0].{name}",
            f"terms[0].{name} is read only with config.sampler, and this term's config has none",
        )
        for name in ("sample_labels", "sample_groups")
    },
    "grad_output of the wrong shape": (
        term({"type": "L1Loss", "reduction": "none"}, torch.ones(2, 3), torch.zeros(2, 3), grad_output=torch.ones(3)),
        INVALID,
        "terms[0].grad_output",
        "must have the loss's shape [2, 3], got [3]",
    ),
    "duplicate term names": (
        pb.EvaluateRequest(terms=[pb.LossTerm(name="a"), pb.LossTerm(name="a")]),
        INVALID,
        "terms[1].name",
        "repeats terms[0]",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_request_status(case, client: LossClient):
    request, code, field, message = CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Evaluate(request, timeout=10)
    error = info.value
    assert error.code() == code, error.details()
    assert message in error.details()
    assert field_of(error) == field
    # the server is unharmed and answers a good request correctly
    good = client.evaluate(term({"type": "L1Loss"}, torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])))
    assert codec.decode_tensor(good.results[0].loss, "loss").item() == 2.0


def test_messages_name_the_term(client: LossClient):
    request = pb.EvaluateRequest()
    for name, cfg, pred, target in [
        ("loss_cls", {"type": "FocalLoss"}, logits(), labels()),
        ("loss_bbox", {"type": "GIoULoss"}, torch.rand(2, 4), torch.rand(2, 5)),
    ]:
        message = request.terms.add(name=name)
        codec.encode_config(cfg, message.config)
        codec.encode_tensor(pred, message.pred)
        codec.encode_value(target, message.target)
    with pytest.raises(RemoteLossError) as info:
        client.evaluate(request)
    assert info.value.code == INVALID
    assert info.value.details.startswith("terms[1] (loss_bbox): target must have the shape of pred [2, 4]")
    assert info.value.field == "terms[1].target"


def test_config_errors_surface_at_construction(target: str):
    with pytest.raises(RemoteLossError) as info:
        RemoteLoss(dict(type="GIoULoss", eps="tiny"), target=target)
    assert info.value.code == INVALID and info.value.field == "config.eps"
    with pytest.raises(RemoteLossError) as info:
        RemoteLoss(dict(type="SmothL1Loss"), target=target)
    assert info.value.code == NOT_FOUND and "SmoothL1Loss" in info.value.details


def test_describe_normalises_config(client: LossClient):
    response = client.describe({"type": "CrossEntropyLoss", "use_sigmoid": True, "ignore_index": 3.0})
    config = codec.decode_config(response.config)
    assert config["ignore_index"] == 3 and config["use_sigmoid"] is True and config["reduction"] == "mean"
    assert response.output == "element" and response.loss.name == "CrossEntropyLoss"


@pytest.fixture(scope="module")
def small_server():
    instance = LosswireServer(
        ServerConfig(host="127.0.0.1", port=0, device="cpu", max_message_bytes=1 << 20, max_elements=10_000)
    )
    instance.start()
    yield LossClient(f"127.0.0.1:{instance.port}", timeout=30)
    instance.stop(grace=1)


def test_oversized_message_is_resource_exhausted(small_server: LossClient):
    big = torch.zeros(300_000)  # 1.2 MB > the 1 MiB message limit
    with pytest.raises(RemoteLossError) as info:
        small_server.evaluate(term({"type": "L1Loss"}, big, big))
    assert info.value.code == EXHAUSTED


def test_tensor_over_element_limit_is_resource_exhausted(small_server: LossClient):
    pred = torch.zeros(20_000, dtype=torch.uint8).float()[:12_000]
    with pytest.raises(RemoteLossError) as info:
        small_server.evaluate(term({"type": "L1Loss"}, pred, pred))
    assert info.value.code == EXHAUSTED
    assert "12000 elements" in info.value.details and "at most 10000" in info.value.details
    assert info.value.field == "terms[0].pred.shape"
    ok = small_server.evaluate(term({"type": "L1Loss"}, torch.ones(10), torch.zeros(10)))
    assert codec.decode_tensor(ok.results[0].loss, "loss").item() == 1.0


@pytest.mark.parametrize(
    "model, parameters, config, message",
    [
        (
            "CrossEntropyLoss",
            {"ignore_index": 1e308},
            None,
            "CrossEntropyLoss input 'ignore_index' must be an int64, in [-2**63, 2**63 - 1], got float 1e+308",
        ),
        (
            "CrossEntropyCustomLoss",
            {"ignore_index": -1e19},
            {"num_classes": 3},
            "CrossEntropyCustomLoss input 'ignore_index' must be an int64, in [-2**63, 2**63 - 1], got float -1e+19",
        ),
        (
            "GIoULoss",
            {},
            {"eps": 1e39},
            "GIoULoss failed on these inputs: value cannot be converted to type float without overflow",
        ),
    ],
    ids=["ignore_index 1e308", "ignore_index -1e19", "GIoULoss eps 1e39"],
)
def test_inference_protocol_refuses_the_same(target: str, model, parameters, config, message):
    """ModelInfer's door: a ``double_param`` for an integer input, a config value past pred's dtype."""
    pred, truth = (BOXES, BOXES + 1) if model == "GIoULoss" else (logits(), torch.tensor([0, 1, 2, 0]))
    request = infer_request(model, {"pred": pred, "target": truth}, config, **parameters)
    stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == INVALID, info.value.details()
    assert info.value.details() == f"model {model!r}: {message}"
    assert field_of(info.value) == ("ignore_index" if parameters else None)
