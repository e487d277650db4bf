"""Cells of the grid: the median repetition, with the spread shown.

A cell is the row of the repetition with the median requests/s (the lower of
the middle two for an even count), whole: its columns of SPEC.md come from one
run, so complete / time taken is its requests/s. The failed requests are the
*sum* over the repetitions (one failure in any repetition must show), the
spread of requests/s is half the range over the median, and the repetitions'
raw requests/s stay in ``rps_runs`` so results.json holds every number.

A repetition that could not be measured (the load tool failed, the target was
gone) is kept as ``{"error": why}``: the cell is made of the others, and says
how many failed and why; a cell with none measured has no numbers, only the
error, and the report shows it as such.
"""

from __future__ import annotations

from typing import Callable

COLUMNS = ["time_taken_s", "complete", "failed", "total_transferred_bytes", "requests_per_second",
           "time_per_request_ms", "time_per_request_all_ms", "transfer_rate_kbps"]
LEVELS = (1, 3, 5, 8, 10)
QUICK_LEVELS = (1, 10)


def cell(rows: list[dict]) -> dict:
    measured = [r for r in rows if "error" not in r]
    errors = [r["error"] for r in rows if "error" in r]
    if not measured:
        return {**{k: None for k in COLUMNS}, "p50_ms": None, "p99_ms": None, "rps_spread_pct": None,
                "reps": len(rows), "rps_runs": [], "errors_by_kind": {}, "error": errors[0], "unmeasured": len(rows)}
    ranked = sorted(measured, key=lambda r: r["requests_per_second"])
    mid = ranked[(len(ranked) - 1) // 2]
    out = {k: mid.get(k) for k in COLUMNS}
    out["p50_ms"], out["p99_ms"] = mid.get("p50_ms"), mid.get("p99_ms")
    out["failed"] = sum(r["failed"] for r in measured)
    kinds: dict[str, int] = {}
    for r in measured:
        for kind, count in (r.get("errors") or {}).items():
            kinds[kind] = kinds.get(kind, 0) + count
    out["errors_by_kind"] = kinds  # the failed requests' kinds, summed as they are
    rps = [r["requests_per_second"] for r in measured]
    median_rps = mid["requests_per_second"]
    out["rps_spread_pct"] = (round((max(rps) - min(rps)) / 2 / median_rps * 100, 1)
                             if len(rps) > 1 and median_rps else None)
    out["reps"] = len(rows)
    out["rps_runs"] = rps
    if errors:
        out["error"], out["unmeasured"] = errors[0], len(errors)
    return out


def sweep(levels: tuple[int, ...], reps: int, measures: dict[str, Callable[[int], dict]]) -> dict[str, dict[int, dict]]:
    """One cell per series and concurrency level; ``measures[name](c)`` runs one
    repetition. The repetitions are interleaved: each round runs every series at
    every level once, so a burst of load from elsewhere on the machine costs
    every series a repetition, not one series its whole row. A repetition that
    raises is kept as its error (see ``cell``); the others go on."""
    rows: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in levels} for name in measures}
    for _ in range(reps):
        for name, measure in measures.items():
            for c in levels:
                rows[name][c].append(measure_once(measure, c))
    return {name: {c: cell(runs) for c, runs in by_level.items()} for name, by_level in rows.items()}


def measure_once(measure: Callable[[int], dict], c: int) -> dict:
    """One repetition; what it raised (a load tool that failed or timed out, a
    target gone) is its row, so it costs that cell, not the whole report."""
    try:
        return measure(c)
    except Exception as exc:  # noqa: BLE001
        return {"error": " ".join(str(exc).split())[:300] or type(exc).__name__}
