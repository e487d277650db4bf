"""lb.py, the HTTP load balancer, as a real process in front of real and fake
backends: round robin, health checks and failover, timeouts, what it relays
and how (streaming, HEAD, odd answers), its settings, and a real browser."""

from __future__ import annotations

import concurrent.futures
import http.client
import itertools
import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from clusterkit import cluster

from .conftest import FullBacklog, assert_bad_config, fake_backend
from .http_setup import (CHROMIUM, CLOSING_GET, GARBAGE, HUGE_HEADERS, NO_HOST_11, POST, SIMPLE_GET, WWW, exchange,
                         ok_answer, read_answers, read_requests, status_of, statuses_in)

pytestmark = pytest.mark.timeout(120)


def test_balancer_round_robin_on_keepalive_connections(setup):
    lb = setup.lb()
    counts: dict[str, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    for _ in range(400):
        conn.request("GET", "/page.html")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("Via") == "1.1 clusterkit-lb"
        name = resp.getheader("X-Backend")
        counts[name] = counts.get(name, 0) + 1
    conn.close()
    assert counts == {"backend1": 100, "backend2": 100, "backend3": 100, "backend4": 100}
    lines = setup.lb_requests(400)
    assert len(lines) == 400
    assert [re.search(r"backend=(\S+)", line).group(1) for line in lines[:8]] == [
        "backend1", "backend2", "backend3", "backend4"] * 2


def test_kill_9_backend_under_load_no_failed_get_then_back_up(setup):
    lb = setup.lb()
    failures: list = []
    done = 0

    def client() -> None:
        nonlocal done
        conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
        for _ in range(150):
            try:
                conn.request("GET", "/style.css")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    failures.append(resp.status)
                done += 1
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    while done < 100:
        time.sleep(0.01)
    victim = setup.backends["backend2"]
    victim.kill()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]
    setup.wait_log("event=backend-down backend=backend2")  # (the log is written in batches)
    # In Load_Balancer.py's words, whichever saw the death first: a refused connect, one reset
    # from the dead listener's backlog, or a refused check (after a reset, when a request's
    # pooled connection to it broke first: "reset, then check refused").
    assert re.search(r'event=backend-down backend=backend2 from=UP to=DOWN reason=(connect-refused|'
                     r'connect-econnreset|"(closed|reset), then check refused"|"check refused \(\d checks failed\)")$',
                     setup.log(), re.M), setup.log()[-2000:]
    setup.backend("backend2", port=victim.port)
    deadline = time.monotonic() + 20
    while "event=backend-up backend=backend2" not in setup.log():
        assert time.monotonic() < deadline, "backend2 never came back"
        time.sleep(0.1)


def _admin(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read()


def test_lb_admin_port_shows_each_backend_and_a_dead_one_as_down(setup):
    admin_port = cluster.free_port()
    lb = setup.lb(4, "--admin-port", str(admin_port))
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        for _ in range(40):
            s.sendall(b"GET /style.css HTTP/1.1\r\nHost: t\r\n\r\n")
            data = b""
            while not (b"\r\n\r\n" in data and data.endswith(b"}\n")):
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
    stats = json.loads(_admin(admin_port, "/stats"))
    assert stats["requests"] == 40
    by_name = {b["name"]: b for b in stats["backends"]}
    assert [by_name[f"backend{i}"]["requests"] for i in range(1, 5)] == [10, 10, 10, 10]
    assert all(b["state"] == "UP" and b["failures"] == 0 and b["latency_ms"]["count"] == 10 for b in by_name.values())
    assert all(b["latency_ms"]["p50"] > 0 and b["idle_connections"] >= 1 for b in by_name.values())
    metrics = _admin(admin_port, "/metrics").decode()
    assert 'clusterkit_http_backend_requests_total{backend="backend3"} 10.0' in metrics
    setup.backends["backend2"].kill()
    deadline = time.monotonic() + 20
    while json.loads(_admin(admin_port, "/stats"))["backends"][1]["state"] != "DOWN":
        assert time.monotonic() < deadline, "backend2 never shown down"
        time.sleep(0.1)
    assert json.loads(_admin(admin_port, "/stats"))["backends"][1]["reason"].startswith("check")
    assert 'clusterkit_http_backend_up{backend="backend2"} 0.0' in _admin(admin_port, "/metrics").decode()


def _fields(line: str) -> dict[str, str]:
    """A log line's key=value fields (a value in quotes as written)."""
    return dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))


def test_lb_logs_the_requests_it_refuses_itself_with_the_reason_as_the_servers_do(setup):
    """lb.py logged its own 400, 405, 431 and 408 as event=request method=- path=-,
    without a word of why; they are the async server's event=refused lines now,
    the same fields and the same reasons, as the threaded server's are (its 408's
    reason was "request head too slow")."""
    lb = setup.lb(1, "--header-timeout", "1")
    server = setup.server("Server_async_http.py", "--header-timeout", "1")
    threaded = setup.server("Server_thread_http.py", "--header-timeout", "1")
    unknown_method = b"FOO /page.html HTTP/1.1\r\nHost: t\r\n\r\n"
    for port in (lb.port, server.port, threaded.port):
        for raw in (GARBAGE, POST, unknown_method, HUGE_HEADERS, b"GET /page.html HTTP/1.1\r\n"):
            assert status_of(exchange(port, raw)) in (400, 405, 431, 408)
    deadline = time.monotonic() + 15
    while True:
        lines = setup.log().splitlines()
        ours = [_fields(x) for x in lines if " INFO lb event=refused " in x]
        theirs = [_fields(x) for x in lines if " INFO http-async event=refused " in x]
        threads = [_fields(x) for x in lines if " INFO http-threaded event=refused " in x]
        if min(len(ours), len(theirs), len(threads)) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ours == theirs, (ours, theirs)
    assert threads == ours, (threads, ours)
    assert [x["status"] for x in ours] == ["400", "405", "405", "431", "408"]
    assert {x["reason"] for x in ours} >= {'"method POST"', '"request headers too large"', "slow-head"}
    assert "method=- path=-" not in setup.log()


def test_lb_adds_the_host_an_http_1_0_client_left_out_and_refuses_a_1_1_request_without(setup):
    lb = setup.lb(2)
    data = exchange(lb.port, b"GET /page.html HTTP/1.0\r\n\r\n")
    assert status_of(data) == 200 and b"X-Backend: backend" in data, data[:300]
    assert status_of(exchange(lb.port, NO_HOST_11)) == 400


