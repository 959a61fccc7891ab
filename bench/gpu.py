"""losswire on a GPU, measured in one run: compute against torch eager and the HBM roofline, a real CUDA
out-of-memory, the same-host round trip with CUDA tensors, and the parity suites on CUDA.

    python bench/gpu.py --out DIR                    # everything (a few minutes on an H200)
    python bench/gpu.py --out DIR --sections compute --sizes 64
    WHEELS=.whl bash bench/gpu_host.sh python3 bench/gpu.py --out DIR    # a GPU host without our dependencies

Writes DIR/gpu.json (every figure) and DIR/gpu.md (the tables docs/performance.md shows), and prints the
tables last. Every ratio is measured in this run, on this GPU.

Sections:

* ``compute``: one term's loss + gradient in process, as the server computes it (``Evaluator``: bind,
  checks, kernels; synchronised), for FocalLoss, QualityFocalLoss, CrossEntropyLoss, SmoothL1Loss, L1Loss
  and GIoULoss at 64 MiB, 256 MiB and 1 GiB of pred, on three paths: autograd (``--fused-kernels off``:
  torch eager autograd of the module), the family kernels (``--gpu-kernels off``) and the compiled
  one-pass kernels (the default). ``kernels ms`` is the sum of the device's kernel times in one call
  (torch.profiler), ``wall ms`` the median wall time of the call. Roofline = the least bytes the pass
  moves (its inputs once, the gradient and loss once) / the device-to-device copy bandwidth measured now
  (bytes read + written). The first one-pass call of each loss (compilation) is reported apart. ``host ops
  ms``: the one-pass call's host time inside torch ops and CUDA runtime calls (launches, allocations, the
  syncs that wait for the device, which hold the kernels' time), and the largest of them; the wall time
  less that is the Python around them.
* ``oom``, ``parity``: pytest on CUDA (``LOSSWIRE_TEST_DEVICE=cuda``): the out-of-memory test
  (tests/service/test_gpu_server.py), the one-pass kernels' tests, and the reference and service suites.
* ``triton``: FocalLoss's hand-written Triton kernel (``bench/triton_focal.py``): its largest difference
  from autograd, and its time and share of the roofline at the same sizes, general and with gamma = 2
  specialised (what the server runs where gamma is 2), and at the largest size over launch shapes
  (blocks of 1024-8192 elements, 4-16 warps); QualityFocalLoss's hand-written kernel (the server's
  ``gfocal_triton``) over its launch shapes (tiles of 1024-8192 elements, 4-16 warps) at the largest size.
* ``staging``: ``bench/staging.py``'s host <-> device copies at 64 and 256 MiB: pageable, pinned, and the
  server's staged path (``--pinned-staging-bytes``, on by default since it measured faster).
* ``roundtrip``: a server on this GPU, in process; a caller on the same host sends FocalLoss at 64 MiB,
  pred on the CPU or on the GPU, by stream or shared memory; against the same loss + gradient computed
  locally on the GPU (autograd of the module, and the one-pass kernel).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import min_bytes

from losswire.server.evaluation import Evaluator, TermRequest

MIB = 1 << 20
WIDTH = {"FocalLoss": 80, "QualityFocalLoss": 80, "CrossEntropyLoss": 81, "SmoothL1Loss": 4, "L1Loss": 4, "GIoULoss": 4}
ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"  # "cpu" with --dry-run


def machine() -> dict[str, Any]:
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        smi = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import grpc

    return {
        "gpu": smi,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "grpcio": grpc.__version__,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synchronised(fn: Callable[[], Any]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20 copies of 2 GiB)."""
    source = torch.randn(512 * MIB, device=DEVICE)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    seconds = statistics.median(synchronised(lambda: target.copy_(source)) for _ in range(20))
    return 2 * source.nbytes / seconds


def kernel_ms(fn: Callable[[], Any]) -> float:
    """The device's kernel time in one call of ``fn``, summed (torch.profiler)."""
    return sum(kernel_times(fn).values())


