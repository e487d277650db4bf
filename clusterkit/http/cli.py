"""Command lines of the HTTP programs in ``http_servers/``: flags into a config,
then run until SIGTERM/SIGINT. Each ``main_*`` is what one script calls."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .. import cli, logs, loops
from ..config import ConfigError, settings_and_backends
from ..sockets import host_port
from .config import HttpBackend, HttpServerConfig, ProxyConfig, backend_name, named
from .core import Limits
from .static import DEFAULT_ROOT


def _common(p: argparse.ArgumentParser, port: int | None, positional_port: bool = False,
            event_loop: bool = True, config_file: bool = False) -> None:
    """``config_file``: lb.py, whose --config may set these too; each flag defaults
    to None, so that a setting of the file stays unless the flag is given."""
    d = Limits()

    def default(value):
        return None if config_file else value

    p.add_argument("--host", default=default("127.0.0.1"), type=cli.host_name,
                   help="address to listen on (default: 127.0.0.1)")
    if positional_port:
        p.add_argument("port_arg", nargs="?", type=cli.port_number, metavar="PORT",
                       help="port to listen on (required: PORT or --port)")
    p.add_argument("--port", type=cli.port_number, default=default(port),
                   help="port to listen on" + (f" (default: {port})" if port else " (the same as PORT)"))
    p.add_argument("--header-timeout", type=cli.positive_float, default=default(d.header_timeout),
                   help=f"seconds a client has to send a request head; slower gets 408 (default: {d.header_timeout})")
    p.add_argument("--keepalive-timeout", type=cli.positive_float, default=default(d.keepalive_timeout),
                   help="seconds an idle keep-alive connection stays open, and a client that takes "
                        f"none of its answers is kept (default: {d.keepalive_timeout})")
    p.add_argument("--max-header-bytes", type=cli.positive_int, default=default(d.max_header_bytes),
                   help=f"request headers larger than this get 431 (default: {d.max_header_bytes})")
    if event_loop:
        p.add_argument("--loop", choices=loops.LOOPS, default="auto",
                       help="event loop (default: uvloop when installed)")
    cli.add_logging_args(p)


def _limits(args) -> Limits:
    return Limits(header_timeout=args.header_timeout, keepalive_timeout=args.keepalive_timeout,
                  max_header_bytes=args.max_header_bytes)


def _server_parser(description: str, port: int | None, positional: bool = False,
                   event_loop: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    _common(p, port, positional, event_loop)
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="document root (default: http_servers/www)")
    p.add_argument("--name", default="", help="backend name sent in the X-Backend header (default: "
                                               + ("backend1..backend4 on 9002..9005, as lb.py names them, else "
                                                  "backend-PORT)" if positional else "none, no X-Backend)"))
    return p


def _announce(program: str, host: str, port: int, extra: str = "") -> None:
    print(f"{program} listening on http://{host_port(host, port)}/page.html{extra} (pid {os.getpid()}); Ctrl-C to stop",
          file=sys.stderr, flush=True)


async def _serve_async(config: HttpServerConfig, elog: logs.EventLog) -> None:
    from .async_server import AsyncHttpServer
    server = AsyncHttpServer(config, elog)
    try:
        await server.start()
    except OSError as exc:
        raise cli.listen_error(config.program, config.host, config.port, exc) from None
    named = f"{config.program} {config.name}" if config.name else config.program
    _announce(named, config.host, server.port, f" ({loops.loop_name(config.loop)})")
    _say_limit(config.program, server.max_clients)
    await server.serve_until_stopped()


def _say_limit(program: str, max_clients: int) -> None:
    """A client limit the open-files limit set low is said at start."""
    if max_clients < 10_000:
        print(f"{program}: at most {max_clients} clients at once (the open-files limit allows no more): "
              f"more get 503", file=sys.stderr, flush=True)


def _run_server(args, program: str, threaded: bool) -> int:
    given = getattr(args, "port_arg", None)
    if given is not None and args.port is not None and given != args.port:
        raise cli.Fatal(f"{program}: PORT {given} and --port {args.port}: give one of them", cli.EXIT_USAGE)
    port = given if given is not None else args.port
    if port is None:
        raise cli.Fatal(f"{program}: give the port (e.g. 9002)", cli.EXIT_USAGE)
    name = args.name or (backend_name(port) if program == "http-backend" else "")
    try:
        config = HttpServerConfig(program=program, host=args.host, port=port, name=name, root=args.root,
                                  limits=_limits(args), pool=getattr(args, "pool", 0), pin=getattr(args, "pin", False),
                                  log_level=args.log_level,
                                  log_dir=args.log_dir, loop=getattr(args, "loop", "auto"))
    except ConfigError as exc:
        raise cli.Fatal(str(exc), cli.EXIT_USAGE) from None
    cli.raise_fd_limit()
    elog = logs.configure(name or program, level=config.log_level, log_dir=config.log_dir, file_name=logs.SERVER_LOG)
    if threaded:
        from .threaded import ThreadLimit, run_threaded

        def announce(p: int, core: int | None, max_clients: int) -> None:
            kind = f"pool {config.pool}" if config.pool else "a thread per connection"
            _announce(program, config.host, p, f" ({kind}" + (f", on core {core})" if core is not None else ")"))
            _say_limit(program, max_clients)
        try:
            run_threaded(config, elog, announce)
        except ThreadLimit as exc:
            raise cli.Fatal(str(exc), cli.EXIT_USAGE) from None
        except OSError as exc:
            raise cli.listen_error(program, config.host, config.port, exc) from None
    else:
        loops.run(_serve_async(config, elog), config.loop)
    return cli.EXIT_OK


@cli.main_wrapper
def main_async(argv: list[str] | None = None) -> int:
    p = _server_parser("The async HTTP server (asyncio, uvloop when installed) serving http_servers/www.", 45000)
    return _run_server(p.parse_args(argv), "http-async", threaded=False)


@cli.main_wrapper
def main_threaded(argv: list[str] | None = None) -> int:
    p = _server_parser("The threaded HTTP server (blocking sockets) serving http_servers/www.", 46000,
                       event_loop=False)
    p.add_argument("--pool", type=int, default=0,
                   help="0: a thread per connection (default; a thread whose connection ended waits 5 s "
                        "for the next); N: a bounded pool of N threads")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="let the kernel spread the threads over every core (by default they share one, where "
                        "passing the GIL between them is cheap)")
    return _run_server(p.parse_args(argv), "http-threaded", threaded=True)


@cli.main_wrapper
def main_backend(argv: list[str] | None = None) -> int:
    p = _server_parser("One async HTTP backend of the load balancer: async_server.py PORT --name NAME "
                       "(run four: 9002..9005). Every answer carries X-Backend: NAME.", None, positional=True)
    return _run_server(p.parse_args(argv), "http-backend", threaded=False)


LB_LIMITS = {"header_timeout", "keepalive_timeout", "max_header_bytes"}
"""The request limits lb.py's command line sets, fields of ``Limits`` (in ``ProxyConfig.limits``)."""
LB_FILE_SETTINGS = ({f.name for f in dataclasses.fields(ProxyConfig)} - {"limits", "backends", "log_level", "log_dir",
                                                                         "loop"}) | LB_LIMITS
