"""Benchmark of Load_Balancer.py (issue 3): both modes against HAProxy.

Three echo servers (``--log-level warning``, so they are not the limit) stand
behind four balancers at once (ours at ``--log-level warning`` too, as the
HAProxy anchor logs nothing): ours in ``--mode tcp``, ours in ``--mode
message`` (as started by default: idle backend connections reused by later
clients, reuse.py) and with ``--keepalive 0`` (a backend connection per
client, as HAProxy's), and HAProxy 2.6 (``mode tcp``, ``nbthread 1``,
``balance roundrobin``). The C load generator (bench/c/lineload) drives each in turn at
concurrency 10 with 64-byte messages, on persistent connections and with one
connection per message; rounds are interleaved and medians compared as ratios
within this one run. Beside them, ``ref_relay.py`` (a flat Python epoll relay
with none of a balancer's work) shows what Python reaches at all here: the
ceiling for our ratios.

Usage: python bench/bench_balancer.py [--rounds 3] [--seconds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import anchors  # noqa: E402
from bench.common import BENCH, LOCK, describe, median, print_table, run_lineload, spread  # noqa: E402
from clusterkit import cluster  # noqa: E402
from clusterkit.balancer import balancer_process  # noqa: E402

LABELS = {"tcp": "--mode tcp", "message": "--mode message", "message no reuse": "--mode message --keepalive 0",
          "ref relay": "ref_relay.py (Python ceiling)"}
TARGETS = {"persistent": {"tcp": 1.0, "message": 0.8}, "per-request": {"tcp": 0.9, "message": 0.9}}


def main() -> int:
    p = argparse.ArgumentParser(description=describe(__doc__))
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are compared (default: 3)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each load run (default: 3)")
    p.add_argument("--connections", "-c", type=int, default=10,
                   help="concurrent connections of the load generator (default: 10)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    if not anchors.available("haproxy"):
        print("haproxy is not installed (apt-get install haproxy): no anchor to compare with")
        return 1
    results: dict = {}
    with open(LOCK, "w") as lock, tempfile.TemporaryDirectory() as tmp, cluster.ProcessGroup() as group:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ports = cluster.free_ports(8)
        backends = []
        for i in range(3):
            group.start(cluster.echo_server(f"server{i + 1}", ports[i], "--log-level", "warning", log_dir=tmp))
            backends.append(f"server{i + 1}=127.0.0.1:{ports[i]}")
        targets = {
            # --log-level warning: the HAProxy anchor logs nothing either.
            "tcp": group.start(balancer_process(ports[3], backends, "--mode", "tcp", "--log-level", "warning",
                                                log_dir=tmp)),
            "message": group.start(balancer_process(ports[4], backends, "--mode", "message", "--log-level", "warning",
                                                    log_dir=tmp)),
            # Without its idle backend connections (reuse.py): a backend connection per client, as HAProxy's.
            "message no reuse": group.start(balancer_process(ports[7], backends, "--mode", "message", "--keepalive",
                                                             "0", "--log-level", "warning", log_dir=tmp)),
            "haproxy": group.start(anchors.haproxy(ports[5], [("127.0.0.1", p) for p in ports[:3]], tmp)),
            "ref relay": group.start(cluster.Process("ref-relay", [sys.executable, str(BENCH / "ref_relay.py"),
                                                                   str(ports[6])] + [str(p) for p in ports[:3]],
                                                     port=ports[6])),
        }
        for kind in ("persistent", "per-request"):
            rps = {name: [] for name in targets}
            errors = {name: 0 for name in targets}
            for _ in range(args.rounds):
                for name, proc in targets.items():
                    r = run_lineload("127.0.0.1", proc.port, connections=args.connections, seconds=args.seconds,
                                     per_request=kind == "per-request")
                    rps[name].append(r["rps"])
                    errors[name] += r["errors"]
            results[kind] = {"rps": rps, "errors": errors}
    rows = []
    verdicts = []
    for kind, res in results.items():
        ha = median(res["rps"]["haproxy"])
        for name in ("tcp", "message", "message no reuse", "haproxy", "ref relay"):
            m = median(res["rps"][name])
            ratio = m / ha
            goal = TARGETS[kind].get(name)
            verdict = "" if goal is None else f">= {goal:.1f}x: {'met' if ratio >= goal else 'NOT met'}"
            if goal is not None:
                verdicts.append({"connections": kind, "mode": name, "ratio": round(ratio, 3), "target": goal,
                                 "met": ratio >= goal})
            label = LABELS.get(name, name)
            rows.append([kind, label, f"{m:,.0f}", spread(res["rps"][name]),
                         res["errors"][name], f"{ratio:.2f}", verdict])
    print(f"three echo servers behind each balancer; concurrency {args.connections}, 64-byte messages, "
          f"{args.rounds} interleaved rounds x {args.seconds:g}s; load: bench/c/lineload")
    print_table(["connections", "balancer", "messages/s", "spread", "errors", "x HAProxy", "target"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "verdicts": verdicts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