def kernel_times(fn: Callable[[], Any]) -> dict[str, float]:
    """The device's time in ms per kernel name in one call of ``fn`` (torch.profiler): where a path's time
    goes, for the kernels that are far from the roofline."""
    if DEVICE == "cpu":  # --dry-run
        return {"(no device)": float("nan")}
    return _profiled(fn, "cuda", "device_time_total")


def host_times(fn: Callable[[], Any]) -> dict[str, float]:
    """The host's own time in ms per torch op and CUDA runtime call in one call of ``fn`` (torch.profiler's
    CPU activity, self time): where a path's wall time beyond its kernels goes (launches, allocations, the
    syncs that wait for the device: ``aten::_local_scalar_dense``, ``cudaStreamSynchronize``)."""
    return _profiled(fn, "cpu", "self_cpu_time_total")


def _profiled(fn: Callable[[], Any], activity: str, time_us: str) -> dict[str, float]:
    """One call of ``fn`` under torch.profiler with the ``activity`` ("cuda" or "cpu") recorded: ms of
    each event's ``time_us`` attribute by event name."""
    from torch.profiler import ProfilerActivity, profile

    activities = {ProfilerActivity.CPU if activity == "cpu" else ProfilerActivity.CUDA}
    if DEVICE == "cuda":
        activities.add(ProfilerActivity.CUDA)  # the CUDA runtime calls (launches, syncs) come with it
    with profile(activities=list(activities)) as prof:
        fn()
        sync()
    return {e.key: getattr(e, time_us) / 1e3 for e in prof.key_averages() if getattr(e, time_us)}


def top_kernels(times: dict[str, float], count: int = 6) -> str:
    ranked = sorted(times.items(), key=lambda item: -item[1])[:count]
    return "; ".join(f"{name[:60]} {ms:.3f}" for name, ms in ranked)


def workload(name: str, rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``name``'s config and term fields at ``rows`` samples, drawn on the device (as ``kernels.workloads``,
    whose CPU draws of every loss at once would take longer than the measurements at 1 GiB)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    width = WIDTH[name]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=DEVICE)

    if width > 4:
        logits = torch.randn(rows, width, generator=gen, device=DEVICE) * 3
        labels = torch.randint(0, 81, (rows,), generator=gen, device=DEVICE)
        configs = {
            "FocalLoss": ({"gamma": 2.0, "alpha": 0.25}, {"target": labels, "avg_factor": 1000.0}),
            "QualityFocalLoss": ({"beta": 2.0}, {"target": (labels, uniform(rows)), "avg_factor": 1000.0}),
            "CrossEntropyLoss": ({}, {"target": labels}),
        }
        config, fields = configs[name]
        return {"type": name, **config}, {"pred": logits, **fields}
    corner, size = uniform(rows, 2) * 100, uniform(rows, 2) * 50 + 1
    boxes = torch.cat([corner, corner + size], dim=1)
    corner, size = uniform(rows, 2) * 100, uniform(rows, 2) * 50 + 1
    target_boxes = torch.cat([corner, corner + size], dim=1)
    weight = uniform(rows) if name == "GIoULoss" else uniform(rows, 4)
    config = {"type": name, **({"beta": 1.0 / 9} if name == "SmoothL1Loss" else {})}
    return config, {"pred": boxes, "target": target_boxes, "weight": weight, "avg_factor": 1000.0}


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    scale = float(reference.abs().max()) or 1.0
    return float((fast.double() - reference.double()).abs().max()) / scale


