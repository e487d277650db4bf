"""The balancer's admin endpoint (``clusterkit/admin.py``) on ``--admin-port``
(default 7100): ``/stats`` is ``Balancer.stats()``, ``/metrics`` what
``PoolCollector`` reads from the pool when scraped."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import admin

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
        tcp = app.config.mode == "tcp"  # a byte relay: bytes each way, no messages
        relayed = [CounterMetricFamily(f"clusterkit_backend_bytes_{way}", f"bytes relayed {what}",
                                       labels=["backend"])
                   for way, what in (("in", "from the clients"), ("out", "to the clients"))] if tcp else []
        for b in app.pool.backends:
            if tcp:
                counts = app.relayed(b)
                relayed[0].add_metric([b.name], counts["bytes_in"])
                relayed[1].add_metric([b.name], counts["bytes_out"])
            up.add_metric([b.name], 1 if b.healthy else 0)
            for s in _STATES:
                state.add_metric([b.name, s], 1 if b.state == s else 0)
            active.add_metric([b.name], b.active)
            messages.add_metric([b.name], b.messages)
            failures.add_metric([b.name], b.failures)
            conns.add_metric([b.name], b.connections)
            reused.add_metric([b.name], b.reused)
            idle.add_metric([b.name], app.idle.count(b))
        yield from (up, state, active, *relayed, failures, conns, reused, idle) if tcp else (
            up, state, active, messages, failures, conns, reused, idle)
        yield GaugeMetricFamily("clusterkit_client_connections", "client connections open now",
                                value=len(app.connections))
        # (a client with nothing unanswered when its backend goes is no failover: it takes
        # another at its next message, as the log says no event=failover for it)
        yield CounterMetricFamily("clusterkit_failovers", "failovers: client connections whose unanswered "
                                  "messages were resent to another backend", value=app.failovers)
        yield CounterMetricFamily("clusterkit_no_backend_errors", "messages answered ERR no-backend",
                                  value=app.no_backend_errors)


async def start_admin(app: Balancer, host: str, port: int) -> asyncio.base_events.Server:
    return await admin.start_admin(app.loop, host, port, app.stats, PoolCollector(app))
