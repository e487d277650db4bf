"""What every engine shares: what a request is (``Target``), when each client
sends it (``Plan``), and how its outcome is counted (``record``)."""

from __future__ import annotations

import errno
import socket
import sys
import time
from urllib.parse import urlsplit

from ..protocol import message_line, message_lines
from .config import StressConfig, host_header
from .exchange import HttpReader, KnownAnswer, LineReader, Outcome
from .metrics import Recorder

ns = time.perf_counter_ns
MS = 1_000_000
AGAIN = 1
"""``Client.whole``: the answer was counted, and the connection carries the next request."""
CLOSES = 2
"""``Client.whole``: the answer is right, and the server closes the connection now (an
HTTP answer without keep-alive): the engine waits for its close and counts the answer
then (``Client.drained``; see ``server_closes``)."""
LINGER_NS = 500_000_000
"""How long a client waits, at the end of a keep-alive run, for the server to close
after its half-close (``Client.lingers``): a copy of an answer comes at once."""
FINE_NS = 50_000
"""The event engines wait for a --rate send due within the next ms in steps
this long (handling I/O between them): event loops time in whole ms, and a
send that goes out late counts its lateness as latency."""


class Target:
    """What one request is, for the line protocol or HTTP."""

    def __init__(self, cfg: StressConfig, worker: int) -> None:
        self.cfg = cfg
        self.batch = cfg.pipeline
        self.host, self.port = cfg.destination
        if cfg.http_url:
            url = urlsplit(cfg.http_url)
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            self.http_request = http_request(path.encode(), host_header(url).encode(), cfg.keepalive, cfg.headers)
            self.known: KnownAnswer | None = None  # the last right answer (see HttpReader)
        else:
            self.http_request = b""
            self.name = ""  # the server that answered last, and its answer's frame (see Client.whole)
            self.head = self.tail = b""
            self.eol = b"\n"  # what ends a message's line (message_line: b"\r\n" after a message ending in \r)
            if cfg.message is not None:
                self.fixed = cfg.message
                self.eol = message_line(cfg.message)[len(cfg.message):]
            else:
                self.fixed = None
                self.prefix = b"c%03d-" % worker
                self.pad = b"x" * max(0, cfg.size - len(self.prefix) - 9)

    def message(self, k: int) -> bytes:
        if self.fixed is not None:
            return self.fixed
        return b"%s%09d%s" % (self.prefix, k, self.pad)

    def learn(self, reader: LineReader | HttpReader) -> None:
        """Remember what a right answer looks like, for the next to be checked
        in one step: HTTP, the answer itself; the line protocol (a one-message
        batch), which server answered, and so what its next answer looks like
        around the message."""
        if isinstance(reader, HttpReader):
            known = reader.known_answer()
            if known is not None:
                self.known = known
            return
        o = reader.outcomes[0]
        if o.ok and o.label != self.name:
            self.name = o.label
            name = o.label.encode("ascii", "replace")
            self.head = b"REPLY %s " % name
            self.tail = b"\nACK %s %d\n" % (name, len(reader.messages[0]))

    def forget(self) -> None:
        """Let the next answer be read and judged in full (no ``Client.whole``)."""
        if self.http_request:
            self.known = None
        else:
            self.name = ""
            self.head = self.tail = b""

    def request(self, k: int, count: int, before: list[bytes] | tuple = ()) -> tuple[bytes, LineReader, int]:
        """The next line protocol batch's bytes, reader and size; ``before``: the
        messages of the connection's previous batch (``LineReader``). (An HTTP
        request is always the same bytes: ``Client.request`` takes them as they are.)"""
        batch = min(self.batch, count)
        if batch == 1:
            msg = self.message(k)
            return msg + self.eol, LineReader([msg], before), 1
        msgs = [self.message(k + j) for j in range(batch)]
        return message_lines(msgs), LineReader(msgs, before), batch


def http_request(path: bytes, host: bytes, keepalive: bool, extra: tuple[bytes, ...]) -> bytes:
    """What ApacheBench sends, so both tools cost the server the same; a -H
    header named as one of these takes its place, as ab's does."""
    ours = [(b"Host", host), (b"User-Agent", b"clusterkit-stress"), (b"Accept", b"*/*")]
    if keepalive:
        ours.append((b"Connection", b"Keep-Alive"))
    given = {line.partition(b":")[0].strip().lower() for line in extra}
    lines = [b"%s: %s\r\n" % (k, v) for k, v in ours if k.lower() not in given]
    lines += [b"%s: %s\r\n" % (name.strip(), value.strip()) for name, _, value in (h.partition(b":") for h in extra)]
    return b"GET %s HTTP/1.0\r\n%s\r\n" % (path, b"".join(lines))


