"""How Load_Balancer.py spreads clients over its backends, as real processes:
round robin exactly, weights, least connections."""

from __future__ import annotations

import socket
import time

import pytest

from .balancer_setup import one_message, server_of

pytestmark = pytest.mark.timeout(90)


def test_round_robin_spreads_300_connections_exactly(lb):
    lb.start()
    counts: dict[str, int] = {}
    for i in range(300):
        name = server_of(one_message(lb.port, b"rr%d" % i))
        counts[name] = counts.get(name, 0) + 1
    assert counts == {"server1": 100, "server2": 100, "server3": 100}
    stats = lb.stats()
    assert stats["messages"] == 300
    assert 1 <= stats["max_clients"] <= 10_000  # --max-connections, or less if the open-files limit says so
    assert [b["messages"] for b in stats["backends"]] == [100, 100, 100]
    assert 'clusterkit_backend_messages_total{backend="server2"} 100.0' in lb.metrics()


def test_weights_are_honoured(lb):
    lb.start("--algorithm", "weighted", weights=(3, 1, 1))
    counts: dict[str, int] = {}
    for i in range(100):
        name = server_of(one_message(lb.port))
        counts[name] = counts.get(name, 0) + 1
    assert counts == {"server1": 60, "server2": 20, "server3": 20}
    assert "weights" not in lb.lb.stderr()


def test_weights_under_another_algorithm_are_said_to_be_unused(lb):
    """HAProxy's roundrobin weighs; ours does not (--algorithm weighted does): it said nothing."""
    lb.start(weights=(3, 1, 1))
    one_message(lb.port)
    assert "weights are for --algorithm weighted; roundrobin spreads clients without them" in lb.lb.stderr()


def test_least_connections_prefers_the_idle_backend(lb, connect):
    lb.start("--algorithm", "leastconn")
    held = {}
    for _ in range(3):
        c = connect(lb.port)
        c.send(b"hold\n")
        held[server_of(c.read_lines(2)[0])] = c
    assert sorted(held) == ["server1", "server2", "server3"]
    extra = connect(lb.port)  # a tie: it lands somewhere, that backend now has two
    extra.send(b"x\n")
    busy = server_of(extra.read_lines(2)[0])
    freed = next(name for name in held if name != busy)
    held[freed].close()
    deadline = time.monotonic() + 10
    while next(b for b in lb.stats()["backends"] if b["name"] == freed)["active_connections"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert server_of(one_message(lb.port)) == freed


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_least_connections_spreads_a_burst_of_connects(lb, mode):
    """30 connects at once, 3 connections already on one backend: 11 each in the end.
    Counted only once connected, tcp mode sent the burst to the two others
    (3/15/15): a connect under way counts from when the backend is chosen, as in HAProxy."""
    lb.start("--mode", mode, "--algorithm", "leastconn")
    for name in ("server2", "server3"):  # so that the three held connections go to server1
        lb.servers[name].stop()
    for name in ("server2", "server3"):
        lb.wait_state(name, ("DOWN",))
    socks = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
            s.sendall(b"hold\n")
            socks.append(s)
            first = server_of(s.recv(200))
        for name in ("server2", "server3"):
            lb.restart(name)
        for name in ("server2", "server3"):
            lb.wait_state(name, ("UP",))
        for _ in range(30):  # not waiting for each: the balancer sees them together
            socks.append(socket.create_connection(("127.0.0.1", lb.port), timeout=10))
        deadline = time.monotonic() + 10
        while True:
            active = {b["name"]: b["active_connections"] for b in lb.stats()["backends"]}
            if sum(active.values()) == 33 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for s in socks:
            s.close()
    assert sum(active.values()) == 33 and max(active.values()) - min(active.values()) <= 2, (first, active)
