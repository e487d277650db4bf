"""Socket helpers. Kernel timeouts for blocking sockets, shared by the threaded
server and the stress tool's thread engine.

``socket.settimeout()`` is implemented in Python with a ``poll()`` before
every ``recv`` and ``send``: two system calls, and two GIL hand-offs, where
one would do. A socket left in blocking mode with ``SO_RCVTIMEO`` and
``SO_SNDTIMEO`` gets the same deadline from the kernel: a ``recv`` or
``send`` that waits longer fails with EAGAIN, which Python raises as
``BlockingIOError``.

``local_shortage(exc)`` tells the balancers that a failed connect was their
own lack of descriptors or memory, which says nothing about the backend.

Every socket this project connects goes through ``outgoing`` (directly, or
through ``create_connection`` and ``open_socket``), which sets
``SO_REUSEADDR`` on it. Why: the side that closes a TCP connection first
keeps it in TIME_WAIT for a minute, and with it the connection's local port,
drawn from Linux's ephemeral range (32768-60999). A server that binds that
port meanwhile fails with EADDRINUSE, its own ``SO_REUSEADDR`` or not,
unless the closed socket had the option too. The HTTP set-up's fixed ports
(44444, 45000, 46000) lie in that range: after a five-second stress run
through the balancer (some 40,000 connections, closed by the tool) all three
were taken for a minute, and ``python -m clusterkit.http up`` could not start.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
import sys
from typing import TypeVar

import _socket

AnySocket = TypeVar("AnySocket", socket.socket, _socket.socket)


def kernel_timeouts(sock: socket.socket, recv: float, send: float | None = None) -> None:
    """Set the receive (and, if given, send) timeout of a blocking socket, in seconds."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(recv))
    if send is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send))


def outgoing(sock: AnySocket) -> AnySocket:
    """``sock``, a socket about to connect, with ``SO_REUSEADDR``: once closed,
    its TIME_WAIT keeps no server from binding its local port (see above)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def connect_any(addresses: list[tuple], timeout: float | None) -> socket.socket:
    """A blocking socket connected to the first of ``addresses`` (getaddrinfo's
    entries) that answers, each connect bounded by ``timeout``: the last
    failure is raised when none does."""
    error: OSError = OSError(errno.EADDRNOTAVAIL, "no address to connect to")
    for family, kind, proto, _, address in addresses:
        sock = outgoing(socket.socket(family, kind, proto))
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def create_connection(host: str, port: int, timeout: float | None) -> socket.socket:
    """``socket.create_connection((host, port), timeout)`` on an ``outgoing`` socket."""
    return connect_any(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)


async def open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A non-blocking ``outgoing`` socket connected to ``host:port`` (an address
    looked up unless it is one already), with ``TCP_NODELAY``, for
    ``create_connection(sock=...)`` and ``open_connection(sock=...)``. Cancelled
    or failed, it closes what it opened."""
    try:
        ip = ipaddress.ip_address(unbracket(host))
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        addresses = [(family, socket.SOCK_STREAM, 0, "", (unbracket(host), port))]
    except ValueError:
        addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(errno.EADDRNOTAVAIL, f"no address for {host!r}")
    for family, kind, proto, _, address in addresses:
        sock = outgoing(socket.socket(family, kind, proto))
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error


def _timeval(seconds: float) -> bytes:
    seconds = max(seconds, 0.001)  # 0 would mean "wait forever"
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))


_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})


def local_shortage(exc: BaseException) -> bool:
    """A connect that failed for want of descriptors, memory or a local port here:
    the balancer's own limit, not the backend's fault, so no reason to mark it down."""
    return getattr(exc, "errno", None) in _SHORTAGES


def unbracket(host: str) -> str:
    """An IPv6 address as URLs write it (``[::1]``), which the resolver does not
    know, without its brackets; anything else as it is."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL or ``--backend`` writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_all(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Blocking listening sockets (``SO_REUSEADDR``) on every address ``host``
    resolves to (``localhost``: 127.0.0.1 and ``::1``), on one port, as asyncio's
    ``create_server`` listens; an IPv6 socket takes IPv6 only. The balancer's and
    the HTTP servers' listeners (``epollset.Listener``) and the threaded server
    (which listened on the first address alone) take theirs here.

    An address of a family this machine has turned off (``::1`` where IPv6 is
    disabled, as in Docker's default network, while ``/etc/hosts`` still names it
    ``localhost``) is passed over, as asyncio passes it over (bpo-30945), so long
    as another address listens; with none, the first failure is raised."""
    socks: list[socket.socket] = []
    off: OSError | None = None
    try:
        for family, sockaddr in _addresses(host, port):
            # (port 0: the kernel's choice for the first, then the same for the others)
            address = (sockaddr[0], socks[0].getsockname()[1] if socks else port, *sockaddr[2:])
            try:
                socks.append(socket.create_server(address, family=family, backlog=backlog, reuse_port=False))
            except OSError as exc:
                if exc.errno not in FAMILY_OFF:
                    raise
                off = off or exc
    except OSError:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise off or OSError(errno.EADDRNOTAVAIL, f"{host} has no address to listen on")
    return socks


