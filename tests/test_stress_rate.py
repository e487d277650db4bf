"""The stress tool's open loop (``--rate``): latency from each request's
intended send, so a stalled server shows; the warm-up; requests never sent."""

from __future__ import annotations

import pytest

from .stress_setup import FakeServer, run_json

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_open_loop_rate_shows_a_stall_that_closed_loop_hides(log_dir, tmp_path, engine):
    fake = FakeServer("stall")
    try:
        open_row, open_proc = run_json("-n", "400", "-c", "2", "-k", "--rate", "200", "--processes", "1",
                                       "--engine", engine, "--port", str(fake.port), log_dir=log_dir,
                                       tmp_path=tmp_path, name="open.json")
        fake.count = 0
        closed_row, closed_proc = run_json("-n", "400", "-c", "2", "-k", "--processes", "1", "--engine", engine,
                                 "--port", str(fake.port), log_dir=log_dir, tmp_path=tmp_path, name="closed.json")
    finally:
        fake.close()
    assert open_row["complete"] == closed_row["complete"] == 400
    # The server stalls one whole second: on a fixed schedule, every request due in
    # that second waits for it, so well over 1% of them see hundreds of ms.
    assert open_row["rtt_ms"]["p99"] >= 500
    # In closed loop the clients simply stop sending during the stall: one request shows it.
    assert closed_row["rtt_ms"]["p99"] < open_row["rtt_ms"]["p99"] / 2
    assert closed_row["rtt_ms"]["max"] >= 900
    # The report says where the times count from.
    assert (open_row["rate"], closed_row["rate"]) == (200, None)
    assert "intended send time" in open_proc.stdout.replace("\n", " ")
    assert "intended send time" not in closed_proc.stdout.replace("\n", " ")


def test_the_warm_up_s_connections_are_not_counted(start_server, log_dir, tmp_path):
    """3001 connections for 1500 requests: the warm-up's were counted, and their connect times."""
    server = start_server("server1", "--log-level", "warning")
    row, proc = run_json("--duration", "2", "--rate", "400", "--warmup", "1", "-c", "4", "--port", str(server.port),
                         log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert abs(row["connections"] - row["complete"]) <= 4, row


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_open_loop_for_a_duration_sends_rate_times_duration(start_server, log_dir, tmp_path, engine):
    """As wrk2: --rate R --duration D sends R x D requests (each client sent one more,
    due at the end itself; and with an interval rounded to whole ns, one too many).
    A slow rate: the last request is due 1/R before the end, and one the client sends
    after the end is never sent (by design); at 1500/s a client 0.7 ms late at the
    end of a busy run left it out (1498 of 1500). 1e9/15 is no whole number of ns."""
    server = start_server("server1", "--log-level", "warning")
    row, proc = run_json("--rate", "15", "--duration", "2", "-c", "7", "--engine", engine, "--port",
                         str(server.port), log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (row["complete"], row["failed"], row["scheduled"]) == (30, 0, 30)


def test_open_loop_says_how_many_requests_were_never_sent(log_dir, tmp_path):
    """A client held past the end by a stalled answer leaves its later requests
    unsent: neither complete nor failed, so the report says how many."""
    fake = FakeServer("stall")  # answer 150 comes a second late
    try:
        row, proc = run_json("--rate", "200", "--duration", "1.2", "-c", "2", "-k", "--engine", "epoll",
                             "--port", str(fake.port), log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()
    unsent = row["scheduled"] - row["complete"] - row["failed"]
    assert unsent > 10
    assert f"{unsent:,} of the 240 requests the schedule had were never sent" in proc.stdout.replace("\n", " ")


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_a_line_servers_idle_notice_between_rate_sends_is_no_failure(engine, start_server, log_dir, tmp_path):
    """The server's ERR idle-timeout (then its close) on a kept-alive connection idle
    between --rate sends was taken for an answer nobody asked for: the next request
    failed as extra-answer. It is no answer: the next send reconnects."""
    server = start_server("server1", "--idle-timeout", "0.2")
    row, proc = run_json("--port", str(server.port), "-k", "-c", "2", "--rate", "4", "--duration", "2",
                         "--engine", engine, log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert row["failed"] == 0 and row["complete"] >= 6, row["errors"]
    # A REPLY and ACK again on the idle connection still fails the next request.
    fake = FakeServer("twice-late")
    try:
        row, proc = run_json("--port", str(fake.port), "-k", "-c", "1", "-n", "6", "--rate", "4",
                             "--engine", engine, log_dir=log_dir, tmp_path=tmp_path, name="twice.json")
    finally:
        fake.close()
    assert row["errors"].get("extra-answer", 0) >= 2, row["errors"]


@pytest.mark.parametrize("why", ["no-descriptor", "dead-streak"])
def test_a_backoff_never_sends_ahead_of_the_rate_schedule(why):
    # After a connect that found no descriptor, or a streak of requests that got
    # nothing back, a client waits BACKOFF_NS before its next send; with --rate, a
    # send due later than that still waits for its time (it went out early).
    from clusterkit.stress.board import Board
    from clusterkit.stress.config import StressConfig
    from clusterkit.stress.metrics import Recorder, RunResult
    from clusterkit.stress.plan import BACKOFF_NS, DEAD_STREAK, Client, Plan, ns

    cfg = StressConfig(port=9, rate=2, duration=60, concurrency=1)  # a send every 500 ms
    board = Board(1, 1)
    start = ns()
    c = Client(cfg, 0, Plan(cfg, start, None, 0), Recorder(RunResult()), board, board.failed_slot(0))
    c.k = 3  # the fourth send is due 1.5 s after the start
    if why == "no-descriptor":
        c.short = True
    else:
        c.progress[c.streak_slot] = DEAD_STREAK
    before = ns()
    assert c.due() == start + 1_500_000_000
    c.k = 0  # due at the start, long past: the backoff counts from now
    if why == "no-descriptor":
        c.short = True
    assert c.due() >= before + BACKOFF_NS
