"""The Unix socket that takes callers' shared-memory segments (the framing: ``losswire.wire.shared_memory``).

One thread serves every connection (``selectors``): a same-host caller connects once, keeps the
connection for its process's life, and sends each new segment's descriptor (``SCM_RIGHTS``) with a
16-byte handoff message; the server answers each with a one-time claim or a refusal. A connection
that closes is a caller that exited or died: the registry drops what it handed over.

Only callers running as the server's own user are accepted (``SO_PEERCRED``): another user's
connection gets a refusal (PERMISSION_DENIED, naming both uids) and is closed before it can send
anything, so no descriptor of theirs ever enters the server. Connections are bounded
(``max_connections``; beyond, RESOURCE_EXHAUSTED), and so are descriptors: at most ``MAX_FDS_PER_READ``
come in with one read, each is adopted (mapped, then closed) or closed at once, and a caller that sends
descriptors without handoff messages, or garbage, is disconnected.

The address is an abstract-namespace name (``@losswire-shm-<random>``): it needs no file, nobody else
can take it over while the server lives, and it vanishes with the server. Callers must share the
server's network namespace (the same host, or the same pod) to reach it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
import socket
import threading
from collections.abc import Callable

from losswire.wire import shared_memory as wire_memory

log = logging.getLogger("losswire.server")

MAX_FDS_PER_READ = 4  # more descriptors in one message are never installed here (MSG_CTRUNC: disconnected)
MAX_BUFFERED = 64 * wire_memory.HANDOFF_FRAME.size  # a caller this far ahead of its answers is disconnected
TICK_SECONDS = 1.0


class Peer:
    """One caller process's connection: its socket, its pid and uid (``SO_PEERCRED``), and what it holds."""

    def __init__(self, sock: socket.socket, pid: int, uid: int) -> None:
        self.sock, self.pid, self.uid = sock, pid, uid
        self.data = bytearray()  # bytes of handoff messages not yet complete
        self.fds: list[int] = []  # descriptors received, not yet paired with their message
        self.pending = 0  # handoffs answered with a claim, not yet registered (the registry counts)

    def __repr__(self) -> str:
        return f"pid {self.pid}"


# handle(peer, byte_size, fd or None) -> (status, claim or message); the callee owns fd (closes it)
Handle = Callable[[Peer, int, "int | None"], tuple[int, str]]


class HandoffListener:
    """Accepts handoffs on ``address`` in a thread of its own; ``handle`` answers each, ``closed(peer)``
    is told of each connection that ends, ``tick()`` runs about every second (expiry)."""

    def __init__(
        self,
        handle: Handle,
        closed: Callable[[Peer], None],
        tick: Callable[[], None],
        max_connections: int,
    ) -> None:
        self.handle, self.closed, self.tick = handle, closed, tick
        self.max_connections = max_connections
        self.address = f"@losswire-shm-{secrets.token_hex(12)}"
        self.peers: dict[int, Peer] = {}  # by socket fd
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(wire_memory.socket_address(self.address))
        listener.listen(64)
        listener.setblocking(False)
        self._listener, self._wake = listener, socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake[0], selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="losswire-shm-handoff", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close every connection and the socket (the thread ends within a moment)."""
        if self._thread is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake[1].send(b"x")
        self._thread.join(10)
        self._thread = None

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(TICK_SECONDS):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.data is not None:
                        self._serve(key.data)
                self.tick()
        except Exception:  # never expected: log it, and let callers notice the closed connections
            log.exception("shared memory: the handoff listener failed; shared memory stops taking segments")
        finally:
            for peer in list(self.peers.values()):
                self._disconnect(peer)
            self._selector.close()
            self._listener.close()
            for end in self._wake:
                end.close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:  # the caller gave up before we accepted (ECONNABORTED), or out of descriptors
            return
        pid, uid, _ = wire_memory.PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, wire_memory.PEERCRED.size)
        )
        own = os.geteuid()
        if uid != own:
            log.info("shared memory: refused a connection from pid %d: uid %d, not the server's %d", pid, uid, own)
            _refuse(
                sock,
                wire_memory.PERMISSION_DENIED,
                f"shared memory: this caller runs as uid {uid} and the server as uid {own}; only callers running as "
                "the server's user may hand memory over (tensors go over gRPC instead)",
            )
            return
        if len(self.peers) >= self.max_connections:
            log.warning("shared memory: refused pid %d: %d callers connected already", pid, len(self.peers))
            _refuse(
                sock,
                wire_memory.RESOURCE_EXHAUSTED,
                f"shared memory: {len(self.peers)} callers are connected to this server already, its most "
                "(losswire serve --max-shared-memory-connections)",
            )
            return
        sock.setblocking(False)
        peer = Peer(sock, pid, uid)
        if not self._send(peer, wire_memory.answer_frame(wire_memory.OK, "losswire shared memory")):
            sock.close()
            return
        self.peers[sock.fileno()] = peer
        self._selector.register(sock, selectors.EVENT_READ, peer)

    def _serve(self, peer: Peer) -> None:
        """Read what ``peer`` sent; a failure of ours costs that connection only, never the others'."""
        try:
            self._read(peer)
        except Exception:
            log.exception("shared memory: serving pid %d failed; its connection is closed", peer.pid)
            self._disconnect(peer)

    def _read(self, peer: Peer) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(peer.sock, 4096, MAX_FDS_PER_READ)
        except BlockingIOError:
            return
        except OSError:
            self._disconnect(peer)
            return
        peer.fds.extend(fds)
        if not data and not fds:  # the caller's process closed its end: exited, or died
            self._disconnect(peer)
            return
        peer.data += data
        if flags & socket.MSG_CTRUNC or len(peer.data) > MAX_BUFFERED:
            self._violation(peer, f"more than {MAX_FDS_PER_READ} descriptors in one message, or too far ahead")
            return
        frame = wire_memory.HANDOFF_FRAME.size
        while len(peer.data) >= frame:
            message = bytes(peer.data[:frame])
            del peer.data[:frame]
            fd = peer.fds.pop(0) if peer.fds else None
            try:
                byte_size = wire_memory.parse_handoff(message)
            except ValueError as error:
                _close_fd(fd)
                self._violation(peer, str(error))
                return
            status, text = self.handle(peer, byte_size, fd)
            if not self._send(peer, wire_memory.answer_frame(status, text)):
                self._disconnect(peer)
                return
        if len(peer.fds) > (1 if peer.data else 0):  # descriptors without a handoff message each
            self._violation(peer, "descriptors came without a handoff message each")

    def _violation(self, peer: Peer, what: str) -> None:
        log.info("shared memory: disconnected pid %d: %s", peer.pid, what)
        self._send(peer, wire_memory.answer_frame(wire_memory.INVALID_ARGUMENT, f"shared memory: {what}"))
        self._disconnect(peer)

    @staticmethod
    def _send(peer: Peer, data: bytes) -> bool:
        try:
            return peer.sock.send(data) == len(data)  # a few bytes: all or nothing unless it stopped reading
        except OSError:
            return False

    def _disconnect(self, peer: Peer) -> None:
        if self.peers.pop(peer.sock.fileno(), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(peer.sock)
        for fd in peer.fds:
            _close_fd(fd)
        peer.fds.clear()
        peer.sock.close()
        self.closed(peer)


def _refuse(sock: socket.socket, status: int, message: str) -> None:
    """Answer a connection's greeting with a refusal and close it; nothing it sent is ever read."""
    try:
        sock.setblocking(False)
        sock.send(wire_memory.answer_frame(status, message))
    except OSError:
        pass
    finally:
        sock.close()


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
