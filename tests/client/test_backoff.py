"""The client's own retries (streams, busy answers): gRPC's backoff, within the deadline; and the service
config every channel carries."""

from __future__ import annotations

import json

import grpc
import pytest

from losswire.client.channels import BUSY_PATIENCE_SECONDS, RETRY_POLICY, Patience, seconds, service_config
from losswire.client.errors import RemoteLossError
from losswire.client.transports import after_busy
from losswire.wire.protocol import SERVICE_NAME


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_backoff_grows_by_the_policy_and_stops_at_its_ceiling():
    clock, draws = Clock(), []

    def longest(low: float, high: float) -> float:
        draws.append((low, high))
        return high

    patience = Patience(60.0, clock=clock, draw=longest)
    pauses = [patience.next_pause() for _ in range(7)]
    assert pauses == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert all(low == 0 for low, _ in draws)  # gRPC's jitter: anywhere up to the current backoff
    assert seconds(RETRY_POLICY["maxBackoff"]) == 2.0 and seconds(RETRY_POLICY["initialBackoff"]) == 0.1


def test_no_pause_that_would_end_past_the_deadline():
    clock = Clock()
    patience = Patience(1.0, clock=clock, draw=lambda low, high: high)
    assert patience.remaining() == pytest.approx(1.0)
    clock.now += 0.85
    assert patience.remaining() == pytest.approx(0.15)
    assert patience.next_pause() == pytest.approx(0.1)
    clock.now += 0.1
    assert patience.next_pause() is None  # 0.2 s more would pass the deadline
    clock.now += 10
    assert patience.remaining() == 0.0


def test_without_a_deadline_the_patience_is_bounded():
    clock = Clock()
    patience = Patience(None, clock=clock, draw=lambda low, high: high)
    assert patience.remaining() is None  # each attempt: no deadline
    clock.now += BUSY_PATIENCE_SECONDS - 0.05
    assert patience.next_pause() is None


def test_the_service_config():
    plain = json.loads(service_config(balanced=False))
    assert plain["methodConfig"][0] == {"name": [{"service": SERVICE_NAME}], "retryPolicy": RETRY_POLICY}
    # the stream is retried by the client (it keeps the tensors), so gRPC's policy leaves it alone
    assert plain["methodConfig"][1] == {"name": [{"service": SERVICE_NAME, "method": "EvaluateStream"}]}
    assert "loadBalancingConfig" not in plain
    balanced = json.loads(service_config(balanced=True))
    assert balanced["loadBalancingConfig"] == [{"round_robin": {}}]
    assert balanced["healthCheckConfig"] == {"serviceName": SERVICE_NAME}


def test_a_deadline_that_passes_after_busy_answers_tells_the_last_of_them():
    """The deadline passed during an attempt made after a busy refusal: DEADLINE_EXCEEDED (true: that
    attempt had no answer), with the refusal that kept the call waiting; any other failure as it is."""
    busy = RemoteLossError(grpc.StatusCode.RESOURCE_EXHAUSTED, "every big-call slot is taken (--max-stream-calls)")
    late = RemoteLossError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer within the call's deadline (2 s)")
    told = after_busy(late, busy)
    assert told.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert told.details.startswith(late.details) and "RESOURCE_EXHAUSTED: every big-call slot" in told.details
    assert after_busy(late, None) is late
    wrong = RemoteLossError(grpc.StatusCode.INVALID_ARGUMENT, "pred must be float")
    assert after_busy(wrong, busy) is wrong
