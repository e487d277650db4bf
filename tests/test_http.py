"""The HTTP servers and the HTTP load balancer as real processes: ApacheBench,
raw sockets for every error case, faults, and a real browser."""

from __future__ import annotations

import concurrent.futures
import email.utils
import errno
import http.client
import itertools
import json
import logging
import os
import queue
import re
import select
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

from .conftest import (FullBacklog, assert_bad_config, fake_backend, send_all_then_read, turned_away_or_in,
                       unasked, under_open_files_limit)

pytestmark = pytest.mark.timeout(120)

WWW = Path(cluster.ROOT) / "http_servers" / "www"
HAS_AB = shutil.which("ab") is not None
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

SIMPLE_GET = b"GET /page.html HTTP/1.1\r\nHost: t\r\n\r\n"
CLOSING_GET = b"GET /page.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
HTTP10_KEEPALIVE = b"GET /page.html HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
GARBAGE = b"\x16\x03\x01 definitely not http\r\n\r\n"
POST = b"POST /page.html HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
HUGE_BODY = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n"
HUGE_HEADERS = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Filler: " + b"a" * 40000 + b"\r\n\r\n"
HTTP2_LINE = b"GET / HTTP/2.0\r\nHost: t\r\n\r\n"
CL_AND_TE = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
TWO_CL = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n"
NO_HOST_11 = b"GET /page.html HTTP/1.1\r\n\r\n"
TWO_HOSTS = b"GET /page.html HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
BARE_LF = b"GET /page.html HTTP/1.1\nHost: t\n\n"
H2C_UPGRADE = (b"GET /page.html HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
               b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")  # what curl --http2 sends
CONNECT = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01"


def exchange(port: int, raw: bytes, timeout: float = 10, host: str = "127.0.0.1", half_close: bool = False) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(raw)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                head, done, body = data.partition(b"\r\n\r\n")
                m = re.search(rb"Content-Length: (\d+)", head)
                if done and m and len(body) >= int(m.group(1)):
                    if b"Connection: keep-alive" in head:
                        break
                    # An HTTP/1.1 answer keeps the connection open: whatever else would come
                    # (a second answer to a smuggled request) comes at once, not 10 s later.
                    s.settimeout(1.0)
        except TimeoutError:
            pass
    return data


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


class HttpSetup:
    def __init__(self, procs, log_dir) -> None:
        self.procs = procs
        self.log_dir = str(log_dir)
        self.backends: dict[str, cluster.Process] = {}

    def server(self, script: str, *args: str) -> cluster.Process:
        port = cluster.free_port()
        return self.procs.start(cluster.Process(script, cluster.python_script(
            f"http_servers/{script}", "--port", str(port), "--log-dir", self.log_dir, *args), port=port))

    def backend(self, name: str, port: int | None = None) -> cluster.Process:
        port = port or cluster.free_port()
        proc = self.procs.start(cluster.Process(name, cluster.python_script(
            "http_servers/async_server.py", str(port), "--name", name, "--log-dir", self.log_dir), port=port))
        self.backends[name] = proc
        return proc

    def lb(self, n: int = 4, *extra: str) -> cluster.Process:
        args = []
        for i in range(1, n + 1):
            b = self.backend(f"backend{i}")
            args += ["--backend", f"backend{i}=127.0.0.1:{b.port}"]
        return self.server("lb.py", *args, "--check-interval", "0.2", "--rise", "2", "--fall", "2", *extra)

    def log(self) -> str:
        return (Path(self.log_dir) / "server_log.log").read_text()

    def wait_log(self, text: str, timeout: float = 10) -> None:
        """Until ``text`` is in the log (written by its own thread, in batches)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"never logged: {text}"
            time.sleep(0.05)

    def lb_requests(self, count: int, timeout: float = 10) -> list[str]:
        """The lb's request lines, once ``count`` of them are written (logs are flushed in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log().splitlines() if " lb event=request " in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


@pytest.fixture
def setup(procs, log_dir):
    return HttpSetup(procs, log_dir)


@pytest.fixture(params=["Server_async_http.py", "Server_thread_http.py", "lb.py"])
def server(request, setup):
    if request.param == "lb.py":
        return setup.lb(1, "--header-timeout", "1")
    return setup.server(request.param, "--header-timeout", "1")


@pytest.mark.skipif(not HAS_AB, reason="ApacheBench (ab, Debian's apache2-utils) is not installed")
@pytest.mark.parametrize("target", ["Server_async_http.py", "Server_thread_http.py", "lb.py"])
@pytest.mark.parametrize("keepalive", [False, True])
def test_apachebench_1000_requests_all_complete(setup, target, keepalive):
    proc = setup.lb() if target == "lb.py" else setup.server(target)
    ab = subprocess.run(["ab", *(["-k"] if keepalive else []), "-n", "1000", "-c", "10",
                         f"http://127.0.0.1:{proc.port}/page.html"], capture_output=True, text=True, timeout=90)
    assert ab.returncode == 0, ab.stderr
    assert re.search(r"Complete requests:\s+1000\b", ab.stdout)
    assert re.search(r"Failed requests:\s+0\b", ab.stdout)
    assert "Non-2xx" not in ab.stdout
    if keepalive:
        assert re.search(r"Keep-Alive requests:\s+1000\b", ab.stdout)


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
    assert re.search(r'event=backend-down backend=backend2 '
                     r'reason=(connect-refused|connect-econnreset|"((closed|reset), then )?check refused")$',
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


@pytest.mark.parametrize("raw, status", [
    (GARBAGE, 400), (POST, 405), (HUGE_BODY, 413), (HUGE_HEADERS, 431), (HTTP2_LINE, 505),
    (CL_AND_TE, 400), (TWO_CL, 400), (b"GET /nothing-here HTTP/1.1\r\nHost: t\r\n\r\n", 404),
    (NO_HOST_11, 400), (TWO_HOSTS, 400), (CONNECT, 405),
    # (llhttp took these two as chunked bodies, the gzip unseen: 200)
    (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),  # (200)
])
def test_error_answers(server, raw, status):
    data = exchange(server.port, raw)
    assert status_of(data) == status, data[:200]
    if status == 405:
        assert b"Allow: GET, HEAD" in data


def test_a_request_typed_with_bare_lf_line_ends_is_answered(server):
    """What ``nc`` sends for a request typed by hand, a line at a time (RFC 9112
    2.2: a bare LF may end a line; nginx answers it): was a 400."""
    page = (WWW / "page.html").read_bytes()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(BARE_LF + BARE_LF)  # two at once, on one connection
        for line in (b"GET /page.html HTTP/1.1\n", b"Host: t\n", b"Connection: close\n", b"\n"):
            time.sleep(0.05)
            s.sendall(line)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    answers = data.split(b"\r\n\r\n" + page)
    assert answers[-1] == b"" and len(answers) == 4, data[:300]
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers[:3])


def _in_pieces(port: int, *pieces: bytes) -> tuple[bytes, float]:
    """Send ``pieces`` 0.3 s apart; the answer and the time from the last piece to its first byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        for piece in pieces[:-1]:
            s.sendall(piece)
            time.sleep(0.3)
        s.sendall(pieces[-1])
        started = time.monotonic()
        data = s.recv(65536)
        took = time.monotonic() - started
        s.settimeout(2)
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            pass
    return data, took


@pytest.mark.parametrize("script", ["Server_async_http.py", "Server_thread_http.py", "lb.py"])
def test_a_request_line_without_a_version_is_answered_at_once(setup, script):
    """HTTP/0.9's request line (``GET /page.html``, no version) waited for the header
    timeout and got a 408 (llhttp waits for header fields after it); it gets its
    505 at once, as it did with an empty line after it (nginx answers it at once
    too). A request line arriving in pieces still waits for the rest."""
    args = ("--header-timeout", "30")
    srv = setup.lb(1, *args) if script == "lb.py" else setup.server(script, *args)
    for pieces in ([b"GET /page.html\r\n"], [b"GET /page.html\n"], [b"GET /page.html\r\n\r\n"],
                   [b"GET /pa", b"ge.html", b"\r\n"]):
        data, took = _in_pieces(srv.port, *pieces)
        assert data.startswith(b"HTTP/1.1 505 ") and took < 10, (pieces, data[:100], took)
    for pieces in ([b"GET /page.html HT", b"TP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"],
                   [b"GET /page.html", b" HTTP/1.1\r\n", b"Host: t\r\nConnection: close\r\n\r\n"],
                   [b"GET /page.html HTTP/1.1\r\n", b"Host: t\r\n", b"Connection: close\r\n\r\n"]):
        data, took = _in_pieces(srv.port, *pieces)
        assert status_of(data) == 200 and data.endswith((WWW / "page.html").read_bytes()), (pieces, data[:100])


def test_an_upgrade_is_ignored_and_the_connection_goes_on_in_http_1_1(server):
    """RFC 9110 7.8 lets a server ignore Upgrade: curl --http2 gets its page over
    HTTP/1.1, and a request pipelined after the upgrade request is answered too."""
    data = exchange(server.port, H2C_UPGRADE + b"GET /style.css HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    statuses = re.findall(rb"^HTTP/1\.1 (\d+)", data, re.MULTILINE)
    assert statuses == [b"200", b"200"], data[:300]
    assert b"101" not in data.split(b"\r\n", 1)[0]


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


@pytest.mark.parametrize("path", [
    b"/../clusterkit/__init__.py", b"/%2e%2e/clusterkit/__init__.py", b"/..%2f..%2fetc%2fpasswd",
    b"/%2e%2e%2f%2e%2e%2fetc/passwd", b"/outside/passwd", b"/.%2e/README.md", b"/x/../../README.md",
    b"/outside/../../README.md", b"/x/%2e%2e/%2e%2e/README.md", b"/page.html/../..%2fREADME.md"])
def test_no_path_escapes_the_document_root(setup, tmp_path, path):
    root = tmp_path / "www"
    shutil.copytree(WWW, root)
    os.symlink("/etc", root / "outside")
    srv = setup.server("Server_async_http.py", "--root", str(root))
    data = exchange(srv.port, b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path)
    assert status_of(data) in (400, 404)
    assert b"root:" not in data and b"clusterkit" not in data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("path", [b"/x/../page.html", b"/x/%2e%2e/page.html", b"/./page.html", b"/x/./../page.html",
                                  b"/style.css/../page.html", b"/x/y/../..//page.html", b"/x/.."])
def test_dot_segments_are_resolved_inside_the_root_as_nginx_does(server, path):
    data = exchange(server.port, b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path)
    assert status_of(data) == 200, data[:200]
    assert data.split(b"\r\n\r\n", 1)[1] == (WWW / "page.html").read_bytes()


def test_get_head_conditional_and_http10_keepalive(server):
    data = exchange(server.port, CLOSING_GET)
    head, _, body = data.partition(b"\r\n\r\n")
    assert status_of(data) == 200 and body == (WWW / "page.html").read_bytes()
    assert b"Content-Type: text/html; charset=utf-8" in head and b"Date: " in head
    etag = re.search(rb"ETag: (\S+)", head).group(1)
    head_only = exchange(server.port, b"HEAD /page.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert head_only.endswith(b"\r\n\r\n") and b"Content-Length: %d" % len(body) in head_only
    not_modified = exchange(server.port, b"GET /page.html HTTP/1.1\r\nHost: t\r\nIf-None-Match: %s\r\n"
                                         b"Connection: close\r\n\r\n" % etag)
    assert status_of(not_modified) == 304
    # RFC 9110 8.6: a 304 has no Content-Length but the 200's (lb.py said 0)
    assert b"Content-Length" not in not_modified or b"Content-Length: %d\r\n" % len(body) in not_modified
    css = exchange(server.port, b"GET /style.css HTTP/1.0\r\n\r\n")
    assert b"Content-Type: text/css" in css and b"Connection: close" in css
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        heads: list[bytes] = []
        for _ in range(3):  # ab -k: HTTP/1.0 with Connection: keep-alive, one connection
            s.sendall(HTTP10_KEEPALIVE)
            # (Read by its Content-Length: a loop that stopped once it had the head and
            # as many bytes as the body could stop inside a body that came in pieces.)
            assert read_answers(s, 1, time.monotonic() + 20, heads) == [(200, len(body))]
        assert all(b"Connection: keep-alive" in head for head in heads), heads


def _ranged(port: int, spec: bytes, extra: bytes = b"") -> tuple[int, bytes, bytes]:
    data = exchange(port, b"GET /page.html HTTP/1.1\r\nHost: t\r\nRange: %s\r\n%sConnection: close\r\n\r\n"
                    % (spec, extra))
    head, _, body = data.partition(b"\r\n\r\n")
    return status_of(data), head, body


def test_one_byte_range_is_served_as_206_and_a_range_past_the_end_as_416(server):
    page = (WWW / "page.html").read_bytes()
    size = len(page)
    whole = exchange(server.port, CLOSING_GET)
    assert b"Accept-Ranges: bytes" in whole
    etag = re.search(rb"ETag: (\S+)", whole).group(1)
    for spec, first, last in ((b"bytes=10-19", 10, 19), (b"bytes=-5", size - 5, size - 1),
                              (b"bytes=1660-", 1660, size - 1), (b"bytes=0-999999", 0, size - 1)):
        status, head, body = _ranged(server.port, spec)
        assert status == 206, spec
        assert body == page[first:last + 1]
        assert b"Content-Range: bytes %d-%d/%d\r\n" % (first, last, size) in head + b"\r\n"
        assert b"Content-Length: %d\r\n" % (last - first + 1) in head + b"\r\n"
    status, head, _ = _ranged(server.port, b"bytes=%d-" % size)
    assert status == 416 and b"Content-Range: bytes */%d" % size in head
    # Served whole (200): several ranges, a unit or a syntax not understood, a stale If-Range.
    for spec, extra in ((b"bytes=0-1,5-6", b""), (b"items=0-1", b""), (b"bytes=9-2", b""),
                        (b"bytes=0-1", b'If-Range: "not-the-etag"\r\n')):
        status, _, body = _ranged(server.port, spec, extra)
        assert (status, body) == (200, page), spec
    status, _, body = _ranged(server.port, b"bytes=0-1", b"If-Range: %s\r\n" % etag)
    assert (status, body) == (206, page[:2])


@pytest.mark.parametrize("header, size, span", [
    (b"bytes=0-0", 100, (0, 0)), (b"bytes=99-", 100, (99, 99)), (b"bytes= 3 - 4 ", 100, (3, 4)),
    (b"BYTES=1-2", 100, (1, 2)), (b"bytes=-99999", 100, (0, 99)), (b"bytes=100-", 100, (-1, -1)),
    (b"bytes=-0", 100, (-1, -1)), (b"bytes=-1", 0, (-1, -1)), (b"bytes=-", 100, None),
    (b"bytes=a-b", 100, None), (b"bytes=1-2,3-4", 100, None), (b"bytes=10-5", 100, None), (None, 100, None),
    (b"bytes=1" + b"0" * 30 + b"-", 100, None)])
def test_range_header_parsing(header, size, span):
    from clusterkit.http.ranges import wanted
    assert wanted(header, size) == span


def test_pipelined_requests_are_answered_in_order(server):
    raw = (b"GET /style.css HTTP/1.1\r\nHost: t\r\n\r\n" + b"GET /cluster.svg HTTP/1.1\r\nHost: t\r\n\r\n"
           + b"GET /page.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    data = exchange(server.port, raw)
    types = re.findall(rb"Content-Type: ([a-z/+]+)", data)
    assert types == [b"text/css", b"image/svg+xml", b"text/html"]


@pytest.mark.parametrize("target", ["Server_async_http.py", "Server_thread_http.py", "lb.py"])
def test_an_error_answer_is_not_lost_to_a_reset_and_a_file_is_no_directory(setup, target):
    """A 414 with unread bytes behind it: the server reads them away after its
    answer (lingering close, as nginx) instead of closing on them, which reset the
    connection, sometimes before the answer was read. And /page.html/ is 404 as
    in nginx (it was 200)."""
    server = setup.lb(1) if target == "lb.py" else setup.server(target)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # ConnectionResetError here on the old code
            data += chunk
    assert status_of(data) == 414
    assert status_of(exchange(server.port, b"GET /page.html/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")) \
        == 404


@pytest.mark.parametrize("target", ["Server_async_http.py", "Server_thread_http.py", "lb.py"])
def test_a_post_waiting_on_100_continue_gets_its_405_before_sending_the_body(setup, target):
    """As nginx: the 405 comes with the head; the body is never asked for (it waited for it)."""
    server = setup.lb(1) if target == "lb.py" else setup.server(target)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /page.html HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
        s.settimeout(5)  # generous: the old code answered only once the body was in (never, here)
        head = s.recv(65536)
    assert status_of(head) == 405 and b"Allow: GET, HEAD" in head, head[:200]


def _statuses(port: int, raw: bytes) -> list[bytes]:
    """The status of every answer to ``raw``, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return _statuses_in(data)


@pytest.mark.parametrize("target", ["Server_async_http.py", "Server_thread_http.py", "lb.py"])
def test_a_pipelined_batch_is_answered_as_far_as_it_is_good(setup, target):
    """As nginx and HAProxy do: the requests before a bad one are answered, in
    order, then the error and the close; bytes after a request that closes the
    connection are ignored, not an error (both failed on the old parser, which
    answered such a batch with a lone 400)."""
    srv = setup.lb(2) if target == "lb.py" else setup.server(target)
    get = b"GET /style.css HTTP/1.1\r\nHost: t\r\n\r\n"
    missing = b"GET /nothing-here HTTP/1.1\r\nHost: t\r\n\r\n"
    assert _statuses(srv.port, get + missing + GARBAGE) == [b"200", b"404", b"400"]
    assert _statuses(srv.port, get + b"GET /x HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n") \
        == [b"200", b"400"]
    closing = b"GET /style.css HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    assert _statuses(srv.port, get + closing + get) == [b"200", b"200"]
    http10 = b"GET /style.css HTTP/1.0\r\n\r\n"
    assert _statuses(srv.port, HTTP10_KEEPALIVE + http10 + GARBAGE) == [b"200", b"200"]


def test_slowloris_is_timed_out_while_others_are_served(server):
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    started = time.monotonic()
    got = b""
    try:
        for byte in b"GET /page.html HTTP/1.1\r\nHost: slow\r\nX-Trickle: " + b"z" * 400:
            if select.select([slow], [], [], 0)[0]:
                break  # the server answered: stop trickling, read it
            slow.sendall(bytes([byte]))
            fine = exchange(server.port, CLOSING_GET)
            assert status_of(fine) == 200
            time.sleep(0.05)
            assert time.monotonic() - started < 30, "the slow client was never timed out"
        slow.settimeout(10)
        while chunk := slow.recv(4096):
            got += chunk
    finally:
        slow.close()
    assert b" 408 " in got.split(b"\r\n")[0]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian's chromium package)")
@pytest.mark.parametrize("target", ["Server_async_http.py", "Server_thread_http.py", "lb.py"])
def test_a_client_that_never_reads_is_pushed_back_then_dropped(setup, target):
    """Pipelined GETs, answers never read: the server stops reading (its memory
    stays bounded), serves others, and drops the client after the keep-alive
    timeout (nginx's send_timeout) instead of holding its buffers for ever."""
    args = ("--keepalive-timeout", "1", "--header-timeout", "1")
    proc = setup.lb(1, *args) if target == "lb.py" else setup.server(target, *args)
    rss_before = psutil.Process(proc.pid).memory_info().rss
    s = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(0.5)
    burst = SIMPLE_GET * 500
    sent, pushed_back = 0, False
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        try:
            sent += s.send(burst)
        except TimeoutError:
            pushed_back = True
            break
    assert pushed_back, f"{sent} bytes of requests taken in 8 s without pushing back"
    assert psutil.Process(proc.pid).memory_info().rss - rss_before < 40 << 20
    assert status_of(exchange(proc.port, CLOSING_GET)) == 200
    # Still not reading: the server must drop the connection (a reset shows on our
    # side as a failed send) well within this bound, not keep it for ever.
    deadline = time.monotonic() + 30
    s.settimeout(0.2)
    with pytest.raises(ConnectionError):
        while time.monotonic() < deadline:
            try:
                s.send(b"x")
            except TimeoutError:
                time.sleep(0.2)
    s.close()


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


def test_port_taken_is_one_clear_line(setup):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for script in ("Server_async_http.py", "Server_thread_http.py", "lb.py"):
            proc = subprocess.run(cluster.python_script(f"http_servers/{script}", "--port", str(port),
                                                        "--log-dir", setup.log_dir),
                                  capture_output=True, text=True, timeout=30)
            assert proc.returncode == 71, (script, proc.stderr)
            assert "in use" in proc.stderr and "Traceback" not in proc.stderr


def test_threaded_pool_and_sigterm(setup):
    srv = setup.server("Server_thread_http.py", "--pool", "4")
    assert status_of(exchange(srv.port, b"GET / HTTP/1.0\r\n\r\n")) == 200
    srv.signal(signal.SIGTERM)
    assert srv.wait(timeout=15) == 0


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
    setup.wait_log('event=backend-down backend=backend2 reason="check timeout"')


def test_backend_that_does_not_answer_in_time_is_taken_out_and_the_get_retried(setup):
    """No answer within --response-timeout: as nginx's proxy_next_upstream, the
    backend is marked down and the idempotent request goes to the next one."""
    _gets_with_backend2_stopped(setup, 4, "--response-timeout", "1", "--check-interval", "60")  # no checks
    setup.wait_log('event=backend-down backend=backend2 reason=response-timeout')


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
        setup.wait_log('event=backend-down backend=stuck reason="connect-timeout (3 in a row)"')
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


@pytest.mark.parametrize("script, args, message", [
    ("lb.py", ["--response-timeout", "-1"], "argument --response-timeout: must be positive"),
    ("lb.py", ["--response-timeout", "nan"], "argument --response-timeout: must be positive"),
    ("lb.py", ["--check-interval", "0"], "argument --check-interval: must be positive"),
    ("lb.py", ["--check-interval", "inf"], "argument --check-interval: must be positive, at most a year"),
    ("lb.py", ["--header-timeout", "4e7"], "argument --header-timeout: must be positive, at most a year"),
    ("lb.py", ["--pool-size", "-1"], "argument --pool-size: must be 0 or more"),
    ("lb.py", ["--connect-timeout", "0"], "argument --connect-timeout: must be positive"),
    ("lb.py", ["--drain-timeout", "nan"], "argument --drain-timeout: must be 0 or more"),
    ("Server_async_http.py", ["--header-timeout", "-1"], "argument --header-timeout: must be positive"),
    ("Server_thread_http.py", ["--keepalive-timeout", "0"], "argument --keepalive-timeout: must be positive"),
    ("async_server.py", ["9999", "--keepalive-timeout", "nan"], "argument --keepalive-timeout: must be positive"),
    ("lb.py", ["--port", "44470", "--admin-port", "44470"], "--admin-port 44470 is lb.py's own --port"),
    ("lb.py", ["--backend", "127.0.0.1:9002", "--backend", "[::1]:9002"], "backend1 given twice"),
    ("async_server.py", ["9999", "--port", "9998"], "give one of them"),
    ("Server_thread_http.py", ["--header-timeout", "1e300"],
     "argument --header-timeout: must be positive, at most a year"),
    ("Server_thread_http.py", ["--pool", "5000"], "--pool must be between 0 and 4,096"),
    ("Server_async_http.py", ["--name", "x\r\nSet-Cookie: a=1"], "printable ASCII, no spaces"),
    ("async_server.py", ["9999", "--name", "my backend"], "printable ASCII, no spaces"),
])
def test_bad_settings_are_one_clear_line_and_exit_2(script, args, message, log_dir):
    """A negative header timeout made every request in pieces a dropped connection;
    one of 1e300 s every connection's thread die (struct.error); --pool 100000 a
    traceback 8 s after "listening"; a --name with CR LF a header of its own. A bad
    timing flag is argparse's error, with the usage, as the other programs' are (four
    took any float, refused only by the config's check, without the usage)."""
    bad = subprocess.run(cluster.python_script(f"http_servers/{script}", *args, "--log-dir", str(log_dir)),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


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
        server.sock.close()


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
        server.sock.close()


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
        assert _statuses_in(data) == [b"200"] and data.endswith(b"final\n"), data[:300]
        data = exchange(lb.port, b"GET /moved HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 302 Found Elsewhere\r\n") and b"Location: /page.html" in data
        assert "backend-down" not in setup.log()


def _answers_in_turn(answers: list[bytes]):
    """A backend whose answers to the requests (but /healthz) are ``answers``, in turn."""
    turn = itertools.count()

    def answer(conn: socket.socket) -> None:
        for head in _read_requests(conn):
            conn.sendall(_ok(b"ok\n") if b" /healthz " in head else answers[next(turn) % len(answers)])
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


def test_each_client_gets_its_own_version_and_connection_mode_when_the_answer_repeats(server):
    """The same answer, given again to clients that speak HTTP/1.1, HTTP/1.0 with
    keep-alive and HTTP/1.0 without, and to a HEAD (lb.py keeps the bytes a client
    got for its backend's last answer): each gets its own status line, Connection
    header, and a body only for a GET."""
    lb = server
    for _ in range(2):
        for raw, first_line, connection in (
                (SIMPLE_GET, b"HTTP/1.1 200 OK", None),  # each differs from the one before in one way
                (CLOSING_GET, b"HTTP/1.1 200 OK", b"Connection: close"),
                (b"GET /page.html HTTP/1.0\r\n\r\n", b"HTTP/1.1 200 OK", b"Connection: close"),
                (HTTP10_KEEPALIVE, b"HTTP/1.1 200 OK", b"Connection: keep-alive")):
            data = exchange(lb.port, raw)
            head = data.partition(b"\r\n\r\n")[0]
            assert head.startswith(first_line + b"\r\n"), (raw, head)
            if connection:
                assert connection in head, (raw, head)
            assert data.endswith((WWW / "page.html").read_bytes())
        head_only = exchange(lb.port, b"HEAD /page.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert head_only.endswith(b"\r\n\r\n") and b"<html" not in head_only
        assert b"\r\nContent-Length: %d\r\n" % len((WWW / "page.html").read_bytes()) in head_only, head_only


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


def _read_requests(conn: socket.socket):
    """The request heads on a connection, one by one (the health checks' too)."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        yield head


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _answer_twice(conn: socket.socket) -> None:
    """Each request answered with its own path and, in the same write, an answer nobody asked for."""
    for head in _read_requests(conn):
        conn.sendall(_ok(head.split(b" ")[1]) + b"HTTP/1.1 200 OK\r\nX-Unasked: yes\r\nContent-Length: 2\r\n\r\nno")


def _answer_slowly_or_oddly(conn: socket.socket) -> None:
    """/slow: 10 pieces, 0.15 s apart; /upgrade: a 101 nobody asked for; /healthz: a
    70 KB status line the first three times; anything else: 200."""
    for head in _read_requests(conn):
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
            conn.sendall(_ok(b"ok\n"))


_odd_checks: list[int] = []


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
    assert _statuses_in(data) == [b"200", b"200"], data[:300]
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
    for head in _read_requests(conn):
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
            conn.sendall(_ok(b"ok\n"))


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


def _statuses_in(data: bytes) -> list[bytes]:
    return re.findall(rb"^HTTP/1\.[01] (\d+) ", data, re.MULTILINE)


def _free_offset() -> int:
    """An offset that makes every default HTTP port free (so the test never uses the defaults).

    Where it can, it lifts 44444..46000 above Linux's ephemeral range: up starts seven
    servers one after the other, and in between a connection of a test running beside
    this one could take a port in that range as its local port (lb.py once could not
    listen on 44582: "the port is already in use")."""
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    above = range(high + 1 - 44444, 65535 - 46000 + 1)  # every port above the range (and 9002.. below it)
    beside = os.getpid() % 37  # two workers looking at once start at different places
    candidates = [*above[beside::37], *range(101 + beside, 1500, 37)]
    for offset in candidates:
        ports = [p + offset for p in (9002, 9003, 9004, 9005, 44444, 45000, 46000)]
        try:
            socks = []
            for p in ports:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return offset
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.skip("no free set of ports found")


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_up_starts_everything_and_one_signal_stops_it_all(procs, log_dir):
    """$CLUSTERKIT_LOG_DIR moves its logs as every program's (it wrote to logs/). A
    backend killed (to watch lb.py fail over) no longer stops everything."""
    offset = _free_offset()
    up = procs.start(cluster.Process("up", [sys.executable, "-m", "clusterkit.http", "up", "--offset", str(offset)],
                                     port=44444 + offset, env={"CLUSTERKIT_LOG_DIR": str(log_dir)}), wait=30)
    for port in (9002, 9005, 45000, 46000):
        cluster.wait_listening("127.0.0.1", port + offset, 30)
    children = psutil.Process(up.pid).children()
    assert len(children) == 7
    assert status_of(exchange(44444 + offset, b"GET /page.html HTTP/1.0\r\n\r\n")) == 200
    deadline = time.monotonic() + 10
    while " lb event=request " not in _read(log_dir / "server_log.log"):
        assert time.monotonic() < deadline, "the lb's request line never reached $CLUSTERKIT_LOG_DIR"
        time.sleep(0.05)
    backend2 = next(c for c in children if "backend2" in c.cmdline())
    backend2.kill()
    backend2.wait(10)
    for _ in range(8):  # each of them, backend2's turn included, answered by another backend
        assert status_of(exchange(44444 + offset, b"GET /page.html HTTP/1.0\r\n\r\n")) == 200
    deadline = time.monotonic() + 10  # up's watch (twice a second) sees backend2 gone
    while "warning: backend2 exited" not in up.stderr():
        assert up.alive() and time.monotonic() < deadline, up.stderr()
        time.sleep(0.05)
    time.sleep(0.5)  # and goes on watching: it did not stop everything
    assert up.alive(), up.stderr()
    up.signal(signal.SIGINT)
    assert up.wait(timeout=30) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


@pytest.mark.parametrize("held", ["listening", "bound"])
def test_up_with_a_port_taken_by_another_program_says_so_and_starts_nothing(procs, log_dir, held):
    """``listening``: each server found its port open (the other program's) and was
    taken for ready: up said it was running, then that everything had exited (exit
    1). ``bound``: a port not listened on but still bound (a connection's local
    port, as TIME_WAIT holds them after a load test): up passed on the server's
    reason as a quoted string, with '\\n' in it, after a line of its own wrapper."""
    offset = _free_offset()
    if held == "listening":
        holder = socket.create_server(("127.0.0.1", 45000 + offset))
    else:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 46000 + offset))  # bound, not listening: the servers before it start
    try:
        # (procs stops it with SIGTERM, which up passes on to what it started, should it start anything)
        up = procs.start(cluster.Process("up", [sys.executable, "-m", "clusterkit.http", "up", "--offset",
                                                str(offset)], env={"CLUSTERKIT_LOG_DIR": str(log_dir)}))
        assert up.wait(timeout=60) == 71, up.stderr()
    finally:
        holder.close()
    said = up.stderr().strip().splitlines()
    if held == "listening":
        assert f"port {45000 + offset} is in use" in up.stderr()
    else:
        assert said[-1].startswith(f"error: http-threaded: cannot listen on 127.0.0.1:{46000 + offset}: "), said
        assert "stderr:" not in up.stderr() and "\\n" not in up.stderr()


@pytest.mark.parametrize("offset", ["-20000", "30000"])
def test_up_with_an_offset_that_leaves_the_port_range_is_a_usage_error(offset, log_dir):
    """The first server said 'not a port number: -10998' in its own usage error, and
    up called it a server that did not start (exit 71)."""
    proc = subprocess.run([sys.executable, "-m", "clusterkit.http", "up", "--offset", offset, "--log-dir",
                           str(log_dir)], cwd=cluster.ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert f"--offset {offset}: the ports would be" in proc.stderr and "not all within 1-65535" in proc.stderr


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


def test_every_http_program_serves_on_ipv6_loopback(setup):
    """--host ::1 on both servers, and lb.py over a backend given as [::1]:PORT."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        ports = [cluster.free_port("::1") for _ in range(4)]
    except OSError:
        pytest.skip("no ::1 on this machine")
    args = ("--host", "::1", "--log-dir", setup.log_dir)
    procs = [setup.procs.start(cluster.Process(script, cluster.python_script(
        f"http_servers/{script}", "--port", str(port), *args), port=port, host="::1"))
        for script, port in (("Server_async_http.py", ports[0]), ("Server_thread_http.py", ports[1]))]
    procs.append(setup.procs.start(cluster.Process("backend1", cluster.python_script(
        "http_servers/async_server.py", str(ports[2]), "--name", "backend1", *args), port=ports[2], host="::1")))
    procs.append(setup.procs.start(cluster.Process("lb", cluster.python_script(
        "http_servers/lb.py", "--port", str(ports[3]), "--backend", f"[::1]:{ports[2]}", *args),
        port=ports[3], host="::1")))
    for proc in procs:
        data = exchange(proc.port, b"GET /page.html HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n",
                        host="::1")
        assert status_of(data) == 200, (proc.name, data[:200])


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
                                   "--backend", "127.0.0.1:9100"])
    assert [b.name for b in proxy_config(args).backends] == ["backend1", "b", "backend-9100"]
    (tmp_path / "lb.toml").write_text("[[backends]]\nport = 9003\n[[backends]]\nport = 9101\n")
    args = lb_parser().parse_args(["--config", str(tmp_path / "lb.toml")])
    assert [b.name for b in proxy_config(args).backends] == ["backend2", "backend-9101"]


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


def read_answers(s: socket.socket, count: int, deadline: float,
                 heads: list[bytes] | None = None) -> list[tuple[int, int]]:
    """(status, body length) of ``count`` answers to GETs, read off ``s`` in order;
    their heads go to ``heads`` if given."""
    data = b""
    answers = []
    while len(answers) < count:
        head, done, rest = data.partition(b"\r\n\r\n")
        length = re.search(rb"Content-Length: (\d+)", head) if done else None
        if length and len(rest) >= int(length.group(1)):
            answers.append((status_of(head), int(length.group(1))))
            if heads is not None:
                heads.append(head)
            data = rest[int(length.group(1)):]
            continue
        assert time.monotonic() < deadline, (len(answers), data[:200])
        chunk = s.recv(1 << 20)
        assert chunk, f"closed after {len(answers)} answers"
        data += chunk
    return answers


@pytest.mark.parametrize("script", ["Server_async_http.py", "Server_thread_http.py"])
def test_pipelined_requests_for_a_big_file_are_answered_a_budget_at_a_time(setup, tmp_path, script):
    """60 pipelined GETs of a 1 MB file, 2 KB of requests, were answered into one
    60 MB buffer at once (an audit took a server to 1 GB with 7 KB of requests):
    now the answers are made as the client takes them, still all in order, and a
    bad request after them is answered after them."""
    (tmp_path / "big.bin").write_bytes(os.urandom(1 << 20))
    server = setup.server(script, "--root", str(tmp_path))
    rss = psutil.Process(server.pid)
    before = rss.memory_info().rss
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n" * 60 + b"BAD\r\n\r\n")
        time.sleep(1.0)  # not reading: what the server holds now is what it made ahead
        grown = rss.memory_info().rss - before
        answers = read_answers(s, 61, time.monotonic() + 60)
    assert answers == [(200, 1 << 20)] * 60 + [(400, answers[-1][1])]
    assert grown < 30 << 20, f"the server grew by {grown >> 20} MB"


@pytest.mark.parametrize("script", ["Server_async_http.py", "Server_thread_http.py"])
def test_what_a_browser_needs_of_files_folders_and_odd_methods(setup, tmp_path, script):
    """Found with Chromium: a Latin-1 page (its own <meta charset>) came garbled, as the
    header said charset=utf-8; page.html.gz was labelled text/html and shown as
    bytes; /docs served its page, whose style.css then resolved to /style.css (nginx
    answers 301 to /docs/). And a method the parser does not know (FOO) was a bare 400."""
    (tmp_path / "page.html").write_text("<p>caf\u00e9</p>", encoding="utf-8")
    (tmp_path / "latin.html").write_bytes(b'<meta charset="iso-8859-1"><p>caf\xe9</p>')
    (tmp_path / "page.html.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 20)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.html").write_text("<link rel=stylesheet href=style.css>")
    (tmp_path / "empty").mkdir()
    server = setup.server(script, "--root", str(tmp_path))

    def get(target: bytes, method: bytes = b"GET") -> bytes:
        return exchange(server.port, b"%s %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % (method, target))

    assert b"\r\nContent-Type: text/html; charset=utf-8\r\n" in get(b"/page.html")
    assert b"\r\nContent-Type: text/html\r\n" in get(b"/latin.html")
    assert b"\r\nContent-Type: application/gzip\r\n" in get(b"/page.html.gz")
    for target, location in ((b"/docs", b"/docs/"), (b"/docs?v=2", b"/docs/?v=2"), (b"//docs", b"/docs/")):
        answer = get(target)
        assert status_of(answer) == 301 and b"\r\nLocation: %s\r\n" % location in answer, answer[:300]
    assert status_of(get(b"/docs/")) == 200 and b"style.css" in get(b"/docs/")
    assert status_of(get(b"/empty")) == 404 and status_of(get(b"/page.html/")) == 404
    unknown = get(b"/page.html", b"FOO")
    assert status_of(unknown) == 405 and b"\r\nAllow: GET, HEAD\r\n" in unknown
    assert status_of(exchange(server.port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40)) == 400
    # A client's bad requests are its own fault, as a 404 is: info, not warnings (a
    # flood of them was a flood of warnings at --log-level warning).
    log_file = Path(setup.log_dir) / "server_log.log"
    deadline = time.monotonic() + 15
    while len(refused := [x for x in log_file.read_text().splitlines() if "event=refused" in x]) < 2:
        assert time.monotonic() < deadline, refused
        time.sleep(0.05)
    assert all(" INFO " in line for line in refused), refused


def test_one_copy_of_a_file_however_its_path_is_spelled(tmp_path):
    """/big.bin, //big.bin and /%62ig.bin each held their own copy of the file, never
    let go (an audit: +570 MB from 200 HEADs of a 3 MB file); and the cache's bytes
    are bounded."""
    from clusterkit.http.static import StaticFiles

    (tmp_path / "big.bin").write_bytes(b"b" * 1000)
    (tmp_path / "other.bin").write_bytes(b"o" * 1000)
    files = StaticFiles(tmp_path, max_cache_bytes=1500)
    first = files.lookup(b"/big.bin")
    assert first is not None
    assert all(files.lookup(p) is first for p in (b"//big.bin", b"/./big.bin", b"/%62ig.bin"))
    assert files.lookup(b"/other.bin").body == b"o" * 1000
    assert files.cached_bytes <= 1500 and len(files.files) == 1
    assert files.lookup(b"/big.bin").body == b"b" * 1000
    changed = tmp_path / "other.bin"  # changed: the old copy goes under every spelling
    changed.write_bytes(b"O" * 900)
    for spelling in (b"/other.bin", b"//other.bin"):
        files.lookup(spelling).checked -= 2  # (as if a second had passed)
    assert files.lookup(b"/other.bin").body == b"O" * 900
    assert all(e.body != b"o" * 1000 for e in files.cache.values()) and files.cached_bytes <= 1500
    assert files.cached_bytes == sum(e.size for e in files.files.values())
    files.lookup(b"/big.bin")
    (tmp_path / "big.bin").unlink()  # gone: its copy goes too, once the path is looked at again
    files.lookup(b"/big.bin").checked -= 2  # (as if a second had passed)
    assert files.lookup(b"/big.bin") is None and all(p.name != "big.bin" for p in files.files)
    assert files.cached_bytes == sum(e.size for e in files.files.values())


def test_a_client_that_reads_slowly_but_reads_gets_the_whole_file(setup, tmp_path):
    """The async server cut off a client that took its answer more slowly than it
    came, --keepalive-timeout after its buffer filled, though it kept reading (an
    audit: 4.9 of 7.5 MB, and a clean close). As nginx's send_timeout, the clock now
    runs only while the client takes nothing."""
    size = (8 << 20) - 1024  # (the largest file served): it stays paused for seconds,
    (tmp_path / "big.bin").write_bytes(os.urandom(size))  # taken in steps of about a second
    server = setup.server("Server_async_http.py", "--root", str(tmp_path), "--keepalive-timeout", "1.2")
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        s.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 60
        while chunk := s.recv(65536):
            data += chunk
            time.sleep(0.03)  # about 2 MB/s: well under what the server sends
            assert time.monotonic() < deadline
    assert len(data.partition(b"\r\n\r\n")[2]) == size


def test_a_408_carries_the_time_it_is_sent(setup):
    """The async server's 408 was made at import: its Date was the server's start."""
    server = setup.server("Server_async_http.py", "--header-timeout", "0.5")
    time.sleep(2.0)
    asked = time.time()
    answer = exchange(server.port, b"GET /page.html HTTP/1.1\r\n")
    assert status_of(answer) == 408
    date = re.search(rb"Date: ([^\r]+)", answer).group(1).decode()
    assert email.utils.parsedate_to_datetime(date).timestamp() >= int(asked) - 1


@pytest.mark.parametrize("script", ["Server_async_http.py", "Server_thread_http.py", "lb.py"])
def test_expect_100_continue_is_answered_at_once(setup, script):
    """curl waited a second for its body's go-ahead (nginx says 100 Continue at once)."""
    server = setup.lb(1) if script == "lb.py" else setup.server(script)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /page.html HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        data = b""
        while b"</html>" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert status_of(data) == 200


def test_an_if_modified_since_in_the_future_is_no_date(setup):
    """A date after the server's clock got 304 (RFC 9110 13.1.3: ignore it; nginx: 200)."""
    server = setup.server("Server_async_http.py")
    future = exchange(server.port, b"GET /page.html HTTP/1.0\r\nIf-Modified-Since: Tue, 01 Jan 2030 00:00:00 GMT"
                                   b"\r\n\r\n")
    now = email.utils.formatdate(time.time(), usegmt=True).encode()
    recent = exchange(server.port, b"GET /page.html HTTP/1.0\r\nIf-Modified-Since: %s\r\n\r\n" % now)
    assert (status_of(future), status_of(recent)) == (200, 304)


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


def test_absolute_form_targets_are_served_and_targets_without_a_path_refused(server):
    """'GET http://x' (no path) and targets httptools cannot take apart ('http://x:abc/')
    raised while the batch was answered: the connection closed without a word and
    the answers before them in the batch were lost; lb.py took that silence for a
    dead backend and marked every backend down, one after the other."""
    good = b"GET /page.html HTTP/1.1\r\nHost: t\r\n\r\n"
    absolute = [b"GET http://x HTTP/1.1\r\nHost: t\r\n\r\n",
                b"GET http://x:45/page.html?q=1 HTTP/1.1\r\nHost: t\r\n\r\n",
                b"HEAD HTTP://[::1]:8/ HTTP/1.1\r\nHost: t\r\n\r\n"]
    data = send_all_then_read(server.port, good + b"".join(absolute)
                              + b"GET http://x:abc/ HTTP/1.1\r\nHost: t\r\n\r\n")
    assert re.findall(rb"HTTP/1.1 (\d+) ", data) == [b"200", b"200", b"200", b"200", b"400"], data[-300:]
    for target in (b"http://", b"http:///a", b"ftp://x/page.html", b"x/page.html", b"http://x:99999/a"):
        data = send_all_then_read(server.port, good + b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target)
        assert re.findall(rb"HTTP/1.1 (\d+) ", data) == [b"200", b"400"], (target, data[-300:])
    assert status_of(exchange(server.port, CLOSING_GET)) == 200  # (lb.py: its backends are still up)


def test_an_if_modified_since_past_the_year_9999_is_no_date(server):
    """It overflowed the date parser: the connection closed with no answer."""
    data = exchange(server.port, b"GET /page.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                                 b"If-Modified-Since: Fri, 27 Nov 99999999999 05:11:20 GMT\r\n\r\n")
    assert status_of(data) == 200 and data.endswith((WWW / "page.html").read_bytes())


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
    ab = subprocess.run(["ab", "-k", "-n", "2000", "-c", "6", f"http://127.0.0.1:{server.port}/page.html"],
                        capture_output=True, text=True, timeout=90)
    assert ab.returncode == 0, ab.stderr
    assert re.search(r"Failed requests:\s+0\b", ab.stdout), ab.stdout
    assert re.search(r"Keep-Alive requests:\s+2000\b", ab.stdout), ab.stdout



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
        ab = subprocess.run(["ab", "-k", "-n", "300", "-c", "100", f"http://127.0.0.1:{server.port}/page.html"],
                            capture_output=True, text=True, timeout=60)
        assert ab.returncode == 0, ab.stderr
        assert re.search(r"Failed requests:\s+0\b", ab.stdout), ab.stdout
        assert re.search(r"Keep-Alive requests:\s+300\b", ab.stdout), ab.stdout


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


@pytest.mark.parametrize("seventh", [b"", b"GET /big.bin HTTP/1.1\r\nHost: t\r\n"])
def test_answers_on_their_way_are_not_overtaken_by_a_408_or_an_idle_close(setup, tmp_path, seventh):
    """While pipelined answers went out to a client reading slowly but steadily, the
    async server's sweep judged the client by when it last sent: a head it had begun
    got a 408 in place of the answers still waiting their turn, or the keep-alive
    timeout closed the connection on them. (What becomes of the begun head after
    them is the header timeout's to say.)"""
    (tmp_path / "big.bin").write_bytes(os.urandom(1 << 20))
    # (Timeouts above the steps, of about a second, in which uvloop hands answers to the kernel.)
    server = setup.server("Server_async_http.py", "--root", str(tmp_path), "--header-timeout", "2.5",
                          "--keepalive-timeout", "2.5")
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n" * 12 + seventh)
        data = b""
        deadline = time.monotonic() + 60
        while len(data) < 12 * (1 << 20):  # (more than the kernel buffers: some wait their turn)
            chunk = s.recv(65536)
            if not chunk:
                break
            assert time.monotonic() < deadline
            data += chunk
            time.sleep(0.03)  # about 2 MB/s: 6 s for the twelve
    heads = re.findall(rb"HTTP/1.1 (\d+) ", data)
    assert heads[:12] == [b"200"] * 12 and len(data) >= 12 * (1 << 20), heads


@pytest.mark.parametrize("script", ["Server_async_http.py", "lb.py", "Server_thread_http.py"])
def test_past_the_open_files_limit_clients_get_503_not_a_bare_close(setup, log_dir, script):
    """Under an open-files limit of 64, clients past what the event loop could
    accept got a bare close and the log said nothing (uvloop closes them unseen)."""
    port = cluster.free_port()
    extra = ["--backend", f"backend1=127.0.0.1:{setup.backend('backend1').port}"] if script == "lb.py" else []
    proc = setup.procs.start(under_open_files_limit(script, f"http_servers/{script}", port,
                                                    "--log-dir", str(log_dir), *extra))
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    try:
        _, served = turned_away_or_in(socks, b"HTTP/1.1 503 ")
        for s in served:  # HTTP/1.0: the answer, then the close
            s.sendall(b"GET /page.html HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            assert status_of(answer) == 200 and answer.endswith(b"</html>\n"), answer[:200]
    finally:
        for s in socks:
            s.close()
    most = int(re.search(r"at most (\d+) clients at once \(the open-files limit allows no more\)",
                         proc.stderr()).group(1))
    # (The start's readiness probe, a connect and a close, may still hold its slot when the burst comes.)
    assert most - 1 <= len(served) <= most, (most, len(served))
    setup.wait_log("event=busy refused=")


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
        for s in kept:  # HTTP/1.0: the answer, then the close
            s.sendall(b"GET /page.html HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            assert status_of(answer) == 200 and answer.endswith(b"</html>\n"), answer[:200]
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
