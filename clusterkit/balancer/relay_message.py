"""Message mode: the balancer reads client lines, forwards them to a backend and
relays each reply pair as one unit, failing over without losing a message.

How it works. Each client connection has one backend connection and a queue
(``pending``) of the messages forwarded to it that have no complete reply yet.
Backend bytes are cut at the end of the last complete answer
(``match_answers``: a ``REPLY`` line echoing the pending message, with its
``ACK``, or an ``ERR`` line) and written to the client in one piece; as many
messages leave the queue. An answer to another message (a backend answering
twice) or off the protocol is a broken backend's; a server's notice about its
connection (``ERR idle-timeout``) is nobody's answer: the message goes again.
When the backend dies (EOF, reset) or leaves the oldest message
unanswered past the response timeout (checked by the balancer's sweep, not by
a timer per message), its connection is dropped with any half reply it sent,
the backend is marked DOWN, and every pending message is sent again, in order,
to another healthy backend. So the client sees each message answered exactly
once and in order; a backend may see a message twice.

The backend connection outlives its client when it is clean: it waits in the
balancer's idle pool for the next client sent to that backend (``reuse.py``,
``--keepalive``), which takes it instead of connecting.

With no healthy backend, each pending and each new message gets
``ERR no-backend`` at once; the next message tries again, so service comes
back by itself when a health check brings a backend UP.

Client connection states::

    attached ──(backend lost, pending)──► connecting ──(connected)──► attached
    attached ──(backend lost, idle)─────► detached ──(next message)──► connecting
    connecting ──(no healthy backend)───► detached (pending answered ERR no-backend)
    any ──(client EOF, nothing pending)─► closed

Flow control: the client is not read while its unanswered messages pass
``max_pending_bytes`` or the backend's socket is full; the backend is not read
while the client's socket is full.

I/O: both sides are raw sockets in the balancer's epoll set (``epollset.py``):
the client's behind a small transport (``SocketTransport``) that drives
``ClientSide`` as an asyncio protocol, the backend's a ``BackendSide``,
connected without a task. Per connection that costs about half the CPU of
uvloop's transports and a ``create_connection`` task.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import deque
from collections.abc import Collection
from typing import TYPE_CHECKING

import _socket

from ..protocol import (CONNECTION_NOTICES, MORE, NOTICE, OFF, LineFramer, SlowLineWatch, build_error,
                        match_answers, message_lines)
from ..sockets import local_shortage, peer_name
from ..epollset import ERR, HUP, OUT, EpollSet, SocketTransport, Stream, connect_result, os_error, start_connect
from .pool import Backend, connect_failure

if TYPE_CHECKING:
    from .app import Balancer

ERR_NO_BACKEND = build_error("no-backend")
ERR_BUSY = build_error("busy")
ERR_SHUTTING_DOWN = build_error("shutting-down")
ERR_LINE_TOO_LONG = build_error("line-too-long")
ERR_INCOMPLETE_LINE = build_error("incomplete-line")
ERR_LINE_TIMEOUT = build_error("line-timeout")
ERR_IDLE = build_error("idle-timeout")
KNOWN_MAX = 1024
"""The longest answer a client's last lone message keeps for the glance in
``backend_data`` (a load tool's messages are short; a copy of a 64 KiB line's
answer per idle client would add up)."""
MAX_PATIENCE = 16
"""The most response timeouts a client's messages wait on a backend after failovers
in a row (``ClientSide.patience``): 2 s, 4 s, 8 s, 16 s, 32 s by default."""
ALL_DOWN_STALL = 0.5
"""Seconds a client's messages may wait on a backend that gives nothing, when no
backend is healthy, before they get ``ERR no-backend`` (``check_response_timeout``;
SPEC.md: quickly, with no backend healthy), whatever ``--response-timeout`` says.
A backend the checks took down that still answers faster keeps its clients."""
MESSAGE_COST = 64
"""Bytes a pending message costs the balancer beyond its own (the bytes object and
its place in the queue), counted against ``max_pending_bytes``: counted by their
length alone, a client's 2-byte messages held 75 MB per connection under the
4 MiB limit."""


def is_notice(stray: bytes) -> bool:
    """Whether bytes a backend sent with nothing due are a notice about the
    connection (its idle close, its stop, busy), or the start of one."""
    first = stray.split(b"\n", 1)[0]
    return first in CONNECTION_NOTICES or (b"\n" not in stray and any(n.startswith(first) for n in CONNECTION_NOTICES))


def unasked_answer(app: Balancer, backend: Backend, conn_id: int | str) -> None:
    """A backend answered what nobody asked (a second copy of an answer): broken."""
    if app.elog.warning:
        app.elog.line("WARNING", f"event=error conn={conn_id} code=unasked-answer backend={backend.name}")
    app.pool.traffic_error(backend, "bad-reply")


class BackendSide(Stream):
    """The balancer's connection to one backend, on behalf of one client: past
    ``write_high_water`` unsent, the client is not read; it is again at a
    quarter. The client writes only once it is connected (``backend_connected``).
    Between two clients it may wait in the balancer's ``IdlePool`` (``client``
    None): anything the server sends or does then closes it."""

    def __init__(self, client: ClientSide, backend: Backend, events: EpollSet, sock: _socket.socket,
                 attempts: int) -> None:
        super().__init__(events, sock, client.config.write_high_water)
        self.client = client
        self.app = client.app
        self.backend = backend
        self.attempts = attempts  # backends tried before this one, for this connect
        self.connecting = True
        self.fresh = True  # nothing read from it yet (for this client)
        self.reused = False  # it served an earlier client
        self.served = 0  # answers relayed from it (to any client): it has been idle between messages
        self.waited = False  # connected before its client had a message for it: it has been idle too

    def on_event(self, ev: int) -> None:
        if self.connecting:
            if ev & (ERR | HUP):
                self.connect_failed(connect_result(self.sock))
                return
            if not ev & OUT:
                return
            self.connecting = False
            self.client.backend_connected(self)
            if self.closed:
                return
        super().on_event(ev)

    def connect_failed(self, exc: OSError) -> None:
        self.drop()
        self.client.backend_connect_failed(self, exc)

    def received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # idle: the server's idle notice, or worse; no client's answer
            self.drop()
            if not is_notice(data):  # (a copy of the last answer that came after its client left)
                unasked_answer(self.app, self.backend, "-")
            return
        self.fresh = False  # (a notice about the connection, first or later: ClientSide.backend_notice)
        client.backend_data(data)

    def ended(self) -> None:
        self.drop()
        if self.client is not None:
            self.client.backend_lost(self, "closed")

    def failed(self, exc: OSError) -> None:
        # The failover comes soon, not inside the caller (a write may be ClientSide's own).
        self.drop()
        if self.client is not None:
            self.events.loop.call_soon(self.client.backend_lost, self, "reset")

    def set_full(self, full: bool) -> None:
        if self.client is not None:
            self.client.set_paused("backend-full", full)

    abort = Stream.drop


class ClientSide(asyncio.Protocol):
    """One client connection in message mode."""

    __slots__ = ("app", "config", "elog", "framer", "transport", "conn_id", "backend", "backend_conn",
                 "connecting", "pending", "known", "pending_bytes", "inbuf", "used", "tried", "paused",
                 "client_full", "eof", "closed", "rejected", "error_after_pending", "answered", "failovers",
                 "no_backend_errors", "bytes_in", "seen_bytes", "last_activity", "burst_start", "sweep_answered",
                 "stall_since", "connect_side", "connect_started", "lines", "line_watch", "patience")

    def __init__(self, app: Balancer) -> None:
        self.app = app
        self.config = app.config
        self.elog = app.elog
        self.framer = LineFramer(app.config.max_line)
        self.transport: asyncio.Transport | None = None
        self.conn_id = 0
        self.backend: Backend | None = None
        self.backend_conn: BackendSide | None = None
        self.connecting = False
        self.pending: deque[bytes] = deque()
        self.known: tuple = (None, b"", b"")  # the last lone message, its connection and its whole answer
        self.pending_bytes = 0
        self.inbuf = bytearray()
        self.used: list[str] = []
        self.tried: list[Backend] = []  # the backends the current connect's tries failed on
        self.paused: set[str] = set()
        self.client_full = False
        self.eof = False
        self.closed = False
        self.rejected = False
        self.error_after_pending: bytes | None = None  # the ERR line that ends the session once all is answered
        self.lines = 0  # messages received
        self.line_watch = SlowLineWatch()
        self.answered = 0
        self.failovers = 0
        self.no_backend_errors = 0
        self.bytes_in = 0
        self.seen_bytes = 0
        self.last_activity = time.monotonic()
        self.burst_start: float | None = None
        # for the response-timeout sweep
        self.sweep_answered = 0
        self.stall_since: float | None = None
        self.patience = 1  # response timeouts the next backend gets: doubled at each one, 1 after an answer
        self.connect_side: BackendSide | None = None  # the connect under way
        self.connect_started = 0.0

    # -- client side ----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        app = self.app
        self.transport = transport
        if not app.admit(self):
            transport.write(ERR_BUSY)
            transport.close()
            self.rejected = True
            return
        high = self.config.write_high_water
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self.attach()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        framer = self.framer
        aligned = framer.buffered == 0
        messages = framer.feed(data)
        if messages:
            self.lines += len(messages)
            if self.backend_conn is None and not self.connecting:
                self.attach()
            if self.backend_conn is None and not self.connecting:
                self.answer_no_backend(len(messages))
            else:
                if not self.pending:
                    self.burst_start = time.monotonic()
                self.pending.extend(messages)
                whole = aligned and framer.buffered == 0 and framer.error is None
                out = data if whole else message_lines(messages)
                self.pending_bytes += len(out) + MESSAGE_COST * len(messages)
                conn = self.backend_conn
                if conn is not None and not self.connecting:
                    conn.write(out)
                if self.pending_bytes > self.config.max_pending_bytes:
                    self.set_paused("pending", True)
        if framer.error is not None and self.error_after_pending is None:
            self.error_after_pending = ERR_LINE_TOO_LONG
            if self.elog.info:  # (as the servers say theirs: the client's doing, answered)
                self.elog.line("INFO", f"event=error conn={self.conn_id} code=line-too-long")
            self.transport.pause_reading()  # type: ignore[union-attr]
            if not self.pending:
                self.finish_with(ERR_LINE_TOO_LONG)

    def eof_received(self) -> bool:
        self.eof = True
        if self.framer.buffered and self.error_after_pending is None:
            # Bytes after the last '\n' are no message (SPEC.md); say so after the
            # answers still due rather than drop them in silence, as the servers do.
            self.error_after_pending = ERR_INCOMPLETE_LINE
            if self.elog.info:  # (as the servers say theirs: the client's doing, answered)
                self.elog.line("INFO", f"event=error conn={self.conn_id} code=incomplete-line")
        if not self.pending and not self.connecting:
            self.settle()
        return True  # keep the write side open for the replies still due

    def pause_writing(self) -> None:
        # The client takes its answers no faster than this: neither the backend nor the
        # client is read meanwhile (the answers the balancer itself gives, ERR no-backend,
        # would pile up without end for a client that sends and never reads).
        self.client_full = True
        self.set_paused("client-full", True)
        conn = self.backend_conn
        if conn is not None:
            conn.pause_reading()

    def resume_writing(self) -> None:
        self.client_full = False
        self.set_paused("client-full", False)
        self.stall_since = None  # the backend is read again: its silence counts from now
        conn = self.backend_conn
        if conn is not None:
            conn.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rejected:
            return
        self.closed = True
        self.app.connections.discard(self)
        if self.connect_side is not None:  # a connect under way: given up
            self.connect_side.abort()
            self.connect_side = None
            self.connect_started = 0.0
            self.connecting = False
        self.keep_or_drop_backend()
        if self.elog.info:
            self.elog.line("INFO", f"event=session conn={self.conn_id} peer={_peer(self.transport)} "
                                   f"backends={','.join(self.used) or '-'} messages={self.answered} "
                                   f"failovers={self.failovers} no_backend={self.no_backend_errors}")

    def set_paused(self, reason: str, on: bool) -> None:
        if self.transport is None or self.closed:
            return
        before = bool(self.paused)
        if on:
            self.paused.add(reason)
        else:
            self.paused.discard(reason)
        if before != bool(self.paused) and self.error_after_pending is None:
            if self.paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    def finish_with(self, line: bytes) -> None:
        self.transport.write(line)  # type: ignore[union-attr]
        self.close()

    def settle(self) -> None:
        """Nothing is pending: end the session if it is over, with the ERR line due
        (line too long or too slow, an incomplete last line) or after the client's EOF."""
        if self.error_after_pending is not None:
            self.finish_with(self.error_after_pending)
        elif self.eof:
            self.close()

    def refuse_busy(self, reason: str) -> None:
        """The balancer itself cannot serve this client now: ``ERR busy`` for each
        message waiting (in place of its answer), then the close."""
        if self.closed:
            return
        count = max(1, len(self.pending))
        self.pending.clear()
        self.pending_bytes = 0
        if self.elog.warning:
            self.elog.line("WARNING", f"event=busy conn={self.conn_id} messages={count} reason={reason}")
        self.finish_with(ERR_BUSY * count)

    # -- choosing and connecting a backend -----------------------------------

    def attach(self, attempts: int = 0, exclude: Collection[Backend] = (), again: Backend | None = None) -> bool:
        """Pick a healthy backend (not one of ``exclude``) and take an idle connection to it
        or start connecting; False when none is healthy. ``again``: that backend once
        more, on a new connection (its reused one was stale)."""
        backend = again or self.app.pool.choose(exclude)
        if backend is None:
            return False
        self.backend = backend
        backend.active += 1
        if not self.used or self.used[-1] != backend.name:
            self.used.append(backend.name)
        if again is None:
            backend.connections += 1
            side = self.app.idle.take(backend)
            if side is not None:
                backend.reused += 1
                self.use_idle(side, attempts)
                return True
        self.connecting = True
        self.connect_started = time.monotonic()  # the sweep gives up a connect that takes too long
        try:
            sock, code = start_connect(backend.address)  # type: ignore[arg-type]
        except OSError as exc:  # no socket to be had: out of descriptors or memory
            sock, code = None, exc.errno or errno.EMFILE
        if sock is None:
            # Failed at once (refused, on loopback): handled soon, not inside the caller,
            # as a failure reported by epoll is.
            self.app.loop.call_soon(self.backend_connect_failed, None, os_error(code), attempts)
            return True
        side = BackendSide(self, backend, self.app.events, sock, attempts)
        self.connect_side = side
        self.app.events.watch(sock, side.on_event)
        return True

    def backend_connect_failed(self, side: BackendSide | None, exc: OSError, attempts: int = 0) -> None:
        if side is not None:
            if side is not self.connect_side:
                return
            attempts = side.attempts
        self.connect_side = None
        self.connect_started = 0.0
        if self.closed:
            return  # connection_lost released the backend
        backend = self.backend
        self.release_backend()
        self.connecting = False
        if local_shortage(exc):
            # Out of descriptors here: not the backend's fault; this client is told busy.
            self.refuse_busy(connect_failure(exc))
            return
        if isinstance(exc, TimeoutError):  # no proof of a dead backend: counted (pool.py), not DOWN at once
            self.app.connect_timed_out(backend, self.conn_id)  # type: ignore[arg-type]
        else:
            self.app.pool.traffic_error(backend, connect_failure(exc))  # type: ignore[arg-type]
        # (Not a backend tried already: one that timed out may still be up, and a client
        # sent back to it ran out of tries while another backend was never tried.)
        if attempts + 1 < len(self.app.pool.backends) and self.attach(attempts + 1, self.tried_also(backend, attempts)):
            return
        self.answer_no_backend(0)

    def tried_also(self, backend: Backend, attempts: int) -> list[Backend]:
        """The backends this connect's tries have failed on, ``backend`` the last
        (``attempts``: the tries before it; 0 starts a new list)."""
        self.tried = (self.tried if attempts else []) + [backend]
        return self.tried

    def backend_connected(self, side: BackendSide) -> None:
        self.connect_side = None
        self.connect_started = 0.0
        self.connecting = False
        self.app.pool.connected(side.backend)
        if self.closed or self.backend is not side.backend:
            side.abort()
            return
        self.backend_conn = side
        self.stall_since = None  # (a new backend's --response-timeout counts from now, not from the last one's)
        if self.client_full:
            side.pause_reading()
        if self.pending:
            # First connection, or a failover: (re)send everything unanswered, in order.
            side.write(message_lines(self.pending))
        else:
            side.waited = True
            self.settle()

    def use_idle(self, side: BackendSide, attempts: int) -> None:
        """Carry on with an idle connection from the pool, as if just connected."""
        side.client = self
        side.fresh = side.reused = True
        side.attempts = attempts
        self.backend_conn = side
        self.stall_since = None  # (as in backend_connected)
        if self.client_full:
            side.pause_reading()
        if self.pending:  # a failover: (re)send everything unanswered, in order
            side.write(message_lines(self.pending))

    def keep_or_drop_backend(self) -> None:
        """The client is gone: its backend connection goes to the idle pool when
        clean (every message answered, nothing half read or unsent), else closed."""
        conn = self.backend_conn
        # (a connection whose EOF was read is closed already: Stream.read, BackendSide.ended)
        if (conn is not None and not self.pending and not self.inbuf and not conn.out and not conn.read_paused
                and not conn.closed and conn.backend.healthy and not self.app.stopping and self.app.idle.put(conn)):
            conn.client = None
            self.backend_conn = None
        self.drop_backend()

    def release_backend(self) -> None:
        if self.backend is not None:
            self.backend.active -= 1
            self.backend = None

    def drop_backend(self) -> None:
        conn = self.backend_conn
        self.backend_conn = None
        self.inbuf.clear()
        if conn is not None:
            conn.abort()
        self.release_backend()

    # -- backend side -----------------------------------------------------------

    def backend_data(self, data: bytes) -> None:
        buf = self.inbuf
        pending = self.pending
        known = self.known
        if not buf and len(pending) == 1 and known[0] is self.backend_conn and data == known[2] \
                and pending[0] == known[1]:
            # The one message pending is the last one again, and this is, byte for byte, its
            # answer from this connection's server (a client repeating its message, as load
            # tools do): matched already.
            n, end, why, view, notice = 1, len(data), MORE, data, b""
        else:
            if buf:
                buf += data
                view: bytes | bytearray = buf
            else:
                view = data
            n, end, why = match_answers(view, pending)
            notice = bytes(view[end:view.find(b"\n", end)]) if why == NOTICE else b""
            if n == 1 and end == len(view) <= KNOWN_MAX and why == MORE and len(pending) == 1:
                self.known = (self.backend_conn, pending[0], bytes(view))
        if n:
            if end == len(view):
                out = bytes(view) if view is buf else view
                buf.clear()
            else:
                out = bytes(view[:end])
                if view is buf:
                    del buf[:end]
                else:
                    buf += view[end:]
            self.transport.write(out)  # type: ignore[union-attr]
            self.answered += n
            if self.backend_conn is not None:
                self.backend_conn.served += n
            backend = self.backend
            if n == len(pending):
                pending.clear()
                self.pending_bytes = 0
                if backend is not None:
                    backend.messages += n
                    backend.response_timeouts = 0
                    if self.burst_start is not None:
                        backend.latency.record((time.monotonic() - self.burst_start) * 1000)
                self.burst_start = None
                if self.paused:
                    self.set_paused("pending", False)
                if why == MORE and not buf:
                    self.settle()
            else:
                popleft = pending.popleft
                freed = 0
                for _ in range(n):
                    freed += len(popleft()) + 1 + MESSAGE_COST
                self.pending_bytes = max(0, self.pending_bytes - freed)
                if backend is not None:
                    backend.messages += n
                    backend.response_timeouts = 0
                if "pending" in self.paused and self.pending_bytes < self.config.max_pending_bytes // 2:
                    self.set_paused("pending", False)
        elif view is not buf:
            buf += view  # an answer cut in two: wait for the rest (or see below)
        if why == MORE:
            if not buf:
                return
            if not pending:  # bytes nobody asked for: the connection goes
                self.backend_unasked()
            elif len(buf) > self.config.max_line + 1024:
                self.fail_over("bad-reply")
        elif why == OFF:  # not an answer to the message it should answer: the backend is broken
            self.fail_over("bad-reply")
        elif why == NOTICE:
            self.backend_notice(notice)
        else:  # CLOSED: a line too long for the backend; the session ends as it would there
            self.line_too_long_for_backend()

    def backend_unasked(self) -> None:
        """Bytes from the backend with every message answered: its connection goes.
        A second copy of the last answer, or anything but a notice about the
        connection (a server's idle notice), is a broken backend's, and blamed."""
        notice = is_notice(bytes(self.inbuf))
        backend = self.backend
        self.fail_over("unasked")  # (nothing pending: only the connection goes)
        if not notice and backend is not None:
            unasked_answer(self.app, backend, self.conn_id)

    def backend_notice(self, notice: bytes) -> None:
        """The backend said, where an answer was due, what becomes of the connection:
        full (``ERR busy``, as it takes it: another backend), stopping (``ERR
        shutting-down``: as a close), or closed as idle just as a message came (``ERR
        idle-timeout``: stale). Nobody's answer: counted as one, it was a client's."""
        side = self.backend_conn
        if side is None:
            return
        if notice == ERR_BUSY[:-1]:
            self.backend_busy(side)
        else:
            self.backend_lost(side, notice[4:].decode("ascii", "replace"))

    def retry_on(self, backend: Backend) -> None:
        """The connection to ``backend`` went stale: what is pending goes to it again,
        on a new connection."""
        self.drop_backend()
        if self.closed:
            return
        if not self.pending:
            self.settle()
        else:
            self.attach(again=backend)

    def line_too_long_for_backend(self) -> None:
        """The backend answered a message ``ERR line-too-long`` (its limit is below the
        balancer's) and closes the connection, as a server does. The client has the
        answer; its session ends there, as it would with the server itself, and the
        backend is not to blame: the line was the client's."""
        if self.elog.info:  # (the client's error, answered: an info line, as the servers' own)
            self.elog.line("INFO", f"event=error conn={self.conn_id} code=line-too-long "
                                   f"backend={self.backend.name if self.backend else '-'}")
        self.pending.clear()
        self.pending_bytes = 0
        self.drop_backend()
        if self.closed:
            return
        if self.error_after_pending is None:
            self.error_after_pending = b""
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.settle()

    def backend_busy(self, side: BackendSide) -> None:
        """The backend is at its connection limit: full, not down (no backend is
        marked). What is pending goes to another backend; once every backend has
        been tried, the client gets ``ERR busy``, as from the balancer itself."""
        if side is not self.backend_conn:
            return
        backend = side.backend
        self.drop_backend()
        if self.closed:
            return
        if self.elog.info:
            self.elog.line("INFO", f"event=backend-busy conn={self.conn_id} backend={backend.name}")
        if side.attempts + 1 < len(self.app.pool.backends) and self.attach(side.attempts + 1,
                                                                           self.tried_also(backend, side.attempts)):
            return
        self.refuse_busy("backends-full")

    def backend_lost(self, side: BackendSide, reason: str) -> None:
        if side is not self.backend_conn:
            return  # an old connection we already gave up on
        if ((reason == "idle-timeout" and (side.served or side.reused or side.waited))
                or (side.reused and side.fresh and reason in ("closed", "reset"))):
            # Closed by the server as idle just as a message came, or as it was taken from
            # the idle pool (reuse.py): stale, not a failure of the backend. Its messages
            # go on a new connection to it. (Not said of a new connection's first answer
            # when the message went as it connected: a backend that says so there is
            # broken, and a retry for each such answer reconnected to it thousands of
            # times a second, and the message waited for ever. One that waited for its
            # client's first message was idle: its server's timeout crossed that message.)
            if side.backend.healthy:
                self.retry_on(side.backend)
            else:
                self.fail_over(reason)  # (down already: it is not blamed twice)
            return
        self.fail_over(reason)

    def fail_over(self, reason: str, blame: bool = True) -> None:
        """Drop the current backend; resend what is pending elsewhere. ``blame``: count
        a traffic error against the backend (not when it is down already, nor for a
        response timeout, which the caller counts)."""
        backend = self.backend
        had_pending = bool(self.pending)
        self.drop_backend()
        if self.closed:
            return
        self.set_paused("backend-full", False)
        if not had_pending:
            self.settle()
            return  # idle: the next message picks a backend
        if backend is not None:
            if blame:
                self.app.pool.traffic_error(backend, reason)
            backend.failovers += 1
        self.failovers += 1
        self.app.failovers += 1
        if self.elog.warning:
            self.elog.line("WARNING", f"event=failover conn={self.conn_id} from={backend.name if backend else '-'} "
                                      f"reason={reason} pending={len(self.pending)}")
        self.burst_start = time.monotonic()  # the next backend's latency counts from the resend
        # Another backend, if one is healthy: the one left may still be UP (a response
        # timeout takes it down only at --fall in a row), and slow; else it again.
        if not (backend is not None and self.attach(exclude=(backend,))) and not self.attach():
            self.answer_no_backend(0)

    def answer_no_backend(self, new_messages: int) -> None:
        """ERR no-backend for every pending message and ``new_messages`` more."""
        count = len(self.pending) + new_messages
        self.pending.clear()
        self.pending_bytes = 0
        self.inbuf.clear()
        self.burst_start = None
        if count:
            self.transport.write(ERR_NO_BACKEND * count)  # type: ignore[union-attr]
            self.no_backend_errors += count
            self.app.no_backend_errors += count
            self.app.no_backend_said.count(count)
        self.set_paused("pending", False)
        self.settle()

    # -- the balancer's sweeps ---------------------------------------------------

    def check_response_timeout(self, now: float, timeout: float) -> None:
        if self.connect_started and now - self.connect_started > self.config.connect_timeout:
            if self.connect_side is not None:
                self.connect_side.connect_failed(TimeoutError(errno.ETIMEDOUT, "connect timed out"))
            return
        if not self.pending or self.connecting or self.backend_conn is None:
            self.stall_since = None
            return
        if self.answered != self.sweep_answered:  # answered since: the next stall gets the timeout again
            self.sweep_answered, self.stall_since, self.patience = self.answered, now, 1
        elif self.stall_since is None:
            self.stall_since = now
        elif self.app.all_down and now - self.stall_since >= ALL_DOWN_STALL and not self.client_full:
            # No backend is healthy and its own gives it nothing: ERR no-backend for what
            # waits (fail_over finds none), as SPEC.md asks, not at the end of a response
            # timeout grown by failovers (14-18 s with every server stopped).
            self.stall_since = None
            self.fail_over("backend-down", blame=False)
        elif now - self.stall_since > timeout * self.patience and not self.client_full:
            # (Client full: the answers wait for the client to read them, and the backend
            # is not read meanwhile; no backend is to blame. See close_idle.)
            # The next backend gets twice as long (up to MAX_PATIENCE times): on a network
            # slower than the timeout (8 KB messages over 1 Mbit/s), every message went
            # again and again, each resend loading the link more, and none was answered.
            self.stall_since = None
            self.patience = min(2 * self.patience, MAX_PATIENCE)
            if self.backend is not None:
                self.app.pool.response_timed_out(self.backend, now, timeout)  # (DOWN at --fall in a row)
            self.fail_over("response-timeout", blame=False)

    def note_activity(self, now: float) -> float:
        """The last time the client sent bytes or got an answer."""
        seen = self.bytes_in + self.answered
        if seen != self.seen_bytes:
            self.seen_bytes = seen
            self.last_activity = now
        return self.last_activity

    def idle(self) -> bool:
        return not self.pending and not self.connecting

    def close_idle(self) -> None:
        """Nothing moved either way for the idle timeout."""
        if self.closed:
            return
        if self.client_full or self.transport.is_closing():  # type: ignore[union-attr]
            # Answers held for a client that takes none (HAProxy's timeout client,
            # nginx's send_timeout): they cannot reach it, nor can a close.
            if self.elog.warning:
                self.elog.line("WARNING", f"event=error conn={self.conn_id} code=send-timeout "
                                          f"pending={len(self.pending)}")
            self.transport.abort()  # type: ignore[union-attr]
        elif self.idle():
            if self.elog.info:  # (as the servers say theirs: the client's doing, answered)
                self.elog.line("INFO", f"event=error conn={self.conn_id} code=idle-timeout")
            self.finish_with(ERR_IDLE)
        # else: waiting on its backend, which the response timeout deals with

    def line_too_slow(self, now: float, timeout: float) -> bool:
        # Paused: the balancer stopped reading, not the client.
        unfinished = self.framer.buffered > 0 and not self.paused and self.error_after_pending is None
        return self.line_watch.too_slow(unfinished, self.lines, now, timeout)

    def end_slow_line(self) -> None:
        """``ERR line-timeout`` after the answers still due, then the close."""
        self.error_after_pending = ERR_LINE_TIMEOUT
        self.transport.pause_reading()  # type: ignore[union-attr]
        if self.elog.info:  # (as the servers say theirs: the client's doing, answered)
            self.elog.line("INFO", f"event=error conn={self.conn_id} code=line-timeout")
        if not self.pending and not self.connecting:
            self.settle()

    def drained(self) -> None:
        """A graceful stop, and this client quiet with every message answered: closed;
        a line begun (no message yet) gets ``ERR shutting-down`` first, as the servers
        say it. It went without a word."""
        if self.framer.buffered:
            self.wind_up()
        else:
            self.close()

    def wind_up(self) -> None:
        """A graceful stop's deadline (``--drain-timeout``): nothing more is read;
        the answers still due are relayed, a line begun gets ``ERR shutting-down``
        (after them), then the close. Aborted, the messages in flight were lost
        without a word to the client."""
        if self.closed or self.error_after_pending is not None:
            return
        if not (self.pending or self.connecting or self.framer.buffered):
            # Idle between messages: closed as nginx closes idle ones; answers it has
            # not taken yet go out first (then the lingering close, waited for).
            if self.transport.out:  # type: ignore[union-attr]
                self.transport.close()  # type: ignore[union-attr]
            else:
                self.transport.abort()  # type: ignore[union-attr]
            return
        self.error_after_pending = ERR_SHUTTING_DOWN if self.framer.buffered else b""
        self.transport.pause_reading()  # type: ignore[union-attr]
        if not self.pending and not self.connecting:
            self.settle()

    def give_up(self) -> None:
        """The wind-up's end: each message still unanswered (its backend stalled)
        gets ``ERR shutting-down`` in place of its answer, then the close, after
        the line begun's. Cut off with the connection, they went without a word."""
        count = len(self.pending)
        if self.closed or self.transport is None or not count or self.client_full or self.transport.is_closing():
            self.abort()  # (a client that takes nothing gets nothing more)
            return
        self.pending.clear()
        self.pending_bytes = 0
        self.drop_backend()
        self.finish_with(ERR_SHUTTING_DOWN * count + (self.error_after_pending or b""))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def start_client(app: Balancer, sock: _socket.socket, peer: tuple) -> None:
    """A new client connection (the listener's ``on_accept`` in message mode)."""
    SocketTransport(app.events, sock, peer, ClientSide(app)).start()


def _peer(transport: asyncio.Transport | None) -> str:
    """host:port of the client, looked up only when a log line needs it."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    return peer_name(peer)
