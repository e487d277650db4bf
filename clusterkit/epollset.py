"""Raw sockets on the event loop: one epoll set, which the loop watches as a
single descriptor (``add_reader`` on the epoll descriptor), the way HAProxy
and nginx drive their sockets.

Why the balancer and the async HTTP server have it: their connections cost
less here than as asyncio transports. A transport needs a protocol object
and, in uvloop, ``getsockname``/``getpeername`` on every socket and an epoll
change whenever reading pauses; a backend connection also a
``create_connection`` task and its futures. With one connection per message
behind three echo servers, the balancer's own (user) CPU per connection came
to 45-56 us on transports and 22-26 us here in ``--mode tcp``; HAProxy's is
7-11 us. A raw socket here costs ``socket``, ``connect``, one ``epoll_ctl``
and a state change. The async HTTP server keeps its ``asyncio.Protocol`` and
runs it on a ``SocketTransport``: with ``ab -n 20000 -c 10`` (a connection
per request) its CPU per request went from 60 to 48 us, nginx's is 38-40.

What is here: ``EpollSet`` (the set and its dispatch), ``Listener`` (accepts),
``Stream`` (a connected socket with a write buffer and water marks),
``SocketTransport`` (a Stream that drives an ``asyncio.Protocol``),
``linger_close`` (the end of a connection that was refused or cut short),
``create_server`` (the HTTP servers' listener: a protocol per connection on a
SocketTransport), and the backend helpers (``resolve``, ``start_connect``).

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
from typing import TYPE_CHECKING

import _socket

from . import loops
from .config import ConfigError
from .linger import LINGER_BYTES, LINGER_SECONDS
from .sockets import linger_room, listen_all, local_shortage, outgoing

if TYPE_CHECKING:
    from .balancer.pool import Backend

IN, OUT, RDHUP, ERR, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP, select.EPOLLERR, select.EPOLLHUP
WATCH = IN | OUT | RDHUP | select.EPOLLET
HANGUP = RDHUP | ERR | HUP
"""Event bits that mean: read on to the end (EOF or the error)."""
BUF = 65536
HIGH_WATER = 64 * 1024
"""A Stream's default write-buffer high-water mark (resumed at a quarter), as asyncio's."""
ACCEPT_BATCH = 64
"""Connections accepted per readiness event; more wait for the next turn of the loop."""
ACCEPT_PAUSE = 0.1
"""Seconds the listener rests when no descriptor is left to accept with."""


class EpollSet:
    """The sockets' handlers by descriptor; ``_ready`` runs when the loop sees
    the epoll descriptor readable, and calls each ready socket's handler with
    its event bits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.gone: set[int] = set()  # descriptors closed during this batch of events
        self.lingering: set[_socket.socket] = set()  # in linger_close: a graceful stop waits for them
        self.max_lingering = linger_room()
        """Lingering closes at once; past it a refused client's socket is closed at once (a flood
        of them held the descriptors the backends' connections needed: connect-emfile)."""
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
                try:
                    handler(ev)
                except Exception as exc:  # a bug in one connection's handler: the batch's other events go on
                    self.loop.call_exception_handler({"message": "epoll event handler failed", "exception": exc})


def resolve(backend: Backend) -> list[tuple[int, tuple]]:
    """The backend's addresses, looked up once, at start (as HAProxy does without a
    resolvers section), its IPv4 ones first: ``localhost`` may list ``::1`` first,
    and the servers listen on 127.0.0.1 by default. The traffic goes to the first;
    the health checks move it to another that answers when it is refused there
    (``health.check_once``): a server listening on ``::1`` alone is found."""
    return sorted(lookup(backend.name, backend.host, backend.port), key=lambda a: a[0] != socket.AF_INET)


