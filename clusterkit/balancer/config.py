"""Settings of the TCP load balancer, as one frozen dataclass.

Built from the command line (``--backend host:port[:weight]``, repeatable) or a
TOML file (``--config cluster.toml``; see ``cluster.example.toml``), validated
once, then passed down. Command-line flags win over the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import (ConfigError, check, check_backend_name, check_max_line, check_non_negative, check_positive,
                      check_unique_names, settings_and_backends)
from ..protocol import DEFAULT_MAX_LINE
from ..sockets import host_port

MODES = ("message", "tcp")
ALGORITHMS = ("roundrobin", "weighted", "leastconn", "p2c")
CHECKS = ("message", "connect")


@dataclass(frozen=True)
class BackendSpec:
    host: str
    port: int
    weight: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        check(0 < self.port <= 65535, f"backend {host_port(self.host, self.port)}: not a port number")
        check(self.weight >= 1, f"backend {host_port(self.host, self.port)}: weight must be at least 1")
        check_backend_name(self.name)
        if not self.name:
            object.__setattr__(self, "name", host_port(self.host, self.port))

    @classmethod
    def parse(cls, text: str) -> BackendSpec:
        """``host:port[:weight]``, ``[v6addr]:port[:weight]`` or ``name=host:port[:weight]``."""
        name, given = "", text
        if "=" in text:
            name, text = text.split("=", 1)
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            # (one colon after the bracket: '[::1]7001' and '[::1]::7001' were taken as [::1]:7001)
            parts = [host] + (rest[1:].split(":") if rest.startswith(":") else [""])
        else:
            parts = text.split(":")
        numbers = parts[1:]
        if len(parts) in (2, 3) and all(n.isdigit() for n in numbers):
            try:
                return cls(parts[0], *map(int, numbers), name=name)  # type: ignore[arg-type]
            except ConfigError as exc:  # the real reason: port or weight out of range
                raise ConfigError(f"--backend {given!r}: {exc}") from None
        v6 = " (an IPv6 address in brackets: [::1]:7001)" if text.count(":") > 2 else ""
        raise ConfigError(f"--backend {given!r}: expected [NAME=]HOST:PORT[:WEIGHT]{v6}")


DEFAULT_BACKENDS = tuple(BackendSpec("127.0.0.1", 7000 + i, name=f"server{i}") for i in (1, 2, 3))


@dataclass(frozen=True)
class BalancerConfig:
    name: str = "balancer"
    """Its name in the log lines: two balancers sharing a log (one per mode, say) told apart."""
    host: str = "127.0.0.1"
    port: int = 7000
    admin_port: int = 7100
    """Port of the /stats and /metrics endpoint; 0 turns it off."""
    backends: tuple[BackendSpec, ...] = DEFAULT_BACKENDS
    mode: str = "message"
    algorithm: str = "roundrobin"
    check: str = "message"
    """What a health check does: a real message exchange, or only a TCP connect (HAProxy's
    plain ``check``, for ``--mode tcp`` in front of servers that do not speak the protocol)."""
    check_interval: float = 2.0
    """Seconds between two active health checks of a backend (HAProxy's ``inter``, and
    its default): a check's connect may take min(connect timeout, interval), 2 s,
    past the kernel's first SYN retransmit (1 s). At 1 s each lost SYN failed a
    check, and on a lossy network live backends went down where HAProxy's did not."""
    check_timeout: float = 2.0
    rise: int = 2
    """Consecutive good checks that bring a down backend back."""
    fall: int = 3
    """Consecutive failed checks that take a backend down."""
    connect_timeout: float = 3.0
    """Above the kernel's first SYN retransmit (1 s), so that one lost SYN is no failed
    connect (it always was at 1 s); HAProxy's documentation asks for 3 s and more."""
    response_timeout: float = 2.0
    """A backend that leaves a message unanswered this long is failed over."""
    idle_timeout: float = 300.0
    line_timeout: float = 10.0
    """Message mode: a line begun must end within this long (slowloris); 0: never."""
    drain_timeout: float = 5.0
    drain_quiet: float = 0.25
    max_connections: int = 10_000
    max_line: int = DEFAULT_MAX_LINE
    keepalive: int = 32
    """Message mode: idle backend connections kept per backend for later clients (reuse.py); 0: none."""
    max_pending_bytes: int = 256 * 1024
    """Stop reading a client whose unanswered messages pass this many bytes: the
    servers' own write limit. At 4 MiB, each client that sent and never read cost
    the balancer 1.5-3 MB, a few thousand of them gigabytes; 256 KiB is still
    some 2,500 64-byte messages in flight per client."""
    write_high_water: int = 256 * 1024
    log_level: str = "info"
    log_dir: str = "logs"
    loop: str = "auto"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check(bool(self.name), "--name: give it a name")
        check_backend_name(self.name, "--name")
        check(bool(self.host), "host: give a host name or address")  # ('' would mean every interface)
        check(self.mode in MODES, f"--mode must be one of {', '.join(MODES)}")
        check(self.algorithm in ALGORITHMS, f"--algorithm must be one of {', '.join(ALGORITHMS)}")
        check(self.check in CHECKS, f"--check must be one of {', '.join(CHECKS)}")
        check(len(self.backends) >= 1, "at least one backend is needed")
        check_unique_names([b.name for b in self.backends])
        check_positive(self, "check_interval", "check_timeout", "connect_timeout", "response_timeout")
        check_non_negative(self, "line_timeout", "idle_timeout", "drain_timeout")
        check(self.rise >= 1 and self.fall >= 1, "--rise and --fall must be at least 1")
        check(0 <= self.port <= 65535, f"--port: not a port number: {self.port}")
        check(0 <= self.admin_port <= 65535, f"--admin-port: not a port number: {self.admin_port}")
        check(self.admin_port == 0 or self.admin_port != self.port,
              f"--admin-port {self.admin_port} is the balancer's own --port: choose another (0 turns it off)")
        check(self.max_connections >= 1, "--max-connections must be at least 1")
        check_max_line(self.max_line)
        check(self.keepalive >= 0, "--keepalive must not be negative")
        check(self.write_high_water >= 1 and self.max_pending_bytes >= 1,
              "write-high-water and max-pending-bytes must be at least 1")


FILE_SETTINGS = set(BalancerConfig.__dataclass_fields__) - {"backends", "extra", "drain_quiet", "log_level",
                                                            "log_dir", "loop"}
"""What a config file's [balancer] table may set (backends come from [[backends]]; how
and where the process logs, and its event loop, from the command line, as lb.py's)."""


def from_toml(path: str) -> dict:
    """The settings of a TOML file as keyword arguments of ``BalancerConfig``, each
    of its type; anything unknown or of the wrong type is a one-line error."""
    return settings_and_backends(path, "balancer", BalancerConfig, FILE_SETTINGS, BackendSpec,
                                 lambda fields: {"host": "127.0.0.1"})
