"""Ending one caller's connection from the server's side, which gRPC's Python server offers no way to do.

A unary answer handed to gRPC stays in gRPC's buffers until its caller's flow control lets it through:
cancelling the handler, or aborting the call, sends nothing (the status would queue behind the answer)
and frees nothing, so a caller that never reads holds the answer's memory for as long as it keeps its
connection. Shutting that connection's socket down does free it: gRPC sees the connection end, fails
its calls and drops their buffers.

On Linux the socket is found from the call's peer address: ``/proc/net/tcp`` and ``tcp6`` give the inode
of the socket whose remote end it is, and ``/proc/self/fd`` the server's descriptor of that inode. A copy
of the descriptor is shut down (both directions), so gRPC's own descriptor stays its to close.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from urllib.parse import unquote

log = logging.getLogger("losswire.server")
ANSWER_BOUND = "losswire serve --stream-idle-timeout, plus a second per --stream-min-rate bytes of the answer"


def hang_up_unread(method: str, peer: str, seconds: float, since: str = "it was sent") -> None:
    """Close the connection of a caller that left ``method``'s answer untaken for ``seconds``, and say so."""
    closed = hang_up(peer)
    log.info(
        "%s: the caller had not taken its answer %g s after %s (%s); %s",
        method,
        seconds,
        since,
        ANSWER_BOUND,
        "its connection is closed" if closed else "its connection was not found to close, so the call waits on",
    )


def hang_up(peer: str) -> bool:
    """Shut down the server's TCP connection to ``peer`` (gRPC's form: ``ipv4:10.0.0.7:5123``,
    ``ipv6:[::1]:5123``); whether it was found (not on other systems, nor for Unix-socket peers)."""
    remote = _address(peer)
    inode = _inode_of(remote) if remote is not None else None
    fd = _descriptor_of(inode) if inode is not None else None
    if fd is None:
        return False
    try:
        with socket.socket(fileno=os.dup(fd)) as copy:
            copy.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(peer: str) -> tuple[Address, int] | None:
    kind, _, rest = unquote(peer).partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isdigit():
        return None
    try:
        return ipaddress.ip_address(host.strip("[]")), int(port)
    except ValueError:
        return None


def _proc_form(address: Address, port: int) -> str:
    """An address as /proc/net/tcp{,6} write it: each 32-bit word of the address in host order, in hex."""
    words = struct.unpack(f"<{len(address.packed) // 4}I", address.packed)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def _inode_of(remote: tuple[Address, int]) -> str | None:
    """The inode of the socket whose remote end is ``remote`` (an IPv4 peer of a dual-stack listener is
    listed among the IPv6 sockets, as ::ffff:a.b.c.d)."""
    address, port = remote
    forms = [("/proc/net/tcp6", _proc_form(address, port))]
    if address.version == 4:
        mapped = ipaddress.IPv6Address(f"::ffff:{address}")
        forms = [("/proc/net/tcp", _proc_form(address, port)), ("/proc/net/tcp6", _proc_form(mapped, port))]
    for table, form in forms:
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[2] == form:  # rem_address
                        return fields[9]
        except OSError:
            continue
    return None


def _descriptor_of(inode: str) -> int | None:
    target = f"socket:[{inode}]"
    try:
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == target:
                    return int(name)
            except OSError:
                continue
    except OSError:
        return None
    return None
