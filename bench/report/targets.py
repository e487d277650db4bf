"""Starting the targets of the grid on free loopback ports.

Each function starts its processes into the caller's ``ProcessGroup`` (which
stops them by PID) and returns ``{name: address or None}``; None means "not
available": an anchor that is not installed, or a target that failed to start,
whose reason goes into ``why`` (``{name: reason}``). The report shows either
instead of failing, and measures the rest.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

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


def started(group: cluster.ProcessGroup, make: Callable[[], object], name: str, why: dict[str, str],
            program: str | None = None) -> bool:
    """Start what ``make()`` returns (a Process, or a list of them started already);
    False, with the reason in ``why[name]``, when it is not installed or fails."""
    if program is not None and not anchors.available(program):
        why[name] = f"{program} is not installed"
        return False
    try:
        proc = make()
        if isinstance(proc, cluster.Process):
            group.start(proc)
    except (RuntimeError, OSError) as exc:
        why[name] = "failed to start: " + " ".join(str(exc).split())[:300]
        return False
    return True


HTTP_SERVER = "python http.server (anchor)"


def http_targets(group: cluster.ProcessGroup, workdir: str, why: dict[str, str],
                 with_http_server: bool = True) -> dict[str, str | None]:
    ports = cluster.free_ports(10)
    backends = ports[2:6]

    def url(port: int) -> str:
        return f"http://127.0.0.1:{port}/{PAGE}"

    def ours(script: str, port: int) -> cluster.Process:
        return cluster.Process(script, cluster.python_script(script, "--port", str(port), *_quiet(workdir)), port=port)

    lb = "lb.py over 4 backends (44444)"
    haproxy = "HAProxy http over 4 backends (anchor)"
    todo = [("async (45000)", ports[0], lambda: ours("http_servers/Server_async_http.py", ports[0]), None),
            ("threaded (46000)", ports[1], lambda: ours("http_servers/Server_thread_http.py", ports[1]), None),
            (lb, ports[6], lambda: lb_process(ports[6], backends, workdir), None),
            ("nginx (anchor)", ports[7], lambda: anchors.nginx(ports[7], str(WWW), workdir), "nginx"),
            (haproxy, ports[8], lambda: anchors.haproxy(ports[8], [("127.0.0.1", p) for p in backends], workdir,
                                                        mode="http"), "haproxy"),
            (HTTP_SERVER, ports[9], lambda: cluster.Process("http.server", [
                sys.executable, "-m", "http.server", str(ports[9]), "--bind", "127.0.0.1", "--directory", str(WWW)],
                port=ports[9]), None)]
    if not with_http_server:
        todo.pop()
        why[HTTP_SERVER] = "left out of a quick run"
    have_backends = started(group, lambda: http_backends(group, backends, workdir), "the four backends", why)
    urls: dict[str, str | None] = {}
    for name, port, make, program in todo:
        if name in (lb, haproxy) and not have_backends:
            why[name] = "its backends " + why["the four backends"]
            urls[name] = None
            continue
        urls[name] = url(port) if started(group, make, name, why, program) else None
    if not with_http_server:
        urls[HTTP_SERVER] = None
    why.pop("the four backends", None)
    return urls


def tcp_targets(group: cluster.ProcessGroup, workdir: str, why: dict[str, str]) -> dict[str, int | None]:
    ports = cluster.free_ports(6)
    names = ["server1 direct", "Load_Balancer.py --mode message", "Load_Balancer.py --mode tcp",
             "HAProxy tcp (anchor)"]
    if not started(group, lambda: [group.start(cluster.echo_server(
            f"server{i + 1}", ports[i], "--log-level", "warning", log_dir=workdir)) for i in range(3)],
            "servers", why):
        reason = "its servers " + why.pop("servers")
        why.update({name: reason for name in names})
        return {name: None for name in names}
    backends = [f"server{i + 1}=127.0.0.1:{ports[i]}" for i in range(3)]
    out: dict[str, int | None] = {"server1 direct": ports[0]}
    for mode, port in (("message", ports[3]), ("tcp", ports[4])):
        name = f"Load_Balancer.py --mode {mode}"
        out[name] = port if started(group, lambda port=port, mode=mode: balancer_process(
            port, backends, "--mode", mode, "--log-level", "warning", log_dir=workdir), name, why) else None
    out["HAProxy tcp (anchor)"] = ports[5] if started(
        group, lambda: anchors.haproxy(ports[5], [("127.0.0.1", p) for p in ports[:3]], workdir),
        "HAProxy tcp (anchor)", why, "haproxy") else None
    return out
