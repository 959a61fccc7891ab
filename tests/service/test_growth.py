"""Long runs: what a caller sends call after call leaves nothing growing in the server.

Each case sends a real ``losswire serve`` thousands of bytes of distinct, valid configs, one call after
another, and reads the server's resident memory: after the first calls it stays flat, whatever the
caller varies.
"""

from __future__ import annotations

import sys

import grpc
import pytest
import torch
from support.servers import ServerProcess, module_cmd, server_env

from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import codec

MiB = 1 << 20


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def ghmc_term(request: pb.EvaluateRequest, call: int) -> None:
    """A GHMC of 4 M bins (its module holds 16 MB of bin edges), a distinct count each call."""
    term = request.terms.add(name="loss_cls")
    codec.encode_config(dict(type="GHMC", bins=4_000_000 - call, momentum=0.0), term.config)
    codec.encode_tensor(torch.randn(2, 3), term.pred)
    codec.encode_tensor(torch.randint(0, 2, (2, 3)).float(), term.target.tensor)
    codec.encode_tensor(torch.ones(2, 3), term.inputs["label_weight"].tensor)


def class_weight_term(request: pb.EvaluateRequest, call: int) -> None:
    """A CrossEntropyLoss of 90,000 classes (a config of 1 MB), a distinct class_weight each call."""
    classes = 90_000
    term = request.terms.add(name="loss_cls")
    weights = [1.0] * classes
    weights[0] = 1.0 + call / 1024
    codec.encode_config(dict(type="CrossEntropyLoss", class_weight=weights), term.config)
    codec.encode_tensor(torch.randn(1, classes), term.pred)
    codec.encode_tensor(torch.zeros(1, dtype=torch.long), term.target.tensor)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("term", "calls"), [(ghmc_term, 40), (class_weight_term, 100)])
def test_distinct_configs_call_after_call_leave_the_server_flat(term, calls):
    """The caches of checked configs, cost estimates and built modules are bounded in bytes as well as in
    entries: a caller varying one number of a big config each call grew the server by what each config
    held (GHMC 16 MB a call, CrossEntropyLoss 4.2 MB, up to 7 GB and 2 GB before the caches' entry counts
    were reached), and kept it: the measured calls grew it 580 MiB and 390 MiB then, 0 and ~50 MiB now."""
    process = ServerProcess(
        module_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--max-workers", "2"),
        # blocks of 1 MiB and more mapped and unmapped each time (glibc keeps freed ones otherwise): the
        # resident memory is then what the server holds, not the calls' temporaries it may reuse
        server_env(MALLOC_MMAP_THRESHOLD_=str(MiB)),
    )
    try:
        process.wait_started()
        with grpc.insecure_channel(process.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            for call in range(calls):
                if call == 10:  # the allocator's working memory is in by now
                    before = _rss_bytes(process.proc.pid)
                request = pb.EvaluateRequest()
                term(request, call)
                stub.Evaluate(request, timeout=60)
        grown = _rss_bytes(process.proc.pid) - before
        assert grown < 200 * MiB, f"the server grew {grown / MiB:.0f} MiB over {calls - 10} distinct configs"
    finally:
        process.close()
