"""Raw sockets on the event loop: one epoll set, which the loop watches as a
single descriptor (``add_reader`` on the epoll descriptor), the way HAProxy
and nginx drive their sockets.

Why the balancer has it: its backend connections (both modes) and its whole
byte relay (``--mode tcp``) cost less here than as asyncio transports. A
transport needs a connect task and future, a protocol object and, in uvloop,
``getsockname``/``getpeername`` on every socket and an epoll change whenever
reading pauses; per connection that came to about 20 us of CPU, next to
HAProxy's 10 (with one connection per message behind three echo servers). A
raw socket here costs ``socket``, ``connect``, one ``epoll_ctl`` and a state
change.

Sockets are registered once, edge-triggered, for reading and writing
(``WATCH``), and never modified: their owners read until a read comes back
shorter than the buffer (a later arrival brings a new edge), or until EOF
when the event carries ``EPOLLRDHUP``. Closing a socket takes it out of the
set.
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
from collections.abc import Callable

import _socket

from ..config import ConfigError
from .pool import Backend

IN, OUT, RDHUP, ERR, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP, select.EPOLLERR, select.EPOLLHUP
WATCH = IN | OUT | RDHUP | select.EPOLLET
HANGUP = RDHUP | ERR | HUP
"""Event bits that mean: read on to the end (EOF or the error)."""
BUF = 65536


class EpollSet:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.gone: set[int] = set()  # descriptors closed during this batch of events
        loop.add_reader(self.ep.fileno(), self._ready)

    def watch(self, sock: socket.socket | _socket.socket, handler: Callable[[int], None],
              events: int = WATCH) -> None:
        fd = sock.fileno()
        self.handlers[fd] = handler
        self.ep.register(fd, events)

    def unwatch(self, sock: socket.socket | _socket.socket) -> None:
        """Stop reporting the socket's events (it stays open)."""
        self.ep.unregister(sock.fileno())

    def drop(self, sock: socket.socket | _socket.socket) -> None:
        """Close the socket; no event of it is handled from now on."""
        fd = sock.fileno()
        if self.handlers.pop(fd, None) is not None:
            self.gone.add(fd)
        sock.close()  # also takes it out of the epoll set

    def _ready(self) -> None:
        handlers, gone = self.handlers, self.gone
        gone.clear()  # (closes between batches, by the sweeps, have no events in this one)
        for fd, ev in self.ep.poll(0, 64):
            if fd in gone:  # closed by an earlier event of this batch, its number maybe reused since
                continue
            handler = handlers.get(fd)
            if handler is not None:
                handler(ev)


def resolve(backend: Backend) -> tuple[int, tuple]:
    """The backend's address, looked up once, at start (as HAProxy does without a
    resolvers section). A name with both kinds of address gets its IPv4 one:
    ``localhost`` may list ``::1`` first, and the servers listen on 127.0.0.1."""
    try:
        found = socket.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"backend {backend.name}: cannot resolve {backend.host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = min(found, key=lambda a: a[0] != socket.AF_INET)
    return family, sockaddr


def start_connect(address: tuple[int, tuple]) -> tuple[_socket.socket | None, int]:
    """A non-blocking connect begun: the socket (None on failure) and the errno
    (0 or EINPROGRESS when under way). Raises OSError when no socket can be made."""
    family, sockaddr = address
    sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    code = sock.connect_ex(sockaddr)
    if code and code != errno.EINPROGRESS:
        sock.close()
        return None, code
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, code


def os_error(code: int) -> OSError:
    """The exception for an errno (``ECONNREFUSED`` makes a ConnectionRefusedError)."""
    return OSError(code, errno.errorcode.get(code, "error")) if code else ConnectionResetError(errno.ECONNRESET,
                                                                                               "reset")


def connect_result(sock: _socket.socket) -> OSError:
    """Why a connect failed, once epoll reported ERR or HUP for it."""
    return os_error(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
