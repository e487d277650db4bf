"""The HTTP servers as real processes, each behaviour on the async server, the
threaded one and lb.py in front of a backend where they share it: ApacheBench,
raw sockets for every error case, static files, ranges, pipelining and slow
or greedy clients."""

from __future__ import annotations

import email.utils
import os
import re
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from clusterkit import cluster

from .conftest import send_all_then_read, turned_away_or_in, under_open_files_limit
from .http_setup import (CHROMIUM, CLOSING_GET, GARBAGE, HAS_AB, HUGE_HEADERS, NO_HOST_11, POST, SIMPLE_GET, WWW,
                         apachebench, assert_page_then_close, exchange, read_answers, status_of, statuses_in)

pytestmark = pytest.mark.timeout(120)


HTTP10_KEEPALIVE = b"GET /page.html HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
HUGE_BODY = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n"
HTTP2_LINE = b"GET / HTTP/2.0\r\nHost: t\r\n\r\n"
CL_AND_TE = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
TWO_CL = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n"
TWO_HOSTS = b"GET /page.html HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
BARE_LF = b"GET /page.html HTTP/1.1\nHost: t\n\n"
H2C_UPGRADE = (b"GET /page.html HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
               b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")  # what curl --http2 sends
CONNECT = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01"


@pytest.mark.skipif(not HAS_AB, reason="ApacheBench (ab, Debian's apache2-utils) is not installed")
@pytest.mark.parametrize("target", ["Server_async_http.py", "Server_thread_http.py", "lb.py"])
@pytest.mark.parametrize("keepalive", [False, True])
def test_apachebench_1000_requests_all_complete(setup, target, keepalive):
    proc = setup.lb() if target == "lb.py" else setup.server(target)
    report = apachebench(f"http://127.0.0.1:{proc.port}/page.html", 1000, 10, keepalive)
    assert re.search(r"Complete requests:\s+1000\b", report)
    assert re.search(r"Failed requests:\s+0\b", report)
    assert "Non-2xx" not in report
    if keepalive:
        assert re.search(r"Keep-Alive requests:\s+1000\b", report)


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


def test_a_request_sent_after_a_closing_one_does_not_reset_the_answers_still_unread(server):
    """Pipelined requests, the last with Connection: close, answered more than the
    client has read yet; then one more request comes (it pipelines on). Closing at
    once on it reset the connection, and the kernel dropped the answers not yet
    sent (12 KB of 110 came). A lingering close, as nginx's for pipelined requests."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    s.settimeout(10)
    s.connect(("127.0.0.1", server.port))
    with s:
        s.sendall(SIMPLE_GET * 60 + CLOSING_GET)
        time.sleep(0.3)  # the answers are written; most wait in this machine's buffers
        s.sendall(SIMPLE_GET)
        time.sleep(0.3)
        data = b""
        while chunk := s.recv(65536):  # a reset raises here
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 61


def test_the_lingering_close_lets_a_slow_reader_take_the_whole_answer(setup, tmp_path):
    """Its clock ran from the closing answer's write: a client still reading the
    answers 2 s later was cut off, silently (12.5 of 16 MB, then the FIN)."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "big.bin").write_bytes(b"x" * 8_000_000)  # (the largest a server keeps in memory)
    server = setup.server("Server_async_http.py", "--root", str(root))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.settimeout(20)
    s.connect(("127.0.0.1", server.port))
    with s:
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /big.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        got = 0
        while chunk := s.recv(262144):
            got += len(chunk)
            time.sleep(len(chunk) / 2e6)  # 2 MB a second at most: 8 s for the two answers
    assert got > 16_000_000, got  # (both bodies, and their heads)


def test_an_http_1_2_request_is_served_as_1_1(server):
    data = exchange(server.port, b"GET /page.html HTTP/1.2\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert status_of(data) == 200 and data.startswith(b"HTTP/1.1 200 "), data[:100]


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


SMUGGLED = b"GET /style.css HTTP/1.1\r\nHost: smuggled\r\n\r\n"
UPGRADE_WITH_BODY = (b"GET /page.html HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(SMUGGLED))


@pytest.mark.parametrize("split", [False, True])
def test_the_body_of_an_ignored_upgrade_is_a_body_not_the_next_request(server, split):
    """llhttp ends an Upgrade request at its head: its Content-Length body was read
    as a request of its own (a smuggled /style.css, answered 200, and forwarded so
    by lb.py). nginx and RFC 9112 6.3: the body is a body. Also when it comes in a
    read of its own, and one chunked gets a 400 (nothing would find its end)."""
    after = b"GET /nothing-here HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        if split:
            s.sendall(UPGRADE_WITH_BODY + SMUGGLED[:10])
            time.sleep(0.1)
            s.sendall(SMUGGLED[10:])
            time.sleep(0.1)
            s.sendall(after)
        else:
            s.sendall(UPGRADE_WITH_BODY + SMUGGLED + after)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert statuses_in(data) == [b"200", b"404"], data[:400]
    assert b"text/css" not in data
    chunked = (b"GET /page.html HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED))
    assert statuses_in(exchange(server.port, chunked)) == [b"400"]


@pytest.mark.parametrize("raw, status", [
    (b"HEAD /page.html HTTP/1.1\r\n\r\n", 400),
    (b"HEAD /page.html HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"HEAD / HTTP/1.1\r\nHost: t\r\n" + b"X-Filler: " + b"a" * 40000 + b"\r\n\r\n", 431),
    (b"HEAD /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (b"HEAD / HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n", 413),
])
def test_an_error_answer_to_a_head_is_a_head_alone(server, raw, status):
    """RFC 9110 9.3.2: no content in an answer to HEAD, an error's either (nginx's
    have none); ours carried their one-line bodies, which a client reading the
    next answer takes for its start."""
    data = exchange(server.port, raw)
    assert status_of(data) == status, data[:200]
    assert data.endswith(b"\r\n\r\n") and data.count(b"\r\n\r\n") == 1, data[-100:]
    assert re.search(rb"Content-Length: [1-9]", data)  # (the length a GET's answer would have)


def test_chunked_trailer_fields_are_not_taken_for_header_fields(server):
    """RFC 9110 6.5.1: a trailer is not merged into the head (nginx ignores it). A
    trailer Range made a 206, and behind lb.py a trailer Host reached the backend
    as a second Host (a 400 for a request that was right). A trailer Connection:
    close is the one llhttp heeds (it reads nothing after it): the answer says
    close, and the connection closes, rather than leave the next request unread
    on a connection said to stay."""
    def chunked(trailer: bytes) -> bytes:
        # (If-None-Match: a head with a conditional field has its Range looked at)
        return (b"GET /page.html HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"nope\"\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n%s\r\n" % trailer)
    page = (WWW / "page.html").read_bytes()
    closing = b"GET /style.css HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    for trailer in (b"Range: bytes=0-9\r\n", b"Host: evil\r\n"):
        data = exchange(server.port, chunked(trailer) + closing)
        assert statuses_in(data) == [b"200", b"200"], (trailer, data[:300])
        assert page in data and b"text/css" in data
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(chunked(b"Connection: close\r\n") + closing)
        data = b""
        while chunk := s.recv(65536):  # (the close ends it: no timeout)
            data += chunk
    assert statuses_in(data) == [b"200"] and b"Connection: close" in data and data.endswith(page), data[:300]


def test_if_match_and_if_unmodified_since_that_fail_get_412(server):
    """RFC 9110 13.1.1-13.1.4, as nginx: If-Match compares strongly (a weak tag or
    another tag fails, * does not), If-Unmodified-Since fails for a file changed
    after it; either failing is a 412, before any If-None-Match or Range."""
    head = exchange(server.port, CLOSING_GET).partition(b"\r\n\r\n")[0]
    etag = re.search(rb"ETag: (\S+)", head).group(1)
    modified = email.utils.parsedate_to_datetime(re.search(rb"Last-Modified: ([^\r]+)", head).group(1).decode())
    before = email.utils.format_datetime(modified.replace(year=modified.year - 1), usegmt=True).encode()
    after = email.utils.format_datetime(modified.replace(year=modified.year + 1), usegmt=True).encode()

    def status(extra: bytes, method: bytes = b"GET") -> int:
        data = exchange(server.port, b"%s /page.html HTTP/1.1\r\nHost: t\r\n%sConnection: close\r\n\r\n"
                        % (method, extra))
        if method == b"HEAD":
            assert data.endswith(b"\r\n\r\n"), data[-80:]
        return status_of(data)

    assert status(b'If-Match: "nope"\r\n') == 412
    assert status(b'If-Match: "nope"\r\n', b"HEAD") == 412
    assert status(b"If-Match: W/%s\r\n" % etag) == 412
    assert status(b'If-Match: "nope", %s\r\n' % etag) == 200
    assert status(b"If-Match: *\r\n") == 200
    assert status(b'If-Match: "nope"\r\nIf-None-Match: %s\r\nRange: bytes=0-9\r\n' % etag) == 412
    assert status(b"If-Unmodified-Since: %s\r\n" % before) == 412
    assert status(b"If-Unmodified-Since: %s\r\n" % after) == 200
    assert status(b"If-Unmodified-Since: not a date\r\n") == 200
    assert status(b"If-Match: %s\r\nIf-Unmodified-Since: %s\r\n" % (etag, before)) == 200  # (If-Match decides)


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
    return statuses_in(data)


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
    ("lb.py", ["--backend", "a=127.0.0.1:9002", "--backend", "a=[::1]:9002"], "a given twice"),
    ("lb.py", ["--backend", "127.0.0.1:9100", "--backend", "127.0.0.1:9100"], "backend-9100 given twice"),
    ("lb.py", ["--backend", "a=::1:9002:2"], "expected [NAME=]HOST:PORT (no weight; an IPv6 address in brackets"),
    ("lb.py", ["--backend", "127.0.0.1:9002:2"], "expected [NAME=]HOST:PORT (no weight"),
    ("lb.py", ["--backend", "[::1]:9002:2"], "expected [NAME=]HOST:PORT (no weight"),
    ("lb.py", ["--backend", "[::1]9002"], "expected [NAME=]HOST:PORT"),
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
        for s in served:
            assert_page_then_close(s)
    finally:
        for s in socks:
            s.close()
    most = int(re.search(r"at most (\d+) clients at once \(the open-files limit allows no more\)",
                         proc.stderr()).group(1))
    # (The start's readiness probe, a connect and a close, may still hold its slot when the burst comes.)
    assert most - 1 <= len(served) <= most, (most, len(served))
    setup.wait_log("event=busy refused=")
