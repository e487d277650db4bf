"""``python -m clusterkit.http up``: the whole HTTP set-up started with one
command and stopped with one signal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from clusterkit import cluster

from .http_setup import exchange, status_of

pytestmark = pytest.mark.timeout(120)


def _free_offset() -> int:
    """An offset that makes every default HTTP port free (so the test never uses the defaults).

    Where it can, it lifts 44444..46000 above Linux's ephemeral range: up starts seven
    servers one after the other, and in between a connection of a test running beside
    this one could take a port in that range as its local port (lb.py once could not
    listen on 44582: "the port is already in use")."""
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    above = range(high + 1 - 44444, 65535 - 46000 + 1)  # every port above the range (and 9002.. below it)
    beside = os.getpid() % 37  # two workers looking at once start at different places
    candidates = [*above[beside::37], *range(101 + beside, 1500, 37)]
    for offset in candidates:
        ports = [p + offset for p in (9002, 9003, 9004, 9005, 44444, 45000, 46000)]
        try:
            socks = []
            for p in ports:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return offset
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.skip("no free set of ports found")


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_up_starts_everything_and_one_signal_stops_it_all(procs, log_dir):
    """$CLUSTERKIT_LOG_DIR moves its logs as every program's (it wrote to logs/). A
    backend killed (to watch lb.py fail over) no longer stops everything."""
    offset = _free_offset()
    up = procs.start(cluster.Process("up", [sys.executable, "-m", "clusterkit.http", "up", "--offset", str(offset)],
                                     port=44444 + offset, env={"CLUSTERKIT_LOG_DIR": str(log_dir)}), wait=30)
    for port in (9002, 9005, 45000, 46000):
        cluster.wait_listening("127.0.0.1", port + offset, 30)
    children = psutil.Process(up.pid).children()
    assert len(children) == 7
    assert status_of(exchange(44444 + offset, b"GET /page.html HTTP/1.0\r\n\r\n")) == 200
    deadline = time.monotonic() + 10
    while " lb event=request " not in _read(log_dir / "server_log.log"):
        assert time.monotonic() < deadline, "the lb's request line never reached $CLUSTERKIT_LOG_DIR"
        time.sleep(0.05)
    backend2 = next(c for c in children if "backend2" in c.cmdline())
    backend2.kill()
    backend2.wait(10)
    for _ in range(8):  # each of them, backend2's turn included, answered by another backend
        assert status_of(exchange(44444 + offset, b"GET /page.html HTTP/1.0\r\n\r\n")) == 200
    deadline = time.monotonic() + 10  # up's watch (twice a second) sees backend2 gone
    while "warning: backend2 exited" not in up.stderr():
        assert up.alive() and time.monotonic() < deadline, up.stderr()
        time.sleep(0.05)
    time.sleep(0.5)  # and goes on watching: it did not stop everything
    assert up.alive(), up.stderr()
    # Log rotation through up: SIGUSR1 killed it (its default action) and left the
    # servers running; now it passes the signal on, and they reopen the file.
    (log_dir / "server_log.log").rename(log_dir / "server_log.log.1")
    up.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while " lb event=request " not in _read(log_dir / "server_log.log"):
        assert up.alive() and time.monotonic() < deadline, up.stderr()
        exchange(44444 + offset, b"GET /page.html HTTP/1.0\r\n\r\n")
        time.sleep(0.2)
    up.signal(signal.SIGINT)
    assert up.wait(timeout=30) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_up_takes_a_host_for_every_server(procs, log_dir):
    """As every program takes --host (SPEC.md); up had --offset alone."""
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this machine")
    offset = _free_offset()
    up = procs.start(cluster.Process("up", [sys.executable, "-m", "clusterkit.http", "up", "--offset", str(offset),
                                            "--host", "::1", "--log-dir", str(log_dir)],
                                     port=44444 + offset, host="::1"), wait=30)
    for port in (9002, 9005, 45000, 46000):
        cluster.wait_listening("::1", port + offset, 30)
    for port in (44444, 45000, 46000):
        assert status_of(exchange(port + offset, b"GET /page.html HTTP/1.0\r\n\r\n", host="::1")) == 200
    up.signal(signal.SIGINT)
    assert up.wait(timeout=30) == 0


@pytest.mark.parametrize("held", ["listening", "bound"])
def test_up_with_a_port_taken_by_another_program_says_so_and_starts_nothing(procs, log_dir, held):
    """``listening``: each server found its port open (the other program's) and was
    taken for ready: up said it was running, then that everything had exited (exit
    1). ``bound``: a port not listened on but still bound (a connection's local
    port, as TIME_WAIT holds them after a load test): up passed on the server's
    reason as a quoted string, with '\\n' in it, after a line of its own wrapper."""
    offset = _free_offset()
    if held == "listening":
        holder = socket.create_server(("127.0.0.1", 45000 + offset))
    else:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 46000 + offset))  # bound, not listening: the servers before it start
    try:
        # (procs stops it with SIGTERM, which up passes on to what it started, should it start anything)
        up = procs.start(cluster.Process("up", [sys.executable, "-m", "clusterkit.http", "up", "--offset",
                                                str(offset)], env={"CLUSTERKIT_LOG_DIR": str(log_dir)}))
        assert up.wait(timeout=60) == 71, up.stderr()
    finally:
        holder.close()
    said = up.stderr().strip().splitlines()
    if held == "listening":
        assert f"port {45000 + offset} is in use" in up.stderr()
    else:
        assert said[-1].startswith(f"error: http-threaded: cannot listen on 127.0.0.1:{46000 + offset}: "), said
        assert "stderr:" not in up.stderr() and "\\n" not in up.stderr()


@pytest.mark.parametrize("offset", ["-20000", "30000"])
def test_up_with_an_offset_that_leaves_the_port_range_is_a_usage_error(offset, log_dir):
    """The first server said 'not a port number: -10998' in its own usage error, and
    up called it a server that did not start (exit 71)."""
    proc = subprocess.run([sys.executable, "-m", "clusterkit.http", "up", "--offset", offset, "--log-dir",
                           str(log_dir)], cwd=cluster.ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert f"--offset {offset}: the ports would be" in proc.stderr and "not all within 1-65535" in proc.stderr


def test_up_with_a_log_dir_that_is_a_file_is_a_usage_error(tmp_path):
    """The first server refused it in a usage error of its own, and up said exit 71,
    as for a taken port."""
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = subprocess.run([sys.executable, "-m", "clusterkit.http", "up", "--offset", str(_free_offset()),
                           "--log-dir", str(afile)], cwd=cluster.ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert f"--log-dir {afile}: cannot write server_log.log there: it is not a directory" in proc.stderr
