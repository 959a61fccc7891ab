"""Long lists of numbers in a config (a class_weight of 1,203 or 13,204 classes) are read from their wire form
in one pass, and keyed by their bits: the values and keys must be those that reading them one by one gives.

A number keeps its float type, its sign (-0.0), NaN and the infinities; a list holding anything else (a
string, a list, a null) is read value by value; -0.0 and 0.0 make different configs, equal lists one.
"""

from __future__ import annotations

import math
import random

import pytest
from google.protobuf import struct_pb2

from losswire.server.evaluation.terms import MANY_FLOATS, frozen
from losswire.wire import codec

SPECIAL = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, 5e-324, 3.0, 2.0**53 + 1]


def same(read: object, expected: object) -> bool:
    if type(read) is not type(expected):
        return False
    if isinstance(read, float) and isinstance(expected, float):
        if math.isnan(expected):
            return math.isnan(read)
        return read == expected and math.copysign(1, read) == math.copysign(1, expected)
    return read == expected


def list_value(values: list) -> struct_pb2.Value:
    message = struct_pb2.Value()
    message.list_value.SetInParent()
    message.list_value.extend(values)
    return message


@pytest.mark.parametrize("length", [0, 1, codec.MANY_NUMBERS - 1, codec.MANY_NUMBERS, 1203, 13204])
@pytest.mark.parametrize("other", [None, "text", [1.0], True])
def test_a_list_of_numbers_reads_as_value_by_value(length, other):
    rng = random.Random(length)
    numbers = [rng.choice([*SPECIAL, rng.uniform(-1e6, 1e6)]) for _ in range(length)]
    for values in (numbers, [*numbers[: length // 2], other, *numbers[length // 2 :]]):
        message = list_value(values)
        read = codec.python_value(message)
        one_by_one = [codec.python_value(item) for item in message.list_value.values]
        assert len(read) == len(one_by_one) and all(same(a, b) for a, b in zip(read, one_by_one, strict=True))


def test_long_float_lists_key_configs_by_their_bits():
    zeros = [0.0] * MANY_FLOATS
    assert frozen(zeros) == frozen(list(zeros))
    assert frozen(zeros) != frozen([-0.0, *zeros[1:]])  # the sign is the loss's business
    assert frozen([math.nan] * MANY_FLOATS) == frozen([math.nan] * MANY_FLOATS)
    assert frozen([1.0] * MANY_FLOATS) != frozen([1, *[1.0] * (MANY_FLOATS - 1)])  # an int stays apart
