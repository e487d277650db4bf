"""``ClientServer_StressTools.py`` on the command line: options into a
StressConfig, the run with a live view, the report as a rich table and as
JSON/CSV/markdown files, one log line per request."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from .. import cli, logs, loops
from ..config import MAX_SECONDS, ConfigError
from ..sockets import create_connection, host_port
from . import engines, metrics, report
from .board import Board
from .config import CONNECTIONS, ENGINES, MAX_RATE, StressConfig, rate_allowed
from .plan import connect_error
from .spawn import Killer, SpawnedCluster, parse_kill

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000
"""The target when neither --host/--port nor --http says: the balancer."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Stress the TCP cluster (the balancer on 127.0.0.1:7000 by default) or an HTTP server "
                    "with many concurrent clients; every reply is verified; the report has ApacheBench's "
                    "columns plus latency and rtt percentiles and requests per backend.")
    t = p.add_argument_group("target")
    # Defaults filled in by make_configs: None says the option was not given (--spawn refuses them).
    t.add_argument("--host", type=cli.host_name, help=f"server or balancer address (default: {DEFAULT_HOST})")
    t.add_argument("--port", type=cli.peer_port, help=f"its port (default: {DEFAULT_PORT})")
    t.add_argument("--http", metavar="URL", help="stress an HTTP server with GET requests (HTTP/1.0, as "
                                                  "ApacheBench), e.g. http://127.0.0.1:45000/page.html")
    t.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="with --http: add this header to every request (repeatable); one named Host, "
                        "User-Agent, Accept or Connection replaces the tool's own, as in ab")
    t.add_argument("--spawn", action="store_true",
                   help="start three echo servers and the balancer on free ports for this run, stop them after "
                        "(the balancer with --check-interval 0.5 --response-timeout 1, so failover shows quickly)")
    t.add_argument("--kill-backend", metavar="NAME@T",
                   help="with --spawn: kill -9 that backend (server1, server2 or server3) T seconds, or T%% "
                        "of the requests (of --duration with --duration), into the run")
    w = p.add_argument_group("load")
    w.add_argument("-n", "--requests", type=cli.positive_int, help="requests in all (default: 1000)")
    w.add_argument("-c", "--concurrency", type=cli.positive_int, default=10,
                   help="concurrent clients (default: 10)")
    w.add_argument("--duration", type=cli.positive_float, help="run this many seconds instead of -n requests")
    w.add_argument("--message", help="the message to send (default: a unique message per request)")
    w.add_argument("--size", type=cli.positive_int, help="message size in bytes (default: 64)")
    w.add_argument("--connection", choices=CONNECTIONS, default="per-request",
                   help="a new connection per request (default, as client_send_message and ab) or keep-alive")
    w.add_argument("-k", "--keepalive", action="store_true", help="same as --connection keepalive")
    w.add_argument("--pipeline", type=cli.positive_int, default=1,
                   help="messages in flight per connection (keep-alive, line protocol; default: %(default)s)")
    w.add_argument("--rate", type=request_rate,
                   help="open loop: this many requests per second in all; latency is counted from each request's "
                        "intended send time (as wrk2)")
    w.add_argument("--warmup", type=cli.non_negative_float, default=0.0,
                   help="seconds at the start not counted in the report (needs --duration)")
    w.add_argument("--timeout", type=cli.positive_float, default=5.0,
                   help="seconds to wait for connect and for each answer (default: %(default)s)")
    w.add_argument("--sweep", metavar="C1,C2,...", help="run once per concurrency level, one table row each "
                                                         "(e.g. 1,3,5,8,10)")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=ENGINES, default="thread",
                   help="thread: one thread per client (default); async: asyncio/uvloop callbacks; "
                        "epoll: one readiness loop on raw sockets per process, as ab and wrk (Linux; the "
                        "fastest with a new connection per request)")
    e.add_argument("--processes", default="auto",
                   help="spread the clients over this many processes (default: auto = the number of cores, "
                        "at most -c)")
    e.add_argument("--nice", type=int, default=5,
                   help="lower the load's CPU priority by this much, 0-19 (default: 5): on a machine shared "
                        "with the server under test, the server runs first whenever both are ready, so the "
                        "tool takes the spare CPU, not the server's (0: equal footing)")
    e.add_argument("--no-pin", dest="pin", action="store_false",
                   help="thread engine: let the kernel move each load process's threads between cores (by "
                        "default each process stays on one core, where its threads pass the GIL cheaply)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the results as JSON")
    o.add_argument("--csv", metavar="FILE", help="write the results as CSV")
    o.add_argument("--markdown", metavar="FILE", help="write the assignment's table as markdown")
    o.add_argument("--quiet", action="store_true", help="no progress view")
    cli.add_logging_args(p)
    return p


