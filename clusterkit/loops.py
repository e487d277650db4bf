"""Event-loop choice, in one place (as uvicorn/loops/auto.py does).

``run(coro)`` runs a coroutine on uvloop when it is installed and on the
standard asyncio loop otherwise; ``loop_name()`` says which, for logs and
reports. ``--loop asyncio`` forces the standard loop, to compare the two.
``create_server()`` is the loop's own, except that uvloop takes a burst of
waiting connections at once, as the standard loop does.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import _socket
import signal
import socket
import struct
from asyncio import constants, trsock
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .logs import Tally
from .sockets import descriptor_room, listen_hosts

T = TypeVar("T")
LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    if choice not in LOOPS:
        raise ValueError(f"unknown loop {choice!r}; use one of {', '.join(LOOPS)}")
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop
    return SelectorLoop


def loop_name(choice: str = "auto") -> str:
    factory = loop_factory(choice)
    return "asyncio" if factory is SelectorLoop else "uvloop"


OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class SelectorLoop(asyncio.SelectorEventLoop):
    """The standard loop (``--loop asyncio``), whose accept backs off once when the
    process is out of descriptors. Python's own (CPython gh-151615, fixed after 3.13)
    pauses the listener and retries a second on, as it should, but then goes on
    through the rest of its batch: up to ``backlog`` failed accepts a turn, each
    scheduling a retry of its own, and the retries came due over more and more turns,
    each with a batch of its own: 4,000 failed accepts in the first second of a flood,
    20,000 in the third, for as long as it lasted. Here the first failure ends the
    batch, as in CPython's fix and nginx's accept; the rest is Python's method."""

    def _accept_connection(self, protocol_factory, sock, sslcontext=None, server=None,  # type: ignore[override]
                           backlog=100, *rest):
        for _ in range(backlog):
            try:
                conn, addr = sock.accept()
                conn.setblocking(False)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # the queue is empty
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    raise  # (the loop logs it)
                self.call_exception_handler({"message": ACCEPT_ERROR, "exception": exc,
                                             "socket": trsock.TransportSocket(sock)})
                self._remove_reader(sock.fileno())  # (the listener stays readable: no busy loop)
                self.call_later(constants.ACCEPT_RETRY_DELAY, self._start_serving, protocol_factory, sock,
                                sslcontext, server, backlog, *rest)
                return
            self.create_task(self._accept_connection2(protocol_factory, conn, {"peername": addr}, sslcontext,
                                                      server, *rest))


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a server gracefully: SIGINT, SIGTERM, and SIGHUP (the
    terminal it runs in closed) unless it is ignored (``nohup``). Left to Python,
    SIGHUP killed a server on the spot, without a drain or a log line."""
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        return signal.SIGINT, signal.SIGTERM
    return signal.SIGINT, signal.SIGTERM, signal.SIGHUP


class StopSignal:
    """How every server here stops, in uvicorn's order: the first SIGINT or SIGTERM
    (or SIGHUP: ``stop_signals``) asks for a graceful stop (``wait()`` returns, the
    server drains); a second one sets ``forced`` and calls ``on_force`` (abort
    whatever is left)."""

    def __init__(self, on_force: Callable[[], None] | None = None) -> None:
        self._event = asyncio.Event()
        self._on_force = on_force
        self.forced = False
        # Installed as it is made (in the running loop, before the server listens): a
        # Ctrl-C as soon as the port is open is a graceful stop too, not Python's
        # KeyboardInterrupt (exit 130).
        loop = asyncio.get_running_loop()
        for sig in stop_signals():
            loop.add_signal_handler(sig, self.request)

    def request(self) -> None:
        if self._event.is_set():
            self.forced = True
            if self._on_force is not None:
                self._on_force()
        self._event.set()

    async def wait(self) -> None:
        """Wait for the first signal."""
        await self._event.wait()

    async def settle(self, busy: Callable[[], bool], seconds: float) -> None:
        """While ``busy()``, for at most ``seconds``, unless a second signal forces."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while busy() and loop.time() < deadline and not self.forced:
            await asyncio.sleep(0.02)



async def create_server(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol],
                        host: str | None, port: int, *, backlog: int = 100,
                        **kwargs: Any) -> asyncio.AbstractServer:
    """``loop.create_server()``, but a burst of connects is taken at once on uvloop too.

    libuv (1.45 and later, so uvloop) accepts one connection per turn of the loop
    and leaves the rest in the kernel's queue. Under load a turn takes milliseconds:
    1,000 clients connecting at once to a busy echo server waited up to two seconds
    for their first reply (3,000 still over a second when 512 were taken per turn).
    The standard asyncio loop takes up to ``backlog`` per turn, and so does this:
    when uvloop accepts a connection, the kernel is asked how many more are waiting
    (``TCP_INFO`` on the listener, 1 µs; Linux; on every ``LOOK_EVERY``-th
    accept), and from ``LONG_QUEUE`` on they are all accepted too. (A failed ``accept4`` to find the queue empty would cost
    5 µs with its exception.)

    ``host`` is listened on at those of its addresses that can listen here
    (``sockets.listen_hosts``): uvloop fails on ``localhost``'s ``::1`` where IPv6 is off.
    """
    if host is not None:
        host = listen_hosts(host)  # type: ignore[assignment]  # (a list when an address is left out)
    if not _is_uvloop(loop):
        _quiet_accept_errors(loop)
        return await loop.create_server(factory, host, port, backlog=backlog, **kwargs)
    batch = _Batch(loop, factory)
    server = await loop.create_server(batch.accepted, host, port, backlog=backlog, **kwargs)
    batch.attach(server)
    return server