def compute_cell(name: str, size_mib: float, paths: dict[str, Evaluator], bandwidth: float) -> dict[str, Any]:
    rows = int(size_mib * MIB) // (WIDTH[name] * 4)
    config, fields = workload(name, rows)

    def term() -> TermRequest:
        return TermRequest(name=name, config=dict(config), **fields)

    cell: dict[str, Any] = {"loss": name, "pred MiB": size_mib}
    outcomes = {}
    for path, evaluator in paths.items():
        sync()
        start = time.perf_counter()
        outcomes[path] = evaluator.evaluate(term())
        sync()
        if path == "one-pass":
            cell["one-pass first call s"] = time.perf_counter() - start
        repeats = 50 if size_mib <= 1 else 10 if size_mib <= 256 else 5  # a small call: host time, noisier
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
        walls = [synchronised(lambda evaluator=evaluator: evaluator.evaluate(term())) for _ in range(repeats)]
        if DEVICE == "cuda":
            cell[f"{path} peak MiB"] = (torch.cuda.max_memory_allocated() - before) / MIB
        cell[f"{path} wall ms"] = statistics.median(walls) * 1e3
        times = kernel_times(lambda evaluator=evaluator: evaluator.evaluate(term()))
        cell[f"{path} kernels ms"] = sum(times.values())
        cell[f"{path} top kernels ms"] = top_kernels(times)
    host = host_times(lambda: paths["one-pass"].evaluate(term()))
    cell["one-pass host ops ms"], cell["one-pass top host ops ms"] = sum(host.values()), top_kernels(host, 8)
    one_pass = paths["one-pass"]
    cell["one-pass answered"] = one_pass.one_pass.calls[name] > 0 and name not in one_pass.one_pass._broken
    cell["one-pass by hand"] = one_pass.one_pass.calls_by_hand[name] > 0
    auto, fast = outcomes["autograd"], outcomes["one-pass"]
    cell["loss rel err"] = relative_error(fast.loss, auto.loss)
    grad = "pred"
    cell["grad rel err"] = relative_error(
        {**fast.parts[0].gradients, **fast.gradients}[grad], {**auto.parts[0].gradients, **auto.gradients}[grad]
    )
    moved = min_bytes(fields, outcomes["autograd"].loss)
    roofline_ms = moved / bandwidth * 1e3
    cell["roofline ms"] = roofline_ms
    for path in paths:
        cell[f"{path} wall % roofline"] = 100 * roofline_ms / cell[f"{path} wall ms"]
        cell[f"{path} kernels % roofline"] = 100 * roofline_ms / cell[f"{path} kernels ms"]
    cell["autograd / one-pass wall"] = cell["autograd wall ms"] / cell["one-pass wall ms"]
    cell["autograd / one-pass kernels"] = cell["autograd kernels ms"] / cell["one-pass kernels ms"]
    fields.clear()
    outcomes.clear()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return cell


def section_compute(sizes: list[float], bandwidth: float, losses: list[str]) -> list[dict[str, Any]]:
    paths = {
        "autograd": Evaluator(fused=False),
        "family": Evaluator(fused=True, gpu_kernels=False),
        "one-pass": Evaluator(fused=True, gpu_kernels=True),
    }
    cells = []
    for name in losses:
        for size in sizes:
            try:
                cells.append(compute_cell(name, size, paths, bandwidth))
            except Exception as error:  # a measurement that fails is reported, the others still run
                cells.append({"loss": name, "pred MiB": size, "error": repr(error)[:500]})
            print(json.dumps(cells[-1]), flush=True)
    return cells


