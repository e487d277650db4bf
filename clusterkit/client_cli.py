"""``client.py`` on the command line: send messages, print replies and timings.

Rich output lives here only; ``--json`` prints the same results as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

from . import cli, logs
from .client import Client, ClientError, ClientResult
from .sockets import host_port

EXIT_FOR_CODE = {"connection-refused": cli.EXIT_UNAVAILABLE, "connect-failed": cli.EXIT_UNAVAILABLE,
                 "no-backend": cli.EXIT_UNAVAILABLE, "timeout": cli.EXIT_TIMEOUT}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Send messages to the cluster (the balancer on port 7000 by default) and "
                    "measure connect time, latency (send to first reply byte) and rtt (send to "
                    "confirmation).")
    p.add_argument("message", nargs="?", default="hello", help="the message to send (default: %(default)s)")
    p.add_argument("--count", "-n", type=cli.positive_int, default=1,
                   help="how many times to send it (default: %(default)s)")
    p.add_argument("--keepalive", "-k", action="store_true",
                   help="send all messages on one connection (default: a new connection per message)")
    p.add_argument("--host", default="127.0.0.1", type=cli.host_name,
                   help="server or balancer address (default: %(default)s)")
    p.add_argument("--port", type=cli.peer_port, default=7000, help="port (default: %(default)s)")
    p.add_argument("--timeout", type=cli.positive_float, default=5.0,
                   help="seconds to wait for connect and for each reply (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    cli.add_logging_args(p)
    return p


def _row(i: int, r: ClientResult) -> dict:
    return {"n": i, "server": r.server, "reply": r.reply, "confirmation": r.confirmation,
            "connect_ms": r.connect_ms, "latency_ms": r.latency_ms, "rtt_ms": r.rtt_ms,
            "one_way_estimate_ms": r.one_way_estimate_ms}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # What the server sent is shown with its control characters escaped (\x1b):
    # an escape sequence in a server's name cleared the terminal. (Text: no markup.)
    console = Console()
    for row in rows[:20]:
        console.print(logs.printable(row["reply"]), markup=False, highlight=False)
        console.print(logs.printable(row["confirmation"]), markup=False, highlight=False)
    if len(rows) > 20:
        console.print(f"... {len(rows) - 20} more reply pairs")
    table = Table(title="timings (ms, monotonic clock)")
    for col in ("#", "server", "connect", "latency", "rtt", "rtt/2 (one-way estimate)"):
        table.add_column(col, justify="right")
    shown = rows if len(rows) <= 20 else rows[:10] + rows[-10:]
    for row in shown:
        table.add_row(str(row["n"]), Text(logs.printable(row["server"])), _ms(row["connect_ms"]),
                      _ms(row["latency_ms"]), _ms(row["rtt_ms"]), _ms(row["one_way_estimate_ms"]))
    if len(rows) > 1:
        for label, fn in (("median", statistics.median), ("min", min), ("max", max)):
            connects = [r["connect_ms"] for r in rows if r["connect_ms"] is not None]
            table.add_row(label, "", _ms(fn(connects)) if connects else "-",
                          _ms(fn([r["latency_ms"] for r in rows])), _ms(fn([r["rtt_ms"] for r in rows])),
                          _ms(fn([r["one_way_estimate_ms"] for r in rows])))
    console.print(table)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "\n" in args.message:
        raise cli.Fatal("a message is one line: it may not contain a newline", cli.EXIT_USAGE)
    elog = logs.configure("client", level=args.log_level, log_dir=args.log_dir, file_name=logs.CLIENT_LOG,
                          stderr_level="critical")
    rows: list[dict] = []
    client = Client(args.host, args.port, args.timeout)
    try:
        for i in range(1, args.count + 1):
            try:
                opened = None
                if client.sock is None:  # connected here, so that its line comes before the send's
                    opened = client.connect()
                    if elog.info:
                        elog.line("INFO", f"event=connect n={i} connect_ms={opened:.3f}")
                if elog.info:
                    elog.line("INFO", f"event=send n={i} target={host_port(args.host, args.port)} "
                                      f"bytes={len(args.message.encode('utf-8', 'surrogateescape'))} "
                                      f"keepalive={int(args.keepalive)}")
                result = client.send_message(args.message)
                if opened is not None:
                    result = dataclasses.replace(result, connect_ms=opened)
            except ClientError as exc:
                if elog.error:
                    elog.line("ERROR", f"event=error n={i} code={exc.code} detail={logs.quote(exc)}")
                if args.json:  # what was answered, and the message that failed
                    json.dump(rows + [{"n": i, "error": exc.code, "detail": str(exc)}], sys.stdout, indent=2)
                    print()
                elif rows:
                    _print_table(rows)
                raise cli.Fatal(str(exc), EXIT_FOR_CODE.get(exc.code, cli.EXIT_FAILED)) from None
            finally:
                if not args.keepalive:
                    client.close()
            if elog.info:
                elog.line("INFO", f"event=reply n={i} server={logs.quote(result.server)} length={result.length} "
                                  f"latency_ms={result.latency_ms:.3f} rtt_ms={result.rtt_ms:.3f}")
            rows.append(_row(i, result))
    finally:
        client.close()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        _print_table(rows)
    return cli.EXIT_OK
