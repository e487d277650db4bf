"""``Load_Balancer.py`` on the command line: flags and TOML into a
``BalancerConfig``, then run the balancer until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import os
import sys

from .. import cli, logs, loops
from ..config import ConfigError
from ..sockets import host_port
from .app import Balancer
from .config import ALGORITHMS, CHECKS, MODES, BackendSpec, BalancerConfig, from_toml


def build_parser() -> argparse.ArgumentParser:
    d = BalancerConfig()
    p = argparse.ArgumentParser(
        description="Load balancer of the TCP cluster: spreads clients over the echo servers, "
                    "health-checks them, and (in message mode) fails over without losing a message.")
    # Defaults None: a setting of --config stays unless the flag is given.
    p.add_argument("--name", help=f"its name in the log lines, to tell two balancers apart (default: {d.name})")
    p.add_argument("--host", type=cli.host_name,
                   help=f"address to listen on (default: {d.host})")
    p.add_argument("--port", type=cli.port_number, help=f"port to listen on (default: {d.port})")
    p.add_argument("--admin-port", type=cli.port_number,
                   help=f"port of GET /stats (JSON) and /metrics (Prometheus); 0 turns it off (default: {d.admin_port})")
    p.add_argument("--backend", action="append", metavar="[NAME=]HOST:PORT[:WEIGHT]",
                   help="a backend server; repeat for each (default: 127.0.0.1:7001, :7002, :7003)")
    p.add_argument("--config", metavar="FILE.toml",
                   help="read settings and [[backends]] from a TOML file (see cluster.example.toml); "
                        "flags given on the command line win")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="message: relay whole messages, fail over with no message lost (default); "
                        "tcp: a plain byte relay, failover at connect time only")
    p.add_argument("--algorithm", choices=ALGORITHMS, default=None,
                   help="roundrobin (default), weighted (smooth weighted round-robin), "
                        "leastconn (fewest active connections), p2c (power of two choices)")
    p.add_argument("--check", choices=CHECKS, default=None,
                   help="health check: message (a real exchange, the default) or connect (a TCP connect only, "
                        "for --mode tcp in front of servers that do not speak the line protocol)")
    for flag, kind, text in (
        ("--check-interval", cli.positive_float, "seconds between two health checks of a backend (HAProxy's inter)"),
        ("--check-timeout", cli.positive_float, "seconds a health check's exchange may take once connected "
                                                "(its connect may take --connect-timeout, at most "
                                                "--check-interval, as HAProxy's timeout check)"),
        ("--rise", cli.positive_int, "good checks in a row that bring a down backend back"),
        ("--fall", cli.positive_int, "failed checks in a row that take a backend down; connect timeouts on "
                                     "traffic in a row too (a refused connect or a reset: at once)"),
        ("--connect-timeout", cli.positive_float, "seconds to connect to a backend before trying the next "
                                                  "(a health check's connect too, at most --check-interval)"),
        ("--response-timeout", cli.positive_float, "seconds a backend may leave a message unanswered before "
                                      "its clients are moved to another backend"),
        ("--idle-timeout", cli.non_negative_float, "seconds a client may stay silent, or leave its answers unread, before it is "
                                  "disconnected, 0 for never"),
        ("--line-timeout", cli.non_negative_float, "message mode: seconds a client may take to finish a line it began; "
                                  "slower gets 'ERR line-timeout' (a slowloris), 0 for never"),
        ("--drain-timeout", cli.non_negative_float, "on SIGTERM/SIGINT/SIGHUP: seconds a client may go on "
                                                    "(served until quiet) before it is wound up"),
        ("--max-connections", cli.positive_int, "clients served at once; more get 'ERR busy'"),
        ("--max-line", cli.positive_int, "longest message in bytes"),
        ("--keepalive", cli.non_negative_int, "message mode: idle backend connections kept per backend for the "
                                              "next clients, as nginx's upstream keepalive; 0: a new backend "
                                              "connection for every client"),
    ):
        default = getattr(d, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=None, help=f"{text} (default: {default})")
    p.add_argument("--loop", choices=loops.LOOPS, default="auto", help="event loop (default: uvloop when installed)")
    cli.add_logging_args(p)
    return p


def config_from_args(args: argparse.Namespace) -> BalancerConfig:
    kwargs: dict = from_toml(args.config) if args.config else {}
    for key in ("mode", "algorithm", "check", "check_interval", "check_timeout", "rise", "fall", "connect_timeout",
                "response_timeout", "idle_timeout", "line_timeout", "drain_timeout", "max_connections", "max_line",
                "keepalive"):
        value = getattr(args, key)
        if value is not None:
            kwargs[key] = value
    if args.backend:
        kwargs["backends"] = tuple(BackendSpec.parse(b) for b in args.backend)
    for key in ("name", "host", "port", "admin_port"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    kwargs.update(log_level=args.log_level, log_dir=args.log_dir, loop=args.loop)
    return BalancerConfig(**kwargs)


async def _run(config: BalancerConfig, elog: logs.EventLog) -> None:
    try:
        balancer = Balancer(config, elog)
    except ConfigError as exc:  # a backend name that does not resolve
        raise cli.Fatal(str(exc), cli.EXIT_USAGE) from None
    try:
        await balancer.start()
    except ConfigError as exc:  # a backend at the balancer's own address
        raise cli.Fatal(str(exc), cli.EXIT_USAGE) from None
    except OSError as exc:
        port = config.admin_port if config.admin_port and balancer._admin is None else config.port
        raise cli.listen_error(config.name, config.host, port, exc) from None
    backends = ", ".join(f"{b.name}" for b in config.backends)
    admin = f", admin http://{host_port(config.host, config.admin_port)}/stats" if config.admin_port else ""
    print(f"{config.name} listening on {host_port(config.host, balancer.port)} (mode {config.mode}, "
          f"{config.algorithm}, backends {backends}{admin}; pid {os.getpid()}); Ctrl-C to stop",
          file=sys.stderr, flush=True)
    if config.algorithm != "weighted" and any(b.weight != 1 for b in config.backends):
        print(f"{config.name}: the backends' weights are for --algorithm weighted; {config.algorithm} spreads clients "
              f"without them", file=sys.stderr, flush=True)
    if balancer.max_clients < config.max_connections:
        print(f"{config.name}: at most {balancer.max_clients} clients at once (the open-files limit allows no more; "
              f"--max-connections is {config.max_connections}): more get 'ERR busy'", file=sys.stderr, flush=True)
    if elog.warning:
        elog.line("WARNING", f"event=listen host={config.host} port={balancer.port} mode={config.mode} "
                             f"algorithm={config.algorithm} backends={','.join(b.name for b in config.backends)} "
                             f"max_clients={balancer.max_clients}")
    await balancer.serve_until_stopped()


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        raise cli.Fatal(str(exc), cli.EXIT_USAGE) from None
    cli.raise_fd_limit()
    elog = logs.configure(config.name, level=config.log_level, log_dir=config.log_dir, file_name=logs.SERVER_LOG)
    loops.run(_run(config, elog), config.loop)
    return cli.EXIT_OK
