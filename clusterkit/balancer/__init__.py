"""The TCP load balancer (Load_Balancer.py): pool and health, relays, admin.

``balancer_process()`` starts one as a child process, for the demo, the
stress tool's ``--spawn``, the tests and the benchmarks.
"""

from __future__ import annotations

from .. import cluster


def balancer_process(port: int, backends: list[str], *args: str, admin_port: int = 0,
                     log_dir: str | None = None, host: str = "127.0.0.1") -> cluster.Process:
    argv = ["--host", host, "--port", str(port), "--admin-port", str(admin_port)]
    for b in backends:
        argv += ["--backend", b]
    if log_dir:
        argv += ["--log-dir", log_dir]
    return cluster.Process("balancer", cluster.python_script("Load_Balancer.py", *argv, *args),
                           port=port, host=host)
