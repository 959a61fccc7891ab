"""The Unix socket that takes callers' shared-memory segments (the framing: ``losswire.wire.shared_memory``).

One thread serves the socket and every connection (``selectors``): a same-host caller connects once,
keeps the connection for its process's life, sends the connection key ``SharedMemoryEndpoint`` gave it first,
then each new segment's descriptor (``SCM_RIGHTS``) with a 16-byte handoff message; the server answers
the connection key (``admit``: the connection is its token's from then on) and each handoff with a one-time claim
or a refusal. A connection that closes is a caller that exited or died: the registry drops what it handed
over.

Adopting a segment takes time (its every page is checked allocated: 0.2 s a GiB or more), so that thread
only reads and writes: handoffs are handled (``handle``: adopted or refused) by ``ADOPTION_WORKERS``
worker threads, at most one handoff of a connection at a time. A caller's handoffs are answered in
the order it sent them, and one caller's big segment delays no other caller's handoff (a caller with
many connections could occupy every worker, each for one adoption; the next of its handoffs then
queues behind everyone else's). While a connection's handoff is being handled, nothing more is read
from it: what it sends next waits in its socket.

Only callers running as the server's own user are accepted (``SO_PEERCRED``): another user's
connection gets a refusal (PERMISSION_DENIED, naming both uids) and is closed before it can send
anything, so no descriptor of theirs ever enters the server. Connections are bounded
(``max_connections``), and so are those still waiting for their connection key: at most a quarter of them, each
for ``KEY_WAIT_SECONDS`` (then refused and closed). A new connection that finds either bound reached
takes the place of the oldest connection still waiting for its connection key (refused and closed), so that
connections that never send one cannot keep out those that do; only when every connection has sent
its connection key is a new one refused (RESOURCE_EXHAUSTED). A connection key sent right after connecting is taken
as the connection is accepted. Descriptors are bounded too: at most ``MAX_FDS_PER_READ``
come in with one read, and none is read from a connection until those are handled (each adopted:
mapped, then closed; or closed at once); a caller that sends descriptors without handoff messages,
or garbage, is disconnected.

Stopping closes the socket and every connection at once; it returns once the handoffs being adopted
are done, their segments dropped (each connection's end is told to ``closed`` after its last
``handle`` returned, never while one runs).

The address is an abstract-namespace name (``@losswire-shm-<random>``): it needs no file, nobody else
can take it over while the server lives, and it vanishes with the server. Callers must share the
server's network namespace (the same host, or the same pod) to reach it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from losswire.wire import shared_memory as wire_memory

log = logging.getLogger("losswire.server")

MAX_FDS_PER_READ = 4  # more descriptors in one message are never installed here (MSG_CTRUNC: disconnected)
MAX_BUFFERED = 64 * wire_memory.HANDOFF_FRAME.size  # a caller this far ahead of its answers is disconnected
ADOPTION_WORKERS = 4  # handoffs handled at once, each of another connection (a few cores' worth of page walks)
TICK_SECONDS = 1.0
KEY_WAIT_SECONDS = 10.0  # a connection that has not sent its connection key by then is refused and closed


class Peer:
    """One caller process's connection: its socket, its pid and uid (``SO_PEERCRED``), and what it holds."""

    def __init__(self, sock: socket.socket, pid: int, uid: int) -> None:
        self.sock, self.pid, self.uid = sock, pid, uid
        self.token: str | None = None  # its connection key's token (a digest, "" without tokens); None: no key yet
        self.since = time.monotonic()  # connected
        self.data = bytearray()  # bytes of handoff messages not yet complete
        self.fds: list[int] = []  # descriptors received, not yet paired with their message
        self.waiting: collections.deque[tuple[int, int | None]] = collections.deque()  # (byte_size, fd), in order
        self.pending = 0  # handoffs answered with a claim, not yet registered (the registry counts)
        self.reading = False  # registered with the selector (not while a handoff of its is handled)
        self.busy = False  # a worker has one of its handoffs (HandoffListener._lock)
        self.gone = False  # its connection closed (HandoffListener._lock)

    def __repr__(self) -> str:
        return f"pid {self.pid}"


