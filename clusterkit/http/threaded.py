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
were done). Nor does a thread wait on a connection with nothing to read (idle
between requests, or a head begun and not whole): it parks it with the
``Poller``, one thread with a selector that hands it back to the queue once it
is readable, and keeps the deadlines of those it holds (Tomcat's NIO poller in
front of its workers). A thread used to wait a quarter of a second on each idle
connection it took, and close one idle for a second when others waited:
``ab -k -c 100`` against ``--pool 8`` had its last requests wait a second
behind ab's idle connections, and counted the closes as failed requests. A
queued connection's first request head is timed from its accept, not from
when a thread first reads it, and the lingering close after an error answer is
left to a thread of its own (``MAX_LINGERING``): 300 slowloris connections on
``--pool 8`` got their 408s 8 every 2 s.

Either way, connections taken at once are what the open-files limit holds
(``clusterkit.sockets.client_room``, as the async server's); past it a new
client gets 503 and a lingering close (``_turn_away``): it used to be taken
until ``accept`` failed (EMFILE), and the clients behind it waited in the
listen backlog for an answer that never came.

Deadlines live on the sockets (a parked pool connection's, in the poller):
the request head must arrive within ``header_timeout`` (408 otherwise), an
idle keep-alive connection is closed after ``keepalive_timeout``, and one that
takes no byte of its answers for as long is cut (``event=send-timeout``,
nginx's ``send_timeout``: one that reads slowly but reads is served). The
sockets' are kernel timeouts on sockets left in
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
import heapq
import queue
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from typing import Callable, NamedTuple

from .. import logs, loops
from ..affinity import pin_process
from ..sockets import client_room, kernel_timeouts, linger_room, listen_all
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
"""Pool connections whose last answer lingers at once, at most (an error answer, or
one after pipelined requests; each in a thread of its own for up to 2 s); past it,
the close after the answer is at once."""
SEND_CHECKS = 4
"""A blocked send looks at the clock this many times per keep-alive timeout (the
kernel's send timeout is that part of it): a client is cut at most a quarter late."""


class Turn(NamedTuple):
    """A pool connection no thread holds (queued or parked): what the thread that takes it next needs."""
    parser: RequestParser  # with what it has of a request not yet whole
    idle_since: float
    answered: int = 0  # answers sent on the connection so far (after more than one, a close lingers)


class Poller:
    """The pool's one thread that watches the connections no pool thread holds
    while they have nothing to read: idle between requests, or with a request head
    begun and not whole (Tomcat's NIO poller, in front of its workers). A connection
    that becomes readable goes back to the pool's queue (``ready``); so does one
    whose head is past the header timeout, for its thread to answer 408; one idle
    for the keep-alive timeout is closed (``drop``), as is every one at ``stop``.
    Without it, a pool thread waited a quarter of a second on each idle connection
    it took: ab -k -c 100 against --pool 8 had its last requests wait a second
    behind the idle connections of clients that were done.

    Other threads hand connections over with ``park`` (a list, and a byte on a
    socketpair to wake the selector): only this thread touches the selector."""

    def __init__(self, ready: Callable[[socket.socket, str, Turn], None],
                 drop: Callable[[socket.socket, Turn], None]) -> None:
        self.ready = ready
        self.drop = drop
        self.selector = selectors.DefaultSelector()
        self.wakeup, self.waker = socket.socketpair()
        self.wakeup.setblocking(False)
        self.waker.setblocking(False)
        self.selector.register(self.wakeup, selectors.EVENT_READ)
        self.lock = threading.Lock()
        self.pending: list[tuple[socket.socket, str, Turn, float]] = []  # parked, not yet in the selector
        self.stopping = False
        self.stopped = False
        # The deadlines, soonest first: (deadline, seq, conn); an entry whose seq is no
        # longer the connection's in ``parked`` (handed back since) is stale.
        self.deadlines: list[tuple[float, int, socket.socket]] = []
        self.parked: dict[socket.socket, int] = {}
        self.seq = 0

    def park(self, conn: socket.socket, peer: str, turn: Turn, deadline: float) -> None:
        """Watch ``conn`` until it is readable or ``deadline`` (monotonic) passes."""
        with self.lock:
            stopped = self.stopped
            if not stopped:
                wake = not self.pending  # (else a wake is on its way already)
                self.pending.append((conn, peer, turn, deadline))
        if stopped:
            self.drop(conn, turn)
        elif wake:
            self._wake()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            self.waker.send(b"\0")
        except OSError:  # (its buffer full: the poller has wakes to read)
            pass

    def run(self) -> None:
        while True:
            timeout = max(0.0, self.deadlines[0][0] - time.monotonic()) if self.deadlines else None
            for key, _ in self.selector.select(timeout):
                if key.fileobj is self.wakeup:
                    try:
                        while self.wakeup.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                self._hand_back(key.fileobj, key.data)  # type: ignore[arg-type]
            with self.lock:
                pending, self.pending = self.pending, []
                stopping = self.stopped = self.stopping
            if stopping:
                break
            for conn, peer, turn, deadline in pending:
                self.seq += 1
                self.parked[conn] = self.seq
                self.selector.register(conn, selectors.EVENT_READ, (peer, turn))
                heapq.heappush(self.deadlines, (deadline, self.seq, conn))
            if len(self.deadlines) > 2 * len(self.parked) + 64:
                # Most are stale (a connection parked between each of its requests): a
                # keep-alive timeout's worth of them would pile up, closed sockets and all.
                self.deadlines = [d for d in self.deadlines if self.parked.get(d[2]) == d[1]]
                heapq.heapify(self.deadlines)
            now = time.monotonic()
            while self.deadlines and self.deadlines[0][0] <= now:
                _, seq, conn = heapq.heappop(self.deadlines)
                if self.parked.get(conn) == seq:
                    peer, turn = self.selector.get_key(conn).data
                    if turn.parser.in_progress:
                        self._hand_back(conn, (peer, turn))  # its thread answers 408
                    else:
                        self._let_go(conn)
                        self.drop(conn, turn)  # idle for the keep-alive timeout
        # Stopping: every connection parked is closed (they are in no thread's hands to drain).
        for conn, peer, turn, _ in pending:
            self.drop(conn, turn)
        for key in list(self.selector.get_map().values()):
            if key.fileobj is not self.wakeup:
                self._let_go(key.fileobj)  # type: ignore[arg-type]
                self.drop(key.fileobj, key.data[1])  # type: ignore[arg-type]

    def _let_go(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        del self.parked[conn]

    def _hand_back(self, conn: socket.socket, data: tuple[str, Turn]) -> None:
        self._let_go(conn)
        self.ready(conn, *data)


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
        self.socks = listen_all(config.host, config.port, config.backlog)
        self.port = self.socks[0].getsockname()[1]
        self.stopping = threading.Event()
        self.active: dict[socket.socket, RequestParser] = {}  # served now, with their parsers
        self.forced = threading.Event()  # a second signal: the drain does not wait
        self.lock = threading.Lock()
        # Connections taken (served, waiting in the pool's queue, or lingering after an
        # error answer), under ``lock``: each holds a descriptor until its close.
        self.clients = 0
        self.max_clients = client_room(sys.maxsize)  # taken at once: what the open-files limit holds
        self.too_many = error_response(HttpError(503, "too many connections"), self.static.backend_header)
        self.queue_full = build_response(503, BUSY_BODY, keep_alive=False, headers=self.static.backend_header)
        self.queue: queue.Queue | None = queue.Queue(maxsize=max(POOL_QUEUE, config.pool * 8)) if config.pool else None
        # Readable again, a parked connection waits its turn in the queue (a blocking put: the
        # pool's threads take from it without ever waiting on the poller).
        self.poller = Poller(lambda conn, peer, turn: self.queue.put((conn, peer, None, turn)),  # type: ignore
                             self._drop) if config.pool else None
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
        if self.poller is not None:
            try:
                threading.Thread(target=self.poller.run, name="poller", daemon=True).start()
            except RuntimeError:
                raise ThreadLimit(f"--pool {self.config.pool}: this machine let only {self.config.pool} threads "
                                  f"start, not the poller's beside them") from None

    def serve(self) -> None:
        """Accept until stopped: on the first listening socket in this thread, on
        each other (``localhost``'s ``::1`` beside 127.0.0.1) in a thread of its own."""
        others = [threading.Thread(target=self._accept, args=(sock,), name=f"accept-{i}", daemon=True)
                  for i, sock in enumerate(self.socks[1:], 1)]
        for thread in others:
            thread.start()
        self._accept(self.socks[0])
        for thread in others:
            thread.join()
        with self.tally_lock:
            self.turned_away.flush(now=True)
            self.no_room.flush(now=True)

    def _accept(self, sock: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                conn, addr = sock.accept()
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
        sock.close()

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
        goes back to the queue, or to the poller when it has nothing to read, with
        ``turn``, what the next thread needs of it. ``accepted``: when a pool
        connection was accepted, a while before a thread takes it from the queue;
        its first head and its idleness count from then."""
        limits = self.config.limits
        elog = self.elog
        pool = self.queue
        # A pool thread never waits on a connection: one with nothing to read is the poller's.
        flags = 0 if pool is None else socket.MSG_DONTWAIT
        current = limits.keepalive_timeout
        if turn is None:
            parser = RequestParser(limits)
            idle_since = time.monotonic() if accepted is None else accepted
        else:
            parser, idle_since = turn.parser, turn.idle_since
        with self.lock:
            self.active[conn] = parser
        requeued = lingering = False  # requeued: in the queue or the poller's, no longer this thread's
        answered = 0 if turn is None else turn.answered
        try:
            if turn is None:  # (in the try: a connection reset already fails here, and is closed and counted)
                # A blocked send returns this often, for _send to look at the clock.
                kernel_timeouts(conn, current, send=limits.keepalive_timeout / SEND_CHECKS)
            while not self.stopping.is_set():
                # Between requests: the keep-alive timeout; within a head: what is left of the
                # header timeout (a pool connection's are the poller's). Changing it is a
                # system call, so only when it changes.
                if parser.in_progress:
                    left = limits.header_timeout - (time.monotonic() - parser.head_started)
                    if left <= 0:
                        raise HttpError(408, "slow-head")
                    if pool is None:
                        current = left
                        kernel_timeouts(conn, current)
                elif current != limits.keepalive_timeout:
                    current = limits.keepalive_timeout
                    kernel_timeouts(conn, current)
                try:
                    data = conn.recv(65536, flags)
                except BlockingIOError:  # SO_RCVTIMEO ran out, or (pool) nothing to read now
                    if pool is not None:
                        self._park(conn, peer, Turn(parser, idle_since, answered))
                        requeued = True
                        return
                    if parser.in_progress:
                        raise HttpError(408, "slow-head") from None
                    return  # idle for the keep-alive timeout
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
                    answered += n
                    if not keep:
                        if answered > 1:  # more may be on their way behind it: as the async server's _answer
                            lingering = self._linger_after(conn, pool)
                        return
                    requests = requests[n:] if n < len(requests) else None
                    idle_since = time.monotonic()  # (the keep-alive timeout counts from the last answer)
                if parser.expects_continue:
                    parser.expects_continue = False
                    self._send(conn, CONTINUE, peer)
                if parser.error is not None:
                    raise parser.error
                if pool is not None and self._requeue(conn, peer, Turn(parser, idle_since, answered)):
                    requeued = True
                    return
        except HttpError as exc:
            if elog.info:  # (a client's fault, as a 404 is: no warning)
                elog.line("INFO", f"event=refused client={peer} status={exc.status} reason={logs.quote(exc.detail)}")
            try:
                self._send(conn, error_response(exc, self.static.backend_header), peer)
                lingering = self._linger_after(conn, pool)
            except OSError:
                pass
        except OSError:
            pass
        finally:
            if not requeued:
                with self.lock:
                    self.active.pop(conn, None)
                parser.close()
                if not lingering:
                    self._close(conn)

    def _linger_after(self, conn: socket.socket, pool) -> bool:
        """The lingering close after the last answer (``linger``): in this thread per
        connection; with a pool, in a lingerer's thread (True: it closes the
        connection), or past MAX_LINGERING at once, a close at once (the caller's)."""
        if pool is None:
            linger(conn)
            return False
        if self.lingering.acquire(blocking=False):
            self.lingerers.submit(conn)  # not in a pool thread, which others wait for
            return True
        return False

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
            self.active.pop(conn, None)
        try:
            self.queue.put_nowait((conn, peer, None, turn))  # type: ignore[union-attr]
        except queue.Full:
            with self.lock:
                self.active[conn] = turn.parser
            return False
        return True

    def _park(self, conn: socket.socket, peer: str, turn: Turn) -> None:
        """Hand a pool connection with nothing to read to the poller, until it is readable
        or its deadline: the rest of the header timeout for a head begun, else the
        keep-alive timeout. It leaves ``active`` first, as in ``_requeue``."""
        limits = self.config.limits
        if turn.parser.in_progress:
            deadline = turn.parser.head_started + limits.header_timeout
        else:
            deadline = turn.idle_since + limits.keepalive_timeout
        with self.lock:
            self.active.pop(conn, None)
        self.poller.park(conn, peer, turn, deadline)  # type: ignore[union-attr]

    def _drop(self, conn: socket.socket, turn: Turn) -> None:
        """Close a parked connection: idle for the keep-alive timeout, or the server stops."""
        turn.parser.close()
        self._close(conn)

    def stop(self) -> None:
        self.stopping.set()
        if self.poller is not None:
            self.poller.stop()
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() its thread is blocked in
            except OSError:
                pass

    def force(self) -> None:
        """A second signal: the drain cuts what is left at once."""
        self.forced.set()

    def drain(self) -> None:
        """Let the connections being served finish, for up to ``drain_timeout``. One
        between requests (a keep-alive client's, idle; or its last answer on its way)
        is shut for reading: its thread, blocked in ``recv``, ends now, as the event
        loop servers close their idle ones. It waited out the whole drain timeout,
        and a second signal did not cut it short."""
        deadline = time.monotonic() + self.config.drain_timeout
        while time.monotonic() < deadline and not self.forced.is_set():
            with self.lock:
                if not self.active:
                    return
                between = [conn for conn, parser in self.active.items() if parser.between_requests]
            for conn in between:
                try:
                    conn.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
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
            if len(signalled) > 1:  # a second signal forces
                server.force()

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
