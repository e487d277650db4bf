"""cluster.ProcessGroup, what the benchmarks and ``--spawn`` start servers with:
a program holding one that is ended by SIGTERM or SIGHUP still stops what it
started, as after Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest

from clusterkit import cluster

pytestmark = pytest.mark.timeout(60)

HOLDER = """
import sys, time
from clusterkit import cluster
with cluster.ProcessGroup() as group:
    server = group.start(cluster.echo_server("server1", cluster.free_port(), log_dir=sys.argv[1]))
    print(server.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_the_holder_stops_its_group(tmp_path, sig):
    """Killed by ``timeout`` (SIGTERM) or a closed terminal (SIGHUP), a benchmark
    ended on the spot and left its echo servers, nginx and HAProxy running."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=cluster.ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = None
    try:
        server = psutil.Process(int(holder.stdout.readline()))  # (started and ready)
        holder.send_signal(sig)
        assert holder.wait(timeout=30) == 128 + sig
        server.wait(timeout=30)  # (psutil: also true of a zombie, reaped or not)
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    finally:
        holder.kill()
        holder.wait()
        if server is not None and server.is_running():
            server.kill()
