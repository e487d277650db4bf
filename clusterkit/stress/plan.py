"""What every engine shares: what a request is (``Target``), when each client
sends it (``Plan``), and how its outcome is counted (``record``)."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

from .config import StressConfig
from .exchange import HttpReader, LineReader
from .metrics import Recorder

ns = time.perf_counter_ns
MS = 1_000_000
FINE_NS = 50_000
"""The event engines wait for a --rate send due within the next ms in steps
this long (handling I/O between them): event loops time in whole ms, and a
send that goes out late counts its lateness as latency."""


class Target:
    """What one request is, for the line protocol or HTTP."""

    def __init__(self, cfg: StressConfig, worker: int) -> None:
        self.cfg = cfg
        self.batch = cfg.pipeline
        if cfg.http_url:
            url = urlsplit(cfg.http_url)
            self.host = url.hostname or "127.0.0.1"
            self.port = url.port or 80
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            ka = b"Connection: Keep-Alive\r\n" if cfg.keepalive else b""
            host_header = url.netloc.encode()
            # What ApacheBench sends, so both tools cost the server the same.
            self.http_request = (b"GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: clusterkit-stress\r\n"
                                 b"Accept: */*\r\n%s\r\n" % (path.encode(), host_header, ka))
        else:
            self.host, self.port = cfg.host, cfg.port
            self.http_request = b""
            if cfg.message:
                self.fixed = cfg.message
            else:
                self.fixed = None
                self.prefix = b"c%03d-" % worker
                self.pad = b"x" * max(0, cfg.size - len(self.prefix) - 9)

    def message(self, k: int) -> bytes:
        if self.fixed is not None:
            return self.fixed
        return b"%s%09d%s" % (self.prefix, k, self.pad)

    def request(self, k: int, count: int) -> tuple[bytes, LineReader | HttpReader, int]:
        if self.http_request:
            return self.http_request, HttpReader(), 1
        batch = min(self.batch, count)
        if batch == 1:
            msg = self.message(k)
            return msg + b"\n", LineReader([msg]), 1
        msgs = [self.message(k + j) for j in range(batch)]
        return b"\n".join(msgs) + b"\n", LineReader(msgs), batch


def address(cfg: StressConfig, target: Target) -> tuple[int, tuple]:
    """Where the thread and epoll engines connect, resolved once per client
    (not per request): the address the pre-flight connect reached, so a name
    like ``localhost`` that resolves to ::1 and 127.0.0.1 means the one that
    answers; else the resolver's first."""
    if cfg.address:
        return cfg.address
    family, _, _, _, sockaddr = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)[0]
    return family, sockaddr


def connect_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (TimeoutError, BlockingIOError)):  # BlockingIOError: SO_SNDTIMEO ran out
        return "connect-timeout"
    return "connect-error"


class Plan:
    """When and how much one client sends."""

    def __init__(self, cfg: StressConfig, start_ns: int, share: int | None, client: int) -> None:
        self.share = share  # None: until the deadline
        self.deadline = start_ns + int(cfg.duration * 1e9) if cfg.duration else None
        self.warm_end = start_ns + int(cfg.warmup * 1e9)
        self.start = start_ns
        self.interval = int(cfg.concurrency / cfg.rate * 1e9) if cfg.rate else 0
        self.offset = int(self.interval * client / cfg.concurrency) if self.interval else 0

    def intended(self, k: int) -> int:
        return self.start + self.offset + k * self.interval


def record(rec: Recorder, reader, base: int, warm_end: int) -> None:
    outcomes = reader.outcomes if isinstance(reader, LineReader) else [reader.outcome]
    if base < warm_end:
        return
    for o in outcomes:
        if o.ok:
            rec.ok(base, o.first_ns - base, o.done_ns - base, o.label, o.nbytes, o.done_ns)
        else:
            rec.failed(base, o.label, o.done_ns, o.nbytes)


def all_ok(reader) -> bool:
    if isinstance(reader, LineReader):
        return all(o.ok for o in reader.outcomes)
    return reader.outcome is not None and reader.outcome.ok


def server_closes(reader) -> bool:
    """An HTTP answer complete on a connection the server will close now.

    Engines then wait for the server's FIN before closing, as ApacheBench
    does: the side that closes first keeps the TIME_WAIT, and a client that
    holds thousands of them pays for it in every connect (the kernel searches
    for a free port), which would slow the tool, not the server."""
    return isinstance(reader, HttpReader) and reader.complete and not reader.keep_alive
