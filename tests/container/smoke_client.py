"""Host-side checks of a running losswire container (run by ``tests/container/smoke.sh``).

Proves what a caller outside the container needs: the standard health service answers SERVING, a
raw ``Evaluate`` (the stub, no client library logic) returns FocalLoss's value and gradient, and a
``RemoteLoss`` backward delivers the gradient into the caller's autograd graph, and the Prometheus
endpoint counted those calls. Every number is compared with this checkout's in-process engine
(``losswire.server.losses``), so the image must compute exactly what the source computes.

    python tests/container/smoke_client.py --target 127.0.0.1:50051 --metrics-url http://127.0.0.1:9464/metrics
"""

from __future__ import annotations

import argparse
import time
import urllib.request
from collections.abc import Callable

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from losswire.client import RemoteLoss
from losswire.server.losses import build_loss
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire.codec import decode_tensor, encode_config, encode_tensor, encode_value

FOCAL = {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}
NUM_CLASSES = 80
TIMEOUT = 30.0


def classification_batch(seed: int, rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and class indices (``NUM_CLASSES`` is the background label), as a head produces them."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, NUM_CLASSES, generator=generator)
    labels = torch.randint(0, NUM_CLASSES + 1, (rows,), generator=generator)
    return logits, labels


def local_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, ...]:
    """The engine's FocalLoss in this process: the loss and d(loss)/d(logits) by local autograd."""
    pred = logits.clone().requires_grad_(True)
    loss = build_loss(FOCAL)(pred, labels, **kwargs)
    loss.backward()
    return loss.detach(), pred.grad


def check_health(channel: grpc.Channel) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "losswire.v1.LossService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, f"health of {service!r}: {status}"
    return "'' and losswire.v1.LossService SERVING"


def check_raw_evaluate(channel: grpc.Channel) -> str:
    logits, labels = classification_batch(seed=0)
    term = pb.LossTerm(
        name="loss_cls",
        config=encode_config(FOCAL),
        pred=encode_tensor(logits),
        target=encode_value(labels),
        avg_factor=4.0,
        gradients=["pred"],
    )
    response = pb_grpc.LossServiceStub(channel).Evaluate(pb.EvaluateRequest(terms=[term]), timeout=TIMEOUT)
    (result,) = response.results
    expected_loss, expected_grad = local_loss_and_grad(logits, labels, avg_factor=4.0)
    torch.testing.assert_close(decode_tensor(result.loss, "loss"), expected_loss)
    torch.testing.assert_close(decode_tensor(result.gradients["pred"], "gradients[pred]"), expected_grad)
    return f"FocalLoss {expected_loss.item():.6f} and its gradient match the engine (server device {response.device})"


def check_remote_loss_backward(target: str) -> str:
    logits, labels = classification_batch(seed=1)
    pred = logits.clone().requires_grad_(True)
    loss = RemoteLoss(FOCAL, target=target, timeout=TIMEOUT)(pred, labels)
    (3.0 * loss).backward()  # an upstream factor: the remote gradient enters the caller's graph
    expected_loss, expected_grad = local_loss_and_grad(logits, labels)
    torch.testing.assert_close(loss.detach(), expected_loss)
    torch.testing.assert_close(pred.grad, 3.0 * expected_grad)
    return f"RemoteLoss forward {loss.item():.6f} and backward match local autograd"


def check_metrics(url: str) -> str:
    """The two FocalLoss terms above (raw and RemoteLoss) are counted as OK by the container's endpoint."""
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        text = response.read().decode()
    counted = {
        sample.labels["loss"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "losswire_loss_terms_total" and sample.labels.get("code") == "OK"
    }
    assert counted.get("FocalLoss", 0) >= 2, f"losswire_loss_terms_total{{code='OK'}} at {url}: {counted}"
    return f"{url} counts {counted['FocalLoss']:.0f} FocalLoss terms OK"


def timed(name: str, check: Callable[[], str]) -> None:
    started = time.perf_counter()
    summary = check()
    print(f"  ok {name:<22} {1000 * (time.perf_counter() - started):7.1f} ms  {summary}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the container's gRPC server")
    parser.add_argument("--metrics-url", help="the container's Prometheus endpoint (http://host:port/metrics)")
    args = parser.parse_args()
    with grpc.insecure_channel(args.target) as channel:
        timed("health", lambda: check_health(channel))
        timed("raw Evaluate", lambda: check_raw_evaluate(channel))
    timed("RemoteLoss backward", lambda: check_remote_loss_backward(args.target))
    if args.metrics_url:
        timed("metrics", lambda: check_metrics(args.metrics_url))


if __name__ == "__main__":
    main()
