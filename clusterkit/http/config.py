"""Settings of the HTTP servers and of the HTTP load balancer."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check, check_backend_name, check_non_negative, check_positive, check_unique_names
from ..sockets import host_port
from .core import Limits
from .static import DEFAULT_ROOT


def check_limits(limits: Limits) -> None:
    check_positive(limits, "header_timeout", "keepalive_timeout")
    check(limits.max_header_bytes >= 1, f"--max-header-bytes must be at least 1, got {limits.max_header_bytes}")


MAX_POOL = 4096
"""Threads of ``--pool`` at most: past this, the machine's thread limit comes first."""


@dataclass(frozen=True)
class HttpServerConfig:
    program: str = "http-async"
    host: str = "127.0.0.1"
    port: int = 45000
    name: str = ""
    """Backend name sent in X-Backend (empty: no header)."""
    root: str = str(DEFAULT_ROOT)
    limits: Limits = field(default_factory=Limits)
    pool: int = 0
    """Threaded server: 0 = a thread per connection; N = a bounded pool of N threads."""
    pin: bool = True
    """Threaded server: keep every thread on one core (see clusterkit.affinity)."""
    backlog: int = 4096
    drain_timeout: float = 5.0
    log_level: str = "info"
    log_dir: str = "logs"
    loop: str = "auto"

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, f"--port: not a port number: {self.port}")
        check(0 <= self.pool <= MAX_POOL, f"--pool must be between 0 and {MAX_POOL:,}")
        check_backend_name(self.name)
        check_non_negative(self, "drain_timeout")
        check_limits(self.limits)


@dataclass(frozen=True)
class HttpBackend:
    host: str
    port: int
    name: str

    def __post_init__(self) -> None:
        check(0 < self.port <= 65535, f"backend {self.name}: not a port number: {self.port}")
        check(bool(self.name), f"backend {self.host}:{self.port}: give it a name")
        check_backend_name(self.name)


DEFAULT_BACKENDS = tuple(HttpBackend("127.0.0.1", p, f"backend{i}") for i, p in enumerate((9002, 9003, 9004, 9005), 1))
"""lb.py's backends when none are given: the four async_server.py of the README."""


def named(entries: list[tuple[str, int, str | None]]) -> list[HttpBackend]:
    """lb.py's backends from (host, port, name or None), from ``--backend`` flags or a
    config file alike. Unnamed, one is ``backend_name(port)`` (``backend1`` on 9002:
    what the backend calls itself), or ``HOST:PORT`` when that name is another's at
    another address: given to one anywhere in the list, or to an unnamed one before
    it (the same port on ``127.0.0.1`` and ``[::1]``). The same address twice stays
    an error (``check_unique_names``)."""
    given = {name: (host, port) for host, port, name in entries if name}
    backends: list[HttpBackend] = []
    for host, port, name in entries:
        if not name:
            name = backend_name(port)
            taken = {**given, **{b.name: (b.host, b.port) for b in backends}}
            if taken.get(name, (host, port)) != (host, port):
                name = host_port(host, port)
        backends.append(HttpBackend(host, port, name))
    return backends


def backend_name(port: int) -> str:
    """An async_server.py's name when ``--name`` is not given: lb.py's name for a default
    port (``backend1`` on 9002), so that its X-Backend and lb.py's log agree; else ``backend-PORT``."""
    return next((b.name for b in DEFAULT_BACKENDS if b.port == port), f"backend-{port}")


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 44444
    backends: tuple[HttpBackend, ...] = DEFAULT_BACKENDS
    limits: Limits = field(default_factory=Limits)
    connect_timeout: float = 3.0
    """Above the kernel's first SYN retransmit (1 s): one lost SYN is no failed connect."""
    response_timeout: float = 10.0
    check_interval: float = 2.0
    """HAProxy's default inter: a check's connect may take 2 s (min(connect, interval)),
    past one SYN retransmit; at 1 s each lost SYN failed a check, and on a lossy
    network live backends went down (503s) where HAProxy took none down."""
    check_timeout: float = 2.0
    check_path: str = "/healthz"
    rise: int = 2
    fall: int = 3
    """HAProxy's default, as Load_Balancer.py's."""
    pool_size: int = 64
    """Idle keep-alive connections kept per backend."""
    admin_port: int = 0
    """GET /stats and /metrics here (http/stats.py); 0: none."""
    drain_timeout: float = 5.0
    log_level: str = "info"
    log_dir: str = "logs"
    loop: str = "auto"

    def __post_init__(self) -> None:
        check(bool(self.host), "host: give a host name or address")  # ('' would mean every interface)
        check(0 <= self.port <= 65535, f"--port: not a port number: {self.port}")
        check(len(self.backends) >= 1, "at least one backend is needed")
        check_unique_names([b.name for b in self.backends])
        check(self.rise >= 1 and self.fall >= 1, "--rise and --fall must be at least 1")
        check_positive(self, "connect_timeout", "response_timeout", "check_interval", "check_timeout")
        check(self.pool_size >= 0, "pool_size must not be negative")
        check_non_negative(self, "drain_timeout")
        check_limits(self.limits)
        check(0 <= self.admin_port <= 65535, f"--admin-port: not a port number: {self.admin_port}")
        check(not self.admin_port or self.admin_port != self.port,
              f"--admin-port {self.admin_port} is lb.py's own --port: give it another")
        check(self.check_path.startswith("/") and not any(c in self.check_path for c in " \r\n"),
              f"--check-path {self.check_path!r}: use a path like /healthz")
