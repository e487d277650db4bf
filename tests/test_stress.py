"""The stress tool as a real process through a real cluster: exact counts,
processes merged, the report and its JSON, CSV and markdown, the live view,
the per-request log, and a spawned cluster with a backend killed mid-run."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys

import pytest

from clusterkit import cli, cluster, logs

from .stress_setup import FakeServer, run_json, stress

pytestmark = pytest.mark.timeout(120)


def test_counts_are_exact_through_the_balancer(balanced, log_dir, tmp_path):
    row, proc = run_json("-n", "1000", "-c", "10", "--port", str(balanced.port), log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (row["complete"], row["failed"]) == (1000, 0)
    counts = row["backends"]
    assert sum(counts.values()) == 1000 and set(counts) == {"server1", "server2", "server3"}
    assert max(counts.values()) - min(counts.values()) <= 1  # round robin
    assert row["requests_per_second"] == pytest.approx(1000 / row["time_taken_s"], rel=1e-3)
    assert row["time_per_request_ms"] == pytest.approx(10 * row["time_taken_s"] * 1000 / 1000, rel=1e-3)
    assert 0 < row["latency_ms"]["p50"] <= row["rtt_ms"]["p99"]
    # ApacheBench's Total runs from the connect: never shorter than the rtt, nor than the connect.
    assert row["total_ms"]["p50"] >= row["rtt_ms"]["p50"] and row["total_ms"]["max"] >= row["connect_ms"]["max"]
    log = (log_dir / "client_log.log").read_text()
    assert log.count("event=request ") == 1000 and "rtt_ms=" in log and "backend=server" in log
    assert log.count(" connect_ms=") == 1000  # (SPEC: the client log has the connects; one per request here)


def test_the_log_has_each_connect_with_rate_too(balanced, log_dir, tmp_path):
    """With --rate a request's time counts from its intended send, before its connect:
    the log left every connect out."""
    row, proc = run_json("-n", "40", "-c", "2", "--rate", "200", "--port", str(balanced.port), log_dir=log_dir,
                         tmp_path=tmp_path)
    assert proc.returncode == 0 and row["complete"] == 40, proc.stderr
    times = [float(t) for t in re.findall(r" connect_ms=([\d.]+)", (log_dir / "client_log.log").read_text())]
    assert len(times) == 40 and max(times) <= row["connect_ms"]["max"] + 0.01


def test_processes_merge_to_the_same_totals(balanced, log_dir, tmp_path):
    one, _ = run_json("-n", "2000", "-c", "4", "-k", "--processes", "1", "--port", str(balanced.port),
                      log_dir=log_dir, tmp_path=tmp_path, name="one.json")
    two, _ = run_json("-n", "2000", "-c", "4", "-k", "--processes", "2", "--port", str(balanced.port),
                      log_dir=log_dir, tmp_path=tmp_path, name="two.json")
    for row in (one, two):
        assert (row["complete"], row["failed"]) == (2000, 0)
        assert sum(row["backends"].values()) == 2000
        assert row["total_transferred_bytes"] == one["total_transferred_bytes"]


@pytest.mark.parametrize("engine", ["async", "epoll"])
def test_event_engines_and_pipelining(balanced, log_dir, tmp_path, engine):
    row, proc = run_json("-n", "3000", "-c", "3", "-k", "--pipeline", "10", "--engine", engine,
                         "--port", str(balanced.port), log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (row["complete"], row["failed"]) == (3000, 0)


def test_an_output_file_that_cannot_be_written_after_the_run_is_said_and_the_others_written(balanced, log_dir,
                                                                                           tmp_path):
    """A file that passes the check before the run (its folder is there, and writable)
    and whose write fails after it, as on a disk that fills up: here a link to a file
    /proc cannot have. Was: a bare errno line, and the files after it not written."""
    paths = {k: tmp_path / f"r.{k}" for k in ("json", "md")}
    (tmp_path / "r.csv").symlink_to("/proc/no-such.csv")
    proc = stress("-n", "30", "-c", "3", "--port", str(balanced.port), "--json", str(paths["json"]),
                  "--csv", str(tmp_path / "r.csv"), "--markdown", str(paths["md"]), log_dir=log_dir)
    assert proc.returncode == cli.EXIT_OSERR, proc.stderr
    assert f"error: --csv: cannot write {tmp_path / 'r.csv'}: " in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(paths["json"].read_text())["runs"][0]["complete"] == 30
    assert "| 3 |" in paths["md"].read_text() and "Complete requests" in proc.stdout


def test_json_csv_markdown_and_table_agree(balanced, log_dir, tmp_path):
    paths = {k: tmp_path / f"r.{k}" for k in ("json", "csv", "md")}
    proc = stress("-n", "300", "-c", "3", "--sweep", "1,3", "--port", str(balanced.port),
                  "--json", str(paths["json"]), "--csv", str(paths["csv"]), "--markdown", str(paths["md"]),
                  log_dir=log_dir)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(paths["json"].read_text())["runs"]
    assert [r["concurrency"] for r in rows] == [1, 3]
    table = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    md = paths["md"].read_text().splitlines()
    assert md[0].startswith("| Concurrency level | Time taken for test (s) | Complete requests | Failed requests")
    for r, c, line in zip(rows, table, md[2:]):
        assert int(c["complete"]) == r["complete"] == 300
        assert float(c["requests_per_second"]) == r["requests_per_second"]
        cells = [x.strip() for x in line.strip("|").split("|")]
        assert cells[0] == str(r["concurrency"]) and cells[2] == "300" and cells[3] == "0"
        assert cells[5] == f"{r['requests_per_second']:,.2f}" and f"│ {cells[5]} │" in proc.stdout
        assert cells[6] == f"{r['time_per_request_ms']:,.3f}"  # every decimal (1.140, not 1.14; 2.000, not 2)
    # SPEC.md's percentiles (the markdown had p50 and p99 only): a row per level and measure.
    assert "| Concurrency level | measure (ms) | p50 | p90 | p99 | p99.9 | max |" in md
    assert sum(line.startswith(("| 1 | latency |", "| 3 | latency |", "| 1 | rtt |", "| 3 | rtt |"))
               for line in md) == 4
    # and the requests each backend answered (SPEC.md), as the table and the JSON have them
    names = sorted(rows[0]["backends"])
    assert "| Concurrency level | " + " | ".join(f"answered by {n}" for n in names) + " |" in md
    for r in rows:
        counts = [f"{r['backends'][n]:,}" for n in names]
        assert f"| {r['concurrency']} | " + " | ".join(counts) + " |" in md


def test_the_report_gives_a_local_servers_cpu_and_says_when_the_rate_is_only_a_lower_bound(procs, log_dir,
                                                                                            tmp_path):
    """A load generator slower than the server measured itself, and ranked two such
    servers by noise. The report now gives the server's CPU (found in /proc by its
    listening port) and calls the rate a lower bound when the server had room left
    while the load or the machine was at its limit."""
    from clusterkit.stress import report
    from clusterkit.stress.server_cpu import listening_pids
    port = cluster.free_port()
    server = procs.start(cluster.echo_server("server1", port, "--log-level", "warning", log_dir=str(log_dir)))
    assert listening_pids("127.0.0.1", port) == listening_pids("localhost", port) == [server.pid]
    # Another program on that port at another address is not the server (its CPU was counted).
    other = subprocess.Popen([sys.executable, "-c", "import socket, sys, time\n"
                              f"s = socket.create_server(('127.0.0.2', {port}))\nprint('up', flush=True)\n"
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "up\n"  # type: ignore[union-attr]
        assert listening_pids("127.0.0.1", port) == [server.pid]
        assert listening_pids("127.0.0.2", port) == [other.pid]
    finally:
        other.kill()
        other.wait()
    row, proc = run_json("--port", str(port), "-k", "-c", "4", "--duration", "2", "--warmup", "0.5",
                         log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 0 < row["server_cpu_percent"] < 400  # (a share of one core; the server is single-threaded)
    assert row["rate_is_lower_bound"] == report.lower_bound(row["client_cpu_percent"], row["machine_busy_percent"],
                                                            row["server_cpu_percent"])
    assert ("the server had room left" in " ".join(proc.stdout.split())) == row["rate_is_lower_bound"]
    # the rule itself
    assert report.lower_bound(97.0, 60.0, 55.0)  # the tool at its limit, the server half idle
    assert report.lower_bound(50.0, 95.0, 70.0)  # two load processes and the server share full CPUs
    assert not report.lower_bound(97.0, 99.0, 99.0)  # the server at its limit too: its rate
    assert not report.lower_bound(20.0, 30.0, 10.0)  # nobody at a limit (a slow server, or -c 1)
    assert not report.lower_bound(97.0, 99.0, None)  # a server elsewhere: unknown


def test_the_benchmark_ranks_only_what_the_rates_support():
    from bench.bench_stress import ranking_verdict
    ref = ["C", "py"]  # the C generator: C > py
    assert ranking_verdict({"C": 160, "py": 105}, {"C": False, "py": False}, ref) == "same"
    assert ranking_verdict({"C": 80, "py": 85}, {"C": False, "py": False}, ref) == "DIFFERENT"
    assert ranking_verdict({"C": 80, "py": 85}, {"C": True, "py": False}, ref) == "no claim (lower bound)"
    assert ranking_verdict({"C": 90, "py": 85}, {"C": True, "py": False}, ref) == "same"  # >= 90 > 85
    assert ranking_verdict({"C": 80, "py": 85}, {"C": True, "py": True}, ref) == "no claim (lower bound)"


def test_live_view_shows_rate_and_latency_percentiles(start_server, log_dir):
    server = start_server("server1", "--log-level", "warning")
    proc = subprocess.run(cluster.python_script("ClientServer_StressTools.py", "--duration", "2.5", "-c", "2",
                                                "--port", str(server.port), "--log-dir", str(log_dir)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("progress:")]
    assert any(re.search(r"requests\s+0 failed\s+[\d,]+/s\s+latency p50 ~[\d.]+ ms\s+p99 ~[\d.]+ ms", line)
               for line in lines), lines


def test_report_says_how_busy_the_load_generator_was(start_server, log_dir, tmp_path):
    server = start_server("server1", "--log-level", "warning")
    row, proc = run_json("--duration", "1.5", "-c", "2", "-k", "--engine", "async", "--processes", "1",
                         "--port", str(server.port), log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # A closed loop on loopback keeps its one process busy: some of a core, never more than
    # one core plus the kernel's share on the other.
    assert 5 < row["client_cpu_percent"] < 200
    assert 0 < row["client_cores"] < 2.5
    assert row["client_cores"] == pytest.approx(row["client_cpu_percent"] / 100, abs=0.011)
    assert row["machine_busy_percent"] is None or 0 < row["machine_busy_percent"] <= 100
    assert "client CPU (% of a core per process)" in proc.stdout
    if row["client_cpu_percent"] >= 85:
        assert "the load generator was near its limit" in proc.stdout.replace("\n", " ")
    # A run of a few ms: its cores were its setup over the requests' time (5.65 on 2 cores).
    row, proc = run_json("-n", "3", "-c", "1", "--size", "60000", "--port", str(server.port), log_dir=log_dir,
                         tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert row["client_cores"] <= 1.05


def test_spawn_and_kill_backend_mid_run_loses_nothing(log_dir, tmp_path):
    """What make demo shows: the killed backend's share stops, no request fails."""
    row, proc = run_json("--spawn", "-n", "600", "-c", "6", "--rate", "600", "--kill-backend", "server2@50%",
                         log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert row["complete"] == 600 and row["failed"] == 0
    backends = row["backends"]
    assert sum(backends.values()) == 600
    assert backends["server2"] < min(backends["server1"], backends["server3"]), backends
    assert "killed mid-run: server2" in proc.stdout


def test_make_demo_the_main_job_loses_no_message_and_names_its_log(log_dir):
    """``make demo`` as the README runs it (its log folder aside): exit 0, nothing
    failed, server2's death in the log it names (it named logs/ whatever the folder)."""
    proc = subprocess.run([sys.executable, "-m", "clusterkit.demo", "--log-dir", str(log_dir)], cwd=cluster.ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every message answered exactly once" in proc.stderr
    assert f"{log_dir / 'server_log.log'} has the balancer's event=backend-down" in " ".join(proc.stderr.split())
    assert "event=backend-down backend=server2" in (log_dir / "server_log.log").read_text()


def test_log_values_are_quoted_with_their_control_characters_escaped():
    assert logs.quote("server1") == "server1" and logs.quote("caf\u00e9") == "caf\u00e9"
    assert logs.quote('a b="c"') == '"a b=\\"c\\""'
    assert logs.quote("red\x1b[31m\x85\x00") == '"red\\x1b[31m\\x85\\x00"'
    assert logs.quote("two\nlines\r\t") == '"two\\nlines\\r\\t"' and logs.quote("") == '""'


def test_log_level_warning_keeps_the_failed_requests_and_nothing_else(log_dir):
    """At --log-level warning the failed requests' lines were dropped (they were written
    only with info on) and the INFO event=run line was written; at error, nothing."""
    fake = FakeServer("wrong-echo")  # every request fails: wrong-reply
    try:
        for level, failures in (("warning", 6), ("error", 0)):
            folder = log_dir / level
            proc = stress("-n", "6", "-c", "2", "--port", str(fake.port), "--log-level", level, log_dir=folder)
            assert proc.returncode == 1
            text = (folder / "client_log.log").read_text() if (folder / "client_log.log").exists() else ""
            assert text.count(" WARNING stress event=request ") == failures, text
            assert text.count("error=wrong-reply") == failures, text
            assert " INFO " not in text, text
    finally:
        fake.close()


def test_the_per_request_log_is_bounded(monkeypatch):
    """Every request was kept until the end of the run: 190 bytes each, unbounded."""
    from clusterkit.stress.metrics import KEEP_ALL, Recorder, RunResult

    rec = Recorder(RunResult(), KEEP_ALL, log_cap=10)
    for i in range(25):
        rec.whole(i, i + 1000, "s", 10, i)
        if i % 5 == 0:
            rec.failed(i, "timeout", i + 5)
    entries = rec.entries()
    assert len([e for e in entries if e[4] is None]) == 10 and len([e for e in entries if e[4]]) == 5
    assert rec.result.complete == 25
