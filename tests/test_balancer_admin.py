"""Load_Balancer.py's admin port (/stats, /metrics), as real processes: it
answers, agrees with the traffic, and cannot take the balancer down."""

from __future__ import annotations

import socket
import time

import pytest

from clusterkit import cluster
from clusterkit.balancer import balancer_process

from .balancer_setup import FAST_CHECKS, cluster_with_few_files, one_message

pytestmark = pytest.mark.timeout(90)


def test_the_admin_port_cannot_take_the_balancer_down(procs, log_dir):
    """A never-ending request line on the admin port grew a buffer without bound and
    stalled the loop the traffic shares, and 120 idle admin connections took every
    descriptor, so the health checks failed (EMFILE) and marked every backend DOWN:
    clients got ERR no-backend. Now: 431 past 8 KiB, at most 32 admin connections,
    and a check that cannot be made here counts neither way. A scraper after the
    idle ones is served (it closes the oldest idle one; it used to get a 503), and
    it gets a 503 only when 32 connections have each begun a request."""
    admin_port = cluster.free_port()
    balancer = cluster_with_few_files(procs, log_dir, 100, *FAST_CHECKS, admin_port=admin_port)
    with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as s:
        try:
            s.sendall(b"GET /" + b"a" * 100_000)
        except OSError:
            pass  # closed on us after the 431
        assert s.recv(200).startswith(b"HTTP/1.1 431 ")
    idle = []
    for _ in range(120):
        try:
            idle.append(socket.create_connection(("127.0.0.1", admin_port), timeout=10))
        except OSError:
            pass
    try:
        time.sleep(2)  # ten rounds of checks
        assert one_message(balancer.port, b"still").startswith(b"REPLY server")
        log = (log_dir / "server_log.log").read_text()
        assert "backend-down" not in log
        with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as late:
            late.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            assert late.recv(200).startswith(b"HTTP/1.1 200 OK\r\nDate: ")
        for c in idle:
            c.close()
        idle = [socket.create_connection(("127.0.0.1", admin_port), timeout=10) for _ in range(32)]
        for c in idle:
            c.sendall(b"GET /sta")  # begun, never ended: none of them may be closed for another
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as late:  # (a reset said nothing)
            assert late.recv(200).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    finally:
        for c in idle:
            c.close()


def test_an_admin_post_gets_405_whatever_its_body(procs, log_dir):
    """A POST with a 20 kB body got 431 (its body counted as head), not 405; and a
    head past the limit still gets its 431 when it comes whole in one read."""
    ports = cluster.free_ports(3)
    procs.start(cluster.echo_server("server1", ports[0], log_dir=str(log_dir)))
    procs.start(balancer_process(ports[1], [f"server1=127.0.0.1:{ports[0]}"], admin_port=ports[2],
                                 log_dir=str(log_dir)))
    with socket.create_connection(("127.0.0.1", ports[2]), timeout=30) as s:
        s.sendall(b"POST /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n" + b"x" * 20000)
        head = s.recv(300)
    assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"\r\nAllow: GET, HEAD\r\n" in head
    with socket.create_connection(("127.0.0.1", ports[2]), timeout=30) as s:  # (chunks' framing is no head)
        s.sendall(b"POST /stats HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 2000)
        time.sleep(0.2)
        s.sendall(b"0\r\n\r\n")
        assert s.recv(300).startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    with socket.create_connection(("127.0.0.1", ports[2]), timeout=30) as s:  # a head past 8 KiB, whole in one go
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert s.recv(300).startswith(b"HTTP/1.1 431 ")


def test_an_unfinished_admin_request_gets_408_and_an_idle_admin_connection_is_closed(procs, log_dir):
    """The admin port dropped an unfinished request after 10 s without a word."""
    ports = cluster.free_ports(3)
    procs.start(cluster.echo_server("server1", ports[0], log_dir=str(log_dir)))
    procs.start(balancer_process(ports[1], [f"server1=127.0.0.1:{ports[0]}"], admin_port=ports[2],
                                 log_dir=str(log_dir)))
    admin_port = ports[2]
    with socket.create_connection(("127.0.0.1", admin_port), timeout=30) as begun, \
            socket.create_connection(("127.0.0.1", admin_port), timeout=30) as silent:
        begun.sendall(b"GET /sta")
        assert begun.recv(200).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert silent.recv(200) == b""


def test_an_admin_request_is_answered_whatever_is_pipelined_behind_it(procs, log_dir):
    """The admin port answers one request per connection. A second one in the same
    write made the first a 404 (its target was added to the first's: /stats/metrics),
    and a body said to be larger than 1 MiB waited 10 s for a 408: now the first is
    answered and the rest is not read, and the too large body is a 413 at once."""
    ports = cluster.free_ports(3)
    procs.start(cluster.echo_server("server1", ports[0], log_dir=str(log_dir)))
    procs.start(balancer_process(ports[1], [f"server1=127.0.0.1:{ports[0]}"], admin_port=ports[2],
                                 log_dir=str(log_dir)))

    def ask(raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", ports[2]), timeout=30) as s:
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):  # (the admin port closes after its answer)
                data += chunk
            return data

    both = ask(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert both.startswith(b"HTTP/1.1 200 OK\r\n") and b"application/json" in both and both.count(b"HTTP/1.1") == 1
    head_then_post = ask(b"HEAD /stats HTTP/1.1\r\nHost: x\r\n\r\nPOST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head_then_post.startswith(b"HTTP/1.1 200 OK\r\n") and head_then_post.endswith(b"\r\n\r\n")
    for method in (b"POST", b"GET"):
        started = time.monotonic()
        big = ask(b"%s /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n" % method)
        assert big.startswith(b"HTTP/1.1 413 ") and time.monotonic() - started < 5, big[:100]
    assert ask(b"HEAD /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n").endswith(b"\r\n\r\n")


def test_a_bad_request_behind_a_good_admin_request_does_not_take_its_answer(procs, log_dir):
    ports = cluster.free_ports(3)
    procs.start(cluster.echo_server("server1", ports[0], log_dir=str(log_dir)))
    procs.start(balancer_process(ports[1], [f"server1=127.0.0.1:{ports[0]}"], admin_port=ports[2],
                                 log_dir=str(log_dir)))
    with socket.create_connection(("127.0.0.1", ports[2]), timeout=30) as s:
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n\x01 garbage\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"application/json" in data, data[:100]
