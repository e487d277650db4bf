"""What every command-line program here shares: common flags, exit codes and
one-line errors.

Library code raises; this edge turns exceptions into one clear line on stderr
and an exit code (tracebacks only with ``--debug``). Exit codes follow
sysexits(3) so scripts can tell what happened:

====  =========================================================
0     success
1     the run finished but something failed (e.g. failed requests)
2     bad command line or configuration (argparse's own code)
69    the peer is unavailable (connection refused, no backend)
71    cannot listen: the port is taken or not allowed
75    timed out
130   interrupted (Ctrl-C)
====  =========================================================
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

from . import logs
from .config import MAX_SECONDS
from .sockets import host_port, unbracket

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_OSERR = 71
"""sysexits' EX_OSERR: something here ran out or is taken (a port to listen on; the stress
tool's local ports or descriptors), not the peer's fault."""
EXIT_TIMEOUT = 75
EXIT_INTERRUPTED = 130


class Fatal(Exception):
    """An error for humans: ``message`` is printed as one line, ``code`` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def listen_error(program: str, host: str, port: int, exc: OSError) -> Fatal:
    """One clear line for a failed ``bind``/``listen``, naming the port and the cause."""
    if exc.errno == errno.EADDRINUSE:
        why = "the port is already in use"
        if 32768 <= port <= 60999:
            why += (" (by another program, or, as it lies in Linux's ephemeral range 32768-60999, by"
                    " TIME_WAIT sockets of another program's outgoing connections, which hold it for a minute after a"
                    " load test)")
        else:
            why += " by another program"
    elif exc.errno == errno.EACCES:
        why = "permission denied"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "no such local address"
    else:
        why = str(exc.strerror or exc)
    return Fatal(f"{program}: cannot listen on {host_port(host, port)}: {why}", EXIT_OSERR)


def raise_fd_limit() -> None:
    """Raise the soft limit of open files to the hard limit (servers hold many sockets)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """Seconds, above 0 and at most a year (``config.MAX_SECONDS``)."""
    value = float(text)
    if not 0 < value <= MAX_SECONDS:  # (also refuses nan)
        raise argparse.ArgumentTypeError(f"must be positive, at most a year (in seconds), got {value}")
    return value


def non_negative_float(text: str) -> float:
    """Seconds, 0 or more and at most a year."""
    value = float(text)
    if not 0 <= value <= MAX_SECONDS:  # (also refuses nan)
        raise argparse.ArgumentTypeError(f"must be 0 or more, at most a year (in seconds), got {value}")
    return value


def host_name(text: str) -> str:
    """A ``--host`` value: a name or an address, IPv6 also in brackets as in URLs
    (``[::1]``, which the resolver does not know)."""
    host = unbracket(text)
    if not host:
        raise argparse.ArgumentTypeError("give a host name or address")  # ('' would mean every interface)
    if text.count(":") == 1 or (text.startswith("[") and not text.endswith("]")):  # (an IPv6 address has 2 or more)
        # ("[::1]:7000" was looked up as a name: "cannot connect to [[::1]:7000]:7000", exit 69)
        raise argparse.ArgumentTypeError(f"{text!r}: a host without a port (the port goes in --port)")
    return host


def peer_port(text: str) -> int:
    """A port to connect to: 1-65535 (0 means "any" only to a listener)."""
    value = port_number(text)
    if value == 0:
        raise argparse.ArgumentTypeError("port 0 is no port to connect to")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value}")
    return value


def add_logging_args(parser: argparse.ArgumentParser, default_level: str = "info") -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", default=default_level, choices=logs.LEVELS,
                       help=f"what goes to the log file (default: {default_level})")
    group.add_argument("--log-dir", default=logs.DEFAULT_LOG_DIR,
                       help="folder of the log files (default: %(default)s, or $CLUSTERKIT_LOG_DIR)")
    group.add_argument("--debug", action="store_true",
                       help="show full tracebacks instead of one-line errors")


def main_wrapper(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Run ``main`` and turn errors into one line on stderr and an exit code."""

    def wrapped(argv: list[str] | None = None) -> int:
        args = sys.argv[1:] if argv is None else argv
        debug = "--debug" in args
        # Started with stdout or stderr closed (2>&-): Python leaves None there, and the
        # first print raised, after the run, its report lost. They go nowhere instead
        # (and take their descriptors: a log file opened as descriptor 2 got tracebacks).
        if sys.stdout is None:
            sys.stdout = open(os.devnull, "w")
        if sys.stderr is None:
            sys.stderr = open(os.devnull, "w")
        try:
            return main(args)
        except (Fatal, logs.LogDirError) as exc:  # (a bad --log-dir: a usage error)
            if debug:
                raise
            print(f"error: {exc}", file=sys.stderr)
            return getattr(exc, "code", EXIT_USAGE)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (BrokenPipeError, ConnectionError, TimeoutError, OSError) as exc:
            if debug:
                raise
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED

    wrapped.__doc__ = main.__doc__
    return wrapped
