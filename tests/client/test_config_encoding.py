"""The config's encoding is made once per config and again whenever the config changed, in value or type."""

from __future__ import annotations

import torch
from google.protobuf import struct_pb2

from losswire.client.configs import ConfigEncoding, same_config
from losswire.wire import codec


def decoded(encoded: bytes) -> dict:
    return codec.decode_config(struct_pb2.Struct.FromString(encoded))


def test_the_same_config_is_encoded_once():
    encoding, cfg = ConfigEncoding(), {"type": "FocalLoss", "gamma": 2.0}
    first = encoding.encode(cfg)
    assert encoding.encode(cfg) is first
    assert encoding.encode(dict(cfg)) is first  # an equal config, another object
    assert decoded(first) == cfg


def test_a_change_in_place_is_seen():
    encoding = ConfigEncoding()
    cfg = {"type": "CrossEntropyLoss", "class_weight": [1.0, 2.0], "sampler": {"type": "RandomSampler", "num": 8}}
    first = encoding.encode(cfg)
    cfg["class_weight"][1] = 3.0  # nested, in place
    assert decoded(encoding.encode(cfg))["class_weight"] == [1.0, 3.0]
    cfg["sampler"]["num"] = 16
    assert decoded(encoding.encode(cfg))["sampler"]["num"] == 16
    assert decoded(first)["class_weight"] == [1.0, 2.0]


def test_a_change_of_type_is_a_change():
    encoding = ConfigEncoding()
    with_flag = encoding.encode({"type": "X", "v": True})
    assert encoding.encode({"type": "X", "v": 1}) is not with_flag  # True == 1, but they encode differently
    assert same_config({"v": (1, 2)}, {"v": (1, 2)}) and not same_config({"v": (1, 2)}, {"v": [1, 2]})
    assert not same_config({"v": 1.0}, {"v": 1})


def test_a_tensor_in_the_config_is_encoded_every_time():
    """A tensor may change in place without a trace (DETRHead's class_weight), so it is never cached."""
    weight = torch.tensor([1.0, 2.0])
    encoding, cfg = ConfigEncoding(), {"type": "CrossEntropyLoss", "class_weight": weight}
    encoding.encode(cfg)
    weight[0] = 5.0
    assert decoded(encoding.encode(cfg))["class_weight"] == [5.0, 2.0]
    assert not same_config(weight, weight)
