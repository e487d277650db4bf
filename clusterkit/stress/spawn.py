"""``--spawn``: a throwaway cluster (three echo servers and the balancer on
free loopback ports) for one run, and ``--kill-backend NAME@T`` to crash one
of its servers mid-run, so failover can be watched live."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .. import cluster
from ..balancer import balancer_process
from ..config import ConfigError


class SpawnedCluster:
    def __init__(self, log_dir: str, balancer_args: tuple[str, ...] = ()) -> None:
        self.group = cluster.ProcessGroup()
        ports = cluster.free_ports(5)
        self.servers: dict[str, cluster.Process] = {}
        try:
            for i in range(3):
                name = f"server{i + 1}"
                self.servers[name] = self.group.start(cluster.echo_server(name, ports[i], log_dir=log_dir))
            backends = [f"{name}=127.0.0.1:{p.port}" for name, p in self.servers.items()]
            self.balancer = self.group.start(balancer_process(
                ports[3], backends, "--check-interval", "0.5", "--response-timeout", "1", *balancer_args,
                admin_port=ports[4], log_dir=log_dir))
        except Exception:
            self.group.stop()
            raise
        self.port = self.balancer.port
        self.admin_port = ports[4]

    def kill(self, name: str) -> None:
        self.servers[name].kill()

    def stop(self) -> None:
        self.group.stop()


def parse_kill(spec: str) -> tuple[str, float, bool]:
    """``server2@1.5`` (seconds) or ``server2@50%`` (of the requests)."""
    name, sep, when = spec.partition("@")
    if not sep or not name:
        raise ConfigError(f"--kill-backend {spec!r}: use NAME@SECONDS or NAME@PERCENT%")
    try:
        if when.endswith("%"):
            return name, float(when[:-1]) / 100, True
        return name, float(when), False
    except ValueError:
        raise ConfigError(f"--kill-backend {spec!r}: {when!r} is not a number") from None


class Killer:
    """Kills a spawned backend at a time or at a fraction of the requests done."""

    def __init__(self, spawned: SpawnedCluster, name: str, at: float, fraction: bool, total: int,
                 on_kill: Callable[[str], None]) -> None:
        if name not in spawned.servers:
            raise ConfigError(f"--kill-backend: no spawned backend named {name!r} "
                              f"(have {', '.join(spawned.servers)})")
        self.spawned, self.name, self.at, self.fraction, self.total = spawned, name, at, fraction, total
        self.on_kill = on_kill
        self.done = False
        self.timer: threading.Timer | None = None
        if not fraction:
            self.timer = threading.Timer(at, self.fire)
            self.timer.daemon = True

    def start(self) -> None:
        if self.timer is not None:
            self.timer.start()

    def progress(self, done: int) -> None:
        if self.fraction and not self.done and done >= self.at * self.total:
            self.fire()

    def fire(self) -> None:
        if not self.done:
            self.done = True
            self.spawned.kill(self.name)
            self.on_kill(self.name)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
