"""Reading and checking answers, without sockets: one reader per request batch.

``LineReader`` checks line-protocol answers for a batch of messages sent on
one connection: each must be ``REPLY <name> <exactly the message>`` followed
by ``ACK <name> <its length>``, or an ``ERR`` line. ``HttpReader`` reads one
HTTP response with httptools and checks its status. Both are fed chunks with
the time they arrived, stamp the first byte of each answer (latency) and its
end (rtt), and hand back ``Outcome``s; failures carry a kind:

    wrong-reply   the REPLY does not echo the message
    bad-ack       the ACK is missing, from another server, or has a wrong length
    bad-reply     not the protocol at all
    err:<code>    the server answered ERR <code>
    http-<status> a non-2xx HTTP status
    closed        the connection closed before the answer was complete
    timeout       no complete answer within --timeout (decided by the engine)
"""

from __future__ import annotations

from typing import NamedTuple

import httptools


class Outcome(NamedTuple):
    ok: bool
    label: str
    """The backend's name when ok, else the kind of failure."""
    first_ns: int
    done_ns: int
    nbytes: int


class LineReader:
    __slots__ = ("messages", "buf", "pos", "index", "first_ns", "outcomes", "error")

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.buf = b""
        self.pos = 0
        self.index = 0
        self.first_ns = 0
        self.outcomes: list[Outcome] = []

    @property
    def done(self) -> bool:
        return self.index >= len(self.messages)

    def feed(self, chunk: bytes, now: int) -> None:
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
                self._finish(buf[pos:nl], buf[nl + 1:nl2], now, nl2 + 1 - pos)
                pos = nl2 + 1
            else:
                line = buf[pos:nl]
                kind = "err:" + line[4:].decode("ascii", "replace") if line.startswith(b"ERR ") else "bad-reply"
                self._record(False, kind, now, nl + 1 - pos)
                pos = nl + 1
        self.buf = buf[pos:]

    def _finish(self, reply: bytes, ack: bytes, now: int, nbytes: int) -> None:
        msg = self.messages[self.index]
        sp = reply.find(b" ", 6)
        if sp < 0:
            self._record(False, "bad-reply", now, nbytes)
            return
        name = reply[6:sp]
        if reply[sp + 1:] != msg:
            self._record(False, "wrong-reply", now, nbytes)
        elif ack != b"ACK %s %d" % (name, len(msg)):
            self._record(False, "bad-ack", now, nbytes)
        else:
            self._record(True, name.decode("ascii", "replace"), now, nbytes)

    def _record(self, ok: bool, label: str, now: int, nbytes: int) -> None:
        self.outcomes.append(Outcome(ok, label, self.first_ns, now, nbytes))
        self.index += 1
        self.first_ns = 0

    def close(self, now: int, kind: str = "closed") -> None:
        """The connection ended (or the wait did: ``kind="timeout"``); what is left unanswered failed."""
        while not self.done:
            half = self.buf.startswith(b"REPLY ") and b"\n" in self.buf
            self._record(False, "bad-ack" if half and kind == "closed" else kind, now, len(self.buf))
            self.buf = b""


class HttpReader:
    """One HTTP response (ApacheBench's view: status, headers, body bytes)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.first_ns = 0
        self.nbytes = 0
        self.backend = "-"
        self._header = b""
        self.complete = False
        self.headers_done = False
        self.framed = False  # Content-Length or chunked: else the body ends with the connection
        self.keep_alive = False
        self.outcome: Outcome | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"x-backend":
            self.backend = value.decode("latin-1")
        elif name == b"content-length" or name == b"transfer-encoding":
            self.framed = True

    def on_headers_complete(self) -> None:
        # Here, not after the message: llhttp resets its flags once a message is
        # complete, and an HTTP/1.0 "Connection: keep-alive" answer would then
        # read as "close".
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_message_complete(self) -> None:
        self.complete = True

    def feed(self, chunk: bytes, now: int) -> None:
        if not self.first_ns:
            self.first_ns = now
        self.nbytes += len(chunk)
        try:
            self.parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self.outcome = Outcome(False, "bad-response", self.first_ns, now, self.nbytes)
            return
        if self.complete:
            status = self.parser.get_status_code()
            ok = 200 <= status < 300
            self.outcome = Outcome(ok, self.backend if ok else f"http-{status}", self.first_ns, now, self.nbytes)

    def close(self, now: int, kind: str = "closed") -> None:
        if self.outcome is not None:
            return
        if kind == "closed" and self.headers_done and not self.framed:
            # No length given (HTTP/1.0 style): the body ends where the connection does,
            # and the answer is complete, as ApacheBench counts it.
            status = self.parser.get_status_code()
            ok = 200 <= status < 300
            self.outcome = Outcome(ok, self.backend if ok else f"http-{status}", self.first_ns or now, now,
                                   self.nbytes)
            return
        self.outcome = Outcome(False, kind, self.first_ns or now, now, self.nbytes)
