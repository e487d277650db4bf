"""The load engines: threads (one per client, blocking sockets) and asyncio
(one protocol per client, callbacks, uvloop), spread over processes.

How the work is shaped: ``-c`` clients each get an equal share of ``-n``
(or run until ``--duration`` ends); with ``--processes P`` the clients are
split over P forked processes, each returning its encoded RunResult, merged
exactly in the parent. With ``--rate R`` each client sends on a fixed
schedule (R/c per second) and latency/rtt count from the *intended* send
time, so a stalled server cannot hide behind the clients' own waiting
(coordinated omission, as wrk2 corrects it).

Why the thread engine stays cheap: per request it does one ``sendall`` and
as few ``recv`` calls as the answer needs, appends three integers to lists,
and leaves parsing to ``exchange`` (bytes slicing) and histogram work to the
end of the run. Threads still share one GIL, so ``--processes`` (default: the
number of cores when ``-c`` allows) is what lets them use the machine.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from .. import loops
from ..sockets import kernel_timeouts
from .config import StressConfig
from .exchange import HttpReader, LineReader
from .board import Board, StopFlag
from .metrics import Recorder, RunResult, busy_between, cpu_times

ns = time.perf_counter_ns


class Target:
    """What one request is, for the line protocol or HTTP."""

    def __init__(self, cfg: StressConfig, worker: int) -> None:
        self.cfg = cfg
        self.batch = cfg.pipeline
        if cfg.http_url:
            url = urlsplit(cfg.http_url)
            self.host = url.hostname or "127.0.0.1"
            self.port = url.port or 80
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            ka = b"Connection: Keep-Alive\r\n" if cfg.keepalive else b""
            host_header = url.netloc.encode()
            # What ApacheBench sends, so both tools cost the server the same.
            self.http_request = (b"GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: clusterkit-stress\r\n"
                                 b"Accept: */*\r\n%s\r\n" % (path.encode(), host_header, ka))
        else:
            self.host, self.port = cfg.host, cfg.port
            self.http_request = b""
            if cfg.message:
                self.fixed = cfg.message
            else:
                self.fixed = None
                self.prefix = b"c%03d-" % worker
                self.pad = b"x" * max(0, cfg.size - len(self.prefix) - 9)

    def message(self, k: int) -> bytes:
        if self.fixed is not None:
            return self.fixed
        return b"%s%09d%s" % (self.prefix, k, self.pad)

    def request(self, k: int, count: int) -> tuple[bytes, LineReader | HttpReader, int]:
        if self.http_request:
            return self.http_request, HttpReader(), 1
        batch = min(self.batch, count)
        if batch == 1:
            msg = self.message(k)
            return msg + b"\n", LineReader([msg]), 1
        msgs = [self.message(k + j) for j in range(batch)]
        return b"\n".join(msgs) + b"\n", LineReader(msgs), batch


def _connect_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "connect-timeout"
    return "connect-error"


class Plan:
    """When and how much one client sends."""

    def __init__(self, cfg: StressConfig, start_ns: int, share: int | None, client: int) -> None:
        self.share = share  # None: until the deadline
        self.deadline = start_ns + int(cfg.duration * 1e9) if cfg.duration else None
        self.warm_end = start_ns + int(cfg.warmup * 1e9)
        self.start = start_ns
        self.interval = int(cfg.concurrency / cfg.rate * 1e9) if cfg.rate else 0
        self.offset = int(self.interval * client / cfg.concurrency) if self.interval else 0

    def intended(self, k: int) -> int:
        return self.start + self.offset + k * self.interval


def _record(rec: Recorder, reader, base: int, warm_end: int) -> None:
    outcomes = reader.outcomes if isinstance(reader, LineReader) else [reader.outcome]
    if base < warm_end:
        return
    for o in outcomes:
        if o.ok:
            rec.ok(base, o.first_ns - base, o.done_ns - base, o.label, o.nbytes, o.done_ns)
        else:
            rec.failed(base, o.label, o.done_ns, o.nbytes)


def thread_client(cfg: StressConfig, client: int, plan: Plan, rec: Recorder, board: Board, stop: StopFlag) -> None:
    target = Target(cfg, client)
    # Resolve once: create_connection would call getaddrinfo for every request.
    family, _, _, _, sockaddr = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)[0]
    timeout_ns = int(cfg.timeout * 1e9)
    progress = board.a
    failed_slot = board.failed_slot(client)
    streak_slot = board.streak_slot(client)
    sock: socket.socket | None = None
    k = 0
    total = plan.share
    wait = plan.start - ns()
    if wait > 0:
        time.sleep(wait / 1e9)  # every client starts together
    try:
        while not stop.is_set():
            if total is not None and k >= total:
                break
            if plan.deadline is not None and ns() >= plan.deadline:
                break
            payload, reader, batch = target.request(k, (total - k) if total is not None else cfg.pipeline)
            base = 0
            if plan.interval:
                base = plan.intended(k)
                delay = base - ns()
                if delay > 0:
                    time.sleep(delay / 1e9)
            if sock is None:
                t0 = ns()
                try:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.settimeout(cfg.timeout)
                    sock.connect(sockaddr)
                except OSError as exc:
                    sock.close()
                    sock = None
                    now = ns()
                    for _ in range(batch):
                        rec.failed(base or t0, _connect_error(exc), now)
                    k += batch
                    progress[client] = k
                    progress[failed_slot] = rec.result.failed
                    progress[streak_slot] += 1
                    continue
                rec.connected(ns() - t0)
                progress[streak_slot] = 0
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Blocking mode with kernel timeouts: one system call per recv/send.
                sock.settimeout(None)
                kernel_timeouts(sock, cfg.timeout, send=cfg.timeout)
                shortened = False
            sent = ns()
            base = base or sent
            try:
                sock.sendall(payload)
                while not reader.done:
                    left = timeout_ns - (ns() - sent)
                    if left <= 0:
                        raise TimeoutError
                    if left < timeout_ns * 0.9:
                        # A slow answer, or one in pieces: wait only for what is left
                        # (a system call, so only then).
                        kernel_timeouts(sock, left / 1e9)
                        shortened = True
                    elif shortened:
                        kernel_timeouts(sock, cfg.timeout)
                        shortened = False
                    chunk = sock.recv(262144)
                    now = ns()
                    if not chunk:
                        reader.close(now)
                        break
                    reader.feed(chunk, now)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: a kernel timeout ran out
                reader.close(ns(), "timeout")
            except OSError:
                reader.close(ns())
            _record(rec, reader, base, plan.warm_end)
            k += batch
            progress[client] = k
            progress[failed_slot] = rec.result.failed
            if not cfg.keepalive or not _all_ok(reader) or (
                    isinstance(reader, HttpReader) and not reader.keep_alive):
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()


def _all_ok(reader) -> bool:
    if isinstance(reader, LineReader):
        return all(o.ok for o in reader.outcomes)
    return reader.outcome is not None and reader.outcome.ok


# --------------------------------------------------------------------------
# asyncio engine


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
            delay = plan.intended(k) - ns()
            if delay > 0:
                self.runner.loop.call_later(delay / 1e9, self._go)
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
            self._connect_failed(_connect_error(exc))
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
        _record(self.runner.rec, reader, self.base, self.plan.warm_end)
        self.k += self.batch
        self.runner.progress[self.client] = self.k
        self.runner.progress[self.runner.failed_slot] = self.runner.rec.result.failed
        if not self.cfg.keepalive or not _all_ok(reader) or (isinstance(reader, HttpReader) and not reader.keep_alive):
            transport, self.transport = self.transport, None
            if transport is not None:  # None when the server closed first
                transport.close()
        self.next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader is not None:
            self.reader.close(ns())
            self.transport = None
            self._finish()
        self.transport = None

    def check_timeout(self, now: int, timeout_ns: int) -> None:
        if self.reader is not None and now - self.sent > timeout_ns:
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


# --------------------------------------------------------------------------
# running a share of the clients in this process


def shares(cfg: StressConfig) -> list[int | None]:
    if cfg.duration:
        return [None] * cfg.concurrency
    base, extra = divmod(cfg.requests, cfg.concurrency)
    return [base + (1 if i < extra else 0) for i in range(cfg.concurrency)]


def run_local(cfg: StressConfig, clients: list[int], start_ns: int, board: Board, process: int,
              keep_log: bool) -> tuple[RunResult, list]:
    cpu0, wall0 = time.process_time(), time.monotonic()
    all_shares = shares(cfg)
    plans = [(c, Plan(cfg, start_ns, all_shares[c], c)) for c in clients]
    stop = StopFlag(board)
    live = (board.a, board.hist_offset(process))
    if cfg.engine == "thread":
        # One Recorder per thread: no counter is shared between threads, so no
        # increment can be lost, and threads never contend on the same objects.
        # (The live histogram is shared, and may miss a count: it is only a view.)
        recs = [Recorder(RunResult(), keep_log, *live) for _ in plans]
        threads = [threading.Thread(target=thread_client, args=(cfg, c, plan, rec, board, stop), daemon=True)
                   for (c, plan), rec in zip(plans, recs)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.1)
    else:
        # One event loop thread: its clients can share a Recorder safely.
        recs = [Recorder(RunResult(), keep_log, *live)]
        loops.run(AsyncRunner(cfg, recs[0], board, stop).run(plans))
    result = RunResult()
    log: list = []
    for rec in recs:
        rec.flush()
        result.merge(rec.result)
        log.extend(rec.log or [])
    result.tool_cpu_s = time.process_time() - cpu0
    result.tool_wall_s = time.monotonic() - wall0
    return result, log


def _die_with_parent() -> None:
    """Linux: have the kernel SIGTERM this process if the parent dies (even by
    SIGKILL), so a killed run never leaves its load processes behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(cfg: StressConfig, clients: list[int], start_ns: int, shared, process: int, conn, keep_log: bool,
           parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above
        return
    board = Board(cfg.concurrency, min(cfg.processes, cfg.concurrency), shared)
    result, log = run_local(cfg, clients, start_ns, board, process, keep_log)
    conn.send((result.encode(), log))
    conn.close()


DEAD_STREAK = 3
"""Connects in a row that every client must fail before the target counts as dead."""


class Watch:
    """What the watching process does every few tens of ms: report progress, and
    end the run early when the target is dead (no client can connect any more)."""

    def __init__(self, cfg: StressConfig, board: Board, progress_cb) -> None:
        self.cpu_before = cpu_times()
        self.board = board
        self.shares = shares(cfg)
        self.progress_cb = progress_cb
        self.reason: str | None = None

    def tick(self) -> None:
        board = self.board
        if self.progress_cb:
            self.progress_cb(board)
        if self.reason is None and board.all_refused(self.shares, DEAD_STREAK):
            board.stop()
            self.reason = self._dead()

    def finish(self, result: RunResult) -> RunResult:
        if self.reason is None and self.board.all_refused([None] * self.board.n, DEAD_STREAK):
            self.reason = self._dead()  # a run too short for tick() to see it
        result.ended_early = self.reason
        result.machine_busy = busy_between(self.cpu_before, cpu_times())
        if self.progress_cb:
            self.progress_cb(self.board)
        return result

    def _dead(self) -> str:
        return (f"the target stopped accepting connections: every client's last {DEAD_STREAK} "
                f"connects failed, after {self.board.done():,} requests")


def run(cfg: StressConfig, progress_cb: Callable[[Board], None] | None = None,
        keep_log: bool = True) -> tuple[RunResult, list]:
    """Run the whole load; ``progress_cb(board)`` is called every few tens of ms."""
    start_ns = ns() + 50_000_000  # a moment for every client (and process) to be ready
    procs = min(cfg.processes, cfg.concurrency)
    groups = [list(range(cfg.concurrency))[i::procs] for i in range(procs)]
    if procs == 1:
        board = Board(cfg.concurrency, 1)
        watch = Watch(cfg, board, progress_cb)
        box: dict = {}
        worker = threading.Thread(target=lambda: box.update(out=run_local(cfg, groups[0], start_ns, board, 0,
                                                                          keep_log)), daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.02)
                watch.tick()
        except KeyboardInterrupt:
            board.stop()
            worker.join(cfg.timeout + 2)
        result, log = box["out"]
        return watch.finish(result), log
    ctx = multiprocessing.get_context("fork")
    shared = ctx.Array("q", Board.size_for(cfg.concurrency, procs), lock=False)
    board = Board(cfg.concurrency, procs, shared)
    watch = Watch(cfg, board, progress_cb)
    children = []
    for i, group in enumerate(groups):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(cfg, group, start_ns, shared, i, child_end, keep_log,
                                                     os.getpid()), daemon=True)
        p.start()
        child_end.close()
        children.append((p, parent_end))
    merged = RunResult()
    logs_all: list = []
    pending = list(children)
    try:
        while pending:
            for item in list(pending):
                p, conn = item
                if conn.poll(0.02):
                    data, log = conn.recv()
                    merged.merge(RunResult.decode(data))
                    logs_all.extend(log)
                    p.join(5)
                    pending.remove(item)
                elif not p.is_alive():
                    pending.remove(item)
                    merged.errors["engine-crashed"] += 1
            watch.tick()
    except KeyboardInterrupt:
        for p, _ in pending:
            p.terminate()
        raise
    return watch.finish(merged), logs_all


def default_processes(concurrency: int) -> int:
    return max(1, min(os.cpu_count() or 1, concurrency))
