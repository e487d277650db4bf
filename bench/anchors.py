"""Reference programs the benchmarks compare against, started as child processes.

HAProxy (Debian's 2.6, ``nbthread 1``) in TCP or HTTP mode and nginx (one
worker, access log off) get a config written into a temporary folder and run
in the foreground, so ``cluster.Process`` stops them by PID like everything
else. ``available(name)`` says whether the program is installed; benchmarks
skip an anchor that is not, and say so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from clusterkit import cluster


def available(program: str) -> bool:
    return shutil.which(program) is not None or Path(f"/usr/sbin/{program}").exists()


def _exe(program: str) -> str:
    return shutil.which(program) or f"/usr/sbin/{program}"


def haproxy(port: int, backends: list[tuple[str, int]], workdir: str, mode: str = "tcp",
            check: bool = False) -> cluster.Process:
    servers = "\n".join(f"  server s{i} {h}:{p}{' check inter 1s' if check else ''}"
                        for i, (h, p) in enumerate(backends, 1))
    extra = "  option http-keep-alive\n" if mode == "http" else ""
    cfg = f"""global
  nbthread 1
  maxconn 8000
defaults
  mode {mode}
  timeout connect 1s
  timeout client 30s
  timeout server 30s
{extra}frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  balance roundrobin
  retries 3
  option redispatch
{servers}
"""
    path = Path(workdir) / f"haproxy-{mode}-{port}.cfg"
    path.write_text(cfg)
    return cluster.Process(f"haproxy-{mode}", [_exe("haproxy"), "-db", "-f", str(path)], port=port)


def nginx(port: int, root: str, workdir: str, tuned: bool = False) -> cluster.Process:
    tuning = ("  open_file_cache max=100 inactive=60s;\n  sendfile off;\n" if tuned else "  sendfile on;\n")
    cfg = f"""worker_processes 1;
daemon off;
pid {workdir}/nginx-{port}.pid;
error_log {workdir}/nginx-{port}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  include /etc/nginx/mime.types;
{tuning}  keepalive_requests 1000000;
  client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fcgi; uwsgi_temp_path {workdir}/uwsgi; scgi_temp_path {workdir}/scgi;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""
    path = Path(workdir) / f"nginx-{port}.conf"
    path.write_text(cfg)
    return cluster.Process("nginx" + ("-tuned" if tuned else ""), [_exe("nginx"), "-c", str(path), "-p", workdir],
                           port=port)
