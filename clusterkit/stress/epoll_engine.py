"""The readiness engine (``--engine epoll``, Linux): every client of a process
on one ``select.epoll`` loop over raw non-blocking sockets, the way
ApacheBench and wrk are built.

Why a third engine: with a new connection per request (the default, and what
``ab`` does), asyncio's cost is the connection itself. uvloop builds a
transport, a task and a protocol for every connect; here a connect is a
socket, one ``epoll_ctl`` and a state change, and closing the socket takes it
out of the epoll set for free. Measured here against nginx without
keep-alive: one process of this engine about 19k requests/s, uvloop
transports about 14k, ab about 20k.

Per request: ``connect`` (non-blocking, EINPROGRESS), ``epoll_ctl`` (edge
triggered, once per connection), ``send`` when the connect completes,
``recv`` when the answer arrives, ``close``. With edge triggering a socket is
read until it is empty (EAGAIN), or until the answer is complete: nothing
more is due then until the next request is sent. Deadlines (connect and
answer, ``--timeout``) are checked ten times a second, as in the async
engine; ``--rate`` sends wait in a heap of wake-up times, kept to within
about 50 us (epoll alone would send up to a millisecond late, and the
lateness would count as latency).
"""

from __future__ import annotations

import errno
import heapq
import os
import select
import socket
import time

import _socket

from ..sockets import outgoing
from .board import Board, StopFlag
from .config import StressConfig
from .metrics import Recorder
from .plan import (AGAIN, CLOSES, FINE_NS, MS, Client, Plan, Target, address, connect_error, ns,
                   reusable, server_closes)

CHECK_NS = 100_000_000
"""How often deadlines and the stop flag are checked."""
BUF = 65536
HANGUP = select.EPOLLRDHUP | select.EPOLLHUP if hasattr(select, "epoll") else 0
EDGE = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET if hasattr(select, "epoll") else 0


def connect_kind(code: int) -> str:
    """The failure kind for a connect's errno, as ``connect_error`` names the exception."""
    return connect_error(OSError(code, os.strerror(code)))  # OSError(ECONNREFUSED) is a ConnectionRefusedError


class EpollClient(Client):
    """One client's socket and state: idle, connecting, waiting for an answer,
    or draining (answered; waiting for the server to close: plan.server_closes)."""

    __slots__ = ("sock", "connecting", "finished")

    def __init__(self, cfg: StressConfig, index: int, plan: Plan, rec: Recorder, board: Board,
                 failed_slot: int) -> None:
        super().__init__(cfg, index, plan, rec, board, failed_slot)
        self.sock: _socket.socket | None = None
        self.connecting = False
        self.finished = False


