"""The threaded HTTP server: blocking sockets, a thread per connection, or a
bounded pool of threads (``--pool N``), over the same core as the async one.

Why two designs: thread-per-connection is the classic teaching model (and
what the original assignment built); a bounded pool is what it should become
under load, because threads cost memory and the GIL. With ``--pool N``,
accepted connections wait in a bounded queue; when it is full, a new client
gets 503 at once instead of waiting unseen. While connections wait in the
queue, the threads take turns: a thread that has answered a connection's
requests puts the connection back at the end of the queue and takes the next
one (the parser, with any half-received request, goes along), so more
keep-alive clients than threads are all served, each in its turn; held until
it closed, a connection kept the clients behind it waiting for the whole run
(``ab -k -c 20`` against ``--pool 16``: four clients waited until the others
were done). Nor does a thread sit on an idle connection (keep-alive between
requests, or one that has sent nothing) while others wait: it puts it back
after ``POOL_IDLE_CHECK``, and closes it once idle ``POOL_IDLE_YIELD`` (two
idle connections held a ``--pool 2`` server from everyone else for the whole
keep-alive timeout). A queued connection's first request head is timed from
its accept, not from when a thread first reads it, and the lingering close
after an error answer is left to a thread of its own (``MAX_LINGERING``):
300 slowloris connections on ``--pool 8`` got their 408s 8 every 2 s.

Either way, connections taken at once are what the open-files limit holds
(``clusterkit.sockets.client_room``, as the async server's); past it a new
client gets 503 and a lingering close (``_turn_away``): it used to be taken
until ``accept`` failed (EMFILE), and the clients behind it waited in the
listen backlog for an answer that never came.

Deadlines live on the sockets: the request head must arrive within
``header_timeout`` (408 otherwise), an idle keep-alive connection is closed
after ``keepalive_timeout``, and one that takes no byte of its answers for
as long is cut (``event=send-timeout``, nginx's ``send_timeout``: one that
reads slowly but reads is served). They are kernel timeouts on sockets left in
blocking mode, not ``settimeout()`` (see ``clusterkit.sockets``: half the
system calls and GIL hand-offs per request). The listener blocks in
``accept`` too; stopping shuts it down to wake it. The listen backlog is
large: the original assignment listened with a backlog of 1 and lost
seconds to every dropped SYN under concurrency. A connection's thread waits
for the next connection when its own ends (``ThreadCache``), since starting
a thread costs more than serving a small file. Every thread stays on one
core unless ``--no-pin`` (``clusterkit.affinity``: the GIL passes between
threads far more cheaply there; 2.7x the keep-alive rate here).
"""

from __future__ import annotations

import _thread
import queue
import signal
import socket
import struct
import sys
import threading
import time
from typing import Callable, NamedTuple

from .. import logs, loops
from ..affinity import pin_process
from ..sockets import client_room, kernel_timeouts, linger_room
from .config import HttpServerConfig
from .core import CONTINUE, HttpError, RequestParser, build_response, error_response
from ..linger import linger
from .static import StaticFiles

BUSY_BODY = b"503 Service Unavailable: all worker threads are busy\n"
POOL_QUEUE = 128
"""At least this many accepted connections wait for a pool thread (8 per thread with
more threads) before a new client gets 503: enough for ``ab -c 100``."""
MAX_REFUSING = 64
"""Clients told 503 at once, at most (each lingers in a thread for up to 2 s); fewer
when the open-files limit leaves less room for them (``linger_room``)."""
MAX_LINGERING = 64
"""Pool connections whose error answer lingers at once, at most (each in a thread of
its own for up to 2 s); past it, the close after the answer is at once."""
SEND_CHECKS = 4
"""A blocked send looks at the clock this many times per keep-alive timeout (the
kernel's send timeout is that part of it): a client is cut at most a quarter late."""
POOL_IDLE_CHECK = 0.25
"""Seconds between a pool thread's looks at the queue while its connection is idle."""
POOL_IDLE_YIELD = 1.0
"""Seconds a connection must have been idle before a pool thread lets go of it for a
waiting client: shorter, and ab -k with more clients than threads met closes between
its requests (ab counts the request it had just sent as failed)."""


class Turn(NamedTuple):
    """A pool connection put back in the queue: what the thread that takes it next needs."""
    parser: RequestParser  # with what it has of a request not yet whole
    timeout: float  # the socket's receive timeout as it stands
    idle_since: float


