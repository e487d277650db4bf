"""Load_Balancer.py when backends fail, as real processes: kill -9 and SIGSTOP
under load with nothing lost, backends marked down and back, no backend at
all, backends that answer wrongly, twice or too late, connects that time out,
and the graceful stop with traffic in flight."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from clusterkit import cluster
from clusterkit.balancer import balancer_process
from clusterkit.protocol import ResponseParser

from .balancer_setup import FAST_CHECKS, Cluster, one_message, pipeline, server_of, taken_in
from .conftest import FullBacklog, LineConn, fake_backend, send_all_then_read

pytestmark = pytest.mark.timeout(90)


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


def test_kill_9_backend_with_20000_pipelined_messages_loses_nothing(lb):
    """1000 messages answered by one backend, then 20,000 more pipelined on the same connection and
    that backend killed -9 with all of them in flight: some 3,300 in the balancer (its 256 KiB of
    pending messages), the rest in the sockets' buffers on their way. It is stopped before they are
    sent: otherwise a fast backend could answer all 20,000 before the kill (it did once in CI) and
    nothing would be shown."""
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


def test_messages_waiting_when_every_backend_stops_answering_get_err_no_backend_quickly(lb, connect):
    """Every server stopped (SIGSTOP): once the checks have taken the last one down,
    what waits gets ERR no-backend at once (SPEC.md). It waited out its response
    timeout, grown by each failover on the way (14-18 s with the defaults)."""
    lb.start("--response-timeout", "30", names=("server1", "server2"))
    conn = connect(lb.port)
    conn.send(b"hello\n")
    assert conn.read_lines(2)[0].startswith(b"REPLY server")
    for s in lb.servers.values():
        s.signal(signal.SIGSTOP)
    try:
        conn.send(b"anyone?\n")
        for name in lb.servers:
            lb.wait_state(name, ("DOWN",))
        down = time.monotonic()
        assert conn.read_lines(1) == [b"ERR no-backend"]
        assert time.monotonic() - down < 10  # generous: well under a second here; it waited the 30 s timeout
    finally:
        for s in lb.servers.values():
            s.signal(signal.SIGCONT)


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


def test_sigterm_tells_a_quiet_client_with_a_line_begun_shutting_down(lb, connect):
    """A client quiet after a line begun, at a graceful stop: the servers say ERR
    shutting-down; the balancer closed it without a word."""
    lb.start(names=("server1",))
    conn = connect(lb.port)
    conn.send(b"one\npart")
    assert conn.read_lines(2)[0] == b"REPLY server1 one"
    lb.lb.signal(signal.SIGTERM)
    assert conn.read_all() == b"ERR shutting-down\n"
    assert lb.lb.wait(timeout=20) == 0


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


def test_a_check_answered_with_an_err_line_says_its_code(procs, log_dir):
    """A server whose --max-line is under the check message's 12 bytes answers the
    check with ERR line-too-long: the backend goes down for it, with that reason,
    not "bad-reply" (the server sent a well-formed line)."""
    ports = cluster.free_ports(2)
    procs.start(cluster.echo_server("server1", ports[0], "--max-line", "10", log_dir=str(log_dir)))
    procs.start(balancer_process(ports[1], [f"server1=127.0.0.1:{ports[0]}"], *FAST_CHECKS, log_dir=str(log_dir)))
    log_file = log_dir / "server_log.log"
    deadline = time.monotonic() + 20
    while "event=backend-down backend=server1" not in (log := log_file.read_text()):
        assert time.monotonic() < deadline, log
        time.sleep(0.1)
    assert re.search(r'event=backend-down backend=server1 \S+ \S+ reason="check line-too-long', log), log


def test_a_message_failed_over_has_the_whole_response_timeout_on_its_new_backend(procs, log_dir):
    """The first backend holds the message 0.9 s, then closes without an answer; the
    second answers in 0.5 s, well within --response-timeout 1. The timeout's clock
    ran on from the first backend: the second was marked down for a response
    timeout it never had, and the client got ERR no-backend."""
    def holds_then_crashes(lines):
        if lines and lines != [b"health-check"]:
            time.sleep(0.9)
            return b"", True
        return b"".join(_pair(b"f1", m) for m in lines), False

    def slow(lines):
        if lines and lines != [b"health-check"]:
            time.sleep(0.5)
        return b"".join(_pair(b"f2", m) for m in lines), False

    f1, f2 = _odd_backend(holds_then_crashes), _odd_backend(slow)
    try:
        port = cluster.free_port()
        procs.start(balancer_process(port, [f"f1=127.0.0.1:{f1.getsockname()[1]}",
                                            f"f2=127.0.0.1:{f2.getsockname()[1]}"],
                                     "--response-timeout", "1", "--keepalive", "0", log_dir=str(log_dir)))
        # (round-robin: the start-up probe's connection took f1, this one f2, the next f1)
        assert [one_message(port, m) for m in (b"first", b"hello")] == [_pair(b"f2", b"first"),
                                                                          _pair(b"f2", b"hello")]
    finally:
        f1.close()
        f2.close()
    log = (log_dir / "server_log.log").read_text()
    assert "event=backend-down backend=f2" not in log, log


def test_one_slow_answer_moves_its_client_and_takes_no_backend_down(procs, log_dir):
    """On a slow or lossy network one answer may come late: the message goes again
    elsewhere (answered once), but the backend was marked DOWN for it at once, and
    with every backend down so, clients got ERR no-backend from live servers (found
    with a netem-like delay and loss). Now a response timeout takes a backend down
    only at --fall of them in a row, and an answer starts the count again."""
    seen: set[bytes] = set()

    def first_time_slow(name: bytes):
        def answer(lines):
            if lines and lines[0].startswith(b"late") and not seen.issuperset(lines):
                seen.update(lines)
                time.sleep(0.8)
            return b"".join(_pair(name, m) for m in lines), False
        return answer

    with _behind_a_balancer(procs, log_dir, first_time_slow, "--response-timeout", "0.3") as port:
        # (round-robin: the start-up probe's connection took f1, this one f2; its resend f1)
        assert one_message(port, b"late") == _pair(b"f1", b"late")
        names = {server_of(one_message(port, b"again%d" % i).split(b"\n")[0]) for i in range(6)}
        assert names == {"f1", "f2"}  # (f2 was not taken out: it still gets its turn)
    text = _logged(log_dir, "event=failover")
    assert re.search(r"event=failover conn=\d+ from=f2 reason=response-timeout pending=1", text), text
    assert "event=backend-down" not in text, text


def test_backends_slower_than_the_response_timeout_still_answer_after_a_failover(procs, log_dir):
    """Every answer takes 0.5 s, the response timeout is 0.3 s (a network slower than
    it: 8 KB messages over 1 Mbit/s). Each message went from backend to backend
    every 0.3 s, each resend loading the link more, none was answered, and every
    backend went down (ERR no-backend). Now the next backend gets twice as long."""
    def slow(name: bytes):
        def answer(lines):
            if lines and lines != [b"health-check"]:
                time.sleep(0.5)
            return b"".join(_pair(name, m) for m in lines), False
        return answer

    with _behind_a_balancer(procs, log_dir, slow, "--response-timeout", "0.3") as port:
        for m in (b"one", b"two", b"three"):
            assert one_message(port, m) in (_pair(b"f1", m), _pair(b"f2", m))
    log = _logged(log_dir, "reason=response-timeout")
    assert "event=backend-down" not in log, log


@contextlib.contextmanager
def _behind_a_balancer(procs, log_dir, answer: Callable[[bytes], Callable], *args: str):
    """A balancer (its port) over two ``_odd_backend``, f1 and f2, answering with
    ``answer(name)``, without idle connections kept (``--keepalive 0``)."""
    f1, f2 = _odd_backend(answer(b"f1")), _odd_backend(answer(b"f2"))
    try:
        port = cluster.free_port()
        procs.start(balancer_process(port, [f"f1=127.0.0.1:{f1.getsockname()[1]}",
                                            f"f2=127.0.0.1:{f2.getsockname()[1]}"],
                                     "--keepalive", "0", *args, log_dir=str(log_dir)))
        yield port
    finally:
        f1.close()
        f2.close()


def _logged(log_dir: Path, text: str) -> str:
    """The balancer's log once ``text`` is in it (written in batches, by a thread)."""
    deadline = time.monotonic() + 10
    while text not in (log := (log_dir / "server_log.log").read_text()):
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
    return log


