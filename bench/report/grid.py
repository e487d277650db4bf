"""Cells of the grid: the median of repetitions, with the spread shown.

A cell keeps every column of SPEC.md as the median over repetitions, the
failed requests as the *sum* (one failure in any repetition must show), the
spread of requests/s as half the range over the median, and the repetitions'
raw requests/s so results.json holds every number.
"""

from __future__ import annotations

from typing import Callable

from bench.common import median

COLUMNS = ["time_taken_s", "complete", "failed", "total_transferred_bytes", "requests_per_second",
           "time_per_request_ms", "time_per_request_all_ms", "transfer_rate_kbps"]
LEVELS = (1, 3, 5, 8, 10)
QUICK_LEVELS = (1, 10)


def cell(rows: list[dict]) -> dict:
    out = {k: median([r[k] for r in rows if r.get(k) is not None]) for k in COLUMNS}
    out["failed"] = sum(r["failed"] for r in rows)
    rps = [r["requests_per_second"] for r in rows]
    mid = median(rps)
    out["rps_spread_pct"] = round((max(rps) - min(rps)) / 2 / mid * 100, 1) if len(rps) > 1 and mid else 0
    for key in ("p50_ms", "p99_ms"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = median(vals) if vals else None
    out["reps"] = len(rows)
    out["rps_runs"] = rps
    return out


def sweep(levels: tuple[int, ...], reps: int, measures: dict[str, Callable[[int], dict]]) -> dict[str, dict[int, dict]]:
    """One cell per series and concurrency level; ``measures[name](c)`` runs one
    repetition. The repetitions are interleaved: each round runs every series at
    every level once, so a burst of load from elsewhere on the machine costs
    every series a repetition, not one series its whole row."""
    rows: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in levels} for name in measures}
    for _ in range(reps):
        for name, measure in measures.items():
            for c in levels:
                rows[name][c].append(measure(c))
    return {name: {c: cell(runs) for c, runs in by_level.items()} for name, by_level in rows.items()}
