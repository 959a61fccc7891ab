"""The ``callers`` section of ``bench/run.py``: many client *processes* sharing one server.

The ``concurrency`` section has threads in one process (one training process, one channel). Here every
caller is its own process with its own ``LossClient`` and so its own connection, as separate training
workers (data-parallel ranks, separate jobs) are: the server sees N connections at once. For N = 1, 2,
4, 8 processes each makes small calls back to back for ``--duration`` seconds, against the losswire
server under test and then against the bare grpcio echo. Both servers' CPU time is read from
``/proc/<pid>/stat`` around the window: CPU ms per call shows whether the server's cost of a call stays
flat as connections are added (fixed per-call overhead) or grows (contention, hand-offs, polling).

Then (with a server it starts, not ``--target``) two (``--reuse-port-servers``) ``losswire serve
--reuse-port on`` processes share one port with the most callers: the kernel splits connections between
them, which is how a node with several cores serves more callers than one server process can (a server
answers small calls on one event loop).

The caller processes are started once (spawned, one torch thread each) and kept for the whole section:
a process imports torch in seconds on a small machine, which must not fall inside a window.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from baselines import ECHO_METHOD, START_TIMEOUT, echo_request, grpc_channel, grpc_echo
from harness import Run, wire_sizes
from support.servers import LISTENING, serve_cmd, server_env
from timing import FOCAL, make_client, percentile, remote_step, small_workload

from losswire.client import RemoteLoss

START_MARGIN = 0.5  # seconds from "go" to the window's start: every caller has read its command by then
WARMUP_CALLS = 5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- one caller process (runs in the child) -----------------------------------------------------------


def caller_loop(commands: multiprocessing.Queue, results: multiprocessing.Queue, transport: str) -> None:
    """Serve the parent's commands until "stop": ("prepare", kind, address, sizes) builds and warms a
    step and answers "ready"; ("window", start, end) calls it back to back and answers the latencies
    of the calls that finished between ``start`` and ``end`` (``time.monotonic``: one clock for every
    process of the host) and the CPU seconds this process spent meanwhile (every thread: gRPC's too)."""
    torch.set_num_threads(1)  # the cores are the server's; a caller needs no more than one
    step: Callable[[], Any] | None = None
    while (command := commands.get())[0] != "stop":
        if command[0] == "prepare":
            step = _make_step(transport, *command[1:])
            for _ in range(WARMUP_CALLS):
                step()
            results.put("ready")
        else:
            assert step is not None, "a window before prepare"
            results.put(_window(step, *command[1:]))


def _make_step(transport: str, kind: str, address: str, sizes: tuple[int, int]) -> Callable[[], Any]:
    """A small call to ``address``: FocalLoss [256, 80] forward + backward through RemoteLoss with a
    fresh LossClient (its own connection), or the echo of the same request and response sizes."""
    if kind == "echo":
        call, payload = grpc_channel(int(address.rsplit(":", 1)[1])).unary_unary(ECHO_METHOD), echo_request(*sizes)
        return lambda: call(payload)
    return remote_step(RemoteLoss(FOCAL, client=make_client(address, transport)), *small_workload())


def _window(step: Callable[[], Any], start: float, end: float) -> tuple[list[float], float]:
    time.sleep(max(0.0, start - time.monotonic()))
    latencies: list[float] = []
    cpu = time.process_time()
    began = time.monotonic()
    while began < end:
        step()
        done = time.monotonic()
        if done <= end:
            latencies.append(done - began)
        began = done
    return latencies, time.process_time() - cpu


# -- the callers, driven from the benchmark process ----------------------------------------------------


@dataclass
class Window:
    """What N callers did in one window, and the CPU the servers spent meanwhile."""

    calls: int
    seconds: float
    p99: float
    server_cpu: list[float]  # CPU seconds of each server process in the window (empty: not measured)
    callers_cpu: float  # CPU seconds of the caller processes together in the window
    host_cpu: float  # CPU seconds of the whole machine in the window (every process: others' too)

    @property
    def callers_ms_per_call(self) -> float:
        return self.callers_cpu / self.calls * 1e3 if self.calls else float("nan")

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    @property
    def cpu_ms_per_call(self) -> float:
        return sum(self.server_cpu) / self.calls * 1e3 if self.server_cpu and self.calls else float("nan")


class Callers:
    """``count`` spawned caller processes, each with a command queue of its own so that a measurement
    can use the first N and leave the others blocked (idle, no CPU)."""

    def __init__(self, count: int, transport: str, sizes: tuple[int, int], seconds: float) -> None:
        self.sizes, self.seconds = sizes, seconds
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in range(count)]
        self.processes = [
            context.Process(target=caller_loop, args=(queue, self.results, transport), daemon=True)
            for queue in self.commands
        ]
        for process in self.processes:
            process.start()

    def measure(self, n: int, kind: str, address: str, pids: list[int]) -> Window:
        """The first ``n`` callers, warmed up on ``address``, calling it for ``seconds`` from one start;
        the CPU of the server processes ``pids`` is read at the window's start and end."""
        self._ask(n, ("prepare", kind, address, self.sizes), START_TIMEOUT)
        start = time.monotonic() + START_MARGIN
        end = start + self.seconds
        for queue in self.commands[:n]:
            queue.put(("window", start, end))
        time.sleep(max(0.0, start - time.monotonic()))
        before, host = [cpu_seconds(pid) for pid in pids], host_cpu_seconds()
        time.sleep(max(0.0, end - time.monotonic()))
        spent = [cpu_seconds(pid) - cpu for pid, cpu in zip(pids, before, strict=True)]
        host = host_cpu_seconds() - host
        answers = self._collect(n, self.seconds + START_TIMEOUT)
        latencies = [t for times, _ in answers for t in times]
        callers_cpu = sum(cpu for _, cpu in answers)
        return Window(len(latencies), self.seconds, percentile(latencies, 99), spent, callers_cpu, host)

    def _ask(self, n: int, command: tuple[Any, ...], timeout: float) -> list[Any]:
        for queue in self.commands[:n]:
            queue.put(command)
        return self._collect(n, timeout)

    def _collect(self, n: int, timeout: float) -> list[Any]:
        return [self.results.get(timeout=timeout) for _ in range(n)]

    def stop(self) -> None:
        for queue in self.commands:
            queue.put(("stop",))
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (fields 14 and 15 of /proc/pid/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def host_cpu_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLOCK_TICKS  # user .. steal, less idle and iowait


@contextlib.contextmanager
def reuse_port_servers(count: int, device: str) -> Iterator[tuple[str, list[int]]]:
    """``count`` ``losswire serve --reuse-port on`` processes on one loopback port: (host:port, pids)."""
    procs: list[subprocess.Popen] = []
    port = "0"  # the first picks a free port, the others join it
    try:
        for _ in range(count):
            proc = subprocess.Popen(
                serve_cmd("--host=127.0.0.1", f"--port={port}", "--reuse-port=on", f"--device={device}"),
                env=server_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            port = _listening_port(proc)
        yield f"127.0.0.1:{port}", [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def _listening_port(proc: subprocess.Popen) -> str:
    assert proc.stderr is not None
    for line in proc.stderr:
        if match := LISTENING.search(line):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # a full pipe would block it
            return match["port"]
    raise SystemExit(f"losswire serve --reuse-port exited (rc {proc.wait()}) before listening")


# -- the section ---------------------------------------------------------------------------------------


def section_callers(run: Run) -> dict[str, Any]:
    sizes = wire_sizes(run, *small_workload())
    echo = run.peer(grpc_echo)
    server_pids = [run.server_pid] if run.server_pid else []  # none: a server the user runs (--target)
    counts = run.args.processes
    callers = Callers(max(counts), run.args.transport, sizes, run.args.duration)
    try:
        rows, echoes = [], {}
        for n in counts:
            losswire = callers.measure(n, "losswire", run.target, server_pids)
            echoes[n] = callers.measure(n, "echo", f"127.0.0.1:{echo.port}", [echo.process.pid])
            rows.append(_row(str(n), "1", losswire, echoes[n]))
        if not run.args.target:  # servers it starts itself
            one = rows[-1]
            for servers in run.args.reuse_port_servers:
                rows.append(_reuse_port_row(run, callers, servers, max(counts), one, echoes[max(counts)]))
    finally:
        callers.stop()
    return {"title": "Callers: small calls from N client processes", "rows": rows, "notes": _notes(run, sizes)}


def _row(processes: str, servers: str, losswire: Window, echo: Window | None) -> dict[str, Any]:
    return {
        "processes": processes,
        "servers": servers,
        "losswire calls/s": losswire.rate,
        "echo calls/s": echo.rate if echo else "",
        "calls/s vs echo": _ratio(losswire.rate, echo.rate) if echo else "",
        "p99 ms": losswire.p99 * 1e3,
        "echo p99 ms": echo.p99 * 1e3 if echo else "",
        "server CPU ms/call": losswire.cpu_ms_per_call if losswire.server_cpu else "",
        "echo CPU ms/call": echo.cpu_ms_per_call if echo else "",
        "callers CPU ms/call": losswire.callers_ms_per_call,
        "echo callers CPU ms/call": echo.callers_ms_per_call if echo else "",
        "server CPU s/s": "/".join(f"{cpu / losswire.seconds:.2f}" for cpu in losswire.server_cpu),
        "others CPU s/s": (losswire.host_cpu - sum(losswire.server_cpu) - losswire.callers_cpu) / losswire.seconds,
    }


def _reuse_port_row(
    run: Run, callers: Callers, servers: int, n: int, one: dict[str, Any], echo: Window
) -> dict[str, Any]:
    """``n`` callers against ``servers`` servers on one port, against one server's row and the one echo
    process's window with the same callers (the node's whole answer against the echo's)."""
    with reuse_port_servers(servers, run.args.device) as (target, pids):
        window = callers.measure(n, "losswire", target, pids)
    row = _row(str(n), f"{len(pids)}, --reuse-port", window, echo)
    row["echo calls/s"] = row["echo p99 ms"] = row["echo CPU ms/call"] = row["echo callers CPU ms/call"] = ""
    row["calls/s vs 1 server"] = _ratio(window.rate, one["losswire calls/s"])
    return row


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def _notes(run: Run, sizes: tuple[int, int]) -> str:
    return (
        f"Each caller is its own spawned process with its own LossClient (own connection) and one torch "
        f"thread, making FocalLoss [256, 80] forward + backward calls back to back ({sizes[0]} B request, "
        f"{sizes[1]} B response; the echo: the same sizes) for {run.args.duration:g} s from a common start "
        "after every caller warmed up; calls/s counts the calls finished in the window, p99 is over all of "
        "them. 'server CPU ms/call': the server process's user + system CPU (/proc/<pid>/stat, every thread) "
        "in the window / calls (empty with --target); 'server CPU s/s': that CPU per second of window (1.0 = "
        "one core busy; one figure per server); 'callers CPU ms/call': the caller processes' CPU together / "
        "calls; 'others CPU s/s': the machine's busy CPU (/proc/stat) per second of the losswire window less the "
        "server's and the callers' (≈ 0: nothing else ran; with --target it includes a server on this host). "
        f"Callers and servers share this machine's {os.cpu_count()} cores. calls/s is bounded by one server "
        "core (small calls are answered on the server's event loop: server CPU s/s near 1.0 means it is "
        "saturated, calls/s ≈ 1000 / server CPU ms/call) and by the machine's cores (calls/s ≈ cores * 1000 "
        "/ (server + callers CPU ms/call)), so calls/s here is a floor of what a server with cores of its own "
        "does. Targets: calls/s vs echo ≥ 0.4 at 8 processes; server CPU "
        f"ms/call flat or falling from 1 to 8. The '--reuse-port' rows (not with --target): "
        f"{', '.join(map(str, run.args.reuse_port_servers)) or 'no'} servers on one port (SO_REUSEPORT: the kernel "
        "gives each connection to one of them), against the one-server row above them; their 'calls/s vs echo' "
        "is against the one echo process's window with as many callers."
    )