"""What a config file's [lb] table may set: what the command line sets, but the backends
(its [[backends]]), the log and the event loop."""


def proxy_settings(path: str) -> dict:
    """An lb.py TOML file's [lb] settings (those of ``Limits`` among them) and [[backends]], each of its type."""
    return settings_and_backends(path, "lb", (ProxyConfig, Limits), LB_FILE_SETTINGS, HttpBackend,
                                 lambda fields: {"host": "127.0.0.1"},
                                 lambda filled: named([(f["host"], f["port"], f.get("name")) for f in filled]))


def parse_backend(text: str) -> tuple[str, int, str | None]:
    """``--backend [NAME=]HOST:PORT``, an IPv6 address in brackets: (host, port, the
    name or None; ``named`` names an unnamed one). Refused: an IPv6 address without
    brackets, read before as a host and a port (``::1:9002:2`` was ``[::1:9002]``
    port 2), and a weight, which lb.py has not."""
    name, _, addr = text.rpartition("=")
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or (":" in host and not addr.startswith("[")):
        raise ConfigError(f"--backend {text!r}: expected [NAME=]HOST:PORT (no weight; an IPv6 address in "
                          f"brackets: [::1]:9002)")
    return host, int(port), name or None


def proxy_config(args) -> ProxyConfig:
    """The file's settings, each flag given on the command line in place of its own."""
    kwargs: dict = {}
    if args.config:
        kwargs = proxy_settings(args.config)
    if args.backend:
        kwargs["backends"] = tuple(named([parse_backend(text) for text in args.backend]))
    for key in LB_FILE_SETTINGS:
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    limits = Limits(**{key: kwargs.pop(key) for key in LB_LIMITS if key in kwargs})
    return ProxyConfig(limits=limits, log_level=args.log_level, log_dir=args.log_dir, loop=args.loop, **kwargs)