def request_rate(text: str) -> float:
    """A ``--rate``: requests per second in all (``config.rate_allowed``)."""
    value = float(text)
    if not rate_allowed(value):
        raise argparse.ArgumentTypeError(f"must be at least one request a year ({1 / MAX_SECONDS:.1e}/s) and at "
                                         f"most one a nanosecond ({MAX_RATE:.0e}/s), got {value}")
    return value


AUTHORITY = re.compile(r"([^@/]*@)?(\[[0-9A-Za-z:.%_~-]+\]|[^\[\]:@/]+)(:[0-9]*)?")
"""A URL's [userinfo@]host[:port] (the user info is left out of the Host header)."""


def make_configs(args: argparse.Namespace) -> list[StressConfig]:
    levels = [args.concurrency]
    if args.sweep:
        try:
            levels = [int(x) for x in args.sweep.split(",") if x.strip()]
            if not levels:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--sweep {args.sweep!r}: use numbers like 1,3,5,8,10") from None
    if args.http:
        try:
            url = urlsplit(args.http)
            url.port  # (raises for a port out of range, or not a number)
        except ValueError as exc:
            raise ConfigError(f"--http {args.http!r}: {exc}") from None
        if url.scheme != "http" or not url.hostname or not AUTHORITY.fullmatch(url.netloc):
            raise ConfigError(f"--http {args.http!r}: use a URL like http://127.0.0.1:45000/page.html")
        if url.port == 0:
            raise ConfigError(f"--http {args.http!r}: port 0 is no port to connect to")
        ignored = [flag for flag, value in (("--host", args.host), ("--port", args.port), ("--message", args.message),
                                            ("--size", args.size)) if value is not None]
        if ignored:
            raise ConfigError(f"--http sends GET requests to the URL's host and port: leave out {', '.join(ignored)}")
    if args.requests and args.duration:
        raise ConfigError("give -n or --duration, not both: a run ends after one of them")
    if args.processes != "auto" and not args.processes.isdigit():
        raise ConfigError(f"--processes {args.processes!r}: use a number, or auto")
    configs = []
    for c in levels:
        procs = engines.default_processes(c) if args.processes == "auto" else int(args.processes)
        configs.append(StressConfig(
            host=args.host or DEFAULT_HOST, port=args.port or DEFAULT_PORT, http_url=args.http,
            headers=tuple(h.encode("latin-1", "replace") for h in args.header),
            requests=args.requests or 1000, concurrency=c,
            duration=args.duration, message=None if args.message is None else args.message.encode(),
            size=args.size or 64,
            connection="keepalive" if args.keepalive else args.connection, pipeline=args.pipeline,
            rate=args.rate, warmup=args.warmup, timeout=args.timeout, engine=args.engine,
            processes=min(procs, c), pin=args.pin, nice=args.nice))
    return configs


def preflight(cfg: StressConfig) -> tuple[int, tuple]:
    """A dead target ends the run at once with one clear line (exit 69); a live
    one gives the address that answered, (family, sockaddr)."""
    host, port = cfg.destination
    try:
        with create_connection(host, port, cfg.timeout) as sock:
            return sock.family, sock.getpeername()
    except ConnectionRefusedError:
        why = "connection refused (is the server running? --spawn starts a cluster for the run)"
    except OSError as exc:
        why = exc.strerror or str(exc)
        short = {"no-local-port": "local ports", "no-descriptor": "descriptors"}.get(connect_error(exc))
        if short:  # this machine's, not the target's (a run just before used the ports)
            raise cli.Fatal(f"cannot connect to {host_port(host, port)}: {why}: this machine ran out of {short}; "
                            f"the target was not at fault", cli.EXIT_OSERR) from None
    raise cli.Fatal(f"cannot connect to {host_port(host, port)}: {why}", cli.EXIT_UNAVAILABLE)


