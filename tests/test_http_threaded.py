"""The threaded HTTP server's two designs, a thread per connection and the
bounded pool (``--pool``): their threads, limits, timeouts and stop."""

from __future__ import annotations

import errno
import http.client
import logging
import os
import queue
import re
import shutil
import signal
import socket
import threading
import time

import psutil
import pytest

from clusterkit import cluster

from .conftest import unasked, under_open_files_limit
from .http_setup import (CLOSING_GET, HAS_AB, SIMPLE_GET, WWW, apachebench, assert_page_then_close, exchange,
                         read_answers, status_of)

pytestmark = pytest.mark.timeout(120)


def test_threaded_pool_and_sigterm(setup):
    srv = setup.server("Server_thread_http.py", "--pool", "4")
    assert status_of(exchange(srv.port, b"GET / HTTP/1.0\r\n\r\n")) == 200
    srv.signal(signal.SIGTERM)
    assert srv.wait(timeout=15) == 0


def test_a_pool_the_machine_cannot_start_is_said_before_listening(monkeypatch, log_dir):
    """(This machine runs 4,096 threads; a thread limit is simulated.)"""
    from clusterkit import logs
    from clusterkit.http.config import HttpServerConfig
    from clusterkit.http.threaded import ThreadedHttpServer, ThreadLimit

    started = []
    real_start = threading.Thread.start

    def start(self):
        if self.name.startswith("worker-") and len(started) == 2:
            raise RuntimeError("can't start new thread")
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    server = ThreadedHttpServer(HttpServerConfig(port=0, pool=5, log_dir=str(log_dir)),
                                logs.EventLog("t", None, logging.CRITICAL))
    try:
        with pytest.raises(ThreadLimit, match="--pool 5: this machine let only 2 threads start"):
            server.start_pool()
    finally:
        for sock in server.socks:
            sock.close()


def test_a_threaded_connection_whose_first_setsockopt_fails_is_closed_and_uncounted(log_dir):
    """The socket timeouts were set before the handler's try: a connection whose
    setsockopt failed (EBADF, ENOMEM) stayed among the active ones and in the
    client count for good, a slot of the open-files limit lost per failure."""
    from clusterkit import logs
    from clusterkit.http.config import HttpServerConfig
    from clusterkit.http.threaded import ThreadedHttpServer
    server = ThreadedHttpServer(HttpServerConfig(port=0, log_dir=str(log_dir)),
                                logs.EventLog("t", None, logging.CRITICAL))

    class Failing:
        closed = False

        def setsockopt(self, *args):
            raise OSError(errno.ENOMEM, "no memory")

        def close(self):
            self.closed = True

    try:
        conn = Failing()
        server.clients = 1  # (counted at its accept)
        server._handle(conn, "127.0.0.1")  # type: ignore[arg-type]
        assert conn.closed and server.clients == 0 and not server.active
    finally:
        for sock in server.socks:
            sock.close()


def test_the_threaded_server_listens_on_every_address_of_its_host(monkeypatch, log_dir):
    """``--host localhost`` where it names ::1 and 127.0.0.1 (Debian's): it listened
    on the first alone, and a client of the other address was refused, where
    every other server here takes both. (The name's two addresses are given by
    a stand-in getaddrinfo: this machine's may list one.)"""
    from clusterkit import logs
    from clusterkit.http.config import HttpServerConfig
    from clusterkit.http.threaded import ThreadedHttpServer
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this machine")
    real = socket.getaddrinfo

    def both(host, port, *args, **kwargs):
        if host != "localhost":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
    monkeypatch.setattr(socket, "getaddrinfo", both)
    server = ThreadedHttpServer(HttpServerConfig(host="localhost", port=0, log_dir=str(log_dir)),
                                logs.EventLog("t", None, logging.CRITICAL))
    serving = threading.Thread(target=server.serve, daemon=True)
    serving.start()
    try:
        for host in ("::1", "127.0.0.1"):
            assert exchange(server.port, b"GET /page.html HTTP/1.0\r\n\r\n", host=host).startswith(b"HTTP/1.1 200 OK")
    finally:
        server.stop()
        serving.join(10)
    assert not serving.is_alive()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a single core: nothing to pin")
