"""A signal's exception in the middle of a call (KeyboardInterrupt, ``signal.alarm``), against a real server.

Python runs signal handlers on the main thread, between two bytecodes of whatever it does. When that was
grpcio's code, an exception raised there could leave one of its call locks held by the main thread for
good: the channel's polling thread blocked on it and every later streamed call hung past its deadline
(seen with 2-lane streams: an EvaluateStream's lock owned by the main thread, the next call stuck). The
client therefore runs streams and shared memory (whose calls lean on that polling thread) off the main
thread; these tests sample where the main thread is when signals arrive during such calls, and interrupt
calls, then call again. A blocking unary call is polled by its own caller and stays on the main thread.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
import torch

from losswire.client import LossClient, RemoteLoss

GRPC_DIR = os.path.dirname(grpc.__file__)

TRANSPORTS = {
    "stream": dict(shared_memory="off", stream_threshold=0),
    "lanes": dict(shared_memory="off", stream_threshold=0, lanes=2),
    "shared memory": dict(shared_memory="on"),
}


def in_grpc(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith(GRPC_DIR):
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_grpc_code_runs_where_signals_are_handled(target, transport) -> None:
    client = LossClient(target, timeout=30, **TRANSPORTS[transport])
    loss = RemoteLoss(dict(type="L1Loss"), client=client)
    seen = {"samples": 0, "in grpc": 0}

    def sample(signum, frame) -> None:
        seen["samples"] += 1
        seen["in grpc"] += in_grpc(frame)

    previous = signal.signal(signal.SIGALRM, sample)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        for _ in range(8):
            pred = torch.randn(512, 1024, requires_grad=True)  # 2 MiB: shared memory's size too
            loss(pred, torch.zeros_like(pred)).backward()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        client.close()
    assert seen["samples"] > 20, seen
    assert seen["in grpc"] == 0, f"{seen['in grpc']} of {seen['samples']} signals were handled inside grpcio's code"


class AlarmError(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["lanes", "shared memory"])
def test_calls_interrupted_by_a_signal_leave_the_client_working(target, transport) -> None:
    client = LossClient(target, timeout=30, **TRANSPORTS[transport])
    loss = RemoteLoss(dict(type="L1Loss"), client=client)

    armed = False  # an alarm that comes once the call is over raises nothing

    def interrupt(signum, frame) -> None:
        if armed:
            raise AlarmError

    previous = signal.signal(signal.SIGALRM, interrupt)
    interrupted = 0
    try:
        for i in range(40):
            pred = torch.randn(1024, 1024, requires_grad=True)
            try:
                armed = True
                signal.setitimer(signal.ITIMER_REAL, 0.0005 + 0.0005 * (i % 20))
                loss(pred, torch.zeros_like(pred)).backward()
                armed = False
            except AlarmError:
                interrupted += 1
            finally:
                armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            started = time.monotonic()
            loss(pred.detach().requires_grad_(), torch.zeros_like(pred)).backward()  # hung here before
            assert time.monotonic() - started < 25
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted > 10
    if transport == "shared memory":
        deadline = time.monotonic() + 20
        while len(client.transports._unregistering) and time.monotonic() < deadline:
            time.sleep(0.05)  # the interrupted calls end in the background
        assert not client.transports._unregistering  # no retired segment's unregistration stuck
        assert len(client._pool.regions) <= client._pool.max_idle + 1
    client.close()
