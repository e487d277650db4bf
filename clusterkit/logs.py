"""Logging set-up shared by every program: one file, whole lines, no stalls.

What it is for: ``configure()`` points the standard ``logging`` module at a
log file in ``--log-dir`` (``logs/server_log.log`` for servers and balancers,
``logs/client_log.log`` for clients and the stress tool) in the line format of
SPEC.md::

    2026-11-24T08:56:24.123Z INFO server1 event=open conn=3 peer=127.0.0.1:41234

and gives hot loops a cheaper path (``EventLog``) that skips ``LogRecord``.

How it keeps the network path free and the file whole: callers only format a
line and append it to a queue (a ``deque``); a writer thread takes everything
queued every few milliseconds and writes it with a single ``os.write`` on a
file opened with ``O_APPEND``. On Linux one ``write`` to a regular file is not
interleaved with another process's ``write``, so several servers can share one
file and no line is ever torn or mixed. The queue is bounded: past
``max_pending`` lines new lines are dropped and counted, and the count is
logged, so a stuck disk can never grow memory or block the event loop.

What it is not: a structured-logging library. Values are plain ``key=value``
tokens; callers keep spaces out of values (``quote()`` helps).
"""

from __future__ import annotations

import atexit
import collections
import errno
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

SERVER_LOG = "server_log.log"
CLIENT_LOG = "client_log.log"
DEFAULT_LOG_DIR = os.environ.get("CLUSTERKIT_LOG_DIR", "logs")
LEVELS = ("debug", "info", "warning", "error", "critical")

_ts_cache_second = -1
_ts_cache_prefix = ""


def timestamp(now: float | None = None) -> str:
    """ISO-8601 UTC timestamp with milliseconds, e.g. ``2026-11-24T08:56:24.123Z``."""
    global _ts_cache_second, _ts_cache_prefix
    if now is None:
        now = time.time()
    second = int(now)
    if second != _ts_cache_second:
        _ts_cache_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _ts_cache_second = second
    return "%s.%03dZ" % (_ts_cache_prefix, int((now - second) * 1000))


