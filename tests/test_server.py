"""The echo server as a real process on a free port, driven over sockets."""

from __future__ import annotations

import random
import re
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from clusterkit import cluster
from clusterkit.protocol import ResponseParser

from .conftest import (assert_usage_error, send_all_then_read, turned_away_or_in, two_lines,
                       under_open_files_limit)

pytestmark = pytest.mark.timeout(60)


def pairs(name: str, messages: list[bytes]) -> list[bytes]:
    out = []
    for m in messages:
        out += [b"REPLY %s %s" % (name.encode(), m), b"ACK %s %d" % (name.encode(), len(m))]
    return out


@pytest.mark.parametrize("raw, messages", [
    (b"hello\n", [b"hello"]),
    (b"hello\r\n", [b"hello"]),
    (b"\n", [b""]),
    (b"\xff\xfe\x00 not utf-8 \x80\n", [b"\xff\xfe\x00 not utf-8 \x80"]),
    (b"x" * 65536 + b"\n", [b"x" * 65536]),
    (b"a\nb\r\n\nc\n", [b"a", b"b", b"", b"c"]),
])
def test_replies_as_spec_says(start_server, connect, raw, messages):
    server = start_server("server2")
    conn = connect(server.port)
    conn.send(raw)
    assert conn.read_lines(2 * len(messages)) == pairs("server2", messages)


def test_ten_thousand_pipelined_messages_in_random_chunks(start_server, connect):
    server = start_server()
    rng = random.Random(7)
    messages = [b"m%d-%s" % (i, b"z" * rng.randrange(0, 50)) for i in range(10_000)]
    stream = b"".join(m + b"\n" for m in messages)
    conn = connect(server.port)

    def writer():
        pos = 0
        while pos < len(stream):
            step = rng.randrange(1, 3000)
            conn.sock.sendall(stream[pos:pos + step])
            pos += step
        conn.sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=writer)
    t.start()
    data = conn.read_all(timeout=30)
    t.join()
    parser = ResponseParser()
    responses = parser.feed(data)
    assert len(responses) == len(messages)
    assert all(r.matches(m) for r, m in zip(responses, messages))


def test_half_close_gets_pending_replies_then_close(start_server, connect):
    server = start_server()
    conn = connect(server.port)
    conn.send(b"one\ntwo\nthree\n")
    conn.sock.shutdown(socket.SHUT_WR)
    data = conn.read_all()
    assert data.split(b"\n")[:-1] == pairs("server1", [b"one", b"two", b"three"])


def test_bytes_after_the_last_newline_get_err_incomplete_line_after_the_replies(start_server, connect, log_dir):
    server = start_server()
    conn = connect(server.port)
    conn.send(b"one\ntwo\nthree without newline")
    conn.sock.shutdown(socket.SHUT_WR)
    data = conn.read_all()
    assert data.split(b"\n")[:-1] == pairs("server1", [b"one", b"two"]) + [b"ERR incomplete-line"]
    deadline = time.monotonic() + 10  # the log is written by its own thread
    while "code=incomplete-line" not in (log_dir / "server_log.log").read_text():
        assert time.monotonic() < deadline, "no event=error line for the incomplete line"
        time.sleep(0.05)


def test_a_clients_protocol_errors_are_info_lines_not_warnings(start_server, connect, log_dir):
    """ERR incomplete-line and line-too-long are the client's errors, answered: info lines, as
    an HTTP server's 400 (at warning, a client repeating them wrote a line a connection)."""
    quiet = start_server("server1", "--max-line", "100", "--log-level", "warning")
    chatty = start_server("server2", "--max-line", "100")
    for server in (quiet, chatty):
        for data in (b"no newline", b"x" * 500 + b"\n"):
            conn = connect(server.port)
            conn.send(data)
            conn.sock.shutdown(socket.SHUT_WR)
            assert conn.read_all().startswith(b"ERR ")
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0  # (its last lines are written at the stop)
    log = (log_dir / "server_log.log").read_text()
    assert "server1 event=stopped" in log and "server1 event=error" not in log, log
    errors = re.findall(r" (\w+) server2 event=error conn=\d+ peer=\S+ code=([\w-]+)\n", log)
    assert sorted(errors) == [("INFO", "incomplete-line"), ("INFO", "line-too-long")], log


