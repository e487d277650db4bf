"""Load_Balancer.py in front of three real echo servers, with faults injected."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from clusterkit import cluster
from clusterkit.balancer import balancer_process
from clusterkit.protocol import ResponseParser
from clusterkit.sockets import is_listener

from .conftest import (FullBacklog, LineConn, assert_bad_config, assert_usage_error, send_all_then_read,
                       turned_away_or_in, two_lines)

pytestmark = pytest.mark.timeout(90)

FAST_CHECKS = ("--check-interval", "0.2", "--check-timeout", "0.5", "--rise", "2", "--fall", "2",
               "--response-timeout", "0.5", "--connect-timeout", "0.5")


class Cluster:
    def __init__(self, procs, log_dir):
        self.procs = procs
        self.log_dir = str(log_dir)
        self.servers: dict[str, cluster.Process] = {}
        self.lb: cluster.Process | None = None
        self.admin_port = 0

    def start(self, *lb_args: str, names=("server1", "server2", "server3"), weights=None, server_args=()):
        ports = cluster.free_ports(len(names) + 2)
        for i, name in enumerate(names):
            self.servers[name] = self.procs.start(cluster.echo_server(name, ports[i], *server_args,
                                                                      log_dir=self.log_dir))
        backends = [f"{name}=127.0.0.1:{self.servers[name].port}" + (f":{weights[i]}" if weights else "")
                    for i, name in enumerate(names)]
        self.admin_port = ports[-1]
        self.lb = self.procs.start(balancer_process(ports[-2], backends, *FAST_CHECKS, *lb_args,
                                                    admin_port=self.admin_port, log_dir=self.log_dir))
        return self

    @property
    def port(self) -> int:
        return self.lb.port

    def restart(self, name: str) -> None:
        old = self.servers[name]
        old.stop()
        self.servers[name] = self.procs.start(cluster.echo_server(name, old.port, log_dir=self.log_dir))

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats", timeout=10) as r:
            return json.load(r)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def state(self, name: str) -> str:
        return next(b["state"] for b in self.stats()["backends"] if b["name"] == name)

    def wait_state(self, name: str, states: tuple[str, ...], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.state(name) not in states:
            assert time.monotonic() < deadline, f"{name} never became {states}"
            time.sleep(0.05)


@pytest.fixture
def lb(procs, log_dir):
    return Cluster(procs, log_dir)


def one_message(port: int, text: bytes = b"hi", timeout: float = 10, delay: float = 0) -> bytes:
    """``delay``: sent that long after the connect (a slow client, or one descheduled):
    the balancer may have answered and closed before it comes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        time.sleep(delay)
        s.sendall(text + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def server_of(reply: bytes) -> str:
    return reply.split(b" ")[1].decode()


def pipeline(port: int, messages: list[bytes], during=None, timeout: float = 60, read_after: float = 0,
             rcvbuf: int = 0) -> list:
    """Send all messages on one connection, run ``during(responses_so_far)`` after the
    first thousand responses, and read every response (starting ``read_after``
    seconds late, so that the answers back up; ``rcvbuf`` keeps more of them
    waiting in the balancer and the backend rather than in this socket)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sender = threading.Thread(target=lambda: (s.sendall(b"".join(m + b"\n" for m in messages)),
                                              s.shutdown(socket.SHUT_WR)))
    sender.start()
    time.sleep(read_after)
    parser = ResponseParser()
    responses = []
    fired = during is None
    while len(responses) < len(messages):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        responses += parser.feed(chunk)
        if not fired and len(responses) >= 1000:
            during(responses)
            fired = True
    sender.join()
    s.close()
    return responses


def read_responses(s: socket.socket, parser: ResponseParser, count: int) -> list:
    """Exactly ``count`` responses, or fewer if the connection ends first."""
    responses: list = []
    while len(responses) < count:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        responses += parser.feed(chunk)
    assert len(responses) == count, f"{len(responses)} of {count} responses before the connection ended"
    return responses


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


def test_tcp_mode_counts_the_bytes_it_relays_and_no_messages(lb, connect):
    """A byte relay sees no messages: /stats says null, not 0 after a million, and
    shows the bytes each way per backend, an open connection's included."""
    lb.start("--mode", "tcp")
    for i in range(3):  # one connection to each backend, 6 bytes out and the two answer lines back
        one_message(lb.port, b"tcp%02d" % i)
    c = connect(lb.port)  # and one still open
    c.send(b"open1\n")
    c.read_lines(2)
    stats = lb.stats()
    assert stats["messages"] is None and all(b["messages"] is None for b in stats["backends"])
    assert sorted(b["bytes_in"] for b in stats["backends"]) == [6, 6, 12]  # round robin: one had two
    answer = len(b"REPLY tcp00\n") + len(b"ACK server1 6\n")
    assert all(b["bytes_out"] >= answer for b in stats["backends"])
    busiest = max(stats["backends"], key=lambda b: b["bytes_in"])["name"]
    metrics = lb.metrics()
    assert f'clusterkit_backend_bytes_in_total{{backend="{busiest}"}} 12.0' in metrics
    assert "clusterkit_backend_messages_total" not in metrics


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


def test_kill_9_backend_with_20000_pipelined_messages_loses_nothing(lb):
    """1000 messages answered by one backend, then 20,000 more pipelined on the same connection and
    that backend killed -9 with all of them in flight. It is stopped before they are sent: otherwise a
    fast backend could answer all 20,000 before the kill (it did once in CI) and nothing would be shown."""
    lb.start()
    answered = [b"answered-%d" % i for i in range(1000)]
    messages = [b"pipelined-%d" % i for i in range(20_000)]
    with socket.create_connection(("127.0.0.1", lb.port), timeout=60) as s:
        parser = ResponseParser()
        s.sendall(b"".join(m + b"\n" for m in answered))
        responses = read_responses(s, parser, len(answered))
        victim = lb.servers[responses[0].server.decode()]
        victim.signal(signal.SIGSTOP)
        sender = threading.Thread(target=lambda: (s.sendall(b"".join(m + b"\n" for m in messages)),
                                                  s.shutdown(socket.SHUT_WR)))
        sender.start()
        time.sleep(0.2)  # the balancer has them; its response timeout (0.5 s) has not fired yet
        victim.kill()
        responses += read_responses(s, parser, len(messages))
        sender.join()
    assert all(r.error is None for r in responses), {r.error for r in responses}
    assert all(r.matches(m) for r, m in zip(responses, answered + messages))
    assert {r.server.decode() for r in responses[:len(answered)]} == {victim.name}
    assert victim.name not in {r.server.decode() for r in responses[len(answered):]}
    assert lb.stats()["failovers"] >= 1


def test_sigstop_backend_under_load_moves_clients_and_comes_back_after_rise(lb):
    lb.start()
    errors: list = []
    done = threading.Event()

    def client(k: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", lb.port), timeout=20) as s:
                parser = ResponseParser()
                for i in range(300):
                    msg = b"c%d-%d" % (k, i)
                    s.sendall(msg + b"\n")
                    got = []
                    while not got:
                        chunk = s.recv(65536)
                        if not chunk:
                            raise ConnectionError("closed")
                        got = parser.feed(chunk)
                    if not got[0].matches(msg):
                        errors.append(got[0])
                    time.sleep(0.005)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    lb.servers["server1"].signal(signal.SIGSTOP)
    for t in threads:
        t.join(timeout=60)
    done.set()
    assert not errors, errors[:3]
    assert lb.state("server1") == "DOWN"
    assert lb.stats()["failovers"] >= 1
    lb.servers["server1"].signal(signal.SIGCONT)
    lb.wait_state("server1", ("UP",))


def test_clients_leave_a_backend_the_health_checks_mark_down_at_once(lb, connect):
    """A client whose message waited at a SIGSTOPped backend, or that sent one after
    the checks had marked it DOWN, waited out its own response timeout (10 s here);
    now both leave it when it is marked down (after --fall checks)."""
    lb.start("--response-timeout", "10", names=("server1", "server2"))
    clients = []
    for text in (b"a", b"b", b"c"):  # round-robin: server1, server2, server1
        c = connect(lb.port)
        c.send(text + b"\n")
        clients.append((c, server_of(c.read_lines(2)[0])))
    (busy, stalled_name), (_, healthy_name), (idle, same) = clients
    assert same == stalled_name != healthy_name
    stalled = lb.servers[stalled_name]
    stalled.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        busy.send(b"three\n")
        assert busy.read_lines(2, timeout=30) == [b"REPLY %s three" % healthy_name.encode(),
                                                  b"ACK %s 5" % healthy_name.encode()]
        assert time.monotonic() - started < 8  # (its response timeout is 10 s)
        lb.wait_state(stalled_name, ("DOWN",))
        started = time.monotonic()
        idle.send(b"four\n")
        assert server_of(idle.read_lines(2, timeout=30)[0]) == healthy_name
        assert time.monotonic() - started < 8
    finally:
        stalled.signal(signal.SIGCONT)


def test_clients_stay_on_a_backend_that_is_down_for_being_full(lb, connect):
    """A backend at its --max-connections fails its checks (check busy) and is marked
    down, yet serves the clients it has: moving them off (to no other backend) gave
    each of their messages ERR no-backend."""
    lb.start("--check-interval", "0.5", names=("server1",), server_args=("--max-connections", "2"))
    clients = []
    for i in range(2):
        for _ in range(50):  # (a check may hold the slot a moment: ERR busy, then again)
            c = connect(lb.port)
            c.send(b"hello%d\n" % i)
            if c.read_lines(2)[0] == b"REPLY server1 hello%d" % i:
                clients.append(c)
                break
            time.sleep(0.05)
    assert len(clients) == 2
    lb.wait_state("server1", ("DOWN",))
    time.sleep(0.5)  # (a move would have come by now)
    for n in range(20):
        for i, c in enumerate(clients):
            c.send(b"m%d-%d\n" % (i, n))
            assert c.read_lines(2)[0] == b"REPLY server1 m%d-%d" % (i, n)


def test_stats_do_not_blame_the_backend_a_stalled_ones_messages_moved_to(lb):
    """The wait on a stopped backend was recorded as the latency of the backend its
    messages were resent to (a healthy one showed a max as long as the stall)."""
    lb.start()
    with socket.create_connection(("127.0.0.1", lb.port), timeout=20) as s:
        parser = ResponseParser()

        def ask(msg: bytes):
            s.sendall(msg + b"\n")
            got = []
            while not got:
                got = parser.feed(s.recv(65536))
            return got[0]

        first = ask(b"a").server.decode()
        lb.servers[first].signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            moved = ask(b"b")
            stall_ms = (time.monotonic() - started) * 1000
            assert moved.server.decode() != first and moved.matches(b"b")
            worst = max(b["latency_ms"]["max"] or 0 for b in lb.stats()["backends"] if b["name"] != first)
            assert worst < stall_ms / 2, (worst, stall_ms)
        finally:
            lb.servers[first].signal(signal.SIGCONT)


def test_all_backends_down_gives_err_no_backend_quickly_then_recovers(lb, connect):
    lb.start()
    for s in lb.servers.values():
        s.kill()
    conn = connect(lb.port)
    started = time.monotonic()
    conn.send(b"anyone?\n")
    assert conn.read_lines(1) == [b"ERR no-backend"]
    assert time.monotonic() - started < 5  # generous: it answers at once, this only proves no hang
    conn.send(b"still?\n")
    assert conn.read_lines(1) == [b"ERR no-backend"]
    # Logged once a second at most: the first at once, the second a second on by itself
    # (not only when the client leaves, as before).
    log_file = Path(lb.log_dir) / "server_log.log"
    deadline = time.monotonic() + 15
    while (said := sum(map(int, re.findall(r"event=no-backend messages=(\d+)", log_file.read_text())))) < 2:
        assert time.monotonic() < deadline, f"no-backend answers logged: {said} of 2"
        time.sleep(0.05)
    lb.restart("server2")
    deadline = time.monotonic() + 20
    while True:
        conn.send(b"back\n")
        line = conn.read_lines(1)[0]
        if line.startswith(b"REPLY"):
            assert line == b"REPLY server2 back" and conn.read_lines(1) == [b"ACK server2 4"]
            break
        assert line == b"ERR no-backend" and time.monotonic() < deadline
        time.sleep(0.1)


def test_no_backend_answers_given_during_the_stop_are_counted_too(procs, log_dir):
    """The count of ERR no-backend answers was said for the last time before the drain:
    those the drain gave (a client still sending through the stop) were never logged."""
    ports = cluster.free_ports(2)
    balancer = procs.start(balancer_process(ports[0], [f"gone=127.0.0.1:{ports[1]}"], "--drain-timeout", "1.5",
                                            "--admin-port", "0", log_dir=str(log_dir)))
    got = []
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as s:
        reader = threading.Thread(target=lambda: got.extend(iter(lambda: s.recv(65536), b"")), daemon=True)
        reader.start()
        started = time.monotonic()
        stopped = False
        while time.monotonic() - started < 3:
            if time.monotonic() - started > 1 and not stopped:
                balancer.signal(signal.SIGTERM)
                stopped = True
            try:
                s.sendall(b"m\n")
            except OSError:
                break
            time.sleep(0.02)
        assert balancer.popen.wait(timeout=30) == 0
        reader.join(10)
    answered = b"".join(got).count(b"ERR no-backend\n")
    said = sum(map(int, re.findall(r"event=no-backend messages=(\d+)", (log_dir / "server_log.log").read_text())))
    assert answered > 50 and said == answered, (said, answered)


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_clients_turned_away_with_no_backend_are_counted_not_logged_one_by_one(lb, mode):
    """With no backend up, a client per message wrote a warning line per connection
    (65,000 lines in 14 s from a stress run): now a line a second at most, with
    the count since the last."""
    lb.start("--mode", mode)
    for s in lb.servers.values():
        s.kill()
    started = time.monotonic()
    for _ in range(200):
        assert one_message(lb.port) == b"ERR no-backend\n"
    log_file = Path(lb.log_dir) / "server_log.log"
    what = "messages" if mode == "message" else "clients"
    deadline = time.monotonic() + 15
    while (said := sum(map(int, re.findall(rf"event=no-backend {what}=(\d+)\n", log_file.read_text())))) < 200:
        assert time.monotonic() < deadline, f"no-backend answers logged: {said} of 200"
        time.sleep(0.1)
    lines = log_file.read_text().count("event=no-backend ")
    assert said == 200 and lines <= time.monotonic() - started + 2, lines


def test_tcp_mode_never_connects_to_a_down_backend(lb):
    lb.start("--mode", "tcp")
    lb.servers["server2"].kill()
    # before any check noticed: the refused connect is retried on the next backend
    names = [server_of(one_message(lb.port)) for _ in range(6)]
    assert "server2" not in names and len(names) == 6
    lb.wait_state("server2", ("DOWN",))
    names = [server_of(one_message(lb.port)) for _ in range(30)]
    assert set(names) == {"server1", "server3"}


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_sigterm_with_traffic_in_flight_loses_nothing_and_exits_zero(lb, mode):
    """Read late, into a small buffer: the client has sent everything long before
    its answers are all out, so it is quiet one way only (--mode tcp counts both)."""
    lb.start("--mode", mode)
    messages = [b"drain-%d" % i for i in range(100_000)]
    responses = pipeline(lb.port, messages, during=lambda _: lb.lb.signal(signal.SIGTERM), read_after=1,
                         rcvbuf=65536)
    assert len(responses) == len(messages)
    assert all(r.matches(m) for r, m in zip(responses, messages))
    assert lb.lb.wait(timeout=20) == 0


@pytest.mark.parametrize("resumed", [True, False])
def test_the_drain_deadline_relays_the_answers_due_then_closes(lb, connect, resumed):
    """Messages waiting at a stalled backend when --drain-timeout ran out were cut
    off with the connection: a bare close, and no word of them to the client. At
    the deadline the balancer now reads nothing more, relays the answers still
    due, says ERR shutting-down for the line begun, then closes. A backend still
    stalled when the wind-up ends (not ``resumed``): each message waiting on it
    gets ERR shutting-down in its place, then the line begun's."""
    lb.start("--drain-timeout", "0.2", "--check-timeout", "5", "--response-timeout", "30", names=("server1",))
    conn = connect(lb.port)
    conn.send(b"ok\n")
    assert conn.read_lines(2)[0] == b"REPLY server1 ok"
    server = lb.servers["server1"]
    server.signal(signal.SIGSTOP)
    try:
        conn.send(b"a\nb\nc\npart")
        time.sleep(0.3)  # forwarded, not answered
        lb.lb.signal(signal.SIGTERM)
        if resumed:
            time.sleep(0.6)  # past the drain deadline
            server.signal(signal.SIGCONT)
        responses = ResponseParser().feed(conn.read_all())
        assert lb.lb.wait(timeout=20) == 0
    finally:
        server.signal(signal.SIGCONT)
    answers = [(b"a", None), (b"b", None), (b"c", None)] if resumed else [(None, "shutting-down")] * 3
    assert [(r.message, r.error) for r in responses] == answers + [(None, "shutting-down")]


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_a_client_still_sending_its_too_long_line_reads_the_error_without_a_reset(lb, mode):
    """ERR line-too-long (the balancer's own in message mode, the server's relayed in
    tcp mode) while 600 KB of the line are still coming: no reset under the client.
    (Within the linger's 1 MB: past it, the close is meant, and races the client.)"""
    lb.start("--mode", mode, "--max-line", "1000")
    answer = send_all_then_read(lb.port, b"fine\n" + b"y" * 600_000 + b"\nnever\n")
    assert answer.endswith(b"ERR line-too-long\n") and answer.startswith(b"REPLY server"), answer[:200]


def balancer_logs(log_dir, code: str) -> None:
    """Wait (bounded) for the balancer's info line about a client's error it answered itself."""
    pattern = re.compile(rf" INFO balancer event=error conn=\d+ code={code}\n")
    deadline = time.monotonic() + 10
    while not pattern.search(log := (log_dir / "server_log.log").read_text()):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.05)


def test_oversized_line_garbage_and_half_close(lb, connect, log_dir):
    lb.start("--max-line", "100")
    conn = connect(lb.port)
    conn.send(b"ok\n\xff\x00\xfe garbage\n" + b"L" * 500 + b"\nafter\n")
    responses = ResponseParser().feed(conn.read_all())
    assert [(r.message, r.length, r.error) for r in responses] == [
        (b"ok", 2, None), (b"\xff\x00\xfe garbage", 11, None), (None, None, "line-too-long")]
    balancer_logs(log_dir, "line-too-long")  # its own ERR, as the servers log theirs
    half = connect(lb.port)
    half.send(b"a\nb\nc\n")
    half.sock.shutdown(socket.SHUT_WR)
    assert [r.message for r in ResponseParser().feed(half.read_all())] == [b"a", b"b", b"c"]


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_a_message_ending_in_cr_is_relayed_unchanged(lb, connect, mode):
    """SPEC: one \\r before the \\n is dropped; any other byte is the message's.
    So the message of ``a\\rb\\r\\r\\n`` is ``a\\rb\\r``. Message mode re-frames what
    it forwards (the first messages, sent before the backend connection is up;
    a chunk that ends mid-line; a failover's resend): it sent ``a\\rb\\r\\n`` and
    the backend dropped the message's own last byte."""
    lb.start("--mode", mode)
    conn = connect(lb.port)
    conn.send(b"a\rb\r\r\n")  # the first message: sent on once the backend is connected
    time.sleep(0.2)
    conn.send(b"c\r\r\nd")  # ends mid-line: the framed messages go on, not the raw chunk
    time.sleep(0.2)
    conn.send(b"e\r\r\n")
    conn.sock.shutdown(socket.SHUT_WR)
    data = conn.read_all()
    name = server_of(data).encode()
    assert data == b"".join(b"REPLY %s %s\nACK %s %d\n" % (name, m, name, len(m)) for m in (b"a\rb\r", b"c\r", b"de\r"))


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_bytes_after_the_last_newline_get_err_incomplete_line_after_the_answers(lb, connect, mode, log_dir):
    lb.start("--mode", mode)
    conn = connect(lb.port)
    conn.send(b"a\nb\nno newline")
    conn.sock.shutdown(socket.SHUT_WR)
    responses = ResponseParser().feed(conn.read_all())
    assert [(r.message, r.error) for r in responses] == [(b"a", None), (b"b", None), (None, "incomplete-line")]
    alone = connect(lb.port)  # nothing in flight: the error comes at once
    alone.send(b"tail")
    alone.sock.shutdown(socket.SHUT_WR)
    assert alone.read_all() == b"ERR incomplete-line\n"
    if mode == "message":  # its own ERR, as the servers log theirs (in tcp mode the server's)
        balancer_logs(log_dir, "incomplete-line")


def test_backend_that_does_not_speak_the_protocol_is_failed_over(procs, log_dir):
    """A backend answering garbage: its clients get their answers from a good
    backend, never the garbage, and it is marked down with the reason."""
    bad = _odd_backend(lambda lines: (b"garbage here\n" * len(lines), False))
    bad_port = bad.getsockname()[1]
    try:
        ports = cluster.free_ports(2)
        procs.start(cluster.echo_server("server1", ports[0], log_dir=str(log_dir)))
        # Slow checks: the traffic, not a health check, must find the broken backend.
        balancer = procs.start(balancer_process(ports[1], [f"junk=127.0.0.1:{bad_port}", f"server1=127.0.0.1:{ports[0]}"],
                                                "--check-interval", "30", log_dir=str(log_dir)))
        replies = [one_message(balancer.port, b"m%d" % i) for i in range(6)]
    finally:
        bad.close()
    assert replies == [b"REPLY server1 m%d\nACK server1 %d\n" % (i, len(b"m%d" % i)) for i in range(6)]
    log_file = log_dir / "server_log.log"
    # (down from UP, or from FALLING when its first check, which the garbage fails too, came first)
    down = re.compile(r"event=backend-down backend=junk from=(UP|FALLING) to=DOWN reason=bad-reply")
    deadline = time.monotonic() + 10  # the log is written in batches
    while not (down.search(log := log_file.read_text()) and "event=failover conn" in log):
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
    assert "from=junk reason=bad-reply" in log


def _odd_backend(answer, late: Callable[[list[bytes]], bytes] | None = None):
    """A listening backend (close it at the end) that answers the messages of each
    read with ``answer(messages)``: the bytes to send, and whether to close then;
    ``late(messages)``, bytes it sends LATE seconds after (its client gone by then).
    Each connection in a thread."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while data := conn.recv(65536):
                buf += data
                *lines, buf = buf.split(b"\n")
                out, close = answer(lines)
                conn.sendall(out)
                if late is not None and lines:
                    time.sleep(LATE)
                    conn.sendall(late(lines))
                if close:
                    return

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


LATE = 0.5


def _pair(name: bytes, m: bytes) -> bytes:
    return b"REPLY %s %s\nACK %s %d\n" % (name, m, name, len(m))


def test_a_backend_that_answers_twice_is_failed_over_and_no_answer_comes_twice(procs, log_dir):
    """Answers were counted, not matched: a backend answering each message twice
    had its second copy relayed as the answer to the next message (m0, m0, m1,
    m1, ...) and stayed up. An answer that does not echo the message it answers
    is now off the protocol: what is pending goes to another backend."""
    double = _odd_backend(lambda lines: (b"".join(_pair(b"double", m) * 2 for m in lines), False))
    try:
        ports = cluster.free_ports(2)
        procs.start(cluster.echo_server("server1", ports[0], log_dir=str(log_dir)))
        balancer = procs.start(balancer_process(
            ports[1], [f"double=127.0.0.1:{double.getsockname()[1]}", f"server1=127.0.0.1:{ports[0]}"],
            "--check-interval", "30", log_dir=str(log_dir)))
        messages = [b"m%d" % i for i in range(200)]
        for _ in range(2):  # (one of the two goes to double first)
            responses = pipeline(balancer.port, messages)
            assert [r.message for r in responses] == messages and all(r.error is None for r in responses)
        for _ in range(3):  # one message a connection: each answered once, whoever answers
            assert ResponseParser().feed(one_message(balancer.port, b"solo"))[0].message == b"solo"
        # The copy of a last answer, with nothing more due, was only the end of that
        # connection; it is a broken backend's too.
        ports = cluster.free_ports(2)
        alone = Cluster(procs, log_dir)
        alone.admin_port = ports[1]
        alone.lb = procs.start(balancer_process(ports[0], [f"double=127.0.0.1:{double.getsockname()[1]}"],
                                                "--check-interval", "30", admin_port=ports[1], log_dir=str(log_dir)))
        assert one_message(alone.port, b"once") == _pair(b"double", b"once")
        alone.wait_state("double", ("DOWN",))
    finally:
        double.close()


def test_a_copy_of_an_answer_after_its_client_left_marks_the_backend_down(procs, log_dir):
    """The second copy of the last answer came after the client had gone, on the
    backend connection kept idle for the next client: it was dropped with the
    connection, unblamed, and the backend stayed up (the test above failed so
    when its client's close came first). It is an answer nobody asked for: the
    backend's fault, as when it comes with the client still there."""
    late = _odd_backend(lambda lines: (b"".join(_pair(b"late", m) for m in lines), False),
                        late=lambda lines: b"".join(_pair(b"late", m) for m in lines))
    try:
        ports = cluster.free_ports(2)
        alone = Cluster(procs, log_dir)
        alone.admin_port = ports[1]
        alone.lb = procs.start(balancer_process(ports[0], [f"late=127.0.0.1:{late.getsockname()[1]}"],
                                                "--check-interval", "30", admin_port=ports[1], log_dir=str(log_dir)))
        assert one_message(alone.port, b"once") == _pair(b"late", b"once")  # (its client gone before the copy)
        alone.wait_state("late", ("DOWN",))
        deadline = time.monotonic() + 10  # (the log is written in batches)
        while "code=unasked-answer backend=late" not in (log := (log_dir / "server_log.log").read_text()):
            assert time.monotonic() < deadline, log[-2000:]
            time.sleep(0.05)
    finally:
        late.close()


def _odd_beside_server1(procs, log_dir, odd: socket.socket) -> Cluster:
    """A balancer (connect checks only, rarely) over the odd backend ``odd`` and server1."""
    ports = cluster.free_ports(3)
    procs.start(cluster.echo_server("server1", ports[0], log_dir=str(log_dir)))
    lb = Cluster(procs, log_dir)
    lb.admin_port = ports[2]
    lb.lb = procs.start(balancer_process(
        ports[1], [f"odd=127.0.0.1:{odd.getsockname()[1]}", f"server1=127.0.0.1:{ports[0]}"],
        "--check", "connect", "--check-interval", "30", admin_port=ports[2], log_dir=str(log_dir)))
    return lb


@pytest.mark.parametrize("broken", ["ack-length", "ack-name", "notice-always"])
def test_a_backend_whose_answers_are_never_right_is_failed_over_and_marked_down(procs, log_dir, broken):
    """``ack-length``, ``ack-name``: an ACK that does not confirm its REPLY was
    relayed, and the backend stayed up (its clients' messages failed as bad-ack
    for good). ``notice-always``: a backend that says 'ERR idle-timeout' to every
    message, on new connections too, was reconnected to thousands of times a
    second, as if each were a stale connection, and the message waited for ever.
    Now each is a broken backend's: what is pending goes to the other one."""
    def answer(lines):
        if broken == "notice-always":
            return b"ERR idle-timeout\n", True
        acks = {"ack-length": lambda m: b"ACK odd %d\n" % (len(m) + 1), "ack-name": lambda m: b"ACK even %d\n" % len(m)}
        return b"".join(b"REPLY odd %s\n" % m + acks[broken](m) for m in lines), False

    odd = _odd_backend(answer)
    try:
        lb = _odd_beside_server1(procs, log_dir, odd)
        messages = [b"m%d" % i for i in range(50)]
        for _ in range(2):  # (one of the two goes to odd first)
            responses = pipeline(lb.lb.port, messages)
            assert all(r.matches(m) and r.server == b"server1" for r, m in zip(responses, messages))
            assert len(responses) == len(messages)
        lb.wait_state("odd", ("DOWN",))
    finally:
        odd.close()


def test_a_repeated_message_whose_answer_turns_wrong_is_still_caught(procs, log_dir, connect):
    """A message repeated on one connection (as load tools send it) has its answer
    taken at a glance when it is, byte for byte, the last one verified from that
    backend connection (ClientSide.backend_data). An answer that then differs in one
    byte must be matched in full again: off the protocol, so the backend is failed
    over and each message still answered once, rightly."""
    answered = [0]

    def answer(lines):
        out = b""
        for m in lines:
            answered[0] += 1
            out += _pair(b"odd", m if answered[0] <= 3 else m[:-1] + b"E")  # right 3 times, then not
        return out, False

    odd = _odd_backend(answer)
    try:
        lb = _odd_beside_server1(procs, log_dir, odd)
        servers = []
        for _ in range(2):  # (one of the two connections goes to odd first)
            c = connect(lb.lb.port)
            for _ in range(6):  # one at a time: each read alone, the answer to the same message
                c.send(b"same\n")
                reply, ack = c.read_lines(2)
                name = reply.split(b" ")[1]
                assert reply == b"REPLY %s same" % name and ack == b"ACK %s 4" % name, (reply, ack)
                servers.append(name)
        assert servers.count(b"odd") == 3 and b"server1" in servers[servers.index(b"odd"):], servers
        lb.wait_state("odd", ("DOWN",))
    finally:
        odd.close()


def test_a_connection_notice_in_place_of_an_answer_is_no_answer(procs, log_dir):
    """A server whose idle timeout fired as the balancer sent a message says 'ERR
    idle-timeout' and closes: the client got that line as its message's answer.
    Now the message goes again, on a new connection, and nobody is blamed."""
    noticed = []

    def answer(lines):
        if b"second" in lines and not noticed:  # once: its idle timeout fired as 'second' came
            noticed.append(True)
            return b"ERR idle-timeout\n", True
        return b"".join(_pair(b"idler", m) for m in lines), False

    idler = _odd_backend(answer)
    try:
        port = cluster.free_ports(1)[0]
        balancer = procs.start(balancer_process(port, [f"idler=127.0.0.1:{idler.getsockname()[1]}"],
                                                "--check", "connect", "--check-interval", "30",
                                                log_dir=str(log_dir)))
        conn = LineConn(balancer.port)
        conn.send(b"first\n")
        assert conn.read_lines(2) == [b"REPLY idler first", b"ACK idler 5"]
        conn.send(b"second\n")
        assert conn.read_lines(2) == [b"REPLY idler second", b"ACK idler 6"]
        conn.close()
        assert one_message(balancer.port, b"third") == _pair(b"idler", b"third")  # not marked down
    finally:
        idler.close()


def test_a_line_too_long_for_the_backends_takes_none_of_them_down(lb, log_dir):
    """The balancer's line limit above its servers': each such line was relayed,
    answered ERR line-too-long and the close, and the close counted against the
    backend, so three lines took the whole cluster down (ERR no-backend for
    everyone). Now the client's session ends there, as with the server itself."""
    lb.start("--max-line", "100000")
    for _ in range(4):
        data = send_all_then_read(lb.port, b"x" * 70000 + b"\nafter\n")
        assert data == b"ERR line-too-long\n"
    assert [b["state"] for b in lb.stats()["backends"]] == ["UP"] * 3
    assert ResponseParser().feed(one_message(lb.port, b"fine"))[0].message == b"fine"
    assert "event=backend-down" not in (log_dir / "server_log.log").read_text()


@pytest.mark.parametrize("mode, size, backends", [("message", 64, "up"), ("tcp", 64, "up"), ("message", 2, "up"),
                                                  ("message", 2, "none")])
def test_client_that_never_reads_does_not_grow_balancer_memory(lb, mode, size, backends):
    """With 2-byte messages the queue of pending ones held 75 MB under the 4 MiB
    limit (it counted their bytes, not what each costs); with no backend up, a
    client's ERR no-backend answers piled up without end (300 MB in 2 s)."""
    lb.start("--mode", mode)
    if backends == "none":
        for name in ("server1", "server2", "server3"):
            lb.servers[name].stop()
            lb.wait_state(name, ("DOWN",))
    proc = psutil.Process(lb.lb.pid)
    before = proc.memory_info().rss
    s = socket.create_connection(("127.0.0.1", lb.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.settimeout(3)
    block = (b"v" * (size - 1) + b"\n") * (2**20 // size)
    sent = 0
    try:
        while sent < 50 * 2**20:
            s.sendall(block)
            sent += len(block)
    except OSError:
        pass
    grown = proc.memory_info().rss - before
    s.close()
    assert sent < 50 * 2**20
    assert grown < 40 * 2**20


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_client_that_stops_reading_is_dropped_and_no_backend_is_blamed(lb, log_dir, flood, mode):
    """A client that pipelines and never reads: its answers back up, so the
    balancer stops reading its backend, which then looks silent. No backend may
    be marked down for that (one such client took the cluster down, one backend
    per response timeout); the client is dropped after --idle-timeout."""
    lb.start("--mode", mode, "--idle-timeout", "2")  # and --response-timeout 0.5
    flood(lb.port)
    deadline = time.monotonic() + 10
    log = log_dir / "server_log.log"
    while "code=send-timeout" not in log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "event=backend-down" not in log.read_text() and "event=failover" not in log.read_text()
    assert [b["state"] for b in lb.stats()["backends"]] == ["UP"] * 3


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_a_client_dropped_for_being_idle_is_said_in_the_log(lb, log_dir, mode):
    """The servers log the clients they drop at --idle-timeout; the balancer closed
    them with only its usual session line, as if they had left (a blackholed
    client's connection looked like a normal end)."""
    lb.start("--mode", mode, "--idle-timeout", "1")
    with socket.create_connection(("127.0.0.1", lb.port), timeout=30) as s:
        s.sendall(b"hi\n")
        data = b""
        while (chunk := s.recv(200)):  # the answer, then (message mode) the notice, then the close
            data += chunk
    assert data.startswith(b"REPLY server") and data.count(b"\n") == (3 if mode == "message" else 2), data
    if mode == "message":
        assert data.endswith(b"ERR idle-timeout\n")
    deadline = time.monotonic() + 10
    while "code=idle-timeout" not in (log := (log_dir / "server_log.log").read_text()):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.1)
    assert re.search(r" INFO balancer event=error conn=\d+ code=idle-timeout\n", log), log[-2000:]


def taken_in(port: int) -> socket.socket:
    """A connection the server (or balancer) has counted: it answers it. One still counted
    as open (the start's probe, the balancer's last) can make it say busy: ask again."""
    deadline = time.monotonic() + 10
    while True:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"fill\n")
        data = b""
        while data.count(b"\n") < 2 and (chunk := s.recv(200)):
            data += chunk
        if data.startswith(b"REPLY "):
            return s
        s.close()
        assert data == b"ERR busy\n" and time.monotonic() < deadline, data
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_a_refused_client_that_sends_late_still_reads_its_error(lb, mode):
    """The balancer refuses a client (over --max-connections; in tcp mode also with
    no backend UP) as it connects, before the client has sent anything. It lingers
    as nginx does: what the client sends next is read and dropped, not answered by
    a reset that could destroy the ERR line (the client lost it every time)."""
    lb.start("--mode", mode, "--max-connections", "1")
    with taken_in(lb.port):
        for _ in range(3):
            assert one_message(lb.port, delay=0.3) == b"ERR busy\n"
    # Logged, a line a second at most (they went unsaid), the rest of a burst by the sweep
    # (and taken_in may have been refused too, while the start's probe was still counted).
    log_file = Path(lb.log_dir) / "server_log.log"
    deadline = time.monotonic() + 15
    while (said := sum(map(int, re.findall(r"event=busy refused=(\d+) open=\d max_clients=1 reason=max-connections",
                                           log_file.read_text())))) < 3:
        assert time.monotonic() < deadline, f"refusals logged: {said} of 3"
        time.sleep(0.05)
    if mode == "tcp":
        for name in ("server1", "server2", "server3"):
            lb.servers[name].stop()
        for name in ("server1", "server2", "server3"):
            lb.wait_state(name, ("DOWN",))
        assert one_message(lb.port, delay=0.3) == b"ERR no-backend\n"


def test_a_backend_at_its_connection_limit_is_passed_over_not_marked_down(procs, log_dir):
    """An echo server at --max-connections says ERR busy as it takes a connection.
    That answers no message: the balancer moves the client to another backend
    and marks nothing down; with every backend full, the client gets ERR busy.
    A health check that meets it fails with the reason "busy"."""
    ports = cluster.free_ports(5)
    limits = ("2", "1", "2")  # 2: room for a client while the previous one's close is still on its way
    for i in range(3):
        procs.start(cluster.echo_server(f"server{i + 1}", ports[i], "--max-connections", limits[i],
                                        log_dir=str(log_dir)))

    full = [taken_in(ports[1])]  # server2 has no room left
    # --keepalive 0: no idle connection of the balancer's holds a place in a server (reuse.py).
    balancer = procs.start(balancer_process(ports[3], [f"server{i + 1}=127.0.0.1:{ports[i]}" for i in range(3)],
                                            "--check-interval", "30", "--keepalive", "0", admin_port=ports[4],
                                            log_dir=str(log_dir)))
    try:
        replies = [one_message(balancer.port, b"m%d" % i) for i in range(9)]
        assert all(r.startswith(b"REPLY server1 ") or r.startswith(b"REPLY server3 ") for r in replies), replies
        for port in (ports[0], ports[0], ports[2], ports[2]):  # (once the balancer's last ones are gone)
            full.append(taken_in(port))
        assert one_message(balancer.port) == b"ERR busy\n"
        assert one_message(balancer.port, delay=0.3) == b"ERR busy\n"  # (was a reset: said and closed before it came)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[4]}/stats", timeout=10) as r:
            backends = {b["name"]: b for b in json.load(r)["backends"]}
        assert all(b["state"] != "DOWN" for b in backends.values())
        assert backends["server2"]["reason"] == "check busy"  # the one check so far, at start
    finally:
        for s in full:
            s.close()


def _backends(admin_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=10) as r:
        return {b["name"]: b for b in json.load(r)["backends"]}


def _wait_log(log_dir, text: str, timeout: float = 10) -> str:
    """The log, once ``text`` is in it (it is written in batches)."""
    deadline = time.monotonic() + timeout
    while text not in (log := (Path(log_dir) / "server_log.log").read_text()):
        assert time.monotonic() < deadline, f"never logged: {text}"
        time.sleep(0.05)
    return log


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_a_connect_that_times_out_goes_to_the_next_backend_and_counts_toward_fall(procs, log_dir, mode):
    """A backend whose accept queue is full drops the SYNs: the client's connect is
    given up after --connect-timeout and it is served by the next backend at once.
    A connect timeout is no proof of a dead backend (one lost SYN is sent again only
    after a second, the default connect timeout): the silent one is DOWN at --fall
    of them in a row, not at the first, as it was (the checks, every 30 s, are not
    the ones; the first, at start, only makes it FALLING)."""
    with FullBacklog() as stuck:
        ports = cluster.free_ports(3)
        good = procs.start(cluster.echo_server("good", ports[0], log_dir=str(log_dir)))
        balancer = procs.start(balancer_process(
            ports[1], [f"stuck=127.0.0.1:{stuck.port}", f"good=127.0.0.1:{good.port}"], "--mode", mode,
            "--connect-timeout", "0.5", "--check-interval", "30", "--fall", "3", admin_port=ports[2],
            log_dir=str(log_dir)))
        # Round-robin: each client tries stuck first, then good (the start's probe of the
        # port, a client that connects and leaves, had stuck's turn and counts too).
        seen_up = []
        for _ in range(8):
            start = time.monotonic()
            assert one_message(balancer.port) == b"REPLY good hi\nACK good 2\n"
            assert time.monotonic() - start < 8  # the connect timeout, not the kernel's minutes
            stuck_now = _backends(ports[2])["stuck"]
            assert (stuck_now["state"] == "DOWN") == (stuck_now["failures"] >= 3), stuck_now
            if stuck_now["failures"] >= 3:
                break
            seen_up += [stuck_now["failures"]] if stuck_now["failures"] else []
        assert seen_up and stuck_now["reason"] == "connect-timeout (3 in a row)", stuck_now
        assert one_message(balancer.port) == b"REPLY good hi\nACK good 2\n"  # stuck is not tried now
        assert _backends(ports[2])["stuck"]["failures"] == 3
        log = _wait_log(log_dir, "event=backend-down backend=stuck")
        assert "backend=stuck in_a_row=1 down_at=3" in log and "backend=stuck in_a_row=3 down_at=3" in log


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_connects_that_time_out_once_a_backend_is_down_are_not_a_line_each(procs, log_dir, mode):
    """Every connect timed out was a warning line, also those still under way when
    the backend went DOWN: a burst of clients wrote one each. Said while they count."""
    with FullBacklog() as stuck:
        ports = cluster.free_ports(2)
        good = procs.start(cluster.echo_server("good", ports[0], log_dir=str(log_dir)))
        balancer = procs.start(balancer_process(
            ports[1], [f"stuck=127.0.0.1:{stuck.port}", f"good=127.0.0.1:{good.port}"], "--mode", mode,
            "--connect-timeout", "0.5", "--check-interval", "30", "--fall", "3", "--admin-port", "0",
            log_dir=str(log_dir)))
        with concurrent.futures.ThreadPoolExecutor(20) as pool:  # half of them try stuck first
            answers = list(pool.map(lambda _: one_message(balancer.port), range(20)))
        assert answers == [b"REPLY good hi\nACK good 2\n"] * 20
        _wait_log(log_dir, "event=backend-down backend=stuck")
        time.sleep(1)  # (the last batch of lines)
        lines = re.findall(r"event=connect-timeout conn=\d+ backend=stuck in_a_row=(\d+) down_at=3 timeouts=(\d+)",
                           (log_dir / "server_log.log").read_text())
    # The first said at once, the rest of the burst with the one that took it DOWN.
    assert lines[0] == ("1", "1") and lines[-1][0] == "3" and sum(int(n) for _, n in lines) == 3, lines


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_connects_that_time_out_in_a_burst_are_a_line_a_second_per_backend_with_the_count(procs, log_dir, mode):
    """A link that drops some SYNs to a backend and lets others through (a connect that
    succeeds starts the count again; --fall 1000 stands for it here) never takes it
    DOWN, and every connect that timed out was a line: unbounded. Now a line a second
    at most per backend, the first at once, with how many since the last (timeouts=N)."""
    with FullBacklog() as stuck:
        ports = cluster.free_ports(3)
        good = procs.start(cluster.echo_server("good", ports[0], log_dir=str(log_dir)))
        procs.start(balancer_process(
            ports[1], [f"stuck=127.0.0.1:{stuck.port}", f"good=127.0.0.1:{good.port}"], "--mode", mode,
            "--connect-timeout", "0.2", "--check-interval", "30", "--fall", "1000", admin_port=ports[2],
            log_dir=str(log_dir)))
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(30) as pool:  # half of them try stuck first
            answers = list(pool.map(lambda _: one_message(ports[1]), range(60)))
        took = time.monotonic() - start
        assert answers == [b"REPLY good hi\nACK good 2\n"] * 60
        timed_out = _backends(ports[2])["stuck"]["failures"]
        assert timed_out >= 20
        deadline = time.monotonic() + 10
        while True:  # (the rest of the burst is said within a second, in a batch of lines)
            lines = re.findall(r"event=connect-timeout conn=\d+ backend=stuck in_a_row=\d+ down_at=1000"
                               r"(?: timeouts=(\d+))?", (log_dir / "server_log.log").read_text())
            said = sum(int(n or 1) for n in lines)
            if said >= timed_out or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert said == timed_out, (lines, timed_out)
    # A line at once, one a second at most after it, and the start's probe (stuck's turn) before.
    assert len(lines) <= took + 3, (lines, took)


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_a_client_whose_connects_time_out_tries_every_backend_once(procs, log_dir, mode):
    """After a connect timeout, a client was kept off only the backend that had just
    timed out: sent back to an earlier one, it ran out of tries (one per backend)
    and got ERR no-backend while a healthy backend was never tried."""
    with FullBacklog() as stuck1, FullBacklog() as stuck2:
        ports = cluster.free_ports(2)
        good = procs.start(cluster.echo_server("good", ports[0], log_dir=str(log_dir)))
        balancer = procs.start(balancer_process(
            ports[1], [f"stuck1=127.0.0.1:{stuck1.port}", f"stuck2=127.0.0.1:{stuck2.port}",
                       f"good=127.0.0.1:{good.port}"], "--mode", mode, "--algorithm", "p2c",
            "--connect-timeout", "0.3", "--check-interval", "30", "--fall", "1000", "--admin-port", "0",
            log_dir=str(log_dir)))
        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(lambda _: one_message(balancer.port), range(30)))
    assert answers == [b"REPLY good hi\nACK good 2\n"] * 30, [a for a in answers if not a.startswith(b"REPLY")]


def _answer_line(conn: socket.socket) -> None:
    """A backend's answer to one message (a health check's)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            return
        line += chunk
    conn.sendall(_pair(b"slow", line[:-1]))


def test_a_check_whose_connect_takes_a_second_passes_the_connect_is_not_the_check_timeouts(procs, log_dir):
    """A backend whose connect takes a second (its SYN dropped once, as on a lossy or
    distant network) but that answers at once passes its check: as in HAProxy, the
    connect has --connect-timeout (at most --check-interval) and only the exchange
    after it --check-timeout. With one bound for both, every backend half a check
    timeout away, round trip, was marked down while it served its traffic."""
    with FullBacklog() as slow:
        ports = cluster.free_ports(2)
        procs.start(balancer_process(ports[0], [f"slow=127.0.0.1:{slow.port}"], "--check-timeout", "0.8",
                                     "--connect-timeout", "5", "--check-interval", "5", "--fall", "1",
                                     admin_port=ports[1], log_dir=str(log_dir)))
        slow.wait_for_syn()  # the first check's connect, its SYN dropped
        slow.open(_answer_line)  # room for its SYN's resend, a second after the first
        deadline = time.monotonic() + 20
        while (b := _backends(ports[1])["slow"])["checks_ok"] + b["checks_failed"] == 0:
            assert time.monotonic() < deadline, "no check was made"
            time.sleep(0.05)
        assert b["checks_ok"] == 1 and b["state"] == "UP", b


def test_tcp_mode_relays_a_long_pipelined_stream_intact(lb):
    """40,000 pipelined messages (4.6 MB) each way through the byte relay, read
    only after a second: the sockets fill both ways, so chunks are sent in parts
    and reading each side pauses and resumes."""
    lb.start("--mode", "tcp")
    messages = [b"m%d-" % i + b"x" * 100 for i in range(40_000)]
    responses = pipeline(lb.port, messages, read_after=1)
    assert len(responses) == len(messages)
    assert all(r.matches(m) for r, m in zip(responses, messages))
    assert len({r.server for r in responses}) == 1  # one connection, one backend


def test_tcp_mode_backend_names_resolve_at_start(procs, log_dir):
    """``localhost`` may list ::1 first; the servers listen on 127.0.0.1. A name
    that does not resolve stops the start with a clear error."""
    server = procs.start(cluster.echo_server("solo", cluster.free_port(), log_dir=str(log_dir)))
    port = cluster.free_port()
    procs.start(balancer_process(port, [f"solo=localhost:{server.port}"], "--mode", "tcp", log_dir=str(log_dir)))
    assert one_message(port) == b"REPLY solo hi\nACK solo 2\n"
    bad = subprocess.run(cluster.python_script("Load_Balancer.py", "--mode", "tcp", "--port", "0", "--admin-port",
                                               "0", "--backend", "nowhere.invalid:7001", "--log-dir", str(log_dir)),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "nowhere.invalid" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("script, flags", [("Load_Balancer.py", ("--mode", "message", "--admin-port", "0")),
                                           ("Load_Balancer.py", ("--mode", "tcp", "--admin-port", "0")),
                                           ("Load_Balancer.py", ("--admin-port", "0", "--algorithm", "leastconn")),
                                           ("http_servers/lb.py", ())])
def test_a_backend_at_the_balancers_own_address_is_refused(script, flags, log_dir):
    """It started, and connected to itself in a loop: 17,000 connections in 3 s
    (``python Load_Balancer.py --port 7001``, meant for server1, does this); lb.py
    sent each request round itself until its headers grew past the limit. Also
    by name (localhost)."""
    port = cluster.free_port()
    host = "localhost" if "leastconn" in flags else "127.0.0.1"
    bad = subprocess.run(cluster.python_script(script, "--port", str(port), *flags, "--backend", f"{host}:{port}",
                                               "--backend", f"127.0.0.1:{cluster.free_port()}",
                                               "--log-dir", str(log_dir)),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert f"{host}:{port}" in bad.stderr and "own address" in bad.stderr, bad.stderr


def test_a_wildcard_listener_is_every_address_of_its_family():
    """(Checked without listening on every interface.)"""
    assert is_listener([("0.0.0.0", 7000)], socket.AF_INET, ("127.0.0.1", 7000))
    assert is_listener([("0.0.0.0", 7000)], socket.AF_INET, ("127.0.0.2", 7000))  # (all of 127/8 is local)
    assert not is_listener([("0.0.0.0", 7000)], socket.AF_INET, ("127.0.0.1", 7001))
    assert not is_listener([("0.0.0.0", 7000)], socket.AF_INET, ("192.0.2.1", 7000))  # (TEST-NET: not here)
    assert not is_listener([("0.0.0.0", 7000)], socket.AF_INET6, ("::1", 7000, 0, 0))
    assert is_listener([("127.0.0.1", 7000)], socket.AF_INET, ("127.0.0.1", 7000))
    assert not is_listener([("127.0.0.1", 7000)], socket.AF_INET, ("127.0.0.2", 7000))


def test_lb_refuses_a_backend_name_that_does_not_resolve(log_dir):
    """As Load_Balancer.py, nginx and HAProxy do; it started and answered 503 to everything."""
    bad = subprocess.run(cluster.python_script("http_servers/lb.py", "--port", "0", "--backend", "nowhere.invalid:9002",
                                               "--log-dir", str(log_dir)), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "nowhere.invalid" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_ipv6_hosts_in_brackets_in_the_config_file(procs, log_dir, tmp_path):
    """``host = "[::1]"`` as ``--host [::1]`` and ``--backend [::1]:PORT`` take it: it
    was "cannot resolve '[::1]'" (Load_Balancer.py) and a start over a backend that
    answered 503 for ever (lb.py)."""
    try:
        ports = [cluster.free_port("::1") for _ in range(2)]
    except OSError:
        pytest.skip("no ::1 on this machine")
    server = procs.start(cluster.echo_server("six", ports[0], log_dir=str(log_dir), host="::1"))
    toml = tmp_path / "six.toml"
    toml.write_text(f'[balancer]\nhost = "[::1]"\nport = {ports[1]}\nadmin-port = 0\n\n'
                    f'[[backends]]\nname = "six"\nhost = "[::1]"\nport = {server.port}\n')
    procs.start(cluster.Process("balancer", cluster.python_script("Load_Balancer.py", "--config", str(toml),
                                                                  "--log-dir", str(log_dir)),
                                port=ports[1], host="::1"))
    assert send_all_then_read(ports[1], b"over six\n", "::1") == b"REPLY six over six\nACK six 8\n"


@pytest.mark.parametrize("mode", ["tcp", "message"])
def test_balancer_over_ipv6_loopback(procs, log_dir, mode):
    try:
        ports = [cluster.free_port("::1") for _ in range(2)]
    except OSError:
        pytest.skip("no ::1 on this machine")
    server = procs.start(cluster.echo_server("six", ports[0], log_dir=str(log_dir), host="::1"))
    balancer = procs.start(balancer_process(ports[1], [f"six=[::1]:{server.port}"], "--mode", mode,
                                            log_dir=str(log_dir), host="::1"))
    assert send_all_then_read(balancer.port, b"over six\n", "::1") == b"REPLY six over six\nACK six 8\n"
    assert f"listening on [::1]:{balancer.port} " in balancer.stderr()  # (was ::1:PORT)


def test_session_log_names_the_backends_used(lb, log_dir):
    lb.start()
    one_message(lb.port)
    lb.lb.stop()
    text = (log_dir / "server_log.log").read_text()
    assert " balancer event=session " in text and "backends=server1" in text


def test_toml_config_and_bad_flags(tmp_path, procs, log_dir):
    server = procs.start(cluster.echo_server("solo", cluster.free_port(), log_dir=str(log_dir)))
    toml = tmp_path / "c.toml"
    toml.write_text(f'[balancer]\nalgorithm = "leastconn"\n\n[[backends]]\nname = "solo"\nport = {server.port}\n')
    port = cluster.free_port()
    procs.start(cluster.Process("lb", cluster.python_script(
        "Load_Balancer.py", "--config", str(toml), "--port", str(port), "--admin-port", "0",
        "--log-dir", str(log_dir)), port=port))
    assert one_message(port) == b"REPLY solo hi\nACK solo 2\n"
    bad = subprocess.run(cluster.python_script("Load_Balancer.py", "--backend", "nonsense", "--log-dir",
                                               str(log_dir)), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "nonsense" in bad.stderr and "Traceback" not in bad.stderr
    same = subprocess.run(cluster.python_script("Load_Balancer.py", "--port", "7500", "--admin-port", "7500",
                                                "--log-dir", str(log_dir)), capture_output=True, text=True, timeout=30)
    assert same.returncode == 2 and "--admin-port 7500 is the balancer's own --port" in same.stderr


@pytest.mark.parametrize("text, message", [
    ('[[backends]]\nport = "abc"\n', "port must be a whole number, got 'abc'"),
    ('[balancer]\nrise = "two"\n', "rise must be a whole number"),
    ("balancer = 5\n", "expected a table of settings"),
    ("[[backends]]\nhost = 5\nport = 7001\n", "host must be a string"),
    ("backends = []\n", "[[backends]] must list at least one backend"),
    ("[[backends]]\nport = 7001\nwieght = 3\n", "unknown setting 'wieght'"),
    ("[balancr]\nport = 1\n", "unknown tables balancr"),
    ("[[backends]]\nport = true\n", "port must be a whole number, got True"),
    ("[balancer]\nmax-line = 0\n", "--max-line must be 1 to"),
    ("[balancer]\nmax-line = 99999999999999\n", "--max-line must be 1 to"),
    ('[[backends]]\nport = 7001\nname = "a b"\n', "printable ASCII, no spaces"),
    ('[balancer]\nlog-level = "warning"\n', "unknown setting 'log-level'"),  # (was taken, and ignored)
    ("[balancer]\ncheck-interval = inf\n", "--check-interval must be positive, at most a year, got inf"),
    ("[balancer]\ndrain-timeout = -1.0\n", "--drain-timeout must be 0 or more"),
    ('[balancer]\nname = "a=b"\n', "--name 'a=b': printable ASCII, no spaces"),
    ('[balancer]\nhost = ""\n', "host: give a host name or address"),  # (listened on every interface)
    ('[balancer]\nname = ""\n', "--name: give it a name"),
])
def test_a_bad_config_file_is_one_clear_line(tmp_path, log_dir, text, message):
    """Each was a traceback, or accepted (an empty backend list meant the default backends)."""
    assert_bad_config("Load_Balancer.py", text, tmp_path, message, "--port", "0", "--admin-port", "0",
                      "--log-dir", str(log_dir))


@pytest.mark.parametrize("flag, value", [("--check-interval", "inf"), ("--response-timeout", "nan"),
                                         ("--drain-timeout", "inf"), ("--idle-timeout", "-1")])
def test_a_timeout_that_is_no_finite_number_is_a_usage_error(flag, value, log_dir):
    """--check-interval inf was taken: a backend that went down stayed down for good."""
    assert_usage_error("Load_Balancer.py", flag, value, "--log-dir", str(log_dir), message=f"argument {flag}")


def test_a_config_file_that_cannot_be_read_is_one_clear_line(tmp_path, log_dir):
    """A file not in UTF-8 was a traceback; a folder a bare "[Errno 21]" and exit 1."""
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[balancer]\nmode = "m\xe9ssage"\n')
    assert_usage_error("Load_Balancer.py", "--config", str(latin), "--log-dir", str(log_dir),
                       message="not valid TOML")
    assert_usage_error("Load_Balancer.py", "--config", str(tmp_path), "--log-dir", str(log_dir),
                       message="cannot read it")


def test_the_config_files_port_holds_unless_the_flag_is_given(tmp_path, procs, log_dir):
    """The command line's defaults replaced the file's port, host and admin port."""
    server = procs.start(cluster.echo_server("solo", cluster.free_port(), log_dir=str(log_dir)))
    port = cluster.free_port()
    toml = tmp_path / "c.toml"
    toml.write_text(f"[balancer]\nport = {port}\nadmin-port = 0\n\n[[backends]]\nname = \"solo\"\n"
                    f"port = {server.port}\n")
    procs.start(cluster.Process("lb", cluster.python_script("Load_Balancer.py", "--config", str(toml),
                                                            "--log-dir", str(log_dir)), port=port))
    assert one_message(port) == b"REPLY solo hi\nACK solo 2\n"


def test_two_balancers_in_one_log_go_by_their_names(tmp_path, procs, log_dir):
    """Both wrote their lines as 'balancer': whose backend went down was anyone's guess.
    The name comes from the config file, and --name wins over it."""
    server = procs.start(cluster.echo_server("solo", cluster.free_port(), log_dir=str(log_dir)))
    toml = tmp_path / "c.toml"
    toml.write_text(f'[balancer]\nname = "front-tcp"\nmode = "tcp"\nadmin-port = 0\n\n[[backends]]\n'
                    f'name = "solo"\nport = {server.port}\n')
    ports = cluster.free_ports(2)
    for port, extra in ((ports[0], ()), (ports[1], ("--name", "front-msg", "--mode", "message"))):
        procs.start(cluster.Process("lb", cluster.python_script(
            "Load_Balancer.py", "--config", str(toml), "--port", str(port), *extra, "--log-dir", str(log_dir)),
            port=port))
        assert one_message(port) == b"REPLY solo hi\nACK solo 2\n"
    deadline = time.monotonic() + 10
    while True:
        log = (log_dir / "server_log.log").read_text()
        if " INFO front-tcp event=session " in log and " INFO front-msg event=session " in log:
            break
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.1)
    assert " balancer event=" not in log and " WARNING front-msg event=listen " in log


@pytest.mark.parametrize("mode", ["tcp", "message"])
def test_closed_connections_release_their_sockets(lb, mode):
    lb.start("--mode", mode)
    proc = psutil.Process(lb.lb.pid)
    for _ in range(20):
        one_message(lb.port)
    before = proc.num_fds()
    for _ in range(200):
        one_message(lb.port)
    deadline = time.monotonic() + 10
    while proc.num_fds() > before + 5:
        assert time.monotonic() < deadline, f"{proc.num_fds() - before} sockets leaked"
        time.sleep(0.05)


@pytest.mark.parametrize("check, up", [("connect", True), ("message", False)])
def test_tcp_mode_with_connect_checks_relays_a_server_that_does_not_speak_the_protocol(procs, log_dir, connect,
                                                                                       check, up):
    """--check connect (HAProxy's plain check): python's http.server behind --mode tcp
    stays up and its answers come through; the message check takes it out."""
    ports = cluster.free_ports(2)
    procs.start(cluster.Process("pyhttp", [sys.executable, "-m", "http.server", str(ports[0]), "--bind",
                                           "127.0.0.1", "--directory", str(cluster.ROOT / "http_servers" / "www")],
                                port=ports[0]))
    balancer = procs.start(balancer_process(ports[1], [f"web=127.0.0.1:{ports[0]}"], *FAST_CHECKS, "--mode", "tcp",
                                            "--check", check, "--admin-port", "0", log_dir=str(log_dir)))
    time.sleep(1)  # several checks
    if not up:  # two failed checks (--fall 2) take it out: by now, unless this run is slow
        log = log_dir / "server_log.log"
        deadline = time.monotonic() + 10
        while "event=backend-down backend=web" not in log.read_text():
            assert time.monotonic() < deadline, "the message check never took the backend out"
            time.sleep(0.05)
    conn = connect(balancer.port)
    conn.send(b"GET /page.html HTTP/1.0\r\n\r\n")
    data = conn.read_all()
    if up:
        assert data.startswith(b"HTTP/1.0 200"), data[:200]
    else:
        assert data == b"ERR no-backend\n"


def _cluster_with_few_files(procs, log_dir, nofile: int, *args: str, admin_port: int = 0) -> cluster.Process:
    """Three servers and a balancer whose open-files limit is ``nofile`` (prlimit)."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    ports = cluster.free_ports(4)
    backends = []
    for i in range(3):
        procs.start(cluster.echo_server(f"server{i + 1}", ports[i], log_dir=str(log_dir)))
        backends.append(f"server{i + 1}=127.0.0.1:{ports[i]}")
    proc = balancer_process(ports[3], backends, *args, admin_port=admin_port, log_dir=str(log_dir))
    proc.argv = ["prlimit", f"--nofile={nofile}:{nofile}", *proc.argv]
    return procs.start(proc)


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_out_of_descriptors_clients_get_err_busy_and_no_backend_is_marked_down(procs, log_dir, mode):
    """A flood past what the open-files limit holds (here 120): the balancer runs out
    of descriptors, not its backends. Each client gets its answer or ERR busy, never
    ERR no-backend, no backend goes down, and service goes on once the flood is gone."""
    balancer = _cluster_with_few_files(procs, log_dir, 120, "--mode", mode)
    clients, answers = [], []
    for _ in range(150):
        try:
            s = socket.create_connection(("127.0.0.1", balancer.port), timeout=10)
            s.sendall(b"hi\n")
            clients.append(s)
        except OSError:
            answers.append("refused")  # the kernel's queue, full while the balancer has no descriptor to accept
    for s in clients:
        try:
            data = s.recv(100)
        except OSError:
            data = b""
        answers.append("ok" if data.startswith(b"REPLY ") else "busy" if data == b"ERR busy\n" else repr(data))
        s.close()
    assert answers.count("ok") >= 10 and set(answers) <= {"ok", "busy", "refused", "b''"}, answers
    log = (log_dir / "server_log.log").read_text()
    assert "backend-down" not in log and "no-backend" not in log
    deadline = time.monotonic() + 10
    while one_message(balancer.port, b"after") == b"ERR busy\n":  # descriptors come back as closes complete
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert one_message(balancer.port, b"after").startswith(b"REPLY server")


def test_the_admin_port_cannot_take_the_balancer_down(procs, log_dir):
    """A never-ending request line on the admin port grew a buffer without bound and
    stalled the loop the traffic shares, and 120 idle admin connections took every
    descriptor, so the health checks failed (EMFILE) and marked every backend DOWN:
    clients got ERR no-backend. Now: 431 past 8 KiB, at most 32 admin connections,
    and a check that cannot be made here counts neither way. A scraper after the
    idle ones is served (it closes the oldest idle one; it used to get a 503), and
    it gets a 503 only when 32 connections have each begun a request."""
    admin_port = cluster.free_port()
    balancer = _cluster_with_few_files(procs, log_dir, 100, *FAST_CHECKS, admin_port=admin_port)
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


@pytest.mark.parametrize("target", ["server", "balancer"])
def test_a_line_trickled_too_slowly_gets_err_line_timeout_and_lines_in_pieces_do_not(procs, log_dir, connect,
                                                                                     target):
    """A slowloris (a line begun and never ended, bytes or not) gets ERR line-timeout
    after the answers due, from the server and from the balancer in message mode; a
    client whose every line comes in two pieces, for three times that long, is served."""
    ports = cluster.free_ports(2)
    server = procs.start(cluster.echo_server("server1", ports[0], "--line-timeout",
                                             "0.5" if target == "server" else "0", log_dir=str(log_dir)))
    port = server.port
    if target == "balancer":
        port = procs.start(balancer_process(ports[1], [f"server1=127.0.0.1:{ports[0]}"], "--line-timeout", "0.5",
                                            "--admin-port", "0", log_dir=str(log_dir))).port
    slow = connect(port)
    slow.send(b"one\nslo")
    busy = connect(port)
    for i in range(15):
        busy.send(b"pie")
        time.sleep(0.05)
        busy.send(b"ce%d\n" % i)
        time.sleep(0.05)
    busy.sock.shutdown(socket.SHUT_WR)
    answers = ResponseParser().feed(busy.read_all())
    assert [r.message for r in answers] == [b"piece%d" % i for i in range(15)]
    assert slow.read_all() == b"REPLY server1 one\nACK server1 3\nERR line-timeout\n"


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_a_flood_past_the_open_files_limit_gets_err_busy_and_the_clients_in_are_served(procs, log_dir, mode):
    """With ulimit -n 64, 100 clients at once: those past the limit get ERR busy,
    the others are served. The lingering closes of the refused held the
    descriptors the backend connections needed (connect-emfile, timeouts)."""
    ports = cluster.free_ports(4)
    for i in range(3):
        procs.start(cluster.echo_server(f"server{i + 1}", ports[i], log_dir=str(log_dir)))
    backends = [f"server{i + 1}=127.0.0.1:{ports[i]}" for i in range(3)]
    proc = balancer_process(ports[3], backends, "--mode", mode, log_dir=str(log_dir))
    proc.argv = ["sh", "-c", 'ulimit -n 64 && exec "$0" "$@"', *proc.argv]  # (sh becomes the balancer: its PID)
    procs.start(proc)
    socks = [socket.create_connection(("127.0.0.1", ports[3]), timeout=10) for _ in range(100)]
    try:
        _, served = turned_away_or_in(socks, b"ERR busy\n")
        for i, s in enumerate(served):
            answer = two_lines(s, b"m%d" % i)
            assert answer.startswith(b"REPLY server") and answer.split(b"\n")[0].endswith(b" m%d" % i), answer
    finally:
        for s in socks:
            s.close()
