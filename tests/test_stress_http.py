"""The stress tool's ``--http`` mode: counts as ApacheBench counts them,
keep-alive, what servers answer (changing, interim, unframed, unasked), and
its HTTP reader in memory."""

from __future__ import annotations

import re
import shutil
import sys
import time

import pytest

from clusterkit import cluster

from .http_setup import apachebench
from .stress_setup import FakeServer, UNFRAMED, http_answer, run_json

pytestmark = pytest.mark.timeout(120)


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
    report = apachebench(url, 200, 4, keepalive, timeout=60)
    ab_complete = int(re.search(r"Complete requests:\s+(\d+)", report).group(1))
    ab_bytes = int(re.search(r"Total transferred:\s+(\d+)", report).group(1))
    row, proc = run_json("-n", "200", "-c", "4", "--http", url, *(["-k"] if keepalive else []),
                         "--engine", engine, log_dir=log_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert row["complete"] == ab_complete == 200
    assert row["total_transferred_bytes"] == ab_bytes
    footer = " ".join(proc.stdout.split())  # (as the terminal's width wraps it)
    assert "rtt = send to the whole answer" in footer and "ACK" not in footer  # an HTTP answer has no ACK line


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


def test_http_host_header_leaves_out_the_urls_user_and_password(log_dir, tmp_path):
    server = FakeServer("http-unframed")
    try:
        row, proc = run_json("--http", f"http://user:pw@127.0.0.1:{server.port}/x", "-n", "2", "-c", "1",
                             log_dir=log_dir, tmp_path=tmp_path)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert [b"\r\nHost: 127.0.0.1:%d\r\n" % server.port in head for head in server.heads] == [True, True]


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
                    if got == plan_module.CLOSES:
                        c.drained()  # (counted at the server's close, as the engines call it)
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
@pytest.mark.parametrize("behaviour", ["http-close-twice", "http-close-twice-now"])
def test_a_second_answer_before_the_servers_close_fails_as_extra_answer(log_dir, tmp_path, engine, behaviour):
    """Without keep-alive (the default) the tool waits for the server's close after
    each answer, and dropped what came first: a server answering every 7th request
    twice got Complete 70, Failed 0, exit 0, and its copies were left out of Total
    transferred (ab: Failed 10 (Length)). Now the answer is counted at the close,
    and a copy before it fails it as extra-answer, its bytes counted; in the same
    read as the answer too."""
    server = FakeServer(behaviour)
    try:
        row, proc = run_json("--http", f"http://127.0.0.1:{server.port}/", "-n", "70", "-c", "2",
                             "--engine", engine, "--timeout", "2", log_dir=log_dir, tmp_path=tmp_path)
    finally:
        server.close()
    assert proc.returncode == 1, proc.stderr
    assert (row["complete"], row["failed"], row["errors"]) == (60, 10, {"extra-answer": 10}), row
    assert row["total_transferred_bytes"] == server.sent


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


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_the_wait_for_the_servers_close_is_bounded_by_the_timeout_in_all(log_dir, tmp_path, engine):
    """A server that sends a byte every half second after its answer and never
    stops: the thread engine waited a whole --timeout again for each byte (20 s
    here, for ever for a server that never stops); the wait is --timeout in all."""
    server = FakeServer("http-close-trickle")
    started = time.monotonic()
    try:
        row, proc = run_json("--http", f"http://127.0.0.1:{server.port}/", "-n", "1", "-c", "1", "--engine", engine,
                             "--timeout", "2", log_dir=log_dir, tmp_path=tmp_path)
    finally:
        server.close()
    assert time.monotonic() - started < 15, "the wait for the close outlived --timeout"  # (the trickle: 20 s)
    assert (row["complete"], row["errors"]) == (0, {"extra-answer": 1}), row
