"""``python -m clusterkit.http up``: the whole HTTP set-up in one command.

Starts the four async backends (9002..9005), the load balancer (44444), the
async server (45000) and the threaded server (46000) as child processes,
prints where they are, and stops every one of them (by PID) on Ctrl-C or
SIGTERM. One that exits meanwhile (a backend killed to watch lb.py fail over)
is reported and the others go on; ``up`` ends when none is left.
``--offset N`` adds N to every port, to run beside another copy or away from
ports held in TIME_WAIT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .. import cli, cluster, logs, loops
from ..sockets import create_connection, host_port

BACKEND_PORTS = (9002, 9003, 9004, 9005)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clusterkit.http", description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("command", choices=["up"], help="up: start everything, Ctrl-C stops it")
    p.add_argument("--offset", type=int, default=0, help="add this to every default port")
    p.add_argument("--host", default="127.0.0.1", type=cli.host_name,
                   help="address every server listens on, and lb.py's backends are at (default: %(default)s)")
    p.add_argument("--log-dir", default=logs.DEFAULT_LOG_DIR,
                   help="folder of the log files (default: %(default)s, or $CLUSTERKIT_LOG_DIR)")
    args = p.parse_args(argv)
    o = args.offset
    ports = [*(port + o for port in BACKEND_PORTS), 44444 + o, 45000 + o, 46000 + o]
    if not all(0 < port < 65536 for port in ports):  # (each server said so in a usage error of its own)
        p.error(f"--offset {o}: the ports would be {min(ports)} to {max(ports)}, not all within 1-65535")
    log = ["--log-dir", args.log_dir]
    host = args.host
    on = ["--host", host]
    try:  # (a usage error here, as from every server, not the first server's exit 71 later)
        logs.configure("up", level="error", log_dir=args.log_dir)
    except logs.LogDirError as exc:
        p.error(str(exc))
    stop = threading.Event()
    # Both set explicitly: a shell starts background jobs with SIGINT ignored.
    for sig in loops.stop_signals():
        signal.signal(sig, lambda *_: stop.set())
    taken = _in_use(host, ports)
    if taken:
        # (Started anyway, each would find its port open, another program's, and be taken for ready.)
        print(f"error: port {taken} is in use by another program (the HTTP set-up running already?); "
              f"stop it, or move every port with --offset N", file=sys.stderr)
        return cli.EXIT_OSERR
    with cluster.ProcessGroup() as group:
        starting = None
        try:
            backends = []
            for i, port in enumerate(BACKEND_PORTS, 1):
                starting = cluster.Process(f"backend{i}", cluster.python_script(
                    "http_servers/async_server.py", str(port + o), "--name", f"backend{i}", *on, *log),
                    port=port + o, host=host)
                group.start(starting)
                backends += ["--backend", f"backend{i}={host_port(host, port + o)}"]
            for name, script, port in (("lb", "lb.py", 44444), ("async", "Server_async_http.py", 45000),
                                       ("threaded", "Server_thread_http.py", 46000)):
                extra = backends if name == "lb" else []
                starting = cluster.Process(name, cluster.python_script(
                    f"http_servers/{script}", "--port", str(port + o), *on, *extra, *log), port=port + o, host=host)
                group.start(starting)
        except RuntimeError as exc:
            # The server's own words (a port taken, and why), not our wrapper's.
            said = starting.stderr().strip().splitlines() if starting is not None else []
            print(said[-1] if said else f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return cli.EXIT_OSERR
        # Log rotation (README: kill -USR1 each server) reaches the servers through
        # this one too; its default action killed it and left the seven running.
        signal.signal(signal.SIGUSR1, lambda *_: _forward(group, signal.SIGUSR1))
        at = "localhost" if host in ("127.0.0.1", "localhost") else f"[{host}]" if ":" in host else host
        print(f"""HTTP set-up running:
  http://{at}:{44444 + o}/page.html   lb.py over backend1..4 (ports {', '.join(str(x + o) for x in BACKEND_PORTS)})
  http://{at}:{45000 + o}/page.html   Server_async_http.py
  http://{at}:{46000 + o}/page.html   Server_thread_http.py
logs in {args.log_dir}/server_log.log; Ctrl-C stops everything""", flush=True)
        gone: set[str] = set()
        while not stop.wait(0.5):
            for proc in group.processes:
                if proc.name not in gone and not proc.alive():
                    gone.add(proc.name)
                    _report_exit(proc)
            if len(gone) == len(group.processes):
                print("error: every server has exited", file=sys.stderr)
                return 1
    print("stopped", flush=True)
    return 0


def _forward(group: cluster.ProcessGroup, sig: int) -> None:
    for proc in group.processes:
        if proc.alive():
            proc.popen.send_signal(sig)  # type: ignore[union-attr]


def _in_use(host: str, ports: list[int]) -> int | None:
    """The first of ``ports`` something already listens on at ``host``, if any."""
    for port in ports:
        try:
            create_connection(host, port, 1).close()
        except OSError:
            continue
        return port
    return None


def _report_exit(proc: cluster.Process) -> None:
    then = ": lb.py takes it out and sends its requests to the others" if proc.name.startswith("backend") else ""
    print(f"warning: {proc.name} exited (status {proc.popen.returncode}); the others go on{then}",  # type: ignore
          file=sys.stderr, flush=True)
