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
  halfway; failed requests per balancer.
* Speed targets: bench_tcp, bench_balancer, bench_http and bench_stress, whose
  verdicts (met or not) go into the report (skipped with QUICK=1).

Each grid cell is the median of ``--reps`` repetitions (default 3) with the
spread shown. Nothing is pinned to a core: the load generator and the servers
share the machine's cores, as they would on a laptop.
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
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import anchors  # noqa: E402
from bench.common import median, run_ab  # noqa: E402
from bench.render import render  # noqa: E402
from clusterkit import cluster  # noqa: E402
from clusterkit.balancer import balancer_process  # noqa: E402

WWW = cluster.ROOT / "http_servers" / "www"
COLUMNS = ["time_taken_s", "complete", "failed", "total_transferred_bytes", "requests_per_second",
           "time_per_request_ms", "time_per_request_all_ms", "transfer_rate_kbps"]


def stress(tmp: str, *args: str, timeout: float = 300) -> dict:
    out = Path(tmp) / f"stress-{time.monotonic_ns()}.json"
    proc = subprocess.run(cluster.python_script("ClientServer_StressTools.py", *args, "--quiet", "--json", str(out),
                                                "--log-level", "warning", "--log-dir", tmp),
                          capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        raise RuntimeError(f"stress tool failed: {proc.stderr.strip()[-300:]}")
    row = json.loads(out.read_text())["runs"][0]
    out.unlink()
    return row


def cell(rows: list[dict]) -> dict:
    """The median of each column over repetitions, with the spread of requests/s."""
    out = {k: median([r[k] for r in rows if r.get(k) is not None]) for k in COLUMNS}
    out["failed"] = sum(r["failed"] for r in rows)
    rps = [r["requests_per_second"] for r in rows]
    out["rps_spread_pct"] = round((max(rps) - min(rps)) / 2 / median(rps) * 100, 1) if len(rps) > 1 and median(rps) else 0
    for key in ("p50_ms", "p99_ms"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = median(vals) if vals else None
    out["reps"] = len(rows)
    return out


def flat(row: dict) -> dict:
    """A stress-tool row with its latency percentiles next to ab's names."""
    return {**row, "p50_ms": row["rtt_ms"]["p50"], "p99_ms": row["rtt_ms"]["p99"]}


def http_targets(group: cluster.ProcessGroup, tmp: str, quick: bool) -> dict[str, str | None]:
    quiet = ["--log-level", "warning", "--log-dir", tmp]
    ports = cluster.free_ports(12)
    urls: dict[str, str | None] = {}

    def py(name: str, script: str, *args: str, port: int) -> None:
        group.start(cluster.Process(name, cluster.python_script(script, *args, *quiet), port=port))

    py("async", "http_servers/Server_async_http.py", "--port", str(ports[0]), port=ports[0])
    urls["async (45000)"] = f"http://127.0.0.1:{ports[0]}/page.html"
    py("threaded", "http_servers/Server_thread_http.py", "--port", str(ports[1]), port=ports[1])
    urls["threaded (46000)"] = f"http://127.0.0.1:{ports[1]}/page.html"
    backends = ports[2:6]
    for i, port in enumerate(backends, 1):
        py(f"backend{i}", "http_servers/async_server.py", str(port), "--name", f"backend{i}", port=port)
    py("lb", "http_servers/lb.py", "--port", str(ports[6]),
       *[x for i, p in enumerate(backends, 1) for x in ("--backend", f"backend{i}=127.0.0.1:{p}")], port=ports[6])
    urls["lb.py over 4 backends (44444)"] = f"http://127.0.0.1:{ports[6]}/page.html"
    urls["nginx (anchor)"] = None
    if anchors.available("nginx"):
        group.start(anchors.nginx(ports[7], str(WWW), tmp))
        urls["nginx (anchor)"] = f"http://127.0.0.1:{ports[7]}/page.html"
    urls["HAProxy http over 4 backends (anchor)"] = None
    if anchors.available("haproxy"):
        group.start(anchors.haproxy(ports[8], [("127.0.0.1", p) for p in backends], tmp, mode="http"))
        urls["HAProxy http over 4 backends (anchor)"] = f"http://127.0.0.1:{ports[8]}/page.html"
    if not quick:
        group.start(cluster.Process("http.server", [sys.executable, "-m", "http.server", str(ports[9]), "--bind",
                                                    "127.0.0.1", "--directory", str(WWW)], port=ports[9]))
        urls["python http.server (anchor)"] = f"http://127.0.0.1:{ports[9]}/page.html"
    return urls


def tcp_targets(group: cluster.ProcessGroup, tmp: str) -> dict[str, int | None]:
    ports = cluster.free_ports(7)
    for i in range(3):
        group.start(cluster.echo_server(f"server{i + 1}", ports[i], "--log-level", "warning", log_dir=tmp))
    backends = [f"server{i + 1}=127.0.0.1:{ports[i]}" for i in range(3)]
    out: dict[str, int | None] = {"server1 direct": ports[0]}
    group.start(balancer_process(ports[3], backends, "--mode", "message", "--log-level", "warning", log_dir=tmp))
    out["Load_Balancer.py --mode message"] = ports[3]
    group.start(balancer_process(ports[4], backends, "--mode", "tcp", "--log-level", "warning", log_dir=tmp))
    out["Load_Balancer.py --mode tcp"] = ports[4]
    out["HAProxy tcp (anchor)"] = None
    if anchors.available("haproxy"):
        group.start(anchors.haproxy(ports[5], [("127.0.0.1", p) for p in ports[:3]], tmp))
        out["HAProxy tcp (anchor)"] = ports[5]
    return out


def failover(tmp: str, quick: bool) -> list[dict]:
    """1000 requests through each balancer, one backend killed halfway."""
    n, rate = (400, 400) if quick else (1000, 500)
    runs = []
    for kind in ("tcp-message", "tcp-haproxy", "http-lb", "http-haproxy"):
        if "haproxy" in kind and not anchors.available("haproxy"):
            runs.append({"balancer": kind, "available": False})
            continue
        with cluster.ProcessGroup() as group:
            ports = cluster.free_ports(6)
            if kind.startswith("tcp"):
                servers = [group.start(cluster.echo_server(f"server{i + 1}", ports[i], "--log-level", "warning",
                                                           log_dir=tmp)) for i in range(3)]
                if kind == "tcp-message":
                    group.start(balancer_process(ports[4], [f"server{i + 1}=127.0.0.1:{ports[i]}" for i in range(3)],
                                                 "--log-level", "warning", log_dir=tmp))
                    name = "Load_Balancer.py (message mode)"
                else:
                    group.start(anchors.haproxy(ports[4], [("127.0.0.1", p) for p in ports[:3]], tmp, check=True))
                    name = "HAProxy 2.6 mode tcp (check inter 1s, redispatch)"
                target = ["--port", str(ports[4])]
            else:
                servers = [group.start(cluster.Process(f"backend{i + 1}", cluster.python_script(
                    "http_servers/async_server.py", str(ports[i]), "--name", f"backend{i + 1}", "--log-level",
                    "warning", "--log-dir", tmp), port=ports[i])) for i in range(4)]
                if kind == "http-lb":
                    group.start(cluster.Process("lb", cluster.python_script(
                        "http_servers/lb.py", "--port", str(ports[4]), "--log-level", "warning", "--log-dir", tmp,
                        *[x for i in range(4) for x in ("--backend", f"backend{i + 1}=127.0.0.1:{ports[i]}")]),
                        port=ports[4]))
                    name = "lb.py (HTTP)"
                else:
                    group.start(anchors.haproxy(ports[4], [("127.0.0.1", p) for p in ports[:4]], tmp,
                                                mode="http", check=True))
                    name = "HAProxy 2.6 mode http (check inter 1s, redispatch)"
                target = ["--http", f"http://127.0.0.1:{ports[4]}/page.html"]
            victim = servers[1]
            timer = threading.Timer(n / rate / 2, victim.kill)
            timer.start()
            try:
                row = stress(tmp, *target, "-n", str(n), "-c", "10", "--rate", str(rate))
            finally:
                timer.cancel()
            runs.append({"balancer": name, "available": True, "requests": n, "complete": row["complete"],
                         "failed": row["failed"], "errors": row["errors"], "backends": row["backends"],
                         "killed": victim.name})
    return runs


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
                              capture_output=True, text=True, timeout=900)
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 repetition, 2 levels, no speed targets")
    p.add_argument("--reps", type=int, default=3, help="repetitions per cell (default: 3)")
    p.add_argument("--requests", "-n", type=int, default=1000)
    p.add_argument("--out", help="report folder (default: reports/<date>)")
    args = p.parse_args()
    quick = args.quick
    reps = 1 if quick else args.reps
    n = 300 if quick else args.requests
    levels = (1, 10) if quick else (1, 3, 5, 8, 10)
    out = Path(args.out or cluster.ROOT / "reports" / datetime.date.today().isoformat())
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "machine": versions(), "quick": quick, "reps": reps, "requests": n, "levels": list(levels),
                     "http": {}, "tcp": {}}
    has_ab = shutil.which("ab") is not None
    with tempfile.TemporaryDirectory() as tmp:
        with cluster.ProcessGroup() as group:
            print("HTTP grid ...", flush=True)
            for name, url in http_targets(group, tmp, quick).items():
                entry = results["http"][name] = {"available": url is not None, "ab": {}, "stress": {}}
                if url is None:
                    continue
                for c in levels:
                    if has_ab:
                        entry["ab"][c] = cell([run_ab(url, n, c) for _ in range(reps)])
                    entry["stress"][c] = cell([flat(stress(tmp, "--http", url, "-n", str(n), "-c", str(c)))
                                               for _ in range(reps)])
        with cluster.ProcessGroup() as group:
            print("TCP grid ...", flush=True)
            for name, port in tcp_targets(group, tmp).items():
                entry = results["tcp"][name] = {"available": port is not None, "per-request": {}, "keepalive": {}}
                if port is None:
                    continue
                for c in levels:
                    for conn in ("per-request", "keepalive"):
                        entry[conn][c] = cell([flat(stress(tmp, "--port", str(port), "-n", str(n), "-c", str(c),
                                                           "--connection", conn)) for _ in range(reps)])
        print("failover ...", flush=True)
        results["failover"] = failover(tmp, quick)
        results["speed"] = {} if quick else (print("speed targets ...", flush=True) or speed_targets(tmp))
    results["duration_s"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    render(results, out)
    print(f"report written to {out}/report.md in {results['duration_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
