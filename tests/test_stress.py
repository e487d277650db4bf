"""ClientServer_StressTools.py as users run it, against real and deliberately bad servers."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import threading
import signal
import time

import pytest

from clusterkit import cli, cluster, logs
from clusterkit.balancer import balancer_process

pytestmark = pytest.mark.timeout(120)


def stress(*args: str, log_dir, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(cluster.python_script("ClientServer_StressTools.py", *args, "--quiet",
                                                "--log-dir", str(log_dir)),
                          capture_output=True, text=True, timeout=timeout)


def run_json(*args: str, log_dir, tmp_path, name: str = "out.json") -> tuple[dict, subprocess.CompletedProcess]:
    path = tmp_path / name
    proc = stress(*args, "--json", str(path), log_dir=log_dir)
    assert path.exists(), proc.stderr
    return json.loads(path.read_text())["runs"][0], proc


def wait_answered(log_dir, timeout: float = 30, balanced: bool = False) -> None:
    """Until the echo server has answered the load tool (its log, written in batches,
    has a message line): the run is under way, its signal handlers in place.
    ``balanced``: through a balancer, whose health checks are messages too: until
    it has logged a client's connection that had a message answered."""
    server_log = log_dir / "server_log.log"
    answered = re.compile(r"event=session .* messages=[1-9]" if balanced else r"event=message ")
    deadline = time.monotonic() + timeout
    while not server_log.exists() or not answered.search(server_log.read_text()):
        assert time.monotonic() < deadline, "the run never got an answer"
        time.sleep(0.05)


@pytest.fixture
def balanced(procs, log_dir):
    ports = cluster.free_ports(4)
    backends = []
    for i in range(3):
        procs.start(cluster.echo_server(f"server{i + 1}", ports[i], log_dir=str(log_dir)))
        backends.append(f"server{i + 1}=127.0.0.1:{ports[i]}")
    return procs.start(balancer_process(ports[3], backends, log_dir=str(log_dir)))


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
    assert listening_pids(port) == [server.pid]
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


