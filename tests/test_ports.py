"""The ports our connections leave behind. The side that closes a connection
first keeps it in TIME_WAIT for a minute, local port and all; every socket
this project connects has SO_REUSEADDR (clusterkit/sockets.py), so that such
a port can still be bound by a server (ours all listen with SO_REUSEADDR).
Without it, a stress run through the balancer left the HTTP set-up's ports
(44444, 45000, 46000, in Linux's ephemeral range) unusable for a minute.

Each test makes a part of ours close connections first, then binds a
listener, as our servers do, to the local ports of the TIME_WAIT connections
that appeared.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from clusterkit import cluster
from clusterkit.balancer import balancer_process

pytestmark = pytest.mark.timeout(60)

TIME_WAIT = "06"


def connections() -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of this machine's TCP sockets (/proc/net/tcp and tcp6)."""
    found = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as table:
            next(table)
            for row in table:
                local, remote, state = row.split()[1:4]
                found.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state))
    return found


def time_waits(remote_port: int) -> set[int]:
    """Local ports of the connections to ``remote_port`` in TIME_WAIT."""
    return {local for local, remote, state in connections() if state == TIME_WAIT and remote == remote_port}


def assert_new_time_waits_bindable(remote_port: int, before: set[int]) -> None:
    """Connections to ``remote_port`` went into TIME_WAIT on our side since
    ``before``, and a server can listen on their local ports (up to 20 tried). A
    port that another socket on this machine uses too (another test's client
    without SO_REUSEADDR, connected to another port from the same local port)
    proves nothing either way and is passed over for the next that appears; one
    port bound is enough, a bind that fails for no such reason fails the test."""
    deadline = time.monotonic() + 10
    tried: set[int] = set()
    while len(tried) < 20:
        new = sorted(time_waits(remote_port) - before - tried)
        if not new:
            assert time.monotonic() < deadline, ("no connection of ours to the port closed first" if not tried
                                                 else "every port was shared with other sockets")
            time.sleep(0.05)
            continue
        for local_port in new[:20 - len(tried)]:
            tried.add(local_port)
            with socket.socket() as server:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    server.bind(("127.0.0.1", local_port))  # EADDRINUSE: the TIME_WAIT holds it
                except OSError:
                    if any(local == local_port and remote != remote_port for local, remote, _ in connections()):
                        continue
                    raise
                server.listen()
                return
    raise AssertionError("every port was shared with other sockets")


@pytest.mark.parametrize("engine", ["thread", "async", "epoll"])
def test_a_stress_run_leaves_its_ports_free_for_servers(start_server, log_dir, engine):
    server = start_server("server1")
    before = time_waits(server.port)
    run = subprocess.run(cluster.python_script(
        "ClientServer_StressTools.py", "--port", str(server.port), "-n", "20", "-c", "2", "--engine", engine,
        "--processes", "1", "--quiet", "--log-dir", str(log_dir)), capture_output=True, text=True, timeout=45)
    assert run.returncode == 0, run.stderr
    assert_new_time_waits_bindable(server.port, before)


def test_client_py_leaves_its_ports_free_for_servers(start_server, log_dir):
    server = start_server("server1")
    before = time_waits(server.port)
    run = subprocess.run(cluster.python_script("client.py", "hello", "--count", "3", "--port", str(server.port),
                                               "--log-dir", str(log_dir)), capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert_new_time_waits_bindable(server.port, before)


def test_the_balancer_leaves_its_backend_ports_free_for_servers(start_server, procs, log_dir):
    server = start_server("server1")
    before = time_waits(server.port)
    balancer = procs.start(balancer_process(cluster.free_port(), [f"server1=127.0.0.1:{server.port}"], "--mode",
                                            "tcp", "--check-interval", "60", log_dir=str(log_dir)))
    for _ in range(3):  # the client closes; the balancer passes the close on first, the server follows
        with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as s:
            s.sendall(b"hello\n")
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
    assert_new_time_waits_bindable(server.port, before)


def test_health_checks_leave_their_ports_free_for_servers(start_server, procs, log_dir):
    server = start_server("server1")
    before = time_waits(server.port)
    procs.start(balancer_process(cluster.free_port(), [f"server1=127.0.0.1:{server.port}"], "--check-interval",
                                 "0.1", log_dir=str(log_dir)))
    assert_new_time_waits_bindable(server.port, before)


def test_lb_py_leaves_its_backend_ports_free_for_servers(procs, log_dir):
    backend_port = cluster.free_port()
    procs.start(cluster.Process("backend1", cluster.python_script(
        "http_servers/async_server.py", str(backend_port), "--name", "backend1", "--log-dir", str(log_dir)),
        port=backend_port))
    before = time_waits(backend_port)
    # Three lb.py runs, each leaving one pooled connection to close when it stops. With one
    # alone, two full runs failed here, most likely as its one local port was also another
    # socket's (another test's connection from the same port), which proves nothing.
    # (Checks once a minute: the requests' pooled connections are the ones to look for.)
    for _ in range(3):
        lb_port = cluster.free_port()
        lb = procs.start(cluster.Process("lb", cluster.python_script(
            "http_servers/lb.py", "--port", str(lb_port), "--backend", f"backend1=127.0.0.1:{backend_port}",
            "--check-interval", "60", "--log-dir", str(log_dir)), port=lb_port))
        with socket.create_connection(("127.0.0.1", lb_port), timeout=10) as s:
            s.sendall(b"GET /page.html HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and b"X-Backend: backend1" in answer, answer[:300]
        lb.stop()  # its pooled connection to the backend is closed from its side
    assert_new_time_waits_bindable(backend_port, before)
