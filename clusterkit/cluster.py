"""Start and stop local processes: servers, balancers, HTTP back ends.

What it is for: the demo, the stress tool's ``--spawn``, the benchmarks and the
tests all start real processes on free loopback ports and must always stop
them. ``Process`` wraps one child: it waits until its port accepts
connections, and ``stop()`` sends SIGTERM, waits, then SIGKILLs *that PID*
(never a process found by name). ``ProcessGroup`` stops everything it started,
in reverse order, even when the caller fails, or is ended by Ctrl-C, SIGTERM or
SIGHUP (``exit_on_stop_signals``).

What it is not: a supervisor. Nothing is restarted unless the caller asks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .sockets import create_connection

ROOT = Path(__file__).resolve().parent.parent
"""The repository (where the top-level scripts live)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (held open together while picking)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_listening(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Return once ``host:port`` accepts a connection; raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode} before listening on {port}")
        try:
            with create_connection(host, port, 0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.02)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and the stop signals wait until the block is done, then take effect:
    one that came inside ``Popen()`` raised there with the child already running,
    and nobody kept its PID to stop it. (Main thread only: elsewhere, none come.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    # (One ignored stays ignored: the child inherits it, as under nohup it must.)
    held = [sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) != signal.SIG_IGN]
    before = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for signum in caught:
            signal.raise_signal(signum)  # (a signal ignored before stays ignored)


class Process:
    """One child process started from a command line."""

    def __init__(self, name: str, argv: Sequence[str], *, port: int | None = None,
                 host: str = "127.0.0.1", cwd: str | Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.host = host
        self.cwd = str(cwd or ROOT)
        self.env = env
        self.own_group = False
        """In a process group of its own: a terminal's Ctrl-C (sent to the foreground
        group) reaches only its parent, which stops it when it is done (ProcessGroup)."""
        self.popen: subprocess.Popen | None = None
        # stderr goes to a file, not a pipe: a chatty child must never block on a full pipe.
        self._stderr = tempfile.TemporaryFile()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, wait: float = 10.0) -> Process:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.env:
            env.update(self.env)
        with signals_held():
            self.popen = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=self._stderr,
                                          process_group=0 if self.own_group else None)
        if self.port is not None and wait:
            try:
                wait_listening(self.host, self.port, wait, self.popen)
            except Exception as exc:
                self.stop(timeout=1)
                raise RuntimeError(f"{self.name} did not start: {exc}; stderr: {self.stderr()[-2000:]!r}") from None
        return self

    def stderr(self) -> str:
        """What the process wrote on stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL (this PID only); the exit code."""
        p = self.popen
        if p is None:
            return None
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        return p.returncode

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout=timeout)


class ProcessGroup:
    """Processes started together and stopped together (a context manager);
    ``own_groups``: each in a process group of its own (``Process.own_group``)."""

    def __init__(self, own_groups: bool = False) -> None:
        self.processes: list[Process] = []
        self.own_groups = own_groups

    def start(self, proc: Process, wait: float = 10.0) -> Process:
        self.processes.append(proc)
        proc.own_group = proc.own_group or self.own_groups
        return proc.start(wait)

    def __getitem__(self, name: str) -> Process:
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)

    def stop(self) -> None:
        with signals_held():  # (a second Ctrl-C must not leave the rest running)
            for proc in reversed(self.processes):
                try:
                    proc.stop()
                except Exception:  # keep stopping the rest
                    pass

    def __enter__(self) -> ProcessGroup:
        self._before = exit_on_stop_signals()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            for sig, handler in self._before.items():
                signal.signal(sig, handler)


def exit_on_stop_signals() -> dict[int, object]:
    """SIGTERM and SIGHUP, where they would end the program on the spot (their
    default), end it as Ctrl-C does: by an exception, so that the blocks it is in
    unwind and a ProcessGroup stops what it started. Killed by ``timeout`` (or a
    closed terminal), a benchmark left nginx, HAProxy and its servers running.
    Returns the handlers replaced, to put back. (Main thread only.)"""
    if threading.current_thread() is not threading.main_thread():
        return {}
    before = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            before[sig] = signal.signal(sig, _exit_by_signal)
    return before


def _exit_by_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def python_script(script: str, *args: str) -> list[str]:
    """The command line that runs a top-level script of the repository."""
    return [sys.executable, str(ROOT / script), *args]


def echo_server(name: str, port: int, *args: str, log_dir: str | None = None,
                host: str = "127.0.0.1") -> Process:
    extra = ["--log-dir", log_dir] if log_dir else []
    return Process(name, python_script("server1.py", "--name", name, "--host", host,
                                       "--port", str(port), *extra, *args), port=port, host=host)
