"""Benchmark of the HTTP servers (issue 4) against nginx and HAProxy, with
ApacheBench and wrk, on page.html.

Side by side on free loopback ports: Server_async_http.py, Server_thread_http.py,
nginx (one worker, access log off; stock, and tuned with open_file_cache on and
sendfile off), lb.py and HAProxy 2.6 (mode http, nbthread 1, roundrobin) over
the same four async backends. Rounds are interleaved; medians compared as
ratios within this run. The servers log at ``warning`` (nginx's access log is
off too).

Usage: python bench/bench_http.py [--quick] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import anchors  # noqa: E402
from bench.common import LOCK, describe, median, print_table, run_ab, run_wrk, spread  # noqa: E402
from clusterkit import cluster  # noqa: E402

WWW = cluster.ROOT / "http_servers" / "www"


def start_all(group: cluster.ProcessGroup, tmp: str) -> dict[str, cluster.Process]:
    ports = cluster.free_ports(11)
    quiet = ["--log-level", "warning", "--log-dir", tmp]
    t: dict[str, cluster.Process] = {}
    t["async"] = group.start(cluster.Process("async", cluster.python_script(
        "http_servers/Server_async_http.py", "--port", str(ports[0]), *quiet), port=ports[0]))
    t["threaded"] = group.start(cluster.Process("threaded", cluster.python_script(
        "http_servers/Server_thread_http.py", "--port", str(ports[1]), *quiet), port=ports[1]))
    backends = []
    for i in range(4):
        port = ports[2 + i]
        group.start(cluster.Process(f"backend{i + 1}", cluster.python_script(
            "http_servers/async_server.py", str(port), "--name", f"backend{i + 1}", *quiet), port=port))
        backends.append(port)
    t["lb"] = group.start(cluster.Process("lb", cluster.python_script(
        "http_servers/lb.py", "--port", str(ports[6]), *quiet,
        *[x for p in backends for x in ("--backend", f"127.0.0.1:{p}")]), port=ports[6]))
    if anchors.available("nginx"):
        t["nginx"] = group.start(anchors.nginx(ports[7], str(WWW), tmp))
        t["nginx-tuned"] = group.start(anchors.nginx(ports[8], str(WWW), tmp, tuned=True))
    if anchors.available("haproxy"):
        t["haproxy"] = group.start(anchors.haproxy(ports[9], [("127.0.0.1", p) for p in backends], tmp, mode="http"))
    return t


def main() -> int:
    p = argparse.ArgumentParser(description=describe(__doc__))
    p.add_argument("--quick", action="store_true", help="fewer requests and one round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are compared (default: 3)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    if shutil.which("ab") is None:
        print("ApacheBench is not installed (apt-get install apache2-utils)")
        return 1
    rounds = 1 if args.quick else args.rounds
    n_close, n_keep, wrk_s = (4000, 40000, 2) if args.quick else (20000, 200000, 5)
    results: dict = {}

    def add(key: str, target: str, value: float, errors: int = 0) -> None:
        cell = results.setdefault(key, {}).setdefault(target, {"rps": [], "errors": 0})
        cell["rps"].append(value)
        cell["errors"] += errors

    with open(LOCK, "w") as lock, tempfile.TemporaryDirectory() as tmp, cluster.ProcessGroup() as group:
        fcntl.flock(lock, fcntl.LOCK_EX)
        targets = start_all(group, tmp)
        for _ in range(rounds):
            for name, proc in targets.items():
                url = f"http://127.0.0.1:{proc.port}/page.html"
                r = run_ab(url, n_close, 10)
                add(f"ab -n {n_close} -c 10", name, r["requests_per_second"], r["failed"] + r["non_2xx"])
                r = run_ab(url, n_keep, 10, keepalive=True)
                add(f"ab -k -n {n_keep} -c 10", name, r["requests_per_second"], r["failed"] + r["non_2xx"])
                if shutil.which("wrk"):
                    w = run_wrk(url, 10, wrk_s)
                    add(f"wrk -t1 -c10 -d{wrk_s}s", name, w["rps"], w["errors"])
        threaded_url = f"http://127.0.0.1:{targets['threaded'].port}/page.html"
        sweep = {}
        for c in (1, 10, 50, 100):
            r = run_ab(threaded_url, 2000 if args.quick else 5000, c)
            sweep[c] = {"rps": r["requests_per_second"], "failed": r["failed"] + r["non_2xx"], "max_ms": r["max_ms"]}
    rows, verdicts = [], []
    for key, cells in results.items():
        for name, cell in cells.items():
            rows.append([key, name, f"{median(cell['rps']):,.0f}", spread(cell["rps"]), cell["errors"]])

    def ratio(key: str, a: str, b: str) -> float | None:
        cells = results.get(key, {})
        if a in cells and b in cells:
            return median(cells[a]["rps"]) / median(cells[b]["rps"])
        return None

    k_close, k_keep = f"ab -n {n_close} -c 10", f"ab -k -n {n_keep} -c 10"
    k_wrk = f"wrk -t1 -c10 -d{wrk_s}s"
    for what, key, a, b, goal in (
            ("async vs nginx, no keep-alive", k_close, "async", "nginx", 0.9),
            ("async vs nginx, ab -k", k_keep, "async", "nginx", 1.0),
            ("async vs nginx, wrk", k_wrk, "async", "nginx", 1.0),
            ("async vs tuned nginx, ab -k", k_keep, "async", "nginx-tuned", None),
            ("async vs tuned nginx, wrk", k_wrk, "async", "nginx-tuned", None),
            ("threaded vs async, no keep-alive", k_close, "threaded", "async", 0.4),
            ("threaded vs async, ab -k", k_keep, "threaded", "async", 0.4),
            ("lb vs HAProxy, no keep-alive", k_close, "lb", "haproxy", 1.0),
            ("lb vs HAProxy, ab -k", k_keep, "lb", "haproxy", 1.0),
            ("lb vs HAProxy, wrk", k_wrk, "lb", "haproxy", 1.0)):
        r = ratio(key, a, b)
        if r is not None:
            verdicts.append({"what": what, "ratio": round(r, 3), "target": goal,
                             "met": None if goal is None else r >= goal})
    print(f"page.html ({(WWW / 'page.html').stat().st_size} bytes), concurrency 10, {rounds} interleaved round(s)")
    print_table(["load", "target", "requests/s (median)", "spread", "errors"], rows)
    print()
    print_table(["ratio", "value", "target", "verdict"],
                [[v["what"], f"{v['ratio']:.2f}x", "-" if v["target"] is None else f">= {v['target']}x",
                  "-" if v["met"] is None else ("met" if v["met"] else "NOT met")] for v in verdicts])
    print()
    print("threaded server, ab -n 5000 at rising concurrency:")
    print_table(["concurrency", "requests/s", "failed", "longest ms"],
                [[c, f"{s['rps']:,.0f}", s["failed"], s["max_ms"]] for c, s in sweep.items()])
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "verdicts": verdicts, "threaded_sweep": sweep},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
