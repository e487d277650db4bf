"""Shared fixtures: real processes on free loopback ports, always stopped by PID."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time

import pytest

from clusterkit import cluster
from clusterkit.balancer import balancer_process

from .balancer_setup import Cluster
from .http_setup import HttpSetup


@pytest.fixture
def log_dir(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    return d


@pytest.fixture
def procs():
    """A ProcessGroup whose processes are stopped (SIGTERM, then SIGKILL by PID) at teardown."""
    group = cluster.ProcessGroup()
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def setup(procs, log_dir):
    """The HTTP tests' processes: servers, backends and lb.py (``http_setup.HttpSetup``)."""
    return HttpSetup(procs, log_dir)


@pytest.fixture(params=["Server_async_http.py", "Server_thread_http.py", "lb.py"])
def server(request, setup):
    """Each HTTP server in turn (lb.py in front of one backend), with a 1 s header timeout."""
    if request.param == "lb.py":
        return setup.lb(1, "--header-timeout", "1")
    return setup.server(request.param, "--header-timeout", "1")


@pytest.fixture
def balanced(procs, log_dir):
    """Three echo servers behind a balancer (message mode): the balancer's process."""
    ports = cluster.free_ports(4)
    backends = []
    for i in range(3):
        procs.start(cluster.echo_server(f"server{i + 1}", ports[i], log_dir=str(log_dir)))
        backends.append(f"server{i + 1}=127.0.0.1:{ports[i]}")
    return procs.start(balancer_process(ports[3], backends, log_dir=str(log_dir)))


@pytest.fixture
def lb(procs, log_dir):
    """Three echo servers behind a balancer, started by the test (``balancer_setup.Cluster``)."""
    return Cluster(procs, log_dir)


@pytest.fixture
def start_server(procs, log_dir):
    """Start an echo server process: ``start_server("server1", "--max-line", "10")``."""

    def start(name: str = "server1", *args: str, port: int | None = None) -> cluster.Process:
        port = port or cluster.free_port()
        return procs.start(cluster.echo_server(name, port, *args, log_dir=str(log_dir)))

    return start


class LineConn:
    """A tiny blocking test client for the line protocol (no clusterkit code under test)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_lines(self, n: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while self.buf.count(b"\n") < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            self.buf += chunk
        lines = self.buf.split(b"\n")
        out, self.buf = lines[:n], b"\n".join(lines[n:])
        return out

    def read_all(self, timeout: float = 10.0) -> bytes:
        """Everything until the server closes."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                data, self.buf = self.buf, b""
                return data
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect():
    conns: list[LineConn] = []

    def make(port: int, **kw) -> LineConn:
        c = LineConn(port, **kw)
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.close()


def flood_until_dropped(port: int, timeout: float = 30.0) -> None:
    """Pipeline 1 MB blocks of messages to ``port`` and never read, until the
    peer drops the connection (a reset ends the sending); fail if it has not
    within ``timeout``."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.settimeout(0.5)
    block = (b"w" * 63 + b"\n") * 16384
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, "the connection was held open"
            try:
                s.sendall(block)
            except TimeoutError:
                continue
            except OSError:
                return
    finally:
        s.close()


@pytest.fixture
def flood():
    """``flood(port)``: see ``flood_until_dropped``."""
    return flood_until_dropped


def assert_usage_error(script: str, *args: str, message: str) -> None:
    """``script`` with ``args`` exits 2 at once with ``message`` in one clear line, no traceback."""
    bad = subprocess.run(cluster.python_script(script, *args), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def assert_bad_config(script: str, config_text: str, tmp_path, message: str, *args: str) -> None:
    """``script --config`` a file of ``config_text`` is a usage error saying ``message``."""
    path = tmp_path / "config.toml"
    path.write_text(config_text)
    assert_usage_error(script, "--config", str(path), *args, message=message)


def send_all_then_read(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send everything, half-close, then read to the end, as ``nc -N`` does: every
    step must work (a reset on the way would fail the send, the shutdown or the read)."""
    with socket.create_connection((host, port), timeout=15) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@contextlib.contextmanager