def test_threaded_server_keeps_its_threads_on_one_core_unless_told_not_to(setup):
    pinned = setup.server("Server_thread_http.py")
    spread = setup.server("Server_thread_http.py", "--no-pin")
    conns = [socket.create_connection(("127.0.0.1", p.port), timeout=10) for p in (pinned, spread) for _ in range(3)]
    try:
        for c in conns:  # three keep-alive connections each: three connection threads alive
            c.sendall(SIMPLE_GET)
            assert c.recv(65536).startswith(b"HTTP/1.1 200")

        def one_core_threads(proc) -> int:
            return sum(len(os.sched_getaffinity(t.id)) == 1 for t in psutil.Process(proc.pid).threads())

        assert len(os.sched_getaffinity(pinned.pid)) == 1
        # every thread: the accepting one, the connections', and the log writer started before
        assert one_core_threads(pinned) == psutil.Process(pinned.pid).num_threads() >= 5
        assert len(os.sched_getaffinity(spread.pid)) == len(os.sched_getaffinity(0))
        assert one_core_threads(spread) == 0
    finally:
        for c in conns:
            c.close()


def test_thread_cache_reuses_threads_and_loses_no_connection_when_idle_threads_time_out():
    from clusterkit.http.threaded import ThreadCache
    lock = threading.Lock()
    done: list[int] = []
    threads: set[int] = set()

    def handle(i: int) -> None:
        with lock:
            done.append(i)
            threads.add(threading.get_ident())

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 30  # generous: it only proves nothing was lost or stuck
        while len(done) < n and time.monotonic() < deadline:
            time.sleep(0.001)

    reuse = ThreadCache(handle, idle_timeout=30)
    for i in range(50):  # one at a time: the one thread serves them all
        reuse.submit(i)
        wait_for(i + 1)
        while reuse.idle != 1:
            time.sleep(0.001)
    assert len(threads) == 1
    # The race itself: a waiting thread's timeout runs out just as a job is promised to it.
    class LateTimeout:
        def __init__(self) -> None:
            self.jobs: queue.SimpleQueue = queue.SimpleQueue()
            self.put_seen = threading.Event()

        def put(self, job) -> None:
            self.jobs.put(job)
            self.put_seen.set()

        def get(self, timeout: float | None = None):
            if timeout is not None:
                self.put_seen.wait(10)
                raise queue.Empty
            return self.jobs.get(timeout=10)

    done.clear()
    late = ThreadCache(handle, idle_timeout=1)
    late.queue = LateTimeout()  # type: ignore[assignment]
    late.submit(0)
    while late.idle != 1:
        time.sleep(0.001)
    late.submit(1)
    wait_for(2)
    assert sorted(done) == [0, 1]
    # Idle threads timing out (1 ms) while new jobs arrive: each job still runs exactly once.
    done.clear()
    racing = ThreadCache(handle, idle_timeout=0.001)
    for i in range(3000):
        racing.submit(i)
        if i % 7 == 0:
            time.sleep(0.001)
    wait_for(3000)
    assert sorted(done) == list(range(3000))


def test_threaded_server_serves_many_connections_with_few_threads(setup):
    server = setup.server("Server_thread_http.py")
    for _ in range(200):
        assert status_of(exchange(server.port, b"GET /page.html HTTP/1.0\r\n\r\n")) == 200
    assert psutil.Process(server.pid).num_threads() < 20


def test_idle_connections_do_not_hold_a_thread_pool_from_a_waiting_client(setup):
    """Two connections that sent nothing held a --pool 2 server from everyone else
    for the whole keep-alive timeout (15 s); a pool thread now lets go of an idle
    connection when a client waits for it."""
    server = setup.server("Server_thread_http.py", "--pool", "2")
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.3)  # both taken by the pool's threads
        started = time.monotonic()
        assert status_of(exchange(server.port, CLOSING_GET, timeout=20)) == 200
        assert time.monotonic() - started < 8  # (the keep-alive timeout is 15 s)
    finally:
        for s in idle:
            s.close()


def test_pool_threads_take_turns_between_keepalive_clients(setup):
    """A pool thread held its keep-alive connection until it closed or idled for a
    second, so a client beyond the pool's size waited for the others to stop, and got
    its answer only when the server closed an idle one under its client (ab -k counts
    the request it had just sent there as failed). Now the thread puts its connection
    back in the queue once it has answered, and takes the next client's."""
    server = setup.server("Server_thread_http.py", "--pool", "1")
    get = b"GET /page.html HTTP/1.1\r\nHost: t\r\n\r\n"
    first = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    second = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        for _ in range(3):  # the two take turns; neither connection is closed between
            for conn in (first, second):
                conn.request("GET", "/page.html")
                resp = conn.getresponse()
                assert resp.status == 200 and len(resp.read()) == 1669
                assert not resp.will_close
        first.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):  # still open: nothing, not even an EOF, comes
            first.sock.recv(1)
    finally:
        first.close()
        second.close()
    assert status_of(exchange(server.port, get.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))) == 200