class ThreadCache:
    """A thread per connection, each thread kept for the next connection
    when its own ends (as Java's cached thread pool): no limit on threads, but
    no thread made per connection either. Starting a Python thread cost about
    50 us here, handing a connection to a waiting one about 3 us; a thread
    idle for ``idle_timeout`` seconds exits.

    ``idle`` counts waiting threads not yet promised a connection: a thread
    that times out leaves only if one is left unpromised, else a connection
    is on its way to it."""

    def __init__(self, handle, idle_timeout: float = 5.0) -> None:
        self.handle = handle
        self.idle_timeout = idle_timeout
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.idle = 0
        self.lock = threading.Lock()

    def submit(self, *job) -> None:
        with self.lock:
            if self.idle:
                self.idle -= 1
                self.queue.put(job)
                return
        # _thread, not threading.Thread: Thread.start() waits until the new
        # thread runs, a round trip through the scheduler per connection.
        _thread.start_new_thread(self._run, job)

    def _run(self, *job) -> None:
        while True:
            self.handle(*job)
            with self.lock:
                self.idle += 1
            try:
                job = self.queue.get(timeout=self.idle_timeout)
            except queue.Empty:
                with self.lock:
                    if self.idle:
                        self.idle -= 1
                        return
                job = self.queue.get()  # promised to us already


