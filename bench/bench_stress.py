"""Benchmark of the stress tool itself (issue 5): is it fast and right enough
to be trusted?

1. Against one server (our echo server at ``--log-level warning``, and the C
   echo server bench/c/lineecho), persistent connections, concurrency 10,
   64-byte messages: the rate the tool measures with each engine, as a ratio
   of what the C load generator (bench/c/lineload) measures on the same
   target in the same run; and whether each engine ranks the two servers in
   the same order as the C generator. ``ref_load.py``, a flat Python loop that
   only counts answers, shows the ceiling for Python here. A rate the tool
   itself calls a lower bound (the server had room left while the tool or the
   CPUs were at their limit) is shown as ``>=`` and ranks no server below it:
   the ranking column says "same", "DIFFERENT" (a pair ranked the wrong way),
   or that the tool made no claim.
2. ``--http`` against nginx serving page.html: requests/s and p50 latency
   next to ApacheBench's for the same run size.

Usage: python bench/bench_stress.py [--seconds 3] [--rounds 2] [--http-rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import anchors  # noqa: E402
from bench.common import (BENCH, LOCK, describe, lineecho_process, median, print_table, run_ab,  # noqa: E402
                          run_lineload)
from clusterkit import cluster  # noqa: E402

ENGINES = {"epoll x2 processes": ("epoll", 2), "epoll x1": ("epoll", 1),
           "async x2 processes": ("async", 2), "async x1": ("async", 1),
           "thread x2 processes": ("thread", 2), "thread x1": ("thread", 1)}
REF = "ref_load.py (Python ceiling)"
"""A flat Python epoll loop that counts answers and nothing else: what Python drives at all here."""
HTTP_ENGINE = ("--engine", "epoll")
"""What --http is compared with ab on: the engine built like ab (processes: auto)."""


def run_tool(tmp: str, *args: str) -> dict:
    out = Path(tmp) / "stress.json"
    proc = subprocess.run(cluster.python_script("ClientServer_StressTools.py", *args, "--quiet", "--json", str(out),
                                                "--log-level", "warning", "--log-dir", tmp),
                          capture_output=True, text=True, timeout=300)
    if not out.exists():
        raise RuntimeError(f"stress tool failed: {proc.stderr[-500:]}")
    return json.loads(out.read_text())["runs"][0]


def run_ref_load(port: int, seconds: float) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / "ref_load.py"), str(port), "10", str(seconds)],
                          capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode:
        raise RuntimeError(f"ref_load.py failed: {proc.stderr[-500:]}")
    return json.loads(proc.stdout)


def ranking_verdict(rate: dict[str, float], low: dict[str, bool], ref_order: list[str]) -> str:
    """What the tool's figures claim about which server is faster, against the C
    generator's order: a pair is ranked only when the faster-looking one's rate is
    not a lower bound below an exact one (a lower bound above an exact rate still
    ranks). "same": every pair ranked, as the C generator; "DIFFERENT": a pair ranked
    the other way; else the tool made no claim (or only some), and none wrong."""
    ranked = wrong = pairs = 0
    for i, a in enumerate(ref_order):
        for b in ref_order[i + 1:]:  # the C generator says a > b
            pairs += 1
            hi, lo = (a, b) if rate[a] >= rate[b] else (b, a)
            if low[lo]:
                continue  # lo's true rate may be above hi's: no claim
            ranked += 1
            wrong += hi != a
    if wrong:
        return "DIFFERENT"
    if ranked == pairs:
        return "same"
    return "no claim (lower bound)" if not ranked else "same, in part"


def main() -> int:
    p = argparse.ArgumentParser(description=describe(__doc__))
    p.add_argument("--seconds", type=float, default=3.0, help="length of each load run (default: 3)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are compared (default: 2)")
    p.add_argument("--http-rounds", type=int, default=5,
                   help="interleaved ab / --http runs (a few seconds each; their ratio swings by 10-20%% per pair here; default: %(default)s)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    rps: dict[str, dict[str, list[float]]] = {}
    busy: dict[str, dict[str, list[float]]] = {}  # the tool's own CPU, % of a core per process
    bound: dict[str, dict[str, list[bool]]] = {}  # the tool said: the rate is only a lower bound for the server
    http: dict = {}
    with open(LOCK, "w") as lock, tempfile.TemporaryDirectory() as tmp, cluster.ProcessGroup() as group:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ports = cluster.free_ports(3)
        servers = {"python echo server": group.start(cluster.echo_server(
                       "server1", ports[0], "--log-level", "warning", log_dir=tmp)),
                   "C echo server": group.start(lineecho_process("cecho", ports[1]))}
        for _ in range(args.rounds):
            for sname, proc in servers.items():
                r = run_lineload("127.0.0.1", proc.port, connections=10, seconds=args.seconds)
                rps.setdefault("C load generator", {}).setdefault(sname, []).append(r["rps"])
                ref = run_ref_load(proc.port, args.seconds)
                rps.setdefault(REF, {}).setdefault(sname, []).append(ref["rps"])
                busy.setdefault(REF, {}).setdefault(sname, []).append(ref["cpu_percent"])
                for ename, (engine, procs) in ENGINES.items():
                    row = run_tool(tmp, "--port", str(proc.port), "-c", "10", "-k", "--duration", str(args.seconds),
                                   "--engine", engine, "--processes", str(procs))
                    if row["failed"]:
                        print(f"warning: {row['failed']} failed requests with {ename}")
                    rps.setdefault(ename, {}).setdefault(sname, []).append(row["requests_per_second"])
                    busy.setdefault(ename, {}).setdefault(sname, []).append(row["client_cpu_percent"])
                    bound.setdefault(ename, {}).setdefault(sname, []).append(row["rate_is_lower_bound"])
        if anchors.available("nginx") and shutil.which("ab"):
            nginx = group.start(anchors.nginx(ports[2], str(cluster.ROOT / "http_servers" / "www"), tmp))
            url = f"http://127.0.0.1:{nginx.port}/page.html"
            for _ in range(args.http_rounds):
                ab = run_ab(url, 20000, 10)
                tool = run_tool(tmp, "--http", url, "-n", "20000", "-c", "10", *HTTP_ENGINE)
                # ab's percentiles are of its Total, from the connect to the end of the answer:
                # the tool's total_ms is the same span, request by request.
                for key, value in (("ab_rps", ab["requests_per_second"]), ("ab_p50", ab["p50_precise_ms"]),
                                   ("tool_rps", tool["requests_per_second"]),
                                   ("tool_p50", tool["total_ms"]["p50"])):
                    http.setdefault(key, []).append(value)
    ref = {s: median(v) for s, v in rps["C load generator"].items()}
    ref_order = sorted(ref, key=ref.get, reverse=True)
    rows, verdicts = [], []
    for gen, per in rps.items():
        m = {s: median(v) for s, v in per.items()}
        # A rate the tool called a lower bound (in any round) ranks nothing below it.
        low = {s: any(bound.get(gen, {}).get(s, [])) for s in m}
        order = sorted(m, key=m.get, reverse=True)
        ratios = {s: m[s] / ref[s] for s in m}
        cpu = {s: f", tool {median(busy[gen][s]):.0f}%" if gen in busy else "" for s in m}
        verdict = ranking_verdict(m, low, ref_order)
        rows.append([gen] + [f"{'>= ' if low[s] else ''}{m[s]:,.0f} ({ratios[s]:.2f}x{cpu[s]})" for s in servers] +
                    [" > ".join(o.split()[0] for o in order), verdict])
        if gen not in ("C load generator", REF):
            goal = 0.5 if gen.startswith("thread") else 0.8
            worst = min(ratios.values())
            verdicts.append({"engine": gen, "ratio_min": round(worst, 3), "target": goal, "met": worst >= goal,
                             "ranking": verdict, "ranks_wrongly": verdict == "DIFFERENT"})
    print(f"persistent connections, concurrency 10, 64-byte messages, {args.rounds} interleaved rounds x "
          f"{args.seconds:g}s; ratio = rate measured / rate the C generator measured on the same server; "
          f"tool = the stress tool's CPU, % of a core per load process")
    print_table(["load generator"] + list(servers) + ["ranking", "vs C generator"], rows)
    if http:
        r_rps = median(http["tool_rps"]) / median(http["ab_rps"])
        r_p50 = median(http["tool_p50"]) / median(http["ab_p50"]) if median(http["ab_p50"]) else float("nan")
        print(f"\n--http {' '.join(HTTP_ENGINE)} vs ApacheBench on nginx, -n 20000 -c 10: requests/s "
              f"{median(http['tool_rps']):,.0f} vs {median(http['ab_rps']):,.0f} ({r_rps:.2f}x, target 0.85-1.15); "
              f"p50 (total, as ab's) {median(http['tool_p50']):.3f} ms vs ab's {median(http['ab_p50']):.3f} ms "
              f"({r_p50:.2f}x, target 0.8-1.2)")
        verdicts.append({"http_rps_ratio": round(r_rps, 3), "http_p50_ratio": round(r_p50, 3),
                         "met": 0.85 <= r_rps <= 1.15 and 0.8 <= r_p50 <= 1.2})
    if args.json:
        Path(args.json).write_text(json.dumps({"rps": rps, "tool_cpu_percent": busy, "http": http, "verdicts": verdicts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
