"""The HTTP load balancer (``http_servers/lb.py``): a reverse proxy that sends
each request to the next healthy backend in turn, over pooled keep-alive
connections.

Per request: round-robin over healthy backends (also between the requests of
one keep-alive client, so "each request is served by a different backend in
turn" shows in the log); the request goes out as HTTP/1.1 keep-alive with the
client's address appended to ``X-Forwarded-For`` and our entry to ``Via``, as
nginx's ``$proxy_add_x_forwarded_for`` and RFC 9110 7.6.3 do; the answer comes
back with our ``Via`` entry appended and ``X-Backend`` naming the backend.
Hop-by-hop fields, and those a ``Connection`` header names, are not passed on
either way. A request that is within the limits but would not be with what we
add gets 431 here, not from a backend with the same limits. One log line per
request names the backend that answered.

Failures: a refused connect, or no byte of the answer for ``response_timeout``
(between reads, as nginx's ``proxy_read_timeout``) marks the backend down
(passive check; a connect that times out only at ``fall`` in a row, as one lost
SYN is sent again only after a second: ``Proxy.connect_timed_out``) and the
request, being idempotent (only GET and HEAD are served), is retried on the next
backend, as nginx's ``proxy_next_upstream error timeout`` does. A reset, or a
close before the whole answer, is retried on the next backend too, but only
makes the backend a suspect (``suspect``): one health check at once, and down
only if that fails. A killed backend refuses it, and is down within a
millisecond; one that broke one connection (a request that crashes it, an answer
cut short) keeps serving the others: blamed at once, one such request tried on
each backend in turn took them all down, and everyone got 503s until the checks
brought them back. A backend the active checks mark down hands its waiting
requests on at once, so a hung (SIGSTOPped) backend costs its clients the
detection time, not the timeout. A stale pooled connection (closed by the
backend while idle) is retried once on a fresh connection without blaming the
backend. Nothing healthy: 503; a timeout with no backend left: 504; a malformed
answer, or every backend breaking the connection: 502. Our own error answers say
``Connection: close`` and mean it.
Active checks (``GET /healthz``, or ``--check-path``, every ``check_interval``;
any answer below 500 passes; the connect bounded by ``connect_timeout``, at most
``check_interval``, and the exchange after it by ``check_timeout``, as HAProxy's
``timeout connect`` and ``timeout check``) take a backend out after ``fall``
failed ones and bring it back after ``rise`` good ones.

The steady state under load costs little: an answer that is its backend's
last one again, but for the ``Date`` value, whole in one read, is taken as
that answer without the parser (``KnownAnswer``; anything else is parsed),
and a client's repeated request likewise (``core.RequestParser``). Under
``ab -k`` that took the balancer from 45-57 to 30-34 us of CPU per request.

HEAD is forwarded as GET and the body counted, not kept: httptools' response
parser cannot be told that an answer has no body, and this keeps framing
exact.

A long answer (past ``STREAM_AFTER``) is streamed: its head goes to the client
with the backend's ``Content-Length`` (or chunked, or close-delimited for an
HTTP/1.0 client), then its body as it comes, and the backend is read only as
fast as the client reads (``BackendConn.pause``). Such an answer is not
retried: a failure half-way resets the client's connection.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import socket
import struct
import sys
import termios
import time
from collections import deque
from typing import NamedTuple

import httptools

from .. import admin, logs, loops
from ..balancer.pool import LatencyHistogram
from ..balancer.epollset import lookup
from ..config import ConfigError
from ..sockets import client_room, descriptor_room, host_port, is_listener, linger_room, local_shortage
from .config import HttpBackend, ProxyConfig
from .core import (CONTINUE, HttpError, Request, RequestParser, connection_options, error_response, http_date,
                   reason_phrase)
from ..linger import Linger, turn_away
from .stats import ProxyCollector, proxy_stats

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
              b"upgrade", b"content-length"}
"""Never passed on (RFC 9110 7.6.1), with the fields a ``Connection`` header names
(``connection_named``). Content-Length: the balancer frames what it sends itself."""
NOT_NAMED = frozenset(HOP_BY_HOP | {b"close", b"host"})
"""``Connection`` options that name no field to drop: the connection's modes, the
hop-by-hop fields dropped anyway, and Host, which a request cannot go without."""
VIA = b"1.1 clusterkit-lb"
"""The balancer's entry, appended to the ``Via`` it received (RFC 9110 7.6.3), both ways;
``VIA_10`` on the request of an HTTP/1.0 client."""
VIA_10 = b"1.0 clusterkit-lb"
RANGE_FIELDS = (b"range", b"if-range")
WRITE_HIGH_WATER = 512 * 1024
"""Bytes of answers buffered for a client that does not read, before it is paused."""
STREAM_AFTER = 64 * 1024
"""An answer's body is relayed whole up to this many bytes (and retried on the next
backend if its own fails it). Past it, the body is passed on as it comes, at the
pace the client reads it (nginx's ``proxy_buffering`` with bounded buffers), so
the balancer never holds a whole large answer; a failure then cuts it off."""


def connection_named(value: bytes, named: set[bytes] | None) -> set[bytes] | None:
    """``named`` with the fields a ``Connection`` value lists (lower case): a proxy
    removes them (RFC 9110 7.6.1). Never Host, which a request cannot go without
    (and no client can make hop-by-hop)."""
    names = connection_options(value) - NOT_NAMED
    if not names:
        return named
    return names if named is None else named | names


class BadGateway(Exception):
    pass


class BackendDown(ConnectionError):
    """The backend was marked down while this request waited on it."""


class BackendAnswer(NamedTuple):
    status: int
    reason: bytes  # the backend's own reason phrase, passed on as HAProxy and nginx do
    headers: list[tuple[bytes, bytes]]
    body: bytes  # what is left of it here (all of it unless streamed; none for HEAD)
    keep_alive: bool
    length: int  # of the whole body


KNOWN_MAX = 64 * 1024
"""The longest answer a backend's ``KnownAnswer`` keeps."""


class KnownAnswer(NamedTuple):
    """A backend's last answer that came alone in one read, as bytes around its
    ``Date`` value and as parsed: the same bytes again (with any date) are the
    same answer, taken without the parser (``BackendConn.data_received``)."""
    prefix: bytes  # up to the Date header's value
    suffix: bytes  # after it
    size: int
    answer: BackendAnswer

    @classmethod
    def of(cls, data: bytes, answer: BackendAnswer) -> KnownAnswer:
        head_end = data.find(b"\r\n\r\n")
        i = data.find(b"\r\nDate: ", 0, head_end)
        if i < 0:
            return cls(data, b"", len(data), answer)  # no Date: the same bytes exactly
        start = i + len(b"\r\nDate: ")
        return cls(data[:start], data[data.find(b"\r\n", start):], len(data), answer)

    def matches(self, data: bytes) -> bool:
        """``data`` is this answer, its Date value (one line, of the same length) aside."""
        return (len(data) == self.size and data.startswith(self.prefix) and data.endswith(self.suffix)
                and data.find(b"\n", len(self.prefix), self.size - len(self.suffix)) < 0)


class BackendConn(asyncio.Protocol):
    """One keep-alive connection to a backend; one request at a time, whose
    answer or failure goes to the ``Exchange`` that sent it."""

    def __init__(self, backend: BackendState) -> None:
        self.backend = backend
        # Looked up once per connection: on Python 3.11 asyncio.get_running_loop()
        # makes a getpid() system call, 5% of the balancer's time under ab -k.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.owner: Exchange | None = None
        self.answer: BackendAnswer | None = None  # complete, handed over once the parser returns
        self.closed = False
        self.unasked = False  # an answer began that no request was waiting for
        self.uses = 0
        self.count_only = False  # a HEAD's answer: its body is counted, not kept
        self.paused = False  # reading stopped: a streamed answer's client reads slower than it comes
        self.waiting_since = 0.0  # the send, then the last bytes of the answer: the sweep's timeout counts from it
        self.sent_at = 0.0  # the request's send, for the backend's latency
        self.between = True  # the parser is between answers
        self.completed = 0  # answers the parser has finished
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.held = 0  # bytes in self.body
        self.length = 0  # of the body so far
        self.status = 0
        self.reason = b""
        self.head_done = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def send(self, data: bytes, owner: Exchange) -> None:
        self._reset()
        self.uses += 1
        self.count_only = owner.req.method == b"HEAD"
        self.sent_at = self.waiting_since = time.monotonic()  # the proxy's sweep enforces the response timeout
        self.owner = owner
        self.backend.busy.add(self)
        self.transport.write(data)  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.between = False
        if self.owner is None or self.answer is not None:
            self.unasked = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # (after the body: a chunked answer's trailer fields, dropped)
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.length += len(body)
        if not self.count_only:
            self.body.append(body)
            self.held += len(body)

    def on_message_complete(self) -> None:
        self.between = True
        self.completed += 1
        if self.status < 200:  # an interim answer (100 Continue, 103 Early Hints): the final one follows
            self._reset()
            return
        self._complete(self.parser.should_keep_alive())

    def _complete(self, keep_alive: bool) -> None:
        if self.owner is not None and self.answer is None:
            self.answer = BackendAnswer(self.status, self.reason, self.headers, b"".join(self.body), keep_alive,
                                        self.length)
            self._reset()  # (what the parser reads after it goes to new lists, not into this answer)

    def _deliver(self) -> None:
        answer, self.answer = self.answer, None
        owner, self.owner = self.owner, None
        backend = self.backend
        backend.busy.discard(self)
        backend.latency.record((time.monotonic() - self.sent_at) * 1000)
        if owner is not None:
            owner.answered(self, answer)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.waiting_since = time.monotonic()  # a slow answer still coming is no timeout (nginx's read timeout)
        # The steady state under load: the answer the backend gave last, whole in one
        # read, for a GET. A third of the balancer's time per request went to parsing it.
        alone = self.between and self.owner is not None and self.answer is None and not self.count_only
        known = self.backend.known
        if alone and known is not None and known.matches(data):
            self.answer = known.answer
            self._deliver()
            return
        completed = self.completed
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # Garbage, or a 101 Switching Protocols nobody asked for: a broken backend.
            self._drop(BadGateway(str(exc) or type(exc).__name__))
            return
        if self.unasked:
            # An answer no request was waiting for (on an idle connection, or after the
            # answer in the same read): left in the pool, it would pass for the answer to
            # the next request, someone else's. The connection goes, as nginx drops it.
            self._drop(ConnectionResetError("the backend sent an answer nobody asked for"))
            return
        if self.answer is not None:  # handed over here, not inside the parser's callback
            if alone and self.between and self.completed == completed + 1 and len(data) <= KNOWN_MAX:
                self.backend.known = KnownAnswer.of(data, self.answer)
            self._deliver()
        elif self.held and self.owner is not None and (self.owner.streaming or self.held > STREAM_AFTER):
            self.owner.stream(self)

    def take_body(self) -> bytes:
        """The body read so far, for a streamed answer; held no more here."""
        body, self.body, self.held = b"".join(self.body), [], 0
        return body

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.waiting_since = time.monotonic()  # waiting for a slow client is not the backend's delay
            if not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def _drop(self, exc: Exception) -> None:
        """End the connection now (it cannot be trusted, its backend is down, or it
        took too long): an answer completed before the trouble still goes to its
        request, else the request fails with ``exc``."""
        self.closed = True  # never pooled again
        if self.answer is not None:
            self._deliver()
        self._fail(exc)
        self.transport.abort()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser = None  # (it holds this object: let both go without the garbage collector)
        if self.owner is None:  # idle, maybe pooled: closed by its backend (its keep-alive timeout)
            try:
                self.backend.idle.remove(self)  # (/stats counted it as idle until a request found it closed)
            except ValueError:
                pass
        if exc is None and self.owner is not None and self.head_done and self._ends_at_close():
            # A body without Content-Length or chunked framing ends where the connection
            # does (RFC 9112 6.3): the close completes it, as HTTP/1.0 servers and CGI answer.
            self._complete(False)
            self._deliver()
            return
        self._fail(ConnectionResetError("backend closed the connection"))

    def _ends_at_close(self) -> bool:
        framed = any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self.headers)
        return not framed and self.status not in (204, 304)

    def _fail(self, exc: Exception) -> None:
        """The request in flight failed; its Exchange hears of it on the next turn
        of the loop (so that a backend marked down fails its requests in one go
        before any of them is sent on)."""
        self.backend.busy.discard(self)
        owner, self.owner = self.owner, None
        if owner is not None:
            self.loop.call_soon(owner.failed, self, exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class BackendState:
    def __init__(self, spec: HttpBackend, index: int) -> None:
        self.spec = spec
        self.index = index
        self.name = spec.name
        self.up = True
        self.streak = 0  # consecutive check results against the current state
        self.idle: deque[BackendConn] = deque()
        self.busy: set[BackendConn] = set()  # waiting for an answer
        self.requests = 0
        self.failures = 0
        self.connect_timeouts = 0  # connects for requests timed out in a row (Exchange._connect)
        self.reason = "start"  # of the last change between up and down
        self.suspected = False  # a check of its own is on its way (Proxy.suspect)
        self.latency = LatencyHistogram()  # the request's send to its answer, ms
        self.last_headers: list[tuple[bytes, bytes]] | None = None  # of its last answer,
        self.last_kept = b""  # and the header lines the client got for them,
        self.last_via = VIA  # and its Via value
        self.known: KnownAnswer | None = None  # its last answer that came alone in one read
        self.last_response: tuple | None = None  # and what a client got for it (Proxy._client_response)


class Proxy:
    def __init__(self, config: ProxyConfig, elog: logs.EventLog) -> None:
        self.config = config
        self.elog = elog
        self.backends = [BackendState(b, i) for i, b in enumerate(config.backends)]
        # Within the limits, a request to a backend has room for this many header
        # lines besides the X-Forwarded-For and Via added, and this many bytes but
        # its target (_backend_request). One no longer than ``short`` is within
        # both (a line takes 5 bytes at least): the common case, one comparison.
        self.fields_room = config.limits.max_headers - 2
        self.bytes_room = config.limits.max_header_bytes + len(b"GET  HTTP/1.1\r\n\r\n")
        self.short = min(5 * self.fields_room + 4, config.limits.max_header_bytes)
        self.next = 0
        self.connections: set[ProxyClient] = set()
        # Served at once: what the open-files limit holds, two descriptors a client (its
        # own, its backend connection's), beside the idle pool's (a quarter at most).
        room = descriptor_room() or 0
        self.max_clients = client_room(sys.maxsize, 2, min(config.pool_size * len(self.backends), room // 4))
        self.max_lingering = linger_room()  # clients told 503 whose close lingers, beyond those
        self.turned_away = elog.tally(lambda n: f"event=busy refused={n} open={len(self.connections)} "
                                                f"max_clients={self.max_clients} reason=open-files-limit")
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.base_events.Server | None = None
        self.own_host = b"Host: localhost\r\n"  # (the real one once listening: start)
        self._admin: asyncio.base_events.Server | None = None
        self.stop_signal = loops.StopSignal(on_force=self._abort_all)
        self.conn_ids = itertools.count(1)
        self.started = time.time()

    # -- choosing and state ----------------------------------------------------

    def choose(self, exclude: set[int]) -> BackendState | None:
        n = len(self.backends)
        for step in range(n):
            b = self.backends[(self.next + step) % n]
            if b.up and b.index not in exclude:
                self.next = b.index + 1
                return b
        return None

    def mark(self, b: BackendState, up: bool, reason: str) -> None:
        if b.up != up:
            b.up = up
            b.streak = 0
            b.reason = reason
            if not up:
                while b.idle:
                    b.idle.popleft().close()
                # Requests waiting on it go to the next backend now, not at their timeout.
                # An answer already streaming cannot move: it goes on while it flows
                # (HAProxy keeps a DOWN server's sessions too); the response timeout
                # ends it if it stops.
                for conn in list(b.busy):
                    if not (conn.owner is not None and conn.owner.streaming):
                        conn._drop(BackendDown(reason))
            if self.elog.warning:
                self.elog.line("WARNING", f"event={'backend-up' if up else 'backend-down'} backend={b.name} "
                                          f"reason={logs.quote(reason)}")

    async def _check(self, b: BackendState) -> tuple[bool, str]:
        """One health check: whether it passed, and what it found."""
        cfg = self.config
        host = f"[{b.spec.host}]" if ":" in b.spec.host else b.spec.host
        request = b"GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (cfg.check_path.encode(), host.encode())
        writer = None
        try:
            # As HAProxy: the connect within min(timeout connect, inter), the exchange within
            # the check timeout (one bound for both failed every check of a backend half a
            # check timeout away, round trip, while it served its traffic).
            try:
                async with asyncio.timeout(min(cfg.connect_timeout, cfg.check_interval)):
                    reader, writer = await asyncio.open_connection(b.spec.host, b.spec.port)
            except TimeoutError:
                return False, "check connect timeout"
            async with asyncio.timeout(cfg.check_timeout):
                writer.write(request)
                status_line = await reader.readline()
                ok = _alive(status_line)
                return ok, "check passed" if ok else f"check answered {status_line[:40]!r}"
        except TimeoutError:
            return False, "check timeout"
        except OSError as exc:
            return False, f"check {type(exc).__name__}"
        except ValueError:  # a status line over asyncio's 64 KiB: no HTTP server's
            return False, "check answered a line too long"
        finally:
            if writer is not None:
                writer.transport.abort()

    def connect_timed_out(self, b: BackendState) -> None:
        """A request's connect to ``b`` timed out (it goes on to the next backend). One
        lost SYN is sent again only after a second, the default connect timeout: ``b``
        is marked down at ``fall`` of them in a row, not at the first; a connect that
        succeeds, or a check that passes, starts the count again. (HAProxy leaves the
        server's state alone on a connect timeout; with ``observe layer4`` it counts
        errors in a row.)"""
        b.connect_timeouts += 1
        if self.elog.warning and b.up:  # (once down, the connects still timing out are not a line each)
            self.elog.line("WARNING", f"event=connect-timeout backend={b.name} in_a_row={b.connect_timeouts} "
                                      f"down_at={self.config.fall}")
        if b.connect_timeouts >= self.config.fall:
            self.mark(b, False, f"connect timeout ({b.connect_timeouts} in a row)")

    def suspect(self, b: BackendState, failure: str) -> None:
        """A connection to ``b`` broke (``failure``): check it now, and mark it down
        if the check fails (HAProxy's ``observe layer4`` with a fast check)."""
        if b.up and not b.suspected:
            b.suspected = True
            self.loop.create_task(self._check_suspect(b, failure))

    async def _check_suspect(self, b: BackendState, failure: str) -> None:
        try:
            ok, reason = await self._check(b)
        finally:
            b.suspected = False
        if not ok:
            self.mark(b, False, f"{failure}, then {reason}")
        elif self.elog.warning:  # (nginx: "upstream prematurely closed connection")
            self.elog.line("WARNING", f"event=backend-error backend={b.name} reason={failure} "
                                      f"check={logs.quote(reason)}")

    async def _check_forever(self, b: BackendState) -> None:
        cfg = self.config
        while True:
            ok, reason = await self._check(b)
            if ok:
                b.connect_timeouts = 0
            if ok == b.up:
                b.streak = 0
            else:
                b.streak += 1
                if b.streak >= (cfg.rise if ok else cfg.fall):
                    self.mark(b, ok, reason)
            await asyncio.sleep(cfg.check_interval)

    # -- forwarding ------------------------------------------------------------

    def _backend_request(self, req: Request, client_ip: str) -> bytes:
        """What goes to the backend for ``req``: HTTP/1.1 keep-alive, without the
        hop-by-hop fields and those its ``Connection`` names, with the client's
        address appended to its ``X-Forwarded-For`` and our entry to its ``Via``
        (each one line, the received lines combined in order: RFC 9110 5.3).

        Raises ``HttpError(431)`` when that request is over the limits (ours, the
        backends' by default) though the client's was not: a backend would refuse
        it, so it is refused here, before any backend is used, exactly where the
        backend's parser would (it counts a field as name, value and 4 bytes, as
        each line here is written)."""
        lines = []
        host = False
        forwarded: list[bytes] | None = None  # the X-Forwarded-For and Via values received, if any
        via: list[bytes] | None = None
        named: set[bytes] | None = None  # other fields the Connection header names
        head = req.method == b"HEAD"
        for k, v in req.headers:
            lk = k.lower()
            if lk in HOP_BY_HOP:
                if lk == b"connection":
                    named = connection_named(v, named)
                continue
            if head and lk in RANGE_FIELDS:
                continue  # a HEAD goes as a GET: its Range would make the answer a 206 (RFC 9110 14.2)
            if lk == b"x-forwarded-for":
                if v:
                    forwarded = [v] if forwarded is None else forwarded + [v]
                continue
            if lk == b"via":
                if v:
                    via = [v] if via is None else via + [v]
                continue
            host = host or lk == b"host"
            lines.append(b"%s: %s\r\n" % (k, v))
        if named:  # (rare: a Connection header may come after the fields it names)
            lines = [line for line in lines if line[:line.index(b":")].lower() not in named]
            forwarded = None if b"x-forwarded-for" in named else forwarded
            via = None if b"via" in named else via
        if not host:
            # An HTTP/1.0 client may leave Host out; HTTP/1.1 to the backend needs one: the
            # balancer's own address, the one the client reached (nginx sends the upstream's
            # name; an empty Host, which RFC 9112 3.2 also allows, gets nginx's 400).
            lines.append(self.own_host)
        xff = client_ip.encode() if forwarded is None else b", ".join(forwarded + [client_ip.encode()])
        # (keep-alive is HTTP/1.1's default: no Connection header, one header less to parse)
        target = req.target
        ours = VIA if req.version == "1.1" else VIA_10  # the version received (RFC 9110 7.6.3)
        data = (b"GET %s HTTP/1.1\r\n%sX-Forwarded-For: %s\r\nVia: %s\r\n\r\n"
                % (target, b"".join(lines), xff, ours if via is None else b", ".join(via + [ours])))
        if len(data) > self.short and (len(data) - len(target) > self.bytes_room or len(lines) > self.fields_room):
            raise HttpError(431, "request headers too large with X-Forwarded-For and Via added")
        return data

    def _client_response(self, req: Request, answer: BackendAnswer, b: BackendState) -> bytes:
        """The answer as the client gets it. The same answer again (the backend's
        KnownAnswer) for the same kind of request within the same second is the same
        bytes: those are kept, and given again."""
        date = http_date()
        last = b.last_response
        if (last is not None and last[0] is answer and last[1] is date and last[2] == req.version
                and last[3] == req.keep_alive and last[4] == req.method):
            return last[5]
        status = answer.status
        # No Content-Length for a 204 or 304 (RFC 9110 8.6): a 304's would have to be the 200's.
        length = b"" if status in (204, 304) else b"Content-Length: %d\r\n" % answer.length
        head = self._client_head(req, status, answer.reason, answer.headers, b, length, req.keep_alive)
        out = head if req.method == b"HEAD" or status in (204, 304) else head + answer.body
        b.last_response = (answer, date, req.version, req.keep_alive, req.method, out)
        return out

    def _streamed_head(self, req: Request, conn: BackendConn, b: BackendState) -> tuple[bytes, bool, bool]:
        """The head for an answer whose body is passed on as it comes: the head,
        whether the body goes chunked, and whether the connection stays open."""
        length = None
        for k, v in conn.headers:
            lk = k.lower()
            if lk == b"transfer-encoding":
                length = None
                break
            if lk == b"content-length":
                length = v.strip()
        if length is not None:  # the backend's own length (its parser checked the body against it)
            framing, chunked, keep = b"Content-Length: %s\r\n" % length, False, req.keep_alive
        elif req.version == "1.1":
            framing, chunked, keep = b"Transfer-Encoding: chunked\r\n", True, req.keep_alive
        else:  # an HTTP/1.0 client: the close ends the body
            framing, chunked, keep = b"", False, False
        return self._client_head(req, conn.status, conn.reason, conn.headers, b, framing, keep), chunked, keep

    def _client_head(self, req: Request, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                     b: BackendState, framing: bytes, keep: bool) -> bytes:
        if headers != b.last_headers:  # else as for its last answer (they differ by the Date, once a second)
            b.last_kept, b.last_via = self._kept_headers(headers, b)
            b.last_headers = headers
        if not keep:
            conn = b"Connection: close\r\n"
        elif req.version == "1.0":
            conn = b"Connection: keep-alive\r\n"
        else:
            conn = b""  # keep-alive is HTTP/1.1's default (the servers do not say it either)
        return (b"HTTP/1.1 %d %s\r\n%sDate: %s\r\n%sVia: %s\r\n%s\r\n"
                % (status, reason or reason_phrase(status), b.last_kept,
                   http_date(), framing, b.last_via, conn))

    @staticmethod
    def _kept_headers(headers: list[tuple[bytes, bytes]], b: BackendState) -> tuple[bytes, bytes]:
        """The answer's header lines the client gets, with X-Backend added if the
        backend left it out, and the ``Via`` value: the backend's with our entry
        appended. Hop-by-hop fields and those its ``Connection`` names stay here."""
        named: set[bytes] | None = None
        for k, v in headers:
            if k.lower() == b"connection":
                named = connection_named(v, named)
        lines = []
        via = []
        has_backend = False
        for k, v in headers:
            lk = k.lower()
            if lk in HOP_BY_HOP or lk == b"date" or (named is not None and lk in named):
                continue
            if lk == b"via":
                if v:
                    via.append(v)
                continue
            if lk == b"x-backend":
                has_backend = True
            lines.append(b"%s: %s\r\n" % (k, v))
        if not has_backend:
            lines.append(b"X-Backend: %s\r\n" % b.name.encode())
        return b"".join(lines), b", ".join(via + [VIA])

    # -- serving ---------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        cfg = self.config
        self._server = await loops.create_server(self.loop, lambda: ProxyClient(self), cfg.host, cfg.port,
                                                     backlog=4096, reuse_address=True)
        here = [sock.getsockname() for sock in self._server.sockets]
        for b in self.backends:  # (the connects look the name up each time: a name that moves is followed)
            if any(is_listener(here, *found) for found in lookup(b.name, b.spec.host, b.spec.port)):
                raise ConfigError(f"backend {b.name} ({host_port(b.spec.host, b.spec.port)}) is lb.py's own "
                                  f"address: it would send its requests back to itself")
        host = cfg.host.encode("idna")
        self.own_host = b"Host: %s:%d\r\n" % (b"[%s]" % host if b":" in host else host, self.port)
        for b in self.backends:
            self.loop.create_task(self._check_forever(b))
        self.loop.create_task(self._sweep())

    async def start_admin(self) -> None:
        """/stats and /metrics on ``admin_port`` (``stats.py``)."""
        cfg = self.config
        self._admin = await admin.start_admin(self.loop, cfg.host, cfg.admin_port, lambda: proxy_stats(self),
                                              ProxyCollector(self))

    async def _sweep(self) -> None:
        """Deadlines, checked four times a second rather than with a timer per request."""
        limits = self.config.limits
        timeout = self.config.response_timeout
        while True:
            await asyncio.sleep(0.25)
            try:
                now = time.monotonic()
                for c in list(self.connections):
                    c.sweep(now, limits)
                for b in self.backends:
                    for conn in [c for c in b.busy if now - c.waiting_since > timeout and not c.paused]:
                        conn._drop(TimeoutError())
                self.turned_away.flush()
            except Exception as exc:  # a bug must not end every deadline for good
                self.loop.call_exception_handler({"message": "lb sweep failed", "exception": exc})

    def _abort_all(self) -> None:
        for c in list(self.connections):
            c.transport.abort()  # type: ignore[union-attr]

    async def serve_until_stopped(self) -> None:
        await self.stop_signal.wait()
        self.turned_away.flush(now=True)
        self._server.close()  # type: ignore[union-attr]
        if self._admin is not None:
            self._admin.close()
        deadline = self.loop.time() + self.config.drain_timeout
        while (self.loop.time() < deadline and not self.stop_signal.forced
               and any(not c.idle() for c in self.connections)):
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            if c.idle():
                c.transport.close()  # type: ignore[union-attr]
            else:
                reset(c.transport)  # type: ignore[arg-type]


class Exchange:
    """One request on its way through the balancer, for one ``ProxyClient``.

    It goes to the next healthy backend in turn: over an idle pooled
    connection when there is one (the steady state under keep-alive, handled
    in callbacks, with no task or future per request), else over a new one.
    A failure sends it on as nginx's ``proxy_next_upstream error timeout``
    does (see the module's notes); the answer, or the error answer, goes back
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
                _, conn = await self.proxy.loop.create_connection(lambda: BackendConn(b), b.spec.host, b.spec.port)
        except (OSError, TimeoutError) as exc:
            if local_shortage(exc):  # out of descriptors here: the backend is not to blame
                self._error(503, "the balancer is out of descriptors", "-")
                return
            b.failures += 1
            if isinstance(exc, TimeoutError):
                self.timed_out = b  # (504 if no backend is left, as nginx's for a connect timeout)
                self.proxy.connect_timed_out(b)
            else:
                self.proxy.mark(b, False, f"connect {type(exc).__name__}")
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
            self.proxy.mark(b, False, "response timeout")
        elif lost:
            self.broke = b  # (502 if no backend is left)
            self.proxy.suspect(b, type(exc).__name__)
        # (BackendDown: marked down already; BadGateway: it answers, only wrongly.)
        if self.streaming:  # part of the answer is with the client: it cannot go elsewhere now
            self.client.cut(self.req, conn.status, b.name, self.sent)
        elif isinstance(exc, BadGateway):
            self._error(502, f"{b.name} sent a malformed answer", b.name)
        else:  # idempotent (GET, HEAD): the next backend
            self.next_backend()

    def _error(self, status: int, why: str, backend: str) -> None:
        # (error_response says Connection: close: the connection ends after it)
        self.client.answered(self.req, status, error_response(HttpError(status, why)), backend, keep=False)


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


def _alive(status_line: bytes) -> bool:
    """A health check passes on any HTTP answer below 500: the backend is up and
    speaks HTTP, even one that has no ``/healthz`` (nginx, ``python -m http.server``
    answer it 404). 5xx, garbage or silence fail it."""
    parts = status_line.split(b" ", 2)
    return (len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1].isdigit()
            and len(parts[1]) == 3 and 100 <= int(parts[1]) < 500)


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
        self.last_key: tuple | None = None  # the last request's target and headers,
        self.last_data = b""  # and what went to the backend for it
        self.paused_since = 0.0  # when the client stopped reading its answers (0: it reads)
        self.buffered = 0  # while paused: what was unsent at the last sweep (less now: it read)
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.closing = False
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
        do) has the same bytes again: they depend on its target and header fields
        alone (and the client's address), all in the key."""
        key = (req.target, req.headers)
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
        if not keep:
            self.closing = True
            if status >= 400:  # the client may still be sending: a reset could take the answer with it
                self.lingering = Linger(self.transport)  # type: ignore[arg-type]
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