class ThreadedHttpServer:
    def __init__(self, config: HttpServerConfig, elog: logs.EventLog) -> None:
        self.config = config
        self.elog = elog
        self.static = StaticFiles(config.root, config.name)
        # The host's own family (``--host ::1`` is IPv6), as the event loops find it.
        family, _, _, _, address = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        self.sock = socket.create_server(address[:2], family=family, backlog=config.backlog, reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.active: set[socket.socket] = set()
        self.lock = threading.Lock()
        # Connections taken (served, waiting in the pool's queue, or lingering after an
        # error answer), under ``lock``: each holds a descriptor until its close.
        self.clients = 0
        self.max_clients = client_room(sys.maxsize)  # taken at once: what the open-files limit holds
        self.too_many = error_response(HttpError(503, "too many connections"), self.static.backend_header)
        self.queue_full = build_response(503, BUSY_BODY, keep_alive=False, headers=self.static.backend_header)
        self.queue: queue.Queue | None = queue.Queue(maxsize=max(POOL_QUEUE, config.pool * 8)) if config.pool else None
        self.threads = ThreadCache(self._handle)
        self.refusals = ThreadCache(self._refuse)
        # A slot per client being told 503: its lingering close keeps a descriptor too.
        self.refusing = threading.BoundedSemaphore(min(MAX_REFUSING, linger_room()))
        self.lingerers = ThreadCache(self._linger)
        self.lingering = threading.BoundedSemaphore(MAX_LINGERING)  # a slot per pool connection lingering
        # Counted by the accepting thread; the rest of a burst is said a second on by a timer's.
        self.tally_lock = threading.Lock()
        self.turned_away = elog.tally(lambda n: f"event=busy refused={n} pool={config.pool} reason=queue-full",
                                      later=self._later)
        self.no_room = elog.tally(lambda n: f"event=busy refused={n} open={self.clients} "
                                            f"max_clients={self.max_clients} reason=open-files-limit",
                                  later=self._later)

    def start_pool(self) -> None:
        """The ``--pool`` threads, before the start is announced: a machine that
        cannot run as many says so at once (ThreadLimit), not in a traceback later."""
        for i in range(self.config.pool):
            try:
                threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True).start()
            except RuntimeError:  # "can't start new thread"
                raise ThreadLimit(f"--pool {self.config.pool}: this machine let only {i} threads start") from None

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, addr = self.sock.accept()
            except OSError:
                if self.stopping.is_set():
                    break
                time.sleep(0.05)  # EMFILE and friends: back off, then accept again
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                room = self.clients < self.max_clients
                if room:
                    self.clients += 1
            if not room:  # the open-files limit is near: 503, not a wait in the backlog unanswered
                self._turn_away(conn)
            elif self.queue is None:
                self.threads.submit(conn, addr[0])
            else:
                try:
                    self.queue.put_nowait((conn, addr[0], time.monotonic()))
                except queue.Full:
                    with self.lock:
                        self.clients -= 1  # (its descriptor is the refusal's now)
                    with self.tally_lock:
                        self.turned_away.count()
                    # As many as MAX_REFUSING at once; more wait (and the clients behind them
                    # in the listen backlog) rather than be closed without a word.
                    self.refusing.acquire()
                    self.refusals.submit(conn, self.queue_full)
        self.sock.close()
        with self.tally_lock:
            self.turned_away.flush(now=True)
            self.no_room.flush(now=True)

    def _turn_away(self, conn: socket.socket) -> None:
        """A client past ``max_clients``: 503 and a lingering close in a thread
        (``_refuse``), as the async server's ``linger.turn_away``; past the lingering
        closes' share of descriptors, in a flood, a close at once (what the client
        sent meanwhile may reset it), where waiting for a slot would keep the accept
        loop, and the clients behind it, 2 s."""
        with self.tally_lock:
            self.no_room.count()
        if self.refusing.acquire(blocking=False):
            self.refusals.submit(conn, self.too_many)
            return
        try:
            conn.send(self.too_many)  # (a new connection's empty send buffer takes it at once)
        except OSError:
            pass
        conn.close()

    def _later(self, delay: float, say_rest: Callable[[], object]) -> None:
        """``Tally``'s ``later`` without an event loop: a daemon timer thread."""
        def run() -> None:
            with self.tally_lock:
                say_rest()
        timer = threading.Timer(delay, run)
        timer.daemon = True
        timer.start()

    def _refuse(self, conn: socket.socket, answer: bytes) -> None:
        """``answer`` (a 503) and a lingering close, for a client the full queue or the
        open-files limit has no room for (in a thread of its own: the lingering takes
        up to 2 s). Closed at once, what the client sent meanwhile would turn the close
        into a reset, which can destroy the 503 before the client reads it (and ab
        stops the whole run at a reset)."""
        try:
            conn.sendall(answer)
            linger(conn)
        except OSError:
            pass
        finally:
            conn.close()
            self.refusing.release()

    def _linger(self, conn: socket.socket) -> None:
        """The lingering close after a pool connection's error answer, in a thread of
        its own: in the pool thread, a slowloris trickling on through it held the thread
        2 s per 408 (300 of them on ``--pool 8``: 8 answers every 2 s)."""
        try:
            linger(conn)
        except OSError:
            pass
        finally:
            self._close(conn)
            self.lingering.release()

    def _worker(self) -> None:
        while True:
            job = self.queue.get()  # type: ignore[union-attr]
            try:
                self._handle(*job)
            except Exception as exc:  # a bug: the connection is gone (closed), the pool keeps its thread
                if self.elog.error:
                    self.elog.line("ERROR", f"event=error reason={logs.quote(f'{type(exc).__name__}: {exc}')}")

    def _handle(self, conn: socket.socket, peer: str, accepted: float | None = None,
                turn: Turn | None = None) -> None:
        """Serve a connection until it ends, or (pool) until its turn does: then it
        goes back to the queue with ``turn``, what the next thread needs of it.
        ``accepted``: when a pool connection was accepted, a while before a thread
        takes it from the queue; its first head and its idleness count from then."""
        limits = self.config.limits
        elog = self.elog
        pool = self.queue
        with self.lock:
            self.active.add(conn)
        # Idle, a pool thread looks at its queue every POOL_IDLE_CHECK seconds.
        idle_wait = limits.keepalive_timeout if pool is None else min(POOL_IDLE_CHECK, limits.keepalive_timeout)
        if turn is None:
            parser = RequestParser(limits)
            current = idle_wait
            idle_since = time.monotonic() if accepted is None else accepted
            # A blocked send returns this often, for _send to look at the clock.
            kernel_timeouts(conn, current, send=limits.keepalive_timeout / SEND_CHECKS)
        else:
            parser, current, idle_since = turn
        requeued = lingering = False
        try:
            while not self.stopping.is_set():
                # Between requests: the keep-alive timeout; within a head: what is left of the
                # header timeout (a pool thread looks at its queue meanwhile, as when idle: a
                # slowloris held it for the whole header timeout). Changing it is a system
                # call, so only when it changes.
                if parser.in_progress:
                    left = limits.header_timeout - (time.monotonic() - parser.head_started)
                    if left <= 0:
                        raise HttpError(408, "slow-head")
                    current = left if pool is None else min(left, idle_wait)
                    kernel_timeouts(conn, current)
                elif current != idle_wait:
                    current = idle_wait
                    kernel_timeouts(conn, current)
                try:
                    data = conn.recv(65536)
                except BlockingIOError:  # SO_RCVTIMEO ran out
                    if parser.in_progress:
                        if pool is None or time.monotonic() - parser.head_started >= limits.header_timeout:
                            raise HttpError(408, "slow-head") from None
                    else:
                        idle_for = time.monotonic() - idle_since
                        if (pool is None or idle_for >= limits.keepalive_timeout
                                or (idle_for >= POOL_IDLE_YIELD and not pool.empty())):
                            return  # idle for the keep-alive timeout, or a pool thread someone waits for
                    if self._requeue(conn, peer, Turn(parser, current, idle_since)):
                        requeued = True
                        return
                    continue
                if not data:
                    return
                idle_since = time.monotonic()
                requests = parser.feed(data)
                if accepted is not None:
                    # Its first head may have begun long before a thread read it, while
                    # it waited in the queue: the header timeout counts from the accept.
                    if parser.in_progress and not requests:
                        parser.head_started = accepted
                    accepted = None
                while requests:  # a budget of answers at a time (StaticFiles.answer)
                    out, keep, n = self.static.answer(requests, peer, elog)
                    self._send(conn, out, peer)
                    if not keep:
                        return
                    requests = requests[n:] if n < len(requests) else None
                if parser.expects_continue:
                    parser.expects_continue = False
                    self._send(conn, CONTINUE, peer)
                if parser.error is not None:
                    raise parser.error
                if pool is not None and self._requeue(conn, peer, Turn(parser, current, idle_since)):
                    requeued = True
                    return
        except HttpError as exc:
            if elog.info:  # (a client's fault, as a 404 is: no warning)
                elog.line("INFO", f"event=refused client={peer} status={exc.status} reason={logs.quote(exc.detail)}")
            try:
                self._send(conn, error_response(exc, self.static.backend_header), peer)
                if pool is None:
                    linger(conn)
                elif self.lingering.acquire(blocking=False):
                    self.lingerers.submit(conn)  # not in a pool thread, which others wait for
                    lingering = True
                # (else: past MAX_LINGERING at once, a close at once)
            except OSError:
                pass
        except OSError:
            pass
        finally:
            if not requeued:
                with self.lock:
                    self.active.discard(conn)
                parser.close()
                if not lingering:
                    self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        """Close a connection taken: its descriptor is free for the next client."""
        conn.close()
        with self.lock:
            self.clients -= 1

    def _send(self, conn: socket.socket, data: bytes, peer: str) -> None:
        """``sendall``, with nginx's ``send_timeout``: a client that has taken no byte
        for ``keepalive_timeout`` is cut (a reset, logged; TimeoutError). One that reads
        slowly but reads is served however long it takes. (Before, a ``sendall`` with a
        kernel timeout that any progress restarted, of the longer of the two timeouts:
        a client that never read held its thread for 30 s with a keep-alive timeout
        of 3, and four of them a ``--pool 4`` server from everyone.)"""
        try:
            sent = conn.send(data)  # mostly the whole of it, at once
        except BlockingIOError:  # SO_SNDTIMEO: a send check's time without a byte taken
            sent = 0
        if sent == len(data):
            return
        limit = self.config.limits.keepalive_timeout
        view = memoryview(data)[sent:]
        stalled_since = time.monotonic() - (0 if sent else limit / SEND_CHECKS)
        while view:
            try:
                sent = conn.send(view)
            except BlockingIOError:
                if time.monotonic() - stalled_since < limit:
                    continue
                if self.elog.warning:
                    self.elog.line("WARNING", f"event=send-timeout client={peer} buffered={len(view)}")
                # A reset, not a FIN after the unsent bytes: the close frees them now.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                raise TimeoutError("send-timeout") from None
            view = view[sent:]
            stalled_since = time.monotonic()

    def _requeue(self, conn: socket.socket, peer: str, turn: Turn) -> bool:
        """Put a connection whose turn is over at the end of the pool's queue, when
        others wait there (False when none does, or the queue is full: it is served
        on). It leaves ``active`` first: once queued, another thread may take it and
        add it before this one is done."""
        if self.queue.empty():  # type: ignore[union-attr]
            return False
        with self.lock:
            self.active.discard(conn)
        try:
            self.queue.put_nowait((conn, peer, None, turn))  # type: ignore[union-attr]
        except queue.Full:
            with self.lock:
                self.active.add(conn)
            return False
        return True

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() the main thread is blocked in
        except OSError:
            pass

    def drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.active:
                    return
            time.sleep(0.05)
        with self.lock:
            for conn in list(self.active):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class ThreadLimit(Exception):
    """Fewer threads would start than ``--pool`` asks for."""


def run_threaded(config: HttpServerConfig, elog: logs.EventLog, announce) -> None:
    server: ThreadedHttpServer | None = None
    signalled = []

    def on_signal(signum, frame):
        signalled.append(signum)
        if server is not None:
            server.stop()

    # Before the port opens: a Ctrl-C as soon as it is open is a graceful stop too.
    for sig in loops.stop_signals():
        signal.signal(sig, on_signal)
    server = ThreadedHttpServer(config, elog)
    if signalled:
        server.stop()
    core = pin_process(-1) if config.pin else None  # before any worker thread starts: they inherit it
    server.start_pool()
    announce(server.port, core, server.max_clients)
    server.serve()
    server.drain()
