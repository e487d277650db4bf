"""The backend pool: each backend's health state, counters and latency, and the
choice of a backend for a new connection.

How health works (HAProxy's model): a backend is UP, FALLING (up, but the last
checks failed, fewer than ``fall`` of them), DOWN, or RISING (down, but the last
checks passed, fewer than ``rise`` of them). Traffic goes to UP and FALLING
backends. Active checks move a backend one step at a time; an error seen on real
traffic (a refused connect, a reset) takes it DOWN at once, so that no other
client is sent there, and only ``rise`` good checks bring it back.

A timeout is no such proof. A connect that times out may be one lost SYN (the
kernel sends it again only after a second); a message left unanswered past the
response timeout may be a slow or congested network. Each takes the backend DOWN
only at the ``fall``-th in a row (``connect_timed_out``, ``response_timed_out``:
one per response timeout at most); a connect that succeeds, an answer, or a check
that passes starts the count again. The client goes to the next backend at once
either way. (HAProxy, by default, leaves the server's state alone on a timeout;
with ``observe layer4`` it counts errors in a row.)

    state    check ok                    check failed               traffic error
    UP       UP                          FALLING (DOWN if fall=1)   DOWN
    FALLING  UP                          FALLING, DOWN at fall      DOWN
    DOWN     RISING (UP if rise=1)       DOWN                       DOWN
    RISING   RISING, UP at rise          DOWN                       DOWN

What it is not: the checker (health.py) or the relays; they report here.
"""

from __future__ import annotations

import bisect
import errno
import logging
from collections.abc import Callable, Collection

from ..sockets import host_port
from .algorithms import ALGORITHMS
from .config import BackendSpec, BalancerConfig

UP, FALLING, DOWN, RISING = "UP", "FALLING", "DOWN", "RISING"
HEALTHY = (UP, FALLING)

log = logging.getLogger("clusterkit.balancer")

# Latency buckets in milliseconds (upper bounds), for cheap percentiles: 2% apart,
# from 10 us to 77 s (15% apart, the p50, p90 and p99 of three backends read the same).
_BOUNDS_MS = [0.01 * 1.02 ** i for i in range(800)]


def connect_failure(exc: BaseException) -> str:
    """A short reason for a failed connect to a backend (for logs and /stats)."""
    if isinstance(exc, TimeoutError):
        return "connect-timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connect-refused"
    name = errno.errorcode.get(getattr(exc, "errno", None) or 0, "error")
    return f"connect-{name.lower()}"


def check_reason(passed: bool, reason: str, rise: int, fall: int) -> str:
    """Why the health checks moved a backend, as both balancers log it: ``2 checks
    passed``, ``check passed`` (rise 1), ``check refused (3 checks failed)``, or
    the last check's reason alone (fall 1)."""
    if passed:
        return f"{rise} checks passed" if rise > 1 else "check passed"
    return f"{reason} ({fall} checks failed)" if fall > 1 else reason


class LatencyHistogram:
    """A fixed log-bucket histogram: one bisect per value, percentiles within 2%."""

    __slots__ = ("counts", "total", "max_ms")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS_MS) + 1)
        self.total = 0
        self.max_ms = 0.0

    def record(self, ms: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS_MS, ms)] += 1
        self.total += 1
        if ms > self.max_ms:
            self.max_ms = ms

    def percentile(self, p: float) -> float | None:
        if not self.total:
            return None
        rank = p / 100 * self.total
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return min(_BOUNDS_MS[i] if i < len(_BOUNDS_MS) else self.max_ms, self.max_ms)
        return self.max_ms

    def summary(self) -> dict:
        """What /stats shows: the count, p50, p90, p99 and max in ms (None while empty)."""
        return {"count": self.total, **{f"p{p}": _round(self.percentile(p)) for p in (50, 90, 99)},
                "max": _round(self.max_ms) if self.total else None}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class Backend:
    """One backend server as the balancer sees it."""

    def __init__(self, index: int, spec: BackendSpec) -> None:
        self.index = index
        self.spec = spec
        self.name = spec.name
        self.host = spec.host
        self.port = spec.port
        self.weight = spec.weight
        self.current_weight = 0  # for smooth weighted round-robin
        self.state = UP
        self.count = 0  # consecutive check results toward the next state
        self.reason = "initial"
        self.active = 0  # client connections on it now
        self.connections = 0
        self.reused = 0  # client connections that took an idle connection to it (message mode, reuse.py)
        self.messages = 0
        self.bytes_in = 0  # --mode tcp, its client connections that have ended: from the clients,
        self.bytes_out = 0  # and to them (a byte relay sees no messages)
        self.failures = 0
        self.connect_timeouts = 0  # traffic connects timed out in a row (Pool.connect_timed_out)
        self.response_timeouts = 0  # response timeouts in a row, one per --response-timeout at most (message mode)
        self.response_timeout_at = float("-inf")  # when the last one was counted
        self.failovers = 0
        self.checks_ok = 0
        self.checks_failed = 0
        self.latency = LatencyHistogram()
        self.addresses: list[tuple[int, tuple]] = []  # (family, sockaddr) each, resolved at start (epollset.resolve)
        self.address: tuple[int, tuple] | None = None  # the one the traffic goes to (health.check_once)

    @property
    def healthy(self) -> bool:
        return self.state in HEALTHY

    def snapshot(self) -> dict:
        return {
            "name": self.name, "address": host_port(self.host, self.port),
            "connects_to": host_port(*self.address[1][:2]) if self.address else None, "weight": self.weight,
            "state": self.state, "reason": self.reason, "active_connections": self.active,
            "connections": self.connections, "reused_connections": self.reused, "messages": self.messages,
            "failures": self.failures, "failovers_from": self.failovers, "checks_ok": self.checks_ok,
            "checks_failed": self.checks_failed,
            "latency_ms": self.latency.summary(),
        }


