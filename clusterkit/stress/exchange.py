"""Reading and checking answers, without sockets: one reader per request batch.

``LineReader`` checks line-protocol answers for a batch of messages sent on
one connection: each must be ``REPLY <name> <exactly the message>`` followed
by ``ACK <name> <its length>``, or an ``ERR`` line. ``HttpReader`` reads one
HTTP response with httptools and checks its status. Both are fed chunks with
the time they arrived, stamp the first byte of each answer (latency) and its
end (rtt), and hand back ``Outcome``s. An HTTP answer that is the client's
last right answer again, but for its Date (``KnownAnswer``), is taken without
parsing it. Failures carry a kind:

    wrong-reply   the REPLY does not echo the message
    bad-ack       the ACK is missing, from another server, or has a wrong length
    bad-reply     not the protocol at all (or an answer growing without a line end)
    extra-answer  another answer right behind the answer, for no request (answered twice); or,
                  on a kept-alive connection, bytes while no request was in flight (the
                  engine fails the next request so: ``plan.Client.unasked``), or a copy of
                  an answer to the connection's previous batch come late (the request in
                  flight fails so)
    bad-response  HTTP the parser rejects (or a header block past 1 MiB)
    err:<code>    the server answered ERR <code>
    http-<status> a non-2xx HTTP status
    closed        the connection closed before the answer was complete
    timeout       no complete answer within --timeout (decided by the engine)
"""

from __future__ import annotations

import re
from typing import NamedTuple

import httptools

INTERIM_HEAD = re.compile(rb"HTTP/\d\.\d 1(?!01)\d\d\b.*?\r?\n\r?\n", re.S)
"""An interim answer's head (1xx but 101), up to the blank line that ends it."""


class Outcome(NamedTuple):
    ok: bool
    label: str
    """The backend's name when ok, else the kind of failure."""
    first_ns: int
    done_ns: int
    nbytes: int