def section_triton(sizes: list[float], bandwidth: float) -> list[dict[str, Any]]:
    """FocalLoss's hand-written Triton kernel (bench/triton_focal.py): its difference from autograd, and
    its time and share of the roofline with and without the gamma = 2 specialisation."""
    import triton_focal

    rows = [{"check": "largest difference from autograd", "value": triton_focal.check(DEVICE)}]
    for size in sizes:
        count = int(size * MIB) // (80 * 4)
        _, fields = workload("FocalLoss", count)
        x, labels = fields["pred"], fields["target"]
        row: dict[str, Any] = {"pred MiB": size, "roofline ms": _focal_roofline_ms(x, labels, bandwidth)}
        for two in (False, True):
            name = "gamma 2 specialised" if two else "general"

            def run(x=x, labels=labels, two=two) -> None:
                triton_focal.focal_loss_and_grad(x, labels, avg_factor=1000.0, gamma_two=two)

            kernel = kernel_ms(run)
            row[f"{name} wall ms"] = triton_focal.time_ms(count, gamma_two=two) if DEVICE == "cuda" else float("nan")
            row[f"{name} kernels ms"] = kernel
            row[f"{name} kernels % roofline"] = 100 * row["roofline ms"] / kernel
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    rows.extend(_launch_shapes(max(sizes), bandwidth))
    rows.extend(_quality_launch_shapes(max(sizes), bandwidth))
    return rows


def _focal_roofline_ms(x: torch.Tensor, labels: torch.Tensor, bandwidth: float) -> float:
    """The least time a FocalLoss pass over logits ``x`` can take: read x and the labels, write the gradient."""
    return (2 * x.nbytes + labels.nbytes) / bandwidth * 1e3


def _launch_shapes(size: int, bandwidth: float) -> list[dict[str, Any]]:
    """The gamma = 2 kernel at other blocks and warps than the server's (``focal_triton.BLOCK``, ``NUM_WARPS``)."""
    import triton_focal

    _, fields = workload("FocalLoss", int(size * MIB) // (80 * 4))
    x, labels = fields["pred"], fields["target"]

    def run(block: int, warps: int) -> None:
        triton_focal.focal_loss_and_grad(x, labels, avg_factor=1000.0, gamma_two=True, block=block, num_warps=warps)

    roofline = _focal_roofline_ms(x, labels, bandwidth)
    return _sweep({"pred MiB": size}, "block", run, roofline, "gamma 2 specialised kernels")


def _quality_launch_shapes(size: float, bandwidth: float) -> list[dict[str, Any]]:
    """QualityFocalLoss's hand-written kernel (the server's ``gfocal_triton``), beta = 2, at tiles of
    1024-8192 elements (rows x 128 padded classes) and 4-16 warps; the server's is ``TILE_ELEMENTS`` x
    ``NUM_WARPS``."""
    from losswire.server.losses.fused import gfocal_triton

    _, fields = workload("QualityFocalLoss", int(size * MIB) // (80 * 4))
    x, (labels, score) = fields["pred"], fields["target"]
    beta, scale = torch.tensor(2.0, device=DEVICE), torch.tensor(1e-3, device=DEVICE)

    def run(tile: int, warps: int) -> None:
        gfocal_triton.closed_form(x, labels, score, beta, scale, beta_two=True, tile_elements=tile, num_warps=warps)

    roofline = (2 * x.nbytes + labels.nbytes + 2 * score.nbytes) / bandwidth * 1e3  # and the row losses out
    return _sweep({"loss": "QualityFocalLoss", "pred MiB": size}, "tile", run, roofline, "beta 2 kernels")


def _sweep(
    row: dict[str, Any], shape: str, run: Callable[[int, int], None], roofline: float, measured: str
) -> list[dict[str, Any]]:
    """``run(elements, warps)`` at 1024-8192 elements (``shape``: what they are called) x 4-16 warps: each
    shape's least kernel time of 3 profiled calls, after one to compile it, as a row of ``row``'s fields."""
    rows = []
    for elements, warps in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16)):
        cell = {**row, shape: elements, "warps": warps}
        try:
            shaped = functools.partial(run, elements, warps)
            shaped()  # compiled for this shape, outside the profile
            kernel = min(kernel_ms(shaped) for _ in range(3))
        except Exception as error:  # a shape Triton refuses is reported, the others still run
            rows.append({**cell, "error": repr(error)[:200]})
            continue
        rows.append({**cell, f"{measured} ms": kernel, f"{measured} % roofline": 100 * roofline / kernel})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def section_staging() -> list[dict[str, Any]]:
    """``bench/staging.py``'s host <-> device copies at 64 and 256 MiB: pageable, pinned, staged."""
    import staging

    return staging.measure([64, 256])


