"""How busy the server under test was, when it runs on this machine (Linux):
the processes listening on the target's port, found in ``/proc``, and the CPU
they used over the measured part of the run.

Why the report has it: a load generator slower than the server measures
itself. Two servers it cannot saturate both get about its own top rate, and
which one looks faster is noise: here a C echo server and a Python one both
came out at 80-100k requests/s from the Python engines, in either order,
while a C generator drove them at 160k and 105-125k. A server that used well
under a core had room left, so its rate is only a lower bound: the report
says so (``rate_is_lower_bound``) instead of letting it rank servers. (Its CPU
per request is no yardstick either: a server woken for every request spends
more per request than a busy one, so here the C server and the Python one
both came to about 8-9 us.)

What it does not see: a server elsewhere (the figures are then None).
"""

from __future__ import annotations

import ipaddress
import os
import socket

LISTEN = "0A"
"""The TCP state LISTEN in /proc/net/tcp."""


def local_addresses(host: str) -> set:
    """The loopback addresses ``host`` names (any name: ``localhost``,
    ``ip6-localhost``); empty for a server elsewhere or a name that does not resolve."""
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    addresses = {ipaddress.ip_address(f[4][0].partition("%")[0]) for f in found}
    return {a for a in addresses if a.is_loopback}


def proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: hex, each 32-bit word in the
    machine's byte order (little-endian here, as the kernel's x86 and arm do)."""
    raw = bytes.fromhex(text)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def listening_inodes(port: int, addresses: set) -> set[str]:
    """Socket inodes listening on ``port`` (IPv4 and IPv6) at one of ``addresses``
    or at every address (``0.0.0.0``, ``::``). Another program listening on the
    same port at another address is not the server: its CPU was counted too."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] != LISTEN:
                        continue
                    address, _, hex_port = fields[1].partition(":")
                    if int(hex_port, 16) != port:
                        continue
                    ip = proc_address(address)
                    if ip in addresses or ip.is_unspecified:
                        found.add(fields[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return found


def listening_pids(host: str, port: int) -> list[int]:
    """Every process holding a socket that listens on ``host:port`` (nginx's master
    and workers share one); empty when none is found, the host is not this
    machine, or /proc is not readable."""
    addresses = local_addresses(host)
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port, addresses)} if addresses else set()
    if not wanted:
        return []
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in wanted for fd in fds):
                pids.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return pids


def cpu_seconds(pids: list[int]) -> float | None:
    """User and system CPU the processes have used (all their threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None
    return total / tick


class ServerCpu:
    """``start()`` when the measured part of the run begins, ``stop()`` at its end:
    then ``seconds`` is the CPU the server used in between (None if unknown)."""

    def __init__(self, host: str, port: int) -> None:
        self.pids = listening_pids(host, port)
        self.before: float | None = None
        self.seconds: float | None = None

    def start(self) -> None:
        if self.pids:
            self.before = cpu_seconds(self.pids)

    def stop(self) -> None:
        if self.before is not None:
            after = cpu_seconds(self.pids)
            self.seconds = None if after is None else after - self.before
