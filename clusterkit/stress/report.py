"""The stress tool's report: SPEC.md's columns (ApacheBench's meanings), the
latency/rtt/connect/total percentiles, requests per backend and errors by kind.

``summarize()`` turns a RunResult into one plain dict (a row); JSON, CSV and
markdown are written from those rows, and the rich table in the CLI shows the
same numbers, so every format agrees.
"""

from __future__ import annotations

import csv
import io
import json

from .. import logs
from ..sockets import host_port
from .config import StressConfig
from .metrics import PERCENTILES, TIMINGS, RunResult

COLUMNS = [
    ("concurrency", "Concurrency level"),
    ("time_taken_s", "Time taken for test (s)"),
    ("complete", "Complete requests"),
    ("failed", "Failed requests"),
    ("total_transferred_bytes", "Total transferred (bytes)"),
    ("requests_per_second", "Requests per second (#/sec)"),
    ("time_per_request_ms", "Time per request (ms)"),
    ("time_per_request_all_ms", "Time per request, across all concurrent requests (ms)"),
    ("transfer_rate_kbps", "Transfer rate (Kbytes/sec)"),
]


TIMING_GROUPS = tuple(f"{name}_ms" for name in TIMINGS)
"""Percentile groups of a row; total = ApacheBench's "Total" (connect, when the
request opened its connection, to the end of the answer), what ab's percentile
table shows."""


