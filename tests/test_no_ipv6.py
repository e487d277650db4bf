"""A machine with IPv6 turned off whose /etc/hosts still names ``::1``
``localhost`` (Docker's default network, Debian's hosts file): every server
given ``--host localhost`` listens on 127.0.0.1 and passes ``::1`` over, as
asyncio's ``create_server`` does. Each of them failed to start there ("no such
local address"): ``::1`` cannot be bound where IPv6 is off.

The test runs in a network, mount and PID namespace of its own (its processes
all die with it), with its own hosts file bind-mounted on /etc/hosts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from clusterkit import cluster

pytestmark = pytest.mark.timeout(120)

IN_NAMESPACE = """
import json, socket, subprocess, sys, urllib.request
from clusterkit import cluster
log_dir = sys.argv[1]
found = {}
with cluster.ProcessGroup() as group:
    for i in (1, 2, 3):
        group.start(cluster.echo_server(f"server{i}", 7000 + i, log_dir=log_dir, host="localhost"))
    group.start(cluster.Process("balancer", cluster.python_script(
        "Load_Balancer.py", "--host", "localhost", "--log-dir", log_dir), port=7000))
    for name, port, script in (("async", 45000, "http_servers/Server_async_http.py"),
                               ("threaded", 46000, "http_servers/Server_thread_http.py"),
                               ("lb", 44444, "http_servers/lb.py")):
        group.start(cluster.Process(name, cluster.python_script(script, "--host", "localhost", "--log-dir", log_dir),
                                    port=port))
    group.start(cluster.Process("backend", cluster.python_script(
        "http_servers/async_server.py", "9002", "--host", "localhost", "--log-dir", log_dir), port=9002))
    client = subprocess.run(cluster.python_script("client.py", "hello", "--host", "localhost", "--log-dir", log_dir),
                            capture_output=True, text=True, timeout=30)
    found["client"] = [client.returncode, client.stdout + client.stderr]
    with urllib.request.urlopen("http://127.0.0.1:7100/stats", timeout=10) as answer:
        found["stats"] = json.load(answer)["messages"]
    for port in (45000, 46000, 44444):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/page.html", timeout=10) as answer:
            found[port] = answer.status
print(json.dumps(found))
"""


def test_every_server_listens_on_localhost_where_ipv6_is_off(log_dir, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "-n", "true"],
                                                         capture_output=True).returncode:
        pytest.skip("needs unshare -m -n (root) for a network and mount namespace of its own")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
    setup = ('mount --bind "$0" /etc/hosts && ip link set lo up && sysctl -q -w net.ipv6.conf.lo.disable_ipv6=1 '
             '&& exec "$1" -c "$2" "$3"')
    proc = subprocess.run(["unshare", "-m", "-n", "-p", "--fork", "--kill-child", "sh", "-c", setup, str(hosts),
                           sys.executable, IN_NAMESPACE, str(log_dir)],
                          cwd=cluster.ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["client"][0] == 0 and re.search(r"REPLY server[123] hello", found["client"][1]), found["client"]
    assert found["stats"] == 1
    assert found["45000"] == found["46000"] == found["44444"] == 200


IN_NAMESPACE_SCOPED = """
import json, socket, subprocess, sys
from clusterkit import cluster
log_dir, host = sys.argv[1], "fe80::1%lo"
with cluster.ProcessGroup() as group:
    group.start(cluster.echo_server("server1", 7001, log_dir=log_dir, host=host))
    group.start(cluster.Process("balancer", cluster.python_script(
        "Load_Balancer.py", "--host", host, "--backend", "[fe80::1%lo]:7001", "--log-dir", log_dir),
        port=7000, host=host))
    socket.create_connection((host, 7100), timeout=10).close()  # its admin port too
    group.start(cluster.Process("async", cluster.python_script(
        "http_servers/Server_async_http.py", "--host", host, "--port", "45000", "--log-dir", log_dir),
        port=45000, host=host))
    out = log_dir + "/zone.json"
    stress = subprocess.run(cluster.python_script(
        "ClientServer_StressTools.py", "--http", "http://[fe80::1%25lo]:45000/page.html", "-n", "20", "-c", "2",
        "--quiet", "--log-dir", log_dir, "--json", out), capture_output=True, text=True, timeout=60)
    row = json.load(open(out))["runs"][0]
    assert stress.returncode == 0 and (row["complete"], row["failed"]) == (20, 0), (stress.stderr, row["errors"])
print("ok")
"""


def test_a_link_local_address_with_its_scope_id_still_listens(log_dir):
    """Leaving out the addresses whose family is off must not lose a scope id:
    ``--host fe80::1%lo`` was bound as ``fe80::1`` (EINVAL) by the first version.
    The stress tool takes such an address in a URL as RFC 6874 writes it
    (``[fe80::1%25lo]``): it could not connect, and sent the zone id in Host (a 400)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -n (root) for a network namespace of its own")
    setup = 'ip link set lo up && ip addr add fe80::1/64 dev lo nodad && exec "$0" -c "$1" "$2"'
    proc = subprocess.run(["unshare", "-n", "-p", "--fork", "--kill-child", "sh", "-c", setup, sys.executable,
                           IN_NAMESPACE_SCOPED, str(log_dir)],
                          cwd=cluster.ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