def listen_hosts(host: str) -> str | list[str]:
    """``host`` for ``loop.create_server``, which (on uvloop) fails on an address it
    cannot bind: when one of its addresses is of a family turned off here
    (``localhost`` with IPv6 off: see ``listen_all``), the others, found by
    binding each to port 0 once; else ``host`` itself, as given (scope id and all)."""
    try:
        found = _addresses(host, 0)
    except OSError:
        return host  # (the server says why, as it would have)
    usable = []
    for family, sockaddr in found:
        try:
            socket.create_server(sockaddr, family=family).close()
        except OSError as exc:
            if exc.errno in FAMILY_OFF:
                continue
        usable.append(sockaddr)
    if len(usable) in (0, len(found)):
        return host
    return [socket.getnameinfo(sockaddr, socket.NI_NUMERICHOST)[0] for sockaddr in usable]


FAMILY_OFF = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
"""A listen that failed because the address's family is off here, not taken or refused."""


def _addresses(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) of each address ``host`` listens on, once each, in order."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys((f[0], f[4]) for f in found))


def peer_name(peer: tuple | None) -> str:
    """A connection's peer (``getpeername()``) for a log line: ``host:port``, an
    IPv6 address in brackets (``[::1]:45740``, as ``backends=`` writes it), or ``-``."""
    return host_port(peer[0], peer[1]) if peer else "-"


def is_listener(listening: list[tuple], family: int, sockaddr: tuple) -> bool:
    """Whether a backend at ``sockaddr`` is one of our own listening sockets
    (``listening``: their ``getsockname()``): a balancer given its own address as
    a backend would connect to itself in a loop, a connection more on every lap.
    A wildcard listener (``0.0.0.0``, ``::``) is every address of this machine of
    its family: an address is one when a socket can be bound to it. An IPv4
    address written as IPv6 (``::ffff:127.0.0.1``) is taken as the IPv4 one it
    reaches (an IPv6-only listener on ``::`` is not there)."""
    mapped = ipaddress.ip_address(sockaddr[0].partition("%")[0])
    if family == socket.AF_INET6 and mapped.ipv4_mapped is not None:  # type: ignore[union-attr]
        family, mapped = socket.AF_INET, mapped.ipv4_mapped  # type: ignore[union-attr]
        sockaddr = (str(mapped), sockaddr[1])
    if mapped.is_unspecified:  # (a connect to 0.0.0.0 or :: reaches this machine: its loopback)
        sockaddr = ("127.0.0.1" if family == socket.AF_INET else "::1", *sockaddr[1:])
    for here in listening:
        if here[1] != sockaddr[1] or (len(here) == 4) != (family == socket.AF_INET6):
            continue
        if here[0] not in ("0.0.0.0", "::"):
            if ipaddress.ip_address(here[0].partition("%")[0]) == ipaddress.ip_address(sockaddr[0].partition("%")[0]):
                return True
            continue
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((sockaddr[0], 0, *sockaddr[2:]))
            return True
        except OSError:  # (EADDRNOTAVAIL: another machine's)
            continue
    return False


FD_RESERVE = 32
"""Descriptors a program keeps for itself (its log, listeners, checks) when it
sizes its connection limit to the open-files limit."""


LINGER_SHARE = 8
"""One part in this of the room goes to the lingering closes of clients turned away
(each keeps its descriptor a while); past it, they are closed at once."""


def descriptor_room() -> int | None:
    """Descriptors the open-files limit leaves for connections once FD_RESERVE are
    kept; None when there is no limit (or it cannot be read)."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError):
        return None
    return None if soft == resource.RLIM_INFINITY else max(0, soft - FD_RESERVE)


def client_room(max_clients: int, per_client: int = 1, kept: int = 0) -> int:
    """``max_clients``, lowered to what the open-files limit holds: ``per_client``
    descriptors a client, once ``kept`` (an idle pool's) and the lingering closes'
    share are set aside. Past it a server turns clients away (ERR busy, 503) rather
    than run out: then the event loop closed new connections unseen (uvloop) or
    logged a traceback per accept (asyncio), and clients met a bare close."""
    room = descriptor_room()
    if room is None:
        return max_clients
    return max(1, min(max_clients, (room - room // LINGER_SHARE - kept) // per_client))


def linger_room() -> int:
    """Lingering closes at once of clients turned away (``LINGER_SHARE``)."""
    room = descriptor_room()
    return sys.maxsize if room is None else max(1, room // LINGER_SHARE)