class LineReader:
    __slots__ = ("messages", "buf", "pos", "index", "first_ns", "outcomes", "error", "received", "before", "late")

    PENDING_MAX = 65536
    """An unfinished answer longer than this (plus twice its message) fails as bad-reply."""

    def __init__(self, messages: list[bytes], before: list[bytes] | tuple = ()) -> None:
        self.messages = messages
        self.before = before
        """The messages of the batch before this one on the same connection, answered already."""
        self.late = False  # a copy of an answer to one of them came: the next answer fails (_again)
        self.buf = b""
        self.pos = 0
        self.index = 0
        self.first_ns = 0
        self.outcomes: list[Outcome] = []
        self.received = 0  # bytes fed

    @property
    def done(self) -> bool:
        return self.index >= len(self.messages)

    def feed(self, chunk: bytes, now: int) -> None:
        self.received += len(chunk)
        buf = self.buf + chunk if self.buf else chunk
        pos = 0
        n = len(buf)
        messages = self.messages
        while self.index < len(messages) and pos < n:
            if not self.first_ns:
                self.first_ns = now
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            if buf.startswith(b"REPLY ", pos):
                nl2 = buf.find(b"\n", nl + 1)
                if nl2 < 0:
                    break
                if buf.startswith(b"REPLY ", nl + 1):
                    # Another answer where this one's ACK was due: it has none. (Taken as
                    # the ACK, it failed this message as bad-ack, the next as wrong-reply,
                    # and so on down a pipelined batch.)
                    self._record(False, "bad-ack", now, nl + 1 - pos)
                    pos = nl + 1
                    continue
                self._finish(buf[pos:nl], buf[nl + 1:nl2], now, nl2 + 1 - pos)
                pos = nl2 + 1
            else:
                line = buf[pos:nl]
                if not line.startswith(b"ERR ") and self.outcomes and self.outcomes[-1].ok:
                    # A line behind a right answer that no message asked for: as behind a
                    # batch's last one (below), and the next message keeps its own answer
                    # (it failed as bad-reply).
                    self._behind_last(now, nl + 1 - pos)
                    self.first_ns = 0  # (the next answer's first byte is still to come)
                    pos = nl + 1
                    continue
                kind = "err:" + line[4:].decode("ascii", "replace") if line.startswith(b"ERR ") else "bad-reply"
                self._record(False, kind, now, nl + 1 - pos)
                pos = nl + 1
        if pos < n and self.done:
            # Bytes behind the last answer, for no message: the server answered one twice
            # (a balancer's resend gone wrong), or sent more than the protocol's lines.
            self._behind_last(now, n - pos)
            pos = n
        self.buf = buf[pos:]
        if len(self.buf) > self.PENDING_MAX + 2 * len(messages[min(self.index, len(messages) - 1)]):
            # No answer is this long: a server streaming without line ends. Fail
            # what is left rather than keep it all.
            while not self.done:
                self._record(False, "bad-reply", now, len(self.buf))
                self.buf = b""

    def _behind_last(self, now: int, nbytes: int) -> None:
        """``nbytes`` behind the last answer that no message asked for: that answer
        fails as extra-answer, unless it failed already (an ACK before its REPLY)."""
        last = self.outcomes[-1]
        self.outcomes[-1] = Outcome(False, "extra-answer" if last.ok else last.label, last.first_ns, now,
                                    last.nbytes + nbytes)

    def _finish(self, reply: bytes, ack: bytes, now: int, nbytes: int) -> None:
        msg = self.messages[self.index]
        sp = reply.find(b" ", 6)
        if sp < 0:
            self._record(False, "bad-reply", now, nbytes)
            return
        name = reply[6:sp]
        echoed = reply[sp + 1:]
        if echoed != msg:
            if self._again(echoed, nbytes):
                return
            self._record(False, "wrong-reply", now, nbytes)
        elif ack != b"ACK %s %d" % (name, len(msg)):
            self._record(False, "bad-ack", now, nbytes)
        else:
            self._record(True, name.decode("ascii", "replace"), now, nbytes)

    def _again(self, echoed: bytes, nbytes: int) -> bool:
        """An answer to a message of this batch answered already (a pipelining client
        of a server that answers twice): that message fails as ``extra-answer``, and
        the copy takes no other message's place (it failed the next as wrong-reply,
        and the first of a batch passed). A copy of an answer to the connection's
        previous batch, come after that batch was complete (and counted), fails the
        next answer of this one instead, as ``plan.Client.unasked`` fails the next
        request for a copy come between requests (it failed it as wrong-reply)."""
        for i in range(self.index - 1, -1, -1):
            if self.messages[i] == echoed:
                o = self.outcomes[i]
                self.outcomes[i] = Outcome(False, "extra-answer" if o.ok else o.label, o.first_ns, o.done_ns,
                                           o.nbytes + nbytes)
                self.first_ns = 0
                return True
        if echoed in self.before:
            self.late = True
            self.first_ns = 0
            return True
        return False

    def _record(self, ok: bool, label: str, now: int, nbytes: int) -> None:
        if self.late:
            self.late = False
            if ok:
                ok, label = False, "extra-answer"
        self.outcomes.append(Outcome(ok, label, self.first_ns, now, nbytes))
        self.index += 1
        self.first_ns = 0

    def close(self, now: int, kind: str = "closed") -> None:
        """The connection ended (or the wait did: ``kind="timeout"``); what is left unanswered failed."""
        while not self.done:
            half = self.buf.startswith(b"REPLY ") and b"\n" in self.buf
            self._record(False, "bad-ack" if half and kind == "closed" else kind, now, len(self.buf))
            self.buf = b""