def test_line_over_the_limit_gets_error_and_close_others_still_served(start_server, connect):
    server = start_server("server1", "--max-line", "1000")
    victim = connect(server.port)
    other = connect(server.port)
    victim.send(b"fine\n" + b"y" * 5000 + b"\nnever\n")
    assert victim.read_all() == b"REPLY server1 fine\nACK server1 4\nERR line-too-long\n"
    other.send(b"still here\n")
    assert other.read_lines(2) == pairs("server1", [b"still here"])


def test_a_client_still_sending_its_too_long_line_reads_the_error_without_a_reset(start_server):
    """The server answers ERR line-too-long while 600 KB of the line are still coming:
    it lingers (reads and drops them until the client's EOF) instead of closing on
    unread bytes, which reset the connection under the client's send or shutdown.
    (Within the linger's 1 MB: past it, the close is meant, and races the client.)"""
    server = start_server("server1", "--max-line", "1000")
    for _ in range(3):
        assert send_all_then_read(server.port, b"fine\n" + b"y" * 600_000 + b"\nnever\n") == (
            b"REPLY server1 fine\nACK server1 4\nERR line-too-long\n")


def test_endless_line_keeps_memory_bounded(start_server, connect):
    server = start_server()
    proc = psutil.Process(server.pid)
    before = proc.memory_info().rss
    conn = connect(server.port)
    chunk = b"n" * 65536
    try:
        for _ in range(400):  # 26 MB without a newline; the server gives up long before
            conn.sock.sendall(chunk)
    except OSError:
        pass
    assert b"ERR line-too-long" in conn.read_all()
    assert proc.memory_info().rss - before < 20 * 2**20


def test_garbage_bytes_are_echoed_byte_for_byte(start_server, connect):
    server = start_server()
    rng = random.Random(3)
    blob = bytes(rng.randrange(256) for _ in range(200_000))
    messages = blob.split(b"\n")[:-1]
    conn = connect(server.port)
    conn.send(blob[:blob.rindex(b"\n") + 1])
    conn.sock.shutdown(socket.SHUT_WR)
    responses = ResponseParser().feed(conn.read_all())
    expected = [m[:-1] if m.endswith(b"\r") else m for m in messages]
    assert [r.message for r in responses] == expected
    assert all(r.length == len(r.message) for r in responses)


def test_a_thousand_concurrent_connections(start_server):
    server = start_server()
    socks = []
    try:
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
            socks.append(s)
        for i, s in enumerate(socks):
            s.sendall(b"c%d\n" % i)
        for i, s in enumerate(socks):
            expected = b"REPLY server1 c%d\nACK server1 %d\n" % (i, len(b"c%d" % i))
            got = b""
            while len(got) < len(expected):
                chunk = s.recv(4096)
                assert chunk, f"connection {i} closed early"
                got += chunk
            assert got == expected
    finally:
        for s in socks:
            s.close()


