"""Running one load measurement and turning its output into the report's row.

A row has the nine ApacheBench columns of SPEC.md (``grid.COLUMNS``) plus
``p50_ms``/``p99_ms``. ApacheBench prints its percentiles in whole
milliseconds, useless on loopback, so ``run_ab`` also asks for ``-e`` (the
CSV of percentiles in fractional ms) and takes p50/p99 from there. The stress
tool is run as a child process with ``--json`` so what is measured is exactly
what a user runs.

SPEC.md's *complete* is "answered correctly": an answer other than 2xx, which
ab counts as complete (and lists apart, as Non-2xx responses), is failed here,
as the stress tool counts it; ab's rates are scaled to the complete ones. ab
runs with ``-r``, so a connection reset is a failed request, not the end of
the whole benchmark, and with ``-l``, so that an error page is one failure (a
non-2xx), not also a Length one. ab counts a failed request once under each
kind it fits (a reset is a Receive and an Exception, and all are in its
Complete requests): the failed requests here are the non-2xx answers and the
largest of its kinds, at most all of them.

The p50/p99 of a row are from the connect to the answer's last byte for HTTP,
from both tools (ab's, and the stress tool's *total*), so their HTTP tables
compare alike; for the line protocol they are the stress tool's rtt (from the
send to the ACK).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bench.common import parse_ab
from clusterkit import cluster

STRESS_ENGINE = ("--engine", "epoll")
"""The stress tool's engine in the grids and the failover runs: the one built like ab, so it
dilutes the rates least (nothing of it pinned to a core)."""
AB_TIMEOUT_S = 300      # one ab run of 1000 requests takes well under a second on loopback
STRESS_TIMEOUT_S = 300


def parse_percentiles(csv_text: str) -> dict[int, float]:
    """ab's ``-e`` file: ``Percentage served,Time in ms`` then ``0,0.123`` ... ``100,4.5``."""
    out = {}
    for line in csv_text.splitlines()[1:]:
        pct, _, ms = line.partition(",")
        try:
            out[int(pct)] = float(ms)
        except ValueError:
            continue
    return out


def ab_row(text: str, csv_text: str) -> dict:
    """ab's stdout and ``-e`` CSV -> one row; p50/p99 in fractional ms when the CSV is sane."""
    row = parse_ab(text)
    broken = max(row.pop("failed_kinds").values(), default=0)
    row["failed"] = 0  # (its sum of the kinds: some requests more than once)
    row = as_failed(row, min(row["complete"], row["non_2xx"] + broken))
    pct = parse_percentiles(csv_text)
    # With few requests ab's CSV can put a stray value at 99 (an index rounding
    # quirk); keep the whole-ms text percentiles then rather than a wrong number.
    if 50 in pct and 99 in pct and pct[99] >= pct[50]:
        row["p50_ms"], row["p99_ms"] = pct[50], pct[99]
    return row


def as_failed(row: dict, wrong: int) -> dict:
    """``row`` with ``wrong`` of its complete requests counted as failed (ab's
    Non-2xx responses and broken ones), and the rates that count complete ones
    scaled to match."""
    if not wrong:
        return row
    complete = row["complete"]
    right = max(complete - wrong, 0)
    share = right / complete if complete else 0.0
    row = {**row, "complete": right, "failed": row["failed"] + wrong,
           "requests_per_second": round(row["requests_per_second"] * share, 2)}
    for key in ("time_per_request_ms", "time_per_request_all_ms"):
        row[key] = round(row[key] / share, 3) if share else None
    return row


def run_ab(url: str, requests: int, concurrency: int, workdir: str, keepalive: bool = False) -> dict:
    """Run ApacheBench once; raise RuntimeError with its last stderr line if it fails."""
    csv_path = Path(workdir) / f"ab-{time.monotonic_ns()}.csv"
    argv = ["ab", "-q", "-r", "-l", "-n", str(requests), "-c", str(concurrency), "-e", str(csv_path)]
    proc = subprocess.run(argv + (["-k"] if keepalive else []) + [url], capture_output=True, text=True,
                          timeout=AB_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"ab failed: {proc.stderr.strip()[-300:]}")
    csv_text = csv_path.read_text() if csv_path.exists() else ""
    csv_path.unlink(missing_ok=True)
    return ab_row(proc.stdout, csv_text)


def run_stress(workdir: str, *args: str) -> dict:
    """Run ClientServer_StressTools.py once with ``--json``; its first run's row,
    p50/p99 from the connect to the last byte for ``--http`` (ab's), else from rtt."""
    out = Path(workdir) / f"stress-{time.monotonic_ns()}.json"
    proc = subprocess.run(cluster.python_script("ClientServer_StressTools.py", *args, "--quiet", "--json", str(out),
                                                "--log-level", "warning", "--log-dir", workdir),
                          capture_output=True, text=True, timeout=STRESS_TIMEOUT_S)
    if not out.exists():
        raise RuntimeError(f"stress tool failed: {proc.stderr.strip()[-300:]}")
    row = json.loads(out.read_text())["runs"][0]
    out.unlink()
    times = row["total_ms"] if "--http" in args else row["rtt_ms"]
    return {**row, "p50_ms": times["p50"], "p99_ms": times["p99"]}
