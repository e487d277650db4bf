"""``make bench``: the whole performance study in one command, written to
``reports/<date>/`` as report.md, results.json and PNG charts.

What it runs, all on free loopback ports and stopped by PID afterwards:

* HTTP grid: the async server, the threaded server, lb.py over four async
  backends, and the anchors nginx (one worker, access log off), HAProxy
  (mode http, nbthread 1, roundrobin over the same backends) and Python's
  http.server; 1000 requests at concurrency 1, 3, 5, 8, 10, measured with
  ApacheBench and again with the project's stress tool (``--http``).
* TCP grid: one echo server direct, Load_Balancer.py in both modes and
  HAProxy (mode tcp) over server1..3, per-request and keep-alive
  connections, from the stress tool.
* Failover: 1000 requests through each balancer, one backend killed (SIGKILL)
  about a third of the way in; failed requests per balancer.
* Speed targets: bench_tcp, bench_balancer, bench_http and bench_stress, whose
  verdicts (met or not) go into the report (skipped with QUICK=1).

The pieces live in ``bench/report/`` (runners, grid, targets, failover,
charts, render); this file only sequences them. Each grid cell is the median
of ``--reps`` repetitions (default 5) with the spread shown; the repetitions
are interleaved (each round runs every target at every level once). Nothing
is pinned to a core: the load generator and the servers share the machine's
cores, as they would on a laptop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import grid, targets  # noqa: E402
from bench.report.failover import failover  # noqa: E402
from bench.report.render import render  # noqa: E402
from bench.report.runners import run_ab, run_stress  # noqa: E402
from clusterkit import cluster  # noqa: E402

SPEED_TIMEOUT_S = 900


def speed_targets(tmp: str) -> dict:
    """Run the per-issue benchmarks and keep their verdicts."""
    out = {}
    for name, script, extra in (("tcp server (issue 2)", "bench/bench_tcp.py", ["--rounds", "3", "--seconds", "3"]),
                                ("balancer (issue 3)", "bench/bench_balancer.py", []),
                                ("http (issue 4)", "bench/bench_http.py", ["--rounds", "2"]),
                                ("stress tool (issue 5)", "bench/bench_stress.py", [])):
        path = Path(tmp) / (Path(script).stem + ".json")
        print(f"  {name}: {script}", flush=True)
        proc = subprocess.run([sys.executable, str(cluster.ROOT / script), *extra, "--json", str(path)],
                              capture_output=True, text=True, timeout=SPEED_TIMEOUT_S)
        out[name] = {"stdout": proc.stdout, "data": json.loads(path.read_text()) if path.exists() else None}
    return out


def versions() -> dict:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not installed"
    return {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "nginx": first_line([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
            "haproxy": first_line([shutil.which("haproxy") or "/usr/sbin/haproxy", "-v"]),
            "ab": first_line(["ab", "-V"]), "wrk": first_line(["wrk", "--version"])}


def http_grid(workdir: str, levels, reps: int, n: int, quick: bool) -> dict:
    out = {}
    has_ab = shutil.which("ab") is not None
    measures = {}
    with cluster.ProcessGroup() as group:
        for name, url in targets.http_targets(group, workdir, with_http_server=not quick).items():
            out[name] = {"available": url is not None, "ab": {}, "stress": {}}
            if url is None:
                continue
            if has_ab:
                measures[(name, "ab")] = lambda c, url=url: run_ab(url, n, c, workdir)
            measures[(name, "stress")] = lambda c, url=url: run_stress(workdir, "--http", url, "-n", str(n),
                                                                       "-c", str(c), *STRESS_ENGINE)
        print(f"  {', '.join(name for name in out if out[name]['available'])}", flush=True)
        for (name, tool), cells in grid.sweep(levels, reps, measures).items():
            out[name][tool] = cells
    return out


STRESS_ENGINE = ("--engine", "epoll")
"""The stress tool's engine in the grids: the one built like ab, so it dilutes the rates least."""


def tcp_grid(workdir: str, levels, reps: int, n: int) -> dict:
    out = {}
    measures = {}
    with cluster.ProcessGroup() as group:
        for name, port in targets.tcp_targets(group, workdir).items():
            out[name] = {"available": port is not None, "per-request": {}, "keepalive": {}}
            if port is None:
                continue
            for conn in ("per-request", "keepalive"):
                measures[(name, conn)] = lambda c, port=port, conn=conn: run_stress(
                    workdir, "--port", str(port), "-n", str(n), "-c", str(c), "--connection", conn, *STRESS_ENGINE)
        print(f"  {', '.join(name for name in out if out[name]['available'])}", flush=True)
        for (name, conn), cells in grid.sweep(levels, reps, measures).items():
            out[name][conn] = cells
    return out


def commit() -> str | None:
    """The code measured: its git commit, marked ``-dirty`` when the tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cluster.ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cluster.ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def main() -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 repetition, 2 levels, no speed targets")
    p.add_argument("--reps", type=int, default=5, help="repetitions per cell, interleaved (default: 5)")
    p.add_argument("--requests", "-n", type=int, default=1000, help="requests per cell (default: 1000)")
    p.add_argument("--out", help="report folder (default: reports/<date>)")
    args = p.parse_args()
    quick = args.quick
    reps = 1 if quick else args.reps
    n = 300 if quick else args.requests
    levels = grid.QUICK_LEVELS if quick else grid.LEVELS
    out = Path(args.out or cluster.ROOT / "reports" / datetime.date.today().isoformat())
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "commit": commit(), "argv": sys.argv[1:],
                     "machine": versions(), "quick": quick, "reps": reps, "requests": n, "levels": list(levels)}
    with tempfile.TemporaryDirectory() as tmp:
        print("HTTP grid ...", flush=True)
        results["http"] = http_grid(tmp, levels, reps, n, quick)
        print("TCP grid ...", flush=True)
        results["tcp"] = tcp_grid(tmp, levels, reps, n)
        print("failover ...", flush=True)
        results["failover"] = failover(tmp, *((400, 400) if quick else (1000, 500)))
        results["speed"] = {}
        if not quick:
            print("speed targets ...", flush=True)
            results["speed"] = speed_targets(tmp)
    results["duration_s"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    render(results, out)
    print(f"report written to {out}/report.md in {results['duration_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
