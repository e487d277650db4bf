"""The report's arithmetic and its failure paths (bench/report/, run_bench.py):
each cell one repetition's row, failures summed; an answer other than 2xx is
failed, as SPEC.md's "answered correctly" says; a target or a measurement that
fails costs its own row, shown with its reason, not the whole report."""

from __future__ import annotations

import itertools
import json
import socket
import struct
import sys
import threading

import pytest

from bench import run_bench
from bench.report import grid, render, runners, targets
from clusterkit import cluster
from tests.http_setup import HAS_AB

pytestmark = pytest.mark.timeout(120)


def row(rps: float, failed: int = 0, errors: dict | None = None) -> dict:
    complete = 1000 - failed
    time_taken = complete / rps
    return {"time_taken_s": time_taken, "complete": complete, "failed": failed, "total_transferred_bytes": 1920 * 1000,
            "requests_per_second": rps, "time_per_request_ms": 10 * time_taken / complete * 1000,
            "time_per_request_all_ms": time_taken / complete * 1000, "transfer_rate_kbps": 1.0, "p50_ms": rps / 1000,
            "p99_ms": 2 * rps / 1000, "errors": errors or {}}


def test_a_cell_is_the_median_repetitions_row_whole_with_the_failures_of_all():
    cell = grid.cell([row(4000), row(5000, failed=2, errors={"timeout": 2}), row(3000), row(4400)])
    assert cell["requests_per_second"] == 4000  # the lower of the middle two: one run's row, not a mix
    assert cell["complete"] / cell["time_taken_s"] == pytest.approx(4000)
    assert cell["p50_ms"] == 4.0
    assert cell["failed"] == 2 and cell["errors_by_kind"] == {"timeout": 2}
    assert cell["rps_spread_pct"] == 25.0 and cell["rps_runs"] == [4000, 5000, 3000, 4400]


def test_one_repetition_has_no_spread_and_a_failed_one_costs_its_cell_only():
    assert grid.cell([row(4000)])["rps_spread_pct"] is None
    rows = grid.sweep((1,), 2, {"dead": lambda c: 1 / 0, "fine": lambda c: row(4000)})
    dead, fine = rows["dead"][1], rows["fine"][1]
    assert dead["requests_per_second"] is None and dead["unmeasured"] == 2 and dead["error"] == "division by zero"
    assert fine["requests_per_second"] == 4000 and "error" not in fine
    table = render.table({1: dead})
    assert "| 1 | not measured |" in table and "2 of 2 repetition(s) not measured: division by zero" in table
    assert "nan" not in table.lower()
    json.dumps(rows, allow_nan=False)  # valid JSON: no NaN


def test_a_non_2xx_answer_is_a_failed_request_in_abs_row():
    ab_out = ("Concurrency Level:      10\nTime taken for tests:   0.100 seconds\nComplete requests:      100\n"
              "Failed requests:        0\nNon-2xx responses:      40\nTotal transferred:      50000 bytes\n"
              "Requests per second:    1000.00 [#/sec] (mean)\nTime per request:       10.000 [ms] (mean)\n"
              "Time per request:       1.000 [ms] (mean, across all concurrent requests)\n"
              "Transfer rate:          488.28 [Kbytes/sec] received\n")
    r = runners.ab_row(ab_out, "")
    assert (r["complete"], r["failed"], r["non_2xx"]) == (60, 40, 40)
    assert r["requests_per_second"] == 600.0 and r["time_per_request_all_ms"] == pytest.approx(1 / 0.6, abs=1e-3)
    everything_wrong = runners.ab_row(ab_out.replace("Non-2xx responses:      40", "Non-2xx responses:      100"), "")
    assert everything_wrong["complete"] == 0 and everything_wrong["requests_per_second"] == 0
    assert everything_wrong["time_per_request_ms"] is None


@pytest.mark.skipif(not HAS_AB, reason="ApacheBench (ab, Debian's apache2-utils) is not installed")
def test_ab_against_a_missing_page_counts_every_request_failed(tmp_path, log_dir):
    with cluster.ProcessGroup() as group:
        port = cluster.free_ports(1)[0]
        group.start(cluster.Process("async", cluster.python_script(
            "http_servers/Server_async_http.py", "--port", str(port), "--log-dir", str(log_dir)), port=port))
        r = runners.run_ab(f"http://127.0.0.1:{port}/missing.html", 50, 5, str(tmp_path))
    assert (r["complete"], r["failed"], r["non_2xx"]) == (0, 50, 50)


