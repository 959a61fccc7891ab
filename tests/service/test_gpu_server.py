"""A server computing on a GPU (skipped without CUDA): a real CUDA out-of-memory is the caller's
RESOURCE_EXHAUSTED, its memory is released and the next call is served; CUDA tensors make the round trip.

The server runs in this process on ``cuda``; the out-of-memory is the CUDA allocator's own, caused by
taking nearly all of the GPU's free memory before a call whose gradient no longer fits.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.server.evaluation import Evaluator, TermRequest
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import codec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MIB = 1 << 20
UNBOUNDED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
CONFIG = {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}


@pytest.fixture(scope="module")
def gpu_target():
    server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cuda", max_workers=2))
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=1)


@pytest.fixture(scope="module")
def gpu_client(gpu_target):
    client = LossClient(gpu_target, timeout=120, shared_memory="off")
    yield client
    client.close()


def _request(pred: torch.Tensor, labels: torch.Tensor) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest()
    term = request.terms.add()
    codec.encode_config(CONFIG, term.config)
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(labels, term.target)
    term.name = "focal"
    term.avg_factor = 100.0
    term.gradients.append("pred")
    return request


def _focal_inputs(mib: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rows = mib * MIB // (80 * 4)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 80, generator=gen) * 3, torch.randint(0, 81, (rows,), generator=gen)


def _loss_and_grad(client: LossClient, pred: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred = pred.clone().requires_grad_()
    loss = RemoteLoss(CONFIG, client=client)(pred, labels, avg_factor=100.0)
    loss.backward()
    return loss.detach(), pred.grad


def test_a_real_cuda_out_of_memory_is_resource_exhausted_released_and_the_next_call_served(gpu_client, gpu_target):
    pred, labels = _focal_inputs(48)  # one unary message
    request = _request(pred, labels)
    stub = pb_grpc.LossServiceStub(grpc.insecure_channel(gpu_target, options=UNBOUNDED))
    served = stub.Evaluate(request, timeout=60)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    resting = torch.cuda.memory_allocated()
    free, _ = torch.cuda.mem_get_info()
    # room for the decoded pred (48 MiB) but not for its gradient beside it
    blocker = torch.empty(free - 72 * MIB, dtype=torch.uint8, device="cuda")
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Evaluate(request, timeout=60)
        # a RemoteLoss waits an out-of-memory out as a busy server (another call may free the memory)
        # until its deadline, then names it
        with pytest.raises(RemoteLossError, match="out of memory"):
            _loss_and_grad(LossClient(gpu_target, timeout=3, shared_memory="off"), pred, labels)
    finally:
        del blocker
        torch.cuda.empty_cache()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert "out of memory" in refused.value.details()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= resting + MIB, "the failed call's GPU memory was not released"
    again = stub.Evaluate(request, timeout=60)
    assert again.results[0].loss == served.results[0].loss
    assert again.results[0].gradients["pred"] == served.results[0].gradients["pred"]


def test_cuda_tensors_make_the_round_trip(gpu_client):
    """pred and labels on the GPU: the gradient comes back on the GPU, equal to the server's own answer
    computed in process on the same GPU."""
    pred, labels = _focal_inputs(8, seed=1)
    loss, grad = _loss_and_grad(gpu_client, pred.cuda(), labels.cuda())
    assert grad.device.type == "cuda" and loss.device.type == "cuda"
    local = Evaluator().evaluate(
        TermRequest(name="t", config=CONFIG, pred=pred.cuda(), target=labels.cuda(), avg_factor=100.0)
    )
    torch.testing.assert_close(loss, local.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, local.parts[0].gradients["pred"], rtol=1e-6, atol=1e-12)
