"""The asyncio engine (``--engine async``, uvloop when installed): one
protocol object per client, every client of a process on one event loop.

Each client sends, waits for the answer in callbacks, and sends again; the
runner checks answer deadlines ten times a second instead of keeping a timer
per request.
"""

from __future__ import annotations

import asyncio
import heapq
import socket
import time

from ..sockets import outgoing
from .board import Board, StopFlag
from .config import StressConfig
from .metrics import Recorder
from .plan import (AGAIN, CLOSES, FINE_NS, MS, Client, Plan, address, connect_error, ns, reusable,
                   server_closes)


class AsyncClient(Client, asyncio.Protocol):
    """One client: sends, waits for the answer in callbacks, sends again."""

    def __init__(self, runner: AsyncRunner, index: int, plan: Plan, failed_slot: int) -> None:
        super().__init__(runner.cfg, index, plan, runner.rec, runner.board, failed_slot)
        self.runner = runner
        self.family, self.sockaddr = address(runner.cfg, self.target)
        self.transport: asyncio.Transport | None = None
        self.stop = runner.stop_event
        self.done = runner.loop.create_future()

    # scheduling
    def next(self) -> None:
        if self.over(self.stop):
            if self.transport is not None:
                self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        at = self.due()
        if at:
            self.runner.at(at, self)
            return
        self._go()

    def _go(self) -> None:
        if self.transport is None:
            self.connect_started = ns()
            self.runner.loop.create_task(self._connect())
        else:
            self._send()

    async def _connect(self) -> None:
        # The TCP connect alone is timed; the transport is made of the connected socket.
        # (With create_connection under the timeout, one that ran out after
        # connection_made had sent the request closed that connection unseen: the
        # client waited for its close for ever, and the run with it.)
        loop = self.runner.loop
        sock = None
        try:
            sock = outgoing(socket.socket(self.family, socket.SOCK_STREAM))  # (out of descriptors: the except)
            sock.setblocking(False)
            async with asyncio.timeout(self.cfg.timeout):
                await loop.sock_connect(sock, self.sockaddr)
        except (OSError, TimeoutError) as exc:
            if sock is not None:
                sock.close()
            self.connect_failed("connect-timeout" if isinstance(exc, TimeoutError) else connect_error(exc))
            self.next()
            return
        try:
            await loop.create_connection(lambda: self, sock=sock)
        except OSError as exc:  # (gone already: a reset)
            sock.close()
            self.connect_failed(connect_error(exc))
            self.next()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.connected()
        self._send()

    def _send(self) -> None:
        self.transport.write(self.request())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.draining:  # answered, and the server closes: more before its close is a second answer
            self.drain_extra += len(data)
            return
        reader = self.reader
        if reader is None:
            if self.transport is not None:
                # An answer nobody asked for, on an idle keep-alive connection (its
                # client waits for a --rate send): the send reconnects.
                self.unasked(data)
                transport, self.transport = self.transport, None
                transport.close()
            return
        now = ns()
        if self.expect is not None:  # the line protocol's steady state, in one step
            payload = self.again(data, now)
            if payload:
                self.transport.write(payload)  # type: ignore[union-attr]
                return
            if payload is not None:
                self.next()
                return
        verdict = self.whole(data, now)
        if verdict == AGAIN:  # the steady state: the whole answer, as expected
            payload = self.follow(now)
            if payload is None:
                self.next()
            else:
                self.transport.write(payload)  # type: ignore[union-attr]
            return
        if verdict == CLOSES:
            self._await_close()
            return
        if reader.done:  # more after the last answer (see Client.lingers)
            self.came_after(len(data))
            self._finish()  # (no longer reusable: closes the connection)
            return
        reader.feed(data, now)
        if reader.done:
            if self.lingers(reader, now):
                # Half-close, and wait: connection_lost counts it, or more comes (the deadline: check_timeout).
                try:
                    self.transport.write_eof()  # type: ignore[union-attr]
                except OSError:  # reset already (the standard loop raises; uvloop does not): connection_lost counts
                    self.transport.abort()  # type: ignore[union-attr]
                    return
                self.sent = self.linger_clock(now, int(self.cfg.timeout * 1e9))
                return
            self._finish()

    def _finish(self) -> None:
        if self.transport is not None and server_closes(self.reader):
            self._await_close()  # (counted at the close)
            return
        reader = self.answered()
        if not reusable(self.cfg, reader):
            transport, self.transport = self.transport, None
            if transport is not None:  # None when the server closed first
                transport.close()
        self.next()

    def _await_close(self) -> None:
        """Answered, and the server closes the connection: connection_lost counts the
        answer (``Client.drained``) and goes on."""
        self.draining = True
        self.sent = ns()  # the deadline for the close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.draining:
            self.transport = None
            self.drained()
            self.next()
            return
        if self.reader is not None and self.server_closed_first(self.reader):  # again, on a new connection
            self.transport = None
            self._go()
            return
        if self.reader is not None:
            self.reader.close(ns())
            self.transport = None
            self._finish()
        self.transport = None

    def let_go(self) -> None:
        """The run was stopped (Ctrl-C, a dead target): what is on its way is not
        counted, as in the other engines, and nobody waits out its --timeout."""
        self.reader = None
        self.draining = False
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.abort()
        if not self.done.done():
            self.done.set_result(None)

    def check_timeout(self, now: int, timeout_ns: int) -> None:
        if self.draining:
            if now - self.sent > timeout_ns and self.transport is not None:
                self.transport.abort()  # answered, but never closed; connection_lost goes on
        elif self.reader is not None and now - self.sent > timeout_ns:
            self.reader.close(ns(), "timeout")
            transport, self.transport = self.transport, None
            if transport is not None:
                transport.abort()
            self._finish()


