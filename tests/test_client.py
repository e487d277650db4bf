"""client.py and client_send_message() against real server processes."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from clusterkit import cluster
from clusterkit.client import Client, ClientError, client_send_message

pytestmark = pytest.mark.timeout(60)


def run_client(*args: str, log_dir) -> subprocess.CompletedProcess:
    return subprocess.run(cluster.python_script("client.py", *args, "--log-dir", str(log_dir)),
                          capture_output=True, text=True, timeout=30)


def test_client_send_message_returns_reply_confirmation_and_timings(start_server):
    server = start_server("server2")
    r = client_send_message("hello", port=server.port)
    assert (r.reply, r.confirmation, r.server, r.length) == ("REPLY server2 hello", "ACK server2 5", "server2", 5)
    assert r.connect_ms is not None and r.connect_ms >= 0
    assert 0 <= r.latency_ms <= r.rtt_ms
    assert r.one_way_estimate_ms == r.rtt_ms / 2


def test_keepalive_client_reuses_its_connection(start_server):
    server = start_server()
    with Client(port=server.port) as c:
        first = c.send_message(b"\xffraw")
        second = c.send_message("again")
    assert first.connect_ms is not None and second.connect_ms is None
    assert first.length == 4


def test_refused_and_timeout_are_client_errors():
    with pytest.raises(ClientError) as info:
        client_send_message("x", port=cluster.free_port())
    assert info.value.code == "connection-refused"
    with socket.socket() as silent:  # accepts (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(ClientError) as info:
            client_send_message("x", port=silent.getsockname()[1], timeout=0.5)
    assert info.value.code == "timeout"


def fake(reply: bytes) -> int:
    """A server on a free port that answers one message with ``reply`` and closes; it
    stops listening once it has its one connection (so a next connect is refused,
    not accepted by a listener about to close). Its port."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()

    def serve():
        conn, _ = ls.accept()
        ls.close()
        conn.recv(100)
        conn.sendall(reply)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return ls.getsockname()[1]


def test_err_line_and_wrong_echo_are_reported():
    with pytest.raises(ClientError) as info:
        client_send_message("x", port=fake(b"ERR no-backend\n"))
    assert info.value.code == "no-backend"
    with pytest.raises(ClientError) as info:
        client_send_message("x", port=fake(b"REPLY s y\nACK s 1\n"))
    assert info.value.code == "wrong-reply"
    with pytest.raises(ClientError) as info:  # the echo is right: it was called wrong-reply
        client_send_message("x", port=fake(b"REPLY s x\nACK s 2\n"))
    assert info.value.code == "bad-ack"
    with pytest.raises(ClientError) as info:
        client_send_message("x", port=fake(b"REPLY s x\n"))
    assert info.value.code == "closed"
    with pytest.raises(ClientError) as info:  # answered twice: it was taken, and the next send crashed
        client_send_message("x", port=fake(b"REPLY s x\nACK s 1\n" * 2))
    assert info.value.code == "extra-answer"


