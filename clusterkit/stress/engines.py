"""The load engines, spread over processes: threads (one per client, blocking
sockets; here), asyncio (one protocol per client, callbacks, uvloop;
``async_engine``) and epoll (one readiness loop on raw sockets; ``epoll_engine``).

How the work is shaped: ``-c`` clients each get an equal share of ``-n``
(or run until ``--duration`` ends); with ``--processes P`` the clients are
split over P forked processes, each returning its encoded RunResult, merged
exactly in the parent. With ``--rate R`` each client sends on a fixed
schedule (R/c per second) and latency/rtt count from the *intended* send
time, so a stalled server cannot hide behind the clients' own waiting
(coordinated omission, as wrk2 corrects it).

Why the thread engine stays cheap: per request it does one ``sendall`` and
as few ``recv`` calls as the answer needs, on a blocking socket with kernel
timeouts (no ``poll`` first) and into 64 KiB buffers (``recv(256 KiB)``
has malloc map and unmap a fresh buffer on every call, which halved the
rate), counts its timings in dicts, and leaves parsing to ``exchange``
(bytes slicing) and histogram work to the end of the run. Threads still
share one GIL, so ``--processes`` (default: the number of cores when ``-c``
allows) is what lets them use the machine.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable

from .. import loops
from ..affinity import pin_to_core
from ..sockets import kernel_timeouts, outgoing
from .board import Board, StopFlag
from .config import StressConfig
from .async_engine import AsyncRunner
from .epoll_engine import EpollRunner
from .metrics import KEEP_ALL, LOG_KEPT, Recorder, RunResult, busy_between, cpu_times
from .plan import (CLOSES, DEAD_STREAK, LINGER_NS, Client, Plan, address, connect_error, ns, reusable,
                   server_closes)
from .server_cpu import ServerCpu

STOP_CHECK_S = 0.1
"""How often a thread waiting for a --rate send looks at the stop flag."""


def sleep_until(at: int, stop: StopFlag) -> bool:
    """Sleep to ``at`` (ns), in slices that look at ``stop``: False if the run was
    stopped meanwhile. (One sleep to a far-off --rate send, at --rate 0.1 ten seconds,
    left Ctrl-C and SIGTERM unanswered for as long.)"""
    while not stop.is_set():
        left = at - ns()
        if left <= 0:
            return True
        time.sleep(min(left / 1e9, STOP_CHECK_S))
    return False


def thread_client(cfg: StressConfig, index: int, plan: Plan, rec: Recorder, board: Board, stop: StopFlag,
                  socks: dict[int, socket.socket]) -> None:
    """One client in a thread of its own, on a blocking socket (in ``socks`` while
    open, so that a stopped run can wake it from a recv: ``wake``)."""
    timeout_ns = int(cfg.timeout * 1e9)
    sock: socket.socket | None = None
    try:
        c = Client(cfg, index, plan, rec, board, board.failed_slot(index))
        family, sockaddr = address(cfg, c.target)
        wait = plan.start - ns()
        if wait > 0:
            time.sleep(wait / 1e9)  # every client starts together
        payload: bytes | None = None  # the next request, when c.follow already made it
        while payload is not None or not c.over(stop):
            if payload is None:
                at = c.due()
                if at:
                    if not sleep_until(at, stop):
                        continue  # stopped while it waited (over() says so)
                    news = idle_news(sock) if sock is not None else None
                    if news is not None:  # closed while we waited, or an answer nobody asked for: reopen
                        if news:
                            c.unasked(news)
                        sock.close()
                        sock = None
                if sock is None:
                    c.connect_started = ns()
                    try:
                        sock = outgoing(socket.socket(family, socket.SOCK_STREAM))
                        # Blocking mode with kernel timeouts: one system call per
                        # connect, recv or send (Linux bounds connect by SO_SNDTIMEO).
                        kernel_timeouts(sock, cfg.timeout, send=cfg.timeout)
                        sock.connect(sockaddr)
                    except OSError as exc:  # (from socket() too: out of descriptors)
                        if sock is not None:
                            sock.close()
                            sock = None
                        c.connect_failed(connect_error(exc))
                        continue
                    c.connected()
                    socks[index] = sock
                    if cfg.keepalive:  # one write per connection cannot meet Nagle's delay
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    shortened = False
                payload = c.request()
            reader, sent = c.reader, c.sent
            out, payload = payload, None
            verdict = 0
            try:
                sock.sendall(out)
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
                    chunk = sock.recv(65536)
                    now = ns()
                    if c.expect is not None:  # the line protocol's steady state, in one step
                        payload = c.again(chunk, now)
                        if payload is not None:
                            break
                    verdict = c.whole(chunk, now)
                    if verdict:  # the steady state: the whole answer, as expected
                        break
                    if not chunk:
                        reader.close(now)
                        break
                    reader.feed(chunk, now)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: a kernel timeout ran out
                reader.close(ns(), "timeout")
            except OSError:
                reader.close(ns())
            if payload is not None:  # counted by c.again, and the next request made (b"": not yet due)
                payload = payload or None
                continue
            if verdict == CLOSES:  # answered, and the server closes the connection: counted at its close
                drain(c, sock, cfg.timeout, stop)
                sock = None
                continue
            if c.reader is None:  # counted by c.whole
                payload = c.follow(now)  # the connection carries the next request
                continue
            if stop.is_set():  # stopped (Ctrl-C, a dead target): what was on its way is not counted
                break
            if c.server_closed_first(reader):  # again, on a new connection
                sock.close()
                sock = None
                continue
            if server_closes(reader):  # (the same, for an answer the reader took)
                drain(c, sock, cfg.timeout, stop)
                sock = None
                continue
            if c.lingers(reader, ns()):
                wait = min(cfg.timeout, LINGER_NS / 1e9)
                kernel_timeouts(sock, wait)
                extra = linger(sock, wait)
                if extra:
                    c.came_after(extra)
            c.answered()
            if not reusable(cfg, reader):
                sock.close()
                sock = None
    except Exception:  # a bug: said, and counted, so that the run cannot pass for a clean one
        traceback.print_exc()
        rec.failed(ns(), "engine-crashed", ns())
    finally:
        socks.pop(index, None)
        if sock is not None:
            sock.close()


def wake(socks: dict[int, socket.socket]) -> None:
    """Wake the clients blocked in a recv (or a connect) of a stopped run: they
    would each wait out --timeout first."""
    for sock in list(socks.values()):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def idle_news(sock: socket.socket) -> bytes | None:
    """What came on this idle keep-alive connection (between --rate sends), in
    one non-blocking peek: None, nothing; b"", the server closed it (its idle
    timeout); else bytes of an answer nobody asked for (plan.Client.unasked)."""
    try:
        return sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def linger(sock: socket.socket, timeout: float) -> int:
    """Half-close after the last answer and read until the server closes, for
    ``timeout`` at most: the bytes that came first (plan.Client.lingers)."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return 0
    return await_close(sock, timeout)


