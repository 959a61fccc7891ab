"""``losswire serve``: the server's command line.

Every knob of the server is one ``Knob`` below, and each can be set three ways. The first that is
given wins: the command-line flag (``--session-ttl 600``), the environment variable
(``LOSSWIRE_SESSION_TTL=600``), the key in the optional TOML config file named by ``--config`` or
``LOSSWIRE_CONFIG`` (``session_ttl = 600``), then the built-in default. ``losswire serve --help``
and the table in docs/server.md (``knobs_markdown``) list them all, generated from the same table.

Importing this module stays cheap (no torch, no gRPC, no server assembly): ``losswire --help`` and
``losswire health`` start in a fraction of a second; ``serve`` and ``losses`` import torch when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from losswire.wire.protocol import MAX_DIMS, MAX_MESSAGE_BYTES

from . import __version__
from .auth import TOKENS_ENV, TokenConfigError, parse_token_list
from .config import ServerConfig

ENV_PREFIX = "LOSSWIRE_"
NONE_WORDS = ("", "none", "None", "off")


class KnobError(ValueError):
    """A knob's value (from a flag, the environment or the config file) is not what it must be."""


# -- value parsers: each takes the text a flag or variable carries, returns the typed value ---------


def _int_at_least(floor: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < floor:
            raise ValueError(f"must be at least {floor}")
        return value

    parse.__name__ = f"integer >= {floor}"
    return parse


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"must be in {low}..{high}")
        return value

    parse.__name__ = f"integer {low}..{high}"
    return parse


def _optional_limit(text: str) -> int | None:
    """A limit where 0 or none means unbounded."""
    value = None if text in NONE_WORDS else int(text)
    if value is not None and value < 0:
        raise ValueError("must be >= 0 (0 or none: unbounded)")
    return value or None


_optional_limit.__name__ = "integer (0 or none: unbounded)"


def _optional_seconds(text: str) -> float | None:
    """A duration where 0 or none means never."""
    return None if text in NONE_WORDS else (_seconds(text) or None)


_optional_seconds.__name__ = "seconds (0 or none: never)"


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be in 0..65535")
    return value


_port.__name__ = "port 0..65535"


def _optional_port(text: str) -> int | None:
    return None if text in NONE_WORDS else _port(text)


_optional_port.__name__ = "port 0..65535 or none"


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise ValueError("must be >= 0 seconds")
    return value


_seconds.__name__ = "seconds >= 0"


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text.lower()

    parse.__name__ = " | ".join(choices)
    return parse