def test_cli_prints_both_replies_and_timings(start_server, log_dir):
    server = start_server("server3")
    proc = run_client("hello there", "--port", str(server.port), "--count", "3", "--keepalive", log_dir=log_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("REPLY server3 hello there") == 3
    assert proc.stdout.count("ACK server3 11") == 3
    for word in ("connect", "latency", "rtt", "median"):
        assert word in proc.stdout
    log = (log_dir / "client_log.log").read_text()
    assert log.count("event=reply") == 3 and "rtt_ms=" in log and "latency_ms=" in log
    # In the order things happened: the connect (one, kept alive), then each send and its reply.
    events = re.findall(r" event=(\w+) n=(\d)", log)
    assert events == [("connect", "1"), ("send", "1"), ("reply", "1"), ("send", "2"), ("reply", "2"),
                      ("send", "3"), ("reply", "3")], log


def test_an_ipv6_host_in_brackets_as_in_urls(procs, log_dir):
    """``--host [::1]`` was 'cannot resolve' (exit 69); the bracket form is the URL one."""
    try:
        port = cluster.free_port("::1")
    except OSError:
        pytest.skip("no ::1 on this machine")
    server = procs.start(cluster.echo_server("six", port, log_dir=str(log_dir), host="::1"))
    proc = run_client("over six", "--host", "[::1]", "--port", str(server.port), log_dir=log_dir)
    assert proc.returncode == 0, proc.stderr
    assert "REPLY six over six" in proc.stdout
    assert f"target=[::1]:{server.port} " in (log_dir / "client_log.log").read_text()  # (was ::1:PORT)
    server.stop()
    proc = run_client("again", "--host", "::1", "--port", str(server.port), log_dir=log_dir)
    assert proc.returncode == 69 and f"connection refused by [::1]:{server.port} " in proc.stderr, proc.stderr


def test_the_error_line_is_logged_at_log_level_error(log_dir):
    """It was written only from --log-level warning down: at error, an error went unlogged."""
    proc = run_client("hello", "--port", str(cluster.free_port()), "--log-level", "error", log_dir=log_dir)
    assert proc.returncode == 69
    deadline = time.monotonic() + 10
    while "ERROR client event=error n=1 code=connection-refused" not in (log_dir / "client_log.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_cli_json_output(start_server, log_dir):
    import json
    server = start_server()
    proc = run_client("j", "--port", str(server.port), "--json", log_dir=log_dir)
    [row] = json.loads(proc.stdout)
    assert row["reply"] == "REPLY server1 j" and row["rtt_ms"] >= row["latency_ms"] >= 0
    assert row["connect_ms"] > 0  # the request opened its connection


def test_cli_json_output_keeps_the_answers_before_a_failure(log_dir):
    """--json printed nothing at all when a later message failed."""
    import json
    port = fake(b"REPLY only x\nACK only 1\n")  # one message answered, then nobody listens
    proc = run_client("x", "-n", "2", "--port", str(port), "--json", log_dir=log_dir)
    assert proc.returncode != 0
    rows = json.loads(proc.stdout)
    assert rows[0]["server"] == "only" and rows[1]["n"] == 2 and rows[1]["error"] == "connection-refused"


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "1e10"])
def test_cli_bad_timeout_is_a_usage_error(timeout, log_dir):
    """-1 was a traceback (ValueError from settimeout); 0 a misleading "Operation now in
    progress"; inf and 1e10 an OverflowError."""
    proc = run_client("hello", "--port", "7001", "--timeout", timeout, log_dir=log_dir)
    assert proc.returncode == 2 and "--timeout: must be positive, at most a year" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_against_a_closed_port_is_one_line_and_exit_69(log_dir):
    proc = run_client("hello", "--port", str(cluster.free_port()), log_dir=log_dir)
    assert proc.returncode == 69
    assert proc.stderr.strip().count("\n") == 0 and "refused" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "code=connection-refused" in (log_dir / "client_log.log").read_text()


def test_the_connect_time_is_the_tcp_connects_not_the_name_lookups(start_server, monkeypatch):
    """client.py timed socket.create_connection, name lookup included: 2.2 ms for a
    0.1 ms connect, the first time in a process (the stress tool looks up first)."""
    from clusterkit import client as client_module

    server = start_server("server1")
    clock = [0]
    real_lookup = socket.getaddrinfo

    def slow_lookup(*args, **kwargs):
        clock[0] += 10**9  # a lookup that takes a second, on this clock
        return real_lookup(*args, **kwargs)

    monkeypatch.setattr(client_module, "_ns", lambda: clock[0])
    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    c = client_module.Client("127.0.0.1", server.port)
    try:
        assert c.connect() < 1000
    finally:
        c.close()


def test_a_message_of_any_bytes_but_newline_goes_from_the_command_line(start_server, log_dir):
    """A message that is no UTF-8 was a traceback (SPEC: any byte but \\n may appear)."""
    server = start_server("server1")
    proc = run_client("\udcff\udcfeok", "--port", str(server.port), "--json", log_dir=log_dir)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)[0]["confirmation"].endswith(" 4")


def test_err_no_backend_is_exit_69_the_peer_unavailable(log_dir):
    """It was exit 1, as a wrong answer; cli.py's table gives 69 to "no backend"."""
    proc = run_client("x", "--port", str(fake(b"ERR no-backend\n")), log_dir=log_dir)
    assert proc.returncode == 69 and "no healthy backend" in proc.stderr, proc.stderr


@pytest.mark.parametrize("script, missing", [("ClientServer_StressTools.py", "hdrh"),
                                             ("Load_Balancer.py", "prometheus_client"),
                                             ("http_servers/lb.py", "httptools")])
def test_a_script_run_without_the_projects_packages_says_so_in_one_line(script, missing):
    """Started with a Python that lacks them (outside .venv), a script ended in a
    ModuleNotFoundError traceback. The package is hidden here as if not installed."""
    code = (f"import runpy, sys; sys.modules[{missing!r}] = None; sys.argv = [{script!r}, '--help']; "
            f"runpy.run_path({script!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cluster.ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: the Python package ") and ".venv" in proc.stderr, proc.stderr


def test_what_a_server_sends_reaches_the_terminal_with_its_control_characters_escaped(log_dir):
    """A server named with an escape sequence (ESC [2J clears the screen) had it
    printed raw in the REPLY and ACK lines and the table; and a name like [bold]
    was taken for rich markup."""
    name = b"\x1b[2J[bold]x"
    port = fake(b"REPLY %s hi\nACK %s 2\n" % (name, name))
    proc = run_client("hi", "--port", str(port), log_dir=log_dir)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout, proc.stdout
    assert "REPLY \\x1b[2J[bold]x hi" in proc.stdout and "\\x1b[2J[bold]x" in proc.stdout.split("timings")[1]
