"""Starting the targets of the grid on free loopback ports.

Each function starts its processes into the caller's ``ProcessGroup`` (which
stops them by PID) and returns ``{name: address or None}``; None means "not
available on this machine" (an anchor that is not installed), which the
report shows instead of failing.
"""

from __future__ import annotations

import sys

from bench import anchors
from clusterkit import cluster
from clusterkit.balancer import balancer_process

WWW = cluster.ROOT / "http_servers" / "www"
PAGE = "page.html"


def _quiet(workdir: str) -> list[str]:
    return ["--log-level", "warning", "--log-dir", workdir]


def http_backends(group: cluster.ProcessGroup, ports: list[int], workdir: str) -> list[cluster.Process]:
    """The assignment's four async backends, named backend1..N."""
    return [group.start(cluster.Process(f"backend{i}", cluster.python_script(
        "http_servers/async_server.py", str(port), "--name", f"backend{i}", *_quiet(workdir)), port=port))
        for i, port in enumerate(ports, 1)]


def lb_process(port: int, backends: list[int], workdir: str) -> cluster.Process:
    return cluster.Process("lb", cluster.python_script(
        "http_servers/lb.py", "--port", str(port), *_quiet(workdir),
        *[x for i, p in enumerate(backends, 1) for x in ("--backend", f"backend{i}=127.0.0.1:{p}")]), port=port)


def http_targets(group: cluster.ProcessGroup, workdir: str, with_http_server: bool = True) -> dict[str, str | None]:
    ports = cluster.free_ports(10)
    urls: dict[str, str | None] = {}

    def url(port: int) -> str:
        return f"http://127.0.0.1:{port}/{PAGE}"

    group.start(cluster.Process("async", cluster.python_script(
        "http_servers/Server_async_http.py", "--port", str(ports[0]), *_quiet(workdir)), port=ports[0]))
    urls["async (45000)"] = url(ports[0])
    group.start(cluster.Process("threaded", cluster.python_script(
        "http_servers/Server_thread_http.py", "--port", str(ports[1]), *_quiet(workdir)), port=ports[1]))
    urls["threaded (46000)"] = url(ports[1])
    backends = ports[2:6]
    http_backends(group, backends, workdir)
    group.start(lb_process(ports[6], backends, workdir))
    urls["lb.py over 4 backends (44444)"] = url(ports[6])
    urls["nginx (anchor)"] = None
    if anchors.available("nginx"):
        group.start(anchors.nginx(ports[7], str(WWW), workdir))
        urls["nginx (anchor)"] = url(ports[7])
    urls["HAProxy http over 4 backends (anchor)"] = None
    if anchors.available("haproxy"):
        group.start(anchors.haproxy(ports[8], [("127.0.0.1", p) for p in backends], workdir, mode="http"))
        urls["HAProxy http over 4 backends (anchor)"] = url(ports[8])
    if with_http_server:
        group.start(cluster.Process("http.server", [sys.executable, "-m", "http.server", str(ports[9]), "--bind",
                                                    "127.0.0.1", "--directory", str(WWW)], port=ports[9]))
        urls["python http.server (anchor)"] = url(ports[9])
    return urls


def tcp_targets(group: cluster.ProcessGroup, workdir: str) -> dict[str, int | None]:
    ports = cluster.free_ports(6)
    for i in range(3):
        group.start(cluster.echo_server(f"server{i + 1}", ports[i], "--log-level", "warning", log_dir=workdir))
    backends = [f"server{i + 1}=127.0.0.1:{ports[i]}" for i in range(3)]
    out: dict[str, int | None] = {"server1 direct": ports[0]}
    for mode, port in (("message", ports[3]), ("tcp", ports[4])):
        group.start(balancer_process(port, backends, "--mode", mode, "--log-level", "warning", log_dir=workdir))
        out[f"Load_Balancer.py --mode {mode}"] = port
    out["HAProxy tcp (anchor)"] = None
    if anchors.available("haproxy"):
        group.start(anchors.haproxy(ports[5], [("127.0.0.1", p) for p in ports[:3]], workdir))
        out["HAProxy tcp (anchor)"] = ports[5]
    return out