class Progress:
    """Live progress: a rich line on a terminal, a plain line a second otherwise."""

    def __init__(self, total: int | None, quiet: bool, extra=None) -> None:
        self.total = total
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last_print = 0.0
        self.last_done = 0
        self.last_t = self.start
        self.rate = 0.0
        self.p50: float | None = None
        self.p99: float | None = None
        self.extra = extra
        self.live = None
        if self.tty and not quiet:
            from rich.console import Console
            from rich.live import Live
            self.live = Live(console=Console(stderr=True), refresh_per_second=8, transient=True)
            self.live.start()

    def update(self, board: Board) -> None:
        done, failed = board.done(), board.failed()
        if self.extra is not None:
            self.extra(done)
        now = time.monotonic()
        if now - self.last_t >= 0.5:
            self.rate = (done - self.last_done) / (now - self.last_t)
            self.last_done, self.last_t = done, now
            self.p50, self.p99 = board.percentiles(50, 99)  # summing the histogram: twice a second is enough
        text = (f"{done:,}" + (f"/{self.total:,}" if self.total else "") +
                f" requests  {failed:,} failed  {self.rate:,.0f}/s")
        if self.p50 is not None:
            text += f"  latency p50 ~{self.p50:.2f} ms  p99 ~{self.p99:.2f} ms"
        text += f"  {now - self.start:.1f}s"
        if self.live is not None:
            self.live.update(text)
        elif not self.quiet and now - self.last_print >= 1.0:
            try:
                print(f"progress: {text}", file=sys.stderr, flush=True)
            except OSError:  # (stderr on a full disk, or gone): the run and its report matter more
                self.quiet = True
            self.last_print = now

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def write_request_log(elog: logs.EventLog, entries: list, cfg: StressConfig, requests: int) -> None:
    """One line per request (at warning level, per failed request), written after the
    run so logging never slows it; at most about LOG_KEPT of each kind (metrics.py)."""
    if not elog.warning or not entries:
        return
    offset = time.time() - time.perf_counter_ns() / 1e9
    target = logs.quote(cfg.http_url or host_port(cfg.host, cfg.port))
    entries.sort(key=lambda e: e[0])
    if elog.info and len(entries) < requests:
        # (past metrics.LOG_KEPT answers a run, only failures are logged one by one)
        elog.line("INFO", f"event=log-capped target={target} logged={len(entries)} requests={requests} "
                          f"kept={metrics.LOG_KEPT}")
    names: dict[str, str] = {}  # the backends' names as logged: what the server under test said, quoted
    for i, (sent, backend, lat, rtt, kind, connect_ns) in enumerate(entries, 1):
        ts = logs.timestamp(offset + sent / 1e9)
        if kind is None:
            backend = names.get(backend) or names.setdefault(backend, logs.quote(backend))
            connect = f" connect_ms={connect_ns / 1e6:.3f}" if connect_ns else ""  # (it opened its connection)
            elog.line("INFO", f"event=request n={i} target={target} sent={ts} backend={backend} reply=ok "
                              f"confirmation=ok{connect} latency_ms={lat / 1e6:.3f} rtt_ms={rtt / 1e6:.3f}")
        else:
            elog.line("WARNING", f"event=request n={i} target={target} sent={ts} error={logs.quote(kind)}")


