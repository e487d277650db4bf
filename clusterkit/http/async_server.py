"""The async HTTP server: an asyncio.Protocol (uvloop when installed) over the
shared core, serving ``www/`` from memory.

On Linux the protocol runs on the loop over raw non-blocking sockets in one
epoll set (``epollset.SocketTransport``), as the balancer's connections do,
rather than on the loop's own transports: a connection per request (``ab``
without ``-k``) cost the server 60 us of CPU per request on uvloop's
transports and 48 us here (nginx: 38-40 us), and keep-alive requests got
faster too (``ab -k`` 63k to 73k requests/s, ``wrk`` 73k to 88k). The loop
still runs everything else (the sweep, the stop, the log writer).

HTTP/1.0 and 1.1, keep-alive (HTTP/1.0 ``Connection: keep-alive`` too, as
``ab -k`` sends), pipelining (answers go out in order, the answers of one
read in one write, ``ANSWER_BUDGET`` bytes at a time), GET and HEAD. Flow
control: reading stops while the client does not take our answers, and so
does answering the pipelined requests already read (``waiting``). Deadlines,
checked by one sweep per server rather than a timer per request: a request
head not complete within ``header_timeout`` gets 408 (slowloris), an idle
keep-alive connection is closed after ``keepalive_timeout``, and so is one
whose client has taken none of its answers for that long (nginx's
``send_timeout``: a client that reads slowly but reads is served). Graceful
stop as the TCP server does it.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time

from .. import epollset, logs, loops
from ..sockets import client_room, linger_room
from .config import HttpServerConfig
from .core import CONTINUE, HttpError, Request, RequestParser, error_response
from ..linger import Linger, turn_away
from .static import StaticFiles


class HttpProtocol(asyncio.Protocol):
    __slots__ = ("server", "transport", "parser", "peer", "last_activity", "closing", "elog", "static", "conn_id",
                 "paused", "unsent", "stalled_since", "lingering", "waiting", "answers")

    def __init__(self, server: AsyncHttpServer) -> None:
        self.server = server
        self.elog = server.elog
        self.static = server.static
        self.parser = RequestParser(server.config.limits)
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.closing = False
        self.paused = False  # the answers passed the high-water mark (writing paused)
        self.unsent = 0  # bytes of answers not yet taken, as the last sweep saw them
        self.stalled_since = 0.0  # since when that has not changed
        self.waiting: list[Request] = []  # pipelined requests read, to be answered once the client takes more
        self.lingering: Linger | None = None  # after an error answer, until the close
        self.answers = 0  # written: after more than one, a close lingers (see _answer)
        self.last_activity = time.monotonic()
        self.conn_id = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "-"
        server = self.server
        self.conn_id = next(server.conn_ids)
        transport.set_write_buffer_limits(high=512 * 1024)
        if len(server.connections) >= server.max_clients:  # the open-files limit is near: 503, not a close unseen
            turn_away(server, self, transport, error_response(HttpError(503, "too many connections"),
                                                              self.static.backend_header))
            return
        server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:
            self.lingering.take(data)
            return
        self.last_activity = time.monotonic()
        parser = self.parser
        requests = parser.feed(data)
        if self.waiting:  # (reading pauses while requests wait; should bytes come, they keep their turn)
            self.waiting += requests
        elif requests:
            self._answer(requests)
        elif parser.error is not None:
            self._refuse(parser.error)
        if parser.expects_continue:  # after the answers before it; none while they wait
            parser.expects_continue = False
            if not (self.closing or self.waiting):
                self.transport.write(CONTINUE)  # type: ignore[union-attr]

    def _answer(self, requests: list[Request]) -> None:
        """Answer in order, a budget at a time, while the client takes them; the rest
        wait for ``resume_writing``. A request the parser refused comes after them."""
        transport = self.transport
        static = self.static
        while True:
            out, keep, n = static.answer(requests, self.peer, self.elog)
            transport.write(out)  # type: ignore[union-attr]
            self.answers += n
            if not keep:
                self.closing = True
                if self.answers > 1:
                    # Requests came before this last one: more may be on their way behind
                    # it (pipelined), and closing on them would reset the connection and
                    # take the answers not yet read with it. A lingering close, as nginx's
                    # lingering_close for a pipelined request; one request, a close at once.
                    limits = self.server.config.limits
                    self.lingering = Linger(transport, limits.keepalive_timeout)  # type: ignore[arg-type]
                else:
                    transport.close()  # type: ignore[union-attr]
                return
            if n == len(requests):
                break
            requests = requests[n:]
            if self.paused:
                self.waiting = requests
                return
        if self.waiting:
            self.waiting = []
        if self.parser.error is not None:
            self._refuse(self.parser.error)

    def _refuse(self, exc: HttpError) -> None:
        if self.elog.info:  # (a client's fault, as a 404 is: no warning, and no flood at --log-level warning)
            self.elog.line("INFO", f"event=refused client={self.peer} status={exc.status} "
                                   f"reason={logs.quote(exc.detail)}")
        self._answer_and_linger(error_response(exc, self.static.backend_header))

    def _answer_and_linger(self, answer: bytes) -> None:
        self.closing = True
        self.transport.write(answer)  # type: ignore[union-attr]
        self.lingering = Linger(self.transport)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        self.paused = True
        self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.paused = False
        # Its requests waited on us, not we on it: a head not read meanwhile is not slow.
        now = time.monotonic()
        self.last_activity = now
        if self.parser.in_progress:
            self.parser.head_started = now
        if self.waiting and not self.closing:
            self._answer(self.waiting)
        if not self.closing and not self.paused:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.parser.close()

    def sweep(self, now: float) -> None:
        limits = self.server.config.limits
        if self.lingering is not None:
            self.lingering.sweep(now)
            return
        unsent = self.transport.get_write_buffer_size()  # type: ignore[union-attr]
        if unsent or self.waiting:
            # Answers on their way: what counts is whether the client takes them (nginx's
            # send_timeout), not how long ago it sent (a 408 or an idle close now would
            # overtake them, or cut requests still waiting for their turn).
            if unsent != self.unsent:  # it took some since the last sweep: its clock starts again
                self.unsent = unsent
                self.stalled_since = now
            elif now - self.stalled_since > limits.keepalive_timeout:
                # It has taken nothing for that long: drop it, also when closing,
                # which would wait for a buffer it never drains.
                self.closing = True
                self.transport.abort()  # type: ignore[union-attr]
            return
        self.unsent = 0
        if self.closing:
            return
        if self.parser.in_progress and now - self.parser.head_started > limits.header_timeout:
            self.closing = True
            if self.elog.info:
                self.elog.line("INFO", f"event=refused client={self.peer} status=408 reason=slow-head")
            self._answer_and_linger(error_response(HttpError(408, "slow-head"),
                                                   self.static.backend_header))
        elif not self.parser.in_progress and now - self.last_activity > limits.keepalive_timeout:
            self.closing = True
            self.transport.close()  # type: ignore[union-attr]

    def idle(self) -> bool:
        return (not self.parser.in_progress and not self.waiting
                and self.transport.get_write_buffer_size() == 0)  # type: ignore[union-attr]


class AsyncHttpServer:
    def __init__(self, config: HttpServerConfig, elog: logs.EventLog) -> None:
        self.config = config
        self.elog = elog
        self.static = StaticFiles(config.root, config.name)
        self.connections: set[HttpProtocol] = set()
        self.max_clients = client_room(sys.maxsize)  # served at once: what the open-files limit holds
        self.max_lingering = linger_room()  # clients told 503 whose close lingers, beyond those
        self.turned_away = elog.tally(lambda n: f"event=busy refused={n} open={len(self.connections)} "
                                                f"max_clients={self.max_clients} reason=open-files-limit")
        self.conn_ids = itertools.count(1)
        self._server: asyncio.AbstractServer | epollset.Listener | None = None
        self.stop_signal = loops.StopSignal(on_force=self._abort_all)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self._server = await epollset.create_server(loop, lambda: HttpProtocol(self), cfg.host, cfg.port,
                                                    cfg.backlog)
        loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        limits = self.config.limits
        period = min(limits.header_timeout, limits.keepalive_timeout, 4.0) / 4
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.sweep(now)
            self.turned_away.flush()

    def _abort_all(self) -> None:
        for conn in list(self.connections):
            conn.transport.abort()  # type: ignore[union-attr]

    async def serve_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        await self.stop_signal.wait()
        self.turned_away.flush(now=True)
        if self._server is not None:
            self._server.close()
        deadline = loop.time() + self.config.drain_timeout
        while self.connections and loop.time() < deadline and not self.stop_signal.forced:
            for conn in list(self.connections):
                if conn.idle():
                    conn.closing = True
                    conn.transport.close()  # type: ignore[union-attr]
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.transport.abort()  # type: ignore[union-attr]
