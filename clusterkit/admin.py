"""An admin endpoint: ``GET /stats`` (JSON) and ``GET /metrics`` (Prometheus
text format) on a port of its own, for the TCP balancer (``--admin-port``,
default 7100) and the HTTP one (``lb.py --admin-port``).

Requests are parsed with httptools (the C parser behind uvicorn); the metrics
come from prometheus_client through a collector that reads the counters when
scraped, so nothing is counted twice and the hot path pays nothing. One
request per connection; the admin port is for humans and scrapers, not load.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from email.utils import formatdate

import httptools
from prometheus_client import CollectorRegistry, generate_latest

from .sockets import listen_hosts

MAX_REQUEST = 8192
"""Bytes of a request head; more is refused (431), as nginx's and HAProxy's buffers do.
Unbounded, a never-ending request line stalled the loop the traffic shares."""
MAX_BODY = 1 << 20
"""Bytes of a request body read (and dropped) at most; more is refused (413)."""
REQUEST_TIMEOUT = 10.0
"""Seconds an admin connection has for its request: then 408 for one begun, a close for none."""
MAX_ADMIN_CONNECTIONS = 32
"""Admin connections open at once, so that scrapers (or anyone) can never take the
descriptors the clients and health checks need. One more closes the oldest that has
sent nothing yet (32 idle connections made every scrape a 503), or, when every one
is busy with a request, gets a 503 and the close."""


class AdminProtocol(asyncio.Protocol):
    def __init__(self, stats: Callable[[], dict], registry: CollectorRegistry, open_: dict) -> None:
        self.stats = stats
        self.registry = registry
        self.open = open_  # every admin connection open now, the oldest first (as keys)
        self.url = b""
        self.method = b""
        self.received = 0
        self.head = 0  # bytes of the head's target and headers, counted as the parser finds them
        self.head_done = False
        self.body = 0
        """Bytes of the request's body: a body (a POST's, which gets its 405 once read,
        so that no reset takes the answer away) is bounded apart from the head."""
        self.complete = False
        self.answered = False
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self.timed_out)
        if len(self.open) >= MAX_ADMIN_CONNECTIONS:
            idle = next((c for c in self.open if not c.received), None)
            if idle is None:  # (a 503 and the close: a reset told nothing)
                self.send(503, b"text/plain", b"too many admin connections at once: try again\n")
                return
            idle.transport.abort()  # type: ignore[union-attr]
            self.open.pop(idle, None)
        self.open[self] = None

    def timed_out(self) -> None:
        """No whole request in time: a 408 for one begun (as the HTTP servers answer a
        slow request head), else the close."""
        if self.received and not self.answered:
            self.send(408, b"text/plain", b"request timeout\n")
        else:
            self.transport.abort()  # type: ignore[union-attr]

    # (Each callback leaves alone a request pipelined behind the first, which is not
    # answered: its target was added to the first's, "/stats" and "/metrics" made a 404.)
    def on_url(self, url: bytes) -> None:
        if not self.complete:
            self.url += url
            self.head += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        self.head += len(name) + len(value) + 4
        if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > MAX_BODY:
            self.body = int(value)  # a body said to be too large is refused at once, not once it came

    def on_headers_complete(self) -> None:
        if not self.complete:
            self.head_done = True
            self.method = self.parser.get_method()  # (a refused HEAD's answer is its head alone too)

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body += len(body)

    def on_message_complete(self) -> None:
        self.complete = True  # (answered once the limits are looked at: data_received)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return  # one request per connection: the rest is not read
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self.complete:  # (a bad request behind the first, whole one: not read, as the rest)
                if not self.answered:
                    self.send(400, b"text/plain", b"bad request\n")
                return
        if self.answered:
            return
        # A head not yet ended is all that has come; one ended in this read, what the parser counted.
        if (self.head if self.head_done else self.received) > MAX_REQUEST:
            self.send(431, b"text/plain", b"request too large\n")
        elif self.body > MAX_BODY:
            self.send(413, b"text/plain", b"request body too large\n")
        elif self.complete:
            self.respond()

    def respond(self) -> None:
        path = httptools.parse_url(self.url).path.decode("latin-1") if self.url else "/"
        if self.method not in (b"GET", b"HEAD"):
            self.send(405, b"text/plain", b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
        elif path == "/stats":
            self.send(200, b"application/json", json.dumps(self.stats(), indent=2).encode() + b"\n")
        elif path == "/metrics":
            self.send(200, b"text/plain; version=0.0.4; charset=utf-8", generate_latest(self.registry))
        else:
            self.send(404, b"text/plain", b"not found: try /stats or /metrics\n")

    def send(self, status: int, ctype: bytes, body: bytes, extra: bytes = b"") -> None:
        self.answered = True
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
                  408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large",
                  503: b"Service Unavailable"}[status]
        head = (b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s"
                b"Connection: close\r\n\r\n" % (status, reason, formatdate(usegmt=True).encode(), ctype, len(body),
                                                     extra))
        assert self.transport is not None
        self.transport.write(head if self.method == b"HEAD" else head + body)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.open.pop(self, None)
        self.parser = None  # (it holds this object: let both go without the garbage collector)


async def start_admin(loop: asyncio.AbstractEventLoop, host: str, port: int, stats: Callable[[], dict],
                      collector) -> asyncio.base_events.Server:
    """Serve ``stats()`` as /stats and what ``collector`` yields (a prometheus_client
    custom collector) as /metrics on host:port."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    open_: dict[AdminProtocol, None] = {}
    return await loop.create_server(lambda: AdminProtocol(stats, registry, open_), listen_hosts(host), port,
                                    reuse_address=True)