def print_report(rows: list[dict], killed: list[str], interrupted: bool = False) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title="stress test" + (f" (killed mid-run: {', '.join(killed)})" if killed else ""))
    table.add_column("metric", overflow="fold")  # (too narrow a terminal: wrapped, never cut)
    for r in rows:
        table.add_column(f"c={r['concurrency']}", justify="right", overflow="fold")
    for key, label in report.COLUMNS:
        table.add_row(label, *[report.fmt_column(r, key) for r in rows])
    for group in report.TIMING_GROUPS:
        for p in ("p50", "p90", "p99", "p99.9", "max"):
            table.add_row(f"{group[:-3]} {p} (ms)", *[report.fmt(r[group][p]) for r in rows])
    table.add_row("connections opened", *[report.fmt(r["connections"]) for r in rows])
    table.add_row("client CPU (% of a core per process)", *[report.fmt(r["client_cpu_percent"], 1) for r in rows])
    table.add_row("client CPU (cores)", *[report.fmt(r["client_cores"], 2) for r in rows])
    table.add_row("machine CPU busy (%)", *[report.fmt(r["machine_busy_percent"], 1) for r in rows])
    if any(r["server_cpu_percent"] is not None for r in rows):
        table.add_row("server CPU (% of a core)", *[report.fmt(r["server_cpu_percent"], 1) for r in rows])
    names = sorted({b for r in rows for b in r["backends"]})
    for name in names:
        # (names and kinds come from the server under test: no markup of rich's in them; "[/x]" raised)
        table.add_row(escape(report.answered_by(name)), *[report.fmt(r["backends"].get(name, 0)) for r in rows])
    kinds = sorted({k for r in rows for k in r["errors"]})
    for kind in kinds:
        table.add_row(escape(f"failed: {logs.printable(kind)}"), *[report.fmt(r["errors"].get(kind, 0))
                                                                    for r in rows])
    needed = console.measure(table, options=console.options.update_width(10_000)).maximum
    if needed > console.width and not console.is_terminal:  # (80 columns): wider, not numbers cut to "28,2…"
        console = Console(width=needed)
    console.print(table)
    r = rows[0]
    # An HTTP answer has no confirmation line: its rtt ends with the whole answer.
    end = "the whole answer" if str(r["target"]).startswith("http") else "the confirmation (ACK)"
    if r.get("rate"):
        timing = (f"open loop at {r['rate']:g} requests/s: latency, rtt and total are counted from each "
                  f"request's intended send time (as wrk2 does, so a stalled server cannot hide behind the "
                  f"schedule); latency ends at the first reply byte, rtt and total at {end}")
    else:
        timing = (f"latency = send to first reply byte, rtt = send to {end}, total = connect "
                  f"(if the request opened one) to {end}, as ApacheBench's Total")
    counts = sorted({row["processes"] for row in rows})  # (a sweep's levels may differ: auto is at most -c)
    processes = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    console.print(f"target {escape(str(r['target']))}, engine {r['engine']} x {processes} process(es), "
                  f"{r['connection']} connections; {timing}")
    for r in rows:
        unsent = r["scheduled"] - r["complete"] - r["failed"] if r["scheduled"] else 0
        if unsent > r["concurrency"] and not interrupted:  # (Ctrl-C: the user ended it, not the server)
            # A run cut short (a dead target) left the rest of its schedule unsent: no stall.
            cause = (f"the run ended early, as {r['ended_early']}" if r["ended_early"] else
                     "the clients were still waiting for answers when the run ended (the server fell behind "
                     "or stalled)")
            console.print(f"[yellow]warning: c={r['concurrency']}: {unsent:,} of the {r['scheduled']:,} requests "
                          f"the schedule had were never sent: {cause}.[/]")
    spare = [r for r in rows if r["rate_is_lower_bound"]]
    if spare:
        levels = ", ".join(f"c={r['concurrency']}: {r['server_cpu_percent']:.0f}% of a core" for r in spare)
        console.print(f"[yellow]warning: the server had room left ({levels}) while the load generator, or the "
                      f"CPUs it shared with the server, was at its limit: this rate is the load's, only a lower "
                      f"bound for the server, and cannot tell which of two such servers is faster. Drive it "
                      f"with more --processes, from another machine, or with a C load generator.[/]")
    judged = [r for r in rows if r["time_taken_s"] >= report.JUDGED_SECONDS]
    busy = [r for r in judged if r["client_cpu_percent"] >= report.SATURATED and r not in spare]
    if busy:
        levels = ", ".join(f"c={r['concurrency']}: {r['client_cpu_percent']:.0f}%" for r in busy)
        console.print(f"[yellow]warning: the load generator was near its limit ({levels} of a core per process): "
                      f"it may have set the pace, not the server. Try --engine async, more --processes, "
                      f"or a C load generator to compare.[/]")
    shared = [r for r in judged if (r["machine_busy_percent"] or 0) >= report.MACHINE_FULL and r not in busy + spare]
    if shared:
        levels = ", ".join(f"c={r['concurrency']}: {r['machine_busy_percent']:.0f}% busy, "
                           f"{r['client_cores']:.2f} cores to the load generator" for r in shared)
        console.print(f"[yellow]note: this machine's CPUs were nearly full during the run ({levels}): "
                      f"a server on the same machine had only what was left.[/]")