def address(cfg: StressConfig, target: Target) -> tuple[int, tuple]:
    """Where the thread and epoll engines connect, resolved once per client
    (not per request): the address the pre-flight connect reached, so a name
    like ``localhost`` that resolves to ::1 and 127.0.0.1 means the one that
    answers; else the resolver's first."""
    if cfg.address:
        return cfg.address
    family, _, _, _, sockaddr = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)[0]
    return family, sockaddr


LOCAL_SHORTAGES = {errno.EADDRNOTAVAIL: "no-local-port", errno.EMFILE: "no-descriptor",
                   errno.ENFILE: "no-descriptor"}
"""Connects that failed for want of something here, not at the target: a local port
(every one of the ephemeral range in use or in TIME_WAIT towards the target), or a
file descriptor (the open-files limit)."""


def connect_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (TimeoutError, BlockingIOError)):  # BlockingIOError: SO_SNDTIMEO ran out
        return "connect-timeout"
    return LOCAL_SHORTAGES.get(exc.errno, "connect-error")  # type: ignore[arg-type]


class Plan:
    """When and how much one client sends."""

    def __init__(self, cfg: StressConfig, start_ns: int, share: int | None, client: int) -> None:
        self.share = share  # None: until the deadline
        self.deadline = start_ns + int(cfg.duration * 1e9) if cfg.duration else None
        # 0 without a warm-up: a client's sleep to the start may wake a moment early,
        # and what it sends or connects then is counted all the same.
        self.warm_end = start_ns + int(cfg.warmup * 1e9) if cfg.warmup else 0
        self.start = start_ns
        self.rate = cfg.rate or 0.0  # requests/s in all (--rate); 0: closed loop, each sends when answered
        self.slot = client  # this client's place in the schedule's turns
        self.concurrency = cfg.concurrency

    def intended(self, k: int) -> int:
        # The schedule's (k * concurrency + slot)-th send, at exactly rate per second in
        # all (an interval rounded to whole ns fitted one request too many into a run).
        return self.start + int((k * self.concurrency + self.slot) * 1e9 / self.rate)


def record(rec: Recorder, reader, base: int, start: int, warm_end: int, connect_ns: int = 0) -> None:
    """Count the reader's outcomes; ``connect_ns``: the connect the first of them
    opened (0: it went on a connection opened before), for the per-request log."""
    outcomes = reader.outcomes if isinstance(reader, LineReader) else [reader.outcome]
    if base < warm_end:
        return
    for o in outcomes:
        if o.ok:
            rec.ok(base, o.first_ns - base, o.done_ns - base, o.label, o.nbytes, o.done_ns, start, connect_ns)
        else:
            rec.failed(base, o.label, o.done_ns, o.nbytes)
        connect_ns = 0


DEAD_STREAK = 3
"""Requests in a row that every client must get nothing back for (failed connects,
timeouts) before the target counts as dead: ApacheBench gives up at the first
timeout; this waits for every client to see three, so a stall shorter than that
is measured, not taken for a dead server."""
BACKOFF_NS = 20 * MS
"""How long a client that got nothing back for DEAD_STREAK requests waits before
its next one, while the watcher looks (a target back again is found by the next)."""


