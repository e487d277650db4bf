"""The stress tool's verdict on each answer, against fake servers that answer
wrongly, twice, late or not at all, in every engine; and its readers in
memory (one-step counting agrees with the full parse)."""

from __future__ import annotations

import time

import pytest

from clusterkit import cluster, logs

from .stress_setup import FakeServer, ROGUE_NAME, run_json, run_on_fake

pytestmark = pytest.mark.timeout(120)


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
    answer is lost with it, and the third, on a new connection, passes). The
    copy of the last answer comes after the client's last message: the client
    half-closes and waits for the server's close (Client.lingers), and the copy
    fails that answer; it went unseen (5 complete, 4 failed)."""
    fake = FakeServer("twice-late")
    try:
        row, proc = run_json("-n", "9", "-c", "1", "-k", "--timeout", "2", "--port", str(fake.port),
                             "--engine", engine, log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()
    assert proc.returncode == 1
    assert row["complete"] == 4 and row["errors"] == {"extra-answer": 5}, row["errors"]


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
@pytest.mark.parametrize("behaviour, kind", [
    ("wrong-echo", "wrong-reply"), ("missing-ack", "bad-ack"), ("endless", "bad-reply"), ("twice", "extra-answer"),
    ("extra-line", "extra-answer"), ("ack-first", "bad-reply")])
def test_bad_servers_are_caught_and_counted_by_kind(behaviour, kind, engine, log_dir, tmp_path):
    # (A silent server: test_a_target_that_never_answers_ends_the_run_early.) --timeout 3, not
    # 0.5: the endless server's line is too long only once 64 KiB have come from the fake's
    # thread in this process; a clean-clone CI run counted 11 failed of 20 once (the run ended
    # early, as a dead target's does after timeouts in a row, the likely cause; not seen again).
    row, proc = run_on_fake(behaviour, "-n", "20", "-c", "2", "--timeout", "3", "--engine", engine,
                            log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 1
    assert row["complete"] == 0 and row["failed"] == 20, (row["errors"], row.get("ended_early"))
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


def test_an_empty_message_is_sent_as_an_empty_line(start_server, log_dir, tmp_path):
    """SPEC: a message may be empty. ``--message ''`` sent generated 64-byte ones."""
    server = start_server()
    row, proc = run_json("--message", "", "-n", "10", "-c", "2", "-k", "--port", str(server.port),
                         log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0 and row["complete"] == 10, proc.stderr
    assert (log_dir / "server_log.log").read_text().count(" len=0") == 10


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


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
@pytest.mark.parametrize("load", [["-n", "20"], ["--duration", "1", "--rate", "100"]])
def test_a_copy_of_the_last_answer_after_the_half_close_fails_it_and_its_bytes_count(engine, load, log_dir,
                                                                                      tmp_path):
    """Each client half-closes after its last answer and waits for the server's
    close: a copy of that answer then fails it as extra-answer. With --rate the
    last answer was taken in one step and the client left without waiting (every
    request complete); and the copy's bytes were not in Total transferred."""
    fake = FakeServer("copy-at-eof")
    try:
        row, proc = run_json(*load, "-c", "2", "-k", "--timeout", "2", "--port", str(fake.port), "--engine", engine,
                             log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()
    assert proc.returncode == 1, proc.stderr
    assert row["errors"] == {"extra-answer": 2} and row["complete"] + 2 == fake.count, row
    assert row["total_transferred_bytes"] == fake.sent