def _modules(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


_modules.__name__ = "module names, comma-separated"


def _optional_path(text: str) -> str | None:
    return None if text in NONE_WORDS else text


_optional_path.__name__ = "a file path or none"


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError("must be on or off")
    return text == "on"


_on_off.__name__ = "on or off"


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device(text: str) -> str:
    value = text.strip().lower()
    if DEVICE_PATTERN.fullmatch(value):
        return value
    if value.startswith("cuda:"):
        raise ValueError("N in cuda:N is a GPU's index, 0 for the first")
    if value in ("gpu", "nvidia"):
        raise ValueError("a GPU is cuda, or cuda:N for the GPU of index N")
    raise ValueError("losswire computes on the CPU or on a CUDA GPU")


_device.__name__ = "auto, cpu, cuda or cuda:N"


@dataclasses.dataclass(frozen=True)
class Knob:
    """One setting of the server: its flag, environment variable and config-file key derive from ``name``."""

    name: str  # config-file key; flag --name-with-dashes; env LOSSWIRE_NAME_UPPER
    parse: Callable[[str], Any]
    default: Any
    help: str
    field: str | None = None  # ServerConfig field (default: name); "" for knobs the CLI itself uses
    shown: str | None = None  # how --help shows the default when it has no flag form (else _show(default))

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def shown_default(self) -> str:
        """The default as the flag would be written (``on``, ``none``, ``30.0``)."""
        return self.shown if self.shown is not None else _show(self.default)

    def from_text(self, text: str, where: str) -> Any:
        try:
            return self.parse(text)
        except ValueError as error:
            expected = getattr(self.parse, "__name__", "a valid value")
            raise KnobError(f"{where}: expected {expected}, got {text!r} ({error})") from None


_DEFAULT = ServerConfig()

KNOBS: tuple[Knob, ...] = (
    Knob("host", str, _DEFAULT.host, "address to bind (0.0.0.0: every interface; :: for IPv6 too)"),
    Knob("port", _port, _DEFAULT.port, "gRPC port; 0 picks a free one (the start-up log line names it)"),
    Knob(
        "reuse_port",
        _on_off,
        _DEFAULT.reuse_port,
        "on: several servers may bind this port (SO_REUSEPORT: the kernel splits connections, and so sessions, "
        "between them); off: a server on a port in use fails to start",
    ),
    Knob(
        "device", _device, _DEFAULT.device, "where losses run: auto (cuda when available, else cpu), cpu, cuda, cuda:1"
    ),
    Knob(
        "max_workers",
        _int_at_least(1),
        _DEFAULT.max_workers,
        "threads computing losses at once (a call waiting for one, or for a session another call holds, holds "
        "no thread; a free thread goes to the caller running fewest calls, and with tokens on one token runs "
        "at most all but a quarter of them; on a CPU device quick calls, small and stateless, are answered on "
        "the event loop without one)",
    ),
    Knob(
        "max_concurrent_rpcs",
        _optional_limit,
        _DEFAULT.max_concurrent_rpcs,
        "calls accepted at once (computing, or waiting for a worker or for their caller's bytes); beyond, "
        "RESOURCE_EXHAUSTED at once, which losswire's client retries with backoff (0 or none: unbounded)",
    ),
    Knob(
        "max_concurrent_rpcs_per_token",
        _int_at_least(1),
        _DEFAULT.max_concurrent_rpcs_per_token,
        "calls one token may have at once (tokens on), so that one token's flood of calls leaves other tokens "
        "room; beyond, RESOURCE_EXHAUSTED that the client waits out",
        shown="all but a quarter of --max-concurrent-rpcs",
    ),
    Knob(
        "max_health_watches",
        _int_at_least(0),
        _DEFAULT.max_health_watches,
        "health Watch streams open at once (a client that balances over replicas keeps one per connection), "
        "besides --max-concurrent-rpcs: they take no call's place; at most 4 on one connection; beyond, "
        "RESOURCE_EXHAUSTED",
    ),
    Knob(
        "max_connections",
        _optional_limit,
        _DEFAULT.max_connections,
        "connections open at once; beyond, a new connection is closed at once (its caller retries). Never "
        "more than the open-files limit less a quarter (at least 512) kept for the server's own descriptors "
        "(0 or none: that limit only)",
    ),
    Knob(
        "max_open_streams",
        _int_at_least(1),
        _DEFAULT.max_open_streams,
        "calls that stream their requests (EvaluateStream, reflection) open at once, below "
        "--max-concurrent-rpcs; with tokens on, one token at most all but a quarter of them; beyond, "
        "RESOURCE_EXHAUSTED that the client waits out",
    ),
    Knob(
        "stream_idle_timeout",
        _optional_seconds,
        _DEFAULT.stream_idle_seconds,
        "seconds a request stream may stay silent, or leave an answer message unread, before it is ended "
        "(DEADLINE_EXCEEDED; 0 or none: never); a unary answer left untaken this long, plus a second per "
        "--stream-min-rate bytes of it, has its caller's connection closed, and so does a streamed answer's "
        "message still untaken as long again after its call was ended",
        "stream_idle_seconds",
    ),
    Knob(
        "stream_min_rate",
        _optional_limit,
        _DEFAULT.stream_min_rate,
        "bytes per second each stream of a streamed call (each lane too) must average, sending its request and "
        "reading its answer, once it has kept the call waiting --stream-idle-timeout (one more second per that many "
        "bytes moved); slower, "
        "the call ends (DEADLINE_EXCEEDED), so that a caller trickling bytes cannot hold a big-call slot and its "
        "memory (0 or none: no pace)",
    ),
    Knob(
        "lane_join_timeout",
        _seconds,
        _DEFAULT.lane_join_seconds,
        "seconds the lanes of a streamed call (EvaluateRequest.lanes: its chunks on several streams) may wait for "
        "its request, and the call for its lanes; beyond, NOT_FOUND for the lane, DEADLINE_EXCEEDED for the call",
        "lane_join_seconds",
    ),
    Knob(
        "max_message_bytes",
        _int_at_least(1024),
        MAX_MESSAGE_BYTES,
        "largest request in bytes however its tensors travel (inline, streamed in chunks, shared memory), and "
        "largest response message",
    ),
    Knob(
        "max_request_message_bytes",
        _int_at_least(1024),
        _DEFAULT.max_request_message_bytes,
        "largest message a caller may send in one piece: a unary request (Evaluate, ModelInfer, ...) or one "
        "message of a stream (bigger requests stream, EvaluateStream); gRPC refuses a bigger one unread "
        "(RESOURCE_EXHAUSTED). Unary requests are read only with room for this many bytes among an eighth of "
        "--memory-budget",
    ),
    Knob("max_elements", _optional_limit, None, "largest tensor in elements, refused before allocation (0: unbounded)"),
    Knob(
        "max_request_elements",
        _optional_limit,
        None,
        "elements summed over every tensor of a request, refused before allocation with RESOURCE_EXHAUSTED "
        "(0: unbounded, --max-message-bytes bounds it)",
    ),
    Knob(
        "max_terms",
        _optional_limit,
        _DEFAULT.max_terms,
        "loss terms per request; beyond, RESOURCE_EXHAUSTED (0: unbounded)",
    ),
    Knob(
        "max_dims",
        _int_between(1, MAX_DIMS),
        _DEFAULT.max_dims,
        "largest tensor rank; beyond, INVALID_ARGUMENT naming the tensor",
    ),
    Knob(
        "max_stream_calls",
        _int_at_least(1),
        _DEFAULT.max_stream_calls,
        "big calls (EvaluateStream, or tensors in shared memory) served at once, at most --max-workers - 1 so "
        "small calls keep a worker; beyond, RESOURCE_EXHAUSTED that the client waits out",
    ),
    Knob(
        "max_stream_calls_per_token",
        _int_at_least(1),
        _DEFAULT.max_stream_calls_per_token,
        "big calls one token may have at once (tokens on), so that one token cannot take every slot; beyond, "
        "RESOURCE_EXHAUSTED that the client waits out",
        shown="all but one of --max-stream-calls (at least 1)",
    ),
    Knob(
        "fused_kernels",
        _on_off,
        _DEFAULT.fused_kernels,
        "on: Focal, QFL, CE, SmoothL1, L1 and GIoU terms get loss and gradient in one analytic pass; off: autograd",
    ),
    Knob(
        "gpu_kernels",
        _on_off,
        _DEFAULT.gpu_kernels,
        "on a GPU, with --fused-kernels on: Focal and QFL terms by hand-written Triton kernels (float32), GIoU "
        "terms (and float64 Focal and QFL) by their closed forms compiled into one pass (torch.compile; the "
        "first call of each loss and input layout compiles, up to ~11 s); off: the fused kernels' torch ops",
    ),
    Knob(
        "overlap_transfer",
        _on_off,
        _DEFAULT.overlap_transfer,
        "on: a streamed FocalLoss or QualityFocalLoss call whose caller asks (the Python client does) is "
        "computed block of rows by block as its chunks arrive, its gradient rows sent back as they are done; "
        "off: computed once every chunk is in",
    ),
    Knob(
        "shared_memory",
        _on_off,
        _DEFAULT.shared_memory,
        "on: callers on this host running as the server's user may hand over sealed shared memory (over a Unix "
        "socket in the server's network namespace) and pass tensors by reference; off: FAILED_PRECONDITION",
    ),
    Knob(
        "max_shared_memory",
        _optional_limit,
        _DEFAULT.max_shared_memory,
        "bytes of shared memory mapped for all callers together (with tokens on, one token's regions at most all but "
        "a quarter of them); beyond, RESOURCE_EXHAUSTED (0: unbounded)",
    ),
    Knob(
        "max_shared_memory_total_regions",
        _optional_limit,
        _DEFAULT.max_shared_memory_total_regions,
        "shared-memory segments mapped for all callers together (registered or handed over; with tokens on, one "
        "token's regions at most all but a quarter of them); beyond, RESOURCE_EXHAUSTED (0: unbounded)",
    ),
    Knob(
        "max_shared_memory_regions",
        _optional_limit,
        _DEFAULT.max_shared_memory_regions,
        "shared-memory regions one caller (a token on one connection) may hold registered; beyond, "
        "RESOURCE_EXHAUSTED (0: unbounded)",
    ),
    Knob(
        "max_shared_memory_per_caller",
        _optional_limit,
        _DEFAULT.max_shared_memory_per_caller,
        "bytes of shared memory one caller may hold registered; beyond, RESOURCE_EXHAUSTED (0: unbounded)",
    ),
    Knob(
        "max_shared_memory_connections",
        _int_at_least(1),
        _DEFAULT.max_shared_memory_connections,
        "caller processes connected to the shared-memory socket at once (one each, for its life); beyond, "
        "RESOURCE_EXHAUSTED and the caller sends tensors over gRPC",
    ),
    Knob(
        "memory_budget",
        _optional_limit,
        _DEFAULT.memory_budget,
        "bytes the calls in flight may hold at once (streamed tensors' buffers, terms' working memory as their "
        "losses estimate it), reserved before they are allocated; beyond, RESOURCE_EXHAUSTED (0 or none: unbounded)",
        shown="half the memory the server may use: the host's, or its container's limit where lower",
    ),
    Knob(
        "max_term_memory",
        _optional_limit,
        _DEFAULT.max_term_memory,
        "the most working memory one term may take (0 or none: the whole --memory-budget)",
    ),
    Knob(
        "max_module_bytes",
        _optional_limit,
        _DEFAULT.max_module_bytes,
        "what building one loss module may allocate, by its loss's estimate (GHM's bins, per-class buffers); "
        "beyond, RESOURCE_EXHAUSTED naming the parameter (0 or none: unbounded)",
    ),
    Knob(
        "term_memory_ratio",
        _optional_limit,
        _DEFAULT.term_memory_ratio,
        "a term's estimated working memory may be at most this many times its inputs' bytes, plus 256 MiB "
        "(C x C or B x B tables of a tiny request are refused); beyond, RESOURCE_EXHAUSTED (0 or none: unbounded)",
    ),
    Knob(
        "buffer_pool",
        _int_at_least(0),
        _DEFAULT.buffer_pool_bytes,
        "bytes of idle buffers kept to receive and answer the next big streamed call into memory already "
        "written once (0: fresh memory every call)",
        "buffer_pool_bytes",
        shown="1073741824, or an eighth of the memory the server may use where that is less",
    ),
    Knob(
        "pinned_staging_bytes",
        _int_at_least(0),
        _DEFAULT.pinned_staging_bytes,
        "bytes of pinned (page-locked) host memory kept to copy tensors of 1 MiB or more to and from a CUDA "
        "device at the bus's full speed; what does not fit takes the plain, pageable copy. Unused on a CPU "
        "device; 0: off",
        shown="536870912, or a sixteenth of the memory the server may use where that is less",
    ),
    Knob(
        "torch_threads",
        _optional_limit,
        None,
        "torch intra-op threads (0 or none: torch's default, a thread per core, or the CPU quota of the server's "
        "control group (a container's CPU limit) rounded up where that is fewer)",
    ),
    Knob(
        "grace",
        _seconds,
        _DEFAULT.grace_seconds,
        "seconds in-flight calls may finish after SIGTERM/SIGINT",
        "grace_seconds",
    ),
    Knob(
        "shutdown_notice",
        _seconds,
        _DEFAULT.shutdown_notice_seconds,
        "seconds health reports NOT_SERVING while calls are still served, before the drain "
        "(set it to the readiness probe's period)",
        "shutdown_notice_seconds",
    ),
    Knob(
        "session_ttl",
        _seconds,
        _DEFAULT.session_ttl_seconds,
        "seconds an idle session (server-held loss state) lives on",
        "session_ttl_seconds",
    ),
    Knob("max_sessions", _int_at_least(1), _DEFAULT.max_sessions, "live sessions at once; beyond, RESOURCE_EXHAUSTED"),
    Knob(
        "max_session_bytes",
        _optional_limit,
        _DEFAULT.max_session_bytes,
        "bytes the live sessions hold together (each its loss module's state and replay snapshots, and three "
        "times its config as JSON); beyond, RESOURCE_EXHAUSTED (0 or none: unbounded)",
    ),
    Knob(
        "max_sessions_per_token",
        _optional_limit,
        _DEFAULT.max_sessions_per_token,
        "live sessions one token may have (tokens on, sessions not shared); beyond, RESOURCE_EXHAUSTED "
        "(0 or none: only --max-sessions)",
    ),
    Knob(
        "max_session_bytes_per_token",
        _optional_limit,
        _DEFAULT.max_session_bytes_per_token,
        "bytes one token's sessions may hold, counted as for --max-session-bytes (tokens on, sessions not "
        "shared); beyond, RESOURCE_EXHAUSTED (0 or none: only --max-session-bytes)",
    ),
    Knob(
        "share_sessions",
        _on_off,
        _DEFAULT.share_sessions,
        "with bearer tokens: on, every token may use every session; off, a token uses only the sessions it made",
    ),
    Knob(
        "session_replay_depth",
        _int_at_least(1),
        _DEFAULT.session_replay_depth,
        "recent forwards per session whose prior state is kept for exact recomputes and retries",
    ),
    Knob(
        "plugins",
        _modules,
        (),
        "modules imported at start-up to register extra losses (flag repeatable as --plugin; env comma-separated; "
        "file: a list)",
        shown="none",
    ),
    Knob(
        "metrics_port",
        _optional_port,
        None,
        "serve Prometheus metrics on http://METRICS_HOST:PORT/metrics (0 picks a free port; none: off)",
    ),
    Knob("metrics_host", str, None, "address the metrics endpoint binds", shown="the --host address"),
    Knob("tls_cert", _optional_path, None, "the server's TLS certificate chain (PEM); with --tls-key, turns on TLS"),
    Knob("tls_key", _optional_path, None, "the private key of --tls-cert (PEM, unencrypted)"),
    Knob(
        "tls_client_ca",
        _optional_path,
        None,
        "CA certificate(s) (PEM) that sign client certificates: mutual TLS, a client without one is refused",
    ),
    Knob(
        "auth_tokens_file",
        _optional_path,
        None,
        f"bearer tokens every call but health must carry, one per line (# comments), re-read when the file "
        f"changes; tokens can also come in {TOKENS_ENV} (comma- or space-separated; env only, never a flag)",
    ),
    Knob(
        "health_port",
        _optional_port,
        None,
        "also serve grpc.health.v1 alone on this plaintext port, for probes (Kubernetes): it admits a few calls on "
        "each connection and room for them on each of up to 1024, so a flood on the callers' port cannot keep a "
        "probe waiting, and it needs no TLS (none: off)",
    ),
    Knob(
        "health_bound",
        _optional_seconds,
        _DEFAULT.health_bound_seconds,
        "health says NOT_SERVING (on every port) while a small call would wait longer than this many seconds "
        "for a compute thread (0 or none: health follows only start and stop)",
        "health_bound_seconds",
    ),
    Knob("log_level", _choice("debug", "info", "warning", "error"), "info", "debug adds one line per request", ""),
    Knob("log_format", _choice("text", "json"), "text", "json: one JSON object per line, for log collectors", ""),
)
KNOBS_BY_NAME = {knob.name: knob for knob in KNOBS}
# `losswire health` finds the server that `serve` started with the same settings: these are the ones it reads
HEALTH_KNOBS = tuple(KNOBS_BY_NAME[name] for name in ("host", "port", "health_port", "tls_cert"))
HEALTH_HELP = {
    "host": "the address the server binds (a wildcard, 0.0.0.0 or ::, is asked on loopback)",
    "port": "the server's gRPC port",
    "health_port": "the server's plaintext health-only port: asked instead of --port when set",
    "tls_cert": "the server's TLS certificate: set, the server speaks TLS, which this command cannot "
    "(it then needs --health-port)",
}


def knobs_markdown() -> str:
    """The settings table of docs/server.md: every knob's flag, variable, file key, default and meaning."""
    rows = [
        "| flag | environment variable | TOML key | default | what it sets |",
        "|---|---|---|---|---|",
        f"| `--config FILE` | `{ENV_PREFIX}CONFIG` | | none | a TOML file of the settings below |",
    ]
    for knob in KNOBS:
        flag = "`--plugin MODULE`" if knob.name == "plugins" else f"`{knob.flag}`"
        text = knob.help.replace("|", "\\|")
        rows.append(f"| {flag} | `{knob.env}` | `{knob.name}` | `{knob.shown_default}` | {text} |")
    return "\n".join(rows)


# -- the command line -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose unknown options are reported by the subcommand they were given to, with the
    subcommand's usage and its options closest to what was typed (argparse's own message names the top level)."""

    commands: dict[str, argparse.ArgumentParser]

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(self, "commands", {}).get(getattr(parsed, "command", None) or "")
            where = command or self
            where.error(f"unrecognized arguments: {' '.join(extras)}{_close_matches(extras, where)}")
        return parsed


def _close_matches(extras: Iterable[str], parser: argparse.ArgumentParser) -> str:
    known = sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})
    hints = []
    for text in extras:
        if text.startswith("--"):
            name = text.split("=", 1)[0]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            if close:
                hints.append(f"{name}: did you mean {' or '.join(close)}?")
    return ("; " + "; ".join(hints)) if hints else ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="losswire",
        description="losswire: a gRPC service that evaluates MMDetection-style losses and their gradients. "
        "Without a command (or with flags first) it serves.",
    )
    parser.add_argument("--version", action="version", version=f"losswire {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{serve,health,losses}")
    serve = commands.add_parser(
        "serve",
        help="run the server in the foreground until SIGTERM or SIGINT (the default command)",
        usage="losswire serve [-h] [--config FILE] [--SETTING VALUE ...]",
        description="Run the loss server in the foreground. Every setting is a flag, an environment variable, or a "
        "key of the TOML file given by --config; the first of those that is set wins, then the default.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Example config file (TOML):\n  port = 50051\n  metrics_port = 9464\n  plugins = ["poly_loss"]\n'
        '  log_format = "json"',
    )
    add_serve_flags(serve)
    health = commands.add_parser(
        "health",
        help="ask a running server's gRPC health service; exit 0 when SERVING (a container HEALTHCHECK)",
        description="Ask the gRPC health service of the server that `losswire serve` with the same settings "
        "(flags, LOSSWIRE_* variables, config file) started on this host; exit 0 when SERVING, 1 otherwise, "
        "2 when the settings do not say where to ask.",
    )
    health.add_argument("--service", default="losswire.v1.LossService", help="health service name ('' = server)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer [default 5.0]")
    add_serve_flags(health, HEALTH_KNOBS)
    listing = commands.add_parser(
        "losses",
        help="list the registered losses (with --plugin modules)",
        description="List the losses this server would serve: the built-in ones and those --plugin modules register.",
    )
    listing.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="import this module first")
    listing.add_argument("--json", action="store_true", help="print the full descriptions as JSON")
    listing.add_argument("--markdown", action="store_true", help="print the loss catalogue's table (docs/losses.md)")
    parser.commands = {"serve": serve, "health": health, "losses": listing}
    return parser


def add_serve_flags(parser: argparse.ArgumentParser, knobs: Iterable[Knob] = KNOBS) -> None:
    parser.add_argument(
        "--config", metavar="FILE", default=None, help=f"a TOML file of the settings below [env {ENV_PREFIX}CONFIG]"
    )
    for knob in knobs:
        where = f"[env {knob.env}; file key {knob.name}; default {knob.shown_default}]"
        text = HEALTH_HELP.get(knob.name, knob.help) if knobs is HEALTH_KNOBS else knob.help
        if knob.name == "plugins":
            parser.add_argument("--plugin", dest="plugins", action="append", metavar="MODULE", help=f"{text} {where}")
        else:
            parser.add_argument(knob.flag, dest=knob.name, metavar=knob.name.upper(), help=f"{text} {where}")


def _show(value: Any) -> str:
    """A value as a flag carries it: booleans as on/off, None as none, a tuple comma-separated."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return str(value)


