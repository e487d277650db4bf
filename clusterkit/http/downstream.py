"""lb.py's side toward its clients: one client connection (``ProxyClient``),
its requests answered in order, with flow control for a client that does not
read its answers and its deadlines; and one request on its way through the
balancer (``Exchange``): to the backend ``Proxy.choose`` gives, over a
``BackendConn`` (``upstream.py``), on to the next backend after a failure, and
its answer (whole, or streamed) back to the ``ProxyClient``.

``Proxy`` (``proxy.py``) makes a ``ProxyClient`` for each connection and
holds what they share: the backends, their health, the choice among them and
the header fields rewritten both ways. How the balancer works as a whole is
told in ``proxy.py``.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import time
from collections import deque
from typing import TYPE_CHECKING

from .. import logs
from ..linger import Linger, turn_away
from ..balancer.pool import connect_failure
from ..sockets import local_shortage, open_socket
from .core import CONTINUE, HttpError, Request, RequestParser, error_response
from .upstream import BackendAnswer, BackendConn, BackendDown, BackendLost, BadGateway

if TYPE_CHECKING:
    from .proxy import BackendState, Proxy

WRITE_HIGH_WATER = 512 * 1024
"""Bytes of answers buffered for a client that does not read, before it is paused."""


class Exchange:
    """One request on its way through the balancer, for one ``ProxyClient``.

    It goes to the next healthy backend in turn: over an idle pooled
    connection when there is one (the steady state under keep-alive, handled
    in callbacks, with no task or future per request), else over a new one.
    A failure sends it on as nginx's ``proxy_next_upstream error timeout``
    does (see proxy.py's notes); the answer, or the error answer, goes back
    to the client with ``client.answered``. A long answer is streamed: its
    head and body go to the client as they come (``stream``), the rest with
    ``client.answered`` at the end."""

    __slots__ = ("proxy", "client", "req", "data", "tried", "timed_out", "broke", "backend", "conn", "streaming",
                 "chunked", "keep", "sent")

    def __init__(self, proxy: Proxy, client: ProxyClient, req: Request, data: bytes) -> None:
        self.proxy = proxy
        self.client = client
        self.req = req
        self.data = data  # what goes to the backend (ProxyClient.backend_request)
        self.tried: set[int] = set()
        self.timed_out: BackendState | None = None  # the last backend that did not answer in time
        self.broke: BackendState | None = None  # the last backend that broke the connection (reset, close)
        self.backend: BackendState | None = None
        self.conn: BackendConn | None = None  # the connection it was last sent on
        self.streaming = False  # the answer's head went to the client: no retry from now on
        self.chunked = False  # the streamed body goes in chunks (its length was not given)
        self.keep = False  # the client's connection stays open after the streamed answer
        self.sent = 0  # bytes of the streamed answer written to the client

    def next_backend(self) -> None:
        b = self.proxy.choose(self.tried)
        if b is None:
            if self.timed_out is not None:
                self._error(504, f"{self.timed_out.name} did not answer in time", self.timed_out.name)
            elif self.broke is not None:
                self._error(502, f"{self.broke.name} closed the connection without a whole answer", self.broke.name)
            else:
                self._error(503, "no healthy backend", "-")
            return
        self.tried.add(b.index)
        self.backend = b
        self.attempt()

    def attempt(self, fresh: bool = False) -> None:
        """Send over an idle pooled connection of the backend, else (or ``fresh``) a new one."""
        b = self.backend
        if not fresh:
            idle = b.idle  # type: ignore[union-attr]
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    self.conn = conn
                    conn.send(self.data, self)
                    return
        self.proxy.loop.create_task(self._connect(b))  # type: ignore[arg-type]

    async def _connect(self, b: BackendState) -> None:
        try:
            async with asyncio.timeout(self.proxy.config.connect_timeout):
                loop = self.proxy.loop
                sock = await open_socket(loop, b.spec.host, b.spec.port)
                _, conn = await loop.create_connection(lambda: BackendConn(b), sock=sock)
        except (OSError, TimeoutError) as exc:
            if local_shortage(exc):  # out of descriptors here: the backend is not to blame
                self._error(503, "the balancer is out of descriptors", "-")
                return
            b.failures += 1
            if isinstance(exc, TimeoutError):
                self.timed_out = b  # (504 if no backend is left, as nginx's for a connect timeout)
                self.proxy.connect_timed_out(b)
            else:
                self.proxy.mark(b, False, connect_failure(exc))
            self.next_backend()
            return
        b.connect_timeouts = 0
        self.conn = conn
        conn.send(self.data, self)

    def answered(self, conn: BackendConn, answer: BackendAnswer) -> None:
        b = self.backend
        if conn.paused:
            conn.resume()
        if answer.keep_alive and not conn.closed and len(b.idle) < self.proxy.config.pool_size:  # type: ignore
            b.idle.append(conn)  # type: ignore[union-attr]
        else:
            conn.close()
        b.requests += 1  # type: ignore[union-attr]
        if self.streaming:
            rest = self._body_piece(answer.body) + (b"0\r\n\r\n" if self.chunked else b"")
            self.client.answered(self.req, answer.status, rest, b.name, self.keep, self.sent + len(rest))
        else:
            self.client.answered(self.req, answer.status, self.proxy._client_response(self.req, answer, b),
                                 b.name)

    def stream(self, conn: BackendConn) -> None:
        """Pass on the part of a long answer read so far (``STREAM_AFTER``); the
        head first. The backend is read only as fast as the client takes it."""
        if self.client.closing:  # gone before the answer grew long: nobody is to read the rest
            self._let_go()
            return
        if not self.streaming:
            self.streaming = True
            head, self.chunked, self.keep = self.proxy._streamed_head(self.req, conn, self.backend)  # type: ignore
            self.client.write(head)
            self.sent += len(head)
        piece = self._body_piece(conn.take_body())
        self.sent += len(piece)
        self.client.write(piece)  # (a client that stops reading pauses the backend: ProxyClient.pause_writing)

    def _body_piece(self, body: bytes) -> bytes:
        if self.chunked and body:
            return b"%x\r\n%s\r\n" % (len(body), body)
        return body

    def abandon(self) -> None:
        """The client has gone: a streamed answer's connection is ended (the rest
        of the answer is nobody's); one answered whole is still read and pooled."""
        if self.streaming:
            self._let_go()

    def _let_go(self) -> None:
        conn = self.conn
        if conn is not None and conn.owner is self:
            conn.owner = None  # (nobody to tell of the failure)
            conn._drop(ConnectionAbortedError("the client has gone"))
            if self.client.elog.info:  # what it got, as nginx logs it (499: nothing)
                self.client.log_request(self.req, conn.status if self.sent else 499, self.sent,
                                        self.backend.name)  # type: ignore[union-attr]

    def failed(self, conn: BackendConn, exc: Exception) -> None:
        b: BackendState = self.backend  # type: ignore[assignment]
        conn.close()
        lost = not isinstance(exc, (BadGateway, BackendDown, TimeoutError))  # a reset or a close
        if lost and conn.uses > 1 and not self.streaming:
            # A pooled connection the backend closed while it was idle: once more on a
            # new one (whose first request this is, so it is not tried a third time).
            self.attempt(fresh=True)
            return
        b.failures += 1
        if isinstance(exc, TimeoutError):
            self.timed_out = b  # (504 if no backend is left)
            self.proxy.mark(b, False, "response-timeout")
        elif lost:
            self.broke = b  # (502 if no backend is left)
            self.proxy.suspect(b, exc.reason if isinstance(exc, BackendLost) else "reset")
        # (BackendDown: marked down already; BadGateway: it answers, only wrongly.)
        if self.streaming:  # part of the answer is with the client: it cannot go elsewhere now
            self.client.cut(self.req, conn.status, b.name, self.sent)
        elif isinstance(exc, BadGateway):
            self._error(502, f"{b.name} sent a malformed answer", b.name)
        else:  # idempotent (GET, HEAD): the next backend
            self.next_backend()

    def _error(self, status: int, why: str, backend: str) -> None:
        # (error_response says Connection: close: the connection ends after it)
        error = HttpError(status, why, head_only=self.req.method == b"HEAD")
        self.client.answered(self.req, status, error_response(error), backend, keep=False)



def unsent(transport: asyncio.Transport) -> int:
    """Bytes written to the connection that its client has not taken yet: the
    transport's buffer and the kernel's send queue. (The buffer alone moves in
    steps as large as a third of the kernel's buffer, megabytes, however steadily
    a slow client reads.)"""
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            pass
    return size


def reset(transport: asyncio.Transport) -> None:
    """End a connection with a reset (RST), not a FIN: a client must not take the
    part of an answer it got for the whole (an HTTP/1.0 body ends at the close)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class ProxyClient(asyncio.Protocol):
    """One client connection to the balancer; its requests are answered in order."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.elog = proxy.elog
        self.parser = RequestParser(proxy.config.limits)
        self.queue: deque[Request] = deque()
        self.exchange: Exchange | None = None  # the request on its way (one at a time, in order)
        self.starting = False  # in _next, which goes on to the next request itself
        self.eof = False  # the client is done sending (a half-close): close once all is answered
        self.last_key: tuple | None = None  # the last request's method, target, version and headers,
        self.last_data = b""  # and what went to the backend for it
        self.paused_since = 0.0  # when the client stopped reading its answers (0: it reads)
        self.buffered = 0  # while paused: what was unsent at the last sweep (less now: it read)
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.closing = False
        self.answers = 0  # written: after more than one, a close lingers (more requests may be on the way)
        self.refused = False  # the parser's error is queued
        self.lingering: Linger | None = None  # after an error answer, until the close
        self.last_activity = time.monotonic()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "-"
        proxy = self.proxy
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if len(proxy.connections) >= proxy.max_clients:  # the open-files limit is near: 503, not a close unseen
            turn_away(proxy, self, transport, error_response(HttpError(503, "too many connections")))
            return
        proxy.connections.add(self)

    # Flow control: a client that does not read its answers stops being read from
    # and answered, so what the balancer holds for it stays bounded (the queue, the
    # parser's buffer and the write buffer's high-water mark, plus one answer).
    def pause_writing(self) -> None:
        self.paused_since = time.monotonic()
        self.buffered = unsent(self.transport)  # type: ignore[arg-type]
        self.transport.pause_reading()  # type: ignore[union-attr]
        if self.exchange is not None and self.exchange.streaming:
            self.exchange.conn.pause()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.paused_since = 0.0
        if self.exchange is not None and self.exchange.streaming:
            self.exchange.conn.resume()  # type: ignore[union-attr]
        if len(self.queue) < 16 and not self.closing:
            self.transport.resume_reading()  # type: ignore[union-attr]
        self._next()

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:
            self.lingering.take(data)
            return
        self.last_activity = time.monotonic()
        parser = self.parser
        self.queue.extend(parser.feed(data))
        if parser.error is not None and not self.refused:
            self.refused = True
            self.queue.append(parser.error)  # type: ignore[arg-type]  # answered in turn, then close
            self.transport.pause_reading()  # type: ignore[union-attr]
        if len(self.queue) > 64:
            self.transport.pause_reading()  # type: ignore[union-attr]
        if self.exchange is None:
            self._next()
        if parser.expects_continue:  # (said only when nothing is due before it)
            parser.expects_continue = False
            if self.exchange is None and not self.queue and not self.closing:
                self.transport.write(CONTINUE)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        """A half-close (``nc -N``, a client that sent all it had): what it sent is
        still answered, then the connection closes."""
        self.eof = True
        return self.exchange is not None or bool(self.queue)  # (False: nothing due, close now)

    def _next(self) -> None:
        """Send the queued requests on, one at a time: the next one goes once the
        last is answered (``answered``), and not while the client leaves its
        answers unread. Error answers (the parser's, 405) end the connection."""
        if self.starting:
            return  # an answer given at once (503): the loop below goes on
        self.starting = True
        try:
            queue = self.queue
            while queue and self.exchange is None and not self.closing and not self.paused_since:
                req = queue.popleft()
                if isinstance(req, HttpError):  # (the parser's: a method but GET and HEAD is its 405)
                    self._refuse(req)
                else:
                    try:
                        data = self.backend_request(req)
                    except HttpError as exc:  # (431: what would go to the backend is over the limits)
                        self._refuse(exc, req)
                        continue
                    self.exchange = Exchange(self.proxy, self, req, data)
                    self.exchange.next_backend()
        finally:
            self.starting = False

    def backend_request(self, req: Request) -> bytes:
        """What goes to the backend for ``req`` (``Proxy._backend_request``, which may
        raise ``HttpError``). A client that repeats its last request (as load tools
        do) has the same bytes again: they depend on its method, target, version
        and header fields alone (and the client's address), all in the key."""
        key = (req.method, req.target, req.version, req.headers)
        if key != self.last_key:
            self.last_key, self.last_data = key, self.proxy._backend_request(req, self.peer)
        return self.last_data

    def answered(self, req: Request, status: int, resp: bytes, backend: str, keep: bool | None = None,
                 size: int | None = None) -> None:
        """The answer to the request on its way (from its Exchange); for a streamed
        one, its last part, whether the connection stays and the whole answer's size."""
        self.exchange = None
        self._finish(resp, backend, status, req, req.keep_alive if keep is None else keep, size)
        if self.closing:
            return
        if len(self.queue) < 16 and not self.paused_since:
            self.transport.resume_reading()  # type: ignore[union-attr]
        self._next()
        if self.eof and self.exchange is None and not self.queue and not self.closing:
            self.closing = True
            self.transport.close()  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        """Part of a streamed answer."""
        if not self.closing:
            self.transport.write(data)  # type: ignore[union-attr]

    def cut(self, req: Request, status: int, backend: str, sent: int) -> None:
        """A streamed answer's backend failed half-way: the client's connection is
        reset, so that it cannot take the part it got for the whole answer."""
        self.exchange = None
        if self.elog.warning:
            self.elog.line("WARNING", f"event=answer-cut client={self.peer} path="
                                      f"{logs.quote(req.target.decode('latin-1'))} backend={backend} bytes={sent}")
        if self.elog.info:
            self.log_request(req, status, sent, backend)
        if not self.closing:
            self.closing = True
            reset(self.transport)  # type: ignore[arg-type]

    def log_request(self, req: Request | None, status: int, size: int, backend: str) -> None:
        what = f"{_method_path(req)} ms={(time.monotonic() - req.started) * 1000:.3f}" if req else "method=- path=-"
        self.elog.line("INFO", f"event=request client={self.peer} {what} status={status} bytes={size} "
                               f"backend={backend}")

    def _refuse(self, exc: HttpError, req: Request | None = None) -> None:
        """An answer of lb.py's own (400, 405, 408, 431 ...), then the close. Its line
        says why, as the HTTP servers' event=refused lines do (an event=request line
        with method=- path=- said nothing of it); with the request's method and path
        when it was read whole."""
        if self.elog.info:
            what = f"{_method_path(req)} " if req else ""
            self.elog.line("INFO", f"event=refused client={self.peer} {what}status={exc.status} "
                                   f"reason={logs.quote(exc.detail)}")
        if req is not None:  # (431 for what would go to the backend: the parser did not say HEAD)
            exc.head_only = req.method == b"HEAD"
        self._finish(error_response(exc), "-", exc.status, req, keep=False, logged=True)

    def _finish(self, resp: bytes, backend: str, status: int, req: Request | None, keep: bool,
                size: int | None = None, logged: bool = False) -> None:
        if self.closing:  # the client has gone: nobody got it (nginx's 499, "client closed request")
            if self.elog.info:
                self.log_request(req, 499, 0, backend)
            return
        if self.elog.info and not logged:
            self.log_request(req, status, len(resp) if size is None else size, backend)
        self.transport.write(resp)  # type: ignore[union-attr]
        self.answers += 1
        if not keep:
            self.closing = True
            # The client may still be sending (after an error; or, on a connection with
            # requests before, pipelined ones, as nginx's lingering_close sees them): a
            # reset would take the answers not yet read with it.
            if status >= 400 or self.answers > 1:
                self.lingering = Linger(self.transport,  # type: ignore[arg-type]
                                        self.proxy.config.limits.keepalive_timeout)
            else:
                self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.proxy.connections.discard(self)
        self.parser.close()
        if self.exchange is not None:
            self.exchange.abandon()

    def sweep(self, now: float, limits) -> None:
        if self.lingering is not None:
            self.lingering.sweep(now)
            return
        if self.paused_since and not self.closing:
            buffered = unsent(self.transport)  # type: ignore[arg-type]
            if buffered < self.buffered:  # it reads, slowly: the timeout counts from its last read
                self.paused_since = now
            self.buffered = buffered
            if now - self.paused_since > limits.keepalive_timeout:
                # It has read nothing for that long (nginx's send_timeout): drop it;
                # closing would wait for a buffer it never drains.
                if self.elog.warning:
                    self.elog.line("WARNING", f"event=send-timeout client={self.peer} buffered={buffered}")
                self.closing = True
                reset(self.transport)  # type: ignore[arg-type]
                return
        if self.closing or self.exchange is not None or self.queue:
            return
        if self.parser.in_progress and now - self.parser.head_started > limits.header_timeout:
            self._refuse(HttpError(408, "slow-head"))  # (the async server's reason for it)
        elif not self.parser.in_progress and now - self.last_activity > limits.keepalive_timeout:
            self.closing = True
            self.transport.close()  # type: ignore[union-attr]

    def idle(self) -> bool:
        """Nothing on its way to the client, nor in the write buffer (a graceful stop waits for that)."""
        return self.exchange is None and not self.queue and not self.transport.get_write_buffer_size()  # type: ignore


def _method_path(req: Request) -> str:
    """A request's fields in lb.py's log lines."""
    return f"method={req.method.decode('latin-1')} path={logs.quote(req.target.decode('latin-1'))}"