class Pool:
    """All backends, their states, and the algorithm that picks one."""

    def __init__(self, config: BalancerConfig,
                 on_change: Callable[[Backend, str, str], None] | None = None) -> None:
        self.rise = config.rise
        self.fall = config.fall
        self.backends = [Backend(i, spec) for i, spec in enumerate(config.backends)]
        self.algorithm = ALGORITHMS[config.algorithm](len(self.backends))
        self.on_change = on_change
        self.no_backend = 0

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.state in HEALTHY]

    def choose(self, exclude: Collection[Backend] = ()) -> Backend | None:
        """A healthy backend for a new connection, not one of ``exclude`` (those its
        client has tried already), or None when none is healthy."""
        healthy = [b for b in self.backends if b.state in HEALTHY and b not in exclude]
        if not healthy:
            self.no_backend += 1
            return None
        return self.algorithm.choose(healthy)

    # -- state transitions (see the table in the module docstring) ------------

    def _set(self, b: Backend, state: str, reason: str) -> None:
        old = b.state
        b.state = state
        b.count = 0
        b.reason = reason
        if (old in HEALTHY) != (state in HEALTHY) and self.on_change is not None:
            self.on_change(b, old, state)

    def check_passed(self, b: Backend) -> None:
        b.checks_ok += 1
        b.connect_timeouts = b.response_timeouts = 0
        if b.state in (UP, FALLING):
            if b.state == FALLING:
                self._set(b, UP, "check passed")
        elif b.state == DOWN:
            if self.rise <= 1:
                self._set(b, UP, check_reason(True, "", self.rise, self.fall))
            else:
                b.state, b.count = RISING, 1
        else:  # RISING
            b.count += 1
            if b.count >= self.rise:
                self._set(b, UP, check_reason(True, "", self.rise, self.fall))

    def check_failed(self, b: Backend, reason: str) -> None:
        b.checks_failed += 1
        if b.state == UP:
            if self.fall <= 1:
                self._set(b, DOWN, check_reason(False, reason, self.rise, self.fall))
            else:
                b.state, b.count, b.reason = FALLING, 1, reason
        elif b.state == FALLING:
            b.count += 1
            if b.count >= self.fall:
                self._set(b, DOWN, check_reason(False, reason, self.rise, self.fall))
        elif b.state == RISING:
            self._set(b, DOWN, reason)

    def traffic_error(self, b: Backend, reason: str) -> None:
        b.failures += 1
        if b.state != DOWN:
            self._set(b, DOWN, reason)

    def connect_timed_out(self, b: Backend) -> None:
        """A connect for traffic took longer than the connect timeout: DOWN at the
        ``fall``-th in a row (see the module docstring)."""
        b.failures += 1
        b.connect_timeouts += 1
        if b.connect_timeouts >= self.fall and b.state != DOWN:
            self._set(b, DOWN, f"connect-timeout ({b.connect_timeouts} in a row)")

    def response_timed_out(self, b: Backend, now: float, timeout: float) -> None:
        """A message left unanswered past the response ``timeout``: DOWN at the
        ``fall``-th in a row (an answer starts the count again), counting one at
        most per ``timeout``: the clients that wait on one slow moment time out
        together, and are one timeout. So a backend that answers nothing for
        (fall - 1) response timeouts after the first goes DOWN (a stopped one:
        about as soon as its checks take it out); one slow on a slow, lossy or
        congested network, that still answers now and then, stays. One late
        answer took a backend down at once, and with all of them down so,
        clients got ERR no-backend from live servers (HAProxy and nginx take
        none down for a slow answer)."""
        b.failures += 1
        if now - b.response_timeout_at < timeout:
            return
        b.response_timeout_at = now
        b.response_timeouts += 1
        if b.response_timeouts >= self.fall and b.state != DOWN:
            self._set(b, DOWN, f"response-timeout ({b.response_timeouts} in a row)")

    @staticmethod
    def connected(b: Backend) -> None:
        """A connect for traffic succeeded: the connect timeouts in a row start again."""
        b.connect_timeouts = 0