class FakeServer:
    """A line server that misbehaves in one chosen way (or answers HTTP without a length)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self.sent = 0  # answer bytes sent
        self.lock = threading.Lock()
        self.closing = False
        self.heads: list[bytes] = []  # http-unframed: what each request's first read brought
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        here = 0  # messages on this connection
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if self.behaviour == "http-unframed":  # an HTTP/1.0 answer that the close ends
                    self.heads.append(data)
                    conn.sendall(UNFRAMED)
                    return
                if self.behaviour.startswith("http-twice"):  # every answer twice: at once, or 10 ms later
                    buf += data
                    while b"\r\n\r\n" in buf:
                        _, buf = buf.split(b"\r\n\r\n", 1)
                        with self.lock:
                            self.count += 1
                        answer = http_answer()
                        try:
                            if self.behaviour == "http-twice":
                                conn.sendall(answer * 2)
                            else:
                                conn.sendall(answer)
                                time.sleep(0.01)
                                conn.sendall(answer)
                        except OSError:  # the client closed a connection out of step
                            return
                    continue
                if self.behaviour in ("http-varied", "http-interim", "http-rogue"):
                    buf += data
                    while b"\r\n\r\n" in buf:
                        head, buf = buf.split(b"\r\n\r\n", 1)
                        keep = b"keep-alive" in head.lower()
                        with self.lock:
                            self.count += 1
                            n = self.count
                            interim = interim_answers(n) if self.behaviour == "http-interim" else b""
                            if self.behaviour == "http-rogue":  # an X-Backend that would forge log fields
                                interim, answer = b"", http_answer(backend=ROGUE_NAME)
                            elif not interim:
                                answer = varied_answer(n, keep)
                            else:
                                answer = http_answer(backend=b"b%d" % (1 + n % 2),
                                                     extra=b"" if keep else b"Connection: close\r\n")
                            self.sent += len(interim) + len(answer)
                        if interim and not n % 3:  # every 3rd apart from its answer
                            conn.sendall(interim)
                            time.sleep(0.005)
                            interim = b""
                        conn.sendall(interim + answer)
                        if not keep:
                            return
                    continue
                buf += data
                *lines, buf = buf.split(b"\n")
                for m in lines:
                    here += 1
                    with self.lock:
                        self.count += 1
                        n = self.count
                    if self.behaviour == "wrong-echo":
                        conn.sendall(b"REPLY fake %s!\nACK fake %d\n" % (m, len(m) + 1))
                    elif self.behaviour == "one-each":  # one message per connection, then the close
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                        return
                    elif self.behaviour == "twice":  # a balancer's resend gone wrong
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)) * 2)
                    elif self.behaviour == "twice-late":  # the copy 50 ms later
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                        time.sleep(0.05)
                        try:
                            conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                        except OSError:  # (the client closed the connection out of step)
                            return
                    elif self.behaviour == "extra-line":  # a line the protocol has not, behind the answer
                        conn.sendall(b"REPLY fake %s\nACK fake %d\nHELLO extra\n" % (m, len(m)))
                    elif self.behaviour == "ack-first":
                        conn.sendall(b"ACK fake %d\nREPLY fake %s\n" % (len(m), m))
                    elif self.behaviour == "slow-ack":  # the REPLY at once, its ACK 0.6 s later: slow, not dead
                        conn.sendall(b"REPLY fake %s\n" % m)
                        time.sleep(0.6)
                        try:
                            conn.sendall(b"ACK fake %d\n" % len(m))
                        except OSError:  # (the client gave up on it)
                            return
                    elif self.behaviour == "late":  # each answer 0.13 s after its message
                        time.sleep(0.13)
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                    elif self.behaviour == "missing-ack":
                        conn.sendall(b"REPLY fake %s\n" % m)
                        return
                    elif self.behaviour == "endless":  # bytes without a line end, for as long as it may
                        end = time.monotonic() + 5
                        try:
                            while time.monotonic() < end:
                                conn.sendall(b"x" * 65536)
                        except OSError:
                            pass
                        return
                    elif self.behaviour == "silent":
                        time.sleep(5)
                        return
                    elif self.behaviour == "silent-second":  # a connection's first answered, then nothing
                        if here > 1:
                            time.sleep(3)
                            return
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                    elif self.behaviour == "mixed":  # keep-alive answers of every shape, by message number
                        self.answer(conn, n, m)
                    elif self.behaviour == "stall":
                        if n == 150:
                            time.sleep(1.0)
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))

    def answer(self, conn: socket.socket, n: int, m: bytes) -> None:
        """Every 5th message a wrong echo, every 7th in two pieces, every 11th
        from another server name (as through a balancer), else a plain answer."""
        name = b"fake2" if n % 11 == 0 else b"fake"
        reply = b"REPLY %s %s%s\n" % (name, m, b"!" if n % 5 == 0 else b"")
        ack = b"ACK %s %d\n" % (name, len(m))
        with self.lock:
            self.sent += len(reply) + len(ack)
        if n % 7 == 0:
            conn.sendall(reply)
            time.sleep(0.002)
            conn.sendall(ack)
        else:
            conn.sendall(reply + ack)

    def close(self) -> None:
        self.closing = True
        self.sock.close()


def run_on_fake(behaviour: str, *args: str, log_dir, tmp_path) -> tuple[dict, subprocess.CompletedProcess]:
    """``run_json`` against a ``FakeServer(behaviour)``, closed afterwards."""
    fake = FakeServer(behaviour)
    try:
        return run_json(*args, "--port", str(fake.port), log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_a_server_answering_twice_is_caught_the_same_with_pipelining(engine, log_dir, tmp_path):
    """With --pipeline 3, the first message of each batch passed (its copy was
    taken for the second's answer) and the others failed as wrong-reply; without
    pipelining each fails as extra-answer. Now each does, either way."""
    row, proc = run_on_fake("twice", "-n", "9", "-c", "1", "-k", "--pipeline", "3", "--timeout", "1",
                            "--engine", engine, log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 1
    assert row["complete"] == 0 and row["errors"] == {"extra-answer": 9}, row["errors"]


def test_the_line_reader_knows_a_late_copy_of_the_previous_batch_by_its_echo():
    from clusterkit.stress.exchange import LineReader
    copy, answer = b"REPLY s m1\nACK s 2\n", b"REPLY s m2\nACK s 2\n"
    for before, chunks, outcomes in [
        ([b"m1"], [copy + answer], [(False, "extra-answer")]),  # taken for no answer; fails the one in flight
        ([b"m1"], [copy, answer], [(False, "extra-answer")]),
        ([b"m1"], [answer], [(True, "s")]),
        ((), [copy + answer], [(False, "wrong-reply")]),  # a new connection: nothing came before on it
        ([b"m0"], [copy + answer], [(False, "wrong-reply")]),
    ]:
        reader = LineReader([b"m2"], before)
        for chunk in chunks:
            reader.feed(chunk, 1)
        assert reader.done and [(o.ok, o.label) for o in reader.outcomes] == outcomes, (before, chunks)


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_a_late_copy_of_the_last_answer_fails_the_next_request_as_extra_answer(engine, log_dir, tmp_path):
    """The server answers each message twice, the copy 50 ms later, while the
    next message is in flight: that one failed as wrong-reply. Each copy fails
    it as extra-answer (the connection is then closed: the copy of the second
    answer is lost with it, and the third, on a new connection, passes)."""
    fake = FakeServer("twice-late")
    try:
        row, proc = run_json("-n", "9", "-c", "1", "-k", "--timeout", "2", "--port", str(fake.port),
                             "--engine", engine, log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()
    assert proc.returncode == 1
    assert row["complete"] == 5 and row["errors"] == {"extra-answer": 4}, row["errors"]


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
@pytest.mark.parametrize("behaviour, kind", [
    ("wrong-echo", "wrong-reply"), ("missing-ack", "bad-ack"), ("endless", "bad-reply"), ("twice", "extra-answer"),
    ("extra-line", "extra-answer"), ("ack-first", "bad-reply")])
def test_bad_servers_are_caught_and_counted_by_kind(behaviour, kind, engine, log_dir, tmp_path):
    # (A silent server: test_a_target_that_never_answers_ends_the_run_early.)
    row, proc = run_on_fake(behaviour, "-n", "20", "-c", "2", "--timeout", "0.5", "--engine", engine,
                            log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 1
    assert row["complete"] == 0 and row["failed"] == 20
    assert row["errors"] == {kind: 20}


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_an_answer_later_than_the_timeout_fails_in_every_engine(engine, log_dir, tmp_path):
    """The event engines looked at their deadlines ten times a second and counted an
    answer that came in between as complete (24 of 200 failed where the thread
    engine failed 112); late is late, whoever notices."""
    fake = FakeServer("late")
    try:
        row, proc = run_json("-n", "12", "-c", "2", "--timeout", "0.1", "--port", str(fake.port), "--engine", engine,
                             "--processes", "1", log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()
    assert proc.returncode in (1, 69), proc.stderr  # (69: all late, the target may be called dead)
    assert row["complete"] == 0 and row["failed"] >= 2 and set(row["errors"]) == {"timeout"}, row


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_an_unanswered_request_on_a_kept_connection_is_a_timeout_not_sent_again(engine, log_dir, tmp_path):
    """The thread engine took a request that got nothing back within --timeout on a
    kept-alive connection for one the server had closed first, and sent it again
    on a new connection: no timeout was reported, and the request took twice
    --timeout (a blackholed client showed only connect-timeouts)."""
    fake = FakeServer("silent-second")
    try:
        row, proc = run_json("-n", "6", "-c", "1", "-k", "--timeout", "0.5", "--port", str(fake.port),
                             "--engine", engine, "--processes", "1", log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()
    assert proc.returncode == 1, proc.stderr
    assert row["complete"] == 3 and row["errors"] == {"timeout": 3}, row
    assert fake.count == 6  # each request sent once


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_keepalive_answers_of_every_shape_are_judged_one_by_one(engine, log_dir, tmp_path):
    # Keep-alive answers mostly take the one-step path (plan.Client.whole); the
    # ones in pieces, from another server or wrong must still be read and judged.
    fake = FakeServer("mixed")
    try:
        row, proc = run_json("-n", "200", "-c", "2", "-k", "--port", str(fake.port), "--engine", engine,
                             "--processes", "1", log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()
    assert proc.returncode == 1  # some failed
    fake2 = sum(1 for n in range(1, 201) if n % 11 == 0 and n % 5)
    assert row["errors"] == {"wrong-reply": 40}
    assert row["backends"] == {"fake": 160 - fake2, "fake2": fake2}
    assert row["total_transferred_bytes"] == fake.sent


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_keepalive_against_a_server_that_closes_after_each_answer_goes_again_on_a_new_connection(
        engine, log_dir, tmp_path):
    """Half the requests failed as 'closed': each second one went on the connection the
    server had just closed, and never reached it. ApacheBench sends it again."""
    fake = FakeServer("one-each")
    try:
        row, proc = run_json("-n", "200", "-c", "4", "-k", "--port", str(fake.port), "--engine", engine,
                             log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()
    assert proc.returncode == 0, row["errors"]
    assert row["complete"] == 200 and fake.count == 200


def test_one_step_answers_count_as_the_reader_counts_them():
    from clusterkit.stress.board import Board
    from clusterkit.stress.config import StressConfig
    from clusterkit.stress.metrics import Recorder, RunResult
    from clusterkit.stress.plan import Client, Plan, ns

    def answers(payload: bytes, n: int) -> list[bytes]:
        msg = payload[:-1]
        name = b"b" if n % 4 == 3 else b"a"
        if n % 6 == 5:
            msg += b"?"  # wrong
        whole = b"REPLY %s %s\nACK %s %d\n" % (name, msg, name, len(payload) - 1)
        if n % 7 == 2:  # a late copy of the answer before: this one fails as extra-answer
            whole = last[0] + whole
        last[0] = b"".join(whole.splitlines(keepends=True)[-2:])  # (this answer's REPLY and ACK)
        return [whole[:10], whole[10:]] if n % 5 == 4 else [whole]

    cfg = StressConfig(connection="keepalive", requests=60, concurrency=1)
    results = {}
    # reader: every answer parsed; whole: Client.whole, then follow's request; again: Client.again,
    # which also makes the next request (the engines' steady state).
    for mode in ("reader", "whole", "again"):
        board = Board(1, 1)
        rec = Recorder(RunResult(), keep_log=True)
        c = Client(cfg, 0, Plan(cfg, ns(), 60, 0), rec, board, board.failed_slot(0))
        c.steady = mode != "reader"
        quick = 0
        following = None
        last = [b""]
        for n in range(60):
            if following:
                payload = following
            else:
                if n in (0, 30):  # as if the connection were new: Total counts from its connect
                    c.connect_started = ns()
                    c.connected()
                payload = c.request()
            following = None
            assert (c.start == c.connect_started) is (n in (0, 30))
            for chunk in answers(payload, n):
                if mode == "again" and n != 29:  # (29: the general way, so that 30 can go on a new connection)
                    following = c.again(chunk, ns())
                    if following is not None:
                        quick += 1
                        assert following == b"" or c.k == n + 1 and following != payload
                        break
                if c.whole(chunk, ns()):
                    quick += 1
                else:
                    c.reader.feed(chunk, ns())
            if c.reader is not None and following is None:
                assert c.reader.done
                c.answered()
        assert c.k == 60
        rec.flush()
        r = rec.result
        results[mode] = (quick, r.complete, r.failed, dict(r.errors), dict(r.backends), r.bytes_received,
                         r.latency.get_total_count(), r.rtt.get_total_count(), r.total.get_total_count(),
                         r.latency.get_max_value() <= r.total.get_max_value(), len(rec.entries()))
    assert results["reader"][0] == 0 and results["whole"][0] > 10 and results["again"][0] > 10  # one step ...
    assert results["whole"][1:] == results["reader"][1:] == results["again"][1:]  # ... counted the same
    assert results["again"][1:4] == (42, 18, {"wrong-reply": 11, "extra-answer": 7})


def test_dead_target_ends_fast_with_a_clear_line(log_dir):
    started = time.monotonic()
    proc = stress("-n", "1000", "-c", "10", "--port", str(cluster.free_port()), log_dir=log_dir)
    assert proc.returncode == 69
    assert "connection refused" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert time.monotonic() - started < 30  # generous: it only proves no hang
    proc = stress("-n", "10", "-c", "1", "--host", "::1", "--port", str(cluster.free_port()), log_dir=log_dir)
    assert proc.returncode == 69 and "cannot connect to [::1]:" in proc.stderr, proc.stderr  # (was ::1:PORT)


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_out_of_descriptors_every_request_is_counted_and_none_blamed_on_the_target(procs, log_dir, tmp_path, engine):
    """Under an open-files limit of 64, 200 clients: the connects that find no
    descriptor fail as no-descriptor, and every request is counted. The thread
    engine's clients died of it (the requests they had left went missing, exit 0),
    the async engine's waited for ever."""
    server = procs.start(cluster.echo_server("server1", cluster.free_port(), "--log-level", "warning",
                                             log_dir=str(log_dir)))
    path = tmp_path / "out.json"
    proc = subprocess.run(cluster.python_script("ClientServer_StressTools.py", "--port", str(server.port), "-n", "2000",
                                                "-c", "200", "--engine", engine, "--quiet", "--log-dir", str(log_dir),
                                                "--json", str(path)),
                          capture_output=True, text=True, timeout=90,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    row = json.loads(path.read_text())["runs"][0]
    assert row["complete"] + row["failed"] == 2000, row
    assert row["failed"] and set(row["errors"]) == {"no-descriptor"}, row["errors"]
    assert proc.returncode == 1


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_a_client_that_fails_as_it_is_made_is_counted_as_failed(procs, log_dir, monkeypatch, capfd, engine):
    """Made before its thread's guard (thread engine), or by the one load process's
    engine (async, epoll): a MemoryError there (--size 100000000000, before --size had
    a bound) ended a run with the thread engine as 0 complete, 0 failed, exit 0; the
    others crashed with a second traceback (KeyError 'out') and no report."""
    from clusterkit.stress import engines, plan
    from clusterkit.stress.config import StressConfig

    server = procs.start(cluster.echo_server("server1", cluster.free_port(), "--log-level", "warning",
                                             log_dir=str(log_dir)))
    made = plan.Client.__init__

    def buggy(self, cfg, index, *args, **kwargs):
        if index == 1:
            raise MemoryError("no room for the message")
        made(self, cfg, index, *args, **kwargs)

    monkeypatch.setattr(plan.Client, "__init__", buggy)
    result, _ = engines.run(StressConfig(port=server.port, requests=40, concurrency=2, pin=False, engine=engine,
                                         processes=1))
    assert result.errors.get("engine-crashed") == 1 and result.failed >= 1, (result.complete, result.errors)
    assert "MemoryError: no room for the message" in capfd.readouterr().err


def test_a_thread_client_that_dies_of_a_bug_is_counted_as_failed(procs, log_dir, monkeypatch, capfd):
    """A client thread that raised went quietly: its requests were missing from the
    counts and the run passed for a clean one."""
    from clusterkit.stress import engines
    from clusterkit.stress.config import StressConfig

    server = procs.start(cluster.echo_server("server1", cluster.free_port(), "--log-level", "warning",
                                             log_dir=str(log_dir)))
    request = engines.Client.request

    def buggy(self):
        if self.index == 1 and self.k == 3:
            raise RuntimeError("a bug")
        return request(self)

    monkeypatch.setattr(engines.Client, "request", buggy)
    result, _ = engines.run(StressConfig(port=server.port, requests=40, concurrency=2, pin=False))
    assert result.complete == 23 and result.errors == {"engine-crashed": 1}, (result.complete, result.errors)
    assert "RuntimeError: a bug" in capfd.readouterr().err


IN_NAMESPACE = """
import json, subprocess, sys
from clusterkit import cluster
log_dir, out, engine = sys.argv[1:4]
with cluster.ProcessGroup() as group:
    server = group.start(cluster.echo_server("server1", 7001, "--log-level", "warning", log_dir=log_dir))
    proc = subprocess.run(cluster.python_script("ClientServer_StressTools.py", "--port", "7001", "-n", "300", "-c", "2",
                                                "--engine", engine, "--quiet", "--log-dir", log_dir, "--json", out),
                          capture_output=True, text=True, timeout=90)
    print(json.dumps({"rc": proc.returncode, "stderr": proc.stderr}))
"""


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_running_out_of_local_ports_is_not_blamed_on_the_target(log_dir, tmp_path, engine):
    """A connection per request leaves each local port in TIME_WAIT for a minute:
    with 8 ports (a network and PID namespace of the test's own, whose processes all
    die with it), the run ends early saying this machine ran out of local ports and
    exits 71; it said the target stopped accepting connections (exit 69)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -n (root, or user namespaces) for a network namespace of its own")
    out = tmp_path / "out.json"
    setup = ('ip link set lo up && sysctl -q -w net.ipv4.ip_local_port_range="40000 40007" net.ipv4.tcp_tw_reuse=0 '
             '&& exec "$0" -c "$1" "$2" "$3" "$4"')
    proc = subprocess.run(["unshare", "-n", "-p", "--fork", "--kill-child", "sh", "-c", setup, sys.executable,
                           IN_NAMESPACE, str(log_dir), str(out), engine],
                          cwd=cluster.ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 71, result["stderr"]
    assert "run ended early: this machine ran out of local ports to connect from" in result["stderr"]
    assert "the target was not at fault" in result["stderr"] and "Traceback" not in result["stderr"]
    row = json.loads(out.read_text())["runs"][0]
    assert row["errors"].get("no-local-port", 0) >= 6 and "connect-error" not in row["errors"], row["errors"]
    assert row["complete"] + row["failed"] < 300


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_a_target_that_never_answers_ends_the_run_early(log_dir, tmp_path, engine):
    """Every request would wait out --timeout: n/c of them in a row (100 x 5 s with
    the defaults). Once every client has had three in a row, the run ends, as
    ApacheBench ends at its first timeout."""
    fake = FakeServer("silent")
    started = time.monotonic()
    try:
        row, proc = run_json("-n", "400", "-c", "4", "--timeout", "1", "--engine", engine, "--port",
                             str(fake.port), log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()
    assert time.monotonic() - started < 60  # generous; without the rule: 100 x 1 s
    assert proc.returncode == 69, proc.stderr
    assert "run ended early: the target stopped answering: every client's last 3 requests timed out" \
        in proc.stderr
    assert row["complete"] == 0 and row["errors"] == {"timeout": row["failed"]} and row["failed"] < 40
    # A connection per request, counted with it: not those of the requests let go at the end.
    assert row["connections"] == row["failed"], row


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_a_run_whose_every_request_was_sent_did_not_end_early(log_dir, tmp_path, engine):
    """-n 3 -c 1 against a server that never answers: three timeouts, every request
    sent and judged. That is a finished run with failures (exit 1), not one "ended
    early" because "the target stopped answering" (69): nothing was left to send."""
    row, proc = run_on_fake("silent", "-n", "3", "-c", "1", "--timeout", "0.3", "--engine", engine,
                            log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 1 and "ended early" not in proc.stderr, proc.stderr
    assert row["failed"] == 3 and row["errors"] == {"timeout": 3}, row


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_a_target_slower_than_the_timeout_is_not_called_dead(log_dir, tmp_path, engine):
    """Its answers time out, but bytes of them come: each request is a timeout and
    the run goes on to the end (exit 1), not "the target stopped answering" (69)."""
    row, proc = run_on_fake("slow-ack", "-n", "6", "-c", "1", "--timeout", "0.3", "--engine", engine,
                            log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 1 and "stopped answering" not in proc.stderr, proc.stderr
    assert row["failed"] == 6 and row["errors"] == {"timeout": 6}, row


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_target_dying_mid_run_ends_it_early_with_a_clear_line(start_server, log_dir, tmp_path, engine):
    server = start_server("server1")
    path = tmp_path / "out.json"
    # --duration 60: without the dead-target rule this would run (and fail) for a minute.
    run = subprocess.Popen(cluster.python_script("ClientServer_StressTools.py", "--duration", "60", "-c", "4",
                                                 "--engine", engine, "--port", str(server.port), "--quiet",
                                                 "--json", str(path), "--log-dir", str(log_dir)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # A message answered: the run is under way. (Not the first event=open: that is the
        # tool's pre-flight connect, and a kill 0.5 s after it, on a loaded machine, came
        # before the first answer: complete 0.)
        wait_answered(log_dir)
        server.kill()
        out, err = run.communicate(timeout=30)  # generous: it only proves no hang
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 69, err
    assert "run ended early: the target stopped accepting connections" in err
    assert "Traceback" not in err
    row = json.loads(path.read_text())["runs"][0]
    assert row["complete"] > 0 and row["ended_early"]
    # A few refused connects each, not the hundreds to thousands that piled up while the
    # watcher looked (901, 404 and 2,141 in the three engines): past three, a client waits.
    assert 0 < row["errors"].get("refused", 0) < 200, row["errors"]


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


def test_open_loop_cut_short_by_a_dead_target_says_so_not_that_the_server_stalled(start_server, log_dir, tmp_path):
    """The rest of the schedule of a run that a dead target ended early was put down
    to 'the server fell behind or stalled'."""
    server = start_server("server1")
    path = tmp_path / "out.json"
    run = subprocess.Popen(cluster.python_script("ClientServer_StressTools.py", "--rate", "200", "--duration", "30",
                                                 "-c", "4", "--port", str(server.port), "--quiet", "--json", str(path),
                                                 "--log-dir", str(log_dir)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_answered(log_dir)
        time.sleep(0.3)
        server.kill()
        out, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 69, err
    row = json.loads(path.read_text())["runs"][0]
    unsent = row["scheduled"] - row["complete"] - row["failed"]
    text = " ".join(out.split())
    assert (f"{unsent:,} of the 6,000 requests the schedule had were never sent: the run ended early, as the target "
            f"stopped accepting connections") in text, text
    assert "fell behind" not in text


@pytest.mark.skipif(shutil.which("ab") is None, reason="ApacheBench (ab, Debian's apache2-utils) is not installed")
@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
@pytest.mark.parametrize("keepalive", [False, True])
def test_http_mode_counts_what_apachebench_counts(tmp_path, log_dir, procs, keepalive, engine):
    www = tmp_path / "www"
    www.mkdir()
    (www / "page.html").write_text("<html><body>" + "hello " * 200 + "</body></html>\n")
    port = cluster.free_port()
    procs.start(cluster.Process("http.server", [sys.executable, "-m", "http.server", str(port), "--bind",
                                                "127.0.0.1", "--directory", str(www)], port=port))
    url = f"http://127.0.0.1:{port}/page.html"
    ab = subprocess.run(["ab", *(["-k"] if keepalive else []), "-n", "200", "-c", "4", url],
                        capture_output=True, text=True, timeout=60)
    assert ab.returncode == 0, ab.stderr
    ab_complete = int(re.search(r"Complete requests:\s+(\d+)", ab.stdout).group(1))
    ab_bytes = int(re.search(r"Total transferred:\s+(\d+)", ab.stdout).group(1))
    row, proc = run_json("-n", "200", "-c", "4", "--http", url, *(["-k"] if keepalive else []),
                         "--engine", engine, log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert row["complete"] == ab_complete == 200
    assert row["total_transferred_bytes"] == ab_bytes
    footer = " ".join(proc.stdout.split())  # (as the terminal's width wraps it)
    assert "rtt = send to the whole answer" in footer and "ACK" not in footer  # an HTTP answer has no ACK line


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


def test_a_kill_after_the_run_is_said_not_done(log_dir, tmp_path):
    row, proc = run_json("--spawn", "-n", "20", "-c", "2", "--kill-backend", "server2@60", log_dir=log_dir,
                         tmp_path=tmp_path)
    assert proc.returncode == 0 and row["complete"] == 20
    assert "the run ended before that; no backend was killed" in proc.stderr


def interrupted_run(procs, log_dir, tmp_path, *args: str, within: float = 30) -> tuple[str, str, dict]:
    """A stress run against a fresh server, Ctrl-C'ed once it has an answer (exit 130):
    its stdout, stderr and --json row (the wait for the exit bounded by ``within``)."""
    server = procs.start(cluster.echo_server("server1", cluster.free_port(), log_dir=str(log_dir)))
    out = tmp_path / "out.json"
    proc = subprocess.Popen(cluster.python_script(
        "ClientServer_StressTools.py", "--port", str(server.port), *args, "--quiet", "--json", str(out),
        "--log-dir", str(log_dir)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_answered(log_dir)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=within)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    return stdout, stderr, json.loads(out.read_text())["runs"][0]


@pytest.mark.parametrize("processes", ["1", "2"])
def test_ctrl_c_ends_the_run_with_the_report_of_what_was_done(procs, log_dir, tmp_path, processes):
    """As ApacheBench: Ctrl-C prints the results so far (it printed 'interrupted'
    alone, and --json wrote nothing); exit 130."""
    stdout, stderr, row = interrupted_run(procs, log_dir, tmp_path, "--duration", "30", "--rate", "200", "-k",
                                          "--processes", processes)
    assert row["complete"] > 0 and row["failed"] == 0
    assert f"interrupted (Ctrl-C) after {row['complete']:,} requests" in stderr
    assert "were never sent" not in stdout + stderr  # (the user ended it: no 'the server fell behind')


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_ctrl_c_ends_a_run_waiting_for_a_far_off_rate_send(procs, log_dir, tmp_path, engine):
    """--rate 0.05: the next send is 20 s away. The thread engine slept to it in
    one go, and Ctrl-C (or SIGTERM) went unanswered until then."""
    _, _, row = interrupted_run(procs, log_dir, tmp_path, "--duration", "600", "--rate", "0.05", "-c", "1",
                                "--engine", engine, within=15)  # (not the 20 s to the next send)
    assert row["complete"] == 1 and row["connections"] == 1


def test_the_report_survives_a_closed_stderr_and_a_narrow_output(procs, log_dir):
    """Started with stderr closed (2>&-), the tool failed at its first word to it,
    after the run, with no report; and piped (80 columns), a sweep's table cut its
    numbers to '5,065…' and its labels to 'laten…'."""
    server = procs.start(cluster.echo_server("server1", cluster.free_port(), log_dir=str(log_dir)))
    proc = subprocess.run(cluster.python_script(
        "ClientServer_StressTools.py", "--port", str(server.port), "-n", "100", "--sweep", "1,2,3,4,5,6,7,8,9,10",
        "--log-dir", str(log_dir)), stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2), text=True, timeout=90)
    assert proc.returncode == 0
    assert "Complete requests" in proc.stdout and "latency p99.9 (ms)" in proc.stdout
    assert "…" not in proc.stdout
    assert "100 │" in proc.stdout.split("Complete requests")[1].splitlines()[0]


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_ctrl_c_at_a_terminal_fails_no_request_of_a_spawned_run(log_dir, tmp_path, engine):
    """A terminal's Ctrl-C goes to its whole foreground process group: it stopped the
    spawned servers and balancer too, while the clients were still connecting, and
    their refused connects were failed requests (3 to 9 of them). The spawned
    cluster has process groups of its own; the tool stops it when it is done."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "out.json"
    proc = subprocess.Popen(cluster.python_script(
        "ClientServer_StressTools.py", "--spawn", "--duration", "30", "-c", "4", "--engine", engine, "--quiet",
        "--json", str(out), "--log-dir", str(log_dir)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        process_group=0)  # (as a shell runs a command in the foreground)
    children: list = []
    try:
        wait_answered(log_dir, timeout=60, balanced=True)  # (the checks answered before the run began)
        children = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    assert proc.returncode == 130, stderr
    row = json.loads(out.read_text())["runs"][0]
    assert row["complete"] > 0 and row["failed"] == 0, row["errors"]
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("when", ["starting", "running"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_ends_a_spawned_run_as_ctrl_c_does_and_leaves_no_server_behind(log_dir, tmp_path, sig, when):
    """SIGTERM or SIGHUP killed the tool on the spot (no report), and the three
    servers and the balancer it had spawned ran on; so did those a Ctrl-C during
    the start left. Now: the report of what was done, exit 130, nothing left."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "out.json"
    proc = subprocess.Popen(cluster.python_script(
        "ClientServer_StressTools.py", "--spawn", "--duration", "30", "--rate", "200", "-k", "--quiet",
        "--json", str(out), "--log-dir", str(log_dir)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, psutil.Process] = {}
    try:
        tool = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while True:  # its children: the spawned servers (and the balancer, and load processes, once running)
            seen.update((c.pid, c) for c in tool.children(recursive=True))
            server_log = log_dir / "server_log.log"  # (a hundred message lines: the health checks make a few a second)
            if (when == "starting" and seen) or (when == "running" and server_log.exists()
                                                 and server_log.read_text().count("event=message") > 100):
                break
            assert time.monotonic() < deadline and proc.poll() is None, "never got there"
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        for child in seen.values():
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    left = [c.pid for c in seen.values() if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running: {left}"
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    if when == "running":
        row = json.loads(out.read_text())["runs"][0]
        assert row["complete"] > 0 and row["failed"] == 0, row["errors"]
        assert f"interrupted ({sig.name}) after {row['complete']:,} requests" in stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_the_whole_group_still_gives_the_report(procs, log_dir, tmp_path, sig):
    """A hangup, or timeout(1) and systemd, signal the whole process group: the load
    processes died of it with a traceback each, and the report had nothing but
    engine-crashed. The parent alone decides, as for Ctrl-C."""
    server = procs.start(cluster.echo_server("server1", cluster.free_port(), log_dir=str(log_dir)))
    out = tmp_path / "out.json"
    proc = subprocess.Popen(cluster.python_script(
        "ClientServer_StressTools.py", "--port", str(server.port), "--duration", "30", "--rate", "200", "-k",
        "--processes", "2", "--quiet", "--json", str(out), "--log-dir", str(log_dir)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_answered(log_dir)
        time.sleep(0.5)
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    row = json.loads(out.read_text())["runs"][0]
    assert row["complete"] > 0 and row["failed"] == 0, row["errors"]
    assert f"interrupted ({sig.name}) after {row['complete']:,} requests" in stderr


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_ctrl_c_does_not_wait_out_the_timeout_of_what_is_on_its_way(procs, log_dir, tmp_path, engine):
    """With the server stopped (SIGSTOP), Ctrl-C took the thread and async engines
    --timeout to obey (their clients waited in a recv), and counted what was on its
    way as timeouts; the epoll engine let go at once, uncounted."""
    server = procs.start(cluster.echo_server("server1", cluster.free_port(), log_dir=str(log_dir)))
    out = tmp_path / "out.json"
    proc = subprocess.Popen(cluster.python_script(
        "ClientServer_StressTools.py", "--port", str(server.port), "--duration", "60", "-k", "-c", "4",
        "--timeout", "30", "--engine", engine, "--quiet", "--json", str(out), "--log-dir", str(log_dir)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_answered(log_dir)
        time.sleep(0.5)
        server.signal(signal.SIGSTOP)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        proc.kill()
        server.signal(signal.SIGCONT)
    assert proc.returncode == 130, stderr
    assert waited < 15, f"Ctrl-C took {waited:.1f} s with --timeout 30"
    row = json.loads(out.read_text())["runs"][0]
    assert row["complete"] > 0 and row["failed"] == 0, row["errors"]


def test_a_load_process_that_dies_leaves_the_others_report_and_a_failure(procs, log_dir, tmp_path):
    """kill -9 of one load process was an EOFError traceback and no report at all."""
    psutil = pytest.importorskip("psutil")
    server = procs.start(cluster.echo_server("server1", cluster.free_port(), log_dir=str(log_dir)))
    out = tmp_path / "out.json"
    proc = subprocess.Popen(cluster.python_script(
        "ClientServer_StressTools.py", "--port", str(server.port), "--duration", "3", "--rate", "400", "-k",
        "-c", "4", "--processes", "2", "--quiet", "--json", str(out), "--log-dir", str(log_dir)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while len(children := psutil.Process(proc.pid).children()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1)
        children[0].kill()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 1, stderr
    row = json.loads(out.read_text())["runs"][0]
    assert row["complete"] > 0 and row["errors"].get("engine-crashed") == 1
    assert "Complete requests" in stdout


@pytest.mark.parametrize("args, message", [
    (["-c", "0"], "-c/--concurrency: must be at least 1"),
    (["--rate", "-5"], "argument --rate: must be at least one request a year"),
    (["--duration", "2", "--warmup", "3"], "--warmup must be shorter than --duration"),
    (["--processes", "x"], "--processes 'x': use a number, or auto"),
    (["--sweep", "1,x"], "use numbers like 1,3,5,8,10"),
    (["--sweep", ","], "use numbers like 1,3,5,8,10"),
    (["--timeout", "inf"], "argument --timeout: must be positive, at most a year"),
    (["--duration", "inf"], "argument --duration: must be positive, at most a year"),
    (["--duration", "2", "--warmup", "nan"], "argument --warmup: must be 0 or more, at most a year"),
    (["-n", "100", "--warmup", "5"], "--warmup needs --duration"),
    (["--size", "4"], "--size must be at least 14"),
    (["--size", "100000000000"], "--size must be at most 67,108,864 bytes"),
    (["--duration", "1", "-c", "20001"], "-c must be between 1 and 20,000"),
    (["--http", "http://127.0.0.1:0/page.html"], "port 0 is no port to connect to"),
    (["--http", "http://[::1]x:45000/"], "use a URL like http://"),
    (["--http", "http://127.0.0.1:45000/", "--port", "7000", "--size", "100"], "leave out --port, --size"),
    (["-n", "100", "--duration", "2"], "give -n or --duration, not both"),
    (["--http", "https://127.0.0.1:1/"], "use a URL like http://"),
    (["--http", "http://127.0.0.1:99999/"], "--http 'http://127.0.0.1:99999/': Port out of range"),
    (["--http", "http://127.0.0.1:abc/"], "--http 'http://127.0.0.1:abc/': Port could not be cast"),
    (["--http", "http://[::1/"], "--http 'http://[::1/': Invalid IPv6 URL"),
    (["--duration", "1e308"], "argument --duration: must be positive, at most a year"),
    (["--pipeline", "4"], "--pipeline needs --connection keepalive"),
    (["--kill-backend", "server2@50%"], "--kill-backend needs --spawn"),
    (["--nice", "30"], "--nice must be between 0 and 19"),
    (["--json", "/nonexistent-dir/out.json"], "--json: cannot write /nonexistent-dir/out.json: no directory"),
    (["--csv", "/tmp"], "--csv: cannot write /tmp: a directory"),
    (["-n", "3", "-c", "10"], "-c 10 is more than -n 3"),
    (["--spawn", "--kill-backend", "server9@1"], "no spawned backend named 'server9'"),
    (["--spawn", "--kill-backend", "server2@nan"], "give a number of seconds above 0"),
    (["--spawn", "--kill-backend", "server2@-1"], "give a number of seconds above 0"),
    (["--spawn", "--kill-backend", "server2@150%"], "more than 0% and less than 100%"),
    (["--spawn", "--duration", "2", "--kill-backend", "server2@3"], "the run lasts 2 s"),
    (["--spawn", "--host", "::1"], "leave out --host, --port and --http"),
    (["-H", "X-A: 1"], "-H is for --http"),
    (["--http", "http://127.0.0.1:1/", "-H", "no colon"], "use 'Name: value'"),
    (["--http", "http://127.0.0.1:1/", "-H", "Bad Name: 1"], "use 'Name: value'"),
    (["--http", "http://127.0.0.1:1/", "-H", "X-A: 1\r\nX-B: 2"], "no line breaks"),
    (["--http", "http://127.0.0.1:1/", "-H", "Content-Length: 5"], "without a body"),
])
def test_bad_options_are_one_clear_line_and_exit_2(args, message, log_dir):
    proc = stress(*args, log_dir=log_dir, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag, values", [
    ("--timeout", ["nan", "inf", "0", "-1", "1e300"]),
    ("--duration", ["nan", "-inf", "0", "-2", "1e300"]),
    ("--warmup", ["nan", "inf", "-0.5", "1e300"]),
    ("--rate", ["nan", "inf", "0", "-5", "1e-300", "1e300"]),
])
def test_bad_timing_flags_are_argparse_errors_with_the_usage(flag, values, log_dir):
    """The timing and rate flags took any float, refused later by the config's check
    without the usage, as the other programs' timing flags no longer are; a --rate of
    1e-300 was a traceback per client (its schedule's send times overflowed), one of
    1e300 with --duration 2 a traceback in the report (rate x duration). Now each is
    argparse's error with the usage, before anything starts. (No server listens on
    the port: a value taken would be exit 69, not 2.)"""
    port = str(cluster.free_port())
    for value in values:
        more = ["--duration", "2"] if flag in ("--warmup", "--rate") else []
        proc = stress(f"{flag}={value}", *more, "--port", port, log_dir=log_dir, timeout=30)  # (= for -inf)
        assert proc.returncode == 2, (value, proc.stderr)
        assert f"error: argument {flag}: must be" in proc.stderr and "usage:" in proc.stderr, (value, proc.stderr)
        assert "Traceback" not in proc.stderr, (value, proc.stderr)


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_keepalive_connections_the_server_closes_while_idle_are_reopened(procs, log_dir, tmp_path, engine):
    # --rate leaves each connection idle 200 ms between requests; the server closes
    # idle keep-alive connections after 50 ms: every request still gets its answer.
    port = cluster.free_port()
    procs.start(cluster.Process("http-async", cluster.python_script(
        "http_servers/Server_async_http.py", "--port", str(port), "--keepalive-timeout", "0.05",
        "--log-dir", str(log_dir)), port=port))
    row, proc = run_json("--http", f"http://127.0.0.1:{port}/page.html", "-k", "-n", "20", "-c", "2",
                         "--rate", "10", "--engine", engine, "--processes", "1",
                         log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (row["complete"], row["failed"]) == (20, 0), row["errors"]
    # ... and the server saw exactly those 20: no request went out twice or uncounted.
    server_log = log_dir / "server_log.log"
    deadline = time.monotonic() + 10  # the server writes its log in batches
    while server_log.read_text().count("event=request ") < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert server_log.read_text().count("event=request ") == 20


@pytest.mark.parametrize("head, keep_alive", [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n", False),
])
def test_http_reader_knows_whether_the_server_keeps_the_connection(head, keep_alive):
    from clusterkit.stress.exchange import HttpReader
    reader = HttpReader()
    reader.feed(head + b"ok", 1)
    assert reader.done and reader.outcome.ok and reader.outcome.nbytes == len(head) + 2
    assert reader.keep_alive is keep_alive


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_http_keepalive_uses_one_connection_per_client(procs, log_dir, tmp_path, engine):
    port = cluster.free_port()
    procs.start(cluster.Process("http-async", cluster.python_script(
        "http_servers/Server_async_http.py", "--port", str(port), "--log-dir", str(log_dir)), port=port))
    url = f"http://127.0.0.1:{port}/page.html"
    keep, proc = run_json("--http", url, "-k", "-n", "400", "-c", "4", "--engine", engine,
                          log_dir=log_dir, tmp_path=tmp_path, name="keep.json")
    assert proc.returncode == 0, proc.stderr
    assert (keep["complete"], keep["connections"]) == (400, 4)
    close, _ = run_json("--http", url, "-n", "100", "-c", "4", "--engine", engine,
                        log_dir=log_dir, tmp_path=tmp_path, name="close.json")
    assert (close["complete"], close["connections"]) == (100, 100)
    # A 404 is a failed request on a good connection, which goes on (as in ab): each
    # closed it, so a -k run against an error page measured connects.
    missing, _ = run_json("--http", url.replace("page.html", "nope"), "-k", "-n", "40", "-c", "4", "--engine", engine,
                          log_dir=log_dir, tmp_path=tmp_path, name="missing.json")
    assert (missing["failed"], missing["errors"], missing["connections"]) == (40, {"http-404": 40}, 4)


def test_async_connects_timing_out_as_they_complete_do_not_hang_the_run(procs, log_dir):
    """A connect timeout that ran out just after the connection was made (and its
    request sent) closed that connection unseen: the client waited for ever, and
    the run with it (3 runs in 4 with --timeout 0.001)."""
    port = cluster.free_port()
    procs.start(cluster.Process("http-async", cluster.python_script(
        "http_servers/Server_async_http.py", "--port", str(port), "--log-dir", str(log_dir), "--log-level",
        "warning"), port=port))
    for _ in range(3):
        proc = stress("--http", f"http://127.0.0.1:{port}/page.html", "-n", "300", "-c", "4", "--timeout", "0.001",
                      "--engine", "async", "--processes", "1", log_dir=log_dir, timeout=60)
        assert proc.returncode in (0, 1, 69) and "Traceback" not in proc.stderr, proc.stderr


def test_http_host_header_leaves_out_the_urls_user_and_password(log_dir, tmp_path):
    server = FakeServer("http-unframed")
    try:
        row, proc = run_json("--http", f"http://user:pw@127.0.0.1:{server.port}/x", "-n", "2", "-c", "1",
                             log_dir=log_dir, tmp_path=tmp_path)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert [b"\r\nHost: 127.0.0.1:%d\r\n" % server.port in head for head in server.heads] == [True, True]


def test_an_empty_message_is_sent_as_an_empty_line(start_server, log_dir, tmp_path):
    """SPEC: a message may be empty. ``--message ''`` sent generated 64-byte ones."""
    server = start_server()
    row, proc = run_json("--message", "", "-n", "10", "-c", "2", "-k", "--port", str(server.port),
                         log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0 and row["complete"] == 10, proc.stderr
    assert (log_dir / "server_log.log").read_text().count(" len=0") == 10


def test_http_reader_answer_without_length_ends_with_the_connection():
    from clusterkit.stress.exchange import HttpReader
    answer = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close"
    unframed = HttpReader()
    unframed.feed(answer, 1)
    assert not unframed.done
    unframed.close(2)
    assert unframed.outcome.ok and unframed.outcome.nbytes == len(answer)
    truncated = HttpReader()
    truncated.feed(b"HTTP/1.0 200 OK\r\nContent-Length: 99\r\n\r\nshort", 1)
    truncated.close(2)
    assert (truncated.outcome.ok, truncated.outcome.label) == (False, "closed")


def http_answer(date: bytes = b"Thu, 26 Nov 2026 05:00:00 GMT", backend: bytes = b"b1", body: bytes = b"x" * 50,
                status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %s\r\nServer: t\r\nDate: %s\r\nX-Backend: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, date, backend, len(body), extra, body))


@pytest.mark.parametrize("pieces", [1, 2, 3, 10_000])  # 10,000: a byte at a time
def test_http_answers_seen_before_count_as_the_parser_counts_them(pieces):
    # Each answer is read twice: by a reader that knows the client's last right
    # answer (as plan.Target keeps it) and by a fresh one that parses; both must agree.
    from clusterkit.stress.exchange import HttpReader
    chunked = b"HTTP/1.1 200 OK\r\nDate: Thu, 26 Nov 2026 05:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    answers = [http_answer(), http_answer(date=b"Thu, 26 Nov 2026 05:00:01 GMT"),  # only the Date differs
               http_answer(date=b"Thu, 26 Nov 2026 05:00:02 GMT"), http_answer(backend=b"b2"),  # another backend
               http_answer(backend=b"b2", date=b"Fri, 27 Nov 2026 06:00:00 GMT"),
               http_answer(date=b"Thu, 26 Nov 2026 05:00:03 GMT", backend=b"b2", body=b"y" * 50),  # another body
               http_answer(date=b"x\r\nContent-Length: 3\r\nX-A: 12", backend=b"b2", body=b"y" * 50),  # same size
               http_answer(backend=b"b2", body=b"y" * 50, status=b"404 No!"),  # same length, not 2xx
               http_answer(backend=b"b2", body=b"y" * 50), http_answer(backend=b"b2", body=b"y" * 40),  # shorter
               http_answer(backend=b"b2", body=b"y" * 50)[:-10],  # cut short by a close
               http_answer(backend=b"b2", body=b"y" * 50) + b"HTTP/1.1 200",  # more after the answer
               chunked, chunked, http_answer(extra=b"Connection: close\r\n"), http_answer(extra=b"Connection: close\r\n")]
    known, fast = None, 0
    for n, answer in enumerate(answers):
        readers = [HttpReader(known), HttpReader()]
        for r in readers:
            size = -(-len(answer) // pieces)
            for i in range(0, len(answer), size):
                if not r.done:
                    r.feed(answer[i:i + size], n * 10 + i)
            r.close(n * 10 + 9)  # the server's close (a no-op once the answer is complete)
        quick, parsed = readers
        fast += quick.parser is None and quick.known is not None
        assert (quick.outcome, quick.keep_alive, quick.complete) == (parsed.outcome, parsed.keep_alive, parsed.complete), n
        learned = quick.known_answer()
        known = learned or known
    assert fast >= 5  # the ones that were the same answer again went the quick way


@pytest.mark.parametrize("keepalive, closes, verdict", [(False, True, "CLOSES"), (True, False, "AGAIN"),
                                                       (True, True, "CLOSES"), (False, False, None)])
def test_one_step_http_answers_count_as_the_reader_counts_them(keepalive, closes, verdict):
    # plan.Client.whole takes an answer that is the client's last right one again
    # (but for its Date) in one step; run with it and without, the counts agree.
    # (A server that keeps open a connection the client closes after each request
    # goes the general way: the client, not the answer, ends the connection.)
    from clusterkit.stress.board import Board
    from clusterkit.stress.config import StressConfig
    from clusterkit.stress.metrics import Recorder, RunResult
    from clusterkit.stress.plan import Client, Plan, ns

    import clusterkit.stress.plan as plan_module
    mode = b"Connection: close\r\n" if closes else b""

    def answer(n: int) -> bytes:
        date = b"Thu, 26 Nov 2026 05:00:%02d GMT" % (n % 60)
        if n % 9 == 8:
            return http_answer(date=date, status=b"500 Bad", extra=mode)  # as long as a 200, not 2xx
        if n % 11 == 10:
            return http_answer(date=date, backend=b"b2", extra=mode)  # another backend, same length
        if n % 13 == 12:
            return http_answer(date=date, body=b"y" * 50, extra=mode)  # another body, same length
        return http_answer(date=date, extra=mode)

    cfg = StressConfig(http_url="http://127.0.0.1:9/x", requests=80, concurrency=1,
                       connection="keepalive" if keepalive else "per-request")
    results, verdicts = {}, set()
    for quick in (False, True):
        board = Board(1, 1)
        rec = Recorder(RunResult(), keep_log=True)
        c = Client(cfg, 0, Plan(cfg, ns(), 80, 0), rec, board, board.failed_slot(0))
        fast = 0
        for n in range(80):
            if not keepalive or n in (0, 40):
                c.connect_started = ns()
                c.connected()
            c.request()
            if not quick:
                c.known = None
            data = answer(n)
            for chunk in [data[:30], data[30:]] if n % 7 == 6 else [data]:
                got = c.whole(chunk, ns())
                if got:
                    verdicts.add(got)
                    fast += 1
                    break
                c.reader.feed(chunk, ns())
            if c.reader is not None:
                c.reader.close(ns())  # (the server's close: a no-op for a complete answer)
                c.answered()
        rec.flush()
        r = rec.result
        results[quick] = (r.complete, r.failed, dict(r.errors), dict(r.backends), r.bytes_received,
                          r.latency.get_total_count(), r.rtt.get_total_count(), r.total.get_total_count(),
                          len(rec.entries()))
        assert fast > 30 if quick and verdict else fast == 0
    assert results[True] == results[False]
    assert results[True][:4] == (72, 8, {"http-500": 8}, {"b1": 65, "b2": 7})
    assert verdicts == ({getattr(plan_module, verdict)} if verdict else set())


ROGUE_NAME = b'web1 reply=forged latency_ms=0.001 [/x] note="x'


def interim_answers(n: int) -> bytes:
    """What FakeServer("http-interim") sends before its n-th answer: 100 Continue,
    and every 2nd time 103 Early Hints too."""
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" if n % 2 else b""
    return b"HTTP/1.1 100 Continue\r\n\r\n" + early


def varied_answer(n: int, keep_alive: bool) -> bytes:
    """The n-th answer of FakeServer("http-varied"): mostly the same 200 but for
    its Date; every 9th a 500 and every 11th from backend b2, both as long."""
    date = b"Thu, 26 Nov 2026 05:00:%02d GMT" % (n % 60)
    extra = b"" if keep_alive else b"Connection: close\r\n"
    if n % 9 == 0:
        return http_answer(date=date, status=b"500 Bad", extra=extra)
    return http_answer(date=date, backend=b"b2" if n % 11 == 0 else b"b1", extra=extra)


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
@pytest.mark.parametrize("keepalive", [False, True])
def test_http_answers_that_change_are_each_judged(log_dir, tmp_path, engine, keepalive):
    # Answers the same but for their Date are taken in one step (plan.Client.whole);
    # a 500 or another backend's answer of the same length among them is still seen.
    server = FakeServer("http-varied")
    try:
        row, proc = run_json("--http", f"http://127.0.0.1:{server.port}/", "-n", "198", "-c", "3",
                             *(["-k"] if keepalive else []), "--engine", engine, log_dir=log_dir, tmp_path=tmp_path)
    finally:
        server.close()
    assert server.count == 198
    assert (row["complete"], row["failed"], row["errors"]) == (176, 22, {"http-500": 22})
    assert row["backends"] == {"b1": 160, "b2": 16}
    assert row["total_transferred_bytes"] == server.sent


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
@pytest.mark.parametrize("keepalive", [False, True])
def test_interim_answers_before_the_final_one_are_taken(log_dir, tmp_path, engine, keepalive):
    """100 Continue or 103 Early Hints, then the answer: a client takes 1xx answers
    even unasked (RFC 9110 15.2), as curl and lb.py do. Each request failed as
    extra-answer."""
    server = FakeServer("http-interim")
    try:
        row, proc = run_json("--http", f"http://127.0.0.1:{server.port}/", "-n", "60", "-c", "3",
                             *(["-k"] if keepalive else []), "--engine", engine, log_dir=log_dir, tmp_path=tmp_path)
    finally:
        server.close()
    assert (row["complete"], row["failed"]) == (60, 0), row["errors"]
    assert row["backends"] == {"b1": 30, "b2": 30}
    assert row["total_transferred_bytes"] == server.sent


def test_what_the_server_under_test_names_itself_forges_no_log_field_and_breaks_no_report(log_dir, tmp_path):
    """An X-Backend of 'web1 reply=forged latency_ms=0.001 [/x] note="x' went into
    client_log.log as it came: a forged latency_ms before the real one, and a quote
    that swallowed the rest; and its "[/x]" crashed the printed report (rich's markup)."""
    server = FakeServer("http-rogue")
    try:
        row, proc = run_json("--http", f"http://127.0.0.1:{server.port}/", "-n", "20", "-c", "2", "-k",
                             log_dir=log_dir, tmp_path=tmp_path)
    finally:
        server.close()
    assert proc.returncode == 0 and row["complete"] == 20, proc.stderr
    name = ROGUE_NAME.decode()
    assert row["backends"] == {name: 20} and f"answered by {name}" in proc.stdout
    lines = [x for x in (log_dir / "client_log.log").read_text().splitlines() if " event=request " in x]
    assert len(lines) == 20
    quoted = logs.quote(name)
    # (its latency_ms= is inside the quotes: outside them, one)
    assert all(f" backend={quoted} reply=ok " in x and x.replace(quoted, "").count("latency_ms=") == 1
               for x in lines), lines[0]


def test_log_values_are_quoted_with_their_control_characters_escaped():
    assert logs.quote("server1") == "server1" and logs.quote("caf\u00e9") == "caf\u00e9"
    assert logs.quote('a b="c"') == '"a b=\\"c\\""'
    assert logs.quote("red\x1b[31m\x85\x00") == '"red\\x1b[31m\\x85\\x00"'
    assert logs.quote("two\nlines\r\t") == '"two\\nlines\\r\\t"' and logs.quote("") == '""'


def test_http_header_block_without_end_fails_and_is_not_kept():
    from clusterkit.stress.exchange import HttpReader
    reader = HttpReader()
    reader.feed(b"HTTP/1.1 200 OK\r\n", 1)
    line = b"X-Filler: " + b"y" * 1000 + b"\r\n"
    for i in range(2000):  # 2 MB of headers, and no blank line
        reader.feed(line, 2 + i)
        if reader.done:
            break
    assert reader.done and reader.outcome.label == "bad-response"
    assert i < 1100  # it stopped at HttpReader.HEAD_MAX (1 MiB), not at the end of what came


UNFRAMED = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nno length: the close ends me\n"


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_http_answers_without_length_count_as_complete(log_dir, tmp_path, engine):
    server = FakeServer("http-unframed")
    try:
        row, proc = run_json("--http", f"http://127.0.0.1:{server.port}/", "-n", "60", "-c", "3",
                             "--engine", engine, log_dir=log_dir, tmp_path=tmp_path)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert (row["complete"], row["failed"]) == (60, 0), row["errors"]
    assert row["total_transferred_bytes"] == 60 * len(UNFRAMED)


@pytest.mark.parametrize("engine", ["thread", "epoll"])
def test_http_headers_given_with_H_go_with_every_request_and_replace_the_tools_own(log_dir, tmp_path, engine):
    server = FakeServer("http-unframed")
    try:
        row, proc = run_json("--http", f"http://127.0.0.1:{server.port}/x", "-n", "6", "-c", "2", "--engine", engine,
                             "-H", "X-Test:  one two ", "-H", "host: example.test", log_dir=log_dir, tmp_path=tmp_path)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert (row["complete"], row["failed"]) == (6, 0), row["errors"]
    assert len(server.heads) == 6
    for head in server.heads:
        assert head.startswith(b"GET /x HTTP/1.0\r\n") and head.endswith(b"\r\n\r\n")
        assert b"\r\nX-Test: one two\r\n" in head and b"\r\nhost: example.test\r\n" in head
        assert b"Host: 127.0.0.1" not in head and b"User-Agent: clusterkit-stress\r\n" in head


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
@pytest.mark.parametrize("behaviour, rate", [("http-twice", None), ("http-twice-late", None),
                                             ("http-twice-late", "200")])
def test_http_keepalive_answers_nobody_asked_for_fail_as_extra_answer(log_dir, tmp_path, engine, behaviour, rate):
    """A server that answers every keep-alive request twice (in one write, or the
    second copy 10 ms later) got 'Complete 200, Failed 0' from -n 200 -c 4 -k,
    having received about 100 requests: each spare answer was taken as the next
    request's. Now: a copy in the same read fails the request it came with; a copy
    on an idle connection (--rate: 20 ms between sends) fails the next one; a copy
    that came while the next request was in flight put the connection out of step,
    which shows at its end: the server still answers after the client's last
    request (plan.Client.lingers)."""
    server = FakeServer(behaviour)
    try:
        row, proc = run_json("--http", f"http://127.0.0.1:{server.port}/", "-k", "-n", "200", "-c", "4",
                             *(["--rate", rate] if rate else []), "--engine", engine, "--timeout", "2",
                             log_dir=log_dir, tmp_path=tmp_path)
    finally:
        server.close()
    assert proc.returncode == 1, proc.stderr
    assert row["complete"] + row["failed"] == 200
    assert set(row["errors"]) == {"extra-answer"}, row["errors"]
    if behaviour == "http-twice":  # every answer came with its copy: every request failed
        assert (row["failed"], server.count) == (200, 200)
    elif rate:  # an idle connection's copy fails the next request, which goes on a new connection
        assert row["failed"] >= 50 and row["complete"] <= server.count
    else:  # at least each client's last connection ended out of step
        assert row["failed"] >= 4


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
