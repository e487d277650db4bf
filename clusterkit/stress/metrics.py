"""What a run measured: counts, bytes, errors by kind, requests per backend, and
HDR histograms of connect, latency, rtt and total (ApacheBench's) that merge exactly across threads
and processes.

Hot loops append raw nanosecond values to plain lists (``Recorder``); they go
into the histograms in batches, off the per-request path. Histograms travel
between processes in HdrHistogram's compressed encoding, so a merged
percentile is exact, never an average of averages.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from .board import BUCKET_OF, LIVE_CACHE, bucket

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour
DIGITS = 3
PERCENTILES = (50, 90, 99, 99.9)
TIMINGS = ("latency", "rtt", "connect", "total")


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_between(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


@dataclass
class RunResult:
    complete: int = 0
    failed: int = 0
    bytes_received: int = 0
    first_send_ns: int | None = None
    last_reply_ns: int | None = None
    errors: Counter = field(default_factory=Counter)
    backends: Counter = field(default_factory=Counter)
    latency: HdrHistogram = field(default_factory=new_histogram)
    rtt: HdrHistogram = field(default_factory=new_histogram)
    connect: HdrHistogram = field(default_factory=new_histogram)
    total: HdrHistogram = field(default_factory=new_histogram)
    """ApacheBench's "Total": from the connect (when the request opened its connection,
    else from the send) to the end of the answer."""
    ended_early: str | None = None  # why the run stopped before its end, if it did
    local_shortage: bool = False  # it stopped for want of local ports here, not for the target
    interrupted: bool = False  # ... and whether that was Ctrl-C (else a dead target)
    tool_cpu_s: float = 0.0  # CPU the load processes used, summed over them ...
    tool_wall_s: float = 0.0  # ... and the wall time they ran, summed the same way
    machine_busy: float | None = None  # share of all cores busy during the run (Linux), 0..1
    server_cpu_s: float | None = None  # CPU of the local server under test after the warm-up (server_cpu.py)

    @property
    def tool_busy(self) -> float:
        """How busy the load generator was: the average share of a core per process.
        Near 1.0 it was the bottleneck, and measured the tool, not the server."""
        return self.tool_cpu_s / self.tool_wall_s if self.tool_wall_s else 0.0

    def merge(self, other: RunResult) -> None:
        self.complete += other.complete
        self.failed += other.failed
        self.bytes_received += other.bytes_received
        self.tool_cpu_s += other.tool_cpu_s
        self.tool_wall_s += other.tool_wall_s
        self.errors.update(other.errors)
        self.backends.update(other.backends)
        for name in TIMINGS:
            if getattr(other, name).get_total_count():
                getattr(self, name).add(getattr(other, name))
        if other.first_send_ns is not None:
            self.first_send_ns = min(filter(None, (self.first_send_ns, other.first_send_ns)))
        if other.last_reply_ns is not None:
            self.last_reply_ns = max(self.last_reply_ns or 0, other.last_reply_ns)

    @property
    def seconds(self) -> float:
        if self.first_send_ns is None or self.last_reply_ns is None:
            return 0.0
        return max(self.last_reply_ns - self.first_send_ns, 1) / 1e9

    def encode(self) -> dict:
        """A picklable/JSON-able form for sending across processes."""
        return {"complete": self.complete, "failed": self.failed, "bytes": self.bytes_received,
                "first": self.first_send_ns, "last": self.last_reply_ns, "errors": dict(self.errors),
                "cpu": self.tool_cpu_s, "wall": self.tool_wall_s,
                "backends": dict(self.backends),
                **{name: getattr(self, name).encode() if getattr(self, name).get_total_count() else None
                   for name in TIMINGS}}

    @classmethod
    def decode(cls, data: dict) -> RunResult:
        r = cls(complete=data["complete"], failed=data["failed"], bytes_received=data["bytes"],
                first_send_ns=data["first"], last_reply_ns=data["last"], errors=Counter(data["errors"]),
                backends=Counter(data["backends"]), tool_cpu_s=data["cpu"], tool_wall_s=data["wall"])
        for name in TIMINGS:
            if data.get(name):
                getattr(r, name).add(HdrHistogram.decode(data[name]))
        return r


KEEP_NONE, KEEP_FAILURES, KEEP_ALL = 0, 1, 2
"""What a Recorder keeps for the per-request log: nothing (--log-level error), the
failed requests (warning), every request (info)."""
LOG_KEPT = 1_000_000
"""Requests kept for the per-request log in one run, in all (about 190 bytes each, twice while merged):
past it, the answers are counted but not logged one by one, the failures still
are, up to as many again. Unbounded, a long --duration run held every request."""


class Recorder:
    """Per-worker timings, flushed into a RunResult's histograms.

    Timings are counted per distinct microsecond value first (a dict increment)
    and go into the HDR histograms with one ``record_value(value, count)`` per
    distinct value at the end: the same histograms, without paying hdrh's
    pure-Python ``record_value`` once per request, which was a sixth of the
    async engine's time.
    """

    __slots__ = ("result", "lat", "rtt", "both", "same", "con", "tot", "log", "answers", "fails", "log_cap", "live",
                 "live_base")

    DISTINCT = 100_000  # flush past this many distinct values (only with very spread timings)

    def __init__(self, result: RunResult, keep_log: int = KEEP_ALL, live=None, live_base: int = 0,
                 log_cap: int = LOG_KEPT) -> None:
        self.result = result
        self.live = live  # the board's array: a coarse histogram for the live view (see board.py)
        self.live_base = live_base
        self.lat: dict[int, int] = {}  # microseconds -> count
        self.rtt: dict[int, int] = {}
        self.both: dict[int, int] = {}  # answers whose first byte was their last: latency = rtt
        self.same: dict[int, int] = {}  # those, on a connection opened before their send: latency = rtt = total
        self.con: dict[int, int] = {}
        self.tot: dict[int, int] = {}
        self.answers: list[tuple] = []  # for the per-request log, up to log_cap
        self.log: list[tuple] | None = self.answers if keep_log >= KEEP_ALL else None  # None: full, or not kept
        self.fails: list[tuple] | None = [] if keep_log >= KEEP_FAILURES else None  # failures, up to log_cap
        self.log_cap = log_cap

    def ok(self, sent_ns: int, latency_ns: int, rtt_ns: int, backend: str, nbytes: int, done_ns: int,
           start_ns: int, connect_ns: int = 0) -> None:
        """``start_ns``: the connect's start when this request opened its connection, else ``sent_ns``;
        ``connect_ns``: that connect's time, for the log (0: none)."""
        r = self.result
        r.complete += 1
        r.bytes_received += nbytes
        r.backends[backend] += 1
        self._span(sent_ns, done_ns)
        lat_us = latency_ns // 1000 or 1
        rtt_us = rtt_ns // 1000 or 1
        lat, rtt = self.lat, self.rtt
        lat[lat_us] = lat.get(lat_us, 0) + 1
        rtt[rtt_us] = rtt.get(rtt_us, 0) + 1
        tot_us = (done_ns - start_ns) // 1000 or 1
        self.tot[tot_us] = self.tot.get(tot_us, 0) + 1
        if self.live is not None:
            self.live[self.live_base + (BUCKET_OF[lat_us] if lat_us < LIVE_CACHE else bucket(lat_us))] += 1
        log = self.log
        if log is not None:
            log.append((sent_ns, backend, latency_ns, rtt_ns, None, connect_ns))
            if len(log) >= self.log_cap:
                self.log = None  # (self.answers keeps it)
        if len(rtt) >= self.DISTINCT:
            self.flush()

    def whole(self, sent_ns: int, done_ns: int, backend: str, nbytes: int, start_ns: int, connect_ns: int = 0) -> None:
        """``ok`` for an answer that arrived in one piece (latency = rtt), the
        steady state of a keep-alive run (``plan.Client.whole``): the same
        counts, with one timing dict to update instead of three (``same``,
        when the request went on a connection opened before: total = rtt too)."""
        r = self.result
        r.complete += 1
        r.bytes_received += nbytes
        backends = r.backends
        backends[backend] = backends.get(backend, 0) + 1
        last = r.last_reply_ns
        if last is None or sent_ns < r.first_send_ns:
            self._span(sent_ns, done_ns)
        elif done_ns > last:  # (the rest of _span, inline)
            r.last_reply_ns = done_ns
        us = (done_ns - sent_ns) // 1000 or 1
        counts = self.same if start_ns == sent_ns else self.both
        counts[us] = counts.get(us, 0) + 1
        if counts is self.both:
            tot = self.tot
            tot_us = (done_ns - start_ns) // 1000 or 1
            tot[tot_us] = tot.get(tot_us, 0) + 1
        if self.live is not None:
            self.live[self.live_base + (BUCKET_OF[us] if us < LIVE_CACHE else bucket(us))] += 1
        log = self.log
        if log is not None:
            log.append((sent_ns, backend, done_ns - sent_ns, done_ns - sent_ns, None, connect_ns))
            if len(log) >= self.log_cap:
                self.log = None  # (self.answers keeps it)
        if len(counts) >= self.DISTINCT:
            self.flush()

    def failed(self, sent_ns: int, kind: str, done_ns: int, nbytes: int = 0) -> None:
        r = self.result
        r.failed += 1
        r.bytes_received += nbytes
        r.errors[kind] += 1
        self._span(sent_ns, done_ns)
        fails = self.fails
        if fails is not None and len(fails) < self.log_cap:
            fails.append((sent_ns, "-", None, None, kind, 0))

    def _span(self, sent_ns: int, done_ns: int) -> None:
        """Widen the run's window (first send to last answer) to include this request."""
        r = self.result
        if r.first_send_ns is None or sent_ns < r.first_send_ns:
            r.first_send_ns = sent_ns
        if r.last_reply_ns is None or done_ns > r.last_reply_ns:
            r.last_reply_ns = done_ns

    def connected(self, ns: int) -> None:
        us = ns // 1000 or 1
        self.con[us] = self.con.get(us, 0) + 1

    def entries(self) -> list[tuple]:
        """What the per-request log gets: the answers and the failures kept, each
        (sent, backend, latency, rtt, failure kind or None, the time of the connect
        it opened, or 0 when it went on a connection opened before), in ns."""
        return self.answers + (self.fails or [])

    def flush(self) -> None:
        r = self.result
        for counts, hist in ((self.lat, r.latency), (self.rtt, r.rtt), (self.both, r.latency), (self.both, r.rtt),
                             (self.same, r.latency), (self.same, r.rtt), (self.same, r.total),
                             (self.con, r.connect), (self.tot, r.total)):
            record = hist.record_value
            for us, count in counts.items():
                record(us, count)
        for counts in (self.lat, self.rtt, self.both, self.same, self.con, self.tot):
            counts.clear()