def fake_backend(answer):
    """A backend on a free port whose ``answer(conn)`` serves each connection, in a
    thread of its own; every connection is closed at the end. Yields the port."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    ls.settimeout(0.1)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve(conn):
        try:
            answer(conn)
        except OSError:
            pass

    def accept():
        while not stop.is_set():
            try:
                conn, _ = ls.accept()
            except OSError:
                continue
            conn.settimeout(10)
            conns.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield ls.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        ls.close()
        for c in conns:
            c.close()


def under_open_files_limit(name: str, script: str, port: int, *args: str, limit: int = 64):
    """A server started with ``ulimit -n`` set (sh sets it and becomes the server: the PID is the server's)."""
    from clusterkit import cluster
    return cluster.Process(name, ["sh", "-c", f'ulimit -n {limit} && exec "$0" "$@"',
                                  *cluster.python_script(script, "--port", str(port), *args)], port=port)


def unasked(socks: list, seconds: float = 5) -> tuple[dict, set]:
    """What each socket receives without asking for ``seconds`` (a refusal, say),
    and which of them the other side closed."""
    import select
    got = {s: b"" for s in socks}
    ended: set = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in socks if s not in ended], [], [], 0.2)
        for s in ready:
            chunk = s.recv(65536)
            got[s] += chunk
            if not chunk:
                ended.add(s)
    return got, ended


def turned_away_or_in(socks: list, refusal: bytes, seconds: float = 5) -> tuple[list, list]:
    """Clients connected at once to a server at its limit: each is either turned away
    (``refusal`` comes unasked, then the close) or in (nothing comes): never a bare
    close. Returns (turned away, in); both must have some."""
    got, ended = unasked(socks, seconds)
    away = [s for s in socks if got[s].startswith(refusal) and s in ended]
    taken = [s for s in socks if not got[s] and s not in ended]
    assert len(away) + len(taken) == len(socks), [got[s] for s in socks if s not in away and s not in taken][:5]
    assert away and taken
    return away, taken


def two_lines(sock: socket.socket, message: bytes) -> bytes:
    """Send a message line, read its answer: the REPLY and ACK lines."""
    sock.sendall(message + b"\n")
    answer = b""
    while answer.count(b"\n") < 2:
        chunk = sock.recv(4096)
        assert chunk, (message, answer)
        answer += chunk
    return answer


class FullBacklog:
    """A listener on a free port whose accept queue is full, so that the kernel drops
    the SYN of every connect to it and the connecting side sends it again a second
    later, then 3 s, 7 s...: a lost SYN, without netem. ``open(answer)`` makes room
    and from then on accepts, serving each connection with ``answer(conn)`` in a
    thread: a connect whose first SYN was dropped completes at its resend."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)  # room for one connection not yet accepted: the filler's
        self.port = self.listener.getsockname()[1]
        self.filler: socket.socket | None = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()

    def syn_waiting(self) -> bool:
        """Whether a connect to it is waiting with its SYN dropped (SYN_SENT, in /proc/net/tcp)."""
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        return any(row[3] == "02" and int(row[2].split(":")[1], 16) == self.port for row in rows)

    def wait_for_syn(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.syn_waiting():
            assert time.monotonic() < deadline, "no connect came"
            time.sleep(0.01)

    def open(self, answer) -> None:
        conn, _ = self.listener.accept()  # the filler's: room for the next connect
        conn.close()
        self.filler.close()  # type: ignore[union-attr]
        self.filler = None
        self.listener.settimeout(0.1)

        def serve(conn: socket.socket) -> None:
            with contextlib.suppress(OSError):
                answer(conn)

        def accept() -> None:
            while not self.stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    continue
                conn.settimeout(10)
                self.conns.append(conn)
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        self.thread = threading.Thread(target=accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.filler is None:
            self.thread.join(5)
        else:
            self.filler.close()
        self.listener.close()
        for c in self.conns:
            c.close()

    def __enter__(self) -> FullBacklog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