class AsyncRunner:
    def __init__(self, cfg: StressConfig, rec: Recorder, board: Board, stop: StopFlag) -> None:
        self.cfg = cfg
        self.rec = rec
        self.board = board
        self.stop_event = stop
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.timers: list[tuple[int, int, AsyncClient]] = []
        self.tick_handle: asyncio.Handle | None = None

    # --rate: one precise timer for every client. The loop's own timers work in
    # whole ms and fire up to one late; a send that goes out late counts its
    # lateness as latency. So: a loop timer to about 1 ms before the earliest
    # send, then short sleeps, with I/O handled between them.
    def at(self, when: int, client: AsyncClient) -> None:
        heapq.heappush(self.timers, (when, client.index, client))
        if self.tick_handle is not None:
            self.tick_handle.cancel()
        self.tick_handle = self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.tick_handle = None
        timers = self.timers
        while timers and timers[0][0] <= ns():
            heapq.heappop(timers)[2]._go()
        if not timers or self.tick_handle is not None:
            return
        left = timers[0][0] - ns()
        if left > MS:
            self.tick_handle = self.loop.call_later((left - MS) / 1e9, self._tick)
        else:
            if left > 0:
                time.sleep(min(left, FINE_NS) / 1e9)
            self.tick_handle = self.loop.call_soon(self._tick)

    async def run(self, plans: list[tuple[int, Plan]]) -> None:
        self.loop = asyncio.get_running_loop()
        # The clients share one Recorder, so the process's failure total goes in one slot.
        failed_slot = self.board.failed_slot(plans[0][0]) if plans else 0
        clients = [AsyncClient(self, c, plan, failed_slot) for c, plan in plans]
        if plans:
            wait = plans[0][1].start - ns()
            if wait > 0:
                await asyncio.sleep(wait / 1e9)  # every client starts together
        for c in clients:
            c.next()
        timeout_ns = int(self.cfg.timeout * 1e9)
        waiter = asyncio.gather(*(c.done for c in clients))
        while not waiter.done():
            await asyncio.wait([waiter], timeout=0.1)
            if self.stop_event.is_set():
                for c in clients:
                    c.let_go()
                break
            now = ns()
            for c in clients:
                c.check_timeout(now, timeout_ns)
