"""The balancer's admin endpoint: ``GET /stats`` (JSON) and ``GET /metrics``
(Prometheus text format), on ``--admin-port`` (default 7100).

Requests are parsed with httptools (the C parser behind uvicorn); the metrics
come from prometheus_client through a collector that reads the pool when
scraped, so nothing is counted twice and the hot path pays nothing. One
request per connection; the admin port is for humans and scrapers, not load.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import httptools
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .app import Balancer

_STATES = ("UP", "FALLING", "DOWN", "RISING")


class PoolCollector:
    """Turns the balancer's counters into Prometheus metrics at scrape time."""

    def __init__(self, app: Balancer) -> None:
        self.app = app

    def collect(self):
        app = self.app
        up = GaugeMetricFamily("clusterkit_backend_up", "1 when the backend takes traffic", labels=["backend"])
        state = GaugeMetricFamily("clusterkit_backend_state", "the backend's health state", labels=["backend", "state"])
        active = GaugeMetricFamily("clusterkit_backend_active_connections", "client connections on the backend",
                                   labels=["backend"])
        messages = CounterMetricFamily("clusterkit_backend_messages", "messages answered by the backend",
                                       labels=["backend"])
        failures = CounterMetricFamily("clusterkit_backend_failures", "traffic errors seen on the backend",
                                       labels=["backend"])
        conns = CounterMetricFamily("clusterkit_backend_connections", "client connections sent to the backend",
                                    labels=["backend"])
        reused = CounterMetricFamily("clusterkit_backend_reused_connections",
                                     "client connections that took an idle backend connection", labels=["backend"])
        idle = GaugeMetricFamily("clusterkit_backend_idle_connections", "idle backend connections kept for reuse",
                                 labels=["backend"])
        for b in app.pool.backends:
            up.add_metric([b.name], 1 if b.healthy else 0)
            for s in _STATES:
                state.add_metric([b.name, s], 1 if b.state == s else 0)
            active.add_metric([b.name], b.active)
            messages.add_metric([b.name], b.messages)
            failures.add_metric([b.name], b.failures)
            conns.add_metric([b.name], b.connections)
            reused.add_metric([b.name], b.reused)
            idle.add_metric([b.name], app.idle.count(b))
        yield from (up, state, active, messages, failures, conns, reused, idle)
        yield GaugeMetricFamily("clusterkit_client_connections", "client connections open now",
                                value=len(app.connections))
        yield CounterMetricFamily("clusterkit_failovers", "client connections moved to another backend",
                                  value=app.failovers)
        yield CounterMetricFamily("clusterkit_no_backend_errors", "messages answered ERR no-backend",
                                  value=app.no_backend_errors)


MAX_REQUEST = 8192
"""Bytes of a request head; more is refused (431), as nginx's and HAProxy's buffers do.
Unbounded, a never-ending request line stalled the loop the traffic shares."""
REQUEST_TIMEOUT = 10.0
"""Seconds an admin connection has for its request: then 408 for one begun, a close for none."""
MAX_ADMIN_CONNECTIONS = 32
"""Admin connections open at once; more are closed at once, so that scrapers (or
anyone) can never take the descriptors the clients and health checks need."""


class AdminProtocol(asyncio.Protocol):
    def __init__(self, app: Balancer, registry: CollectorRegistry, open_: set) -> None:
        self.app = app
        self.registry = registry
        self.open = open_  # every admin connection open now
        self.url = b""
        self.method = b""
        self.received = 0
        self.answered = False
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self.timed_out)
        if len(self.open) >= MAX_ADMIN_CONNECTIONS:
            self.answered = True
            transport.abort()
            return
        self.open.add(self)

    def timed_out(self) -> None:
        """No whole request in time: a 408 for one begun (as the HTTP servers answer a
        slow request head), else the close."""
        if self.received and not self.answered:
            self.send(408, b"text/plain", b"request timeout\n")
        else:
            self.transport.abort()  # type: ignore[union-attr]

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.method = self.parser.get_method()
        self.respond()

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return  # one request per connection: the rest is not read
        self.received += len(data)
        if self.received > MAX_REQUEST:
            self.send(431, b"text/plain", b"request too large\n")
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self.answered:
                self.send(400, b"text/plain", b"bad request\n")

    def respond(self) -> None:
        path = httptools.parse_url(self.url).path.decode("latin-1") if self.url else "/"
        if self.method not in (b"GET", b"HEAD"):
            self.send(405, b"text/plain", b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
        elif path == "/stats":
            self.send(200, b"application/json", json.dumps(self.app.stats(), indent=2).encode() + b"\n")
        elif path == "/metrics":
            self.send(200, b"text/plain; version=0.0.4; charset=utf-8", generate_latest(self.registry))
        else:
            self.send(404, b"text/plain", b"not found: try /stats or /metrics\n")

    def send(self, status: int, ctype: bytes, body: bytes, extra: bytes = b"") -> None:
        self.answered = True
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
                  408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n"
                % (status, reason, ctype, len(body), extra))
        assert self.transport is not None
        self.transport.write(head if self.method == b"HEAD" else head + body)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.open.discard(self)
        self.parser = None  # (it holds this object: let both go without the garbage collector)


async def start_admin(app: Balancer, host: str, port: int) -> asyncio.base_events.Server:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(app))
    open_: set[AdminProtocol] = set()
    return await app.loop.create_server(lambda: AdminProtocol(app, registry, open_), host, port,
                                        reuse_address=True)