@pytest.mark.skipif(not HAS_AB, reason="ApacheBench (ab, Debian's apache2-utils) is not installed")
def test_apachebench_keepalive_with_more_clients_than_pool_threads(setup):
    server = setup.server("Server_thread_http.py", "--pool", "2")
    report = apachebench(f"http://127.0.0.1:{server.port}/page.html", 2000, 6, keepalive=True)
    assert re.search(r"Failed requests:\s+0\b", report), report
    assert re.search(r"Keep-Alive requests:\s+2000\b", report), report


def test_idle_keepalive_connections_hold_no_pool_thread_and_stay_open(setup):
    """A pool thread waited a quarter of a second on each idle connection it took from
    the queue: with 60 idle keep-alive clients on --pool 2, a request waited behind them
    about 7.5 s, and the threads closed the ones idle for a second meanwhile. Idle
    connections now wait with the poller, which hands one back once it has a request."""
    server = setup.server("Server_thread_http.py", "--pool", "2", "--keepalive-timeout", "30")
    idle = []
    try:
        for _ in range(60):  # each answered once, then silent
            s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
            idle.append(s)
            s.sendall(SIMPLE_GET)
            assert read_answers(s, 1, time.monotonic() + 20) == [(200, 1669)]
        time.sleep(1.5)  # idle past what the pool let them be (a second) while others waited
        started = time.monotonic()
        assert status_of(exchange(server.port, CLOSING_GET, timeout=20)) == 200
        assert time.monotonic() - started < 2  # (the old pool: about 7.5 s)
        idle[30].sendall(SIMPLE_GET)  # an idle client's next request
        assert read_answers(idle[30], 1, time.monotonic() + 2) == [(200, 1669)]
        got, ended = unasked(idle, 0.5)
        assert not ended and not any(got.values())  # all still open: the keep-alive timeout is 30 s
    finally:
        for s in idle:
            s.close()


@pytest.mark.skipif(not HAS_AB, reason="ApacheBench (ab, Debian's apache2-utils) is not installed")
def test_apachebench_keepalive_with_many_more_clients_than_pool_threads(setup):
    """With ab -k -c 100 on --pool 4, ab's last requests waited behind its idle
    connections, a quarter of a second each, and the pool closed the ones idle a
    second meanwhile: failed requests, with about one fresh server out of two (so
    three of them here)."""
    for _ in range(3):
        server = setup.server("Server_thread_http.py", "--pool", "4")
        report = apachebench(f"http://127.0.0.1:{server.port}/page.html", 300, 100, keepalive=True, timeout=60)
        assert re.search(r"Failed requests:\s+0\b", report), report
        assert re.search(r"Keep-Alive requests:\s+300\b", report), report


def test_a_slowloris_does_not_hold_a_pool_thread(setup):
    """A pool thread waited for the rest of a trickled head for the whole header
    timeout while other clients queued; it now gives them their turn meanwhile."""
    server = setup.server("Server_thread_http.py", "--pool", "1", "--header-timeout", "8")
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    try:
        slow.sendall(b"GET /page.html HTTP/1.1\r\nHost: slow\r\nX-Trickle: z")
        time.sleep(0.3)  # taken by the only thread
        started = time.monotonic()
        assert status_of(exchange(server.port, CLOSING_GET, timeout=20)) == 200
        assert time.monotonic() - started < 5  # (not the 8 s of the header timeout)
        slow.settimeout(20)
        assert b" 408 " in slow.recv(4096).split(b"\r\n")[0]  # and the slowloris still times out
    finally:
        slow.close()