def lookup(name: str, host: str, port: int) -> list[tuple[int, tuple]]:
    """Every (family, sockaddr) of backend ``name`` at ``host``; a name that does
    not resolve is a ConfigError (nginx and HAProxy refuse to start too)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"backend {name}: cannot resolve {host!r}: {exc.strerror}") from None
    return [(family, sockaddr) for family, _, _, _, sockaddr in found]


def start_connect(address: tuple[int, tuple]) -> tuple[_socket.socket | None, int]:
    """A non-blocking connect begun: the socket (None on failure) and the errno
    (0 or EINPROGRESS when under way). Raises OSError when no socket can be made."""
    family, sockaddr = address
    sock = outgoing(_socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK))
    code = sock.connect_ex(sockaddr)
    if code and code != errno.EINPROGRESS:
        sock.close()
        return None, code
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, code


def os_error(code: int) -> OSError:
    """The exception for an errno (``ECONNREFUSED`` makes a ConnectionRefusedError)."""
    if not code:
        return ConnectionResetError(errno.ECONNRESET, "reset")
    return OSError(code, errno.errorcode.get(code, "error"))


def connect_result(sock: _socket.socket) -> OSError:
    """Why a connect failed, once epoll reported ERR or HUP for it."""
    return os_error(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))


class Listener:
    """A listening socket in the epoll set, level-triggered: up to ``ACCEPT_BATCH``
    connections a turn of the loop, each handed to ``on_accept(sock, peer)`` as
    a non-blocking socket with ``TCP_NODELAY``. Out of descriptors, it rests
    ``ACCEPT_PAUSE`` seconds rather than spin on a queue it cannot empty.
    ``sockets`` and ``close`` as on asyncio's Server."""

    def __init__(self, events: EpollSet, on_accept: Callable[[_socket.socket, tuple], None]) -> None:
        self.events = events
        self.on_accept = on_accept
        self.sockets: list[socket.socket] = []  # empty once closed

    def listen(self, host: str, port: int, backlog: int) -> Listener:
        """Listen on every address ``host`` resolves to (``localhost``: 127.0.0.1
        and ::1), as asyncio's ``create_server``; an IPv6 socket takes IPv6 only."""
        self.sockets = listen_all(host, port, backlog)
        for sock in self.sockets:
            sock.setblocking(False)
            self._watch(sock)
        return self

    def close(self) -> None:
        """Stop accepting (the connections go on)."""
        for sock in self.sockets:
            self.events.drop(sock)
        self.sockets = []

    def _watch(self, sock: socket.socket) -> None:
        family = sock.family  # (looked up once: the property makes an enum on every call)
        self.events.watch(sock, lambda ev: self._accept(sock, family), IN)

    def _accept(self, listener: socket.socket, family: int) -> None:
        accept = listener._accept  # type: ignore[attr-defined]  # the descriptor alone: no socket.socket
        on_accept = self.on_accept
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if local_shortage(exc):
                    self.events.unwatch(listener)
                    self.events.loop.call_later(ACCEPT_PAUSE, self._resume, listener)
                return
            # Type and protocol given: with a descriptor alone, the socket object
            # asks the kernel for them (two getsockopt calls per connection).
            sock = _socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers go out as they come
            on_accept(sock, peer)

    def _resume(self, listener: socket.socket) -> None:
        if listener in self.sockets:
            self._watch(listener)


async def create_server(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], host: str,
                        port: int, backlog: int) -> Listener | asyncio.AbstractServer:
    """``loop.create_server`` for the HTTP servers: each connection's protocol
    (``factory()``) on a SocketTransport that closes at once after a complete
    answer; on a system without epoll, on the loop's own transports."""
    if not hasattr(select, "epoll"):
        return await loops.create_server(loop, factory, host, port, backlog=backlog, reuse_address=True)
    events = EpollSet(loop)

    def accepted(sock: _socket.socket, peer: tuple) -> None:
        SocketTransport(events, sock, peer, factory(), lingers=False).start()
    return Listener(events, accepted).listen(host, port, backlog)


def linger_close(events: EpollSet, sock: _socket.socket) -> None:
    """Close a client's socket whose answer (an ``ERR`` line) is written but whose
    own bytes may still come: the FIN now, then what arrives is read and dropped
    until its EOF, ``LINGER_BYTES`` or ``LINGER_SECONDS``, as nginx's
    ``lingering_close`` (``linger.py``). Closed at once, a byte arriving after the
    close resets the connection, and the reset can destroy the ERR line before
    the client reads it: a client told ``ERR busy`` a moment before it sent its
    message got a reset instead."""
    if len(events.lingering) >= events.max_lingering:  # a flood: no descriptor to spare (it may reset)
        events.drop(sock)
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        events.drop(sock)
        return
    taken = 0
    events.lingering.add(sock)

    def end() -> None:
        events.lingering.discard(sock)
        events.drop(sock)  # (twice, by the timer after the EOF, does nothing: its descriptor is -1 then)

    def on_event(ev: int) -> None:
        nonlocal taken
        while True:
            try:
                data = sock.recv(BUF)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            taken += len(data)
            if not data or taken > LINGER_BYTES:
                timer.cancel()
                end()
                return

    timer = events.loop.call_later(LINGER_SECONDS, end)
    if sock.fileno() in events.handlers:
        events.handlers[sock.fileno()] = on_event  # registered edge-triggered: the next arrival comes here
    else:
        events.watch(sock, on_event)
    on_event(IN)  # what came already