class KnownAnswer(NamedTuple):
    """An HTTP answer seen before, complete and right: a server of static pages
    sends the same bytes every time but for the time in its ``Date`` header."""

    data: bytes
    date: tuple[int, int]
    """Where the Date value is, the one part allowed to differ ((0, 0): none)."""
    backend: str
    keep_alive: bool
    before: bytes
    """data up to the Date value, and after it: the whole answer in one piece, the
    usual case, is checked against these without slicing ``data``."""
    after: bytes

    @classmethod
    def of(cls, data: bytes, date: tuple[int, int], backend: str, keep_alive: bool) -> KnownAnswer:
        return cls(data, date, backend, keep_alive, data[:date[0]], data[date[1]:])

    def whole(self, chunk: bytes) -> bool:
        """``fits`` for the whole answer in one chunk (the usual case), without slicing ``data``."""
        a, b = self.date
        value = chunk[a:b]
        return chunk.startswith(self.before) and chunk.endswith(self.after) and b"\n" not in value and b"\r" not in value

    def fits(self, pos: int, chunk: bytes) -> bool:
        """Whether ``chunk``, arriving at offset ``pos``, is this answer's bytes
        there: equal outside the Date value; inside it, any bytes but a line end
        (so the header lines, and with them the framing, are the same)."""
        n = len(chunk)
        data = self.data
        if pos + n > len(data):
            return False
        if not pos and n == len(data):
            return self.whole(chunk)
        a, b = self.date
        lo = min(max(a - pos, 0), n)  # the part of chunk before the Date value ...
        hi = min(max(b - pos, lo), n)  # ... and after it
        if lo < hi:
            value = chunk[lo:hi]
            if b"\n" in value or b"\r" in value:
                return False
        return data.startswith(chunk[:lo], pos) and data.startswith(chunk[hi:], pos + hi)


