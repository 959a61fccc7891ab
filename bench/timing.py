"""Shared pieces of the performance benchmark (``bench/run.py``): timing, workloads, the engine call,
and the losswire client of a transport.

The workloads are the tensors every section sends. ``engine_loss_grad`` is the server's evaluator
called in process: both peers (torch.distributed.rpc, plain grpcio) run it, so they do the server's
work with its engine; ``autograd_loss_grad`` is plain torch eager (module forward + autograd).
"""

from __future__ import annotations

import ctypes
import inspect
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from losswire.client import LossClient, RemoteLoss
from losswire.server.evaluation import Evaluator, TermRequest
from losswire.server.losses import LOSSES

MiB = 1 << 20
FOCAL = {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}
GIOU = {"type": "GIoULoss"}
CONFIGS = {"FocalLoss": FOCAL, "GIoULoss": GIOU}
SMALL_ROWS = 256  # the small call: FocalLoss pred [256, 80]
CLASSES = 80


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank: with fewer than 100 samples p99 is the maximum)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median and p99 in milliseconds, and the sample count."""
    return {"median_ms": statistics.median(samples) * 1e3, "p99_ms": percentile(samples, 99) * 1e3, "n": len(samples)}


def workload(loss: str, pred_bytes: int, device: str = "cpu", seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(pred, target)`` for ``loss`` with about ``pred_bytes`` of float32 pred.

    FocalLoss: pred [N, 80] logits, target [N] int64 labels in [0, 80] (80 = background).
    GIoULoss: pred and target [N, 4] valid (x1, y1, x2, y2) boxes.
    """
    generator = torch.Generator().manual_seed(seed)
    if loss == "FocalLoss":
        rows = max(1, round(pred_bytes / (CLASSES * 4)))
        pred = torch.randn(rows, CLASSES, generator=generator)
        target = torch.randint(0, CLASSES + 1, (rows,), generator=generator)
    elif loss == "GIoULoss":
        rows = max(1, pred_bytes // 16)
        pred, target = (_boxes(rows, generator) for _ in range(2))
    else:
        raise ValueError(f"no workload for {loss!r}")
    return pred.to(device), target.to(device)


def _boxes(rows: int, generator: torch.Generator) -> Tensor:
    corner = torch.rand(rows, 2, generator=generator) * 100
    return torch.cat([corner, corner + 1 + torch.rand(rows, 2, generator=generator) * 50], dim=1)


def small_workload() -> tuple[Tensor, Tensor]:
    """The small call: FocalLoss pred [256, 80]."""
    return workload("FocalLoss", SMALL_ROWS * CLASSES * 4)


def autograd_loss_grad(cfg: Mapping[str, Any], pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Torch eager: the registry's module, forward, ``torch.autograd.grad``. Returns ``(loss, d loss / d pred)``."""
    module = LOSSES.build(cfg).to(pred.device)
    pred = pred.detach().requires_grad_()
    loss = module(pred, target)
    (grad,) = torch.autograd.grad(loss, pred)
    return loss.detach(), grad


_EVALUATOR = Evaluator()


def engine_loss_grad(cfg: Mapping[str, Any], pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The server's own work, without gRPC: its ``Evaluator`` (a module built per call, fused
    loss-and-gradient kernels where it has them, else autograd). Returns ``(loss, d loss / d pred)``."""
    (part,) = _EVALUATOR.evaluate(TermRequest("", cfg, pred, target, gradients=("pred",))).parts
    return part.loss, part.gradients["pred"]


def synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a CUDA synchronize when ``device`` is a GPU (timings must include the kernels)."""
    if device.type != "cuda":
        return fn

    def call() -> Any:
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


# -- the client under test -------------------------------------------------------------------------


# ``--transport`` names -> LossClient keyword arguments; a name not listed is passed as ``transport=``.
TRANSPORTS: dict[str, dict[str, Any]] = {
    "default": {},  # whatever LossClient(target) does (on loopback: shared memory above 1 MiB)
    "unary": {"stream_threshold": None, "shared_memory": "off"},  # one unary Evaluate per call
    # EvaluateStream (tensors in chunks), computed once every chunk is in: round trip - compute = the wire
    "stream": {"stream_threshold": 0, "shared_memory": "off", "overlap": False},
    # EvaluateStream computed while its rows arrive, the gradient's rows sent back as they are done
    "overlap": {"stream_threshold": 0, "shared_memory": "off", "overlap": True},
    "shm": {"shared_memory": "on"},  # shared memory (same host) above 1 MiB of tensors
}


def client_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``settings`` as the installed ``LossClient`` takes them, and the names of those it lacks. Features
    are detected, not assumed: one turned off that this client does not have is off already (an older
    client never overlaps) and is dropped; one turned on that it lacks is missing."""
    parameters = inspect.signature(LossClient).parameters
    taken = {name: value for name, value in settings.items() if name in parameters}
    return taken, [name for name, value in settings.items() if value and name not in parameters]


def make_client(target: str, transport: str) -> LossClient:
    """A ``LossClient`` for ``target`` that sends tensors by ``transport`` (see ``TRANSPORTS``): a transport
    whose keyword ``LossClient`` does not take stops the run with a message instead of measuring
    something else."""
    kwargs, missing = client_settings(TRANSPORTS.get(transport, {"transport": transport}))
    if missing:
        raise SystemExit(f"--transport {transport}: this LossClient takes no {', '.join(missing)}=")
    return LossClient(target, **kwargs)


def client_features() -> dict[str, Any]:
    """What the installed client offers, recorded with the results."""
    usable = [name for name, kwargs in TRANSPORTS.items() if not client_settings(kwargs)[1]]
    return {"transports": usable, "transport_option": "transport" in inspect.signature(LossClient).parameters}


def remote_step(
    loss: RemoteLoss, pred: Tensor, target: Tensor, compute: list[float] | None = None
) -> Callable[[], None]:
    """One round trip as training does it: forward through ``loss``, then ``backward`` to pred.
    ``compute``: each call's server compute seconds (its ``timings.compute_ms``) are appended."""
    pred = pred.detach().requires_grad_()

    def step() -> None:
        pred.grad = None  # a fresh gradient each time, as after optimizer.zero_grad(set_to_none=True)
        loss(pred, target).backward()
        if compute is not None:
            compute.append(loss.last_timings.compute_ms / 1e3)

    return step


def memcpy_roundtrip(source: Tensor) -> Callable[[], None]:
    """Copy ``source``'s bytes to another buffer and as many back (the shared-memory floor: the
    same bytes there and back, as the socket baseline moves them), with libc memcpy (one thread)."""
    flat = source.detach().reshape(-1).view(torch.uint8)
    there, back = torch.empty_like(flat), torch.empty_like(flat)
    there.fill_(0), back.fill_(0)  # touch every page now, as the server's segment is
    size = flat.numel()

    def step() -> None:
        ctypes.memmove(there.data_ptr(), flat.data_ptr(), size)
        ctypes.memmove(back.data_ptr(), there.data_ptr(), size)

    return step


def big_call_loop(queue: multiprocessing.Queue, target: str, transport: str, pred_bytes: int) -> None:
    """Another worker's big FocalLoss calls, back to back until its process is terminated (run in a
    spawned process so that its encoding does not hold the measuring process's GIL). Puts "ready"
    on ``queue`` when its first call starts, then the time of each finished call."""
    step = remote_step(RemoteLoss(FOCAL, client=make_client(target, transport)), *workload("FocalLoss", pred_bytes))
    queue.put("ready")
    while True:
        queue.put(timed(step, 1, warmup=0)[0])