def _pcts(hist) -> dict:
    if not hist.get_total_count():
        return {f"p{p}": None for p in PERCENTILES} | {"max": None, "mean": None}
    out = {f"p{p}": hist.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
    out["max"] = hist.get_max_value() / 1000
    out["mean"] = round(hist.get_mean_value() / 1000, 3)
    return out


def summarize(cfg: StressConfig, r: RunResult) -> dict:
    t = r.seconds
    complete = r.complete
    client = round(r.tool_busy * 100, 1)
    machine = None if r.machine_busy is None else round(r.machine_busy * 100, 1)
    server = round(r.server_cpu_s / t * 100, 1) if r.server_cpu_s is not None and t else None
    return {
        "target": cfg.http_url or host_port(cfg.host, cfg.port),
        "engine": cfg.engine, "processes": cfg.processes, "connection": cfg.connection,
        "concurrency": cfg.concurrency,
        "rate": cfg.rate,  # None: closed loop; else open loop at this many requests/s in all
        # Open loop for a duration: the requests the schedule had; those never sent (the
        # server held every client back past the end) are neither complete nor failed.
        "scheduled": round(cfg.rate * (cfg.duration - cfg.warmup)) if cfg.rate and cfg.duration else None,
        "time_taken_s": round(t, 6),
        "complete": complete,
        "failed": r.failed,
        "total_transferred_bytes": r.bytes_received,
        "requests_per_second": round(complete / t, 2) if t else 0.0,
        "time_per_request_ms": round(cfg.concurrency * t * 1000 / complete, 3) if complete else None,
        "time_per_request_all_ms": round(t * 1000 / complete, 3) if complete else None,
        "transfer_rate_kbps": round(r.bytes_received / 1024 / t, 2) if t else 0.0,
        "latency_ms": _pcts(r.latency),
        "rtt_ms": _pcts(r.rtt),
        "connect_ms": _pcts(r.connect),
        "total_ms": _pcts(r.total),
        "connections": r.connect.get_total_count(),  # 1 per request without keep-alive, about -c with it
        "backends": dict(sorted(r.backends.items())),
        "errors": dict(sorted(r.errors.items())),
        "ended_early": r.ended_early,
        # Near 100%, the load generator was the bottleneck: the figures measure it, not the server.
        "client_cpu_percent": client,
        # The same measure in cores (over the load processes' own time, not the requests':
        # a short run's setup in a time that small came to more cores than the machine has).
        "client_cores": round(r.tool_busy * cfg.processes, 2),
        "machine_busy_percent": machine,
        # The server's own CPU, when it runs here (% of a core; server_cpu.py).
        "server_cpu_percent": server,
        "rate_is_lower_bound": t >= JUDGED_SECONDS and lower_bound(client, machine, server),
    }


JUDGED_SECONDS = 0.5
"""Shorter runs are not judged by CPU: the kernel counts CPU time in 10 ms ticks (a
run of a few ms was said to have left the server "0% of a core")."""
SATURATED = 85.0
"""Client CPU (% of a core per load process) from which the load generator counts as at its limit."""
MACHINE_FULL = 85.0
"""Machine CPU busy (%) from which client and server count as short of CPU."""
SERVER_SPARE = 95.0
"""Server CPU (% of a core) below which the server had room left. Not lower: a server
woken for every request spends more per request than a busy one, so a Python echo
server at 80-90% of a core still took 20-30% more from a faster generator."""


def lower_bound(client_cpu: float, machine_busy: float | None, server_cpu: float | None) -> bool:
    """Whether the load, not the server, set the rate: the server had room left (it
    used under SERVER_SPARE of a core) while the load generator, or the machine's CPUs
    it shared with the server, was at its limit. The rate is then only a lower bound
    for the server, and says nothing of which of two such servers is faster."""
    return (server_cpu is not None and server_cpu < SERVER_SPARE
            and (client_cpu >= SATURATED or (machine_busy or 0) >= MACHINE_FULL))


def to_json(rows: list[dict]) -> str:
    return json.dumps({"runs": rows}, indent=2)


def _flat(row: dict) -> dict:
    out = {key: row[key] for key, _ in COLUMNS}
    for group in TIMING_GROUPS:
        for k, v in row[group].items():
            out[f"{group[:-3]}_{k}_ms"] = v
    out["backends"] = " ".join(f"{k}={v}" for k, v in row["backends"].items())
    out["errors"] = " ".join(f"{k}={v}" for k, v in row["errors"].items())
    return out


def to_csv(rows: list[dict]) -> str:
    flat = [_flat(r) for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


PLACES = {"requests_per_second": 2, "transfer_rate_kbps": 2}
"""Decimals of a column, as ApacheBench prints it; times have 3 (ms to the microsecond, SPEC.md)."""


def fmt(value, places: int = 3) -> str:
    """A number as the report shows it: a float with ``places`` decimals, all of
    them (``2.000`` beside ``0.129``, not ``2``), an int with thousands commas."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{places}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_column(row: dict, key: str) -> str:
    return fmt(row[key], PLACES.get(key, 3))


def answered_by(backend: str) -> str:
    """The label of a backend's count: "-" is an answer that named none (no X-Backend).
    A control character in the name the server gave (an escape sequence for the
    terminal the report goes to) is shown as \\x1b."""
    return "answered (no X-Backend header)" if backend == "-" else f"answered by {logs.printable(backend)}"


def to_markdown(rows: list[dict]) -> str:
    """The assignment's table (SPEC.md's columns, one row per concurrency level),
    then the latency and rtt percentiles SPEC.md asks for, a row per level and
    measure, then the requests each backend answered and the failures by kind, a
    row per level."""
    head = [label for _, label in COLUMNS] + ["latency p50 (ms)", "latency p99 (ms)", "rtt p99 (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [fmt_column(r, key) for key, _ in COLUMNS]
        cells += [fmt(r["latency_ms"]["p50"]), fmt(r["latency_ms"]["p99"]), fmt(r["rtt_ms"]["p99"])]
        lines.append("| " + " | ".join(cells) + " |")
    keys = [f"p{p}" for p in PERCENTILES] + ["max"]
    lines += ["", "| Concurrency level | measure (ms) | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        for measure in ("latency", "rtt"):
            values = r[f"{measure}_ms"]
            lines.append(f"| {r['concurrency']} | {measure} | " + " | ".join(fmt(values[k]) for k in keys) + " |")
    backends = sorted({name for r in rows for name in r["backends"]})
    kinds = sorted({kind for r in rows for kind in r["errors"]})
    head = [answered_by(name) for name in backends] + [f"failed: {kind}" for kind in kinds]
    if head:
        lines += ["", "| Concurrency level | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
        for r in rows:
            cells = [fmt(r["backends"].get(name, 0)) for name in backends] + [fmt(r["errors"].get(k, 0)) for k in kinds]
            lines.append(f"| {r['concurrency']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