def test_an_idle_timeout_that_crosses_a_waiting_connections_first_message_blames_no_backend(procs, log_dir):
    """The balancer connects to a backend as its client connects. A client silent for
    longer than the server's idle timeout has its first message cross the server's
    ERR idle-timeout: that was taken for a broken backend's answer (a connection
    that had served nothing), the backend was marked down and, alone, every
    client got ERR no-backend. It is stale: the message goes again on a new
    connection to the same server."""
    def serve(conn: socket.socket) -> None:
        opened = time.monotonic()
        buf = b""
        while data := conn.recv(65536):
            buf += data
            *lines, buf = buf.split(b"\n")
            if lines and time.monotonic() - opened > 0.2:  # its idle timer fired as the message came
                conn.sendall(b"ERR idle-timeout\n")
                return
            conn.sendall(b"".join(_pair(b"s1", m) for m in lines))

    with fake_backend(serve) as backend_port:
        port = cluster.free_port()
        procs.start(balancer_process(port, [f"s1=127.0.0.1:{backend_port}"], "--keepalive", "0",
                                     log_dir=str(log_dir)))
        client = LineConn(port)
        time.sleep(0.4)  # silent, as the client of a person typing
        client.send(b"late\n")
        assert client.read_lines(2) == _pair(b"s1", b"late").split(b"\n")[:2]
        client.close()
    assert "event=backend-down" not in (log_dir / "server_log.log").read_text()


def test_the_balancers_own_idle_connections_do_not_get_a_full_server_marked_down(procs, log_dir):
    """A server whose --max-connections the balancer's idle pool fills (4 clients
    come and go: 4 idle connections kept) refuses the health check with ERR
    busy: it was marked down for it (check busy), and the next clients got ERR
    no-backend. Now such a check closes one of those idle connections and
    counts neither way."""
    ports = cluster.free_ports(2)
    procs.start(cluster.echo_server("server1", ports[0], "--max-connections", "4", log_dir=str(log_dir)))
    procs.start(balancer_process(ports[1], [f"server1=127.0.0.1:{ports[0]}"], *FAST_CHECKS, log_dir=str(log_dir)))
    clients: list[LineConn] = []  # four at once: four backend connections
    for _ in range(100):  # (one that meets a health check's connection in the server's four gets ERR busy)
        if len(clients) == 4:
            break
        c = LineConn(ports[1])
        c.send(b"m\n")
        if c.read_lines(2) == [b"REPLY server1 m", b"ACK server1 1"]:
            clients.append(c)
        else:
            c.close()
            time.sleep(0.02)
    assert len(clients) == 4
    for c in clients:
        c.close()
    time.sleep(1.5)  # seven rounds of checks, --fall 2
    assert one_message(ports[1], b"after") == _pair(b"server1", b"after")
    assert "event=backend-down" not in (log_dir / "server_log.log").read_text()
