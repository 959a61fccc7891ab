"""Argument binding and checks, from a loss's description alone (no server): what a call may pass, and
the refusal that names the loss, the argument, what it accepts and what arrived."""

from __future__ import annotations

import inspect

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import struct_pb2

from losswire.client import ArgumentError, RemoteLoss, RemoteLossError
from losswire.client.arguments import CallShape
from losswire.v1 import loss_service_pb2 as pb

REDUCTIONS = ("none", "mean", "sum")


def info(name: str, inputs: list[tuple[str, str, bool]], extra: bool = False, choices=None) -> pb.LossInfo:
    """A LossInfo as the server describes a loss: (name, kind, optional) per input in order."""
    described = pb.LossInfo(name=name, extra_inputs=extra)
    for input_name, kind, optional in inputs:
        item = described.inputs.add(name=input_name, kind=kind, optional=optional)
        item.default.null_value = struct_pb2.NULL_VALUE
        for choice in (choices or {}).get(input_name, ()):
            item.choices.add(string_value=choice)
    return described


CROSS_ENTROPY = info(
    "CrossEntropyLoss",
    [
        ("cls_score", "tensor", False),
        ("label", "tensor", False),
        ("weight", "tensor", True),
        ("avg_factor", "number", True),
        ("reduction_override", "str", True),
        ("ignore_index", "int", True),
    ],
    choices={"reduction_override": REDUCTIONS},
)
GHMC = info(
    "GHMC",
    [
        ("pred", "tensor", False),
        ("target", "tensor", False),
        ("label_weight", "tensor", False),
        ("reduction_override", "str", True),
    ],
    extra=True,
    choices={"reduction_override": REDUCTIONS},
)
SCORE, LABEL = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])


def test_positional_and_keyword_calls_bind_alike():
    shape = CallShape(CROSS_ENTROPY, sampled=False)
    by_position = shape.bind((SCORE, LABEL, None, 2.0), {})
    by_name = shape.bind((), {"label": LABEL, "cls_score": SCORE, "avg_factor": 2.0, "weight": None})
    assert by_position == by_name == {"cls_score": SCORE, "label": LABEL, "weight": None, "avg_factor": 2.0}
    assert shape.bind((SCORE,), {"label": LABEL, "ignore_index": 255})["ignore_index"] == 255


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((SCORE,), {}, "missing a required argument: 'label'"),
        ((SCORE, LABEL), {"cls_score": SCORE}, "multiple values for argument 'cls_score'"),
        ((SCORE, LABEL), {"avg_factr": 2.0}, "unexpected keyword argument 'avg_factr'"),
        ((SCORE, LABEL, None, None, None, None, 7), {}, "too many positional arguments"),
    ],
)
def test_a_wrong_call_is_a_type_error_naming_the_loss_and_its_signature(args, kwargs, message):
    with pytest.raises(TypeError, match=message) as error:
        CallShape(CROSS_ENTROPY, sampled=False).bind(args, kwargs)
    assert str(error.value).startswith("CrossEntropyLoss: ")
    assert "CrossEntropyLoss(cls_score, label, weight=None, avg_factor=None" in str(error.value)


def test_a_forward_taking_kwargs_takes_any_keyword():
    """mmdet's GHMC takes **kwargs (heads pass avg_factor): so does its remote signature."""
    shape = CallShape(GHMC, sampled=False)
    assert list(shape.signature.parameters.values())[-1].kind is inspect.Parameter.VAR_KEYWORD
    weight = torch.ones(4, 3)
    bound = shape.bind((SCORE, LABEL, weight), {"avg_factor": 3.0, "anything": 1})
    assert bound == {"pred": SCORE, "target": LABEL, "label_weight": weight, "avg_factor": 3.0, "anything": 1}
    slow_path = shape.bind((SCORE,), {"label_weight": weight, "target": LABEL, "avg_factor": 3.0})
    assert slow_path["avg_factor"] == 3.0 and slow_path["target"] is LABEL
    with pytest.raises(TypeError, match="multiple values for argument 'target'"):
        shape.bind((SCORE, LABEL, weight), {"target": LABEL})


def test_a_sampler_adds_its_keywords():
    shape = CallShape(CROSS_ENTROPY, sampled=True)
    bound = shape.bind((SCORE, LABEL), {"sample_labels": LABEL, "sample_groups": LABEL})
    assert bound["sample_labels"] is LABEL and bound["sample_groups"] is LABEL
    with pytest.raises(TypeError, match="sample_labels"):
        CallShape(CROSS_ENTROPY, sampled=False).bind((SCORE, LABEL), {"sample_labels": LABEL})


@pytest.mark.parametrize(
    ("name", "value", "expected", "got"),
    [
        ("reduction_override", 3, "one of 'none', 'mean', 'sum' (or None)", "int 3"),
        ("reduction_override", "avg", "one of 'none', 'mean', 'sum' (or None)", "'avg'"),
        ("reduction_override", torch.tensor(1.0), "one of 'none', 'mean', 'sum'", "a torch.float32 tensor of shape []"),
        ("avg_factor", "4", "a number or a one-element tensor (or None)", "str '4'"),
        ("avg_factor", True, "a number or a one-element tensor", "bool True"),
        ("avg_factor", torch.ones(2), "a number or a one-element tensor", "a torch.float32 tensor of shape [2]"),
        ("ignore_index", 2.5, "an integer (or None)", "float 2.5"),
        ("weight", [1.0, 2.0], "a tensor (or None)", "list [1.0, 2.0]"),
        ("label", None, "is required (a tensor), got None", ""),
    ],
)
def test_an_argument_the_loss_does_not_take_is_refused_before_sending(name, value, expected, got):
    shape = CallShape(CROSS_ENTROPY, sampled=False)
    with pytest.raises(ArgumentError) as error:
        shape.check({"cls_score": SCORE, "label": LABEL, name: value})
    message = str(error.value.details)
    assert message.startswith(f"CrossEntropyLoss: argument {name!r} ") and expected in message and got in message
    # a TypeError as a local module's refusal, and the server's code for it
    assert isinstance(error.value, TypeError) and isinstance(error.value, RemoteLossError)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.field == name


def test_what_the_loss_takes_passes():
    shape = CallShape(CROSS_ENTROPY, sampled=False)
    for avg_factor in (3, 3.5, np.float32(3.5), np.int64(3), torch.tensor(3.5), torch.tensor([3.5]), None):
        shape.check(shape.bind((SCORE, LABEL), {"avg_factor": avg_factor}))
    for reduction in (*REDUCTIONS, None):
        shape.check(shape.bind((SCORE, LABEL), {"reduction_override": reduction, "ignore_index": np.int64(-1)}))


def test_a_remote_loss_refuses_before_sending(target):
    """Through a RemoteLoss: a non-string reduction_override used to raise protobuf's bare TypeError."""
    loss = RemoteLoss(dict(type="FocalLoss"), target)
    with pytest.raises(TypeError) as error:
        loss(SCORE, LABEL, reduction_override=1)
    assert str(error.value) == (
        "INVALID_ARGUMENT: FocalLoss: argument 'reduction_override' must be one of 'none', 'mean', 'sum' (or None), "
        "got int 1"
    )
