"""lb.py's admin endpoint (``--admin-port``, off by default): ``/stats`` (JSON)
and ``/metrics`` (Prometheus), served by ``clusterkit/admin.py`` as the TCP
balancer's are. Per backend: its state and the reason for it, requests
answered, failures, requests in flight, idle pooled connections, and the
latency from the request's send to its answer (p50/p90/p99, max)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..sockets import host_port

if TYPE_CHECKING:
    from .proxy import BackendState, Proxy


def backend_stats(b: BackendState) -> dict:
    return {
        "name": b.name, "address": host_port(b.spec.host, b.spec.port), "state": "UP" if b.up else "DOWN",
        "reason": b.reason, "requests": b.requests, "failures": b.failures, "in_flight": len(b.busy),
        "idle_connections": len(b.idle),
        "latency_ms": b.latency.summary(),
    }


def proxy_stats(proxy: Proxy) -> dict:
    return {
        "uptime_s": round(time.time() - proxy.started, 3),
        "client_connections": len(proxy.connections),
        "requests": sum(b.requests for b in proxy.backends),
        "backends": [backend_stats(b) for b in proxy.backends],
    }


PER_BACKEND = (
    (GaugeMetricFamily, "clusterkit_http_backend_up", "1 when the backend takes requests", lambda b: int(b.up)),
    (CounterMetricFamily, "clusterkit_http_backend_requests", "requests the backend answered", lambda b: b.requests),
    (CounterMetricFamily, "clusterkit_http_backend_failures", "failed requests on the backend", lambda b: b.failures),
    (GaugeMetricFamily, "clusterkit_http_backend_requests_in_flight", "requests waiting for the backend's answer",
     lambda b: len(b.busy)),
    (GaugeMetricFamily, "clusterkit_http_backend_idle_connections", "idle pooled keep-alive connections",
     lambda b: len(b.idle)),
)
"""Each backend's metrics: the family, its name and help, and its value."""


class ProxyCollector:
    """lb.py's counters as Prometheus metrics, read when scraped."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self):
        for family, name, doc, value in PER_BACKEND:
            metric = family(name, doc, labels=["backend"])
            for b in self.proxy.backends:
                metric.add_metric([b.name], value(b))
            yield metric
        yield GaugeMetricFamily("clusterkit_http_client_connections", "client connections open now",
                                value=len(self.proxy.connections))
