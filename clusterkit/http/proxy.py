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
Both its clients' and its backends' connections are the loop's transports
(uvloop's when installed). The clients' were raw sockets in an epoll set of
their own (``epollset.py``), as the async server's still are: cheaper per
connection, but with the backends on the loop every turn then waited twice
(the loop's ``epoll_wait`` and the set's) and ran a Python layer per read
and write. On the loop's transports, under ``ab -k`` (6 interleaved rounds)
lb.py's user CPU per request went from 12.1 to 10.7 us and requests/s up
2.6%; without keep-alive it costs 4 us more per connection (ab -n 20000:
-6% requests/s, still about 1.5x HAProxy's).

A HEAD is forwarded as a HEAD, as nginx and HAProxy forward it; its answer
ends with its head (``BackendConn.on_headers_complete``), and the client gets
the backend's ``Content-Length``. A backend that sends a body after it loses
that connection, whose next answer those bytes would begin.

A long answer (past ``STREAM_AFTER``) is streamed: its head goes to the client
with the backend's ``Content-Length`` (or chunked, or close-delimited for an
HTTP/1.0 client), then its body as it comes, and the backend is read only as
fast as the client reads (``BackendConn.pause``). Such an answer is not
retried: a failure half-way resets the client's connection.

The code is in three modules. This one holds ``Proxy``, what lb.py builds:
the listener, the backends (``BackendState``), their health checks, the
choice among them, the header fields rewritten both ways, the deadlines and
the stop. ``downstream.py`` holds the client side: a client connection
(``ProxyClient``) and one request on its way (``Exchange``). ``upstream.py``
holds the backend side: a connection to a backend (``BackendConn``) and the
answers read on it.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import deque

from .. import admin, epollset, logs, loops
from ..balancer.health import os_failure
from ..balancer.pool import LatencyHistogram, check_reason
from ..config import ConfigError
from ..sockets import client_room, descriptor_room, host_port, is_listener, linger_room, open_socket
from .config import HttpBackend, ProxyConfig
from .core import HttpError, Request, connection_options, http_date, reason_phrase
from .downstream import ProxyClient, reset
from .stats import ProxyCollector, proxy_stats
from .upstream import BackendAnswer, BackendConn, BackendDown, KnownAnswer

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


def connection_named(value: bytes, named: set[bytes] | None) -> set[bytes] | None:
    """``named`` with the fields a ``Connection`` value lists (lower case): a proxy
    removes them (RFC 9110 7.6.1). Never Host, which a request cannot go without
    (and no client can make hop-by-hop)."""
    names = connection_options(value) - NOT_NAMED
    if not names:
        return named
    return names if named is None else named | names


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
        # Connect timeouts still counting toward --fall: a line a second at most per backend,
        # with how many since the last (a link that drops some SYNs and lets others through
        # starts the count again and again: the backend never went DOWN, and each was a line).
        self.timeouts_said = [elog.tally_latest(lambda latest, n: f"event=connect-timeout {latest} "
                                                                  f"down_at={self.config.fall} timeouts={n}")
                              for _ in self.backends]
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.AbstractServer | None = None
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
                                          f"from={'DOWN' if up else 'UP'} to={'UP' if up else 'DOWN'} "
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
                    reader, writer = await asyncio.open_connection(
                        sock=await open_socket(asyncio.get_running_loop(), b.spec.host, b.spec.port))
            except TimeoutError:
                return False, "check connect-timeout"
            async with asyncio.timeout(cfg.check_timeout):
                writer.write(request)
                status_line = await reader.readline()
                ok = _alive(status_line)
                return ok, "check passed" if ok else f"check answered {status_line[:40]!r}"
        except TimeoutError:
            return False, "check timeout"
        except OSError as exc:
            return False, f"check {os_failure(exc)}"
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
        errors in a row.) Said while it counts, a line a second at most per backend
        (``timeouts_said``): once down, the connects still timing out there are not counted."""
        b.connect_timeouts += 1
        if self.elog.warning and b.up:
            said = self.timeouts_said[b.index]
            said.count(latest=f"backend={b.name} in_a_row={b.connect_timeouts}")
            if b.connect_timeouts >= self.config.fall:
                said.flush(now=True)  # the one that takes it down, before the down line: no more come
        if b.connect_timeouts >= self.config.fall:
            self.mark(b, False, f"connect-timeout ({b.connect_timeouts} in a row)")

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
                    self.mark(b, ok, check_reason(ok, reason, cfg.rise, cfg.fall))
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
        for k, v in req.headers:
            lk = k.lower()
            if lk in HOP_BY_HOP:
                if lk == b"connection":
                    named = connection_named(v, named)
                continue
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
        data = (b"%s %s HTTP/1.1\r\n%sX-Forwarded-For: %s\r\nVia: %s\r\n\r\n"
                % (req.method, target, b"".join(lines), xff, ours if via is None else b", ".join(via + [ours])))
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
        # (A HEAD's answer has the length its backend gave, if any: RFC 9110 8.6.)
        length = b"" if status in (204, 304) or answer.length is None else b"Content-Length: %d\r\n" % answer.length
        head = self._client_head(req, status, answer.reason, answer.headers, b, length, req.keep_alive,
                                 answer.version)
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
        return (self._client_head(req, conn.status, conn.reason, conn.headers, b, framing, keep, conn.version),
                chunked, keep)

    def _client_head(self, req: Request, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                     b: BackendState, framing: bytes, keep: bool, version: str) -> bytes:
        if headers != b.last_headers:  # else as for its last answer (they differ by the Date, once a second)
            b.last_kept, b.last_via = self._kept_headers(headers, b)
            b.last_headers = headers
        if not keep:
            conn = b"Connection: close\r\n"
        elif req.version == "1.0":
            conn = b"Connection: keep-alive\r\n"
        else:
            conn = b""  # keep-alive is HTTP/1.1's default (the servers do not say it either)
        via = b.last_via if version != "1.0" else b.last_via[:-len(VIA)] + VIA_10  # (the version it came in)
        return (b"HTTP/1.1 %d %s\r\n%sDate: %s\r\n%sVia: %s\r\n%s\r\n"
                % (status, reason or reason_phrase(status), b.last_kept,
                   http_date(), framing, via, conn))

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
            if any(is_listener(here, *found) for found in epollset.lookup(b.name, b.spec.host, b.spec.port)):
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
                for said in self.timeouts_said:
                    said.flush()
            except Exception as exc:  # a bug must not end every deadline for good
                self.loop.call_exception_handler({"message": "lb sweep failed", "exception": exc})

    def _abort_all(self) -> None:
        for c in list(self.connections):
            c.transport.abort()  # type: ignore[union-attr]

    async def serve_until_stopped(self) -> None:
        await self.stop_signal.wait()
        self.turned_away.flush(now=True)
        self._flush_timeouts()
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
        self._flush_timeouts()  # (those of the drain)

    def _flush_timeouts(self) -> None:
        for said in self.timeouts_said:
            said.flush(now=True)


def _alive(status_line: bytes) -> bool:
    """A health check passes on any HTTP answer below 500: the backend is up and
    speaks HTTP, even one that has no ``/healthz`` (nginx, ``python -m http.server``
    answer it 404). 5xx, garbage or silence fail it."""
    parts = status_line.split(b" ", 2)
    return (len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1].isdigit()
            and len(parts[1]) == 3 and 100 <= int(parts[1]) < 500)
