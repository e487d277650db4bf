"""What the HTTP tests share: raw requests kept as named constants, a one-shot
exchange over a socket, answers read by their length, and ``HttpSetup``,
which starts the servers, backends and lb.py as real processes on free ports
(the ``setup`` and ``server`` fixtures in conftest.py hand it out)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from clusterkit import cluster


WWW = Path(cluster.ROOT) / "http_servers" / "www"
HAS_AB = shutil.which("ab") is not None
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

SIMPLE_GET = b"GET /page.html HTTP/1.1\r\nHost: t\r\n\r\n"
CLOSING_GET = b"GET /page.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
GARBAGE = b"\x16\x03\x01 definitely not http\r\n\r\n"
POST = b"POST /page.html HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
HUGE_HEADERS = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Filler: " + b"a" * 40000 + b"\r\n\r\n"
NO_HOST_11 = b"GET /page.html HTTP/1.1\r\n\r\n"


def exchange(port: int, raw: bytes, timeout: float = 10, host: str = "127.0.0.1", half_close: bool = False) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(raw)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                head, done, body = data.partition(b"\r\n\r\n")
                m = re.search(rb"Content-Length: (\d+)", head)
                if done and m and len(body) >= int(m.group(1)):
                    if b"Connection: keep-alive" in head:
                        break
                    # An HTTP/1.1 answer keeps the connection open: whatever else would come
                    # (a second answer to a smuggled request) comes at once, not 10 s later.
                    s.settimeout(1.0)
        except TimeoutError:
            pass
    return data


def apachebench(url: str, n: int, c: int, keepalive: bool = False, timeout: float = 90) -> str:
    """``ab -n N -c C [-k] URL``, which must end well: its report."""
    ab = subprocess.run(["ab", *(["-k"] if keepalive else []), "-n", str(n), "-c", str(c), url],
                        capture_output=True, text=True, timeout=timeout)
    assert ab.returncode == 0, ab.stderr
    return ab.stdout


def assert_page_then_close(s: socket.socket) -> None:
    """An HTTP/1.0 GET for page.html on ``s``: the whole page, then the close."""
    s.sendall(b"GET /page.html HTTP/1.0\r\n\r\n")
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    assert status_of(answer) == 200 and answer.endswith(b"</html>\n"), answer[:200]


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


class HttpSetup:
    def __init__(self, procs, log_dir) -> None:
        self.procs = procs
        self.log_dir = str(log_dir)
        self.backends: dict[str, cluster.Process] = {}

    def server(self, script: str, *args: str) -> cluster.Process:
        port = cluster.free_port()
        return self.procs.start(cluster.Process(script, cluster.python_script(
            f"http_servers/{script}", "--port", str(port), "--log-dir", self.log_dir, *args), port=port))

    def backend(self, name: str, port: int | None = None) -> cluster.Process:
        port = port or cluster.free_port()
        proc = self.procs.start(cluster.Process(name, cluster.python_script(
            "http_servers/async_server.py", str(port), "--name", name, "--log-dir", self.log_dir), port=port))
        self.backends[name] = proc
        return proc

    def lb(self, n: int = 4, *extra: str) -> cluster.Process:
        args = []
        for i in range(1, n + 1):
            b = self.backend(f"backend{i}")
            args += ["--backend", f"backend{i}=127.0.0.1:{b.port}"]
        return self.server("lb.py", *args, "--check-interval", "0.2", "--rise", "2", "--fall", "2", *extra)

    def log(self) -> str:
        return (Path(self.log_dir) / "server_log.log").read_text()

    def wait_log(self, text: str, timeout: float = 10) -> None:
        """Until ``text`` is in the log (written by its own thread, in batches)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"never logged: {text}"
            time.sleep(0.05)

    def lb_requests(self, count: int, timeout: float = 10) -> list[str]:
        """The lb's request lines, once ``count`` of them are written (logs are flushed in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log().splitlines() if " lb event=request " in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


def read_requests(conn: socket.socket):
    """The request heads on a connection, one by one (the health checks' too)."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        yield head


def ok_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def statuses_in(data: bytes) -> list[bytes]:
    return re.findall(rb"^HTTP/1\.[01] (\d+) ", data, re.MULTILINE)


def read_answers(s: socket.socket, count: int, deadline: float,
                 heads: list[bytes] | None = None) -> list[tuple[int, int]]:
    """(status, body length) of ``count`` answers to GETs, read off ``s`` in order;
    their heads go to ``heads`` if given."""
    data = b""
    answers = []
    while len(answers) < count:
        head, done, rest = data.partition(b"\r\n\r\n")
        length = re.search(rb"Content-Length: (\d+)", head) if done else None
        if length and len(rest) >= int(length.group(1)):
            answers.append((status_of(head), int(length.group(1))))
            if heads is not None:
                heads.append(head)
            data = rest[int(length.group(1)):]
            continue
        assert time.monotonic() < deadline, (len(answers), data[:200])
        chunk = s.recv(1 << 20)
        assert chunk, f"closed after {len(answers)} answers"
        data += chunk
    return answers