def _pipeline_until_pushed_back(port: int) -> socket.socket:
    """A client that pipelines GETs and never reads an answer, once the server has
    stopped taking its requests (its thread blocked sending it answers)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(0.5)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        try:
            s.send(SIMPLE_GET * 500)
        except TimeoutError:
            return s
    s.close()
    raise AssertionError("the server took requests for 8 s without pushing back")


def _wait_reset(s: socket.socket, within: float) -> None:
    """Until the server resets ``s`` (a send fails), which must come ``within`` seconds."""
    deadline = time.monotonic() + within
    s.settimeout(0.05)
    while True:
        try:
            s.send(b"x")
        except TimeoutError:
            pass
        except ConnectionError:
            return
        assert time.monotonic() < deadline, f"not cut within {within} s"
        time.sleep(0.05)


def test_a_client_that_takes_no_answer_is_cut_after_the_keepalive_timeout(setup, tmp_path):
    """The threaded server's send timeout was the longer of the keep-alive and the
    header timeouts, and any progress started it again: a client pipelining GETs and
    reading none held its thread for 30 s with a keep-alive timeout of 3 (with
    --pool, the server for everyone), and its cut was logged nowhere. Now a client
    that takes no byte for the keep-alive timeout is cut (event=send-timeout); one
    that reads slowly but reads is served however long it takes."""
    shutil.copy(WWW / "page.html", tmp_path)
    (tmp_path / "big.bin").write_bytes(os.urandom(6 << 20))  # more than the kernel buffers hold
    server = setup.server("Server_thread_http.py", "--pool", "1", "--keepalive-timeout", "1",
                          "--root", str(tmp_path))
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # about 1.3 MB/s: 5 s, several keep-alive timeouts
            data += chunk
            time.sleep(0.05)
    assert status_of(data) == 200 and len(data) > 6 << 20
    stuck = _pipeline_until_pushed_back(server.port)
    try:
        started = time.monotonic()
        # The pool's one thread is free again for the next client: not 10 s on (the
        # header timeout), nor 30.
        assert status_of(exchange(server.port, CLOSING_GET, timeout=30)) == 200
        assert time.monotonic() - started < 6
        _wait_reset(stuck, within=2)
    finally:
        stuck.close()
    setup.wait_log("WARNING http-threaded event=send-timeout client=127.0.0.1 buffered=")


def test_slowloris_408s_on_a_pool_do_not_wait_for_each_others_lingering_close(setup):
    """After a 408 a pool thread read away what the client still sent (the lingering
    close, 2 s) itself, so slowloris connections trickling on got their 408s one pool
    thread's worth every 2 s (300 of them on --pool 8: 8 every 2 s). The lingering is
    now another thread's."""
    server = setup.server("Server_thread_http.py", "--pool", "1", "--header-timeout", "1")
    head = b"GET /page.html HTTP/1.1\r\nHost: slow\r\nX-Trickle: " + b"z" * 400
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(8)]
    started = time.monotonic()
    answers: dict[int, bytes] = {}
    try:
        for s in slow:
            s.setblocking(False)
        for byte in head:  # a byte to each every 0.2 s, until answered
            for i, s in enumerate(slow):
                if i in answers:
                    continue
                try:
                    answers[i] = s.recv(4096)
                except BlockingIOError:
                    s.send(bytes([byte]))
            if len(answers) == len(slow):
                break
            assert time.monotonic() - started < 7, f"{len(answers)} of {len(slow)} answered in 7 s"
            time.sleep(0.2)
    finally:
        for s in slow:
            s.close()
    assert all(b" 408 " in a.split(b"\r\n")[0] for a in answers.values()), answers


def test_a_head_waiting_in_the_pool_queue_is_timed_from_its_accept(setup):
    """A connection's header timeout started when a pool thread first read it: a
    slowloris queued behind a busy thread got the whole header timeout again once
    taken. Its head now counts from its accept: taken past it, it gets 408 at once."""
    server = setup.server("Server_thread_http.py", "--pool", "1", "--keepalive-timeout", "3",
                          "--header-timeout", "2")
    stuck = _pipeline_until_pushed_back(server.port)  # holds the only thread until it is cut
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    try:
        slow.sendall(b"GET /page.html HTTP/1.1\r\nHost: slow\r\nX-Trickle: z")
        _wait_reset(stuck, within=8)
        cut = time.monotonic()
        assert b" 408 " in slow.recv(4096).split(b"\r\n")[0]
        assert time.monotonic() - cut < 1.5  # (not the 2 s of a header timeout begun only now)
    finally:
        stuck.close()
        slow.close()


