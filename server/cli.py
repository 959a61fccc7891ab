"""``losswire serve``: the server's command line. Every flag has an environment variable."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from . import __version__
from .app import MAX_MESSAGE_BYTES, LosswireServer, ServerConfig


def _env(name: str, default: object) -> object:
    return os.environ.get(f"LOSSWIRE_{name}", default)


def _optional_int(value: str) -> int | None:
    return None if value in ("", "none", "None", "0") else int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="losswire",
        description="losswire: a gRPC service that evaluates MMDetection-style losses and their gradients.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"losswire {__version__}")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the loss server. Each flag can also be set by the environment variable in brackets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_serve_flags(serve)
    listing = commands.add_parser("losses", help="list the registered losses (with --plugin modules)")
    listing.add_argument("--plugin", action="append", default=[], help="import this module first")
    listing.add_argument("--json", action="store_true", help="print the full descriptions as JSON")
    listing.add_argument("--markdown", action="store_true", help="print the README's catalogue table")
    return parser


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    default = ServerConfig()
    parser.add_argument("--host", default=_env("HOST", default.host), help="address to bind [LOSSWIRE_HOST]")
    parser.add_argument(
        "--port", type=int, default=_env("PORT", default.port), help="port to bind; 0 picks a free one [LOSSWIRE_PORT]"
    )
    parser.add_argument(
        "--device",
        default=_env("DEVICE", default.device),
        help="where losses run: auto (cuda when available, else cpu), cpu, cuda, cuda:1 [LOSSWIRE_DEVICE]",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=_env("MAX_WORKERS", default.max_workers),
        help="threads serving calls concurrently [LOSSWIRE_MAX_WORKERS]",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=_optional_int,
        default=_env("MAX_CONCURRENT_RPCS", None),
        help="calls accepted at once; beyond it RESOURCE_EXHAUSTED (0 or none: unbounded) "
        "[LOSSWIRE_MAX_CONCURRENT_RPCS]",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=_env("MAX_MESSAGE_BYTES", MAX_MESSAGE_BYTES),
        help="largest request/response message [LOSSWIRE_MAX_MESSAGE_BYTES]",
    )
    parser.add_argument(
        "--max-elements",
        type=_optional_int,
        default=_env("MAX_ELEMENTS", None),
        help="largest tensor in elements (0 or none: unbounded) [LOSSWIRE_MAX_ELEMENTS]",
    )
    parser.add_argument(
        "--torch-threads",
        type=_optional_int,
        default=_env("TORCH_THREADS", None),
        help="torch intra-op threads (0 or none: torch's default) [LOSSWIRE_TORCH_THREADS]",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=_env("GRACE", default.grace_seconds),
        help="seconds in-flight calls may finish after SIGTERM/SIGINT [LOSSWIRE_GRACE]",
    )
    parser.add_argument(
        "--shutdown-notice",
        type=float,
        default=_env("SHUTDOWN_NOTICE", default.shutdown_notice_seconds),
        help="seconds health reports NOT_SERVING while calls are still served, before the drain "
        "(e.g. a readiness probe's period) [LOSSWIRE_SHUTDOWN_NOTICE]",
    )
    parser.add_argument(
        "--session-ttl",
        type=float,
        default=_env("SESSION_TTL", default.session_ttl_seconds),
        help="seconds an idle session (server-held loss state) lives on [LOSSWIRE_SESSION_TTL]",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=_env("MAX_SESSIONS", default.max_sessions),
        help="live sessions at once; a new one beyond it gets RESOURCE_EXHAUSTED [LOSSWIRE_MAX_SESSIONS]",
    )
    parser.add_argument(
        "--session-replay-depth",
        type=int,
        default=_env("SESSION_REPLAY_DEPTH", default.session_replay_depth),
        help="recent forwards per session whose prior state is kept for exact backward recomputes "
        "[LOSSWIRE_SESSION_REPLAY_DEPTH]",
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=None,
        help="import MODULE at start-up to register extra losses; repeatable [LOSSWIRE_PLUGINS, comma-separated]",
    )
    parser.add_argument(
        "--log-level", default=_env("LOG_LEVEL", "INFO"), help="DEBUG logs one line per request [LOSSWIRE_LOG_LEVEL]"
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    plugins = args.plugin if args.plugin is not None else [p for p in str(_env("PLUGINS", "")).split(",") if p]
    return ServerConfig(
        host=args.host,
        port=int(args.port),
        device=args.device,
        max_workers=int(args.max_workers),
        # argparse runs `type` on string defaults too, so environment values arrive converted
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_message_bytes=int(args.max_message_bytes),
        max_elements=args.max_elements,
        torch_threads=args.torch_threads,
        grace_seconds=float(args.grace),
        shutdown_notice_seconds=float(args.shutdown_notice),
        plugins=tuple(plugins),
        session_ttl_seconds=float(args.session_ttl),
        max_sessions=int(args.max_sessions),
        session_replay_depth=int(args.session_replay_depth),
    )


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    server = LosswireServer(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    while not stop.wait(0.5):  # a timed wait: the main thread wakes to run signal handlers
        pass
    server.stop()


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]  # `python -m losswire.server --port 0` means serve
    args = build_parser().parse_args(argv)
    if args.command == "losses":
        list_losses(args)
        return
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
        serve(config)
    except (ValueError, ImportError, OSError) as error:
        logging.getLogger("losswire.server").error("cannot start: %s", error)
        raise SystemExit(2) from error
