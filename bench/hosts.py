"""Big tensors across hosts: losswire's stream over a 10 Gbit/s link, against a raw socket and bare grpcio.

On loopback nothing but the CPU limits a stream; between hosts the link does. Two network namespaces
joined by a veth pair, each end shaped to 10 Gbit/s with tbf, are two hosts on one machine: the
server and the baselines run in one, the measuring client in the other, every path in the same run,
interleaved round by round. Needs root (``ip netns``, ``tc``); without it the section is skipped.

    .venv/bin/python bench/run.py --sections hosts --max-mib 256 --big-repeats 3 --torch-threads 1

``section_hosts`` builds the link, starts the servers inside the server namespace and runs this file
as the client inside the other; the subcommands below are those processes' entry points:

    bench/hosts.py serve-tcp HOST        # raw TCP echo (baselines.tcp_echo)
    bench/hosts.py serve-stream HOST     # bare grpcio stream echo
    bench/hosts.py client --losswire HOST:PORT --tcp HOST:PORT --stream HOST:PORT --sizes-mib 16,64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

import grpc  # noqa: E402
from baselines import CHUNK, UNLIMITED, tcp_echo, tcp_roundtrip  # noqa: E402
from harness import Run, overlap_flags  # noqa: E402
from support.servers import LISTENING, serve_cmd, server_env  # noqa: E402
from timing import FOCAL, MiB, client_settings, remote_step, timed, workload  # noqa: E402
from torch import Tensor  # noqa: E402

from losswire.client import LossClient, RemoteLoss  # noqa: E402

TITLE = "Big tensors across hosts: a 10 Gbit/s link between two network namespaces"
SIZES_MIB = (16, 64, 256)
SERVER_ADDRESS, CLIENT_ADDRESS, PREFIX = "10.77.0.1", "10.77.0.2", 24
# tbf: burst must hold a whole GSO packet (64 KiB on veth) and a timer tick's worth of bytes; 1 MB
# reaches the rate (TCP goodput 9.55 Gbit/s, the framing's ceiling) while letting an idle link
# run ahead of it by under 1 ms. 128 KB only reached 8.8-9.3 Gbit/s.
LINK_RATE, LINK_BYTES_PER_S = "10gbit", 10e9 / 8
TBF_BURST, TBF_LATENCY = "1mb", "10ms"
TCP_GOODPUT_CEILING = 1448 / 1514  # payload per Ethernet frame of a TCP segment with timestamps
STREAM_METHOD = "/bench.StreamEcho/Call"
PATHS = ("raw TCP", "grpcio stream", "losswire f32", "losswire bf16", "losswire overlapped", "losswire 2 lanes")
# losswire's paths: (transfer dtype, overlap, lanes); all but the overlapped one wait for every chunk
# before computing, so that round trip - compute is their wire time; the overlapped one computes while
# the rows arrive; the lanes one sends pred's stripes on its stream and two lanes (connections of their own)
LOSSWIRE_PATHS = {
    "losswire f32": (None, False, 0),
    "losswire bf16": ("bfloat16", False, 0),
    "losswire overlapped": (None, True, 0),
    "losswire 2 lanes": (None, False, 2),
}
PORT_LINE = re.compile(r"^port (?P<port>\d+)$")
START_TIMEOUT = 120.0  # a child imports torch on a busy 2-core machine
CLIENT_TIMEOUT = 1800.0


# -- the link: two namespaces, a veth pair, tbf on both ends -----------------------------------------


class LinkUnavailableError(RuntimeError):
    """The machine cannot build the link (not root, no netns or tbf support)."""


@dataclass(frozen=True)
class Link:
    server_ns: str
    client_ns: str
    server_dev: str
    client_dev: str


def _command(*argv: str) -> None:
    """Runs ``argv``; a failure says which command and why, so that a skipped section names its cause."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        why = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise LinkUnavailableError(f"`{' '.join(argv)}` failed: {why}")


