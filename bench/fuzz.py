"""By-hand fuzz run: thousands of fuzzed requests through every front door of a real server, and a table.

    .venv/bin/python bench/fuzz.py                      # 10 000 requests to a server it starts
    .venv/bin/python bench/fuzz.py -n 50000 --raw-share 0.5 --doors unary,stream
    .venv/bin/python bench/fuzz.py --target host:50051  # a running server (no RSS check)

The generators of ``tests/support/fuzzing.py`` run mixed, randomly seeded, through each door in turn:
``unary`` (well-formed Evaluate requests with bad contents, and raw bytes that may not parse),
``stream`` (the same requests by EvaluateStream, with faults in the stream), ``shm`` (their tensors in a
registered shared-memory segment, a reference now and then off), ``oip`` (fuzzed ModelInfer calls). Every
answer must be OK (equal to the engine's answer where it can be recomputed) or a clear status that is
neither INTERNAL nor UNKNOWN. Every
``--check-every`` requests, and at the end, a known-good request must still be answered correctly,
and the server's resident memory is sampled: it must level off, not grow with the request count.
The server it starts has small limits (``SERVE_FLAGS``) so that the fuzz reaches each of them.
Exit status 1 when any answer broke the property.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import grpc  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from support.fuzzing import (  # noqa: E402
    EVALUATE,
    SharedSegment,
    assert_serves_correctly,
    call,
    call_infer,
    call_shared,
    call_stream,
    evaluate_requests,
    infer_requests,
    raw_requests,
    stream_faults,
)
from support.servers import LISTENING, serve_cmd, server_env  # noqa: E402

from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc  # noqa: E402
from losswire.v1 import loss_service_pb2_grpc as pb_grpc  # noqa: E402
from losswire.wire import chunks  # noqa: E402
from losswire.wire.protocol import EVALUATE_STREAM_METHOD  # noqa: E402

DOORS = ("unary", "stream", "shm", "oip")

SERVE_FLAGS = [
    "--host=127.0.0.1",
    "--port=0",
    "--device=cpu",
    "--max-workers=2",
    "--max-message-bytes=4194304",
    "--max-elements=100000",
    "--max-request-elements=200000",
    "--max-terms=4",
    "--max-dims=6",
    "--max-sessions=4",
    "--overlap-transfer=on",  # fuzzed streams that ask for early gradients take the overlapped path
    "--lane-join-timeout=0.3",  # a fuzzed call's missing lane, or a stranger lane, is given up soon
]
MiB = 1 << 20


class Server:
    """``losswire serve`` in a subprocess; its port from the start-up line, its RSS from /proc."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            serve_cmd(*SERVE_FLAGS), env=server_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            match = LISTENING.search(line)
            if match:
                self.target = f"127.0.0.1:{match['port']}"
                break
        else:
            raise SystemExit(f"the server exited (rc {self.proc.wait()}) before listening")
        # keep reading: a full stderr pipe would block the server
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def fuzz(kind: str, strategy: st.SearchStrategy, count: int, send, tally: collections.Counter, failures: list[str]):
    """``count`` requests drawn from ``strategy`` (a fresh random seed each time), each sent and checked by
    ``send(drawn) -> status code``."""
    if count <= 0:
        return

    quiet = list(HealthCheck)

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate], suppress_health_check=quiet)
    @given(sent=strategy)
    def one(sent) -> None:
        try:
            tally[kind, send(sent).name] += 1
        except AssertionError as error:  # counted and shown, so that one failure does not end the run
            tally[kind, "PROPERTY BROKEN"] += 1
            failures.append(f"{kind}: {str(error).splitlines()[0]}")

    one()