def section_roundtrip() -> list[dict[str, Any]]:
    """A server on this GPU, in process, with pinned staging off and at its default; a caller on this host
    sends FocalLoss at 64 MiB, pred on the CPU or on the GPU, by gRPC or shared memory; against the same
    loss + gradient computed locally on the GPU."""
    from losswire.server.config import ServerConfig
    from losswire.server.losses import build_loss

    rows = 64 * MIB // (80 * 4)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, 80, generator=gen) * 3
    labels = torch.randint(0, 81, (rows,), generator=gen)
    config = {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}
    local_module = build_loss(config).to(DEVICE)
    one_pass = Evaluator(fused=True)

    def local_autograd() -> None:
        pred = logits.to(DEVICE, copy=True).requires_grad_()
        local_module(pred, labels.to(DEVICE), avg_factor=1000.0).backward()

    def local_one_pass() -> None:
        term = TermRequest(name="t", config=config, pred=logits.to(DEVICE), target=labels.to(DEVICE), avg_factor=1000.0)
        one_pass.evaluate(term)

    timings = {"local autograd": _median_of(local_autograd, 7), "local one-pass": _median_of(local_one_pass, 7)}
    for staging in (0, ServerConfig().pinned_staging_bytes):
        timings.update(_remote_timings(logits, labels, config, staging))
    base = timings["local autograd"]
    return [{"path": k, "ms": v * 1e3, "/ local autograd": v / base} for k, v in timings.items()]


def _remote_timings(logits: torch.Tensor, labels: torch.Tensor, config: dict, staging: int) -> dict[str, float]:
    from losswire.client import LossClient, RemoteLoss
    from losswire.server.app import LosswireServer
    from losswire.server.config import ServerConfig

    server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device=DEVICE, pinned_staging_bytes=staging))
    server.start()
    timings = {}
    try:
        for transport in ("off", "on"):
            client = LossClient(f"127.0.0.1:{server.port}", timeout=120, shared_memory=transport)
            remote = RemoteLoss(config, client=client)
            for where in sorted({"cpu", DEVICE}):

                def call(where=where, remote=remote) -> None:
                    pred = logits.to(where, copy=True).requires_grad_()  # a leaf of its own every call
                    remote(pred, labels.to(where), avg_factor=1000.0).backward()
                    assert pred.grad is not None and pred.grad.device.type == where

                label = f"remote, pred on {where}, shared memory {transport}, staging {staging >> 20} MiB"
                timings[label] = _median_of(call, 7)
            client.close()
    finally:
        server.stop(grace=1)
    return timings


def _median_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm up
    return statistics.median(synchronised(fn) for _ in range(repeats))


def section_pytest(name: str, args: list[str], timeout: int, log: Path) -> dict[str, Any]:
    """pytest on CUDA; every test's outcome is written to ``log`` as it comes (``-v``, one line of
    traceback each), so a run cut off at its time box still names its failures."""
    env = {**os.environ, "LOSSWIRE_TEST_DEVICE": "cuda"}
    command = [sys.executable, "-m", "pytest", "-v", "--tb=line", "-p", "no:cacheprovider", *args]
    start = time.time()
    with log.open("w") as output:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=timeout)
            code = code.returncode
        except subprocess.TimeoutExpired:
            code = None
    lines = log.read_text(errors="replace").strip().splitlines()
    outcomes = Counter(word for line in lines for word in OUTCOMES if f" {word} " in f" {line} ")
    failures = [line for line in lines if " FAILED " in f" {line} " or line.startswith("ERROR")]
    return {
        "suite": name,
        "exit": code if code is not None else "timed out",
        "seconds": round(time.time() - start, 1),
        "summary": ", ".join(f"{count} {word.lower()}" for word, count in sorted(outcomes.items())),
        "failures": failures[:200],
    }