def _quietly(*argv: str) -> None:
    """Teardown: whatever is already gone stays gone."""
    subprocess.run(argv, capture_output=True)


def _remove_stale_links() -> None:
    """Namespaces left by a benchmark process that was killed (SIGKILL skips every teardown)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name, pid in re.findall(r"^(lw(\d+)-\w+)", listed, re.M):
        if not Path(f"/proc/{pid}").exists():
            _quietly("ip", "netns", "del", name)


@contextlib.contextmanager
def shaped_link() -> Iterator[Link]:
    """Two fresh namespaces joined by a veth pair, 10 Gbit/s each way; all of it deleted on exit,
    also when the body raises or is interrupted. Names carry this process's id so runs never collide."""
    tag = f"lw{os.getpid()}"
    link = Link(f"{tag}-server", f"{tag}-client", f"{tag}s", f"{tag}c")
    _remove_stale_links()
    with contextlib.ExitStack() as teardown:
        for namespace in (link.server_ns, link.client_ns):
            _command("ip", "netns", "add", namespace)
            teardown.callback(_quietly, "ip", "netns", "del", namespace)  # takes its veth end along
        _command("ip", "link", "add", link.server_dev, "type", "veth", "peer", "name", link.client_dev)
        teardown.callback(_quietly, "ip", "link", "del", link.server_dev)  # if it never left this namespace
        for namespace, device, address in (
            (link.server_ns, link.server_dev, SERVER_ADDRESS),
            (link.client_ns, link.client_dev, CLIENT_ADDRESS),
        ):
            _bring_up(namespace, device, address)
        yield link


