"""By-hand performance benchmark: every figure is a ratio against a baseline measured in the same run.

    .venv/bin/python bench/run.py                          # everything, against a server it starts
    .venv/bin/python bench/run.py --max-mib 256 --repeats 100 --big-repeats 2
    .venv/bin/python bench/run.py --target host:50051      # a running server
    .venv/bin/python bench/run.py --device cuda --sections gpu
    .venv/bin/python bench/run.py --transport stream       # a transport the client offers
    .venv/bin/python bench/run.py --sections hosts --max-mib 256 --big-repeats 3 --torch-threads 1  # as root

Sections (``--sections``, all by default; docs/performance.md explains every column):

* ``small``: FocalLoss pred [256, 80], forward + backward through ``RemoteLoss``, against a bare
  grpcio echo of the same request/response sizes (the transport floor) and the in-process engine.
* ``big``: FocalLoss and GIoULoss at 1 MiB ... 1 GiB of pred (``--max-mib``): effective GB/s = bytes
  of pred / round-trip time (forward + backward), against a raw loopback TCP socket that sends the
  same bytes and gets the same amount back (4 MiB chunks) under the same definition.
* ``peers``: the same FocalLoss loss + gradient through torch.distributed.rpc (TensorPipe) and a
  plain grpcio unary call carrying pickled ``.numpy().tobytes()`` tensors.
* ``concurrency``: 1, 4, 16 client threads (one shared LossClient, as in one training process)
  making small calls: throughput and p99, against the echo with as many threads; then the same while
  another process keeps a 256 MiB call in flight.
* ``gpu``: with ``--device cuda``: the server's compute time for loss + gradient (its reported
  ``timings.compute_ms``) against the HBM roofline and torch eager autograd on the same GPU.
* ``hosts`` (root): FocalLoss at 16, 64, 256 MiB over a 10 Gbit/s link between two network namespaces
  (bench/hosts.py): share of the link against a raw socket and a bare grpcio stream; bfloat16 transfer.
* ``callers``: 1, 2, 4, 8 client processes (``--processes``, each its own LossClient, as training
  workers) making small calls: throughput, p99, server CPU per call, against the echo (bench/callers.py);
  then the most callers against 2 (``--reuse-port-servers``) server processes sharing one port.

Prints markdown tables, writes JSON (``--out``, default bench/results/latest.json) and a PNG beside
it when matplotlib is importable. The servers it starts: ``losswire serve`` (CPU unless ``--device``)
and each baseline, every one in its own process on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

import grpc  # noqa: E402
import torch  # noqa: E402
from baselines import (  # noqa: E402
    ECHO_METHOD,
    LOSS_METHOD,
    Peer,
    echo_request,
    free_port,
    grpc_channel,
    grpc_echo,
    plain_grpc_call,
    plain_grpc_loss,
    rpc_callee,
    rpc_options,
    tcp_echo,
    tcp_roundtrip,
)
from callers import section_callers  # noqa: E402
from floor import canned_losswire  # noqa: E402
from harness import Run, gbps, losswire_server, median, ratio, size_label, wire_sizes  # noqa: E402
from hosts import section_hosts  # noqa: E402
from timing import (  # noqa: E402
    CONFIGS,
    FOCAL,
    MiB,
    autograd_loss_grad,
    big_call_loop,
    client_features,
    engine_loss_grad,
    memcpy_roundtrip,
    percentile,
    remote_step,
    small_workload,
    summary,
    synchronized,
    timed,
    workload,
)

from losswire.client import LossClient, RemoteLoss  # noqa: E402
from losswire.v1 import loss_service_pb2 as pb  # noqa: E402
from losswire.wire import codec  # noqa: E402

SECTIONS = ("small", "big", "peers", "concurrency", "gpu", "hosts", "callers")
IN_FLIGHT_MIB = 256
# -- sections: each returns {"title", "rows", "notes"} ------------------------------------------------


def section_small(run: Run) -> dict[str, Any]:
    pred, target = small_workload()
    request_bytes, response_bytes = wire_sizes(run, pred, target)
    echo = grpc_channel(run.peer(grpc_echo).port).unary_unary(ECHO_METHOD)
    payload = echo_request(request_bytes, response_bytes)
    samples = {
        "losswire RemoteLoss": run.losswire("FocalLoss", 0),
        "RemoteLoss, canned answer": timed(canned_step(run, pred, target), run.args.repeats, warmup=10),
        "bare grpcio echo": timed(lambda: echo(payload), run.args.repeats, warmup=10),
        "in-process autograd": timed(lambda: autograd_loss_grad(FOCAL, pred, target), run.args.repeats, warmup=10),
        "in-process server engine": timed(lambda: engine_loss_grad(FOCAL, pred, target), run.args.repeats, warmup=10),
    }
    stats = {name: summary(values) for name, values in samples.items()}
    echo_stats, local_stats = stats["bare grpcio echo"], stats["in-process autograd"]
    rows = [
        {
            "path": name,
            "median ms": s["median_ms"],
            "p99 ms": s["p99_ms"],
            "median / echo": ratio(s["median_ms"], echo_stats["median_ms"]),
            "p99 / echo": ratio(s["p99_ms"], echo_stats["p99_ms"]),
            "median / autograd": ratio(s["median_ms"], local_stats["median_ms"]),
        }
        for name, s in stats.items()
    ]
    notes = (
        f"request {request_bytes} B, response {response_bytes} B; {run.args.repeats} calls each. 'canned answer': "
        "RemoteLoss against losswire's servicer on grpc.aio without interceptors, answering every call with the "
        "first call's response (bench/floor.py): the design's floor before any per-call work of the server. "
        "Target: ≤ 2x echo (p99 ≤ 2.5x)."
    )
    return {"title": "Small calls: FocalLoss [256, 80], forward + backward", "rows": rows, "notes": notes}


def canned_step(run: Run, pred: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """A small call through RemoteLoss to the canned-answer server (bench/floor.py), started once per run."""
    client = LossClient(f"127.0.0.1:{run.peer(canned_losswire).port}")
    run.stack.callback(client.close)
    return remote_step(RemoteLoss(FOCAL, client=client), pred, target)


BIG_TRANSPORTS = {"gRPC": "stream", "shm": "shm"}  # column label -> bench transport


def section_big(run: Run) -> dict[str, Any]:
    connection = socket.create_connection(("127.0.0.1", run.peer(tcp_echo).port))
    run.stack.callback(connection.close)
    rows = [_big_cell(run, connection, loss, size) for loss in ("FocalLoss", "GIoULoss") for size in run.sizes]
    notes = (
        "Two losswire transports: gRPC (EvaluateStream, 4 MiB chunks) and shm (shared memory: tensors copied "
        "once into a segment both processes map, the gradient written there by the server and read in place). "
        "'ms': the whole round trip (forward + backward); 'compute ms': the server's own loss + gradient time "
        "(timings.compute_ms). 'wire GB/s' = bytes of pred / (round trip - that call's compute): the transport "
        "alone. Baselines moving pred's bytes there and back in the same run: a raw loopback TCP socket (4 MiB "
        "chunks) and two libc "
        "memcpy calls into preallocated buffers. Targets: gRPC wire / socket ≥ 0.5, shm wire / memcpy ≥ 0.8. "
        "gRPC is computed once every chunk is in (LossClient(overlap=False)); 'gRPC overlapped': the same call "
        "computed while its rows arrive, the gradient's rows sent back as they are done (overlap=True, the "
        f"client's default; FocalLoss). {run.args.big_repeats} round trips per cell (median); 1 GB = 1e9 B."
    )
    return {"title": "Big tensors: transport throughput against a raw socket and memcpy", "rows": rows, "notes": notes}


def _baselines_of(run: Run, connection: socket.socket, loss: str, size: int) -> tuple[int, float, float]:
    """(pred bytes, raw socket round trip, memcpy there and back); the tensors are freed on return
    (at 1 GiB every copy counts)."""
    pred, _ = workload(loss, size)
    raw = pred.numpy().view("uint8").reshape(-1).data
    socket_s = median(timed(lambda: tcp_roundtrip(connection, raw), run.repeats(pred.nbytes)))
    memcpy_s = median(timed(memcpy_roundtrip(pred), max(run.repeats(pred.nbytes), 5)))
    return pred.nbytes, socket_s, memcpy_s


def _big_cell(run: Run, connection: socket.socket, loss: str, size: int) -> dict[str, Any]:
    nbytes, socket_s, memcpy_s = _baselines_of(run, connection, loss, size)
    row: dict[str, Any] = {"loss": loss, "pred": size_label(nbytes)}
    floors = {"gRPC": ("socket", socket_s), "shm": ("memcpy", memcpy_s)}
    for label, transport in BIG_TRANSPORTS.items():
        try:
            rounds, compute = run.losswire_and_compute(loss, size, transport)
        except Exception as error:  # e.g. a message over gRPC's 2 GiB: report it, measure the rest
            row[f"{label} error"] = f"{type(error).__name__}: {str(error)[:120]}"
            continue
        round_s, wire_s = median(rounds), median([r - c for r, c in zip(rounds, compute, strict=True)])
        floor, floor_s = floors[label]
        row[f"{label} ms"] = round_s * 1e3
        row[f"{label} wire GB/s"] = gbps(nbytes, wire_s)
        row[f"{floor} GB/s"] = gbps(nbytes, floor_s)
        row[f"{label} wire / {floor}"] = ratio(floor_s, wire_s)
        row[f"{label} compute ms"] = median(compute) * 1e3
    if loss == "FocalLoss" and "overlap" in client_features()["transports"]:
        serial = row.get("gRPC ms")
        overlapped = median(run.losswire_and_compute(loss, size, "overlap")[0]) * 1e3
        row["gRPC overlapped ms"] = overlapped
        row["overlapped / gRPC"] = ratio(overlapped, serial) if serial else float("nan")
    return row


def section_peers(run: Run) -> dict[str, Any]:
    from torch.distributed import rpc

    transports = None if run.args.rpc_transport == "auto" else [run.args.rpc_transport]
    port = free_port()
    run.peer(rpc_callee, port, transports)
    rpc.init_rpc("caller", rank=0, world_size=2, rpc_backend_options=rpc_options(port, transports))
    plain = grpc_channel(run.peer(plain_grpc_loss).port).unary_unary(LOSS_METHOD)
    rows = []
    try:
        for size in [0, *run.sizes]:
            rows.append(_peers_row(run, rpc, plain, size))
    finally:
        rpc.shutdown()
    notes = (
        "FocalLoss, median round trip, the paths timed in turn round after round; ratios are time ratios (< 1: "
        "losswire faster; target: < 1 at every size). "
        "losswire gRPC: --transport stream, EvaluateStream for every call, the 80 KiB one too (LossClient's "
        "default streams from 8 MiB only); shm: shared memory from 1 MiB of tensors, the 80 KiB call one unary "
        "Evaluate (what LossClient does on loopback by default). "
        f"TensorPipe transports: {transports or 'its own choice'} "
        "(uv: TCP loopback, comparable to gRPC; --rpc-transport auto lets it use shared memory, comparable to shm)."
    )
    return {"title": "Peers doing the same work (FocalLoss loss + gradient)", "rows": rows, "notes": notes}


def _peers_row(run: Run, rpc: Any, plain: Any, size: int) -> dict[str, Any]:
    """One size: every path timed in turn, round after round (rotating which goes first), so a slow
    spell of a shared machine (the loss itself takes seconds on a CPU at 256 MiB) hits them alike."""
    pred, target = small_workload() if size == 0 else workload("FocalLoss", size)
    row: dict[str, Any] = {"pred": size_label(pred.nbytes)}
    args = (FOCAL, pred, target)
    paths: dict[str, Callable[[], Any]] = {
        "torch rpc": lambda: rpc.rpc_sync("callee", engine_loss_grad, args=args),
        "plain grpcio": lambda: plain_grpc_call(plain, *args),
    }
    for label, transport in BIG_TRANSPORTS.items():
        module = RemoteLoss(FOCAL, client=run.client_for(transport))
        paths[f"losswire {label}"] = remote_step(module, pred, target)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for round_ in range(run.repeats(pred.nbytes) + 1):  # round 0 warms every path up
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            try:
                seconds = timed(paths[name], 1, warmup=0)[0]
            except Exception as error:  # e.g. a message over gRPC's 2 GiB: report it, measure the rest
                row[f"{name} error"] = f"{type(error).__name__}: {str(error)[:120]}"
                names.remove(name)
                continue
            if round_:
                samples[name].append(seconds)
    times = {name: median(values) for name, values in samples.items() if values}
    for name, seconds in times.items():
        row[f"{name} ms"] = seconds * 1e3
    for label in BIG_TRANSPORTS:
        for peer, short in (("torch rpc", "rpc"), ("plain grpcio", "plain")):
            if f"losswire {label}" in times and peer in times:
                row[f"{label} / {short}"] = ratio(times[f"losswire {label}"], times[peer])
    return row


def _threads(clients: int, seconds: float, make_step: Callable[[], Callable[[], Any]]) -> tuple[float, float]:
    """``clients`` threads calling their own step for ``seconds``: (calls per second, p99 seconds)."""
    steps = [make_step() for _ in range(clients)]
    for step in steps:
        step()  # warm up, outside the window
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def loop(step: Callable[[], Any]) -> None:
        while time.perf_counter() < deadline:
            latencies.extend(timed(step, 1, warmup=0))  # list.extend is atomic under the GIL

    threads = [threading.Thread(target=loop, args=(step,)) for step in steps]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - start), percentile(latencies, 99)


def section_concurrency(run: Run) -> dict[str, Any]:
    pred, target = small_workload()
    payload = echo_request(*wire_sizes(run, pred, target))
    echo_call = grpc_channel(run.peer(grpc_echo).port).unary_unary(ECHO_METHOD)
    seconds = run.args.duration

    def losswire_step() -> Callable[[], None]:
        return remote_step(RemoteLoss(FOCAL, client=run.client), pred, target)

    in_flight = min(IN_FLIGHT_MIB, run.args.max_mib) * MiB
    rows = []
    for clients in run.args.clients:
        echo_rate, echo_p99 = _threads(clients, seconds, lambda: lambda: echo_call(payload))
        idle_rate, idle_p99 = _threads(clients, seconds, losswire_step)
        big = Peer(big_call_loop, run.target, run.args.transport, in_flight)
        try:
            busy_rate, busy_p99 = _threads(clients, seconds, losswire_step)
            big_done = big_calls_finished(big)
        finally:
            big.stop()
        rows.append(
            {
                "clients": clients,
                "losswire calls/s": idle_rate,
                "echo calls/s": echo_rate,
                "calls/s vs echo": ratio(idle_rate, echo_rate),
                "p99 ms": idle_p99 * 1e3,
                "echo p99 ms": echo_p99 * 1e3,
                f"calls/s, {size_label(in_flight)} in flight": busy_rate,
                "p99 ms, in flight": busy_p99 * 1e3,
                "p99 in flight / idle": ratio(busy_p99, idle_p99),
                "big calls done": big_done,
            }
        )
    notes = (
        f"Threads in one process sharing one LossClient (one channel), {seconds:g} s per cell; small calls = "
        f"FocalLoss [256, 80] forward + backward. 'in flight': another process sends {size_label(in_flight)} "
        "FocalLoss calls back to back to the same server meanwhile ('big calls done': how many finished in the window)."
    )
    return {"title": "Concurrency: small calls from N client threads", "rows": rows, "notes": notes}


def big_calls_finished(peer: Peer) -> int:
    """How many calls the big-call process has finished since it said it was ready."""
    done = 0
    while not peer.queue.empty():
        peer.queue.get()
        done += 1
    return done


def section_gpu(run: Run) -> dict[str, Any]:
    title = "GPU: server compute for loss + gradient against the HBM roofline and torch eager"
    if not run.args.device.startswith("cuda") or not torch.cuda.is_available():
        return {"title": title, "rows": [], "notes": "skipped: needs --device cuda and a GPU in this process"}
    device = torch.device(run.args.device)
    rows = [_gpu_cell(run, device, loss, size) for loss in ("FocalLoss", "GIoULoss") for size in run.sizes]
    notes = (
        "server compute = the server's own timings.compute_ms (forward + backward, synchronised). Roofline = "
        "(pred + target + gradient bytes) / the GPU's device-to-device copy bandwidth measured now."
    )
    return {"title": title, "rows": rows, "notes": notes}


def _gpu_cell(run: Run, device: torch.device, loss: str, size: int) -> dict[str, Any]:
    pred, target = workload(loss, size)
    request = pb.EvaluateRequest()
    term = request.terms.add()
    codec.encode_config(CONFIGS[loss], term.config)
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(target, term.target)
    term.gradients.append("pred")
    # the server's own compute time (synchronised there); the first call warms up
    server_ms = [run.client.evaluate(request).timings.compute_ms for _ in range(run.repeats(size) + 1)][1:]
    del request, term
    pred, target = pred.to(device), target.to(device)
    eager_s = median(timed(synchronized(lambda: autograd_loss_grad(CONFIGS[loss], pred, target), device), 5))
    copy = torch.empty_like(pred)
    copy_s = median(timed(synchronized(lambda: copy.copy_(pred), device), 5))  # reads + writes pred's bytes
    hbm_bytes_per_s = 2 * pred.nbytes / copy_s
    moved = pred.nbytes + target.nbytes + pred.nbytes  # the least traffic: read pred and target, write the gradient
    compute_s = percentile(server_ms, 50) / 1e3
    return {
        "loss": loss,
        "pred": size_label(pred.nbytes),
        "server compute ms": compute_s * 1e3,
        "eager ms": eager_s * 1e3,
        "server / eager": ratio(compute_s, eager_s),
        "roofline ms": moved / hbm_bytes_per_s * 1e3,
        "fraction of roofline": ratio(moved / hbm_bytes_per_s, compute_s),
        "copy GB/s": hbm_bytes_per_s / 1e9,
    }


SECTION_FUNCTIONS = {
    "small": section_small,
    "big": section_big,
    "peers": section_peers,
    "concurrency": section_concurrency,
    "gpu": section_gpu,
    "hosts": section_hosts,
    "callers": section_callers,
}


# -- report --------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    memory = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return {
        "cpu": model[1].strip() if model else platform.processor(),
        "nproc": os.cpu_count(),
        "memory_gib": round(int(memory[1]) / (1 << 20), 1) if memory else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
    }


def markdown(section: dict[str, Any]) -> str:
    lines = [f"### {section['title']}", ""]
    columns = list(dict.fromkeys(key for row in section["rows"] for key in row))
    if columns:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in section["rows"]]
    return "\n".join([*lines, "", section["notes"], ""])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def plot(results: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    if "small" in results:
        rows = results["small"]["rows"]
        names = [r["path"].replace(" ", "\n", 1) for r in rows]
        left.bar(names, [r["median ms"] for r in rows], label="median")
        left.scatter(names, [r["p99 ms"] for r in rows], color="black", label="p99", zorder=3)
        left.set(title="small call: FocalLoss [256, 80]", ylabel="ms")
        left.legend()
    for loss in ("FocalLoss", "GIoULoss"):
        rows = [r for r in results.get("big", {}).get("rows", []) if r.get("loss") == loss and "error" not in r]
        middle.plot([r["pred"] for r in rows], [r["losswire GB/s"] for r in rows], marker="o", label=f"losswire {loss}")
        middle.plot([r["pred"] for r in rows], [r["socket GB/s"] for r in rows], ls=":", label=f"socket ({loss} size)")
    middle.set(title="big tensors: pred bytes / round trip", ylabel="GB/s", xlabel="pred", yscale="log")
    middle.legend()
    rows = [r for r in results.get("peers", {}).get("rows", []) if "error" not in r]
    for column in ("losswire gRPC ms", "losswire shm ms", "torch rpc ms", "plain grpcio ms"):
        right.plot([r["pred"] for r in rows], [r[column] for r in rows], marker="o", label=column[:-3])
    right.set(title="peers: FocalLoss loss + gradient", ylabel="ms (median round trip)", xlabel="pred", yscale="log")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return f"plot: {path}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", help="host:port of a running server (default: start one)")
    parser.add_argument("--device", default="cpu", help="device of the server it starts (cpu, cuda, cuda:1)")
    parser.add_argument(
        "--transport",
        default="default",
        help="how the client sends tensors: default (LossClient's choice), unary, stream, or a LossClient(transport=)",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS)
    )
    parser.add_argument("--max-mib", type=int, default=1024, help="largest pred in MiB (of 1, 16, 64, 256, 1024)")
    parser.add_argument("--repeats", type=int, default=300, help="round trips per small-call cell")
    parser.add_argument("--big-repeats", type=int, default=3, help="round trips per big-tensor cell")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="torch threads of every process of the run (OMP_NUM_THREADS; the server it starts, the peers, "
        "in-process baselines); default: torch's own (all cores)",
    )
    parser.add_argument("--clients", default="1,4,16", help="client thread counts for the concurrency section")
    parser.add_argument("--processes", default="1,2,4,8", help="client process counts for the callers section")
    parser.add_argument(
        "--reuse-port-servers",
        default="2",
        help="server process counts sharing one port in the callers section's last rows (a node's cores)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per concurrency or callers cell")
    parser.add_argument(
        "--rpc-transport",
        default="uv",
        choices=["uv", "auto"],
        help="TensorPipe: uv = TCP loopback, auto = its choice (shared memory)",
    )
    parser.add_argument(
        "--out", type=Path, default=BENCH / "results" / "latest.json", help="JSON results (a PNG goes beside it)"
    )
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.clients = [int(n) for n in args.clients.split(",")]
    args.processes = [int(n) for n in args.processes.split(",")]
    args.reuse_port_servers = [int(n) for n in args.reuse_port_servers.split(",") if int(n) > 1]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.torch_threads:  # before any child starts: they read it when torch loads
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
        torch.set_num_threads(args.torch_threads)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        target = args.target or stack.enter_context(losswire_server(args.device))
        run = Run(args, target, stack)
        for name in args.sections:
            started = time.perf_counter()
            results[name] = SECTION_FUNCTIONS[name](run)
            print(markdown(results[name]), flush=True)
            print(f"({name}: {time.perf_counter() - started:.0f} s)\n", file=sys.stderr, flush=True)
    report = {
        "machine": machine(),
        "client": client_features(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "target": args.target or f"losswire serve --device {args.device} (started by the benchmark)",
        "sections": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out}\n{plot(results, args.out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