class EpollRunner:
    def __init__(self, cfg: StressConfig, rec: Recorder, board: Board, stop: StopFlag) -> None:
        self.cfg = cfg
        self.rec = rec
        self.board = board
        self.stop = stop
        self.ep = select.epoll()
        self.by_fd: dict[int, EpollClient] = {}
        self.timers: list[tuple[int, int, EpollClient]] = []
        self.running = 0
        self.timeout_ns = int(cfg.timeout * 1e9)
        self.family = socket.AF_INET
        self.sockaddr: tuple = ()

    def run(self, plans: list[tuple[int, Plan]]) -> None:
        if not plans:
            return
        target = Target(self.cfg, plans[0][0])
        self.family, self.sockaddr = address(self.cfg, target)
        # The clients share one Recorder, so the process's failure total goes in one slot.
        failed_slot = self.board.failed_slot(plans[0][0])
        clients = [EpollClient(self.cfg, c, plan, self.rec, self.board, failed_slot) for c, plan in plans]
        self.running = len(clients)
        wait = plans[0][1].start - ns()
        if wait > 0:
            select.select([], [], [], wait / 1e9)  # every client starts together
        try:
            for c in clients:
                self.next(c)
            self.loop(clients)
        finally:
            for c in clients:
                if c.sock is not None:
                    c.sock.close()
            self.ep.close()

    def loop(self, clients: list[EpollClient]) -> None:
        poll, by_fd, timers = self.ep.poll, self.by_fd, self.timers
        check_at = ns() + CHECK_NS
        while self.running:
            left = (min(check_at, timers[0][0]) if timers else check_at) - ns()
            # epoll waits in whole ms, rounded up: wait the whole ms rounded down,
            # then the last fraction in short sleeps, as a --rate send that goes
            # out late counts its lateness as latency.
            events = poll((left // MS) / 1000 if left >= MS else 0)
            if not events and 0 < left < MS:
                time.sleep(min(left, FINE_NS) / 1e9)
            for fd, ev in events:
                c = by_fd.get(fd)
                if c is None:
                    continue
                if c.connecting:
                    self.connected(c, ev)
                else:
                    self.readable(c, ev & HANGUP)
            now = ns()
            while timers and timers[0][0] <= now:
                self.go(heapq.heappop(timers)[2])
            if now >= check_at:
                check_at = now + CHECK_NS
                self.check(clients, now)

    # scheduling
    def next(self, c: EpollClient) -> None:
        if c.over(self.stop):
            self.drop(c)
            c.finished = True
            self.running -= 1
            return
        at = c.due()
        if at:
            heapq.heappush(self.timers, (at, c.index, c))
            return
        self.go(c)

    def go(self, c: EpollClient) -> None:
        if c.sock is not None:
            self.send(c)
            return
        c.connect_started = ns()
        try:
            # The C socket type: socket.socket's Python-level __init__ and close cost
            # about a microsecond per connection.
            sock = outgoing(_socket.socket(self.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK))
        except OSError as exc:  # out of file descriptors
            self.connect_failed(c, connect_error(exc))
            return
        code = sock.connect_ex(self.sockaddr)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.connect_failed(c, connect_kind(code))
            return
        c.sock = sock
        c.connecting = True
        fd = sock.fileno()
        self.by_fd[fd] = c
        self.ep.register(fd, EDGE)
        if code == 0:
            self.connected(c, select.EPOLLOUT)

    def connected(self, c: EpollClient, ev: int) -> None:
        sock = c.sock
        if ev & (select.EPOLLERR | select.EPOLLHUP) or not ev & select.EPOLLOUT:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if sock else 0
            if not code and not ev & (select.EPOLLERR | select.EPOLLHUP):
                return  # not yet
            self.drop(c)
            self.connect_failed(c, connect_kind(code) if code else "connect-error")
            return
        c.connecting = False
        c.connected()
        if self.cfg.keepalive:  # one write per connection cannot meet Nagle's delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send(c)

    def connect_failed(self, c: EpollClient, kind: str) -> None:
        c.connect_failed(kind)
        self.next(c)

    def send(self, c: EpollClient, payload: bytes | None = None) -> None:
        if payload is None:
            payload = c.request()
        try:
            n = c.sock.send(payload)
            if n < len(payload):  # a full send buffer: finish in blocking mode, bounded by --timeout
                c.sock.settimeout(self.cfg.timeout)
                c.sock.sendall(payload[n:])
                c.sock.setblocking(False)
        except OSError:
            c.reader.close(ns())
            self.finish(c)

    def readable(self, c: EpollClient, hangup: int = 0) -> None:
        """``hangup``: the event saw the server's FIN already."""
        reader, sock = c.reader, c.sock
        while True:
            try:
                chunk = sock.recv(BUF)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            now = ns()
            if c.draining:  # answered, and the server closes: its close, or more (a second answer)
                if chunk:
                    c.drain_extra += len(chunk)
                    continue
                self.drop(c)
                c.drained()
                self.next(c)
                return
            if reader is None:
                # An idle keep-alive connection (its client waits for a --rate send)
                # that the server closed, or that brought an answer nobody asked
                # for: the send reconnects.
                if chunk:
                    c.unasked(chunk)
                self.drop(c)
                return
            if c.expect is not None:  # the line protocol's steady state, in one step
                payload = c.again(chunk, now)
                if payload:
                    self.send(c, payload)
                    return
                if payload is not None:
                    self.next(c)
                    return
            verdict = c.whole(chunk, now)
            if verdict == AGAIN:  # the steady state: the whole answer, as expected
                payload = c.follow(now)
                if payload is None:
                    self.next(c)
                else:
                    self.send(c, payload)
                return
            if verdict == CLOSES:
                self.closing(c, hangup)
                return
            if not chunk:
                self.drop(c)
                if c.server_closed_first(reader):  # again, on a new connection
                    self.go(c)
                    return
                reader.close(now)  # (a no-op after the last answer: see lingers)
                self.finish(c)
                return
            if reader.done:  # more after the last answer (see Client.lingers)
                c.came_after(len(chunk))
                self.drop(c)
                self.finish(c)
                return
            reader.feed(chunk, now)
            if reader.done:
                if c.lingers(reader, now):
                    # Half-close, and read on: the server's close, or more (the deadline: check).
                    try:
                        c.sock.shutdown(socket.SHUT_WR)
                    except OSError:  # (reset: the recv says so)
                        pass
                    c.sent = c.linger_clock(now, self.timeout_ns)
                    continue
                self.finish(c, hangup)
                return

    def finish(self, c: EpollClient, hangup: int = 0) -> None:
        if c.sock is not None and server_closes(c.reader):
            self.closing(c, hangup)  # (counted at the close)
            return
        reader = c.answered()
        if reusable(self.cfg, reader):
            self.next(c)
            return
        self.drop(c)
        self.next(c)

    def closing(self, c: EpollClient, hangup: int) -> None:
        """Answered, and the server closes the connection: close it when it has, and
        count the answer then (``Client.drained``)."""
        if hangup:
            self.drop(c)
            c.drained()
            self.next(c)
            return
        # The FIN comes after the event was reported, so it brings an event of its own.
        c.draining = True
        c.sent = ns()  # the deadline for the close

    def drop(self, c: EpollClient) -> None:
        sock = c.sock
        if sock is not None:
            del self.by_fd[sock.fileno()]
            sock.close()  # also takes it out of the epoll set
            c.sock = None
        c.connecting = False

    def check(self, clients: list[EpollClient], now: int) -> None:
        """Deadlines; and on stop, let go of every client at once."""
        if self.stop.is_set():
            for c in clients:
                if not c.finished:
                    self.drop(c)
                    c.finished = True
            self.running = 0
            return
        for c in clients:
            if c.connecting and now - c.connect_started > self.timeout_ns:
                self.drop(c)
                self.connect_failed(c, "connect-timeout")
            elif c.draining:
                if now - c.sent > self.timeout_ns:  # answered, but never closed: close it
                    self.drop(c)
                    c.drained()
                    self.next(c)
            elif c.reader is not None and now - c.sent > self.timeout_ns:
                c.reader.close(ns(), "timeout")
                self.drop(c)
                self.finish(c)