def _bring_up(namespace: str, device: str, address: str) -> None:
    _command("ip", "link", "set", device, "netns", namespace)
    _command("ip", "-n", namespace, "addr", "add", f"{address}/{PREFIX}", "dev", device)
    _command("ip", "-n", namespace, "link", "set", device, "up")
    _command("ip", "-n", namespace, "link", "set", "lo", "up")
    shaper = ("root", "tbf", "rate", LINK_RATE, "burst", TBF_BURST, "latency", TBF_LATENCY)
    _command("tc", "-n", namespace, "qdisc", "add", "dev", device, *shaper)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit while the link exists, so its teardown runs (the default action
    would leave the namespaces and their servers behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- processes inside a namespace ---------------------------------------------------------------------


def in_namespace(namespace: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


def start_in(stack: contextlib.ExitStack, argv: list[str], ready: re.Pattern[str], log: str) -> re.Match[str]:
    """Starts ``argv`` (stopped when ``stack`` closes) and waits for the line of ``log`` ("stdout" or
    "stderr") that matches ``ready``; the rest of that stream is drained so the child never blocks."""
    proc = subprocess.Popen(
        argv,
        env=server_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if log == "stdout" else subprocess.DEVNULL,
        stderr=subprocess.PIPE if log == "stderr" else None,
        text=True,
    )
    stack.callback(_stop, proc)
    stream = proc.stdout if log == "stdout" else proc.stderr
    assert stream is not None
    timer = threading.Timer(START_TIMEOUT, proc.kill)  # a child that hangs before its line ends the wait
    timer.start()
    try:
        for line in stream:
            if match := ready.search(line.strip()):
                threading.Thread(target=stream.read, daemon=True).start()
                return match
    finally:
        timer.cancel()
    raise RuntimeError(f"`{' '.join(argv)}` exited (rc {proc.wait()}) before it was ready")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Targets:
    losswire: str
    tcp: str
    stream: str


def start_servers(stack: contextlib.ExitStack, link: Link, device: str) -> Targets:
    """losswire and both baselines, each its own process in the server namespace."""
    losswire = start_in(
        stack,
        in_namespace(
            link.server_ns,
            *serve_cmd(f"--host={SERVER_ADDRESS}", "--port=0", f"--device={device}", *overlap_flags()),
        ),
        LISTENING,
        "stderr",
    )
    ports = [
        start_in(stack, in_namespace(link.server_ns, *_this_file(command, SERVER_ADDRESS)), PORT_LINE, "stdout")
        for command in ("serve-tcp", "serve-stream")
    ]
    tcp, stream = (f"{SERVER_ADDRESS}:{match['port']}" for match in ports)
    return Targets(f"{SERVER_ADDRESS}:{losswire['port']}", tcp, stream)


def _this_file(*args: str) -> list[str]:
    return [sys.executable, __file__, *args]


def run_client(link: Link, targets: Targets, sizes_mib: list[int], repeats: int) -> list[dict[str, Any]]:
    """This file's ``client`` in the client namespace; its JSON answer (its progress goes to stderr)."""
    argv = in_namespace(
        link.client_ns,
        *_this_file("client"),
        f"--losswire={targets.losswire}",
        f"--tcp={targets.tcp}",
        f"--stream={targets.stream}",
        f"--sizes-mib={','.join(map(str, sizes_mib))}",
        f"--repeats={repeats}",
    )
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True, timeout=CLIENT_TIMEOUT)
    return json.loads(done.stdout)


# -- the section (in the benchmark process) -----------------------------------------------------------


def section_hosts(run: Run) -> dict[str, Any]:
    sizes_mib = [mib for mib in SIZES_MIB if mib <= run.args.max_mib]
    repeats = max(3, run.args.big_repeats)
    if os.geteuid() != 0:
        return _skipped("not running as root")
    with _sigterm_unwinds(), contextlib.ExitStack() as stack:
        try:
            link = stack.enter_context(shaped_link())
        except LinkUnavailableError as error:
            return _skipped(str(error))
        targets = start_servers(stack, link, run.args.device)
        measured = run_client(link, targets, sizes_mib, repeats)
    rows = [hosts_row(cell) for cell in measured]
    return {"title": TITLE, "rows": rows, "notes": hosts_notes(rows, repeats)}


def _skipped(why: str) -> dict[str, Any]:
    return {"title": TITLE, "rows": [], "notes": f"skipped: needs root (ip netns); {why}"}


def hosts_row(cell: dict[str, Any]) -> dict[str, Any]:
    """One size: every path's share of the link for the same bytes (pred there, as many back)."""
    moved = 2 * cell["pred_bytes"]
    samples, compute = cell["samples"], cell["compute"]
    tcp_s, stream_s = _median(samples["raw TCP"]), _median(samples["grpcio stream"])
    f32_s, bf16_s, lanes_s = (
        _wire(samples.get(name, []), compute[name]) for name in ("losswire f32", "losswire bf16", "losswire 2 lanes")
    )
    serial_s, overlapped_s = _median(samples["losswire f32"]), _median(samples.get("losswire overlapped", []))
    compute_s = _median(compute["losswire f32"])
    return {
        "pred": f"{cell['pred_bytes'] / MiB:.3g} MiB",
        "raw TCP share": _share(moved, tcp_s),
        "grpcio stream share": _share(moved, stream_s),
        "losswire share": _share(moved, f32_s),
        "losswire / grpcio": stream_s / f32_s,
        "2 lanes share": _share(moved, lanes_s),
        "2 lanes / one stream": lanes_s / f32_s,
        "2 lanes round trip ms": _median(samples.get("losswire 2 lanes", [])) * 1e3,
        "losswire round trip ms": serial_s * 1e3,
        "losswire compute ms": compute_s * 1e3,
        "f32 wire ms": f32_s * 1e3,
        "bf16 wire ms": bf16_s * 1e3,
        "bf16 / f32": bf16_s / f32_s,
        "overlapped round trip ms": overlapped_s * 1e3,
        "overlapped / serial": overlapped_s / serial_s,
        "overlapped / max(wire, compute)": overlapped_s / max(f32_s, compute_s),
    }


def _wire(rounds: list[float], compute: list[float]) -> float:
    """Median of each call's round trip less that call's server compute: the transport alone."""
    return _median([r - c for r, c in zip(rounds, compute, strict=True)])


def _median(samples: list[float]) -> float:
    """The median; NaN for a path this client does not offer (none measured)."""
    return statistics.median(samples) if samples else float("nan")


def _share(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / LINK_BYTES_PER_S


def hosts_notes(rows: list[dict[str, Any]], repeats: int) -> str:
    link_check = rows[-1]["raw TCP share"] * 10 if rows else float("nan")  # the largest size: the burst amortised
    return (
        f"Server and baselines in one network namespace ({SERVER_ADDRESS}), the measuring client in another "
        f"({CLIENT_ADDRESS}), joined by a veth pair; each end's egress shaped by `tc qdisc ... root tbf rate "
        f"{LINK_RATE} burst {TBF_BURST} latency {TBF_LATENCY}` (so 10 Gbit/s each way; both namespaces share "
        "this machine's CPUs). FocalLoss, pred [N, 80] float32. 'share' = 2 x pred bytes (pred there, its "
        "gradient back; the same bytes for every path) / time / 10 Gbit/s; TCP/IP framing caps any path at "
        f"{TCP_GOODPUT_CEILING:.3f} (tbf counts every frame's headers), and the raw socket moved "
        f"{link_check:.2f} Gbit/s of payload at {rows[-1]['pred'] if rows else '-'} here. Paths: "
        "raw TCP (send pred's bytes in 4 MiB pieces, read as many back); bare grpcio stream (one stream_stream "
        "call, no protobuf: pred's bytes as 4 MiB messages, prepared before the clock starts, then the same "
        "messages back once all arrived); losswire = RemoteLoss forward + backward through "
        "LossClient(stream_threshold=0, shared_memory='off'), wire time = round trip - the server's "
        "compute (timings.compute_ms) of that call, computed once every chunk is in (overlap=False); bf16 = "
        "the same with transfer_dtype='bfloat16' (half the bytes each way); overlapped = the f32 call with "
        "overlap=True (rows interleaved, computed as they arrive, gradient rows sent back as they are done), "
        "against max(f32 wire, compute); 2 lanes = the f32 call with LossClient(lanes=2) (pred's 1 MiB stripes "
        "dealt to its stream and two lanes, each on a connection of its own), wire time as f32's. Paths "
        "interleaved round by round, rotating which goes first; median "
        f"of {repeats} rounds after one warm-up. Targets: losswire share ≥ 0.85 at 64-256 MiB and ≥ 0.7 at "
        "16 MiB; bf16 wire time never above f32's; overlapped ≤ 1.3 x max(wire, compute) at 256 MiB. "
        f"{_verdict(rows)}"
    )


def _verdict(rows: list[dict[str, Any]]) -> str:
    missed = [
        f"{row['pred']} share {row['losswire share']:.2f} < {floor}"
        for row in rows
        if row["losswire share"] < (floor := 0.7 if row["pred"].startswith("16 ") else 0.85)
    ]
    missed += [f"{row['pred']} bf16 / f32 {row['bf16 / f32']:.2f}" for row in rows if row["bf16 / f32"] > 1]
    missed += [
        f"{row['pred']} overlapped / max(wire, compute) {row['overlapped / max(wire, compute)']:.2f} > 1.3"
        for row in rows
        if row["pred"].startswith("256 ") and row["overlapped / max(wire, compute)"] > 1.3
    ]
    return "Missed here: " + "; ".join(missed) + "." if missed else "Met at every size measured."


# -- the processes' entry points (run inside a namespace) ---------------------------------------------


class _PortLine:
    """Stands in for a Peer's queue: the serving function's port goes to stdout, where start_in reads it."""

    def put(self, port: int) -> None:
        print(f"port {port}", flush=True)


def serve_stream_echo(queue: Any, host: str) -> None:
    """A bare grpcio stream_stream echo, raw bytes: reads every message of the call, then sends them
    all back (as losswire's server reads the whole request before it answers)."""
    service, name = STREAM_METHOD.strip("/").split("/")

    def echo(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield from list(requests)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=UNLIMITED)
    handler = grpc.stream_stream_rpc_method_handler(echo)  # no (de)serializers: bytes in and out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {name: handler})])
    queue.put(server.add_insecure_port(f"{host}:0"))
    server.start()
    server.wait_for_termination()


def client_paths(
    args: argparse.Namespace, pred: Tensor, target: Tensor, compute: dict[str, list[float]]
) -> dict[str, Callable[[], Any]]:
    """One round trip of each path, as callables; losswire's append their server compute seconds."""
    raw = pred.numpy().view("uint8").reshape(-1).data
    connection = socket.create_connection(_address(args.tcp))
    stream = grpc.insecure_channel(args.stream, options=UNLIMITED).stream_stream(STREAM_METHOD)
    messages = [bytes(raw[start : start + CHUNK]) for start in range(0, len(raw), CHUNK)]
    paths: dict[str, Callable[[], Any]] = {
        "raw TCP": lambda: tcp_roundtrip(connection, raw),
        "grpcio stream": lambda: _stream_roundtrip(stream, messages),
    }
    for name, (dtype, overlap, lanes) in LOSSWIRE_PATHS.items():
        settings, missing = client_settings(
            {"stream_threshold": 0, "shared_memory": "off", "transfer_dtype": dtype, "overlap": overlap, "lanes": lanes}
        )
        if missing:  # an older client lacks the path's feature: the path is left out
            continue
        client = LossClient(args.losswire, **settings)
        paths[name] = remote_step(RemoteLoss(FOCAL, client=client), pred, target, compute[name])
    return paths


def _address(target: str) -> tuple[str, int]:
    host, port = target.rsplit(":", 1)
    return host, int(port)


def _stream_roundtrip(call: Any, messages: list[bytes]) -> None:
    received = sum(len(message) for message in call(iter(messages)))
    if received != sum(map(len, messages)):
        raise ConnectionError(f"the stream echo sent {received} bytes back")


def measure_size(args: argparse.Namespace, pred_bytes: int) -> dict[str, Any]:
    """Every path at one size, round after round, rotating which goes first so that a slow spell of
    the shared machine hits them alike; round 0 warms each up and is dropped."""
    pred, target = workload("FocalLoss", pred_bytes)
    compute: dict[str, list[float]] = {name: [] for name in LOSSWIRE_PATHS}
    paths = client_paths(args, pred, target, compute)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    order = [name for name in PATHS if name in paths]
    for round_ in range(args.repeats + 1):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            seconds = timed(paths[name], 1, warmup=0)[0]
            if round_:
                samples[name].append(seconds)
        print(f"hosts: {pred.nbytes / MiB:.3g} MiB round {round_}/{args.repeats}", file=sys.stderr, flush=True)
    compute = {name: values[1:] for name, values in compute.items()}  # the warm-up call's dropped
    return {"pred_bytes": pred.nbytes, "samples": samples, "compute": compute}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("serve-tcp", "serve-stream"):
        commands.add_parser(command).add_argument("host")
    client = commands.add_parser("client", help="measure every path; JSON on stdout")
    for option in ("--losswire", "--tcp", "--stream"):
        client.add_argument(option, required=True, help="host:port")
    client.add_argument("--sizes-mib", required=True, help="comma-separated pred sizes in MiB")
    client.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "serve-tcp":
        tcp_echo(_PortLine(), args.host)
    elif args.command == "serve-stream":
        serve_stream_echo(_PortLine(), args.host)
    else:
        cells = [measure_size(args, int(mib) * MiB) for mib in args.sizes_mib.split(",")]
        print(json.dumps(cells))


if __name__ == "__main__":
    main()