_UNSAFE = re.compile('[\\x00-\\x20"=\\x7f-\\x9f]')
"""What a bare value may not hold: a space, a quote, '=' or a control character."""
_ESCAPED = re.compile('[\\\\"\\x00-\\x1f\\x7f-\\x9f]')
_CONTROL = re.compile('[\\x00-\\x1f\\x7f-\\x9f]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    c = match.group()
    return _ESCAPES.get(c) or f"\\x{ord(c):02x}"


def quote(value: object) -> str:
    """A value safe to put after ``key=``: as it is when it holds no space, quote,
    '=' or control character; else in quotes, with backslash escapes (also for a
    control character, as \\x1b: what a peer sends, an X-Backend header or a server's
    name, can neither forge a field nor reach a terminal that reads the log)."""
    text = str(value)
    if text and not _UNSAFE.search(text):
        return text
    return '"' + _ESCAPED.sub(_escape, text) + '"'


def printable(text: str) -> str:
    """``text`` for a terminal: its control characters escaped as ``quote`` does
    them (\\x1b), nothing else changed, no quotes."""
    return _CONTROL.sub(_escape, text)


class LogDirError(Exception):
    """The log folder cannot be made or written to (a bad ``--log-dir``)."""


ROOM_MARGIN = 256 * 1024
"""Free bytes a log write leaves on its file system (``LineWriter._room``)."""


class LineWriter:
    """Appends whole lines to a file from a background thread (see module doc)."""

    def __init__(self, path: str | os.PathLike, *, max_pending: int = 200_000,
                 flush_interval: float = 0.05, program: str = "log") -> None:
        self.path = Path(path)
        self.program = program  # who writes: the overflow line names it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._queue: collections.deque[str] = collections.deque()
        self._max_pending = max_pending
        self._flush_interval = flush_interval
        self._wake = threading.Event()
        self._closed = False
        self.dropped = 0
        self.lost = 0  # lines a failed write took (the flushing thread's count)
        self._torn = False  # a write stopped mid-line (disk full): the next begins with a newline
        self._root = hasattr(os, "geteuid") and os.geteuid() == 0
        self._failing = False  # said on stderr that lines are being lost (once, until a write goes through)
        self.reopen_asked = False  # SIGUSR1: the writer thread opens the file again (``_reopen``)
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        """Queue one line (without its newline). Never blocks."""
        if len(self._queue) >= self._max_pending:
            self.dropped += 1
            return
        self._queue.append(line)

    def flush(self) -> None:
        """Write everything queued so far (from any thread)."""
        queue = self._queue
        n = len(queue)
        dropped = self.dropped + self.lost
        if dropped:
            self.dropped = self.lost = 0
            queue.append(f"{timestamp()} WARNING {self.program} event=log-dropped lines={dropped}")
            n += 1
        if not n:
            return
        popleft = queue.popleft
        lines = [popleft() for _ in range(n)]
        torn = self._torn
        data = ("\n" if torn else "") + "\n".join(lines) + "\n"
        # One write per flush keeps lines whole next to other processes' writes.
        view = memoryview(data.encode("utf-8", "backslashreplace"))
        whole = len(view)
        if not self._room(whole):  # (counted as a write that failed at once)
            self._lost(bytes(view).count(b"\n") - torn, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), dropped)
            return
        while view:
            try:
                written = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError as exc:  # disk full or gone: drop rather than stall the program
                # (the newline that ends a torn line is no line of its own)
                self._lost(bytes(view).count(b"\n") - (torn and len(view) == whole), exc, dropped)
                return
            self._torn = view[written - 1] != 10 if written else self._torn  # (10: a newline)
            view = view[written:]
        self._failing = False

    def _room(self, size: int) -> bool:
        """Whether the file system has room for ``size`` bytes more, and ROOM_MARGIN
        beside them. A write that does not fit is cut short by the kernel inside a
        line, and in a file other processes append to, theirs then ran into it (a
        full disk mixed two servers' lines in one). A batch without room is dropped
        whole, and counted; the margin leaves room for other writers' batches."""
        try:
            st = os.fstatvfs(self._fd)
        except OSError:
            return True  # (no answer: the write finds out)
        free = st.f_bfree if self._root else st.f_bavail  # (root may use the reserved blocks)
        return free * st.f_frsize >= size + ROOM_MARGIN

    def _lost(self, lines: int, exc: OSError, carried: int) -> None:
        """The ``lines`` a failed write left unwritten are counted (an
        ``event=log-dropped`` line says how many once lines go through again) and
        said once on stderr; a line it cut short is ended by the next write, so none
        runs into another. ``carried``: the count of the log-dropped line that ended
        the write (it is the last line, so never written whole when the write
        failed). (``lost`` is the flushing thread's own: ``dropped`` is ``write``'s.)"""
        self.lost += lines - (1 if carried else 0) + carried
        if not self._failing:
            self._failing = True
            try:
                print(f"{self.program}: cannot write the log {self.path}: {exc.strerror or exc}; its lines are "
                      f"dropped until it can be written (then counted in an event=log-dropped line)",
                      file=sys.stderr, flush=True)
            except (OSError, ValueError, AttributeError):  # (no stderr either)
                pass

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            self.flush()
            if self.reopen_asked:
                self.reopen_asked = False
                self._reopen()

    def _reopen(self) -> None:
        """Open the file by its name again, as nginx does on SIGUSR1: after logrotate
        moved it (or someone deleted it, or its folder), lines go to the new file,
        not on into the old one. What was queued went to the old one first."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:  # the old file goes on
            self._lost(0, exc, 0)
            return
        old, self._fd = self._fd, fd
        self._torn = False
        try:
            os.close(old)
        except OSError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=2)
        self.flush()
        try:
            os.close(self._fd)
        except OSError:
            pass


class Tally:
    """Something that may happen thousands of times a second (a client turned away, a
    failed accept): counted, and said by ``say(count)`` once a second at most, with
    the count since it was last said. ``flush`` says the rest (from a sweep, and
    ``now`` at the stop); given ``later`` (a loop's ``call_later``), it says the rest
    by itself a second on."""

    __slots__ = ("say", "later", "said", "unsaid", "latest")

    def __init__(self, say: Callable[[int], None], later: Callable[..., object] | None = None) -> None:
        self.say = say
        self.later = later
        self.said = 0.0
        self.unsaid = 0
        self.latest = ""  # what the latest counted said of itself (``EventLog.tally_latest``)

    def count(self, n: int = 1, latest: str | None = None) -> None:
        if latest is not None:
            self.latest = latest
        self.unsaid += n
        if not self.flush() and self.later is not None and self.unsaid == n:
            self._say_later()  # (the first held back since the last said)

    def _say_later(self) -> None:
        self.later(max(0.001, self.said + 1.0 - time.monotonic()), self._flush_later)  # type: ignore[misc]

    def _flush_later(self) -> None:
        # A loop's timer may fire a moment before the second is up (uvloop's clock is
        # a turn's, in whole ms): then again for the rest, lest the count stay unsaid.
        if self.unsaid and not self.flush():
            self._say_later()

    def flush(self, now: bool = False) -> bool:
        """Say what was counted since the last time, if a second has passed (or ``now``)."""
        clock = time.monotonic()
        if not self.unsaid or not (now or clock - self.said >= 1.0):
            return False
        self.say(self.unsaid)
        self.said, self.unsaid = clock, 0
        return True


class _Formatter(logging.Formatter):
    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program

    def format(self, record: logging.LogRecord) -> str:
        line = f"{timestamp(record.created)} {record.levelname} {self.program} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + quote(self.formatException(record.exc_info).replace("\n", " | "))
        return line.replace("\n", "\\n")


class _QueueLineHandler(logging.Handler):
    def __init__(self, writer: LineWriter, formatter: logging.Formatter) -> None:
        super().__init__()
        self.writer = writer
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write(self.format(record))
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class EventLog:
    """The hot-path logger of one program: ``if elog.info: elog.line(...)``.

    ``info``/``debug`` are plain attributes (no call) saying whether that level
    is on; ``line()`` writes a preformatted ``key=value`` text at that level.
    """

    def __init__(self, program: str, writer: LineWriter | None, level: int) -> None:
        self.program = program
        self.writer = writer
        self.debug = writer is not None and level <= logging.DEBUG
        self.info = writer is not None and level <= logging.INFO
        self.warning = writer is not None and level <= logging.WARNING
        self.error = writer is not None and level <= logging.ERROR
        self._prefix = {name: f" {name} {program} " for name in ("DEBUG", "INFO", "WARNING", "ERROR")}

    def line(self, level: str, text: str) -> None:
        if self.writer is not None:
            self.writer.write(timestamp() + self._prefix[level] + text)

    def tally(self, text: Callable[[int], str], later: Callable[..., object] | None = None) -> Tally:
        """A ``Tally`` said as a warning line, ``text(count)``."""
        def say(count: int) -> None:
            if self.warning:
                self.line("WARNING", text(count))
        return Tally(say, later)

    def tally_latest(self, text: Callable[[str, int], str]) -> Tally:
        """A ``Tally`` whose line also says the latest one counted: ``text(latest, count)``,
        ``latest`` given to ``count``."""
        tally = self.tally(lambda count: text(tally.latest, count))
        return tally


_active: dict[str, object] = {}


def parse_level(name: str | int) -> int:
    if isinstance(name, int):
        return name
    value = logging.getLevelName(name.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {name!r}; use one of {', '.join(LEVELS)}")
    return value


def configure(program: str, *, level: str | int = "info", log_dir: str | os.PathLike | None = None,
              file_name: str = SERVER_LOG, stderr_level: str | int = "warning") -> EventLog:
    """Send this process's logging to ``<log_dir>/<file_name>``; return its EventLog.

    ``program`` names every line (``server1``, ``balancer``, ``client``...).
    Warnings and errors also go to stderr, one line each, for the person
    watching the terminal. Calling it again replaces the previous set-up.
    """
    shutdown()
    numeric = parse_level(level)
    log_dir = Path(log_dir if log_dir is not None else DEFAULT_LOG_DIR)
    try:
        writer = LineWriter(log_dir / file_name, program=program)
    except OSError as exc:
        # mkdir of a path that is a file says "File exists": say what is wrong with it.
        why = "it is not a directory" if log_dir.exists() and not log_dir.is_dir() else exc.strerror or exc
        raise LogDirError(f"--log-dir {log_dir}: cannot write {file_name} there: {why}") from None
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = _QueueLineHandler(writer, _Formatter(program))
    file_handler.setLevel(numeric)
    root.addHandler(file_handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(max(parse_level(stderr_level), numeric))
    console.setFormatter(logging.Formatter(f"{program}: %(levelname)s %(message)s"))
    root.addHandler(console)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    elog = EventLog(program, writer, numeric)
    _active.update(writer=writer, elog=elog)
    try:  # kill -USR1: open the log file again (logrotate's postrotate, as for nginx)
        signal.signal(signal.SIGUSR1, _reopen_asked)
    except (ValueError, AttributeError):  # (not the main thread; no SIGUSR1 here)
        pass
    return elog


def _reopen_asked(signum: int, frame) -> None:
    """SIGUSR1's handler: the writer thread reopens (a flag only: nothing here may block)."""
    writer = _active.get("writer")
    if isinstance(writer, LineWriter):
        writer.reopen_asked = True


def shutdown() -> None:
    """Flush and close the log file (also runs at exit)."""
    writer = _active.pop("writer", None)
    _active.pop("elog", None)
    if isinstance(writer, LineWriter):
        writer.close()


atexit.register(shutdown)