# handle(peer, byte_size, fd or None) -> (status, claim or message); the callee owns fd (closes it)
Handle = Callable[[Peer, int, "int | None"], tuple[int, str]]
# admit(peer, connection key) -> (status, message): OK sets peer.token; anything else closes the connection
Admit = Callable[[Peer, int], tuple[int, str]]


class HandoffListener:
    """Accepts handoffs on ``address`` in a thread of its own; ``admit`` answers each connection's connection key
    (on this thread), ``handle`` each handoff (on a worker thread, one at a time per connection),
    ``closed(peer)`` is told of each connection that ends (once no ``handle`` of its runs), ``tick()``
    runs about every second (expiry)."""

    def __init__(
        self,
        admit: Admit,
        handle: Handle,
        closed: Callable[[Peer], None],
        tick: Callable[[], None],
        max_connections: int,
    ) -> None:
        self.admit, self.handle, self.closed, self.tick = admit, handle, closed, tick
        self.max_connections = max_connections
        self.address = f"@losswire-shm-{secrets.token_hex(12)}"
        self.peers: dict[int, Peer] = {}  # by socket fd
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._workers: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # Peer.busy and Peer.gone, and the answers below
        self._answered: collections.deque[tuple[Peer, bytes | None]] = collections.deque()  # by workers, to send

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(wire_memory.socket_address(self.address))
        listener.listen(64)
        listener.setblocking(False)
        self._listener, self._wake = listener, socket.socketpair()
        for end in self._wake:
            end.setblocking(False)  # a full wake-up pipe already has a wake-up in it
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake[0], selectors.EVENT_READ)
        self._workers = ThreadPoolExecutor(ADOPTION_WORKERS, thread_name_prefix="losswire-shm-adopt")
        self._thread = threading.Thread(target=self._run, name="losswire-shm-handoff", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close every connection and the socket; return once no handoff is being handled any more."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake_up()
        self._thread.join(10)
        self._thread = None
        self._workers.shutdown(wait=True)  # an adoption under way ends, and its segment is dropped (closed)

    def _wake_up(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is waiting already), or closed (stopped)
            self._wake[1].send(b"x")

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(TICK_SECONDS):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake[0]:
                        with contextlib.suppress(OSError):
                            self._wake[0].recv(4096)
                    else:
                        self._serve(key.data)
                self._deliver()
                self._expire_keyless()
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
        if not self._make_room():
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
        self._resume(peer)
        self._serve(peer)  # a connection key sent right after connecting is here already: taken now

    def _make_room(self) -> bool:
        """Room for one more connection (False: every place is taken by a connection that sent its connection key).
        Where the connections, or those waiting for their connection key, are at their most, the oldest one waiting
        makes way."""
        waiting = [peer for peer in self.peers.values() if peer.token is None]
        if len(self.peers) < self.max_connections and len(waiting) < self.max_keyless:
            return True
        if not waiting:
            return False
        text = (
            f"shared memory: this connection sent no connection key, and made way for a newer one ({len(waiting)} "
            f"waited for theirs, {len(self.peers)} connected; losswire serve --max-shared-memory-connections)"
        )
        self._turn_away(min(waiting, key=lambda peer: peer.since), wire_memory.RESOURCE_EXHAUSTED, text)
        return True

    def _serve(self, peer: Peer) -> None:
        """Read what ``peer`` sent; a failure of ours costs that connection only, never the others'."""
        if peer.gone:  # closed earlier in this round of events
            return
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
            try:
                kind, value = wire_memory.parse_frame(message)
            except ValueError as error:
                self._violation(peer, str(error))
                return
            if peer.token is None:
                if not self._admitted(peer, kind, value):
                    return
            elif kind == wire_memory.CONNECTION_KEY:
                self._violation(peer, "a connection sends one connection key, as its first message")
                return
            else:
                peer.waiting.append((value, peer.fds.pop(0) if peer.fds else None))
        if len(peer.fds) > (1 if peer.data else 0):  # descriptors without a handoff message each
            self._violation(peer, "descriptors came without a handoff message each")
            return
        self._next(peer)

    def _admitted(self, peer: Peer, kind: int, connection_key: int) -> bool:
        """``peer``'s first message: its connection key, taken (True) or refused (False: its connection closed)."""
        if kind != wire_memory.CONNECTION_KEY:
            status, text = (
                wire_memory.PERMISSION_DENIED,
                "shared memory: a connection's first message is the connection key SharedMemoryEndpoint answered (kind "
                f"{wire_memory.CONNECTION_KEY}); this one was kind {kind}",
            )
        else:
            status, text = self.admit(peer, connection_key)
        if status != wire_memory.OK:
            self._turn_away(peer, status, text)
            return False
        if not self._send(peer, wire_memory.answer_frame(status, text)):
            self._disconnect(peer)
            return False
        return True

    def _expire_keyless(self) -> None:
        """Refuse and close the connections that sent no connection key within ``KEY_WAIT_SECONDS``."""
        now = time.monotonic()
        text = f"shared memory: no connection key within {KEY_WAIT_SECONDS:.0f} s of connecting (SharedMemoryEndpoint)"
        for peer in [p for p in self.peers.values() if p.token is None and now - p.since > KEY_WAIT_SECONDS]:
            self._turn_away(peer, wire_memory.PERMISSION_DENIED, text)

    @property
    def max_keyless(self) -> int:
        """How many connections may wait for their connection key at once: a quarter of them (at least one)."""
        return max(1, self.max_connections // 4)

    # -- handling on the workers, answers on this thread --------------------------------------------

    def _next(self, peer: Peer) -> None:
        """Give ``peer``'s next waiting handoff to a worker, or, with none waiting, read from it again.
        Called while no handoff of ``peer``'s is with a worker (it is not read from meanwhile)."""
        if not peer.waiting:
            self._resume(peer)
            return
        self._pause(peer)  # its next messages (and descriptors) stay in its socket until this one is answered
        byte_size, fd = peer.waiting.popleft()
        with self._lock:
            peer.busy = True
        try:
            self._workers.submit(self._handle, peer, byte_size, fd)
        except RuntimeError:  # the workers are shut down: the server is stopping
            _close_fd(fd)
            with self._lock:
                peer.busy = False
            self._disconnect(peer)

    def _handle(self, peer: Peer, byte_size: int, fd: int | None) -> None:
        """On a worker: ``handle`` the handoff and pass its answer (None: disconnect) to the thread."""
        answer = None
        try:
            if self._stopping.is_set() or peer.gone:  # nobody will read the answer: not adopted at all
                _close_fd(fd)
            else:
                answer = wire_memory.answer_frame(*self.handle(peer, byte_size, fd))
        except Exception:
            log.exception("shared memory: a handoff of pid %d failed; its connection is closed", peer.pid)
        with self._lock:
            peer.busy = False
            gone = peer.gone
            if not gone:
                self._answered.append((peer, answer))
        if not gone:
            self._wake_up()
            return
        try:  # it closed while this ran: only now may the registry drop what it handed over
            self.closed(peer)
        except Exception:  # a worker's future is never read: say so here
            log.exception("shared memory: dropping what pid %d handed over failed", peer.pid)

    def _deliver(self) -> None:
        """Send the answers the workers have ready, each connection's next handoff to a worker."""
        with self._lock:
            answered, self._answered = self._answered, collections.deque()
        for peer, answer in answered:
            if peer.gone:
                continue
            if answer is None or not self._send(peer, answer):
                self._disconnect(peer)
            else:
                self._next(peer)

    # -- connections ------------------------------------------------------------------------------

    def _pause(self, peer: Peer) -> None:
        if peer.reading:
            self._selector.unregister(peer.sock)
            peer.reading = False

    def _resume(self, peer: Peer) -> None:
        if not peer.reading:
            self._selector.register(peer.sock, selectors.EVENT_READ, peer)
            peer.reading = True

    def _violation(self, peer: Peer, what: str) -> None:
        self._turn_away(peer, wire_memory.INVALID_ARGUMENT, f"shared memory: {what}")

    def _turn_away(self, peer: Peer, status: int, text: str) -> None:
        """Answer ``peer`` with a refusal and close its connection."""
        log.info("shared memory: disconnected pid %d: %s", peer.pid, text)
        self._send(peer, wire_memory.answer_frame(status, text))
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
        peer.reading = False
        for fd in [*peer.fds, *(fd for _, fd in peer.waiting)]:
            _close_fd(fd)
        peer.fds.clear()
        peer.waiting.clear()
        peer.sock.close()
        with self._lock:
            peer.gone = True
            busy = peer.busy
        if not busy:  # else the worker tells ``closed`` once its ``handle`` returned
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
