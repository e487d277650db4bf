"""What the balancer's tests share: the cluster of three echo servers behind a
balancer (``Cluster``), one message or a pipelined batch through it, and the
odd backends that answer wrongly."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.request

import pytest

from clusterkit import cluster
from clusterkit.balancer import balancer_process
from clusterkit.protocol import ResponseParser


FAST_CHECKS = ("--check-interval", "0.2", "--check-timeout", "0.5", "--rise", "2", "--fall", "2",
               "--response-timeout", "0.5", "--connect-timeout", "0.5")


class Cluster:
    """Echo servers and a balancer in front of them (``start``), and its admin view."""

    def __init__(self, procs, log_dir):
        self.procs = procs
        self.log_dir = str(log_dir)
        self.servers: dict[str, cluster.Process] = {}
        self.lb: cluster.Process | None = None
        self.admin_port = 0

    def start(self, *lb_args: str, names=("server1", "server2", "server3"), weights=None, server_args=()):
        ports = cluster.free_ports(len(names) + 2)
        for i, name in enumerate(names):
            self.servers[name] = self.procs.start(cluster.echo_server(name, ports[i], *server_args,
                                                                      log_dir=self.log_dir))
        backends = [f"{name}=127.0.0.1:{self.servers[name].port}" + (f":{weights[i]}" if weights else "")
                    for i, name in enumerate(names)]
        self.admin_port = ports[-1]
        self.lb = self.procs.start(balancer_process(ports[-2], backends, *FAST_CHECKS, *lb_args,
                                                    admin_port=self.admin_port, log_dir=self.log_dir))
        return self

    @property
    def port(self) -> int:
        return self.lb.port

    def restart(self, name: str) -> None:
        old = self.servers[name]
        old.stop()
        self.servers[name] = self.procs.start(cluster.echo_server(name, old.port, log_dir=self.log_dir))

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats", timeout=10) as r:
            return json.load(r)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def state(self, name: str) -> str:
        return next(b["state"] for b in self.stats()["backends"] if b["name"] == name)

    def wait_state(self, name: str, states: tuple[str, ...], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.state(name) not in states:
            assert time.monotonic() < deadline, f"{name} never became {states}"
            time.sleep(0.05)


def one_message(port: int, text: bytes = b"hi", timeout: float = 10, delay: float = 0) -> bytes:
    """``delay``: sent that long after the connect (a slow client, or one descheduled):
    the balancer may have answered and closed before it comes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        time.sleep(delay)
        s.sendall(text + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def server_of(reply: bytes) -> str:
    return reply.split(b" ")[1].decode()


def pipeline(port: int, messages: list[bytes], during=None, timeout: float = 60, read_after: float = 0,
             rcvbuf: int = 0) -> list:
    """Send all messages on one connection, run ``during(responses_so_far)`` after the
    first thousand responses, and read every response (starting ``read_after``
    seconds late, so that the answers back up; ``rcvbuf`` keeps more of them
    waiting in the balancer and the backend rather than in this socket)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sender = threading.Thread(target=lambda: (s.sendall(b"".join(m + b"\n" for m in messages)),
                                              s.shutdown(socket.SHUT_WR)))
    sender.start()
    time.sleep(read_after)
    parser = ResponseParser()
    responses = []
    fired = during is None
    while len(responses) < len(messages):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        responses += parser.feed(chunk)
        if not fired and len(responses) >= 1000:
            during(responses)
            fired = True
    sender.join()
    s.close()
    return responses


def taken_in(port: int) -> socket.socket:
    """A connection the server (or balancer) has counted: it answers it. One still counted
    as open (the start's probe, the balancer's last) can make it say busy: ask again."""
    deadline = time.monotonic() + 10
    while True:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"fill\n")
        data = b""
        while data.count(b"\n") < 2 and (chunk := s.recv(200)):
            data += chunk
        if data.startswith(b"REPLY "):
            return s
        s.close()
        assert data == b"ERR busy\n" and time.monotonic() < deadline, data
        time.sleep(0.05)


def cluster_with_few_files(procs, log_dir, nofile: int, *args: str, admin_port: int = 0) -> cluster.Process:
    """Three servers and a balancer whose open-files limit is ``nofile`` (prlimit)."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    ports = cluster.free_ports(4)
    backends = []
    for i in range(3):
        procs.start(cluster.echo_server(f"server{i + 1}", ports[i], log_dir=str(log_dir)))
        backends.append(f"server{i + 1}=127.0.0.1:{ports[i]}")
    proc = balancer_process(ports[3], backends, *args, admin_port=admin_port, log_dir=str(log_dir))
    proc.argv = ["prlimit", f"--nofile={nofile}:{nofile}", *proc.argv]
    return procs.start(proc)