def drain(c: Client, sock: socket.socket, timeout: float, stop: StopFlag) -> None:
    """Answered, on a connection the server closes: wait for its close (``timeout``
    at most), count the answer then (``Client.drained``), and close the socket.
    Stopped meanwhile (Ctrl-C), it is not counted, as in the other engines."""
    c.drain_extra = await_close(sock, timeout)
    if not stop.is_set():
        c.drained()
    sock.close()


def await_close(sock: socket.socket, timeout: float) -> int:
    """Read until the server closes, for ``timeout`` at most in all; the bytes that
    came first (a second answer). Each recv waited the socket's whole kernel
    timeout again: a server that sent a byte a second held its client for ever."""
    extra = 0
    end = time.monotonic() + timeout
    try:
        while chunk := sock.recv(65536):
            extra += len(chunk)
            left = end - time.monotonic()
            if left <= 0:
                break
            kernel_timeouts(sock, left)  # (only once bytes came: the usual close costs no call)
    except OSError:  # includes BlockingIOError: the kernel timeout ran out
        pass
    return extra


# --------------------------------------------------------------------------
# running a share of the clients in this process


def shares(cfg: StressConfig) -> list[int | None]:
    if cfg.duration:
        return [None] * cfg.concurrency
    base, extra = divmod(cfg.requests, cfg.concurrency)
    return [base + (1 if i < extra else 0) for i in range(cfg.concurrency)]