class Stream:
    """A connected non-blocking socket in the epoll set: read until empty, write
    through a buffer with water marks, reading paused and resumed. Subclasses
    say what the events mean: ``received`` (bytes read), ``ended`` (the peer's
    EOF), ``failed`` (a read or write error), ``set_full`` (the buffer passed
    ``high``, or fell back to ``low``), ``flushed`` (the buffer is empty)."""

    def __init__(self, events: EpollSet, sock: _socket.socket, high: int = HIGH_WATER) -> None:
        self.events = events
        self.sock = sock
        self.out = bytearray()  # written, not yet taken by the socket
        self.high = high
        self.low = high // 4
        self.full = False
        self.read_paused = False
        self.unread = False  # paused with bytes maybe left in the socket (no new edge will say so)
        self.eof = False  # the peer's EOF was read
        self.closing = False  # reading is over; closing once the buffer is out
        self.closed = False

    def on_event(self, ev: int) -> None:
        if ev & OUT and self.out:
            self.flush()
        if ev & (IN | HANGUP) and not (self.closing or self.eof):
            self.read(ev & HANGUP)

    def read(self, hangup: int = 0) -> None:
        sock = self.sock
        while not (self.closing or self.eof):
            if self.read_paused:
                self.unread = True
                return
            try:
                data = sock.recv(BUF)
            except BlockingIOError:
                return
            except OSError as exc:
                self.failed(exc)
                return
            if not data:
                self.eof = True
                self.ended()
                return
            self.received(data)
            if len(data) < BUF and not hangup:
                return  # empty now: a later arrival brings a new edge

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or not data:
            return
        out = self.out
        if not out:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.failed(exc)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        out += data
        if not self.full and len(out) > self.high:
            self.full = True
            self.set_full(True)

    def flush(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self.failed(exc)
            return
        del self.out[:sent]
        if self.full and len(self.out) <= self.low:
            self.full = False
            self.set_full(False)
        if not self.out:
            self.flushed()

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False
        if self.unread:
            self.unread = False
            self.events.loop.call_soon(self.read, HANGUP)  # read to the end: no edge will come

    def drop(self) -> None:
        """Close the socket now; the buffer is dropped."""
        if self.closed:
            return
        self.closed = self.closing = True
        self.out.clear()
        self.events.drop(self.sock)

    # what the events mean, for the subclass
    def received(self, data: bytes) -> None:
        raise NotImplementedError

    def ended(self) -> None:
        raise NotImplementedError

    def failed(self, exc: OSError) -> None:
        raise NotImplementedError

    def set_full(self, full: bool) -> None:
        pass

    def flushed(self) -> None:
        pass


class SocketTransport(Stream, asyncio.Transport):
    """An accepted socket driving an ``asyncio.Protocol`` as asyncio's own
    transports do, for the part of the interface the balancer's message mode
    and the async HTTP server use: ``write`` with water marks
    (``pause_writing``/``resume_writing``), ``get_write_buffer_size``,
    ``pause_reading``/``resume_reading``, ``write_eof`` once the buffer is out
    (reading goes on), ``close`` once the buffer is out, ``abort``,
    ``get_extra_info("peername")`` and ``("socket")``; the protocol's ``connection_lost`` comes
    soon after, never inside the call that closed.

    ``lingers``: whether ``close`` lingers (``linger_close``) when the peer has
    not sent its EOF yet. The balancer's message mode does, for its ERR lines;
    the HTTP server closes at once after a complete answer, as nginx and
    uvloop's transports do, and lingers by itself after an error answer
    (``linger.Linger``, through ``write_eof``)."""

    def __init__(self, events: EpollSet, sock: _socket.socket, peer: tuple, protocol: asyncio.Protocol,
                 lingers: bool = True) -> None:
        Stream.__init__(self, events, sock)
        self._extra = {"peername": peer, "socket": sock}
        self.protocol = protocol
        self.lingers = lingers
        self.shut = False  # write_eof: the FIN goes once the buffer is out

    def start(self) -> None:
        self.events.watch(self.sock, self.on_event)
        self.protocol.connection_made(self)

    def received(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def ended(self) -> None:
        if not self.protocol.eof_received():
            self.close()

    def failed(self, exc: OSError) -> None:
        self.finish(exc)

    def set_full(self, full: bool) -> None:
        if full:
            self.protocol.pause_writing()
        else:
            self.protocol.resume_writing()

    def flushed(self) -> None:
        if self.closing:
            self.finish(None, linger=True)
        elif self.shut:
            self.shutdown()

    def write_eof(self) -> None:
        if self.shut or self.closing:
            return
        self.shut = True
        if not self.out:
            self.shutdown()

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # (gone already)
            self.failed(exc)

    def get_write_buffer_size(self) -> int:
        return len(self.out)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = HIGH_WATER if high is None else high
        self.low = self.high // 4 if low is None else low

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if not self.out:
            self.finish(None, linger=True)

    def abort(self) -> None:
        self.finish(None)

    def finish(self, exc: Exception | None, linger: bool = False) -> None:
        """The end: ``linger`` (a close once all is written) before the client's
        EOF lingers (``linger_close``), so that what it still sends cannot reset
        the connection before it has read the last answer."""
        if self.closed:
            return  # connection_lost is on its way already
        if linger and not self.eof and self.lingers:
            self.closed = self.closing = True
            linger_close(self.events, self.sock)
        else:
            self.drop()
        # Let go of the protocol here (no event comes any more): the transport and
        # the protocol hold each other, and left so each pair would wait for the
        # garbage collector, whose passes cost the balancer ~2% of its time.
        protocol, self.protocol = self.protocol, None
        self.events.loop.call_soon(protocol.connection_lost, exc)