def test_client_that_never_reads_does_not_grow_server_memory(start_server):
    server = start_server()
    proc = psutil.Process(server.pid)
    before = proc.memory_info().rss
    s = socket.create_connection(("127.0.0.1", server.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.settimeout(3)
    line = b"w" * 63 + b"\n"
    block = line * 16384  # 1 MB of messages, ~1.3 MB of replies
    sent = 0
    try:
        while sent < 50 * 2**20:
            s.sendall(block)
            sent += len(block)
    except (TimeoutError, OSError):
        pass  # the server stopped reading: backpressure works
    grown = proc.memory_info().rss - before
    s.close()
    assert sent < 50 * 2**20, "the server kept reading from a client that never reads"
    assert grown < 30 * 2**20


def test_short_messages_from_clients_that_never_read_cost_little_memory_and_none_is_lost(start_server):
    """An empty line is answered with 30 times its bytes: a read of 256 KiB of them
    was answered in one go, 7.6 MB, and 20 clients that sent 1 MiB each and never
    read took the server 70 MB (3.5 MB each). Now a read is answered 16 KiB at a
    time until the writing pauses, the rest held: well under 1.5 MB each. Every
    message is answered once the client reads. (At warning: a log line a message
    would be 20 million lines.)"""
    server = start_server("server1", "--log-level", "warning")
    proc = psutil.Process(server.pid)
    before = proc.memory_info().rss
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(b"\n" * 2**20)
        time.sleep(1)
        grown = proc.memory_info().rss - before
        assert grown < 20 * 1.5 * 2**20, f"{grown / 2**20:.1f} MB for 20 clients"
        first = socks[0]
        first.shutdown(socket.SHUT_WR)
        data = bytearray()
        while chunk := first.recv(1 << 20):
            data += chunk
        assert data == b"REPLY server1 \nACK server1 0\n" * 2**20
    finally:
        for s in socks:
            s.close()


def test_client_that_never_reads_is_cut_off_after_the_idle_timeout(start_server, flood, log_dir):
    """Its answers back up, the server stops reading it, so it turns idle; an
    ERR idle-timeout and the close could not reach it either: the connection is
    dropped instead of held open for ever, and that is a warning (send-timeout,
    as the balancer says it), even at --log-level warning."""
    server = start_server("server1", "--idle-timeout", "1", "--log-level", "warning")
    proc = psutil.Process(server.pid)
    flood(server.port)
    deadline = time.monotonic() + 10
    while any(c.status == psutil.CONN_ESTABLISHED for c in proc.net_connections()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while "code=send-timeout" not in (log := (log_dir / "server_log.log").read_text()):
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
    assert re.search(r" WARNING server1 event=error conn=\d+ peer=\S+ code=send-timeout\n", log), log


def test_sigterm_answers_every_message_in_flight_then_exits_zero(start_server):
    server = start_server()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    messages = [b"inflight-%d" % i for i in range(20_000)]
    s.sendall(b"".join(m + b"\n" for m in messages))
    server.signal(signal.SIGTERM)
    data = b""
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    s.close()
    responses = ResponseParser().feed(data)
    assert len(responses) == len(messages)
    assert all(r.matches(m) for r, m in zip(responses, messages))
    assert server.wait(timeout=15) == 0


def test_sigterm_tells_a_client_with_a_line_begun_that_it_will_not_be_answered(start_server, connect):
    """A graceful stop closed it silently (SPEC: no silent drop of an unfinished line)."""
    server = start_server()
    conn = connect(server.port)
    conn.send(b"done\npartial")
    time.sleep(0.3)
    server.signal(signal.SIGTERM)
    name = b"server1"
    assert conn.read_all(timeout=15) == b"REPLY %s done\nACK %s 4\nERR shutting-down\n" % (name, name)
    assert server.wait(timeout=15) == 0


def test_idle_client_is_disconnected(start_server, connect):
    server = start_server("server1", "--idle-timeout", "0.3")
    conn = connect(server.port)
    assert conn.read_all(timeout=15) == b"ERR idle-timeout\n"


def test_connections_over_the_limit_are_told_busy(start_server, connect):
    server = start_server("server1", "--max-connections", "2")
    # start_server's readiness probe is a connection too, counted until the server has
    # read its close: a server slow to run that takes it in one batch with a and b
    # (as the asyncio loop does) tells b busy. Once it is gone both must be let in and
    # answered (with a limit of 1 they never are).
    deadline = time.monotonic() + 10
    while True:
        a, b = connect(server.port), connect(server.port)
        a.send(b"a\n")
        b.send(b"b\n")
        got = (a.read_lines(2), b.read_lines(2))
        if got == (pairs("server1", [b"a"]), pairs("server1", [b"b"])):
            break
        assert [b"ERR busy", b""] in got and time.monotonic() < deadline, got
        a.close()
        b.close()
        time.sleep(0.05)
    c = connect(server.port)
    assert c.read_all() == b"ERR busy\n"


def test_clients_turned_away_are_counted_in_a_line_a_second_not_a_line_each(start_server, connect, log_dir):
    """A flood of refused clients wrote a line each (event=reject): a client
    connecting in a loop could fill the disk. Now one event=busy line a second at
    most, with the count, and the last of a burst by itself a second on (the
    server has no sweep to say it with --idle-timeout 0 and --line-timeout 0)."""
    server = start_server("server1", "--max-connections", "1", "--idle-timeout", "0", "--line-timeout", "0")
    deadline = time.monotonic() + 10
    refused = 30
    while True:  # (the readiness probe may still hold the one place for a moment: one more refused)
        held = connect(server.port)
        held.send(b"x\n")
        if held.read_lines(2) == pairs("server1", [b"x"]):
            break
        assert time.monotonic() < deadline
        refused += 1
        held.close()
        time.sleep(0.05)
    for _ in range(30):
        c = connect(server.port)
        assert c.read_all() == b"ERR busy\n"
        c.close()
    log_file = log_dir / "server_log.log"
    pattern = r"event=busy refused=(\d+) open=1 max_clients=1 reason=max-connections"
    deadline = time.monotonic() + 15
    while (said := sum(map(int, re.findall(pattern, log_file.read_text())))) < refused:
        assert time.monotonic() < deadline, f"refusals logged: {said} of {refused}"
        time.sleep(0.05)
    text = log_file.read_text()
    assert said == refused and len(re.findall(pattern, text)) < 30 and "event=reject" not in text


@pytest.mark.parametrize("program, taken", [("server1.py", "--port"), ("Load_Balancer.py", "--port"),
                                            ("Load_Balancer.py", "--admin-port")])
def test_port_taken_gives_one_clear_line_and_exit_71(log_dir, program, taken):
    """The line names the port that was taken (the balancer has two)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"--port": cluster.free_port(), "--admin-port": 0} if program == "Load_Balancer.py" else {}
        ports[taken] = port
        args = [x for flag, p in ports.items() for x in (flag, str(p))]
        proc = subprocess.run(cluster.python_script(program, *args, "--log-dir", str(log_dir)),
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 71
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f":{port}" in lines[0] and "in use" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["two words", "s\u00e9rv\u00e9r", 'q"uote', "k=v"])
def test_bad_option_is_a_usage_error(log_dir, name):
    """A non-ASCII name was taken, and went on the wire as s?rv?r."""
    proc = subprocess.run(cluster.python_script("server1.py", "--name", name, "--log-dir", str(log_dir)),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--name" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["server1.py", "Load_Balancer.py", "client.py", "ClientServer_StressTools.py",
                                    "http_servers/lb.py", "http_servers/Server_thread_http.py"])
def test_a_log_dir_that_cannot_be_one_is_a_usage_error_that_names_it(script, tmp_path):
    """It was a bare "[Errno 17] File exists: ..." and exit 1; then "... there: File exists"."""
    a_file = tmp_path / "file"
    a_file.write_text("")
    log = "client_log.log" if script in ("client.py", "ClientServer_StressTools.py") else "server_log.log"
    assert_usage_error(script, "--port", str(cluster.free_port()), "--log-dir", str(a_file),
                       message=f"--log-dir {a_file}: cannot write {log} there: it is not a directory")


@pytest.mark.parametrize("script", ["server1.py", "Load_Balancer.py", "client.py", "ClientServer_StressTools.py",
                                    "http_servers/lb.py", "http_servers/Server_async_http.py"])
def test_an_empty_host_in_brackets_is_a_usage_error(script, log_dir):
    """``--host []`` is no host (asyncio would have listened on every interface)."""
    assert_usage_error(script, "--host", "[]", "--log-dir", str(log_dir), message="give a host name or address")


@pytest.mark.parametrize("script", ["client.py", "ClientServer_StressTools.py"])
def test_port_0_is_no_port_to_connect_to(script, log_dir):
    """client.py took it, then said "connection refused by 127.0.0.1:0" (exit 69)."""
    assert_usage_error(script, "--port", "0", "--log-dir", str(log_dir), message="port 0 is no port to connect to")


LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) (server[123]) "
    r"event=[a-z-]+( [a-z_]+=\S+)*$")


def test_three_servers_share_one_log_file_without_torn_lines(procs, log_dir):
    servers = [procs.start(cluster.echo_server(f"server{i}", cluster.free_port(), log_dir=str(log_dir)))
               for i in (1, 2, 3)]
    lineload_msgs = 3000

    def hammer(port):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"".join(b"log-%d\n" % i for i in range(lineload_msgs)))
            s.shutdown(socket.SHUT_WR)
            while s.recv(1 << 20):
                pass

    threads = [threading.Thread(target=hammer, args=(srv.port,)) for srv in servers for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for srv in servers:
        assert srv.stop() == 0
    lines = (log_dir / "server_log.log").read_text().splitlines()
    bad = [line for line in lines if not LOG_LINE.match(line)]
    assert not bad, bad[:5]
    per_server = {name: sum(1 for line in lines if f" {name} event=message " in line)
                  for name in ("server1", "server2", "server3")}
    assert per_server == {n: 3 * lineload_msgs for n in per_server}


def test_log_level_warning_drops_per_message_lines(start_server, connect, log_dir):
    server = start_server("server1", "--log-level", "warning")
    conn = connect(server.port)
    conn.send(b"quiet\n")
    conn.read_lines(2)
    server.stop()
    text = (log_dir / "server_log.log").read_text()
    assert "event=listen" in text and "event=message" not in text


def test_runs_on_plain_asyncio_too(start_server, connect):
    server = start_server("server3", "--loop", "asyncio")
    conn = connect(server.port)
    conn.send(b"plain\n")
    assert conn.read_lines(2) == pairs("server3", [b"plain"])


def test_sigint_stops_an_idle_server_with_exit_zero(start_server, connect):
    server = start_server()
    connect(server.port)  # an idle client must not hold the stop
    server.signal(signal.SIGINT)
    assert server.wait(timeout=15) == 0


@pytest.mark.parametrize("script", ["server1.py", "Load_Balancer.py", "http_servers/Server_thread_http.py",
                                    "http_servers/Server_async_http.py"])
def test_ctrl_c_the_moment_the_port_opens_is_a_graceful_stop(script, log_dir):
    """The signal handlers came only after the port was open: a Ctrl-C in between
    was Python's KeyboardInterrupt, exit 130 (5 times in 24 quick starts)."""
    for _ in range(4):
        port = cluster.free_port()
        extra = ["--admin-port", "0"] if script == "Load_Balancer.py" else []
        proc = cluster.Process(script, cluster.python_script(script, "--port", str(port), "--log-dir", str(log_dir),
                                                             *extra), port=port)
        proc.start(wait=0)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and proc.alive(), proc.stderr()
                    time.sleep(0.001)
            proc.signal(signal.SIGINT)
            assert proc.wait(timeout=15) == 0, proc.stderr()
        finally:
            proc.stop()


@pytest.mark.parametrize("script", ["server1.py", "Load_Balancer.py", "http_servers/Server_thread_http.py",
                                    "http_servers/Server_async_http.py", "http_servers/lb.py"])
def test_sighup_is_a_graceful_stop(script, log_dir):
    """A closed terminal's SIGHUP killed every server on the spot (Python's default):
    no drain, no log line. It is a graceful stop now, as SIGTERM, unless ignored (nohup)."""
    port = cluster.free_port()
    extra = ["--admin-port", "0"] if script == "Load_Balancer.py" else []
    proc = cluster.Process(script, cluster.python_script(script, "--port", str(port), "--log-dir", str(log_dir),
                                                         *extra), port=port)
    proc.start()
    try:
        proc.signal(signal.SIGHUP)
        assert proc.wait(timeout=15) == 0, proc.stderr()
        assert "Traceback" not in proc.stderr()
    finally:
        proc.stop()


def test_a_server_started_under_nohup_keeps_sighup_ignored(log_dir):
    """Started by a program whose SIGHUP is ignored (nohup ... --spawn), a server
    must ignore it too. cluster.Process holds the stop signals while it starts a
    child; a handler of its own in place of SIG_IGN made the child's SIGHUP the
    default again, so the server took it for a graceful stop."""
    port = cluster.free_port()
    proc = cluster.Process("server1", cluster.python_script("server1.py", "--port", str(port),
                                                            "--log-dir", str(log_dir)), port=port)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGHUP, before)
    try:
        proc.signal(signal.SIGHUP)
        time.sleep(1.5)  # (a graceful stop of an idle server takes a few ms)
        assert proc.alive(), proc.stderr()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert two_lines(s, b"still here") == b"REPLY server1 still here\nACK server1 10\n"
    finally:
        proc.stop()


def test_a_client_that_never_stops_is_cut_at_the_drain_timeout(start_server):
    server = start_server("server1", "--drain-timeout", "1")
    s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    stop = threading.Event()

    def chatter():
        try:
            while not stop.is_set():
                s.sendall(b"more\n")
                s.recv(65536)
        except OSError:
            pass

    t = threading.Thread(target=chatter)
    t.start()
    time.sleep(0.2)
    server.signal(signal.SIGTERM)
    try:
        assert server.wait(timeout=15) == 0
    finally:
        stop.set()
        t.join(timeout=5)
        s.close()


def test_a_line_begun_at_the_drain_deadline_gets_err_shutting_down(start_server):
    """A client trickling a line when --drain-timeout ran out got a bare close;
    the README promises ERR shutting-down for a line begun and not ended."""
    server = start_server("server1", "--drain-timeout", "0.3")
    s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    s.sendall(b"first\n")
    answer = b""
    while answer.count(b"\n") < 2:
        answer += s.recv(65536)
    stop = threading.Event()

    def trickle():
        try:
            while not stop.wait(0.05):
                s.send(b"x")
        except OSError:
            pass

    t = threading.Thread(target=trickle)
    t.start()
    try:
        time.sleep(0.2)
        server.signal(signal.SIGTERM)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data == b"ERR shutting-down\n"
        assert server.wait(timeout=15) == 0
    finally:
        stop.set()
        t.join(timeout=5)
        s.close()


def test_listens_on_ipv6_loopback(procs, log_dir):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        port = cluster.free_port("::1")
    except OSError:
        pytest.skip("no ::1 on this machine")
    server = procs.start(cluster.echo_server("server1", port, log_dir=str(log_dir), host="::1"))
    with socket.create_connection(("::1", server.port), timeout=10) as s:
        s.sendall(b"six\n")
        assert s.recv(100).startswith(b"REPLY server1 six\n")


def test_lines_dropped_on_overflow_are_said_by_the_program_that_dropped_them(tmp_path):
    """The overflow line said "log", not which of the processes sharing the file lost lines."""
    from clusterkit import logs

    elog = logs.configure("server7", log_dir=tmp_path)
    try:
        writer = elog.writer
        writer.dropped = 3  # as a full queue counts them
        writer.flush()
    finally:
        logs.shutdown()
    assert " WARNING server7 event=log-dropped lines=3" in (tmp_path / logs.SERVER_LOG).read_text()


@pytest.mark.parametrize("queued", [False, True])
def test_clients_past_the_open_files_limit_get_err_busy_not_a_bare_close(procs, log_dir, queued):
    """Under an open-files limit of 64 the server took every connection the limit
    let the event loop accept and closed the rest unseen (uvloop): clients got a
    bare close and the log said nothing. Its limit now fits the open-files limit,
    said at start; past it, 'ERR busy'. ``queued``: the clients all wait in the
    listen queue (the server stopped while they connect), which the server takes
    a part at a time (loops._Batch): taken whole, it ran out of descriptors, and
    uvloop closed the rest of the queue unseen (about half the clients)."""
    port = cluster.free_port()
    proc = procs.start(under_open_files_limit("server1", "server1.py", port, "--log-dir", str(log_dir)))
    if queued:
        proc.signal(signal.SIGSTOP)
    try:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    finally:
        proc.signal(signal.SIGCONT)
    try:
        _, served = turned_away_or_in(socks, b"ERR busy\n")
        for i, s in enumerate(served):
            answer = two_lines(s, b"hi%d" % i)
            assert answer == b"REPLY server1 hi%d\nACK server1 %d\n" % (i, len(b"hi%d" % i)), answer
    finally:
        for s in socks:
            s.close()
    assert f"at most {len(served)} clients at once (the open-files limit allows no more" in proc.stderr()


@pytest.mark.parametrize("script", ["server1.py", "http_servers/Server_thread_http.py"])
def test_sigusr1_reopens_the_log_file_after_logrotate_moved_it(procs, log_dir, script):
    """As nginx: the file renamed away, kill -USR1 and the lines go to a new file of
    the old name (SIGUSR1 killed the servers; without a reopen they wrote on into the
    renamed file for good)."""
    port = cluster.free_port()
    proc = procs.start(cluster.Process("s", cluster.python_script(script, "--port", str(port), "--log-dir",
                                                                  str(log_dir)), port=port))
    log = log_dir / "server_log.log"

    def touch(text: bytes) -> str:
        """A message or a request; what its log line has that no other has."""
        if script != "server1.py":
            assert send_all_then_read(port, b"GET /page.html?%s HTTP/1.0\r\n\r\n" % text).startswith(b"HTTP/1.1 200")
            return text.decode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert two_lines(s, text).startswith(b"REPLY")
            return "peer=127.0.0.1:%d " % s.getsockname()[1]

    def wait_for(path, text: str) -> None:
        deadline = time.monotonic() + 20
        while not (path.exists() and text in path.read_text()):
            assert time.monotonic() < deadline, f"{text} never in {path}"
            time.sleep(0.05)

    wait_for(log, touch(b"before"))
    rotated = log.rename(log_dir / "server_log.log.1")
    proc.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 20
    while not log.exists():  # made by the reopen (the writer thread's, within its flush interval)
        assert time.monotonic() < deadline and proc.alive(), "no new log file"
        time.sleep(0.05)
    after = touch(b"after")
    wait_for(log, after)
    assert proc.alive() and after not in rotated.read_text()


def standard_loop_out_of_descriptors(procs, log_dir, hold: float):
    """server1 on --loop asyncio under ulimit -n 64, 200 clients held open ``hold``
    seconds, then gone: the server, once it answers again."""
    port = cluster.free_port()
    proc = procs.start(under_open_files_limit("server1", "server1.py", port, "--loop", "asyncio",
                                              "--log-dir", str(log_dir)))
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
    time.sleep(hold)
    for s in socks:
        s.close()
    deadline = time.monotonic() + 30
    while True:  # once the clients have gone (the loop works through what it accepted meanwhile)
        try:  # (ERR busy, or a reset in a flood of refusals, while the loop works through its backlog)
            answer = send_all_then_read(port, b"again\n")
        except ConnectionError as exc:
            answer = repr(exc).encode()
        if answer.startswith(b"REPLY"):
            return proc
        assert time.monotonic() < deadline, answer
        time.sleep(0.2)


def test_the_standard_loop_out_of_descriptors_says_so_once_a_second_and_recovers(procs, log_dir):
    """--loop asyncio under ulimit -n 64 with 200 clients: the loop reported every
    failed accept with a traceback (270,000 lines in a few seconds), and a
    rejected client already gone raised in connection_made."""
    proc = standard_loop_out_of_descriptors(procs, log_dir, hold=2)
    err = proc.stderr()
    assert "Traceback" not in err and err.count("\n") < 60, err[-3000:]
    assert "socket.accept() out of system resource: [Errno 24]" in err
    # The stop: every accept retry still due raised 'Invalid file descriptor: -1' with its
    # traceback, for 10 s and more (this test's stop ran into its SIGKILL).
    assert proc.stop(timeout=60) == 0
    err = proc.stderr()
    assert "Traceback" not in err and "Invalid file descriptor" not in err, err[-3000:]


def test_the_standard_loop_out_of_descriptors_backs_off_rather_than_retry_in_a_storm(procs, log_dir):
    """--loop asyncio under ulimit -n 64 with 200 clients held open: Python's accept
    paused the listener for a second at the first failure, but went on through the
    rest of its batch, each failure scheduling a retry of its own: 4,000 failed
    accepts in the first second, 20,000 in the third, a core burnt while the flood
    lasted. Now one failed accept, then a second's pause, and it serves again after."""
    proc = standard_loop_out_of_descriptors(procs, log_dir, hold=4)
    assert proc.stop(timeout=30) == 0
    failed = [int(n) for n in re.findall(r"out of system resource: \[Errno 24\].*?\((\d+) failed accepts",
                                         proc.stderr())]
    # About one a second while the flood lasts (the count said once a second): 45,000 before.
    assert failed and sum(failed) <= 30, failed