# -- resolving the settings: flag, then environment, then file, then default -----------------------


def read_config_file(path: str) -> dict[str, Any]:
    """The TOML file's settings, every key checked against the knobs."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise KnobError(f"--config {path}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise KnobError(f"--config {path}: not valid TOML ({error})") from None
    unknown = sorted(set(data) - set(KNOBS_BY_NAME))
    if unknown:
        raise KnobError(f"--config {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(KNOBS_BY_NAME)}")
    return data


def _from_file(knob: Knob, value: Any, path: str) -> Any:
    where = f"--config {path}: key {knob.name}"
    if knob.name == "plugins":
        if not (isinstance(value, list) and all(isinstance(m, str) for m in value)):
            raise KnobError(f"{where}: expected a list of module names, got {value!r}")
        return tuple(value)
    if isinstance(value, (bool, list, dict)):
        raise KnobError(f"{where}: expected {getattr(knob.parse, '__name__', 'a value')}, got {value!r}")
    return knob.from_text(str(value), where)


def resolve_settings(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ, knobs: Iterable[Knob] = KNOBS
) -> dict[str, Any]:
    """Every knob's value: the flag, else the environment, else the config file, else the default."""
    return resolve_with_sources(args, environ, knobs)[0]


def resolve_with_sources(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ, knobs: Iterable[Knob] = KNOBS
) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings, and where each came from as a message names it: ``--device``, ``LOSSWIRE_DEVICE``,
    ``--config FILE: key device`` or ``default``."""
    config_path = getattr(args, "config", None) or environ.get(f"{ENV_PREFIX}CONFIG") or None
    file_values = read_config_file(config_path) if config_path else {}
    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for knob in knobs:
        flag_value = getattr(args, knob.name, None)
        if flag_value is not None:
            sources[knob.name] = "--plugin" if knob.name == "plugins" else knob.flag
            if knob.name == "plugins":  # repeated --plugin, each possibly comma-separated
                settings[knob.name] = tuple(m for text in flag_value for m in _modules(text))
            else:
                settings[knob.name] = knob.from_text(flag_value, knob.flag)
        elif knob.env in environ:
            sources[knob.name] = knob.env
            settings[knob.name] = knob.from_text(environ[knob.env], knob.env)
        elif knob.name in file_values:
            sources[knob.name] = f"--config {config_path}: key {knob.name}"
            settings[knob.name] = _from_file(knob, file_values[knob.name], config_path)
        else:
            sources[knob.name] = "default"
            settings[knob.name] = knob.default
    settings["auth_tokens"] = _tokens_from_env(environ)
    return settings, sources


def check_device(device: str, where: str) -> None:
    """A CUDA device must exist here: otherwise a KnobError naming the setting it came from (``where``)."""
    if not device.startswith("cuda"):
        return
    import torch  # serve imports it anyway; only a CUDA setting pays for it here

    if where.startswith("--config"):
        named = f'{where} = "{device}"'  # --config FILE: key device = "cuda"
    elif where.startswith(ENV_PREFIX):
        named = f"{where}={device}"  # LOSSWIRE_DEVICE=cuda
    else:
        named = f"--device {device}"
    if not torch.cuda.is_available():
        build = f" (torch {torch.__version__} is built without CUDA)" if not torch.version.cuda else ""
        raise KnobError(f"{named}: CUDA is not available on this machine{build}; use cpu or auto")
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise KnobError(f"{named}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def _tokens_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    """``LOSSWIRE_AUTH_TOKENS``: an environment variable only (a flag would show the tokens in ``ps``)."""
    if TOKENS_ENV not in environ:
        return ()
    try:
        tokens = tuple(parse_token_list(environ[TOKENS_ENV]))
    except TokenConfigError as error:
        raise KnobError(str(error)) from None
    if not tokens:  # an empty secret must not turn authentication off unnoticed
        raise KnobError(f"{TOKENS_ENV} is set but holds no token (unset it to run without authentication)")
    return tokens


def config_from_settings(settings: Mapping[str, Any]) -> ServerConfig:
    fields = {(k.field or k.name): settings[k.name] for k in KNOBS if k.field != ""}
    return ServerConfig(**fields, auth_tokens=settings.get("auth_tokens", ()))


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerConfig:
    return config_from_settings(resolve_settings(args, environ))


# -- logging ------------------------------------------------------------------------------------------


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# -- commands -------------------------------------------------------------------------------------------


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    from .app import LosswireServer  # torch, gRPC and the whole server: imported only to serve

    _raise_open_files_limit()
    server = LosswireServer(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    # a timed wait: the main thread wakes to run signal handlers, and sees a port that could not be served again
    while not stop.wait(0.5) and not server.failed.is_set():
        pass
    server.stop()
    if server.failure is not None:  # a port closed under it for good: exit so that a supervisor restarts it
        raise SystemExit(1)


def _raise_open_files_limit() -> None:
    """Every connection costs a descriptor: the soft limit (often 1024) raised to the hard one, so that a
    burst of connections that never speak HTTP/2 (each closed after the handshake timeout) does not lock
    new callers out."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def check_health(settings: Mapping[str, Any], service: str, timeout: float) -> int:
    """0 when the local server's health service says SERVING for ``service``, else 1 (the status is printed)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    host, port = settings["host"], settings["port"]
    if settings["health_port"] is not None:  # the plaintext health-only port
        port = settings["health_port"]
    elif settings["tls_cert"]:
        print(
            "losswire health: the server speaks TLS; give it --health-port (a plaintext port that serves only "
            "health) and this command asks that port",
            file=sys.stderr,
        )
        return 2
    if port == 0:
        print("losswire health: the port is 0 (picked at start-up); give the server's port", file=sys.stderr)
        return 2
    if host in ("0.0.0.0", "::", "[::]", ""):  # a wildcard bind: the server answers on loopback
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            print(f"{host}:{port} {service or '(server)'}: {error.code().name} {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{host}:{port} {service or '(server)'}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


def list_losses(args: argparse.Namespace) -> None:
    from .app import load_plugins
    from .losses import LOSSES

    load_plugins(tuple(args.plugin))
    if args.json:
        print(json.dumps([d.to_dict() for d in LOSSES.descriptions()], indent=2))
        return
    if args.markdown:
        from .losses.catalogue import render_markdown

        print(render_markdown())
        return
    for description in LOSSES.descriptions():
        print(f"{description.name:24s} {description.summary}")


def main(argv: Sequence[str] | None = None) -> None:
    """``losswire`` and ``python -m losswire.server``: with no command, or flags first, it serves."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]  # `losswire --port 0` and `python -m losswire.server --port 0` mean serve
    # Output piped into `head` that stops reading ends the process quietly, as it does a Unix tool (Python
    # itself ignores SIGPIPE and would print a BrokenPipeError); the server restores Python's handling.
    sigpipe = getattr(signal, "SIGPIPE", None)
    previous = signal.signal(sigpipe, signal.SIG_DFL) if sigpipe is not None else None
    try:
        _run(build_parser().parse_args(argv))
    finally:
        if sigpipe is not None:
            signal.signal(sigpipe, previous)


def _run(args: argparse.Namespace) -> None:
    if args.command == "losses":
        list_losses(args)
        return
    try:
        if args.command == "health":
            settings = resolve_settings(args, knobs=HEALTH_KNOBS)
            raise SystemExit(check_health(settings, args.service, args.timeout))
        settings, sources = resolve_with_sources(args)
        check_device(settings["device"], sources["device"])
    except KnobError as error:
        print(f"losswire {args.command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a server never dies of a closed socket
    configure_logging(settings["log_level"], settings["log_format"])
    try:
        serve(config_from_settings(settings))
    except (ValueError, ImportError, OSError) as error:
        logging.getLogger("losswire.server").error("cannot start: %s", error)
        raise SystemExit(2) from error
    except RuntimeError as error:  # gRPC's way to say the port is taken; anything else is a bug: its traceback
        if not str(error).startswith("Failed to bind"):
            raise
        logging.getLogger("losswire.server").error(
            "cannot start: %s (another process listens on that port: `ss -ltnp` names it; --port picks another)",
            str(error).split(";")[0],
        )
        raise SystemExit(2) from error
