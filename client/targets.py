"""Where a client dials: one server, a gRPC URI, or several servers; and whether that is this machine.

A target is one of

* one server, ``"host:port"``: one channel with gRPC's default policy (pick_first);
* a gRPC URI, ``"dns:///losswire-headless.ml.svc.cluster.local:50051"`` (or ``ipv4:``, ``ipv6:``, ``unix:``,
  ``xds:``...): one channel balanced ``round_robin`` over every address the name resolves to;
* several servers, ``["gpu1:50051", "gpu2:50051"]`` or ``"gpu1:50051,gpu2:50051"``: one channel balanced
  ``round_robin`` over all of them.

Without a target the client dials ``$LOSSWIRE_TARGET``, else ``localhost:50051`` (:func:`default_target`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from losswire.wire.protocol import DEFAULT_PORT

DEFAULT_TARGET = f"localhost:{DEFAULT_PORT}"
# The target of every client, module and mmdet config that names none
TARGET_ENV = "LOSSWIRE_TARGET"
# Schemes gRPC resolves itself; anything else with a port ("gpu1:50051") is a host.
URI_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
# Schemes of a URL pasted where a target goes ("http://host:port"): no gRPC resolver takes them.
URL_SCHEMES = frozenset({"http", "https", "grpc", "grpcs"})

Target = str | Sequence[str]  # "host:port", a gRPC URI, or several "host:port" (a list or "h1:p1,h2:p2")
Normalised = str | tuple[str, ...]  # what normalise_target returns: one server or URI, or several servers


def default_target() -> str:
    """``$LOSSWIRE_TARGET`` when set and not blank, else ``DEFAULT_TARGET`` (``localhost:50051``)."""
    return os.environ.get(TARGET_ENV, "").strip() or DEFAULT_TARGET


def is_uri(target: str) -> bool:
    """``dns:///name:port``, ``ipv4:...`` and the like, as opposed to ``host:port``."""
    scheme, colon, _ = target.partition(":")
    return "://" in target or (bool(colon) and scheme.lower() in URI_SCHEMES)


def scheme_of(target: Normalised) -> str:
    """The URI scheme of a normalised target, lower case; "" for ``host:port`` and lists of them."""
    return "" if isinstance(target, tuple) or not is_uri(target) else target.partition(":")[0].lower()


def balanced(target: Normalised) -> bool:
    """Whether calls to ``target`` may reach different servers: a list, or a name gRPC resolves and
    balances (``dns:``, ``ipv4:``, ``ipv6:``); one ``host:port`` or Unix socket is one server."""
    return isinstance(target, tuple) or scheme_of(target) not in ("", "unix", "unix-abstract")