def run_local(cfg: StressConfig, clients: list[int], start_ns: int, board: Board, process: int,
              keep_log: int) -> tuple[RunResult, list]:
    """Run this process's clients; called in a thread of its own or in a load
    process. Before starting the clients it lowers that thread's priority
    (``--nice``; Linux applies it per thread, and threads started later
    inherit it) and, thread engine, pins it to a core.

    Why lower the priority: when the tool and the server under test share the
    cores, a server that wakes with work to do otherwise waits for the tool's
    time slice, the cores go idle in between, and the tool measures its own
    scheduling. Measured here (nginx, no keep-alive, 2 cores): 15k requests/s
    at equal priority, 17.7k at nice 5, against ApacheBench's 21k."""
    cpu0, wall0 = time.process_time(), time.monotonic()
    # What exists now (modules, the report's code) is not garbage: keep the
    # collector's full passes from walking it again and again during the run
    # (collected first, so that nothing a --sweep's earlier run left is kept).
    gc.collect()
    gc.freeze()
    if cfg.nice:
        try:
            os.nice(cfg.nice)
        except OSError:
            pass
    if cfg.engine == "thread" and cfg.pin:
        pin_to_core(process)
    all_shares = shares(cfg)
    plans = [(c, Plan(cfg, start_ns, all_shares[c], c)) for c in clients]
    stop = StopFlag(board)
    live = (board.a, board.hist_offset(process))
    cap = LOG_KEPT * len(clients) // cfg.concurrency  # this process's share of the per-request log
    if cfg.engine == "thread":
        # One Recorder per thread: no counter is shared between threads, so no
        # increment can be lost, and threads never contend on the same objects.
        # (The live histogram is shared, and may miss a count: it is only a view.)
        recs = [Recorder(RunResult(), keep_log, *live, log_cap=cap // len(plans)) for _ in plans]
        socks: dict[int, socket.socket] = {}
        threads = [threading.Thread(target=thread_client, args=(cfg, c, plan, rec, board, stop, socks), daemon=True)
                   for (c, plan), rec in zip(plans, recs)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.1)
                if stop.is_set():
                    wake(socks)
    elif cfg.engine == "epoll":
        recs = [Recorder(RunResult(), keep_log, *live, log_cap=cap)]
        EpollRunner(cfg, recs[0], board, stop).run(plans)
    else:
        # One event loop thread: its clients can share a Recorder safely.
        recs = [Recorder(RunResult(), keep_log, *live, log_cap=cap)]
        loops.run(AsyncRunner(cfg, recs[0], board, stop).run(plans))
    result = RunResult()
    log: list = []
    for rec in recs:
        rec.flush()
        result.merge(rec.result)
        log.extend(rec.entries())
    result.tool_cpu_s = time.process_time() - cpu0
    result.tool_wall_s = time.monotonic() - wall0
    gc.unfreeze()
    return result, log


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process if the parent dies (even by
    SIGKILL), so a killed run never leaves its load processes behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(cfg: StressConfig, clients: list[int], start_ns: int, shared, process: int, conn, keep_log: int,
           parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above
        return
    # Ctrl-C reaches every process of the terminal's group, and so may a stop signal
    # (a hangup; timeout and systemd signal the group): the parent alone decides (it
    # stops the run through the board, and this process reports what it has).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    board = Board(cfg.concurrency, min(cfg.processes, cfg.concurrency), shared)
    result, log = run_local(cfg, clients, start_ns, board, process, keep_log)
    conn.send((result.encode(), log))
    conn.close()


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) ends the run as Ctrl-C does; its name is the text."""


class Watch:
    """What the watching process does every few tens of ms: report progress, and
    end the run early when the target is dead (no client gets anything back any
    more: its connects fail, or its requests time out)."""

    def __init__(self, cfg: StressConfig, board: Board, progress_cb, server: ServerCpu, measure_from: int) -> None:
        self.cpu_before = cpu_times()
        self.server = server
        self.measure_from = measure_from  # when the warm-up ends: the server's CPU counts from then
        self.board = board
        self.shares = shares(cfg)
        self.timeout = cfg.timeout
        self.progress_cb = progress_cb
        self.dead = False  # every client got nothing back for DEAD_STREAK requests in a row
        self.interrupted = False  # Ctrl-C
        self.how = "Ctrl-C"  # or the stop signal's name

    def tick(self) -> None:
        if self.measure_from and ns() >= self.measure_from:
            self.measure_from = 0
            self.server.start()
        board = self.board
        if self.progress_cb:
            self.progress_cb(board)
        if not (self.dead or self.interrupted) and board.all_refused(DEAD_STREAK, self.shares):
            board.stop()
            self.dead = True

    def interrupt(self, exc: KeyboardInterrupt) -> None:
        """Ctrl-C (or a stop signal: ``Stopped``): stop every client; the run ends with
        what it has, as ApacheBench's does."""
        self.board.stop()
        self.interrupted = True
        self.how = str(exc) if isinstance(exc, Stopped) else "Ctrl-C"

    def finish(self, result: RunResult) -> RunResult:
        if not self.interrupted and self.board.all_refused(DEAD_STREAK, self.shares):
            self.dead = True  # a run too short for tick() to see it
        result.interrupted = self.interrupted and not self.dead
        result.ended_early = self._reason(result) if self.dead or self.interrupted else None
        result.machine_busy = busy_between(self.cpu_before, cpu_times())
        self.server.stop()
        result.server_cpu_s = self.server.seconds
        if self.progress_cb:
            self.progress_cb(self.board)
        return result

    def _reason(self, result: RunResult) -> str:
        """Why the run ended early, counted from the result (the board, when the reason
        was found, missed what came after)."""
        done = result.complete + result.failed
        if result.interrupted:
            return f"interrupted ({self.how}) after {done:,} requests"
        errors = result.errors
        refused = errors.get("refused", 0) + errors.get("connect-timeout", 0) + errors.get("connect-error", 0)
        ports = errors.get("no-local-port", 0)  # (no-descriptor never ends a run: see Client.connect_failed)
        if ports > max(refused, errors.get("timeout", 0)):
            result.local_shortage = True
            return (f"this machine ran out of local ports to connect from (each connection leaves one in "
                    f"TIME_WAIT for a minute: use -k, or fewer requests), after {done:,} requests; the target "
                    f"was not at fault")
        if errors.get("timeout", 0) > refused:
            what = (f"stopped answering: every client's last {DEAD_STREAK} requests timed out (not a byte "
                    f"back within --timeout {self.timeout:g} s; a target that is only slow needs a longer one)")
        else:
            what = f"stopped accepting connections: every client's last {DEAD_STREAK} connects failed"
        return f"the target {what}, after {done:,} requests"


TICK_S = 0.02
"""How often the watching process looks at the board (progress, a dead target)."""


def run(cfg: StressConfig, progress_cb: Callable[[Board], None] | None = None,
        keep_log: int = KEEP_ALL, tick: float = TICK_S) -> tuple[RunResult, list]:
    """Run the whole load; ``progress_cb(board)`` is called every ``tick`` seconds
    (shorter for a --kill-backend at a share of the requests: it fires from there)."""
    server = ServerCpu(*cfg.destination)  # (looked for before the clock starts: it reads /proc)
    start_ns = ns() + 50_000_000  # a moment for every client (and process) to be ready
    measure_from = start_ns + int(cfg.warmup * 1e9)
    procs = min(cfg.processes, cfg.concurrency)
    groups = [list(range(cfg.concurrency))[i::procs] for i in range(procs)]
    if procs == 1:
        board = Board(cfg.concurrency, 1)
        watch = Watch(cfg, board, progress_cb, server, measure_from)
        box: dict = {}
        def work() -> None:
            try:
                box["out"] = run_local(cfg, groups[0], start_ns, board, 0, keep_log)
            except Exception:  # a bug: said, and counted, as a load process's crash is
                traceback.print_exc()
                crashed = RunResult()
                _crashed(crashed)
                box["out"] = (crashed, [])

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(tick)
                watch.tick()
        except KeyboardInterrupt as exc:
            watch.interrupt(exc)
            # Waited for by polling: a join that Ctrl-C interrupted may not wait again.
            # (A second Ctrl-C ends the wait, and the run, at once.)
            deadline = time.monotonic() + cfg.timeout + 2
            while "out" not in box and time.monotonic() < deadline:
                time.sleep(0.02)
            if "out" not in box:
                raise
        result, log = box["out"]
        return watch.finish(result), log
    ctx = multiprocessing.get_context("fork")
    shared = ctx.Array("q", Board.size_for(cfg.concurrency, procs), lock=False)
    board = Board(cfg.concurrency, procs, shared)
    watch = Watch(cfg, board, progress_cb, server, measure_from)
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
            try:
                for item in list(pending):
                    p, conn = item
                    if conn.poll(tick / len(pending)):
                        try:
                            data, log = conn.recv()
                        except (EOFError, OSError):  # it died (kill -9) and its pipe closed: poll says so too
                            pending.remove(item)
                            _crashed(merged)
                            continue
                        merged.merge(RunResult.decode(data))
                        logs_all.extend(log)
                        p.join(5)
                        pending.remove(item)
                    elif not p.is_alive():
                        pending.remove(item)
                        _crashed(merged)
                watch.tick()
            except KeyboardInterrupt as exc:
                if watch.interrupted:  # the second Ctrl-C: no report, at once
                    raise
                watch.interrupt(exc)  # the first: the load processes stop and report what they have
    except KeyboardInterrupt:
        for p, _ in pending:
            p.kill()  # (they ignore SIGTERM: the parent decides)
        raise
    return watch.finish(merged), logs_all


def _crashed(result: RunResult) -> None:
    """A load process died without its report: the others' results stand, and the
    run counts one failure for it, so that it cannot pass for a clean run."""
    result.errors["engine-crashed"] += 1
    result.failed += 1


def default_processes(concurrency: int) -> int:
    return max(1, min(os.cpu_count() or 1, concurrency))