def test_a_full_pool_answers_503_without_a_reset(setup, tmp_path):
    """With every pool thread busy and the queue full, a new client gets 503; its
    close used to come with the client's request unread, so the kernel reset the
    connection, and the reset could destroy the 503 (ab stopped the whole run)."""
    (tmp_path / "big.bin").write_bytes(b"x" * (7 << 20))  # (served from memory: 8 MB at most)
    server = setup.server("Server_thread_http.py", "--pool", "1", "--root", str(tmp_path))
    stuck = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    waiting: list[socket.socket] = []
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")  # never read: the thread is stuck sending
        assert stuck.recv(12) == b"HTTP/1.1 200"
        for _ in range(128):  # the queue's room
            waiting.append(socket.create_connection(("127.0.0.1", server.port), timeout=20))
        time.sleep(0.3)  # all of them taken from the listen backlog
        statuses = []
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
                s.sendall(b"GET /page.html HTTP/1.1\r\nHost: t\r\n\r\n" * 300)  # unread when refused
                time.sleep(0.3)  # the close has come by now
                answer = b""
                while chunk := s.recv(65536):  # to the EOF, as ab does (a reset raises here)
                    answer += chunk
                statuses.append(status_of(answer))
        assert statuses == [503] * 3
        # The first is said at once; the rest of the burst (within a second of it) a
        # second on, by itself: no later refusal comes to flush it.
        deadline = time.monotonic() + 15
        while (said := sum(map(int, re.findall(r"event=busy refused=(\d+) pool=1 reason=queue-full",
                                               setup.log())))) < 3:
            assert time.monotonic() < deadline, f"refusals logged: {said} of 3"
            time.sleep(0.05)
        assert said == 3
    finally:
        stuck.close()
        for s in waiting:
            s.close()


def test_the_threaded_pool_past_the_open_files_limit_answers_503(setup, log_dir):
    """Server_thread_http.py --pool 4 under an open-files limit of 64: the clients past
    what the limit holds get 503 and the close, those it took are served, and a new one
    is once they leave. It took connections until accept failed (EMFILE), and the rest
    waited in the listen backlog, unanswered, as long as the others stayed."""
    port = cluster.free_port()
    proc = setup.procs.start(under_open_files_limit("Server_thread_http.py", "http_servers/Server_thread_http.py",
                                                    port, "--pool", "4", "--keepalive-timeout", "30",
                                                    "--log-dir", str(log_dir)))
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    try:
        got, ended = unasked(socks, 3)
        away = [s for s in socks if got[s]]
        assert away and all(got[s].startswith(b"HTTP/1.1 503 ") and s in ended for s in away), \
            [got[s] for s in away][:5]
        kept = [s for s in socks if s not in ended]  # (idle: parked with the pool's poller)
        assert kept
        for s in kept:
            assert_page_then_close(s)
    finally:
        for s in socks:
            s.close()
    said = re.search(r"at most (\d+) clients at once \(the open-files limit allows no more\)", proc.stderr())
    # (The start's readiness probe, a connect and a close, may still hold its slot when the burst comes.)
    assert said and len(away) <= 100 - int(said[1]) + 1, proc.stderr()
    setup.wait_log("event=busy refused=")
    assert "reason=open-files-limit" in setup.log()
    deadline = time.monotonic() + 10
    while status_of(exchange(port, CLOSING_GET)) != 200:  # room again once the others have left
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_stop_closes_idle_keepalive_connections_at_once_and_finishes_a_request_begun(setup):
    """Thread per connection: the stop waited its whole drain timeout (5 s) for a
    keep-alive client idle between requests, whose thread sat in recv, and a
    second signal did not cut it short. Now an idle connection is closed at once
    (here while a request begun on another is still awaited: the drain goes on),
    and that request is answered before the server exits."""
    srv = setup.server("Server_thread_http.py")
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    busy = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        idle.sendall(SIMPLE_GET)
        assert read_answers(idle, 1, time.monotonic() + 10) == [(200, len((WWW / "page.html").read_bytes()))]
        busy.sendall(b"GET /page.html HTTP/1.1\r\nHost: t\r\n")  # a head begun
        time.sleep(0.2)
        srv.signal(signal.SIGTERM)
        idle.settimeout(4)  # (less than the drain timeout: the old wait)
        assert idle.recv(100) == b""
        busy.sendall(b"\r\n")
        assert read_answers(busy, 1, time.monotonic() + 10)[0][0] == 200
        assert srv.wait(timeout=10) == 0
    finally:
        idle.close()
        busy.close()


def test_a_second_signal_cuts_the_threaded_servers_drain_short(setup):
    """A request begun and never finished held the stop for the whole drain timeout
    (5 s), and a second signal changed nothing; now it forces, as for the other
    servers."""
    srv = setup.server("Server_thread_http.py")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as busy:
        busy.sendall(b"GET /page.html HTTP/1.1\r\nHost: t\r\n")  # a head begun, never ended
        time.sleep(0.2)
        srv.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert srv.alive()  # (the first signal waits for it)
        srv.signal(signal.SIGTERM)
        assert srv.wait(timeout=4) == 0  # (less than the drain timeout: the old wait)