async def _serve_proxy(config: ProxyConfig, elog: logs.EventLog) -> None:
    from .proxy import Proxy
    proxy = Proxy(config, elog)
    try:
        await proxy.start()
    except ConfigError as exc:  # a backend that does not resolve, or lb.py's own address
        raise cli.Fatal(str(exc), cli.EXIT_USAGE) from None
    except OSError as exc:
        raise cli.listen_error("lb", config.host, config.port, exc) from None
    if config.admin_port:
        try:
            await proxy.start_admin()
        except OSError as exc:
            raise cli.listen_error("lb admin", config.host, config.admin_port, exc) from None
    admin = f", admin http://{host_port(config.host, config.admin_port)}/stats" if config.admin_port else ""
    _announce("lb", config.host, proxy.port,
              " -> " + ", ".join(f"{b.name}@{host_port(b.host, b.port)}" for b in config.backends) + admin)
    _say_limit("lb", proxy.max_clients)
    await proxy.serve_until_stopped()


def lb_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="HTTP load balancer: round-robin per request over the async "
                                            "backends, keep-alive pools, health checks, retries, X-Backend.")
    _common(p, 44444, config_file=True)
    d = ProxyConfig()
    p.add_argument("--backend", action="append", metavar="[NAME=]HOST:PORT",
                   help="a backend, IPv6 as [::1]:PORT; repeat for each (default: 127.0.0.1:9002..9005). "
                        "Unnamed, it is backend1..backend4 on 9002..9005, as async_server.py names itself, "
                        "else backend-PORT")
    p.add_argument("--config", metavar="FILE.toml", help="settings and [[backends]] from TOML "
                                                         "(see http_servers/lb.example.toml); flags given on "
                                                         "the command line win")
    p.add_argument("--check-interval", type=cli.positive_float, help="seconds between health checks "
                                                                         f"(default: {d.check_interval:g})")
    p.add_argument("--check-path", help="what the health check GETs; any answer below 500 passes, so a backend "
                                        "without it (nginx: 404) still counts as up (default: /healthz)")
    p.add_argument("--rise", type=cli.positive_int, help=f"good checks that bring a backend back (default: {d.rise})")
    p.add_argument("--fall", type=cli.positive_int, help="failed checks that take a backend down; connect timeouts "
                                                         "on requests in a row too (a refused connect: at once) "
                                                         f"(default: {d.fall})")
    p.add_argument("--response-timeout", type=cli.positive_float,
                   help=f"seconds a backend may leave its answer without a byte (default: {d.response_timeout:g})")
    p.add_argument("--admin-port", type=cli.port_number,
                   help="port of GET /stats (JSON) and /metrics (Prometheus) per backend (default: none)")
    for flag, kind, text in (
        ("--connect-timeout", cli.positive_float, "seconds to connect to a backend before trying the next "
                                                  "(a health check's connect too, at most --check-interval)"),
        ("--check-timeout", cli.positive_float, "seconds a health check's exchange may take once connected "
                                                "(its connect may take --connect-timeout, at most "
                                                "--check-interval, as HAProxy's timeout check)"),
        ("--pool-size", cli.non_negative_int, "idle keep-alive connections kept per backend for the next "
                                              "requests; 0: a new backend connection for every request"),
        ("--drain-timeout", cli.non_negative_float, "on SIGTERM/SIGINT/SIGHUP: seconds the answers on their way "
                                                    "may take before their connections are cut"),
    ):
        default = getattr(d, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=None, help=f"{text} (default: {default})")
    return p


@cli.main_wrapper
def main_lb(argv: list[str] | None = None) -> int:
    args = lb_parser().parse_args(argv)
    try:
        config = proxy_config(args)
    except ConfigError as exc:
        raise cli.Fatal(str(exc), cli.EXIT_USAGE) from None
    cli.raise_fd_limit()
    elog = logs.configure("lb", level=config.log_level, log_dir=config.log_dir, file_name=logs.SERVER_LOG)
    loops.run(_serve_proxy(config, elog), config.loop)
    return cli.EXIT_OK
