"""Settings of one stress run, as a frozen dataclass built once from the CLI."""

from __future__ import annotations

import math
import re
import select
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import SplitResult, unquote, urlsplit

from ..config import MAX_SECONDS, check
from ..protocol import MAX_MAX_LINE

ENGINES = ("thread", "async", "epoll")
MIN_SIZE = 14
"""The shortest generated message: ``c001-`` and a 9-digit number."""
MAX_CONCURRENCY = 20_000
"""ApacheBench's limit too: past it, threads, descriptors and local ports run out first."""
CONNECTIONS = ("per-request", "keepalive")
MAX_RATE = 1e9
"""The highest --rate: a request a nanosecond, the schedule's resolution (the lowest: one a year)."""


def rate_allowed(rate: float) -> bool:
    """A --rate from one request a year to one a nanosecond (not nan): slower, the
    schedule's send times overflowed; faster, the report's count of scheduled requests."""
    return rate * MAX_SECONDS >= 1 and rate <= MAX_RATE


def url_host(url: SplitResult) -> str | None:
    """The host a URL names, to connect to: an IPv6 address's zone id decoded
    (RFC 6874 writes ``%25``: ``http://[fe80::1%25eth0]:8080/``) and its case
    kept (an interface's name), where ``hostname`` leaves ``%25`` and lowercases."""
    netloc = url.netloc.rpartition("@")[2]
    if netloc.startswith("[") and "]" in netloc:
        return unquote(netloc[1:netloc.index("]")])
    return url.hostname


def host_header(url: SplitResult) -> str:
    """What a request to ``url`` says in Host: its host[:port], without user info
    and without an IPv6 zone id (RFC 6874 4, as browsers send it)."""
    return re.sub(r"%[^\]]*\]", "]", url.netloc.rpartition("@")[2])


@dataclass(frozen=True)
class StressConfig:
    host: str = "127.0.0.1"
    port: int = 7000
    http_url: str | None = None
    """Stress an HTTP server with GET requests instead of the line protocol."""
    headers: tuple[bytes, ...] = ()
    """--http: extra request header lines (``-H``, as ab and wrk), without CRLF."""
    requests: int = 1000
    concurrency: int = 10
    duration: float | None = None
    """Run for this many seconds instead of a fixed number of requests."""
    message: bytes | None = None
    """The message every request sends (``--message``; may be empty); None: a unique one each."""
    size: int = 64
    connection: str = "per-request"
    pipeline: int = 1
    rate: float | None = None
    """Open loop: requests per second in all, latency counted from each intended send time."""
    warmup: float = 0.0
    timeout: float = 5.0
    engine: str = "thread"
    processes: int = 1
    address: tuple | None = None
    """(family, sockaddr) the pre-flight connect reached: where every engine connects."""
    pin: bool = True
    """Thread engine: keep each load process on one core (see engines.pin_to_core)."""
    nice: int = 5
    """Lower the load's CPU priority by this much (see engines.run_local)."""

    def __post_init__(self) -> None:
        check(self.requests >= 1, "-n must be at least 1")
        check(1 <= self.concurrency <= MAX_CONCURRENCY, f"-c must be between 1 and {MAX_CONCURRENCY:,} (as ab's)")
        check(self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}")
        check(self.engine != "epoll" or hasattr(select, "epoll"), "--engine epoll needs Linux; use --engine async")
        check(self.connection in CONNECTIONS, f"--connection must be one of {', '.join(CONNECTIONS)}")
        check(self.pipeline >= 1, "--pipeline must be at least 1")
        check(self.pipeline == 1 or self.connection == "keepalive", "--pipeline needs --connection keepalive")
        check(self.pipeline == 1 or self.http_url is None, "--pipeline is for the line protocol only")
        for name, value, unit in (("--timeout", self.timeout, "seconds"), ("--rate", self.rate, "requests per second"),
                                  ("--duration", self.duration, "seconds"), ("--warmup", self.warmup, "seconds")):
            check(value is None or math.isfinite(value), f"{name} must be a finite number of {unit}")
        check(self.timeout > 0, "--timeout must be positive")
        check(self.rate is None or rate_allowed(self.rate),
              f"--rate must be at least one request a year and at most {MAX_RATE:.0e} a second")
        check(self.duration is None or 0 < self.duration <= MAX_SECONDS, "--duration must be positive, at most a year")
        check(self.timeout <= MAX_SECONDS, "--timeout must be at most a year")
        check(self.warmup >= 0, "--warmup cannot be negative")
        check(self.duration is None or self.warmup < self.duration, "--warmup must be shorter than --duration")
        # With -n the run may be over before the warm-up is, and nothing would be measured.
        check(self.warmup == 0 or self.duration is not None, "--warmup needs --duration")
        check(self.message is not None or self.http_url or self.size >= MIN_SIZE,
              f"--size must be at least {MIN_SIZE}: each message carries its client and number (c001-000000042)")
        check(self.size <= MAX_MAX_LINE,
              f"--size must be at most {MAX_MAX_LINE:,} bytes (no server takes a longer line)")
        check(len(self.message or b"") <= MAX_MAX_LINE, f"--message must be at most {MAX_MAX_LINE:,} bytes")
        check(self.processes >= 1, "--processes must be at least 1")
        check(0 <= self.nice <= 19, "--nice must be between 0 and 19")
        check(self.processes <= self.concurrency, "--processes cannot exceed -c")
        # As ApacheBench: more clients than requests would leave some idle and the
        # report's concurrency (and its time per request) untrue.
        check(self.duration is not None or self.requests >= self.concurrency,
              f"-c {self.concurrency} is more than -n {self.requests}: each client sends at least one request")
        check(b"\n" not in (self.message or b""), "--message may not contain a newline")
        check(not self.headers or self.http_url is not None, "-H is for --http")
        for line in self.headers:
            check_header(line)

    @property
    def destination(self) -> tuple[str, int]:
        """The host and port the load goes to (the URL's with --http)."""
        if self.http_url:
            url = urlsplit(self.http_url)
            return url_host(url) or "127.0.0.1", url.port or 80
        return self.host, self.port

    @cached_property  # asked once per request
    def keepalive(self) -> bool:
        return self.connection == "keepalive"


TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
NO_BODY = (b"content-length", b"transfer-encoding")


def check_header(line: bytes) -> None:
    """One -H line: ``Name: value``, a name HTTP allows, no line break, and no
    header that announces a body (the tool sends GETs without one)."""
    text = line.decode("latin-1")
    name, colon, value = line.partition(b":")
    check(bool(colon) and TOKEN.fullmatch(name) is not None,
          f"-H {text!r}: use 'Name: value', e.g. -H 'Accept-Encoding: gzip'")
    check(not any(c in value for c in (b"\r", b"\n", b"\0")), f"-H {text!r}: no line breaks in a header")
    check(name.lower() not in NO_BODY, f"-H {text!r}: the tool sends GET requests without a body")