OUTCOMES = ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL")


def markdown(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return f"### {title}\n\n(no rows)\n"
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COMPUTE_COLUMNS = [
    "loss", "pred MiB", "roofline ms", "autograd wall ms", "family wall ms", "one-pass wall ms",
    "one-pass kernels ms", "one-pass kernels % roofline", "one-pass wall % roofline", "autograd / one-pass wall",
    "autograd / one-pass kernels", "one-pass first call s", "grad rel err", "one-pass answered",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sections", default="oom,compute,triton,staging,roundtrip,parity")
    parser.add_argument("--sizes", default="64,256,1024", help="pred sizes in MiB (0.078125: a small call's [256, 80])")
    parser.add_argument("--losses", default=",".join(WIDTH), help="the compute section's losses")
    parser.add_argument("--tests-timeout", type=int, default=240, help="seconds for the CUDA tests")
    parser.add_argument("--parity-timeout", type=int, default=240, help="seconds for the parity suites")
    parser.add_argument("--parity-workers", type=int, default=12, help="pytest-xdist workers of the parity suites")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, to check the script itself")
    args = parser.parse_args()
    global DEVICE
    DEVICE = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (or --dry-run)")
    args.out.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    report: dict[str, Any] = {"machine": machine()}
    print(json.dumps(report["machine"]), flush=True)
    report["copy GB/s"] = copy_bandwidth() / 1e9
    print(f"device-to-device copy: {report['copy GB/s']:.0f} GB/s (read + written)", flush=True)
    tables = [f"machine: {json.dumps(report['machine'])}; copy {report['copy GB/s']:.0f} GB/s\n"]

    sizes = [float(s) for s in args.sizes.split(",")]
    losses = args.losses.split(",")
    bandwidth = report["copy GB/s"] * 1e9

    def tests(name: str, paths: list[str], timeout: int, log: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            result = section_pytest(name, paths, timeout, args.out / log)
            print(result["summary"], *result["failures"], sep="\n", flush=True)
            return result

        return run

    # name -> (title, measure, table columns); run in this order, those --sections names
    parts: dict[str, tuple[str, Callable[[], Any], list[str] | None]] = {
        "oom": ("tests on CUDA", tests("out-of-memory, GPU kernels, host <-> device copies",
                ["tests/service/test_gpu_server.py", "tests/engine/test_gpu_kernels.py",
                 "tests/service/test_pinned_staging.py"], args.tests_timeout, "tests.log"), None),
        "compute": ("compute: loss + gradient of one term", lambda: section_compute(sizes, bandwidth, losses),
                    COMPUTE_COLUMNS),
        "triton": ("FocalLoss's Triton kernel, gamma = 2 specialised or not", lambda: section_triton(sizes, bandwidth),
                   None),
        "staging": ("host <-> device copies: pageable, pinned, staged (GB/s)", section_staging, None),
        "roundtrip": ("same-host round trip, FocalLoss 64 MiB", section_roundtrip, None),
        "parity": ("parity on CUDA", tests("service and engine suites",
                   ["tests/service", "tests/engine", "-m", "not slow", "-n", str(args.parity_workers)],
                   args.parity_timeout, "parity.log"), None),
    }  # fmt: skip
    for name, (title, measure, columns) in parts.items():
        if name not in sections:
            continue
        try:
            report[name] = measure()
        except Exception as error:  # a part that fails is reported, the others still run
            report[name], columns = [{"failed": repr(error)[:500]}], None
        rows = [_summary(report[name])] if isinstance(report[name], dict) else report[name]
        tables.append(markdown(title, rows, columns))
        # after every part: a run cut short still leaves what it measured
        (args.out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "gpu.md").write_text("\n".join(tables))
    print("\n".join(tables), flush=True)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("suite", "exit", "seconds", "summary")}


if __name__ == "__main__":
    main()