class Client:
    """One client's place in its plan, the same in every engine: which request
    is next and when, what was sent at what time, and how answers and failed
    connects are counted (in the Recorder and on the board). Engines add the
    I/O."""

    __slots__ = ("cfg", "index", "plan", "target", "rec", "progress", "failed_slot", "streak_slot",
                 "k", "reader", "batch", "sent", "due_by", "timeout_ns", "base", "connect_started", "limit", "deadline",
                 "steady",
                 "expect", "known", "stop_slot", "opened", "start", "reused", "resent", "extra", "short", "connect_ns",
                 "asked", "pending", "drain_extra", "draining")

    def __init__(self, cfg: StressConfig, index: int, plan: Plan, rec: Recorder, board, failed_slot: int) -> None:
        self.cfg = cfg
        self.index = index
        self.plan = plan
        self.target = Target(cfg, index)
        self.rec = rec
        self.progress = board.a
        self.failed_slot = failed_slot  # the process's (event engines) or the thread's own
        self.streak_slot = board.streak_slot(index)
        self.k = 0  # requests done (answered or failed)
        self.reader = None  # the answer being waited for
        self.batch = 0
        self.sent = 0
        self.due_by = 0  # the send + --timeout: an answer complete later is a timeout (late)
        self.timeout_ns = int(cfg.timeout * 1e9)
        self.base = 0  # what latency counts from: the send, or with --rate the intended send
        self.connect_started = 0
        self.limit = plan.share if plan.share is not None else sys.maxsize
        self.deadline = plan.deadline if plan.deadline is not None else sys.maxsize
        self.steady = cfg.keepalive and not cfg.http_url and cfg.pipeline == 1
        """Each answer can be checked in one step (``whole``), once a server has answered."""
        self.expect: bytes | None = None
        self.known: KnownAnswer | None = None
        """HTTP: the answer in flight, if it is the client's last right answer again (``whole``)."""
        self.stop_slot = board.stop_slot
        self.opened = 0  # when the connection the next request goes on was opened, if that request opens it
        self.start = 0  # what ApacheBench's "Total" counts from: the connect when the request opened it, else base
        self.reused = False  # the request in flight went on a connection that carried one before
        self.resent = -1  # the last request sent again (see server_closed_first)
        self.extra = False  # an answer nobody asked for came while idle: the next request fails (see unasked)
        self.short = False  # its last connect found no descriptor here: the next waits a moment (see due)
        self.connect_ns = 0  # the connect of the request in flight, counted with its outcome (see connected)
        self.asked: list[bytes] | tuple = ()  # the line messages of the last request sent (LineReader.before)
        self.draining = False
        """Answered, on a connection the server closes: its close is awaited, and the answer
        counted then (``drained``), as what comes before the close fails it."""
        self.pending: tuple[bytes, int, str] | None = None  # ``whole``'s answer awaiting the close
        self.drain_extra = 0  # bytes that came after that answer, before the close

    def over(self, stop) -> bool:
        if self.k >= self.limit or stop.is_set():
            return True
        # --rate: nor is a request due at or after the deadline (rate x duration in all, as wrk2).
        return ns() >= self.deadline or bool(self.plan.rate) and self.plan.intended(self.k) >= self.deadline

    def due(self) -> int:
        """When the next request is due: with --rate, its time; after DEAD_STREAK
        requests in a row got nothing back, BACKOFF_NS from now (the watcher is about
        to call the target dead; without the wait, refused connects piled up by
        the thousand first); BACKOFF_NS too after a connect that found no file
        descriptor here (other clients' close soon, and a target is not dead for
        it); else 0, now."""
        at = self.plan.intended(self.k) if self.plan.rate else 0
        if self.short or self.progress[self.streak_slot] >= DEAD_STREAK:
            self.short = False
            return max(ns() + BACKOFF_NS, at)  # (never ahead of --rate's schedule)
        return at if at > ns() else 0

    def request(self) -> bytes:
        """The next request's bytes; its reader and send time are kept."""
        target = self.target
        before = () if self.opened else self.asked  # (what a new connection carried before: nothing)
        if self.steady:  # one line protocol message, what ``whole`` checks in one step
            msg = target.message(self.k)
            payload = msg + target.eol
            self.asked = [msg]
            self.reader = LineReader(self.asked, before)
            self.batch = 1
            self.expect = target.head + msg + target.tail if target.head else None
        elif target.http_request:
            payload = target.http_request
            self.known = known = target.known
            self.reader = HttpReader(known)
            self.batch = 1
        else:
            share = self.plan.share
            payload, self.reader, self.batch = target.request(
                self.k, (share - self.k) if share is not None else self.cfg.pipeline, before)
            self.known = None
            self.asked = self.reader.messages
        self.sent = ns()
        self.due_by = self.sent + self.timeout_ns
        self.base = self.plan.intended(self.k) if self.plan.rate else self.sent
        opened = self.opened
        self.start = min(opened, self.base) if opened else self.base
        self.reused = not opened
        self.opened = 0
        return payload

    def server_closed_first(self, reader) -> bool:
        """Whether the request in flight went on a kept-alive connection the server
        had closed (a server that closes after each answer, or its idle timeout),
        so that nothing at all came back. As ApacheBench does, that is no failure:
        the engine sends the request again on a new connection, once. Not a request
        whose wait ran out (``--timeout``): the thread engine sent that one again too,
        and reported no timeout."""
        if not self.cfg.keepalive or not self.reused or reader.received or self.resent == self.k:
            return False
        outcomes = reader.outcomes if isinstance(reader, LineReader) else (reader.outcome,)
        if any(o is not None and o.label == "timeout" for o in outcomes):
            return False
        self.resent = self.k
        return True

    def unasked(self, data: bytes) -> None:
        """Bytes came on the kept-alive connection while no request was in flight:
        an answer nobody asked for (the server answered one twice). The engine
        closes the connection (taken as the next request's answer, the spare
        one would put every later answer out of step), and the next request
        fails as ``extra-answer``, as an answer right behind another fails the
        request it came with (``exchange``). That request goes the reader's way
        (not ``whole``), so that ``answered`` counts it.

        But for a line server's notice on an idle connection, one ``ERR`` line
        before it closes (``ERR idle-timeout``, ``ERR shutting-down``): no answer
        to anyone, and no failure."""
        if not self.target.http_request and data.startswith(b"ERR ") and data.find(b"\n") in (-1, len(data) - 1):
            return
        self.extra = True
        self.target.forget()

    def whole(self, chunk: bytes, now: int) -> int:
        """The steady state of a run in one step: 0, or AGAIN or CLOSES.

        When ``chunk`` is exactly the answer expected, count it as ``answered``
        would and say what becomes of the connection. Expected: for the line
        protocol (keep-alive, one message at a time) the whole ``REPLY`` and
        ``ACK`` for the message in flight, from the server that answered the
        last one; for HTTP, the client's last right answer again but for its
        Date (``KnownAnswer``), whole in one chunk. Anything else (part of an
        answer, another server's, a wrong one, a close) returns 0, and the
        engine gives it to the reader, which judges it. Per answer this skips
        the parse, the Outcome and the general counting: a third of the async
        and epoll engines' time per request with the line protocol; with HTTP
        and a connection per request, a third of the epoll engine's user CPU
        (20 to 13.6 us against nginx, where the kernel takes about 50)."""
        if now > self.due_by:  # late: a timeout (answered judges it)
            self.expect = self.known = None
            return 0
        expect = self.expect
        if expect is not None:
            self.expect = None  # (if not as expected, the reader takes over this answer)
            if chunk != expect or self.finishing(now):  # (the last: the engine lingers, see lingers)
                return 0
            name = self.target.name
            verdict = AGAIN
        else:
            known = self.known
            if known is None:
                return 0
            self.known = None
            if len(chunk) != len(known.data) or not known.whole(chunk):
                return 0
            if not known.keep_alive:  # counted at the server's close (drained)
                self.pending = (chunk, now, known.backend)
                return CLOSES
            if self.cfg.keepalive:
                if self.finishing(now):
                    return 0  # the last answer on the connection: the engine lingers (see lingers)
                verdict = AGAIN
            else:
                return 0  # the server keeps open what the client closes: answered() decides
            name = known.backend
        self._counted(now, name, len(chunk))
        return verdict

    def drained(self) -> None:
        """The server closed the connection after an answer it said it would close it
        on (``CLOSES``, or ``server_closes``), or the deadline for that close passed:
        count the answer now. Bytes that came between the two (``drain_extra``: a
        second answer) fail it as ``extra-answer``, and count as received, as
        ApacheBench fails such an answer (Length). They were read and dropped, and a
        server answering twice passed."""
        self.draining = False
        extra, self.drain_extra = self.drain_extra, 0
        pending, self.pending = self.pending, None
        if pending is not None:  # checked by whole, not yet parsed
            chunk, at, name = pending
            if not extra:
                self._counted(at, name, len(chunk))
                return
            self.reader.feed(chunk, at)
        if extra:
            self.came_after(extra)
        self.answered()

    def came_after(self, nbytes: int) -> None:
        """``nbytes`` came after the answer in flight, before the server's close
        (``drained``, ``lingers``): a second answer. The answer fails as
        ``extra-answer``, and the bytes count as received (Total transferred)."""
        extra_answer(self.reader)
        self.rec.result.bytes_received += nbytes

    def _counted(self, now: int, name: str, nbytes: int) -> None:
        """Count the answer in flight as right and whole (``whole``, ``again``)."""
        self.reader = None
        connect_ns = self.connect_ns
        if connect_ns:
            self.count_connect()
        if self.base >= self.plan.warm_end:
            self.rec.whole(self.base, now, name, nbytes, self.start, connect_ns)
        self.k += 1
        progress = self.progress
        progress[self.index] = self.k
        if progress[self.streak_slot]:
            progress[self.streak_slot] = 0

    def again(self, chunk: bytes, now: int) -> bytes | None:
        """``whole`` and ``follow`` in one step, for the line protocol's steady
        state (keep-alive, one message at a time, no --rate): when ``chunk`` is
        exactly the answer expected, in time, count it and return the next
        request's bytes, or ``b""`` when none goes out at once (the engine's
        general scheduling decides). None: not that case, nothing done;
        ``whole`` takes it.

        The same counts as ``whole`` makes, without its checks for HTTP, for a
        late answer and for what becomes of the connection (``Recorder.whole``
        updates one dict, not two): measured here, the epoll engine's user CPU
        for 200,000 messages to the C echo server went from 1.44 to 1.23 s
        (median of 3; the kernel's part, about 1.7 s, is unchanged)."""
        expect = self.expect
        if expect is None or chunk != expect or now > self.due_by or self.finishing(now):
            return None  # (the client's last answer goes the reader's way: see lingers)
        self.expect = None
        self._counted(now, self.target.name, len(chunk))
        return self.follow(now) or b""

    def finishing(self, now: int) -> bool:
        """Whether the request in flight is the client's last (its share sent, or
        the run's end reached)."""
        k = self.k + self.batch
        plan = self.plan
        return k >= self.limit or now >= self.deadline or bool(plan.rate) and plan.intended(k) >= self.deadline

    def lingers(self, reader, now: int) -> bool:
        """Whether to half-close the connection and wait (up to --timeout) for the
        server's close before counting this answer: keep-alive, the client's
        last answer, right, on a connection the server keeps.

        Why: an HTTP answer says nothing of the request it answers. A server that
        answers a request twice, the copy a moment later, has its copy taken as
        the next request's answer (it arrives while that request is in flight),
        the real one as the one after, and so on: every later answer on that
        connection is one out of step, and looks right. Only the end shows it: the
        server still sends an answer after the client's last. Bytes before the
        close then fail this answer as ``extra-answer`` (the engine calls
        ``came_after``). A server that is in step closes at once; one that
        keeps the connection after the half-close costs its client LINGER_NS
        (or --timeout, if shorter) at the end of the run, outside its timings.
        The line protocol too: its answers name their message, but a client
        sending the same one (``--message``) takes a late copy for the next
        answer as well, and a copy of the last answer came after the client had
        gone (SPEC.md: a line server closes once it has answered what came
        before the half-close)."""
        return reusable(self.cfg, reader) and self.finishing(now)

    def linger_clock(self, now: int, timeout_ns: int) -> int:
        """What to set ``sent`` to while lingering, so that the engine's --timeout
        check ends the wait LINGER_NS from now (or at --timeout, if sooner)."""
        return now - max(0, timeout_ns - LINGER_NS)

    def follow(self, now: int) -> bytes | None:
        """After ``whole``: the next request's bytes when it goes out at once
        (no --rate wait, the client not over); None: the engine's general
        scheduling decides."""
        if self.k >= self.limit or now >= self.deadline or self.plan.rate or self.progress[self.stop_slot]:
            return None
        return self.request()

    def connected(self) -> None:
        self.opened = self.connect_started
        if self.connect_started >= self.plan.warm_end:  # (the warm-up's are not counted either)
            # Counted with the outcome of the request it was opened for: a request on its
            # way at a stop is not counted, nor was the connection it had opened
            # ("connections opened" passed the requests counted).
            self.connect_ns = ns() - self.connect_started

    def count_connect(self) -> None:
        self.rec.connected(self.connect_ns)
        self.connect_ns = 0

    def connect_failed(self, kind: str) -> None:
        """Every request the connection was for fails with ``kind``."""
        share = self.plan.share
        batch = min(self.cfg.pipeline, (share - self.k) if share is not None else self.cfg.pipeline)
        sent = self.plan.intended(self.k) if self.plan.rate else self.connect_started
        now = ns()
        for _ in range(batch):
            self.rec.failed(sent, kind, now)
        self.k += batch
        self.progress[self.index] = self.k
        self.progress[self.failed_slot] = self.rec.result.failed
        if kind == "no-descriptor":  # (this machine's limit: no sign of a dead target)
            self.short = True
        else:
            self.progress[self.streak_slot] += 1

    def answered(self):
        """Count the answer (complete, or closed by ``reader.close``); returns its reader."""
        reader = self.reader
        self.reader = None
        if self.extra:  # (see unasked)
            self.extra = False
            extra_answer(reader)
        connect_ns = self.connect_ns
        if connect_ns:
            self.count_connect()
        silent = all_timed_out(reader)
        fail_late(reader, self.due_by)
        record(self.rec, reader, self.base, self.start, self.plan.warm_end, connect_ns)
        if self.steady or self.target.http_request:
            self.target.learn(reader)
        self.k += self.batch
        progress = self.progress
        progress[self.index] = self.k
        progress[self.failed_slot] = self.rec.result.failed
        # The streak counts requests in a row that got nothing back (failed connects,
        # timeouts): any answer, even a wrong one, says the target is alive.
        progress[self.streak_slot] = progress[self.streak_slot] + 1 if silent else 0
        return reader