def _interrupt(signum: int, frame) -> None:
    raise engines.Stopped(signal.Signals(signum).name)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configs = make_configs(args)
        kill = parse_kill(args.kill_backend) if args.kill_backend else None
    except (ConfigError, ValueError) as exc:
        raise cli.Fatal(str(exc), cli.EXIT_USAGE) from None
    for option, path in (("--json", args.json), ("--csv", args.csv), ("--markdown", args.markdown)):
        if not path:  # (found out before the run, not after it)
            continue
        folder = Path(path).resolve().parent
        if not folder.is_dir():
            raise cli.Fatal(f"{option}: cannot write {path}: no directory {str(folder)!r}", cli.EXIT_USAGE)
        if Path(path).is_dir() or not os.access(path if Path(path).exists() else folder, os.W_OK):
            raise cli.Fatal(f"{option}: cannot write {path}: " +
                            ("a directory" if Path(path).is_dir() else "permission denied"), cli.EXIT_USAGE)
    if kill and not args.spawn:
        raise cli.Fatal("--kill-backend needs --spawn (it kills a backend this run started)", cli.EXIT_USAGE)
    if args.spawn and (args.host or args.port or args.http):
        raise cli.Fatal("--spawn starts its own cluster on free ports of 127.0.0.1 and stresses its balancer: "
                        "leave out --host, --port and --http", cli.EXIT_USAGE)
    if kill and configs[0].duration and not kill[2] and kill[1] >= configs[0].duration:
        raise cli.Fatal(f"--kill-backend {args.kill_backend}: the run lasts {configs[0].duration:g} s",
                        cli.EXIT_USAGE)
    elog = logs.configure("stress", level=args.log_level, log_dir=args.log_dir, file_name=logs.CLIENT_LOG,
                          stderr_level="critical")
    spawned = None
    rows: list[dict] = []
    killed: list[str] = []
    ended_early = None
    interrupted = shortage = False
    # SIGTERM and SIGHUP (unless nohup) end the run as Ctrl-C does: the report of what
    # was done, and a spawned cluster stopped. Left to Python, they killed the tool on
    # the spot, and its spawned servers and balancer ran on.
    previous = {sig: signal.getsignal(sig) for sig in loops.stop_signals()}
    for sig in previous:
        if sig != signal.SIGINT:
            signal.signal(sig, _interrupt)
    try:
        if args.spawn:
            # (absolute: the processes run in the repository, and the logs go where this run's go)
            spawned = SpawnedCluster(os.path.abspath(args.log_dir))
            print(f"spawned server1..3 and the balancer on 127.0.0.1:{spawned.port} "
                  f"(admin http://127.0.0.1:{spawned.admin_port}/stats)", file=sys.stderr)
            configs = [dataclasses.replace(c, host="127.0.0.1", port=spawned.port) for c in configs]
        reached = preflight(configs[0])
        configs = [dataclasses.replace(c, address=reached) for c in configs]
        for cfg in configs:
            killer = None
            if kill and spawned is not None and not killed:
                killer = Killer(spawned, *kill, cfg.requests, cfg.duration,
                                lambda name: (killed.append(name),
                                              elog.warning and elog.line("WARNING", f"event=kill backend={name}")))
            progress = Progress(None if cfg.duration else cfg.requests, args.quiet,
                                killer.progress if killer else None)
            if killer:
                killer.start()
            try:
                keep = metrics.KEEP_ALL if elog.info else metrics.KEEP_FAILURES if elog.warning else metrics.KEEP_NONE
                # A kill at a share of the requests fires from the progress ticks: 2 ms apart,
                # not 20, so that it lands within a few requests of the share, not a few hundred.
                tick = 0.002 if killer is not None and killer.fraction else engines.TICK_S
                result, entries = engines.run(cfg, progress.update, keep_log=keep, tick=tick)
            finally:
                progress.close()
                if killer:
                    killer.cancel()
            write_request_log(elog, entries, cfg, result.complete + result.failed)
            row = report.summarize(cfg, result)
            rows.append(row)
            if elog.info:
                elog.line("INFO", f"event=run concurrency={cfg.concurrency} complete={row['complete']} "
                                  f"failed={row['failed']} rps={row['requests_per_second']}")
            if result.ended_early:
                ended_early, interrupted, shortage = result.ended_early, result.interrupted, result.local_shortage
                if elog.error:
                    elog.line("ERROR", f"event=ended-early reason={logs.quote(ended_early)}")
                break  # the rest of a sweep would only fail the same way
    finally:
        if spawned is not None:
            for sig in previous:  # a second signal must not cut the stop short
                signal.signal(sig, signal.SIG_IGN)
            spawned.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print_report(rows, killed, interrupted)
    if kill and not killed and rows:
        print(f"warning: --kill-backend {args.kill_backend}: the run ended before that; no backend was killed",
              file=sys.stderr)
    unwritten = False
    for option, path, text in (("--json", args.json, report.to_json(rows)), ("--csv", args.csv, report.to_csv(rows)),
                               ("--markdown", args.markdown, report.to_markdown(rows))):
        if path:
            # (checked before the run, but a full disk, or /proc, says so only now: the
            # other files are still written, and the report above stands)
            try:
                Path(path).write_text(text)
            except OSError as exc:
                print(f"error: {option}: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
                unwritten = True
    if ended_early:
        print(f"stress: run ended early: {ended_early}", file=sys.stderr)
        return cli.EXIT_INTERRUPTED if interrupted else cli.EXIT_OSERR if shortage else cli.EXIT_UNAVAILABLE
    if unwritten:
        return cli.EXIT_OSERR
    failed = sum(r["failed"] for r in rows)
    return cli.EXIT_OK if failed == 0 else cli.EXIT_FAILED
