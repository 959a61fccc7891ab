"""What every section of ``bench/run.py`` shares: the server under test, the run's state (``Run``) and
small helpers. Sections in files of their own (``callers.py``, ``hosts.py``) import it from here, so
that ``run.py`` imports them and nothing imports ``run.py``."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from baselines import Peer
from support.servers import LISTENING, serve_cmd, server_env
from timing import CONFIGS, FOCAL, MiB, make_client, remote_step, small_workload, summary, timed, workload

from losswire.client import LossClient, RemoteLoss
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

SIZES_MIB = (1, 16, 64, 256, 1024)
SERVER_PIDS: dict[str, int] = {}  # host:port -> pid of each server losswire_server started (its CPU time)


# -- the server under test and the shared state of a run ---------------------------------------------


def overlap_flags() -> list[str]:
    """``--overlap-transfer=on`` for a server that has the setting: the benchmark measures both ways
    whatever the machine's CPU count (its clients choose, ``LossClient(overlap=...)``); an older server
    has none."""
    from losswire.server.config import ServerConfig

    return ["--overlap-transfer=on"] if "overlap_transfer" in ServerConfig.__dataclass_fields__ else []


@contextlib.contextmanager
def losswire_server(device: str) -> Iterator[str]:
    """``losswire serve`` on an ephemeral loopback port; yields its ``host:port``."""
    argv = serve_cmd("--host=127.0.0.1", "--port=0", f"--device={device}", *overlap_flags())
    proc = subprocess.Popen(argv, env=server_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if match := LISTENING.search(line):
                break
        else:
            raise SystemExit(f"losswire serve exited (rc {proc.wait()}) before listening")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # a full pipe would block it
        target = f"127.0.0.1:{match['port']}"
        SERVER_PIDS[target] = proc.pid
        yield target
    finally:
        proc.terminate()
        proc.wait(30)


class Run:
    """What the sections share: the clients under test, baseline processes, memoised losswire timings."""

    def __init__(self, args: argparse.Namespace, target: str, stack: contextlib.ExitStack) -> None:
        self.args, self.target, self.stack = args, target, stack
        self.server_pid = SERVER_PIDS.get(target)  # None: a server the user runs (--target)
        self.client = make_client(target, args.transport)
        self._clients = {args.transport: self.client}
        self.sizes = [mib * MiB for mib in SIZES_MIB if mib <= args.max_mib]
        self._peers: dict[str, Peer] = {}
        self._losswire: dict[tuple[str, int, str], tuple[list[float], list[float]]] = {}

    def peer(self, serve: Callable[..., None], *args: Any) -> Peer:
        """A baseline server, started once per run."""
        if serve.__name__ not in self._peers:
            self._peers[serve.__name__] = peer = Peer(serve, *args)
            self.stack.callback(peer.stop)
        return self._peers[serve.__name__]

    def repeats(self, pred_bytes: int) -> int:
        return self.args.repeats if pred_bytes < MiB else self.args.big_repeats

    def client_for(self, transport: str | None) -> LossClient:
        transport = transport or self.args.transport
        if transport not in self._clients:
            self._clients[transport] = make_client(self.target, transport)
        return self._clients[transport]

    def losswire(self, loss: str, pred_bytes: int, transport: str | None = None) -> list[float]:
        """Round-trip seconds of ``loss`` through RemoteLoss (measured once per run, shared by sections)."""
        return self.losswire_and_compute(loss, pred_bytes, transport)[0]

    def losswire_and_compute(
        self, loss: str, pred_bytes: int, transport: str | None = None
    ) -> tuple[list[float], list[float]]:
        """(round-trip seconds, the server's compute seconds of each of those calls)."""
        transport = transport or self.args.transport
        key = (loss, pred_bytes, transport)
        if key not in self._losswire:
            pred, target = small_workload() if pred_bytes == 0 else workload(loss, pred_bytes)
            compute: list[float] = []
            module = RemoteLoss(CONFIGS[loss], client=self.client_for(transport))
            rounds = timed(remote_step(module, pred, target, compute), self.repeats(pred.nbytes))
            self._losswire[key] = (rounds, compute[-len(rounds) :])  # the warm-up call's compute dropped
        return self._losswire[key]


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def median(samples: list[float]) -> float:
    return summary(samples)["median_ms"] / 1e3


def size_label(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


def wire_sizes(run: Run, pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """Bytes of the Evaluate request and response for FocalLoss(pred, target) with pred's gradient."""
    request = pb.EvaluateRequest()
    term = request.terms.add()
    codec.encode_config(FOCAL, term.config)
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(target, term.target)
    term.gradients.append("pred")
    return request.ByteSize(), run.client.evaluate(request).ByteSize()
