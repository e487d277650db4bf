"""TCP mode: a plain byte relay, for speed; failover happens at connect time.

The client's bytes go to the backend and back untouched (HAProxy's ``mode
tcp``). A refused or timed-out connect marks the backend DOWN and the next
healthy backend is tried, so a new client never waits on a dead server; but
once connected, a backend that dies takes its client connection with it (the
client sees the close), as with any TCP proxy. Message mode is the one that
never loses a message.

How it is built: on raw non-blocking sockets in an epoll set of its own, which
the event loop watches as one descriptor (``add_reader`` on the epoll
descriptor), the way HAProxy and nginx relay. Message mode uses asyncio
transports; here they cost more than the relay itself: per connection a
transport and protocol on each side, a connect task, and uvloop's extra
system calls (``getsockname`` and ``getpeername`` on both sockets, epoll
changes as reading pauses). Measured here, one connection per message behind
three echo servers, against HAProxy in the same run: transports 0.70-0.76x,
this design 0.99-1.0x; on persistent connections both about 0.94x.

Each socket is registered once, edge-triggered, for reading and writing, and
never modified: no ``epoll_ctl`` but the two ``ADD`` calls per connection
(closing a socket takes it out). Edge-triggered means a socket is read until it
is empty: a read shorter than the buffer is the sign (a later arrival brings a
new edge), or ``EPOLLRDHUP`` says the peer's FIN is queued behind the data.

Flow control: a chunk the other side cannot take at once is kept (one chunk,
at most 64 KiB) and its source is not read until the writable edge has sent it;
bytes a client sends before its backend connection is up are kept up to
``EARLY_LIMIT``. So the balancer never buffers more than that per connection.
Half-closes are passed on (``shutdown(SHUT_WR)``), and a connection ends once
both directions have.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import _socket

from ..config import ConfigError
from ..sockets import local_shortage
from .pool import Backend, connect_failure
from .relay_message import ERR_BUSY, ERR_NO_BACKEND

if TYPE_CHECKING:
    from .app import Balancer


BUF = 65536
EARLY_LIMIT = 256 * 1024
"""Bytes kept from a client before its backend connection is up; past this, reading pauses."""
ACCEPT_BATCH = 64
"""Connections accepted per readiness event; more wait for the next turn of the loop."""
ACCEPT_PAUSE = 0.1
"""Seconds the listener rests when no descriptor is left to accept with."""

IN, OUT, RDHUP, ERR, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP, select.EPOLLERR, select.EPOLLHUP
WATCH = IN | OUT | RDHUP | select.EPOLLET


class TcpRelay:
    """The listener and every relayed connection, in one epoll set."""

    def __init__(self, app: Balancer) -> None:
        self.app = app
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.gone: set[int] = set()  # descriptors closed during this batch of events
        self.addresses: dict[Backend, tuple[int, tuple]] = {}
        self.sockets: list[socket.socket] = []  # the listener (as asyncio's Server names it)
        self.accepting = False

    def listen(self, host: str, port: int, backlog: int) -> TcpRelay:
        for b in self.app.pool.backends:
            self.addresses[b] = resolve(b)
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sockets = [sock]
        self.handlers[sock.fileno()] = self._accept
        self.ep.register(sock.fileno(), IN)
        self.accepting = True
        self.app.loop.add_reader(self.ep.fileno(), self._ready)
        return self

    def close(self) -> None:
        """Stop accepting (connections go on)."""
        for sock in self.sockets:
            self.handlers.pop(sock.fileno(), None)
            sock.close()
        self.sockets = []
        self.accepting = False

    def _ready(self) -> None:
        handlers, gone = self.handlers, self.gone
        gone.clear()  # (closes between batches, by the sweeps, have no events in this one)
        for fd, ev in self.ep.poll(0, 64):
            if fd in gone:  # closed by an earlier event of this batch, its number maybe reused since
                continue
            handler = handlers.get(fd)
            if handler is not None:
                handler(ev)

    def _accept(self, ev: int) -> None:
        app = self.app
        listener = self.sockets[0]
        accept = listener._accept  # type: ignore[attr-defined]  # the descriptor alone: no socket.socket
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if local_shortage(exc):  # the queue stays full: rest rather than spin on it
                    self.ep.unregister(listener.fileno())
                    app.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
                return
            sock = _socket.socket(fileno=fd)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers go out as they come
            session = TcpSession(self, sock, peer)
            if not app.admit(session):
                session.refuse(ERR_BUSY)
                continue
            self.watch(sock, session.on_client)
            session.connect_next()

    def _resume_accepting(self) -> None:
        if self.accepting:
            self.ep.register(self.sockets[0].fileno(), IN)

    def watch(self, sock: _socket.socket, handler: Callable[[int], None]) -> None:
        fd = sock.fileno()
        self.handlers[fd] = handler
        self.ep.register(fd, WATCH)

    def drop(self, sock: _socket.socket) -> None:
        fd = sock.fileno()
        if self.handlers.pop(fd, None) is not None:
            self.gone.add(fd)
        sock.close()  # also takes it out of the epoll set


def resolve(backend: Backend) -> tuple[int, tuple]:
    """The backend's address, looked up once, at start (as HAProxy does without a
    resolvers section). A name with both kinds of address gets its IPv4 one:
    ``localhost`` may list ``::1`` first, and the servers listen on 127.0.0.1."""
    try:
        found = socket.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"backend {backend.name}: cannot resolve {backend.host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = min(found, key=lambda a: a[0] != socket.AF_INET)
    return family, sockaddr


class TcpSession:
    """One client connection and its backend connection."""

    __slots__ = ("relay", "app", "elog", "csock", "bsock", "peer", "backend", "used", "attempts", "conn_id",
                 "connecting", "connect_started", "to_backend", "to_client", "client_eof", "backend_eof",
                 "client_paused", "closed", "bytes_in", "seen_bytes", "last_activity")

    def __init__(self, relay: TcpRelay, csock: _socket.socket, peer: tuple) -> None:
        self.relay = relay
        self.app = relay.app
        self.elog = relay.app.elog
        self.csock = csock
        self.bsock: _socket.socket | None = None
        self.peer = peer
        self.backend: Backend | None = None
        self.used: list[str] = []
        self.attempts = 0
        self.conn_id = 0
        self.connecting = False
        self.connect_started = 0.0  # the sweep fails a connect that takes too long
        self.to_backend = b""  # read from the client, not yet written to the backend
        self.to_client = b""
        self.client_eof = False
        self.backend_eof = False
        self.client_paused = False  # stopped reading the client with bytes maybe left there
        self.closed = False
        self.bytes_in = 0
        self.seen_bytes = 0
        self.last_activity = time.monotonic()

    # -- connecting, with failover ---------------------------------------------

    def connect_next(self) -> None:
        pool = self.app.pool
        while self.attempts < len(pool.backends):
            backend = pool.choose()
            if backend is None:
                break
            self.attempts += 1
            self.used.append(backend.name)
            family, sockaddr = self.relay.addresses[backend]
            try:
                sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:
                self.busy(exc)
                return
            code = sock.connect_ex(sockaddr)
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                if not self.connect_failed(backend, OSError(code, errno.errorcode.get(code, "error"))):
                    return
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.backend = backend
            self.bsock = sock
            self.connecting = True
            self.connect_started = time.monotonic()
            self.relay.watch(sock, self.on_backend)  # writable when connected; ERR|HUP when refused
            return
        self.app.no_backend_errors += 1
        self.refuse(ERR_NO_BACKEND)

    def connect_failed(self, backend: Backend, exc: OSError) -> bool:
        """Count a failed connect; False when the failure is ours (out of
        descriptors or memory here), which ends the session with ``ERR busy``."""
        if local_shortage(exc):
            self.busy(exc)
            return False
        self.app.pool.traffic_error(backend, connect_failure(exc))
        return True

    def busy(self, exc: OSError) -> None:
        if self.elog.warning:
            self.elog.line("WARNING", f"event=busy conn={self.conn_id} reason={connect_failure(exc)}")
        self.refuse(ERR_BUSY)

    def retry(self, exc: OSError) -> None:
        """The backend connection failed before it was up: try the next backend."""
        backend = self.backend
        self.relay.drop(self.bsock)  # type: ignore[arg-type]
        self.bsock = None
        self.backend = None
        self.connecting = False
        self.connect_started = 0.0
        if self.connect_failed(backend, exc):  # type: ignore[arg-type]
            self.connect_next()

    def connected(self) -> None:
        self.connecting = False
        self.connect_started = 0.0
        backend = self.backend
        backend.active += 1  # type: ignore[union-attr]
        backend.connections += 1  # type: ignore[union-attr]
        if self.to_backend:
            self.flush_to_backend()
        elif self.client_eof:
            self.shut_backend()

    # -- events ------------------------------------------------------------------

    def on_client(self, ev: int) -> None:
        if ev & OUT and self.to_client:
            self.flush_to_client()
        if ev & (IN | RDHUP | ERR | HUP) and not self.closed:
            self.read_client(ev & (RDHUP | ERR | HUP))

    def on_backend(self, ev: int) -> None:
        if self.connecting:
            if ev & (ERR | HUP):
                code = self.bsock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
                self.retry(OSError(code, errno.errorcode.get(code, "error")) if code
                           else ConnectionResetError(errno.ECONNRESET, "reset"))
                return
            if not ev & OUT:
                return
            self.connected()
            if self.closed:
                return
        if ev & OUT and self.to_backend:
            self.flush_to_backend()
        if ev & (IN | RDHUP | ERR | HUP) and not self.closed:
            self.read_backend(ev & (RDHUP | ERR | HUP))

    # -- client to backend -------------------------------------------------------

    def send(self, sock: _socket.socket, data: bytes) -> bytes | None:
        """Write what the socket takes now: the rest (empty when all went), or
        None when the connection failed and the session has ended."""
        try:
            sent = sock.send(data)
        except BlockingIOError:
            return data
        except OSError:
            self.end()
            return None
        return data[sent:]

    def read_client(self, hangup: int = 0) -> None:
        """Read until the client's socket is empty, or the backend cannot take more."""
        csock = self.csock
        self.client_paused = False
        while not self.client_eof:
            if self.to_backend and (not self.connecting or len(self.to_backend) > EARLY_LIMIT):
                self.client_paused = True  # the backend's writable edge resumes it
                return
            try:
                data = csock.recv(BUF)
            except BlockingIOError:
                return
            except OSError:
                self.end()
                return
            if not data:
                self.client_eof = True
                if not self.connecting and not self.to_backend:
                    self.shut_backend()
                return
            self.bytes_in += len(data)
            if self.connecting or self.to_backend:
                self.to_backend += data
            else:
                rest = self.send(self.bsock, data)  # type: ignore[arg-type]
                if rest is None:
                    return
                if rest:
                    self.to_backend = rest
                    self.client_paused = True
                    return
            if len(data) < BUF and not hangup:
                return  # empty now: a later arrival brings a new edge

    def flush_to_backend(self) -> None:
        rest = self.send(self.bsock, self.to_backend)  # type: ignore[arg-type]
        if rest is None:
            return
        self.to_backend = rest
        if rest:
            return
        if self.client_eof:
            self.shut_backend()
        elif self.client_paused:
            self.read_client(1)  # what waits there brings no new edge

    def shut_backend(self) -> None:
        """The client is done sending: pass the half-close on, or end if both are done."""
        if self.backend_eof and not self.to_client:
            self.end()
            return
        try:
            self.bsock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        except OSError:
            self.end()

    # -- backend to client -------------------------------------------------------

    def read_backend(self, hangup: int = 0) -> None:
        bsock = self.bsock
        while not self.backend_eof and not self.to_client:
            try:
                data = bsock.recv(BUF)  # type: ignore[union-attr]
            except BlockingIOError:
                return
            except OSError:  # reset by the backend: the client sees its connection close
                self.end()
                return
            if not data:
                self.backend_eof = True
                self.shut_client()
                return
            rest = self.send(self.csock, data)
            if rest is None:
                return
            if rest:
                self.to_client = rest
                return
            if len(data) < BUF and not hangup:
                return

    def flush_to_client(self) -> None:
        rest = self.send(self.csock, self.to_client)
        if rest is None:
            return
        self.to_client = rest
        if rest:
            return
        if self.backend_eof:
            self.shut_client()
        elif self.bsock is not None:
            self.read_backend(1)

    def shut_client(self) -> None:
        if self.to_client:
            return  # after the flush
        if self.client_eof:
            self.end()
            return
        try:
            self.csock.shutdown(socket.SHUT_WR)
        except OSError:
            self.end()

    # -- the end -----------------------------------------------------------------

    def refuse(self, line: bytes) -> None:
        """Answer ``line`` and close. What the client already sent is read first:
        closing a socket with unread bytes resets the connection, and the reset
        could destroy the answer before the client reads it."""
        try:
            self.csock.send(line)
            self.csock.recv(BUF)
        except OSError:
            pass
        self.end()

    def end(self) -> None:
        if self.closed:
            return
        self.closed = True
        relay = self.relay
        relay.drop(self.csock)
        if self.bsock is not None:
            relay.drop(self.bsock)
        if self.backend is not None and not self.connecting:
            self.backend.active -= 1
        admitted = self in self.app.connections
        self.app.connections.discard(self)
        if self.elog.info and admitted:
            peer = f"{self.peer[0]}:{self.peer[1]}" if self.peer else "-"
            self.elog.line("INFO", f"event=session conn={self.conn_id} peer={peer} mode=tcp "
                                   f"backends={','.join(self.used) or '-'} bytes_in={self.bytes_in}")

    # -- the balancer's sweeps -----------------------------------------------------

    def check_response_timeout(self, now: float, timeout: float) -> None:
        # A byte relay does not know where messages end; only the connect has a deadline.
        if self.connecting and now - self.connect_started > self.app.config.connect_timeout:
            self.retry(TimeoutError(errno.ETIMEDOUT, "connect timed out"))

    def note_activity(self, now: float) -> float:
        if self.bytes_in != self.seen_bytes:
            self.seen_bytes = self.bytes_in
            self.last_activity = now
        return self.last_activity

    def idle(self) -> bool:
        return True

    def close_idle(self) -> None:
        self.end()  # no ERR line: it would land in the middle of someone's byte stream

    def close(self) -> None:
        self.end()

    def abort(self) -> None:
        self.end()
