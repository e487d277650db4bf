"""What the stress tool's tests share: running the tool (``stress``,
``run_json``), the fake server that misbehaves in one chosen way
(``FakeServer``, ``run_on_fake``) and the HTTP answers the fakes give. The
``balanced`` cluster fixture is in conftest.py."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

from clusterkit import cluster


def stress(*args: str, log_dir, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(cluster.python_script("ClientServer_StressTools.py", *args, "--quiet",
                                                "--log-dir", str(log_dir)),
                          capture_output=True, text=True, timeout=timeout)


def run_json(*args: str, log_dir, tmp_path, name: str = "out.json") -> tuple[dict, subprocess.CompletedProcess]:
    path = tmp_path / name
    proc = stress(*args, "--json", str(path), log_dir=log_dir)
    assert path.exists(), proc.stderr
    return json.loads(path.read_text())["runs"][0], proc


class FakeServer:
    """A line server that misbehaves in one chosen way (or answers HTTP without a length)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self.connections = 0
        self.sent = 0  # answer bytes sent
        self.lock = threading.Lock()
        self.closing = False
        self.heads: list[bytes] = []  # http-unframed: what each request's first read brought
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        here = 0  # messages on this connection
        last = b""  # copy-at-eof: the last answer
        with self.lock:
            self.connections += 1
            nth = self.connections
        if self.behaviour == "every-other-connection" and nth % 2 == 0:  # accepted, read, never answered
            with conn:
                while conn.recv(65536):
                    pass
            return
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    if self.behaviour == "copy-at-eof" and last:  # the last answer again, after the half-close
                        with self.lock:
                            self.sent += len(last)
                        conn.sendall(last)
                    return
                if self.behaviour == "http-close-trickle":  # the answer and its close, then a byte a 0.5 s
                    answer = http_answer(extra=b"Connection: close\r\n")
                    conn.sendall(answer)
                    try:
                        for _ in range(40):
                            time.sleep(0.5)
                            conn.sendall(b"x")
                    except OSError:  # the client gave up on the close
                        pass
                    return
                if self.behaviour == "http-unframed":  # an HTTP/1.0 answer that the close ends
                    self.heads.append(data)
                    conn.sendall(UNFRAMED)
                    return
                if self.behaviour.startswith("http-close-twice"):
                    # An answer, then the close; every 7th answer twice first: in one
                    # write ("-now"), or the copy 10 ms later.
                    buf += data
                    if b"\r\n\r\n" not in buf:
                        continue
                    with self.lock:
                        self.count += 1
                        n = self.count
                    answer = http_answer(extra=b"Connection: close\r\n")
                    twice = n % 7 == 0
                    with self.lock:
                        self.sent += len(answer) * (2 if twice else 1)
                    if twice and self.behaviour.endswith("-now"):
                        conn.sendall(answer * 2)
                    else:
                        conn.sendall(answer)
                        if twice:
                            time.sleep(0.01)
                            conn.sendall(answer)
                    return
                if self.behaviour.startswith("http-twice"):  # every answer twice: at once, or 10 ms later
                    buf += data
                    while b"\r\n\r\n" in buf:
                        _, buf = buf.split(b"\r\n\r\n", 1)
                        with self.lock:
                            self.count += 1
                        answer = http_answer()
                        try:
                            if self.behaviour == "http-twice":
                                conn.sendall(answer * 2)
                            else:
                                conn.sendall(answer)
                                time.sleep(0.01)
                                conn.sendall(answer)
                        except OSError:  # the client closed a connection out of step
                            return
                    continue
                if self.behaviour in ("http-varied", "http-interim", "http-rogue"):
                    buf += data
                    while b"\r\n\r\n" in buf:
                        head, buf = buf.split(b"\r\n\r\n", 1)
                        keep = b"keep-alive" in head.lower()
                        with self.lock:
                            self.count += 1
                            n = self.count
                            interim = interim_answers(n) if self.behaviour == "http-interim" else b""
                            if self.behaviour == "http-rogue":  # an X-Backend that would forge log fields
                                interim, answer = b"", http_answer(backend=ROGUE_NAME)
                            elif not interim:
                                answer = varied_answer(n, keep)
                            else:
                                answer = http_answer(backend=b"b%d" % (1 + n % 2),
                                                     extra=b"" if keep else b"Connection: close\r\n")
                            self.sent += len(interim) + len(answer)
                        if interim and not n % 3:  # every 3rd apart from its answer
                            conn.sendall(interim)
                            time.sleep(0.005)
                            interim = b""
                        conn.sendall(interim + answer)
                        if not keep:
                            return
                    continue
                buf += data
                *lines, buf = buf.split(b"\n")
                for m in lines:
                    here += 1
                    with self.lock:
                        self.count += 1
                        n = self.count
                    if self.behaviour == "wrong-echo":
                        conn.sendall(b"REPLY fake %s!\nACK fake %d\n" % (m, len(m) + 1))
                    elif self.behaviour == "one-each":  # one message per connection, then the close
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                        return
                    elif self.behaviour == "copy-at-eof":  # right, and the last again after the half-close
                        last = b"REPLY fake %s\nACK fake %d\n" % (m, len(m))
                        with self.lock:
                            self.sent += len(last)
                        conn.sendall(last)
                    elif self.behaviour == "twice":  # a balancer's resend gone wrong
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)) * 2)
                    elif self.behaviour == "twice-late":  # the copy 50 ms later
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                        time.sleep(0.05)
                        try:
                            conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                        except OSError:  # (the client closed the connection out of step)
                            return
                    elif self.behaviour == "extra-line":  # a line the protocol has not, behind the answer
                        conn.sendall(b"REPLY fake %s\nACK fake %d\nHELLO extra\n" % (m, len(m)))
                    elif self.behaviour == "ack-first":
                        conn.sendall(b"ACK fake %d\nREPLY fake %s\n" % (len(m), m))
                    elif self.behaviour == "slow-ack":  # the REPLY at once, its ACK 0.6 s later: slow, not dead
                        conn.sendall(b"REPLY fake %s\n" % m)
                        time.sleep(0.6)
                        try:
                            conn.sendall(b"ACK fake %d\n" % len(m))
                        except OSError:  # (the client gave up on it)
                            return
                    elif self.behaviour == "late":  # each answer 0.13 s after its message
                        time.sleep(0.13)
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                    elif self.behaviour == "missing-ack":
                        conn.sendall(b"REPLY fake %s\n" % m)
                        return
                    elif self.behaviour == "endless":  # bytes without a line end, for as long as it may
                        end = time.monotonic() + 5
                        try:
                            while time.monotonic() < end:
                                conn.sendall(b"x" * 65536)
                        except OSError:
                            pass
                        return
                    elif self.behaviour == "silent":
                        time.sleep(5)
                        return
                    elif self.behaviour == "silent-second":  # a connection's first answered, then nothing
                        if here > 1:
                            time.sleep(3)
                            return
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                    elif self.behaviour == "mixed":  # keep-alive answers of every shape, by message number
                        self.answer(conn, n, m)
                    elif self.behaviour == "reply-only":  # no ACK, ever, on a connection kept open
                        conn.sendall(b"REPLY fake %s\n" % m)
                    elif self.behaviour == "every-other-connection":  # (an answered one)
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))
                    elif self.behaviour == "stall":
                        if n == 150:
                            time.sleep(1.0)
                        conn.sendall(b"REPLY fake %s\nACK fake %d\n" % (m, len(m)))

    def answer(self, conn: socket.socket, n: int, m: bytes) -> None:
        """Every 5th message a wrong echo, every 7th in two pieces, every 11th
        from another server name (as through a balancer), else a plain answer."""
        name = b"fake2" if n % 11 == 0 else b"fake"
        reply = b"REPLY %s %s%s\n" % (name, m, b"!" if n % 5 == 0 else b"")
        ack = b"ACK %s %d\n" % (name, len(m))
        with self.lock:
            self.sent += len(reply) + len(ack)
        if n % 7 == 0:
            conn.sendall(reply)
            time.sleep(0.002)
            conn.sendall(ack)
        else:
            conn.sendall(reply + ack)

    def close(self) -> None:
        self.closing = True
        self.sock.close()