class Doors:
    """The server's front doors, as fuzzed requests reach them."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.evaluate = channel.unary_unary(EVALUATE)
        self.stub = pb_grpc.LossServiceStub(channel)
        self.stream = channel.stream_stream(
            EVALUATE_STREAM_METHOD, request_serializer=chunks.serialize_chunk, response_deserializer=chunks.parse_chunk
        )
        self.infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        self.segment: SharedSegment | None = None

    def round(self, door: str, size: int, raw_share: float, tally: collections.Counter, failures: list[str]) -> None:
        if door == "unary":
            raw = round(size * raw_share)
            fuzz("unary raw bytes", raw_requests(), raw, lambda sent: call(self.evaluate, sent), tally, failures)
            fuzz("unary", evaluate_requests(), size - raw, lambda sent: call(self.evaluate, sent), tally, failures)
        elif door == "stream":
            drawn = st.tuples(evaluate_requests(), stream_faults())
            fuzz("stream", drawn, size, lambda sent: call_stream(self.stream, *sent), tally, failures)
        elif door == "shm":
            self.segment = self.segment or SharedSegment(self.stub)
            drawn = st.tuples(evaluate_requests(), st.sampled_from([0, 0, 0, 1, 4, 1 << 30]))
            fuzz("shm", drawn, size, lambda sent: call_shared(self.stub.Evaluate, self.segment, *sent), tally, failures)
        else:
            fuzz("oip", infer_requests(), size, lambda sent: call_infer(self.infer, sent), tally, failures)

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()


def run(count: int, raw_share: float, doors: Doors, which: list[str], server: Server | None, check_every: int) -> dict:
    """Rounds of ``check_every`` requests spread over the doors, each round followed by a good request and
    an RSS sample."""
    tally: collections.Counter = collections.Counter()
    failures: list[str] = []
    rss: list[tuple[int, int]] = []
    started = time.perf_counter()
    rounds = range(0, count, check_every)
    for first in rounds:
        size = min(check_every, count - first)
        for index, door in enumerate(which):
            doors.round(door, size // len(which) + (index < size % len(which)), raw_share, tally, failures)
        assert_serves_correctly(doors.evaluate)  # raises: a wrong or missing answer to a good request ends the run
        if server is not None:
            rss.append((sum(tally.values()), server.rss()))
    seconds = time.perf_counter() - started
    return {"tally": tally, "failures": failures, "rss": rss, "seconds": seconds, "rounds": len(rounds)}


def report(result: dict) -> bool:
    tally, rss = result["tally"], result["rss"]
    kinds = sorted({k for k, _ in tally})
    codes = sorted({c for _, c in tally}, key=lambda c: (c != "OK", c))
    print(f"| answer | {' | '.join(kinds)} | total |")
    print(f"|---|{'---:|' * (len(kinds) + 1)}")
    for code in codes:
        row = [tally[k, code] for k in kinds]
        print(f"| {code} | {' | '.join(map(str, row))} | {sum(row)} |")
    total = sum(tally.values())
    print(f"| **total** | {' | '.join(str(sum(tally[k, c] for c in codes)) for k in kinds)} | **{total}** |")
    print(f"\n{total} requests in {result['seconds']:.1f} s ({total / result['seconds']:.0f}/s)")
    broken = [c for c in codes if c in ("INTERNAL", "UNKNOWN", "PROPERTY BROKEN")]
    print(f"INTERNAL/UNKNOWN/property broken: {sum(tally[k, c] for k in kinds for c in broken)}")
    for line in result["failures"][:20]:
        print("  ", line)
    print(f"a good request was answered correctly after each of the {result['rounds']} rounds")
    bounded = True
    if rss:
        first, last = rss[min(1, len(rss) - 1)][1], rss[-1][1]
        peak = max(r for _, r in rss)
        # levelled off: the end is within 25% (+64 MiB of allocator slack) of an early sample
        bounded = last <= first * 1.25 + 64 * MiB
        print(
            f"server RSS: {first / MiB:.0f} MiB after {rss[min(1, len(rss) - 1)][0]} requests, "
            f"{last / MiB:.0f} MiB at the end, peak {peak / MiB:.0f} MiB: {'bounded' if bounded else 'GROWING'}"
        )
        print("RSS samples (requests: MiB):", ", ".join(f"{n}: {r / MiB:.0f}" for n, r in rss))
    return not broken and bounded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--count", type=int, default=10_000, help="fuzzed requests to send")
    parser.add_argument("--raw-share", type=float, default=0.3, help="share of raw-bytes requests")
    parser.add_argument("--target", help="a running server (default: start one with small limits)")
    parser.add_argument("--check-every", type=int, default=1000, help="requests between health checks")
    parser.add_argument("--doors", default=",".join(DOORS), help="comma-separated subset of " + ", ".join(DOORS))
    args = parser.parse_args()
    server = None if args.target else Server()
    target = args.target or server.target
    which = [door for door in args.doors.split(",") if door]
    unknown = set(which) - set(DOORS)
    if unknown:
        parser.error(f"unknown doors {sorted(unknown)}; choose from {', '.join(DOORS)}")
    doors_named, raw = ", ".join(which), f"{args.raw_share:.0%}"
    print(f"fuzzing {target} with {args.count} requests through {doors_named} ({raw} of unary as raw bytes)")
    try:
        with grpc.insecure_channel(target) as channel:
            doors = Doors(channel)
            try:
                result = run(args.count, args.raw_share, doors, which, server, args.check_every)
            finally:
                doors.close()
    finally:
        if server is not None:
            server.stop()
    raise SystemExit(0 if report(result) else 1)


if __name__ == "__main__":
    main()
