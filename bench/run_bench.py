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
repetition of ``--reps`` (default 5) with the spread shown; the repetitions
are interleaved (each round runs every target at every level once). The load
generators and the servers share the machine's cores, as they would on a
laptop; only the threaded HTTP server keeps its threads on one core, its
default.

A target that fails to start, or a measurement that fails, costs its own row
or cell, which the report shows with the reason; results.json is written after
each part, so an interrupted run keeps what it had measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
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
from bench.common import describe  # noqa: E402
from bench.report.runners import STRESS_ENGINE, run_ab, run_stress  # noqa: E402
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
        out[name] = {"stdout": proc.stdout, "data": no_nan(json.loads(path.read_text())) if path.exists() else None}
    return out


def no_nan(value):
    """``value`` with each NaN (a median of nothing, in a benchmark's JSON) as None: results.json is JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value


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
    why: dict[str, str] = {}
    with cluster.ProcessGroup() as group:
        for name, url in targets.http_targets(group, workdir, why, with_http_server=not quick).items():
            out[name] = {"available": url is not None, "why": why.get(name), "ab": {}, "stress": {}}
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


def tcp_grid(workdir: str, levels, reps: int, n: int) -> dict:
    out = {}
    measures = {}
    why: dict[str, str] = {}
    with cluster.ProcessGroup() as group:
        for name, port in targets.tcp_targets(group, workdir, why).items():
            out[name] = {"available": port is not None, "why": why.get(name), "per-request": {}, "keepalive": {}}
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


def report_folder(given: str | None, force: bool) -> Path:
    """``--out``, refused when it holds files already (a stale chart would pass for
    this run's) unless ``--force``; by default ``reports/<date>``, or the first of
    ``reports/<date>-2``, ``-3``... that is new."""
    if given:
        out = Path(given)
        if out.exists() and not out.is_dir():
            raise SystemExit(f"run_bench.py: --out {given}: a file, not a folder")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise SystemExit(f"run_bench.py: --out {given} is not empty: name a new folder, or add --force to "
                             f"write over it")
        return out
    base = cluster.ROOT / "reports" / datetime.date.today().isoformat()
    out, k = base, 1
    while out.exists() and any(out.iterdir()):
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def reproduce(argv: list[str]) -> str:
    """The command that runs this benchmark again: as given, but for where it wrote
    (``--out``, ``--force``: a new folder is the default)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not (arg.startswith("--out=") or arg == "--force"):
            kept.append(arg)
    rest = [a for a in kept if a != "--quick"]
    if not rest:
        return "make bench QUICK=1" if "--quick" in kept else "make bench"
    return "python bench/run_bench.py " + shlex.join(kept)


def main() -> int:
    p = argparse.ArgumentParser(description=describe(__doc__))
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 repetition of 300 requests (unless --reps, -n say otherwise), 2 levels, "
                        "no speed targets")
    p.add_argument("--reps", type=int, help="repetitions per cell, interleaved (default: 5)")
    p.add_argument("--requests", "-n", type=int, help="requests per cell (default: 1000)")
    p.add_argument("--out", help="report folder, new or empty (default: reports/<date>, or reports/<date>-2 ... "
                                 "when that has a report)")
    p.add_argument("--force", action="store_true", help="write into an --out folder that has files already")
    args = p.parse_args()
    quick = args.quick
    reps = args.reps if args.reps is not None else 1 if quick else 5
    n = args.requests if args.requests is not None else 300 if quick else 1000
    if reps < 1 or n < 1:
        p.error("--reps and --requests must be at least 1")
    levels = grid.QUICK_LEVELS if quick else grid.LEVELS
    out = report_folder(args.out, args.force)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "commit": commit(), "argv": sys.argv[1:], "reproduce": reproduce(sys.argv[1:]),
                     "machine": versions(), "quick": quick, "reps": reps, "requests": n, "levels": list(levels),
                     "http": {}, "tcp": {}, "failover": [], "speed": {}}

    def save() -> None:  # after each part: an interrupted run keeps what it measured
        results["duration_s"] = round(time.monotonic() - started, 1)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str, allow_nan=False))

    with tempfile.TemporaryDirectory() as tmp:
        print("HTTP grid ...", flush=True)
        results["http"] = http_grid(tmp, levels, reps, n, quick)
        save()
        print("TCP grid ...", flush=True)
        results["tcp"] = tcp_grid(tmp, levels, reps, n)
        save()
        print("failover ...", flush=True)
        results["failover"] = failover(tmp, *((400, 400) if quick else (1000, 500)))
        save()
        if not quick:
            print("speed targets ...", flush=True)
            results["speed"] = speed_targets(tmp)
    save()
    render(results, out)
    print(f"report written to {out}/report.md in {results['duration_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
