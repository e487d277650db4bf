"""TCP mode: a plain byte relay, for speed; failover happens at connect time.

The client's bytes go to the backend and back untouched (HAProxy's ``mode
tcp``). A refused or timed-out connect marks the backend DOWN and the next
healthy backend is tried, so a new client never waits on a dead server; but
once connected, a backend that dies takes its client connection with it (the
client sees the close), as with any TCP proxy. Message mode is the one that
never loses a message.

How it is built: on raw non-blocking sockets in the balancer's epoll set
(``epollset.py``), like HAProxy, rather than on asyncio transports. With one
connection per message behind three echo servers that took it from 0.70-0.76x
HAProxy's rate to 0.9-1.0x here; on persistent connections both are at about
0.95x. No ``epoll_ctl`` but the two ``ADD`` calls per connection.

Flow control: a chunk the other side cannot take at once is kept (one chunk,
at most 64 KiB) and its source is not read until the writable edge has sent it;
bytes a client sends before its backend connection is up are kept up to
``EARLY_LIMIT``. So the balancer never buffers more than that per connection.
Half-closes are passed on (``shutdown(SHUT_WR)``), and a connection ends once
both directions have.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import TYPE_CHECKING

import _socket

from ..sockets import local_shortage, peer_name
from ..epollset import BUF, ERR, HANGUP, HUP, IN, OUT, EpollSet, connect_result, linger_close, os_error, start_connect
from .pool import Backend, connect_failure
from .relay_message import ERR_BUSY, ERR_NO_BACKEND

if TYPE_CHECKING:
    from .app import Balancer


EARLY_LIMIT = 256 * 1024
"""Bytes kept from a client before its backend connection is up; past this, reading pauses."""


def start_session(app: Balancer, sock: _socket.socket, peer: tuple) -> None:
    """A new client connection (the listener's ``on_accept`` in ``--mode tcp``)."""
    session = TcpSession(app, sock, peer)
    if not app.admit(session):
        session.refuse(ERR_BUSY)
        return
    app.events.watch(sock, session.on_client)
    session.connect_next()


class TcpSession:
    """One client connection and its backend connection."""

    __slots__ = ("events", "app", "elog", "csock", "bsock", "peer", "backend", "used", "tried", "attempts", "conn_id",
                 "connecting", "connect_started", "to_backend", "to_client", "client_eof", "backend_eof",
                 "client_paused", "closed", "bytes_in", "bytes_out", "seen_bytes", "last_activity")

    def __init__(self, app: Balancer, csock: _socket.socket, peer: tuple) -> None:
        self.events: EpollSet = app.events
        self.app = app
        self.elog = app.elog
        self.csock = csock
        self.bsock: _socket.socket | None = None
        self.peer = peer
        self.backend: Backend | None = None
        self.used: list[str] = []
        self.tried: list[Backend] = []  # the backends whose connect failed for it
        self.attempts = 0
        self.conn_id = 0
        self.connecting = False
        self.connect_started = 0.0  # while connecting: the sweep fails a connect that takes too long
        self.to_backend = b""  # read from the client, not yet written to the backend
        self.to_client = b""
        self.client_eof = False
        self.backend_eof = False
        self.client_paused = False  # stopped reading the client with bytes maybe left there
        self.closed = False
        self.bytes_in = 0  # from the client
        self.bytes_out = 0  # from the backend, for the client
        self.seen_bytes = 0
        self.last_activity = time.monotonic()

    # -- connecting, with failover ---------------------------------------------

    def connect_next(self) -> None:
        """Connect to a healthy backend not tried yet (one whose connect timed out
        may still be up: a client sent back to it ran out of tries while another
        backend was never tried, and got ERR no-backend)."""
        pool = self.app.pool
        while self.attempts < len(pool.backends):
            backend = pool.choose(self.tried)
            if backend is None:
                break
            self.attempts += 1
            self.used.append(backend.name)
            try:
                sock, code = start_connect(backend.address)  # type: ignore[arg-type]
            except OSError as exc:
                self.busy(exc)
                return
            if sock is None:
                if not self.connect_failed(backend, os_error(code)):
                    return
                self.tried.append(backend)
                continue
            self.backend = backend
            backend.active += 1  # from now, as HAProxy counts: a burst of connects spreads under leastconn
            self.bsock = sock
            self.connecting = True
            self.connect_started = time.monotonic()
            self.events.watch(sock, self.on_backend)  # writable when connected; ERR|HUP when refused
            return
        self.app.no_backend_errors += 1
        self.app.no_backend_said.count()
        self.refuse(ERR_NO_BACKEND)

    def connect_failed(self, backend: Backend, exc: OSError) -> bool:
        """Count a failed connect; False when the failure is ours (out of
        descriptors or memory here), which ends the session with ``ERR busy``."""
        if local_shortage(exc):
            self.busy(exc)
            return False
        if isinstance(exc, TimeoutError):  # no proof of a dead backend: counted (pool.py), not DOWN at once
            self.app.connect_timed_out(backend, self.conn_id)
        else:
            self.app.pool.traffic_error(backend, connect_failure(exc))
        return True

    def busy(self, exc: OSError) -> None:
        if self.elog.warning:
            self.elog.line("WARNING", f"event=busy conn={self.conn_id} reason={connect_failure(exc)}")
        self.refuse(ERR_BUSY)

    def retry(self, exc: OSError) -> None:
        """The backend connection failed before it was up: try the next backend."""
        backend = self.backend
        backend.active -= 1  # type: ignore[union-attr]
        self.events.drop(self.bsock)  # type: ignore[arg-type]
        self.bsock = None
        self.backend = None
        self.connecting = False
        if self.connect_failed(backend, exc):  # type: ignore[arg-type]
            self.tried.append(backend)  # type: ignore[arg-type]
            self.connect_next()

    def connected(self) -> None:
        self.connecting = False
        self.backend.connections += 1  # type: ignore[union-attr]
        self.app.pool.connected(self.backend)  # type: ignore[arg-type]
        if self.to_backend:
            self.flush_to_backend()
        elif self.client_eof:
            self.shut_backend()

    # -- events ------------------------------------------------------------------

    def on_client(self, ev: int) -> None:
        if ev & OUT and self.to_client:
            self.flush_to_client()
        if ev & (IN | HANGUP) and not self.closed:
            self.read_client(ev & HANGUP)

    def on_backend(self, ev: int) -> None:
        if self.connecting:
            if ev & (ERR | HUP):
                self.retry(connect_result(self.bsock))  # type: ignore[arg-type]
                return
            if not ev & OUT:
                return
            self.connected()
            if self.closed:
                return
        if ev & OUT and self.to_backend:
            self.flush_to_backend()
        if ev & (IN | HANGUP) and not self.closed:
            self.read_backend(ev & HANGUP)

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
            self.bytes_out += len(data)
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
        """Answer ``line`` and close, lingering: what the client sends before or after
        is read and dropped (``linger_close``), as a close with unread bytes resets
        the connection and the reset could destroy the answer before it is read."""
        try:
            self.csock.send(line)
        except OSError:
            pass  # gone already: linger_close finds that out and closes
        self.end(linger=True)

    def end(self, linger: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        events = self.events
        if linger and not self.client_eof:
            linger_close(events, self.csock)
        else:
            events.drop(self.csock)
        if self.bsock is not None:
            events.drop(self.bsock)
        backend = self.backend
        if backend is not None:
            backend.active -= 1
            backend.bytes_in += self.bytes_in
            backend.bytes_out += self.bytes_out
        admitted = self in self.app.connections
        self.app.connections.discard(self)
        if self.elog.info and admitted:
            self.elog.line("INFO", f"event=session conn={self.conn_id} peer={peer_name(self.peer)} mode=tcp "
                                   f"backends={','.join(self.used) or '-'} bytes_in={self.bytes_in} "
                                   f"bytes_out={self.bytes_out}")

    # -- the balancer's sweeps -----------------------------------------------------

    def check_response_timeout(self, now: float, timeout: float) -> None:
        # A byte relay does not know where messages end; only the connect has a deadline.
        if self.connecting and now - self.connect_started > self.app.config.connect_timeout:
            self.retry(TimeoutError(errno.ETIMEDOUT, "connect timed out"))

    def note_activity(self, now: float) -> float:
        """The last time bytes moved, either way."""
        seen = self.bytes_in + self.bytes_out
        if seen != self.seen_bytes:
            self.seen_bytes = seen
            self.last_activity = now
        return self.last_activity

    def idle(self) -> bool:
        """Nothing held here on its way: a graceful stop may close it once quiet
        (a client still to take its answers is not idle, however quiet)."""
        return not (self.to_client or self.to_backend or self.connecting)

    def close_idle(self) -> None:
        """Nothing moved either way for the idle timeout. No ERR line: it would land
        in the middle of someone's byte stream."""
        if self.idle():  # nothing either way: an info line, as message mode's
            if self.elog.info:
                self.elog.line("INFO", f"event=error conn={self.conn_id} code=idle-timeout")
        elif self.elog.warning:  # bytes held for a peer that takes none
            self.elog.line("WARNING", f"event=error conn={self.conn_id} code=send-timeout")
        self.end()

    def close(self) -> None:
        self.end()

    drained = close  # (a graceful stop's quiet client: a byte relay has no line begun to speak of)

    def wind_up(self) -> None:
        """A graceful stop's deadline: a byte relay knows no message to finish."""
        self.end()

    give_up = wind_up  # (the wind-up's end: no message to answer either)

    def abort(self) -> None:
        self.end()
