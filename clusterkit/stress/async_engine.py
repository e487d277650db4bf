"""The asyncio engine (``--engine async``, uvloop when installed): one
protocol object per client, every client of a process on one event loop.

Each client sends, waits for the answer in callbacks, and sends again; the
runner checks answer deadlines ten times a second instead of keeping a timer
per request.
"""

from __future__ import annotations

import asyncio
import heapq
import time

from .board import Board, StopFlag
from .config import StressConfig
from .exchange import HttpReader
from .metrics import Recorder
from .plan import FINE_NS, MS, Plan, Target, all_ok, connect_error, ns, record, server_closes


class AsyncClient(asyncio.Protocol):
    """One client: sends, waits for the answer in callbacks, sends again."""

    def __init__(self, runner: AsyncRunner, client: int, plan: Plan) -> None:
        self.runner = runner
        self.cfg = runner.cfg
        self.client = client
        self.plan = plan
        self.target = Target(runner.cfg, client)
        self.transport: asyncio.Transport | None = None
        self.k = 0
        self.reader = None
        self.batch = 0
        self.sent = 0
        self.base = 0
        self.connect_started = 0
        self.draining = False
        """Answered; waiting for the server to close (see plan.server_closes)."""
        self.stop = runner.stop_event
        self.done = runner.loop.create_future()

    # scheduling
    def next(self) -> None:
        plan, k = self.plan, self.k
        if self.stop.is_set() or (plan.share is not None and k >= plan.share) or (
                plan.deadline is not None and ns() >= plan.deadline):
            if self.transport is not None:
                self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        if plan.interval:
            at = plan.intended(k)
            if at > ns():
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
        try:
            async with asyncio.timeout(self.cfg.timeout):
                await self.runner.loop.create_connection(lambda: self, self.target.host, self.target.port)
        except OSError as exc:
            self._connect_failed(connect_error(exc))
        except TimeoutError:
            self._connect_failed("connect-timeout")

    def _connect_failed(self, kind: str) -> None:
        share = self.plan.share
        batch = min(self.cfg.pipeline, (share - self.k) if share is not None else self.cfg.pipeline)
        now = ns()
        for _ in range(batch):
            self.runner.rec.failed(self.plan.intended(self.k) if self.plan.interval else self.connect_started,
                                   kind, now)
        self.k += batch
        progress = self.runner.progress
        progress[self.client] = self.k
        progress[self.runner.failed_slot] = self.runner.rec.result.failed
        progress[self.runner.board.streak_slot(self.client)] += 1
        self.next()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.runner.rec.connected(ns() - self.connect_started)
        self.runner.progress[self.runner.board.streak_slot(self.client)] = 0
        self._send()

    def _send(self) -> None:
        share = self.plan.share
        payload, self.reader, self.batch = self.target.request(
            self.k, (share - self.k) if share is not None else self.cfg.pipeline)
        self.sent = ns()
        self.base = self.plan.intended(self.k) if self.plan.interval else self.sent
        self.transport.write(payload)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            return
        reader.feed(data, ns())
        if reader.done:
            self._finish()

    def _finish(self) -> None:
        reader = self.reader
        self.reader = None
        record(self.runner.rec, reader, self.base, self.plan.warm_end)
        self.k += self.batch
        self.runner.progress[self.client] = self.k
        self.runner.progress[self.runner.failed_slot] = self.runner.rec.result.failed
        if not self.cfg.keepalive or not all_ok(reader) or (isinstance(reader, HttpReader) and not reader.keep_alive):
            if self.transport is not None and server_closes(reader):
                self.draining = True  # connection_lost goes on
                self.sent = ns()
                return
            transport, self.transport = self.transport, None
            if transport is not None:  # None when the server closed first
                transport.close()
        self.next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader is not None:
            self.reader.close(ns())
            self.transport = None
            self._finish()
        elif self.draining:
            self.draining = False
            self.transport = None
            self.next()
        self.transport = None

    def check_timeout(self, now: int, timeout_ns: int) -> None:
        if self.draining and now - self.sent > timeout_ns and self.transport is not None:
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
        self.progress = board.a
        self.stop_event = stop
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.failed_slot = 0
        self.timers: list[tuple[int, int, AsyncClient]] = []
        self.tick_handle: asyncio.Handle | None = None

    # --rate: one precise timer for every client. The loop's own timers work in
    # whole ms and fire up to one late; a send that goes out late counts its
    # lateness as latency. So: a loop timer to about 1 ms before the earliest
    # send, then short sleeps, with I/O handled between them.
    def at(self, when: int, client: AsyncClient) -> None:
        heapq.heappush(self.timers, (when, client.client, client))
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
        self.failed_slot = self.board.failed_slot(plans[0][0]) if plans else 0
        clients = [AsyncClient(self, c, plan) for c, plan in plans]
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
            now = ns()
            for c in clients:
                c.check_timeout(now, timeout_ns)