def fail_late(reader, due_by: int) -> None:
    """An answer complete after ``due_by`` (its send and --timeout) fails as a
    ``timeout``, as the thread engine's socket timeout fails it: the event engines
    look at their clients' deadlines ten times a second, and counted as complete
    what came between a deadline and their next look."""
    if isinstance(reader, LineReader):
        outcomes = reader.outcomes
        for i, o in enumerate(outcomes):
            if o.ok and o.done_ns > due_by:
                outcomes[i] = Outcome(False, "timeout", o.first_ns, o.done_ns, o.nbytes)
    elif reader.outcome is not None and reader.outcome.ok and reader.outcome.done_ns > due_by:
        o = reader.outcome
        reader.outcome = Outcome(False, "timeout", o.first_ns, o.done_ns, o.nbytes)


def reusable(cfg: StressConfig, reader) -> bool:
    """Whether the connection carries the next request too: keep-alive asked
    for, and every answer right (the line protocol), or (HTTP) a whole answer,
    whatever its status (a 404 is a failed request, not a broken connection:
    ab keeps it too), with the server keeping the connection open."""
    if not cfg.keepalive:
        return False
    if isinstance(reader, HttpReader):
        o = reader.outcome
        return o is not None and (o.ok or o.label.startswith("http-")) and reader.keep_alive
    return all_ok(reader)


