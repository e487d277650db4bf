"""``--spawn``: a throwaway cluster (three echo servers and the balancer on
free loopback ports) for one run, and ``--kill-backend NAME@T`` to crash one
of its servers mid-run, so failover can be watched live."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .. import cluster
from ..balancer import balancer_process
from ..config import ConfigError


NAMES = ("server1", "server2", "server3")


class SpawnedCluster:
    def __init__(self, log_dir: str, balancer_args: tuple[str, ...] = ()) -> None:
        # Out of the terminal's reach: its Ctrl-C stopped them with the run's clients still
        # connecting, and their refused connects were counted as failed requests.
        self.group = cluster.ProcessGroup(own_groups=True)
        ports = cluster.free_ports(5)
        self.servers: dict[str, cluster.Process] = {}
        try:
            for i, name in enumerate(NAMES):
                self.servers[name] = self.group.start(cluster.echo_server(name, ports[i], log_dir=log_dir))
            backends = [f"{name}=127.0.0.1:{p.port}" for name, p in self.servers.items()]
            self.balancer = self.group.start(balancer_process(
                ports[3], backends, "--check-interval", "0.5", "--response-timeout", "1", *balancer_args,
                admin_port=ports[4], log_dir=log_dir))
        except BaseException:  # (Ctrl-C or a stop signal while starting too: nothing is left behind)
            self.group.stop()
            raise
        self.port = self.balancer.port
        self.admin_port = ports[4]

    def kill(self, name: str) -> None:
        self.servers[name].kill()

    def stop(self) -> None:
        self.group.stop()


def parse_kill(spec: str) -> tuple[str, float, bool]:
    """``server2@1.5`` (seconds) or ``server2@50%`` (of the requests, or of --duration):
    (name, seconds or fraction, whether a fraction)."""
    name, sep, when = spec.partition("@")
    if not sep or not name:
        raise ConfigError(f"--kill-backend {spec!r}: use NAME@SECONDS or NAME@PERCENT%")
    if name not in NAMES:
        raise ConfigError(f"--kill-backend {spec!r}: no spawned backend named {name!r} (have {', '.join(NAMES)})")
    fraction = when.endswith("%")
    try:
        at = float(when[:-1] if fraction else when)
    except ValueError:
        raise ConfigError(f"--kill-backend {spec!r}: {when!r} is not a number") from None
    if fraction and not 0 < at < 100:
        raise ConfigError(f"--kill-backend {spec!r}: mid-run is more than 0% and less than 100%")
    if not fraction and not 0 < at < float("inf"):
        raise ConfigError(f"--kill-backend {spec!r}: give a number of seconds above 0")
    return name, at / 100 if fraction else at, fraction


class Killer:
    """Kills a spawned backend at a time, or at a fraction of the requests done
    (of the duration, for a run of --duration)."""

    def __init__(self, spawned: SpawnedCluster, name: str, at: float, fraction: bool, total: int,
                 duration: float | None, on_kill: Callable[[str], None]) -> None:
        if fraction and duration:
            at, fraction = at * duration, False
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
