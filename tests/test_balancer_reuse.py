"""Message mode's idle backend connections (``--keepalive``, reuse.py): reused by
later clients, dropped when the server closes them, and a stale one never
blamed on its backend nor costing a message."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from clusterkit import cluster
from clusterkit.balancer import balancer_process

from .balancer_setup import Cluster, one_message
from .conftest import fake_backend

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def lb(procs, log_dir):
    return Cluster(procs, log_dir)


def backend_stats(lb: Cluster, name: str) -> dict:
    return next(b for b in lb.stats()["backends"] if b["name"] == name)


def test_later_clients_reuse_the_backend_connections_of_earlier_ones(lb):
    lb.start(names=("server1", "server2"))
    replies = [one_message(lb.port, b"m%d" % i) for i in range(40)]
    names = [r.split(b" ")[1] for r in replies]
    assert replies == [b"REPLY %s m%d\nACK %s %d\n" % (n, i, n, len(b"m%d" % i)) for i, n in enumerate(names)]
    assert all(a != b for a, b in zip(names, names[1:]))  # still round-robin, turn by turn
    for name in ("server1", "server2"):
        b = backend_stats(lb, name)
        assert b["messages"] == 20  # (its connections: one more for one of them, the start's probe)
        # Each client closes before the next connects; its connection is back in the pool
        # by then, or at worst a moment later (then the next one connects anew).
        assert b["reused_connections"] >= 10, b
        assert b["idle_connections"] >= 1
        assert b["failures"] == 0 and b["state"] == "UP"
        assert f'clusterkit_backend_reused_connections_total{{backend="{name}"}} {b["reused_connections"]}.0' \
            in lb.metrics()


def test_keepalive_0_connects_anew_for_every_client(lb):
    lb.start("--keepalive", "0", names=("server1",))
    for i in range(10):
        assert one_message(lb.port, b"m%d" % i).startswith(b"REPLY server1 m%d\n" % i)
    b = backend_stats(lb, "server1")
    assert b["reused_connections"] == 0 and b["idle_connections"] == 0


def test_an_idle_connection_the_server_closes_is_dropped_and_blames_nobody(lb):
    """The server's own idle timeout closes the balancer's idle connection: the
    balancer sees the close and forgets it; the next client is served anew."""
    lb.start(names=("server1",), server_args=("--idle-timeout", "0.3"))
    assert one_message(lb.port, b"first").startswith(b"REPLY server1 first\n")
    deadline = time.monotonic() + 20
    while backend_stats(lb, "server1")["idle_connections"]:
        assert time.monotonic() < deadline, "the closed idle connection was never dropped"
        time.sleep(0.05)
    assert one_message(lb.port, b"second") == b"REPLY server1 second\nACK server1 6\n"
    b = backend_stats(lb, "server1")
    assert b["state"] == "UP" and b["failures"] == 0


class RacingBackend:
    """A line-protocol backend that, once, answers a connection's second message the
    way a server whose idle timeout fired at that moment would: with ``farewell``
    (``ERR idle-timeout``, nothing, or a reset) and a close. Every other message on
    every connection gets its REPLY and ACK."""

    def __init__(self, farewell: str) -> None:
        self.farewell = farewell
        self.raced = threading.Event()
        self.lock = threading.Lock()

    def serve(self, conn: socket.socket) -> None:
        answered = 0
        buf = b""
        with conn:
            while chunk := conn.recv(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    with self.lock:
                        race = answered == 1 and not self.raced.is_set()
                        if race:
                            self.raced.set()
                    if race:
                        if self.farewell == "err":
                            conn.sendall(b"ERR idle-timeout\n")
                        elif self.farewell == "reset":
                            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    conn.sendall(b"REPLY racer %s\nACK racer %d\n" % (line, len(line)))
                    answered += 1


@pytest.mark.parametrize("farewell", ["err", "close", "reset"])
def test_an_idle_connection_closed_as_it_is_reused_costs_no_message_and_blames_nobody(procs, log_dir, farewell):
    """The race no watching can prevent: the server gives up the idle connection
    just as the next client's message goes out on it. The message goes again on a
    new connection to the same backend; the client sees only its answer, and the
    backend is neither marked down nor counted as failed."""
    racer = RacingBackend(farewell)
    with fake_backend(racer.serve) as port:
        ports = cluster.free_ports(2)
        balancer = procs.start(balancer_process(ports[0], [f"racer=127.0.0.1:{port}"], "--check-interval", "30",
                                                admin_port=ports[1], log_dir=str(log_dir)))
        lb = Cluster(procs, log_dir)
        lb.lb, lb.admin_port = balancer, ports[1]
        assert one_message(balancer.port, b"one") == b"REPLY racer one\nACK racer 3\n"
        deadline = time.monotonic() + 20
        while not backend_stats(lb, "racer")["idle_connections"]:  # back in the pool
            assert time.monotonic() < deadline, "the connection never went back to the pool"
            time.sleep(0.05)
        # (The start's probe, a client that connects and leaves, may have left its backend
        # connection in the pool for "one" to take, when it was up before the probe left.)
        reused = backend_stats(lb, "racer")["reused_connections"]
        assert one_message(balancer.port, b"two") == b"REPLY racer two\nACK racer 3\n"
        assert racer.raced.is_set()
        b = backend_stats(lb, "racer")
        assert b["reused_connections"] == reused + 1
        assert b["state"] == "UP" and b["failures"] == 0 and b["failovers_from"] == 0
        assert lb.stats()["failovers"] == 0


def test_idle_connections_to_a_killed_backend_cost_no_message(lb):
    """The demo's failover with one connection per message: SIGKILL a backend whose
    connections wait idle in the pool. The balancer sees them close and drops them;
    the next clients for it find it refusing, it is marked down, and every message
    is answered by the others."""
    lb.start(names=("server1", "server2"))
    for i in range(10):
        assert one_message(lb.port, b"before%d" % i).startswith(b"REPLY server")
    assert backend_stats(lb, "server1")["idle_connections"] >= 1
    lb.servers["server1"].kill()
    replies = [one_message(lb.port, b"after%d" % i) for i in range(10)]
    assert replies == [b"REPLY server2 after%d\nACK server2 %d\n" % (i, len(b"after%d" % i)) for i in range(10)]
    b = backend_stats(lb, "server1")
    assert b["state"] == "DOWN" and b["idle_connections"] == 0


def test_a_stop_closes_the_idle_connections_and_waits_for_none_of_them(lb, log_dir):
    """SIGTERM: idle backend connections hold no message, so the drain does not wait
    for them; they are closed (each server sees its close) and the exit is 0."""
    lb.start(names=("server1",))
    for i in range(5):
        assert one_message(lb.port, b"m%d" % i).startswith(b"REPLY server1 ")
    assert backend_stats(lb, "server1")["idle_connections"] >= 1
    started = time.monotonic()
    assert lb.lb.stop() == 0
    assert time.monotonic() - started < 4  # (the drain's limit is 5 s: it did not run out)
    log = log_dir / "server_log.log"
    deadline = time.monotonic() + 10  # (written in batches)
    while True:
        lines = log.read_text().splitlines()
        opened = [ln for ln in lines if " server1 event=open " in ln]
        closed = [ln for ln in lines if " server1 event=close " in ln]
        if len(closed) >= len(opened):
            break
        assert time.monotonic() < deadline, f"{len(opened) - len(closed)} connections to server1 never closed"
        time.sleep(0.05)