class Flaky:
    """An HTTP/1.0 server on a thread: of every four connections, one reset before
    its answer, one answered 503 (a shorter body), two answered 200."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        for n in itertools.count():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                if n % 4 == 0:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
                    continue
                status, body = (b"503 Service Unavailable", b"busy") if n % 4 == 1 else (b"200 OK", b"x" * 100)
                conn.sendall(b"HTTP/1.0 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))


@pytest.mark.skipif(not HAS_AB, reason="ApacheBench (ab, Debian's apache2-utils) is not installed")
def test_abs_failures_are_counted_once_each(tmp_path):
    """ab counted a reset as a Receive and an Exception failure, and a 503 of another
    length as a Length failure and a Non-2xx: 175 outcomes for 100 requests."""
    server = Flaky()
    try:
        r = runners.run_ab(f"http://127.0.0.1:{server.port}/", 100, 1, str(tmp_path))
    finally:
        server.sock.close()
    assert (r["complete"], r["failed"]) == (50, 50), r


def test_a_target_that_fails_to_start_is_named_with_its_reason(tmp_path):
    why: dict[str, str] = {}
    with cluster.ProcessGroup() as group:
        ok = targets.started(group, lambda: cluster.Process("broken", [sys.executable, "-c", "raise SystemExit(3)"],
                                                            port=cluster.free_ports(1)[0]), "broken", why)
        missing = targets.started(group, lambda: None, "ghost", why, program="no-such-program-here")
    assert not ok and why["broken"].startswith("failed to start: broken did not start")
    assert not missing and why["ghost"] == "no-such-program-here is not installed"
    results = {"http": {"async (45000)": {"available": False, "why": why["broken"], "ab": {}, "stress": {}}},
               "tcp": {}, "failover": [{"balancer": "lb.py (HTTP)", "available": False, "why": "gone"}],
               "speed": {}, "machine": {"cores": 2, "platform": "-", "python": "-", "nginx": "-", "haproxy": "-",
                                        "ab": "not installed", "wrk": "-"},
               "date": "today", "requests": 300, "reps": 1, "quick": True, "duration_s": 1.0}
    render.render(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert f"not measured: {why['broken']}" in report and "| lb.py (HTTP) | not measured: gone |" in report
    assert "ApacheBench is not installed here" in report  # no ab numbers: says whose they are


def test_the_report_folder_is_new_and_the_command_to_reproduce_is_the_one_run(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "stale.png").write_bytes(b"x")
    with pytest.raises(SystemExit, match="is not empty"):
        run_bench.report_folder(str(tmp_path / "old"), force=False)
    assert run_bench.report_folder(str(tmp_path / "old"), force=True) == tmp_path / "old"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="a file, not a folder"):
        run_bench.report_folder(str(tmp_path / "file"), force=False)
    assert run_bench.reproduce([]) == "make bench" and run_bench.reproduce(["--quick"]) == "make bench QUICK=1"
    assert run_bench.reproduce(["--reps", "3", "-n", "500"]) == "python bench/run_bench.py --reps 3 -n 500"
    # (not where it wrote: that folder has this report now, and a new one is the default)
    assert run_bench.reproduce(["--quick", "--out", "/tmp/a b", "--force"]) == "make bench QUICK=1"
    assert run_bench.reproduce(["-n", "50", "--out=x"]) == "python bench/run_bench.py -n 50"


def test_the_http_vs_ab_verdict_is_two_rows_each_with_its_ratio_and_target():
    results = {"speed": {"stress tool (issue 5)": {"data": {"verdicts": [
        {"http_rps_ratio": 0.9, "http_p50_ratio": 1.3, "met": False}]}}}}
    rows = render.verdicts(results)
    assert [(r["check"], r["ratio"], r["met"]) for r in rows] == [("--http vs ab, requests/s", 0.9, True),
                                                                  ("--http vs ab, p50", 1.3, False)]