def run_on_fake(behaviour: str, *args: str, log_dir, tmp_path) -> tuple[dict, subprocess.CompletedProcess]:
    """``run_json`` against a ``FakeServer(behaviour)``, closed afterwards."""
    fake = FakeServer(behaviour)
    try:
        return run_json(*args, "--port", str(fake.port), log_dir=log_dir, tmp_path=tmp_path)
    finally:
        fake.close()


def http_answer(date: bytes = b"Thu, 26 Nov 2026 05:00:00 GMT", backend: bytes = b"b1", body: bytes = b"x" * 50,
                status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %s\r\nServer: t\r\nDate: %s\r\nX-Backend: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, date, backend, len(body), extra, body))


ROGUE_NAME = b'web1 reply=forged latency_ms=0.001 [/x] note="x'


def interim_answers(n: int) -> bytes:
    """What FakeServer("http-interim") sends before its n-th answer: 100 Continue,
    and every 2nd time 103 Early Hints too."""
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" if n % 2 else b""
    return b"HTTP/1.1 100 Continue\r\n\r\n" + early


def varied_answer(n: int, keep_alive: bool) -> bytes:
    """The n-th answer of FakeServer("http-varied"): mostly the same 200 but for
    its Date; every 9th a 500 and every 11th from backend b2, both as long."""
    date = b"Thu, 26 Nov 2026 05:00:%02d GMT" % (n % 60)
    extra = b"" if keep_alive else b"Connection: close\r\n"
    if n % 9 == 0:
        return http_answer(date=date, status=b"500 Bad", extra=extra)
    return http_answer(date=date, backend=b"b2" if n % 11 == 0 else b"b1", extra=extra)


UNFRAMED = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nno length: the close ends me\n"