def extra_answer(reader) -> None:
    """Fail the reader's first answer as ``extra-answer`` (Client.unasked, Client.lingers),
    unless it failed already: a timeout then still counts towards a dead target."""
    if isinstance(reader, LineReader):
        o = reader.outcomes[0]
        if o.ok:
            reader.outcomes[0] = Outcome(False, "extra-answer", o.first_ns, o.done_ns, o.nbytes)
    elif reader.outcome is not None and reader.outcome.ok:
        o = reader.outcome
        reader.outcome = Outcome(False, "extra-answer", o.first_ns, o.done_ns, o.nbytes)


def all_ok(reader) -> bool:
    if isinstance(reader, LineReader):
        return all(o.ok for o in reader.outcomes)
    return reader.outcome is not None and reader.outcome.ok


def all_timed_out(reader) -> bool:
    """Nothing came back for any of the reader's requests before the timeout: not
    a byte (an answer under way, however slow, says the target is alive; a server
    slower than --timeout was called dead, exit 69, where ab -s waits it out)."""
    if reader.received:
        return False
    if isinstance(reader, LineReader):
        return all(o.label == "timeout" for o in reader.outcomes)
    return reader.outcome is not None and reader.outcome.label == "timeout"


def server_closes(reader) -> bool:
    """An HTTP answer complete on a connection the server will close now.

    Engines then wait for the server's FIN before closing, as ApacheBench
    does: the side that closes first keeps the TIME_WAIT, and a client that
    holds thousands of them pays for it in every connect (the kernel searches
    for a free port), which would slow the tool, not the server."""
    return isinstance(reader, HttpReader) and reader.complete and not reader.keep_alive
