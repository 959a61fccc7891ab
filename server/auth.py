"""Bearer tokens: which are valid, read from the configuration; the gRPC interceptor that checks every
call's token is ``rpc/authentication.py``.

With tokens configured, every call must carry the metadata ``authorization: Bearer <token>`` with one
of them; anything else is answered UNAUTHENTICATED before the request is parsed or reaches a
servicer. ``grpc.health.v1.Health`` stays open, because probes (Kubernetes, Docker's HEALTHCHECK,
load balancers) carry no credentials and learn nothing but SERVING / NOT_SERVING; LossService, the
Open Inference Protocol and server reflection all need a token.

Tokens come from a file (``--auth-tokens-file``: one token per line, ``#`` comments and blank lines
ignored, at most 1 MiB; re-read when the file changes, so tokens rotate without a restart) and/or from the
environment variable ``LOSSWIRE_AUTH_TOKENS`` (separated by commas or whitespace: a Kubernetes secret
mounted as a variable). Several tokens may be valid at once: one per caller, or old and new during a
rotation. A token is 16 to 4096 visible ASCII characters (what an HTTP/2 header value can carry);
``openssl rand -hex 32`` makes a good one.

Comparison is constant-time (``hmac.compare_digest`` on SHA-256 digests, against every configured
token), and no message or log line ever contains a token: errors name the source and line instead.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import threading
from collections.abc import Iterable
from typing import Any

from losswire.wire.protocol import AUTHORIZATION_HEADER

log = logging.getLogger("losswire.server")

TOKENS_ENV = "LOSSWIRE_AUTH_TOKENS"
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 4096
# Every call compares its token with each configured one on the event loop, and a changed file is re-read
# there: 100 MB of tokens stalled every caller 2.1 s on the re-read and 0.24 s on each call after. 1 MiB is
# 256 of the longest tokens, or 16,000 of `openssl rand -hex 32`.
MAX_TOKEN_FILE_BYTES = 1 << 20
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: a valid HTTP/2 header value, no whitespace
_BEARER = re.compile(r"bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)


class TokenConfigError(ValueError):
    """The configured tokens cannot be used (the message names the source and line, never the token)."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _checked(token: str, where: str) -> str:
    if not _TOKEN.fullmatch(token):
        raise TokenConfigError(f"{where}: a token must be visible ASCII characters without spaces")
    if not MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH:
        raise TokenConfigError(
            f"{where}: a token must be {MIN_TOKEN_LENGTH} to {MAX_TOKEN_LENGTH} characters, this one has {len(token)} "
            "(make one with: openssl rand -hex 32)"
        )
    return token


def parse_token_file(text: str, path: str) -> list[str]:
    """One token per line; ``#`` starts a comment line; blank lines are skipped."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(_checked(line, f"--auth-tokens-file {path}, line {number}"))
    return tokens


def parse_token_list(text: str, source: str = TOKENS_ENV) -> list[str]:
    """Tokens separated by commas or whitespace (an environment variable)."""
    words = [word for word in re.split(r"[,\s]+", text) if word]
    return [_checked(word, f"{source}, token {index}") for index, word in enumerate(words, 1)]


def read_token_file(path: str, regular_only: bool = False) -> list[str]:
    """The file's tokens, each once; a file over ``MAX_TOKEN_FILE_BYTES`` is refused after reading no
    more than that (a wrong path, a log file, /dev/zero). ``regular_only``: refuse anything but a regular
    file without waiting on it (a re-read runs on the event loop, and opening a named pipe waits for a
    writer: every call would wait with it); at start-up a pipe is read (``<(command)``, a secret tool's)."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_NONBLOCK if regular_only else 0))
        with open(fd, "rb") as file:
            if regular_only and not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TokenConfigError(
                    f"--auth-tokens-file {path}: not a regular file (a pipe or a device is read at start-up only)"
                )
            data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as error:
        raise TokenConfigError(f"--auth-tokens-file {path}: cannot read it ({error.strerror})") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise TokenConfigError(
            f"--auth-tokens-file {path}: over {MAX_TOKEN_FILE_BYTES} bytes, the most a tokens file may hold "
            "(one token per line)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenConfigError(f"--auth-tokens-file {path}: not a UTF-8 text file") from None
    return list(dict.fromkeys(parse_token_file(text, path)))  # a token listed twice is compared once


class TokenSet:
    """The valid tokens (as digests): fixed ones plus a file's, the file re-read whenever it changes.

    A file that becomes unreadable or empty keeps its previous tokens (a rotation in progress, or a
    mistake: locking every caller out is never what an edit means); revoking a token is editing it
    out of the file.
    """

    def __init__(self, fixed: Iterable[str] = (), path: str | None = None) -> None:
        self.path = path
        self._fixed = [_digest(_checked(token, f"auth token {index}")) for index, token in enumerate(fixed, 1)]
        self._from_file: list[bytes] = []
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        if path is not None:
            self._from_file = [_digest(token) for token in read_token_file(path)]
            self._stamp = self._file_stamp()
            if not self._from_file:
                raise TokenConfigError(f"--auth-tokens-file {path}: holds no token (one per line)")
        if not self._fixed and not self._from_file:
            raise TokenConfigError(f"{TOKENS_ENV}: holds no token")

    def __len__(self) -> int:
        return len(self._fixed) + len(self._from_file)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)  # type: ignore[arg-type]
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _refresh(self) -> list[bytes]:
        if self.path is None:
            return []
        with self._lock:
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                self._reload()
            return self._from_file

    def _reload(self) -> None:
        try:
            tokens = read_token_file(self.path, regular_only=True)  # type: ignore[arg-type]
        except TokenConfigError as error:
            log.warning("keeping the previous tokens: %s", error)
            return
        if not tokens:
            log.warning("keeping the previous tokens: --auth-tokens-file %s now holds none", self.path)
            return
        self._from_file = [_digest(token) for token in tokens]
        log.info("auth tokens reloaded from %s: %d token(s)", self.path, len(tokens))

    def accepts(self, token: str) -> bool:
        """Constant-time in the token: every configured digest is compared, with no early exit."""
        presented = _digest(token)
        match = False
        for valid in (*self._fixed, *self._refresh()):
            match |= hmac.compare_digest(presented, valid)
        return match


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str | None, str]:
    """(the bearer token, or None with the reason it is missing)."""
    values = [value for key, value in (metadata or ()) if key == AUTHORIZATION_HEADER]
    if not values:
        return None, "this server requires a token: send the metadata 'authorization: Bearer <token>'"
    if len(values) > 1:
        return None, "several 'authorization' metadata entries: send exactly one"
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    match = _BEARER.fullmatch(value)
    if not match:
        return None, "the 'authorization' metadata is not of the form 'Bearer <token>'"
    return match[1], ""
