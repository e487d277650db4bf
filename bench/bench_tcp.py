"""Benchmark of the echo server (issue 2): ours vs a bare uvloop reference.

Three targets run side by side on free loopback ports: the reference
(``ref_echo.py``), our server with ``--log-level warning`` and our server with
the default logging (``info``: one log line per message). The C load
generator (``bench/c/lineload``: one thread, epoll, far faster than any Python
server here) drives each in turn with persistent connections, concurrency 10,
64-byte messages; rounds are interleaved so that noise hits every target
alike, and the medians are compared as ratios within this one run.

Usage: make bench-tcp  (or: python bench/bench_tcp.py --rounds 5 --seconds 5 --json out.json)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LOCK, describe, lineecho_process, median, print_table, run_lineload, spread  # noqa: E402
from clusterkit import cluster  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=describe(__doc__))
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are compared (default: 5)")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each load run (default: 4)")
    p.add_argument("--connections", "-c", type=int, default=10,
                   help="concurrent connections of the load generator (default: 10)")
    p.add_argument("--size", type=int, default=64, help="message size in bytes, the newline included (default: 64)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()

    with open(LOCK, "w") as lock, tempfile.TemporaryDirectory() as tmp, cluster.ProcessGroup() as group:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ports = cluster.free_ports(4)
        targets = {
            "reference (bare uvloop echo)": group.start(cluster.Process(
                "ref", cluster.python_script("bench/ref_echo.py", str(ports[0])), port=ports[0])),
            "server, --log-level warning": group.start(cluster.echo_server(
                "server1", ports[1], "--log-level", "warning", log_dir=tmp)),
            "server, default logging (info)": group.start(cluster.echo_server(
                "server2", ports[2], log_dir=tmp)),
            "C echo server (lineecho)": group.start(lineecho_process("cecho", ports[3])),
        }
        rps: dict[str, list[float]] = {name: [] for name in targets}
        p99: dict[str, list[float]] = {name: [] for name in targets}
        errors = 0
        for _ in range(args.rounds):
            for name, proc in targets.items():
                r = run_lineload("127.0.0.1", proc.port, connections=args.connections,
                                 seconds=args.seconds, size=args.size)
                rps[name].append(r["rps"])
                p99[name].append(r["p99_ms"])
                errors += r["errors"]
    ref = median(rps["reference (bare uvloop echo)"])
    rows = []
    for name in targets:
        m = median(rps[name])
        rows.append([name, f"{m:,.0f}", spread(rps[name]), f"{median(p99[name]):.3f}", f"{m / ref:.2f}"])
    print(f"persistent connections, concurrency {args.connections}, {args.size}-byte messages, "
          f"{args.rounds} rounds x {args.seconds:g}s, load from bench/c/lineload (C, epoll)")
    print_table(["target", "messages/s (median)", "spread", "rtt p99 ms", "ratio to reference"], rows)
    print(f"errors: {errors}")
    warning = median(rps["server, --log-level warning"]) / ref
    info = median(rps["server, default logging (info)"]) / ref
    print(f"target: warning >= 0.90x reference: {warning:.2f}x {'met' if warning >= 0.9 else 'NOT met'}; "
          f"default logging >= 0.50x: {info:.2f}x {'met' if info >= 0.5 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rps": rps, "p99_ms": p99, "errors": errors,
                                               "ratio_warning": warning, "ratio_info": info}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