class HttpReader:
    """One HTTP response (ApacheBench's view: status, headers, body bytes).

    httptools parses it; what the report needs from the headers (the
    ``X-Backend`` name, and whether a length frames the body) is read from the
    header block in one pass once it is complete, not through a Python
    callback per header line.

    Given the client's last answer (``known``), an answer that is the same
    bytes again, but for its Date, is taken as that answer without a parser:
    the parser's work and memory traffic per answer, between the kernel's,
    cost about a fifth of a request's time (measured: 45 us of CPU per
    request without parsing, 56 us with)."""

    LEARN_MAX = 65536
    """Answers up to this size can become the next request's ``known``."""
    HEAD_MAX = 1 << 20
    """A header block longer than this fails the answer (``bad-response``)."""

    # Where a field starts as it is here, the instance finds it on the class
    # until it is set: one reader per request, so its set-up counts.
    first_ns = 0
    nbytes = 0
    backend = "-"
    _parts: list[bytes] | None = None  # with ``known``: what arrived so far, when in pieces
    _head_parts: list[bytes] | None = None  # what arrived until the header block was complete
    _head_size = 0
    _pos = 0  # with ``known``: how much of it has arrived
    _date = (0, 0)
    _length = -1  # head + Content-Length, when given
    complete = False
    extra = False  # more came right behind the complete answer: another answer, for no request
    headers_done = False
    framed = False  # Content-Length or chunked: else the body ends with the connection
    keep_alive = False
    outcome: Outcome | None = None

    def __init__(self, known: KnownAnswer | None = None) -> None:
        self.known = known
        self.parser = None if known else httptools.HttpResponseParser(self)
        self._seen: list[bytes] | None = None if known else []  # to learn from, without ``known``

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def received(self) -> int:
        return self.nbytes

    def on_headers_complete(self) -> None:
        # Here, not after the message: llhttp resets its flags once a message is
        # complete, and an HTTP/1.0 "Connection: keep-alive" answer would then
        # read as "close".
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_message_begin(self) -> None:
        # (llhttp begins a message at the first byte that is no line end.)
        if self.complete:
            self.extra = True

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints), which a client takes
            # even unasked (RFC 9110 15.2): the final one follows. (It failed the
            # request as extra-answer.) Such an answer is not learnt as ``known``.
            self.headers_done = False
            self._seen = None
            return
        self.complete = True

    def feed(self, chunk: bytes, now: int) -> None:
        if not self.first_ns:
            self.first_ns = now
        self.nbytes += len(chunk)
        known = self.known
        if known is not None:
            pos = self._pos
            if known.fits(pos, chunk):
                self._pos = pos = pos + len(chunk)
                if pos == len(known.data):
                    self.complete = self.headers_done = self.framed = True
                    self.keep_alive = known.keep_alive
                    self.outcome = Outcome(True, known.backend, self.first_ns, now, self.nbytes)
                elif self._parts is None:
                    self._parts = [chunk]
                else:
                    self._parts.append(chunk)
                return
            # Another answer: parse all of it, and learn it.
            if self._parts:
                chunk = b"".join(self._parts) + chunk
            self.known, self._parts = None, None
            self.parser = httptools.HttpResponseParser(self)
            self._seen = [chunk] if len(chunk) <= self.LEARN_MAX else None
        elif self._seen is not None:
            self._seen.append(chunk)
            if self.nbytes > self.LEARN_MAX:
                self._seen = None
        if not self.headers_done:
            if self._head_parts is None:
                self._head_parts = [chunk]
            else:
                self._head_parts.append(chunk)
            self._head_size += len(chunk)
            if self._head_size > self.HEAD_MAX:  # a header block without end: do not keep it all
                self._end(Outcome(False, "bad-response", self.first_ns, now, self.nbytes))
                return
        try:
            self.parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            # (bytes behind a complete answer that llhttp refuses, as after its "Connection:
            # close": a second answer too)
            self._end(Outcome(False, "extra-answer" if self.extra or self.complete else "bad-response",
                              self.first_ns, now, self.nbytes))
            return
        if self.headers_done and self._head_parts:
            self._scan()
        if self.extra:
            # Bytes right behind a complete answer on a kept-alive connection: the
            # server answered twice (what the line protocol calls extra-answer too).
            # Taken as the next request's answer, it would put every later one out of step.
            self._end(Outcome(False, "extra-answer", self.first_ns, now, self.nbytes))
        elif self.complete:
            status = self.parser.get_status_code()
            ok = 200 <= status < 300
            self._end(Outcome(ok, self.backend if ok else f"http-{status}", self.first_ns, now, self.nbytes))

    def _scan(self) -> None:
        """Read the complete header block (llhttp has checked its syntax)."""
        raw = b"".join(self._head_parts)
        self._head_parts = None
        skipped = 0
        while interim := INTERIM_HEAD.match(raw):  # (interim answers before the final one: heads alone)
            raw, skipped = raw[interim.end():], skipped + interim.end()
        end = raw.find(b"\r\n\r\n")
        sep = 4
        if end < 0:
            end, sep = raw.find(b"\n\n"), 2  # bare LF line ends
        if end >= 0:
            raw = raw[:end]
        head = raw.lower()
        self.framed = b"\ncontent-length:" in head or b"\ntransfer-encoding:" in head
        backend = self._value(head, b"\nx-backend:")
        if backend:
            self.backend = raw[backend[0]:backend[1]].strip().decode("latin-1")
        length = self._value(head, b"\ncontent-length:")
        if length and end >= 0 and b"\ntransfer-encoding:" not in head:
            value = raw[length[0]:length[1]].strip()
            if value.isdigit():
                self._length = skipped + end + sep + int(value)
        self._date = self._value(head, b"\ndate:") or (0, 0)

    @staticmethod
    def _value(head: bytes, name: bytes) -> tuple[int, int] | None:
        """Where the value of the header line starting with ``name`` is, CR excluded."""
        at = head.find(name)
        if at < 0:
            return None
        start = at + len(name)
        end = head.find(b"\n", start)
        if end < 0:
            end = len(head)
        if head[end - 1:end] == b"\r":
            end -= 1
        return start, end

    def known_answer(self) -> KnownAnswer | None:
        """This answer, for the next request to compare with: when it was
        complete, right, and exactly as long as its Content-Length says."""
        o = self.outcome
        if self._seen is None or o is None or not o.ok or self.nbytes != self._length:
            return None
        return KnownAnswer.of(b"".join(self._seen), self._date, self.backend, self.keep_alive)

    def _end(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.parser = None  # it refers back to this reader: let go, so no cycle is left for the GC

    def close(self, now: int, kind: str = "closed") -> None:
        if self.outcome is not None:
            return
        if kind == "closed" and self.headers_done and not self.framed:
            # No length given (HTTP/1.0 style): the body ends where the connection does,
            # and the answer is complete, as ApacheBench counts it.
            status = self.parser.get_status_code()
            ok = 200 <= status < 300
            self._end(Outcome(ok, self.backend if ok else f"http-{status}", self.first_ns or now, now, self.nbytes))
            return
        self._end(Outcome(False, kind, self.first_ns or now, now, self.nbytes))