def split_host_port(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[ipv6]:port"`` -> (host, port)."""
    host, colon, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not colon or not host or not port.isdigit() or (":" in host and not bracketed):
        raise ValueError(f"expected 'host:port' (IPv6: '[address]:port'), got {address!r}")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalise_target(target: Target | None) -> Normalised:
    """One server or a URI stays a string; several servers become a tuple of ``host:port``.

    ``"h1:p1,h2:p2"``, ``["h1:p1", "h2:p2"]`` and ``("h1:p1", "h2:p2")`` give the same tuple (so the
    same shared client); one listed server gives its string. None: :func:`default_target`.
    """
    if target is None:
        target = default_target()
    if isinstance(target, str):
        target = target.strip()
        scheme, separator, rest = target.partition("://")
        if separator and scheme.lower() in URL_SCHEMES:  # gRPC would say only "Misformatted domain name"
            raise ValueError(
                f"target {target!r} is a URL: gRPC dials 'host:port' (or a gRPC URI such as 'dns:///host:port'); "
                f"write {rest.rstrip('/')!r}"
            )
        if is_uri(target):
            if target.lower().startswith("dns:") and "," in target:
                raise ValueError(f"{target!r}: a dns: URI names one host; list several servers as 'h1:p1,h2:p2'")
            return target
        parts: Sequence[Any] = target.split(",")
    else:
        parts = list(target) if isinstance(target, Iterable) else [target]
    if not all(isinstance(part, str) for part in parts):
        # an int port, or a (host, port) pair, used to fail as "'int' object is not iterable" or as a list of
        # two servers whose first, the bare host, has no port
        raise TypeError(
            f"target must be 'host:port' (e.g. '127.0.0.1:50051'), a gRPC URI, or a list of 'host:port' strings; "
            f"got {target!r:.80} (of type {type(target).__name__})"
        )
    addresses = tuple(dict.fromkeys(str(part).strip() for part in parts if str(part).strip()))
    if not addresses:
        raise ValueError("target names no server: expected 'host:port', several of them, or a gRPC URI")
    for address in addresses:
        if is_uri(address) and len(addresses) > 1:
            raise ValueError(f"{address!r} in a list of servers: list host:port addresses, or pass one gRPC URI alone")
        if not is_uri(address):
            split_host_port(address)
    return addresses[0] if len(addresses) == 1 else addresses


def label(target: Normalised) -> str:
    """A target as messages name it: the string the caller gave, or the servers joined by commas."""
    return ",".join(target) if isinstance(target, tuple) else target


def resolve_ips(host: str, port: int) -> list[str]:
    """``host`` as IP addresses: itself if it is one, else what the system resolver says."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise ValueError(f"cannot resolve {host!r}: {error}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_list_uri(addresses: Sequence[str]) -> str:
    """One ``ipv4:``/``ipv6:`` URI for several ``host:port``: the channel target that balances over them.

    Why a URI of resolved addresses: gRPC's round_robin then does the balancing, the health checks,
    the reconnects and the retry onto another replica, all in its core. grpcio has no static resolver
    for several host names, and a round robin of our own over one channel per server would have to
    track each channel's health and retry across channels itself (a channel's retry policy only
    retries on that channel, i.e. on the same dead server). The price: host names are resolved once,
    when the client is made. For a replica set that changes (pods), use a ``dns:///`` name.

    A host with IPv4 addresses contributes those, else its IPv6 ones; one URI holds one family only.
    """
    by_family: dict[int, list[str]] = {4: [], 6: []}
    for address in addresses:
        host, port = split_host_port(address)
        ips = [ipaddress.ip_address(ip.split("%")[0]) for ip in resolve_ips(host, port)]
        family = 4 if any(ip.version == 4 for ip in ips) else 6
        by_family[family] += [join_host_port(str(ip), port) for ip in ips if ip.version == family]
    if by_family[4] and by_family[6]:
        raise ValueError(
            f"servers {list(addresses)} resolve to IPv4 and IPv6-only addresses ({by_family[4]}, {by_family[6]}); "
            "one balanced gRPC channel takes one family: name them by addresses of one family, or use a dns:/// name"
        )
    family = 4 if by_family[4] else 6
    return f"ipv{family}:" + ",".join(dict.fromkeys(by_family[family]))


def target_hosts(target: Normalised) -> list[str] | None:
    """The hosts a (normalised) target names; None when the client cannot tell (``xds:``, ``unix:``...)."""
    if isinstance(target, tuple):
        return [split_host_port(address)[0] for address in target]
    scheme, _, rest = target.partition(":")
    if not is_uri(target):
        return [split_host_port(target)[0]]
    if scheme.lower() in ("ipv4", "ipv6"):
        return [split_host_port(address.strip())[0] for address in rest.split(",") if address.strip()]
    if scheme.lower() == "dns":
        name = rest[2:].partition("/")[2] if rest.startswith("//") else rest
        return [split_host_port(name)[0] if re.search(r":\d+$", name) else name.strip("[]")]
    return None


def all_loopback(target: Normalised) -> bool:
    """Every address is this machine's (by name or literal, never by a DNS answer that could change)."""
    if scheme_of(target) == "unix":
        return True
    hosts = target_hosts(target)
    return bool(hosts) and all(is_loopback(host) for host in hosts)  # type: ignore[union-attr]


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def tls_server_name(target: Normalised) -> str | None:
    """The name a TLS channel checks the server's certificate against, where gRPC's default does not do.

    gRPC checks the target's host; but a balanced channel over listed servers or an ``ipv4:``/``ipv6:``
    URI has the address list as its authority, so the name must be given: the one host they all share,
    else ``Credentials(server_name=...)`` (``LOSSWIRE_TLS_SERVER_NAME``), a name every replica's
    certificate carries. None: gRPC's default (one ``host:port``, a ``dns:///`` name).
    """
    if not (isinstance(target, tuple) or scheme_of(target) in ("ipv4", "ipv6")):
        return None
    hosts = sorted(set(target_hosts(target) or ()))
    if len(hosts) == 1:
        return hosts[0]
    raise ValueError(
        f"TLS to several servers ({', '.join(hosts)}) over one balanced channel checks every certificate against one "
        "name: give Credentials(server_name=...) or LOSSWIRE_TLS_SERVER_NAME, a name each server's certificate carries"
    )
