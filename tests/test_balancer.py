"""Load_Balancer.py and its clients, as real processes: oversized lines,
garbage, half-closes, clients that never read or trickle, refused and idle
clients, descriptors running out; and the byte relay (--mode tcp) itself."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from clusterkit import cluster
from clusterkit.balancer import balancer_process
from clusterkit.protocol import ResponseParser

from .balancer_setup import FAST_CHECKS, cluster_with_few_files, one_message, pipeline, server_of, taken_in
from .conftest import send_all_then_read, turned_away_or_in, two_lines

pytestmark = pytest.mark.timeout(90)


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


def test_many_clients_that_never_read_cost_the_balancer_little_each(lb):
    """Each client that sent and never read held up to 4 MiB of pending messages:
    1.5-3 MB of the balancer's memory apiece, a few thousand of them gigabytes
    (a server holds 0.3 MB for one). Now the limit is the servers' own 256 KiB."""
    lb.start()
    proc = psutil.Process(lb.lb.pid)
    before = proc.memory_info().rss
    clients = []

    def flood() -> None:
        s = socket.create_connection(("127.0.0.1", lb.port))
        clients.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.settimeout(2)
        block = (b"v" * 99 + b"\n") * 10_000
        try:
            for _ in range(20):  # 20 MB at most, each
                s.sendall(block)
        except OSError:
            pass  # (blocked: the balancer reads it no more)

    threads = [threading.Thread(target=flood) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    grown = proc.memory_info().rss - before
    for s in clients:
        s.close()
    assert grown < 20 * 2**20, f"{grown / 2**20:.1f} MB for 20 clients"


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


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_out_of_descriptors_clients_get_err_busy_and_no_backend_is_marked_down(procs, log_dir, mode):
    """A flood past what the open-files limit holds (here 120): the balancer runs out
    of descriptors, not its backends. Each client gets its answer or ERR busy, never
    ERR no-backend, no backend goes down, and service goes on once the flood is gone."""
    balancer = cluster_with_few_files(procs, log_dir, 120, "--mode", mode)
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