def test_a_real_browser_renders_the_page_through_the_balancer(setup, tmp_path):
    lb = setup.lb()
    shot = tmp_path / "page.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,900",
                           "--virtual-time-budget=3000", f"--screenshot={shot}",
                           f"http://localhost:{lb.port}/page.html"],
                          capture_output=True, text=True, timeout=90)
    assert shot.exists() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    deadline = time.monotonic() + 10  # the lb's log is written in batches
    while True:
        lines = setup.lb_requests(3)
        served = {re.search(r"path=(\S+)", line).group(1): re.search(r"backend=(\S+)", line).group(1)
                  for line in lines if "status=200" in line}
        if {"/page.html", "/style.css", "/cluster.svg"} <= set(served) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {"/page.html", "/style.css", "/cluster.svg"} <= set(served), lines
    assert len({served[p] for p in ("/page.html", "/style.css", "/cluster.svg")}) > 1


def _gets_with_backend2_stopped(setup, count: int, *lb_args: str) -> list[tuple[int, str, float]]:
    """(status, X-Backend, seconds) of ``count`` GETs through lb.py over backend1 and a
    SIGSTOPped backend2, one connection each; all must come from backend1."""
    lb = setup.lb(2, *lb_args)
    victim = setup.backends["backend2"]
    victim.signal(signal.SIGSTOP)
    out = []
    try:
        for _ in range(count):
            start = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=60)
            conn.request("GET", "/page.html")
            resp = conn.getresponse()
            resp.read()
            conn.close()
            out.append((resp.status, resp.getheader("X-Backend"), time.monotonic() - start))
    finally:
        victim.signal(signal.SIGCONT)
    assert [(status, name) for status, name, _ in out] == [(200, "backend1")] * count
    return out


def test_hung_backend_hands_its_waiting_requests_on_once_checks_mark_it_down(setup):
    """SIGSTOP: the requests already sent to it go to the other backend when the
    health checks take it out, long before the (30 s) response timeout."""
    answers = _gets_with_backend2_stopped(setup, 6, "--response-timeout", "30")
    assert max(seconds for _, _, seconds in answers) < 15  # not the 30 s timeout: did not wait for it
    setup.wait_log('event=backend-down backend=backend2 from=UP to=DOWN reason="check timeout (2 checks failed)"')


def test_backend_that_does_not_answer_in_time_is_taken_out_and_the_get_retried(setup):
    """No answer within --response-timeout: as nginx's proxy_next_upstream, the
    backend is marked down and the idempotent request goes to the next one."""
    _gets_with_backend2_stopped(setup, 4, "--response-timeout", "1", "--check-interval", "60")  # no checks
    setup.wait_log('event=backend-down backend=backend2 from=UP to=DOWN reason=response-timeout')


def _lb_backend(admin_port: int, name: str) -> dict:
    return next(b for b in json.loads(_admin(admin_port, "/stats"))["backends"] if b["name"] == name)


def _lb_stuck_and_good(setup, stuck: FullBacklog, connect_timeout: str, fall: str, *args: str):
    """lb.py over ``stuck`` (its SYNs dropped: connects time out) and a good backend,
    with checks too rare to matter."""
    good = setup.backend("good")
    return setup.server("lb.py", "--backend", f"stuck=127.0.0.1:{stuck.port}", "--backend",
                        f"good=127.0.0.1:{good.port}", "--connect-timeout", connect_timeout, "--check-interval", "30",
                        "--fall", fall, *args)


def test_lb_connect_timeout_goes_to_the_next_backend_and_marks_down_only_at_fall(setup):
    """A backend whose accept queue is full drops the SYNs: the request's connect is
    given up after --connect-timeout and it goes to the next backend at once. One
    lost SYN is sent again only after a second, the default connect timeout: the
    silent backend is marked down at --fall connect timeouts in a row, not at the
    first, as it was (the checks, every 30 s, are not the ones)."""
    with FullBacklog() as stuck:
        admin_port = cluster.free_port()
        lb = _lb_stuck_and_good(setup, stuck, "0.5", "3", "--admin-port", str(admin_port))
        for tried in (1, 2, 3):  # round-robin: each request tries stuck first, then good
            start = time.monotonic()
            data = exchange(lb.port, CLOSING_GET)
            assert status_of(data) == 200 and b"X-Backend: good" in data, data[:300]
            assert time.monotonic() - start < 8  # the connect timeout, not the kernel's minutes
            b = _lb_backend(admin_port, "stuck")
            assert b["failures"] == tried and (b["state"] == "DOWN") == (tried == 3), b
        assert b["reason"] == "connect-timeout (3 in a row)"
        data = exchange(lb.port, CLOSING_GET)  # stuck is not tried now
        assert status_of(data) == 200 and _lb_backend(admin_port, "stuck")["failures"] == 3
        setup.wait_log('event=backend-down backend=stuck from=UP to=DOWN reason="connect-timeout (3 in a row)"')
        lines = re.findall(r"event=connect-timeout backend=stuck in_a_row=(\d+) down_at=3 timeouts=(\d+)",
                           setup.log())
    # The first said at once; the second within a second of it is said by the sweep or with the
    # one that took it down, whichever comes first.
    assert lines[0] == ("1", "1") and lines[-1][0] == "3" and sum(int(n) for _, n in lines) == 3, lines


def test_lb_connects_that_time_out_once_a_backend_is_down_are_not_a_line_each(setup):
    """Every connect timed out was a warning line, also those still under way when
    the backend was marked down: a burst of requests wrote one each."""
    with FullBacklog() as stuck:
        lb = _lb_stuck_and_good(setup, stuck, "0.5", "3")
        with concurrent.futures.ThreadPoolExecutor(20) as pool:  # half of them try stuck first
            answers = list(pool.map(lambda _: status_of(exchange(lb.port, CLOSING_GET)), range(20)))
        assert answers == [200] * 20
        setup.wait_log("event=backend-down backend=stuck")
        time.sleep(1)  # (the last batch of lines)
        lines = re.findall(r"event=connect-timeout backend=stuck in_a_row=(\d+) down_at=3 timeouts=(\d+)",
                           setup.log())
    # The first said at once, the rest of the burst with the one that took it down.
    assert lines[0] == ("1", "1") and lines[-1][0] == "3" and sum(int(n) for _, n in lines) == 3, lines