ACCEPT_ERROR = "socket.accept() out of system resource"


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """The standard loop, out of descriptors, reports every failed accept of its
    batch (up to ``backlog`` a turn), each with a traceback: 270,000 lines in a few
    seconds, and a loop too busy logging to serve. Said here once a second, with
    how many, and without the traceback (the errno says it all)."""
    previous = loop.get_exception_handler()
    last = None  # the last failed accept's exception

    def say(context: dict) -> None:
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    failed = Tally(lambda n: say({"message": f"{ACCEPT_ERROR}: {last} ({n} failed accepts since the last "
                                             f"said; the server takes new connections again as others close)"}),
                   later=loop.call_later)

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        nonlocal last
        if _retry_after_close(context):
            return
        if context.get("message") != ACCEPT_ERROR:
            say(context)
            return
        last = context.get("exception")
        failed.count()

    loop.set_exception_handler(handler)


def _retry_after_close(context: dict) -> bool:
    """A retry of the accepts that came due after the server had closed: nothing to
    say. The standard loop (Python 3.11) schedules a retry a second on for every
    failed accept of a batch, up to ``backlog`` of them, and each one due after the
    stop raised ``ValueError: Invalid file descriptor: -1`` with a traceback:
    thousands, for 10 s and more, after a flood past the open-files limit."""
    handle = context.get("handle")
    callback = getattr(handle, "_callback", None)
    return isinstance(context.get("exception"), ValueError) and getattr(callback, "__name__", "") == "_start_serving"


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


LONG_QUEUE = 32
"""Connections waiting in a listener's queue from which they are all taken at once:
below it, uvloop's one per turn keeps up, and its own accept is the cheaper path
(``connect_accepted_socket`` costs a task per connection)."""

LOOK_EVERY = 8
"""The queue is looked at on every 8th connection uvloop accepts (the first included):
a storm waits at most that many turns more, and one connection at a time (ab without
keep-alive) pays an eighth of the look."""

_TCP_INFO = getattr(socket, "TCP_INFO", None)
_QUEUED = struct.Struct("=I")
"""``tcpi_unacked``, at byte 24 of ``struct tcp_info``: for a listener, its accept queue length."""


class _Batch:
    def __init__(self, loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol]) -> None:
        self.loop = loop
        self.factory = factory
        self.server: asyncio.AbstractServer | None = None
        self.listeners: list[tuple[int, int, int, int]] = []  # (family, type, proto, fd) of each TCP listener
        self.accepts = 0
        room = descriptor_room()
        self.cap = 1 << 30 if room is None else max(1, room // 16)
        """Connections taken in one look, at most: the servers count theirs in
        ``connection_made`` and turn away those past their limit, which a whole
        queue taken at once would overshoot, to EMFILE (and libuv then closes the
        rest of the queue unseen)."""

    def attach(self, server: asyncio.AbstractServer) -> None:
        self.server = server
        if _TCP_INFO is None:
            return
        for s in server.sockets:
            if s.family in (socket.AF_INET, socket.AF_INET6):
                self.listeners.append((s.family, s.type, s.proto, s.fileno()))

    def accepted(self) -> asyncio.Protocol:
        """The factory uvloop calls for each connection it accepts."""
        self.accepts += 1
        if self.accepts % LOOK_EVERY == 1 and self.listeners:
            self._take_waiting()
        return self.factory()

    def _take_waiting(self) -> None:
        if not self.server.is_serving():  # type: ignore[union-attr]
            self.listeners = []  # closed: its descriptor may soon be someone else's
            return
        for family, kind, proto, fd in self.listeners:
            # A socket object borrowed for a moment and detached, so that nothing
            # here can ever close the server's descriptor.
            listener = _socket.socket(family, kind, proto, fd)
            try:
                waiting = _QUEUED.unpack_from(listener.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 32), 24)[0]
                if waiting < LONG_QUEUE:
                    continue
                for _ in range(min(waiting, self.cap)):
                    try:
                        conn, _ = listener._accept()
                    except OSError:  # gone meanwhile; EMFILE and the like are left to libuv
                        break
                    self._serve(socket.socket(family, kind, proto, conn))
            finally:
                listener.detach()

    def _serve(self, sock: socket.socket) -> None:
        task = self.loop.create_task(self.loop.connect_accepted_socket(self.factory, sock))
        task.add_done_callback(functools.partial(_close_on_error, sock))


def _close_on_error(sock: socket.socket, task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        sock.close()
