"""Failover cells: N requests through each balancer, one backend SIGKILLed mid-run.

The load is open-loop (``--rate``) so the middle of the run is a point in time
the kill timer can aim at (it starts with the stress tool's process, whose own
start-up takes part of it: the kill lands about a third of the way in); the
kill is by PID (``Process.kill``). Each balancer gets fresh
backends so one run's dead server does not leak into the next.
"""

from __future__ import annotations

import threading

from bench import anchors
from bench.report import targets
from bench.report.runners import STRESS_ENGINE, run_stress
from clusterkit import cluster
from clusterkit.balancer import balancer_process

KINDS = ("tcp-message", "tcp-tcp", "tcp-haproxy", "http-lb", "http-haproxy")
NAMES = {"tcp-message": "Load_Balancer.py --mode message", "tcp-tcp": "Load_Balancer.py --mode tcp",
         "tcp-haproxy": "HAProxy mode tcp (check inter 1s, redispatch)", "http-lb": "lb.py (HTTP)",
         "http-haproxy": "HAProxy mode http (check inter 1s, redispatch)"}


def _start(kind: str, group: cluster.ProcessGroup, ports: list[int], workdir: str):
    """Start backends and the balancer of ``kind``; return (backends, stress target args)."""
    if kind.startswith("tcp"):
        servers = [group.start(cluster.echo_server(f"server{i + 1}", ports[i], "--log-level", "warning",
                                                   log_dir=workdir)) for i in range(3)]
        if kind == "tcp-haproxy":
            group.start(anchors.haproxy(ports[4], [("127.0.0.1", p) for p in ports[:3]], workdir, check=True))
        else:
            group.start(balancer_process(ports[4], [f"server{i + 1}=127.0.0.1:{ports[i]}" for i in range(3)],
                                         "--mode", kind.split("-")[1], "--log-level", "warning", log_dir=workdir))
        return servers, ["--port", str(ports[4])]
    servers = targets.http_backends(group, ports[:4], workdir)
    if kind == "http-lb":
        group.start(targets.lb_process(ports[4], ports[:4], workdir))
    else:
        group.start(anchors.haproxy(ports[4], [("127.0.0.1", p) for p in ports[:4]], workdir, mode="http",
                                    check=True))
    return servers, ["--http", f"http://127.0.0.1:{ports[4]}/{targets.PAGE}"]


def failover(workdir: str, requests: int = 1000, rate: int = 500) -> list[dict]:
    runs = []
    for kind in KINDS:
        name = NAMES[kind]
        if "haproxy" in kind and not anchors.available("haproxy"):
            runs.append({"balancer": name, "available": False, "why": "haproxy is not installed"})
            continue
        try:
            runs.append({"balancer": name, "ours": "HAProxy" not in name, "available": True,
                         **_run(kind, workdir, requests, rate)})
        except Exception as exc:  # noqa: BLE001  (one balancer's failure costs its row, not the report)
            runs.append({"balancer": name, "available": False, "why": " ".join(str(exc).split())[:300]})
    return runs


def _run(kind: str, workdir: str, requests: int, rate: int) -> dict:
    with cluster.ProcessGroup() as group:
        servers, target = _start(kind, group, cluster.free_ports(5), workdir)
        victim = servers[1]
        timer = threading.Timer(requests / rate / 2, victim.kill)
        timer.start()
        try:
            row = run_stress(workdir, *target, "-n", str(requests), "-c", "10", "--rate", str(rate), *STRESS_ENGINE)
        finally:
            timer.cancel()
    return {"requests": requests, "rate": rate, "kill_after_s": requests / rate / 2, "complete": row["complete"],
            "failed": row["failed"], "errors": row["errors"], "backends": row["backends"], "killed": victim.name}