def test_lb_connects_that_time_out_in_a_burst_are_a_line_a_second_per_backend_with_the_count(setup):
    """A link that drops some SYNs to a backend and lets others through (a connect that
    succeeds starts the count again; --fall 1000 stands for it here) never takes it
    down, and every connect that timed out was a line: unbounded. Now a line a second
    at most per backend, the first at once, with how many since the last (timeouts=N),
    as Load_Balancer.py's."""
    with FullBacklog() as stuck:
        admin_port = cluster.free_port()
        lb = _lb_stuck_and_good(setup, stuck, "0.2", "1000", "--admin-port", str(admin_port))
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(30) as pool:  # half of them try stuck first
            answers = list(pool.map(lambda _: status_of(exchange(lb.port, CLOSING_GET)), range(60)))
        took = time.monotonic() - start
        assert answers == [200] * 60
        timed_out = _lb_backend(admin_port, "stuck")["failures"]
        assert timed_out >= 20
        deadline = time.monotonic() + 10
        while True:  # (the rest of the burst is said within a second, by the sweep)
            lines = re.findall(r"event=connect-timeout backend=stuck in_a_row=\d+ down_at=1000(?: timeouts=(\d+))?",
                               setup.log())
            said = sum(int(n or 1) for n in lines)
            if said >= timed_out or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert said == timed_out, (lines, timed_out)
    assert len(lines) <= took + 2, (lines, took)  # a line at once, one a second at most after it


def test_lb_connect_timeout_on_the_last_backend_is_a_504(setup):
    """With no other backend to try, a request whose connect timed out gets nginx's
    answer, 504, logged with the backend (it was a 503 'no healthy backend', the
    backend having been marked down for it)."""
    with FullBacklog() as stuck:
        lb = setup.server("lb.py", "--backend", f"stuck=127.0.0.1:{stuck.port}", "--connect-timeout", "0.5",
                          "--check-interval", "30", "--fall", "3")
        data = exchange(lb.port, CLOSING_GET)
        assert status_of(data) == 504, data[:300]
        assert "status=504 bytes=" in setup.lb_requests(1)[0] and "backend=stuck" in setup.lb_requests(1)[0]


