"""Client credentials: TLS, mutual TLS and a bearer token, applied to every channel a LossClient opens.

    from losswire.client import Credentials, LossClient, RemoteLoss
    creds = Credentials.from_files(ca="ca.pem", cert="client.pem", key="client.key", token_file="token")
    loss = RemoteLoss(dict(type="FocalLoss"), client=LossClient("gpu1:50051", credentials=creds))

Without ``credentials=``, a client reads them from the environment, so a training script, ``build_loss``
and the mmdet config adapter pick them up with no code change:

=============================  =========================================================================
``LOSSWIRE_TLS_CA``            PEM CA certificate(s) the server's certificate must chain to (turns on TLS)
``LOSSWIRE_TLS=1``             TLS against the system's CA certificates (a publicly signed server)
``LOSSWIRE_TLS_CLIENT_CERT``   this client's certificate (PEM), for a server with ``--tls-client-ca``;
``LOSSWIRE_TLS_CLIENT_KEY``    and its key
``LOSSWIRE_TLS_SERVER_NAME``   the name the server's certificate must carry (default: the target's host)
``LOSSWIRE_TOKEN``             the bearer token, sent as ``authorization: Bearer <token>``;
``LOSSWIRE_TOKEN_FILE``        or a file holding it (the first line that is not blank or a ``#`` comment)
=============================  =========================================================================

A token travels only where nobody else can read it: over TLS, or in plaintext to a loopback address
(``localhost``, ``127.0.0.1``, ``[::1]``: gRPC's local credentials, which check that the connection
really is local). A token for a plaintext remote target is refused when the client is made.

The token is added to each call's metadata by a client interceptor on the channel rather than by
gRPC's ``access_token_call_credentials``: those run a Python plugin on another thread for every call,
which measured 0.2 to 0.8 ms per call on a 0.8 ms round trip; the interceptor costs a few µs.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from losswire.wire.protocol import AUTHORIZATION_HEADER

ENV = {
    "ca": "LOSSWIRE_TLS_CA",
    "tls": "LOSSWIRE_TLS",
    "cert": "LOSSWIRE_TLS_CLIENT_CERT",
    "key": "LOSSWIRE_TLS_CLIENT_KEY",
    "server_name": "LOSSWIRE_TLS_SERVER_NAME",
    "token": "LOSSWIRE_TOKEN",
    "token_file": "LOSSWIRE_TOKEN_FILE",
}
TRUE_WORDS = ("1", "true", "yes", "on")
_TOKEN = re.compile(r"[\x21-\x7e]+")  # what an HTTP/2 header value carries, without whitespace


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a client presents and trusts. Frozen and hashable: shared clients are keyed by it.

    Args:
        tls: use TLS; implied by ``root_certificates`` or a client certificate. With no
            ``root_certificates`` the server is checked against the system's CA certificates.
        root_certificates: PEM CA certificate(s) the server's certificate must chain to.
        client_certificate, client_key: PEM; this client's identity for mutual TLS.
        token: a bearer token, sent with every call as ``authorization: Bearer <token>``.
        server_name: the name checked against the server's certificate instead of the target's host
            (needed for several servers behind one balanced channel, or addresses without a name).
    """

    tls: bool = False
    root_certificates: bytes | None = dataclasses.field(default=None, repr=False)
    client_certificate: bytes | None = dataclasses.field(default=None, repr=False)
    client_key: bytes | None = dataclasses.field(default=None, repr=False)
    token: str | None = dataclasses.field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("a client certificate needs its key and a key its certificate (mutual TLS takes both)")
        if self.token is not None and not _TOKEN.fullmatch(self.token):
            raise ValueError("the token must be visible ASCII characters without spaces (an HTTP/2 header value)")
        if self.root_certificates is not None or self.client_certificate is not None:
            object.__setattr__(self, "tls", True)

    def __repr__(self) -> str:  # never the token or the key
        parts = [f"tls={self.tls}"]
        if self.root_certificates is not None:
            parts.append("root_certificates=<PEM>")
        if self.client_certificate is not None:
            parts.append("client_certificate=<PEM>")
        if self.token is not None:
            parts.append("token=<set>")
        if self.server_name is not None:
            parts.append(f"server_name={self.server_name!r}")
        return f"Credentials({', '.join(parts)})"

    @property
    def empty(self) -> bool:
        return not self.tls and self.token is None

    @classmethod
    def from_files(
        cls,
        *,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls: bool = False,
        server_name: str | None = None,
    ) -> Credentials:
        """Credentials from PEM files and a token (or a file holding it); the files are read now."""
        if token is not None and token_file is not None:
            raise ValueError("give the token or a token file, not both")
        return cls(
            tls=tls,
            root_certificates=_read(ca, "the CA file"),
            client_certificate=_read(cert, "the client certificate"),
            client_key=_read(key, "the client key"),
            token=token if token_file is None else read_token(token_file),
            server_name=server_name or None,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Credentials:
        """Credentials from the ``LOSSWIRE_TLS_*`` / ``LOSSWIRE_TOKEN*`` variables (none set: plaintext)."""
        value = {name: environ.get(variable) or None for name, variable in ENV.items()}
        try:
            return cls.from_files(
                ca=value["ca"],
                cert=value["cert"],
                key=value["key"],
                token=value["token"],
                token_file=value["token_file"],
                tls=(value["tls"] or "").lower() in TRUE_WORDS,
                server_name=value["server_name"],
            )
        except ValueError as error:
            variables = ", ".join(ENV.values())
            raise ValueError(f"losswire client credentials from the environment ({variables}): {error}") from None

    def channel_credentials(self, loopback: bool, uds: bool = False) -> grpc.ChannelCredentials | None:
        """The transport's credentials (None: plaintext). ``loopback``: every address of the target is
        local, the one case where a token may travel without TLS."""
        if self.tls:
            return grpc.ssl_channel_credentials(self.root_certificates, self.client_key, self.client_certificate)
        if self.token is None:
            return None
        if loopback:
            kind = grpc.LocalConnectionType.UDS if uds else grpc.LocalConnectionType.LOCAL_TCP
            return grpc.local_channel_credentials(kind)
        raise ValueError(
            "a bearer token is only sent over TLS or to a loopback address, and this target is neither: "
            f"give the server's CA (Credentials(root_certificates=...) or {ENV['ca']}) or tls=True ({ENV['tls']}=1)"
        )

    def secure(self, channel: grpc.Channel) -> grpc.Channel:
        """``channel`` with the token added to every call (itself without a token). Only for a channel
        made with :meth:`channel_credentials`, which refuses a token on a plaintext remote channel."""
        return channel if self.token is None else grpc.intercept_channel(channel, BearerToken(self.token))


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to the metadata of every call on a channel."""

    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION_HEADER, f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerToken(<set>)"

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [entry for entry in (details.metadata or ()) if entry[0] != AUTHORIZATION_HEADER]
        return _CallDetails(
            details.method,
            details.timeout,
            [*metadata, self._entry],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable, details: grpc.ClientCallDetails, requests: Iterator
    ) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(
        self, continuation: Callable, details: grpc.ClientCallDetails, requests: Iterator
    ) -> Any:
        return continuation(self._details(details), requests)


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ValueError(f"cannot read {what} {os.fspath(path)!r}: {error.strerror}") from None


def read_token(path: str | os.PathLike[str]) -> str:
    """The first line of ``path`` that is neither blank nor a ``#`` comment."""
    data = _read(path, "the token file") or b""
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    raise ValueError(f"the token file {os.fspath(path)!r} holds no token")