def _answer_check(conn: socket.socket, checked: threading.Event) -> None:
    """Answer one request with a 200, then wait for the close: the check is over then."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(65536)
        if not chunk:
            return
        head += chunk
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    try:
        conn.recv(1)
    finally:
        checked.set()


def test_lb_check_whose_connect_takes_a_second_passes_the_connect_is_not_the_check_timeouts(setup):
    """A backend whose connect takes a second (its SYN dropped once, as on a lossy or
    distant network) but that answers at once passes its check: as in HAProxy, the
    connect has --connect-timeout (at most --check-interval) and only the exchange
    after it --check-timeout. With one bound for both, every backend half a check
    timeout away, round trip, was marked down while it served its traffic, and
    every request got a 503."""
    checked = threading.Event()
    with FullBacklog() as slow:
        admin_port = cluster.free_port()
        lb = setup.server("lb.py", "--backend", f"slow=127.0.0.1:{slow.port}", "--check-timeout", "0.8",
                          "--connect-timeout", "5", "--check-interval", "5", "--fall", "1",
                          "--admin-port", str(admin_port))
        slow.wait_for_syn()  # the first check's connect, its SYN dropped
        slow.open(lambda conn: _answer_check(conn, checked))  # room for its SYN's resend, a second later
        deadline = time.monotonic() + 20
        while not checked.wait(0.05) and _lb_backend(admin_port, "slow")["state"] == "UP":
            assert time.monotonic() < deadline, "no check was made"
        assert _lb_backend(admin_port, "slow")["state"] == "UP"
        data = exchange(lb.port, CLOSING_GET)
        assert status_of(data) == 200 and b"X-Backend: slow" in data, data[:300]


def test_lb_in_front_of_a_server_without_healthz_keeps_it_up(setup):
    """Python's own http.server answers /healthz with 404: it is up and speaks HTTP,
    so the check passes (any answer below 500) and its pages come through."""
    port = cluster.free_port()
    setup.procs.start(cluster.Process("pyhttp", [sys.executable, "-m", "http.server", str(port), "--bind",
                                                 "127.0.0.1", "--directory", str(WWW)], port=port))
    lb = setup.server("lb.py", "--backend", f"pyhttp=127.0.0.1:{port}", "--check-interval", "0.1",
                      "--fall", "1")
    time.sleep(1)  # ten checks: one failed check would have taken it out
    data = exchange(lb.port, b"GET /page.html HTTP/1.0\r\n\r\n")
    assert status_of(data) == 200 and b"X-Backend: pyhttp" in data, data[:300]
    assert "backend-down" not in setup.log()
    bad = subprocess.run(cluster.python_script("http_servers/lb.py", "--check-path", "healthz"),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--check-path 'healthz'" in bad.stderr


@pytest.mark.parametrize("text, message", [
    ('[lb]\nloop = "asyncio"\n', "unknown setting 'loop'"),
    ('[lb]\nmax-url = 100\n', "unknown setting 'max-url'"),
    ('[lb]\nheader-timeout = "1"\n', "header-timeout must be a number"),
    ('[lb]\nmax-header-bytes = 0\n', "--max-header-bytes must be at least 1"),
    ('[lb]\nhost = ""\n', "host: give a host name or address"),
    ('[lb]\nport = "44444"\n', "port must be a whole number"),
    ('[[backends]]\nhost = "127.0.0.1"\n', "needs at least a port"),
    ('[lb]\nrise = "x"\n', "rise must be a whole number"),
    ("backends = [1, 2]\n", "expected a table of settings"),
    ("[[backends]]\nport = 70000\n", "not a port number: 70000"),
    ('[[backends]]\nport = 9002\nname = "a"\n[[backends]]\nport = 9003\nname = "a"\n', "names must be unique"),
    ("[[backends]]\nport = 9002\nweight = 2\n", "unknown setting 'weight'"),
    ("backends = []\n", "[[backends]] must list at least one backend"),
    ("[lb]\nadmin-port = 70000\n", "not a port number: 70000"),
])
def test_a_bad_lb_config_file_is_one_clear_line(tmp_path, log_dir, text, message):
    """Each was a traceback, or accepted (an empty list meant the default backends)."""
    assert_bad_config("http_servers/lb.py", text, tmp_path, message, "--port", "0", "--log-dir", str(log_dir))


@pytest.mark.parametrize("behaviour, status", [("silent", 504), ("garbage", 502), ("none", 503), ("cut", 502)])
def test_balancer_answers_502_503_504_when_no_backend_can(setup, behaviour, status):
    """Each says Connection: close, and means it: the connection closed at once,
    not after the keep-alive timeout (ab -k waited 60 s for 8 such answers).
    ``cut``: the backend's answer ends short, a close, on every backend; a
    502 naming the last, and no backend marked down, as they still answer
    their checks (blamed at once, one such request took every backend down,
    and everyone got 503s until the checks brought them back)."""
    def answer(conn):
        request = conn.recv(65536)
        if b"/healthz" in request:  # health checks pass, so the answer to the real request decides
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        elif behaviour == "garbage":
            conn.sendall(b"\x00\x01 not http at all\r\n\r\n")
        elif behaviour == "cut":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"c" * 500)
            conn.close()

    with fake_backend(answer) as port, fake_backend(answer) as port2:
        if behaviour == "none":
            port = cluster.free_port()
        backends = ["--backend", f"only=127.0.0.1:{port}"]
        if behaviour == "cut":
            backends += ["--backend", f"other=127.0.0.1:{port2}"]
        lb = setup.server("lb.py", *backends, "--response-timeout", "0.5", "--check-interval", "0.2",
                          "--keepalive-timeout", "60", "--log-level", "info")
        keep_alive = b"GET /page.html HTTP/1.1\r\nHost: t\r\n\r\n"
        if behaviour == "none":
            deadline = time.monotonic() + 10
            while status_of(exchange(lb.port, CLOSING_GET)) != 503:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", lb.port), timeout=20) as s:
            s.sendall(keep_alive * 2)  # (the second is not answered: the connection ends after the first)
            data = b""
            while chunk := s.recv(65536):  # to the close: within the 20 s timeout, not the 60 s keep-alive
                data += chunk
        assert status_of(data) == status and data.count(b"HTTP/1.1 ") == 1, data[:300]
        assert b"\r\nConnection: close\r\n" in data
        if behaviour == "cut":
            assert re.search(rb"\r\nX-Backend: (only|other)\r\n", data) is None  # (our own answer)
            setup.wait_log("event=backend-error backend=other reason=closed ")  # its check passed
            assert "backend-down" not in setup.log()
            assert re.search(r"path=/page.html ms=\S+ status=502 bytes=\d+ backend=(only|other)\n", setup.log())


FAKE_ANSWERS = {
    b"/eof": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nthe body ends with the connection\n",
    b"/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
                 b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfinal\n",
    b"/moved": b"HTTP/1.1 302 Found Elsewhere\r\nLocation: /page.html\r\nContent-Length: 0\r\n\r\n",
}


def _answer_by_path(conn: socket.socket) -> None:
    """FAKE_ANSWERS by path, else 200 (the health checks); the connection ends after /eof."""
    buf = b""
    while chunk := conn.recv(65536):
        buf += chunk
        while b"\r\n\r\n" in buf:
            head, _, buf = buf.partition(b"\r\n\r\n")
            path = head.split(b" ")[1]
            conn.sendall(FAKE_ANSWERS.get(path, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"))
            if path == b"/eof" or b"HTTP/1.0" in head.split(b"\r\n")[0]:
                conn.shutdown(socket.SHUT_WR)
                return


def test_lb_relays_close_delimited_interim_and_unlisted_status_answers(setup):
    """Answers other backends give (nginx and HAProxy relay them): a body that
    ends with the connection (RFC 9112 6.3; it was a 503 and the backend marked
    down), 1xx interim answers before the final one (the 100 went to the client as
    the answer, which then waited for ever), and a status with its own reason
    phrase (it was 'Unknown')."""
    with fake_backend(_answer_by_path) as port:
        lb = setup.server("lb.py", "--backend", f"fake=127.0.0.1:{port}", "--response-timeout", "5")
        for _ in range(2):
            data = exchange(lb.port, b"GET /eof HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data[:200]
            assert data.endswith(b"\r\n\r\nthe body ends with the connection\n")
            assert b"Content-Length: 34\r\n" in data
        data = exchange(lb.port, b"GET /interim HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert statuses_in(data) == [b"200"] and data.endswith(b"final\n"), data[:300]
        data = exchange(lb.port, b"GET /moved HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 302 Found Elsewhere\r\n") and b"Location: /page.html" in data
        assert "backend-down" not in setup.log()


def _answers_in_turn(answers: list[bytes]):
    """A backend whose answers to the requests (but /healthz) are ``answers``, in turn."""
    turn = itertools.count()

    def answer(conn: socket.socket) -> None:
        for head in read_requests(conn):
            conn.sendall(ok_answer(b"ok\n") if b" /healthz " in head else answers[next(turn) % len(answers)])
    return answer


def test_lb_relays_each_answer_as_sent_even_when_it_looks_like_the_last(setup):
    """lb.py takes an answer that is its backend's last one again, but for the Date,
    without parsing it (upstream.KnownAnswer). Answers of the same length that differ
    anywhere else (the body, a header folded into the Date's place) are parsed and
    relayed as sent; a HEAD between them too."""
    def ok(date: bytes, body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nDate: %s\r\nContent-Length: %d\r\n\r\n%s" % (date, len(body), body)

    date = b"Mon, 02 Nov 2026 10:00:00 GMT"
    answers = [ok(date, b"aaaa"), ok(date, b"aaaa"), ok(b"Tue, 03 Nov 2026 11:11:11 GMT", b"aaaa"),
               ok(date, b"bbbb"), ok(b"x\r\nX-Folded: 1234567890123456", b"bbbb")]
    assert len({len(a) for a in answers}) == 1
    with fake_backend(_answers_in_turn(answers)) as port:
        lb = setup.server("lb.py", "--backend", f"fake=127.0.0.1:{port}", "--check-interval", "30")
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            got = []
            for _ in range(2 * len(answers)):
                s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
                data = b""
                while not (data.endswith(b"aaaa") or data.endswith(b"bbbb")):
                    chunk = s.recv(65536)
                    assert chunk, data
                    data += chunk
                got.append((data[-4:], b"X-Folded: 1234567890123456\r\n" in data))
    expected = [(b"aaaa", False)] * 3 + [(b"bbbb", False), (b"bbbb", True)]
    assert got == expected * 2


def _answer_one_request(conn: socket.socket) -> bool:
    """Reads a request head and answers it with keep-alive; False if the connection closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        buf += chunk
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    return True


def _answer_once_per_connection(conn: socket.socket) -> None:
    """Answers one request with keep-alive, then closes when the next comes, unanswered:
    the race of a pooled connection the backend closed while it sat idle."""
    if not _answer_one_request(conn):
        return
    conn.recv(65536)  # the next request: closed without an answer
    conn.close()


def test_lb_retries_on_a_fresh_connection_when_a_pooled_one_was_closed_and_blames_nobody(setup):
    """A request sent on a pooled connection the backend has closed meanwhile goes
    once more over a new connection to the same backend, which stays up (with one
    backend, blaming it would have been a 503)."""
    with fake_backend(_answer_once_per_connection) as port:
        lb = setup.server("lb.py", "--backend", f"fake=127.0.0.1:{port}", "--check-interval", "30")
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            for _ in range(5):  # each request after the first finds the pooled connection stale
                s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
                data = b""
                while not data.endswith(b"ok\n"):
                    chunk = s.recv(65536)
                    assert chunk, data
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data[:200]
        assert "backend-down" not in setup.log()


def test_lb_counts_no_pooled_connection_its_backend_has_closed_as_idle(setup):
    """/stats and /metrics: a pooled connection the backend closed (its keep-alive
    timeout) leaves the idle count at once, not when a request finds it closed."""
    close_now = threading.Event()

    def answer_then_close_when_told(conn: socket.socket) -> None:
        if _answer_one_request(conn):
            close_now.wait(30)
        conn.close()

    admin_port = cluster.free_port()
    with fake_backend(answer_then_close_when_told) as port:
        lb = setup.server("lb.py", "--backend", f"fake=127.0.0.1:{port}", "--check-interval", "30",
                          "--admin-port", str(admin_port))
        assert exchange(lb.port, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").endswith(b"ok\n")
        assert json.loads(_admin(admin_port, "/stats"))["backends"][0]["idle_connections"] == 1  # pooled
        close_now.set()
        deadline = time.monotonic() + 20
        while json.loads(_admin(admin_port, "/stats"))["backends"][0]["idle_connections"]:
            assert time.monotonic() < deadline, "a connection the backend closed still counted as idle"
            time.sleep(0.05)
        assert 'clusterkit_http_backend_idle_connections{backend="fake"} 0.0' in _admin(admin_port, "/metrics").decode()


def _answer_twice(conn: socket.socket) -> None:
    """Each request answered with its own path and, in the same write, an answer nobody asked for."""
    for head in read_requests(conn):
        conn.sendall(ok_answer(head.split(b" ")[1]) + b"HTTP/1.1 200 OK\r\nX-Unasked: yes\r\nContent-Length: 2\r\n\r\nno")


def _answer_slowly_or_oddly(conn: socket.socket) -> None:
    """/slow: 10 pieces, 0.15 s apart; /upgrade: a 101 nobody asked for; /healthz: a
    70 KB status line the first three times; anything else: 200."""
    for head in read_requests(conn):
        path = head.split(b" ")[1]
        if path == b"/slow":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            for _ in range(10):
                time.sleep(0.15)
                conn.sendall(b"x")
        elif path == b"/upgrade":
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
        elif path == b"/healthz" and _odd_checks:
            _odd_checks.pop()
            conn.sendall(b"HTTP/1.1 200 " + b"x" * 70_000 + b"\r\n\r\n")
            return
        else:
            conn.sendall(ok_answer(b"ok\n"))


_odd_checks: list[int] = []


def _answer_loosely(conn: socket.socket) -> None:
    """Answers nginx and HAProxy relay: /lf with bare LFs (netcat, hand-written
    servers), its head in two writes on /split; /twice with one Content-Length
    given twice; /differ with two different ones (refused everywhere)."""
    for head in read_requests(conn):
        path = head.split(b" ")[1]
        if path in (b"/lf", b"/split"):
            answer = b"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 6\n\nok\nok\n"
            if path == b"/split":
                conn.sendall(answer[:20])
                time.sleep(0.2)
                answer = answer[20:]
            conn.sendall(answer)
        elif path in (b"/twice", b"/differ", b"/twice-split"):
            second = b"7" if path == b"/differ" else b"6"
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Length: " + second + b"\r\n\r\nok\nok\n"
            if path == b"/twice-split":  # (the status line, then the rest: the parser refuses the second read)
                conn.sendall(answer[:17])
                time.sleep(0.2)
                answer = answer[17:]
            conn.sendall(answer)
        else:
            conn.sendall(ok_answer(b"ok\n"))


def test_an_answer_head_is_mended_as_nginx_reads_it():
    from clusterkit.http.upstream import head_end, repaired_head
    lf = b"HTTP/1.1 200 OK\nContent-Length: 3\n\nok\n"
    assert head_end(lf) == len(lf) - 3 and head_end(lf[:20]) == -1
    assert repaired_head(lf[:-3]) == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    mixed = b"HTTP/1.1 200 OK\r\nContent-Length: 3\nX: y\r\ncontent-length:  3\r\n\r\n"
    assert head_end(mixed) == len(mixed)
    assert repaired_head(mixed) == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: y\r\n\r\n"
    differ = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"
    assert repaired_head(differ) == differ  # (the parser refuses it: a 502)


def test_lb_relays_answers_with_bare_lf_lines_or_a_content_length_twice(setup):
    """Each was a 502, on every request, with the backend UP (its checks read the
    status line alone); nginx and HAProxy relay both (RFC 9112 2.2, RFC 9110 8.6).
    Two different lengths are still a 502, and the connection after a mended
    answer is fine for the next one."""
    with fake_backend(_answer_loosely) as port:
        lb = setup.server("lb.py", "--backend", f"loose=127.0.0.1:{port}", "--check-interval", "30")
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
            for path in ("/lf", "/split", "/twice", "/twice-split", "/lf", "/fine"):
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answer = read_answers(sock, 1, time.monotonic() + 10)[0]
                assert answer == (200, 3 if path == "/fine" else 6), (path, answer)
        assert status_of(exchange(lb.port, b"GET /differ HTTP/1.0\r\n\r\n")) == 502
        assert status_of(exchange(lb.port, b"GET /lf HTTP/1.0\r\n\r\n")) == 200


def test_lb_drops_a_connection_that_brings_an_answer_nobody_asked_for(setup):
    """A second answer right behind the first, unasked for, put its headers into the
    first (they shared a list), and the connection stayed in the pool. Now the answer
    is relayed as it was and the connection dropped, as nginx does. (One that comes
    later, after the connection went to the next request, cannot be told from its
    answer: HTTP/1.1 has no request ids.)"""
    with fake_backend(_answer_twice) as port:
        lb = setup.server("lb.py", "--backend", f"twice=127.0.0.1:{port}", "--check-interval", "30")
        for i in range(4):
            data = exchange(lb.port, b"GET /client-%d HTTP/1.0\r\n\r\n" % i)
            assert data.endswith(b"\r\n\r\n/client-%d" % i) and b"X-Unasked" not in data, data[-300:]


def test_lb_answers_a_client_that_half_closes_after_its_request(setup):
    """printf 'GET ...' | nc -N: the client's EOF closed the connection before the answer."""
    lb = setup.lb(1)
    data = exchange(lb.port, b"GET /page.html HTTP/1.1\r\nHost: t\r\n\r\nGET /style.css HTTP/1.1\r\nHost: t\r\n\r\n",
                    half_close=True)
    assert statuses_in(data) == [b"200", b"200"], data[:300]
    assert b"text/css" in data


def test_lb_survives_slow_upgraded_and_overlong_backend_answers(setup):
    """A body still coming after --response-timeout was a 504 with the backend taken out
    (the timeout now runs between reads, as nginx's); a 101 nobody asked for escaped as an
    exception; a 70 KB status line to a health check ended that backend's checks for good."""
    _odd_checks[:] = [1, 1, 1]
    with fake_backend(_answer_slowly_or_oddly) as port:
        lb = setup.server("lb.py", "--backend", f"odd=127.0.0.1:{port}", "--response-timeout", "0.5",
                          "--check-interval", "0.2", "--fall", "2", "--rise", "2")
        setup.wait_log("event=backend-down backend=odd")  # the overlong check lines
        deadline = time.monotonic() + 20
        while "event=backend-up backend=odd" not in setup.log():  # the checks went on, and pass again
            assert time.monotonic() < deadline, setup.log()[-2000:]
            time.sleep(0.1)
        data = exchange(lb.port, b"GET /slow HTTP/1.0\r\n\r\n")
        assert status_of(data) == 200 and data.endswith(b"\r\n\r\nxxxxxxxxxx"), data[-200:]
        assert status_of(exchange(lb.port, b"GET /upgrade HTTP/1.0\r\n\r\n")) == 502
        assert status_of(exchange(lb.port, b"GET /fine HTTP/1.0\r\n\r\n")) == 200
        assert setup.log().count("event=backend-down") == 1


BIG = 64 * 1024 * 1024
_streamed: dict[str, int] = {}  # bytes the streaming backend got out, by path


_sick: list[int] = []  # not empty: health checks are answered 500


def _answer_at_length(conn: socket.socket) -> None:
    """/big: 64 MB with a Content-Length, written as the socket takes it (/medium: 1 MB,
    /large: 8 MB; /late-big: 64 MB after a second); /chunked: 300 KB in 10 KB chunks; /dies: 200 KB of
    a promised 1 MB, then the close; /healthz: 500 while _sick; else 200."""
    for head in read_requests(conn):
        path = head.split(b" ")[1].decode()
        if path in ("/big", "/medium", "/large", "/late-big"):
            size = {"/medium": 1 << 20, "/large": 8 << 20}.get(path, BIG)
            if path == "/late-big":
                time.sleep(1)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            piece = bytes(range(256)) * 4096  # 1 MB
            _streamed[path] = 0
            for _ in range(size // len(piece)):
                conn.sendall(piece)
                _streamed[path] += len(piece)
        elif path == "/healthz" and _sick:
            conn.sendall(b"HTTP/1.1 500 Sick\r\nContent-Length: 0\r\n\r\n")
        elif path == "/chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(30):
                conn.sendall(b"2800\r\n" + bytes([65 + i % 26]) * 10240 + b"\r\n")
            conn.sendall(b"0\r\n\r\n")
        elif path == "/dies":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"d" * 200_000)
            time.sleep(0.3)
            conn.close()
            return
        else:
            conn.sendall(ok_answer(b"ok\n"))


def _wait_still(path: str, seconds: float = 0.5) -> int:
    """What the backend got out once it has stopped getting anything out for ``seconds``."""
    deadline = time.monotonic() + 30
    last = -1
    while _streamed.get(path, 0) != last:
        assert time.monotonic() < deadline, "the backend never stopped sending"
        last = _streamed.get(path, 0)
        time.sleep(seconds)
    return last


def test_lb_streams_a_long_answer_at_the_pace_its_client_reads_it(setup):
    """A long answer was read whole into memory before a byte of it went on: 200 MB
    answers to three clients took the balancer to 821 MB. Past 64 KB it now goes
    on as it comes, and a client that does not read stops the backend's answer
    (the backend cannot get more out), so the balancer holds a bounded part."""
    with fake_backend(_answer_at_length) as port:
        lb = setup.server("lb.py", "--backend", f"big=127.0.0.1:{port}", "--check-interval", "30")
        rss = psutil.Process(lb.pid).memory_info().rss
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            out = _wait_still("/big")  # the client reads nothing yet
            assert out < BIG // 2, f"the backend got {out} bytes out to a client that reads none"
            assert psutil.Process(lb.pid).memory_info().rss - rss < 24 * 1024 * 1024
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: %d\r\n" % BIG in head
            size, ok = len(body), body == (bytes(range(256)) * 4096)[:len(body)]
            while size < BIG:
                chunk = s.recv(1 << 20)
                assert chunk, size
                ok = ok and chunk == (bytes(range(256)) * 4096 * 2)[size % 256:size % 256 + len(chunk)]
                size += len(chunk)
            assert size == BIG and ok
            s.sendall(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")  # the same connection goes on
            assert s.recv(65536).endswith(b"ok\n")
        for version, framing in (("1.1", "Transfer-Encoding: chunked"), ("1.0", "Connection: close")):
            conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
            conn._http_vsn_str = f"HTTP/{version}"
            conn.request("GET", "/chunked")
            resp = conn.getresponse()
            body = resp.read()
            assert framing in str(resp.headers) and "Content-Length" not in str(resp.headers), resp.headers
            assert body == b"".join(bytes([65 + i % 26]) * 10240 for i in range(30))
            conn.close()
        assert "backend-down" not in setup.log()


def test_lb_cuts_a_streamed_answer_its_backend_dies_in_and_drops_one_its_client_left(setup):
    """Half of a long answer is with the client when its backend closes the
    connection: it cannot go to another backend, so the client's connection is cut
    (it must not take the part for the whole); the backend is checked at once, and
    as it still answers its check, it stays up (a backend killed fails it and goes
    down: see the kill -9 test); a client that leaves half-way ends its backend
    connection without anyone being blamed."""
    with fake_backend(_answer_at_length) as port:
        lb = setup.server("lb.py", "--backend", f"big=127.0.0.1:{port}", "--check-interval", "30")
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        setup.wait_log("event=request client=127.0.0.1 method=GET path=/big")
        assert status_of(exchange(lb.port, b"GET /fine HTTP/1.0\r\n\r\n")) == 200
        assert "backend-down" not in setup.log()
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.sendall(b"GET /dies HTTP/1.1\r\nHost: t\r\n\r\n")
            data = b""
            with pytest.raises(ConnectionResetError):  # a FIN would pass for the end of an HTTP/1.0 body
                while chunk := s.recv(65536):
                    data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and len(data) < 1_000_000, len(data)
        setup.wait_log("event=answer-cut")
        setup.wait_log('event=backend-error backend=big reason=closed check="check passed"')
        assert "backend-down" not in setup.log()
        assert status_of(exchange(lb.port, b"GET /fine HTTP/1.0\r\n\r\n")) == 200


def test_lb_lets_go_of_an_answer_whose_client_left_before_it_grew_long(setup):
    """The client reset its connection before the answer came: the 64 MB answer
    was read to the end for nobody."""
    with fake_backend(_answer_at_length) as port:
        lb = setup.server("lb.py", "--backend", f"big=127.0.0.1:{port}", "--check-interval", "30")
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.sendall(b"GET /late-big HTTP/1.1\r\nHost: t\r\n\r\n")
            time.sleep(0.3)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        setup.wait_log("path=/late-big")
        assert "status=499 bytes=0" in setup.log()
        assert _wait_still("/late-big") < BIG // 2
        assert "backend-down" not in setup.log()


def _read_slowly(s: socket.socket, piece: int, slow_for: float = 60) -> bytes:
    """An answer with a Content-Length, ``piece`` bytes every 0.1 s for ``slow_for``
    seconds, then the rest as fast as it comes."""
    data = b""
    until = time.monotonic() + slow_for
    while True:
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"Content-Length: (\d+)", head)
        if length and len(body) >= int(length[1]):
            return data
        slow = time.monotonic() < until
        chunk = s.recv(piece if slow else 1 << 20)
        if not chunk:
            return data
        data += chunk
        if slow:
            time.sleep(0.1)


def test_lb_keeps_a_slow_steady_reader_and_its_stream_through_a_backend_marked_down(setup):
    """A client reading a long answer at 320 KB/s was dropped after --keepalive-timeout
    (its write buffer never fell back to the low mark in time), as if it read nothing;
    and a health check failing on the backend cut the answer, which had no other
    backend to go to. Now the timeout counts from its last read, and the stream goes
    on to its end."""
    _sick.clear()
    with fake_backend(_answer_at_length) as port:
        lb = setup.server("lb.py", "--backend", f"big=127.0.0.1:{port}", "--keepalive-timeout", "1",
                          "--check-interval", "0.2", "--fall", "1")
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.sendall(b"GET /large HTTP/1.1\r\nHost: t\r\n\r\n")
            threading.Timer(1.0, _sick.append, (1,)).start()
            time.sleep(0.6)  # the balancer's buffers fill up, and it stops writing
            data = _read_slowly(s, 32768, slow_for=2.5)
        assert data.endswith(b"\r\n\r\n" + bytes(range(256)) * 4096 * 8), len(data)
        setup.wait_log("event=backend-down backend=big")  # (the log is written in batches)
        assert "answer-cut" not in setup.log() and "send-timeout" not in setup.log()
    _sick.clear()


def test_lb_sigterm_lets_a_streamed_answer_finish(setup):
    """The answer was all read from the backend, so the client counted as idle, and
    the stop reset it with half a megabyte still in its write buffer."""
    with fake_backend(_answer_at_length) as port:
        lb = setup.server("lb.py", "--backend", f"big=127.0.0.1:{port}", "--check-interval", "30")
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.sendall(b"GET /large HTTP/1.1\r\nHost: t\r\n\r\n")
            threading.Timer(0.3, lb.signal, (signal.SIGTERM,)).start()
            data = _read_slowly(s, 262144, slow_for=2)  # 2.6 MB/s for 2 s (data still queued at the stop), then fast
        assert data.endswith(b"\r\n\r\n" + bytes(range(256)) * 4096 * 8), len(data)
        assert lb.wait(timeout=30) == 0


def test_lb_logs_499_for_an_answer_whose_client_left_before_it_came(setup):
    """It logged status=200 and the answer's size for an answer nobody got. (A client
    that only half-closes still gets its answer: test_lb_answers_a_client_that_half_closes...)"""
    with fake_backend(_answer_slowly_or_oddly) as port:
        lb = setup.server("lb.py", "--backend", f"odd=127.0.0.1:{port}", "--check-interval", "30")
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            time.sleep(0.3)  # the request is with the backend
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # gone: a reset
        setup.wait_log("path=/slow")
        assert re.search(r"path=/slow ms=\S+ status=499 bytes=0 backend=odd", setup.log()), setup.log()[-500:]


def test_lb_out_of_descriptors_answers_503_and_marks_no_backend_down(setup):
    """150 clients at once on lb.py with 100 open files: 200 or 503 (or a refused
    connection), no backend taken out, and service as before once they are gone."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    ports = [setup.backend(f"backend{i}").port for i in (1, 2)]
    port = cluster.free_port()
    lb = setup.procs.start(cluster.Process("lb", ["prlimit", "--nofile=100:100", *cluster.python_script(
        "http_servers/lb.py", "--port", str(port), "--log-dir", setup.log_dir,
        *[x for p in ports for x in ("--backend", f"127.0.0.1:{p}")])], port=port))
    clients, seen = [], set()
    for _ in range(150):
        try:
            s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
            s.sendall(SIMPLE_GET)
            clients.append(s)
        except OSError:
            seen.add("refused")
    for s in clients:
        try:
            seen.add(s.recv(12))
        except OSError:
            seen.add("reset")
        s.close()
    assert b"HTTP/1.1 200" in seen and seen <= {b"HTTP/1.1 200", b"HTTP/1.1 503", b"", "refused", "reset"}, seen
    assert "backend-down" not in setup.log()
    deadline = time.monotonic() + 10  # descriptors come back as the closes complete: until
    while True:                       # then a 503, a reset or a close, as in the flood
        try:
            data = exchange(lb.port, CLOSING_GET)
        except ConnectionResetError:
            data = b"reset"
        if not data.startswith(b"HTTP/1.1 503 ") and data not in (b"", b"reset"):
            break
        assert time.monotonic() < deadline, data[:100]
        time.sleep(0.1)
    assert status_of(data) == 200, data[:100]


def test_an_unnamed_backend_on_a_default_port_is_named_as_lb_py_names_it():
    """``async_server.py 9002`` without --name says X-Backend: backend1, the name lb.py's
    log gives the backend on 9002; a port lb.py does not know gets backend-PORT."""
    from clusterkit.http.config import DEFAULT_BACKENDS, ProxyConfig, backend_name

    assert [backend_name(p) for p in (9002, 9003, 9004, 9005)] == ["backend1", "backend2", "backend3", "backend4"]
    assert [b.name for b in ProxyConfig().backends] == [b.name for b in DEFAULT_BACKENDS]
    assert backend_name(9100) == "backend-9100"


def test_lb_names_an_unnamed_backend_as_the_backend_names_itself(tmp_path):
    """``lb.py --backend 127.0.0.1:9002`` called it backend-9002 in its log and /stats
    while the backend's X-Backend said backend1; so did a config file's [[backends]]."""
    from clusterkit.http.cli import lb_parser, proxy_config

    args = lb_parser().parse_args(["--backend", "127.0.0.1:9002", "--backend", "b=[::1]:9003",
                                   "--backend", "127.0.0.1:9100", "--backend", "[::1]:9100"])
    backends = proxy_config(args).backends
    # (the same port on another address: named by its address; it was refused, "given twice")
    assert [b.name for b in backends] == ["backend1", "b", "backend-9100", "[::1]:9100"]
    assert [b.host for b in backends] == ["127.0.0.1", "::1", "127.0.0.1", "::1"]
    # A name given later counts too: the unnamed one before it was named backend1 as well (refused).
    args = lb_parser().parse_args(["--backend", "127.0.0.1:9002", "--backend", "backend1=127.0.0.1:9003"])
    assert [b.name for b in proxy_config(args).backends] == ["127.0.0.1:9002", "backend1"]
    (tmp_path / "lb.toml").write_text("[[backends]]\nport = 9003\n[[backends]]\nport = 9101\n")
    args = lb_parser().parse_args(["--config", str(tmp_path / "lb.toml")])
    assert [b.name for b in proxy_config(args).backends] == ["backend2", "backend-9101"]
    # A config file's [[backends]] are named by the same rule as the flags (it refused these, "given twice").
    (tmp_path / "lb.toml").write_text('[[backends]]\nport = 9002\n[[backends]]\nport = 9003\nname = "backend1"\n'
                                      '[[backends]]\nport = 9100\n[[backends]]\nhost = "::1"\nport = 9100\n')
    args = lb_parser().parse_args(["--config", str(tmp_path / "lb.toml")])
    assert [b.name for b in proxy_config(args).backends] == ["127.0.0.1:9002", "backend1", "backend-9100",
                                                             "[::1]:9100"]


def test_lb_flags_for_what_only_its_config_file_set(setup):
    """--connect-timeout, --check-timeout, --pool-size and --drain-timeout were [lb]
    settings of a --config file only (lb.py: 'unrecognized arguments'); their help
    says the default. --pool-size 0 keeps no idle connection to a backend."""
    from clusterkit.http.cli import lb_parser, proxy_config

    args = lb_parser().parse_args(["--connect-timeout", "0.5", "--check-timeout", "0.25", "--pool-size", "0",
                                   "--drain-timeout", "0"])
    config = proxy_config(args)
    assert (config.connect_timeout, config.check_timeout, config.pool_size, config.drain_timeout) == (0.5, 0.25, 0, 0)
    helps = " ".join(lb_parser().format_help().split())
    for text in ("--connect-timeout CONNECT_TIMEOUT seconds", "(default: 64)", "--drain-timeout DRAIN_TIMEOUT"):
        assert text in helps
    admin_port = cluster.free_port()
    lb = setup.lb(1, "--admin-port", str(admin_port), "--pool-size", "0", "--connect-timeout", "0.5",
                  "--check-timeout", "0.5", "--drain-timeout", "1")
    for _ in range(3):
        assert status_of(exchange(lb.port, CLOSING_GET)) == 200
    backend = json.loads(_admin(admin_port, "/stats"))["backends"][0]
    assert backend["requests"] == 3 and backend["idle_connections"] == 0, backend


LB_TOML = """[lb]
host = "127.0.0.1"
port = {port}
header-timeout = 1
keepalive-timeout = 30.0
max-header-bytes = 2000
[[backends]]
name = "backend1"
port = {backend}
"""
BIG_HEADER_GET = b"GET /page.html HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\nConnection: close\r\n\r\n" % (b"a" * 3000)


def _slow_head_answer(port: int) -> tuple[int, float]:
    """The status a request head that never ends gets, and how long it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET /page.html HTTP/1.1\r\n")
        started = time.monotonic()
        return status_of(s.recv(4096)), time.monotonic() - started


def test_lb_config_file_sets_what_its_flags_set_and_a_flag_given_wins(setup, tmp_path):
    """The [lb] table took no host, port or request limits ('unknown setting 'host''),
    so a file could not say where lb.py listens; a flag given wins over the file, one
    not given leaves the file's setting, as with Load_Balancer.py's [balancer]."""
    from clusterkit.http.cli import lb_parser, proxy_config
    from clusterkit.http.core import Limits

    backend = setup.backend("backend1")
    port = cluster.free_port()
    path = tmp_path / "lb.toml"
    path.write_text(LB_TOML.format(port=port, backend=backend.port))
    config = proxy_config(lb_parser().parse_args(["--config", str(path), "--keepalive-timeout", "7"]))
    assert (config.host, config.port) == ("127.0.0.1", port)
    assert config.limits == Limits(header_timeout=1.0, keepalive_timeout=7.0, max_header_bytes=2000)
    setup.procs.start(cluster.Process("lb.py", cluster.python_script(
        "http_servers/lb.py", "--config", str(path), "--log-dir", setup.log_dir), port=port))
    assert status_of(exchange(port, CLOSING_GET)) == 200
    assert status_of(exchange(port, BIG_HEADER_GET)) == 431  # the file's 2,000 bytes
    status, took = _slow_head_answer(port)
    assert status == 408 and took < 5, took  # the file's 1 s, not the default 10 s
    other = cluster.free_port()
    setup.procs.start(cluster.Process("lb2", cluster.python_script(
        "http_servers/lb.py", "--config", str(path), "--port", str(other), "--max-header-bytes", "5000",
        "--log-dir", setup.log_dir), port=other))
    assert status_of(exchange(other, BIG_HEADER_GET)) == 200  # the flags win
    status, took = _slow_head_answer(other)
    assert status == 408 and took < 5, took  # the file's header timeout stays


def test_lb_example_config_with_every_setting_uncommented_is_accepted(tmp_path):
    """http_servers/lb.example.toml names every [lb] setting, the commented ones at
    their defaults (admin-port but, which is off by default)."""
    import dataclasses
    from clusterkit.http.cli import LB_FILE_SETTINGS, lb_parser, proxy_config
    from clusterkit.http.config import ProxyConfig

    text = (Path(cluster.ROOT) / "http_servers" / "lb.example.toml").read_text()
    text = re.sub(r"(?m)^# ([a-z-]+ = )", r"\1", text)
    named = set(re.findall(r"(?m)^([a-z-]+) = ", text.partition("[[backends]]")[0]))
    assert {n.replace("-", "_") for n in named} == LB_FILE_SETTINGS
    (tmp_path / "lb.toml").write_text(text)
    config = proxy_config(lb_parser().parse_args(["--config", str(tmp_path / "lb.toml"), "--log-dir", "logs"]))
    assert config.admin_port == 44445 and dataclasses.replace(config, admin_port=0) == ProxyConfig()
