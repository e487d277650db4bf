"""lb.py's side toward its backends (nginx's "upstream"): one keep-alive
connection to a backend (``BackendConn``), the answer read on it
(``BackendAnswer``; ``KnownAnswer``, a backend's last one, taken again without
the parser) and how a request fails there (``BadGateway``, ``BackendDown``).

A ``BackendConn`` sends what an ``Exchange`` (``downstream.py``) gives it and
hands the answer, or the failure, back to that ``Exchange``; it keeps its
backend's ``BackendState`` (``proxy.py``: idle pool, requests in flight,
latency) up to date. It chooses no backend and never sees a client; how the
balancer works as a whole is told in ``proxy.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, NamedTuple

import httptools

if TYPE_CHECKING:
    from .downstream import Exchange
    from .proxy import BackendState

STREAM_AFTER = 64 * 1024
"""An answer's body is relayed whole up to this many bytes (and retried on the next
backend if its own fails it). Past it, the body is passed on as it comes, at the
pace the client reads it (nginx's ``proxy_buffering`` with bounded buffers), so
the balancer never holds a whole large answer; a failure then cuts it off."""


MAX_ANSWER_HEAD = 64 * 1024
"""The most bytes a backend may send of an answer's status line and header fields;
past it the answer is a broken backend's (502), as nginx answers "upstream sent too
big header" past its 4-8 KiB ``proxy_buffer_size``. Without a bound, a backend that
sent an endless header field grew the balancer by 15 MB a second (httptools keeps a
field's value whole until it ends)."""


class BadGateway(Exception):
    pass


class BackendDown(ConnectionError):
    """The backend was marked down while this request waited on it."""


class BackendLost(ConnectionResetError):
    """The backend's connection broke before the whole answer: ``reason`` says how,
    in the words ``Load_Balancer.py`` logs (``closed``, ``reset``, ``unasked``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class BackendAnswer(NamedTuple):
    status: int
    reason: bytes  # the backend's own reason phrase, passed on as HAProxy and nginx do
    headers: list[tuple[bytes, bytes]]
    body: bytes  # what is left of it here (all of it unless streamed; none for HEAD)
    keep_alive: bool
    length: int | None  # of the whole body; a HEAD's: its Content-Length, None without one
    version: str = "1.1"  # the backend's HTTP version, for our Via entry (RFC 9110 7.6.3)


KNOWN_MAX = 64 * 1024
"""The longest answer a backend's ``KnownAnswer`` keeps."""


class KnownAnswer(NamedTuple):
    """A backend's last answer that came alone in one read, as bytes around its
    ``Date`` value and as parsed: the same bytes again (with any date) are the
    same answer, taken without the parser (``BackendConn.data_received``)."""
    prefix: bytes  # up to the Date header's value
    suffix: bytes  # after it
    size: int
    answer: BackendAnswer

    @classmethod
    def of(cls, data: bytes, answer: BackendAnswer) -> KnownAnswer:
        head_end = data.find(b"\r\n\r\n")
        i = data.find(b"\r\nDate: ", 0, head_end)
        if i < 0:
            return cls(data, b"", len(data), answer)  # no Date: the same bytes exactly
        start = i + len(b"\r\nDate: ")
        return cls(data[:start], data[data.find(b"\r\n", start):], len(data), answer)

    def matches(self, data: bytes) -> bool:
        """``data`` is this answer, its Date value (one line, of the same length) aside."""
        return (len(data) == self.size and data.startswith(self.prefix) and data.endswith(self.suffix)
                and data.find(b"\n", len(self.prefix), self.size - len(self.suffix)) < 0)


REPAIRABLE = ("Missing expected CR", "Duplicate Content-Length")
"""httptools' words for what ``repaired_head`` mends."""


def head_end(data: bytes) -> int:
    """Where the answer head ``data`` starts with ends (past its empty line, its
    lines ended by CRLF or a bare LF); -1 when it goes on past ``data``."""
    ends = [i + n for i, n in ((data.find(b"\n\n"), 2), (data.find(b"\n\r\n"), 3)) if i >= 0]
    return min(ends) if ends else -1


def repaired_head(head: bytes) -> bytes:
    """An answer's head (through its empty line) as llhttp takes it: each line
    ended by CRLF, where a bare LF ended it (RFC 9112 2.2 lets a recipient take
    it), and a Content-Length given more than once with one value given once
    (RFC 9110 8.6 lets a recipient merge them); nginx and HAProxy take both,
    lb.py answered 502 to every request (``BackendConn.data_received``). Two
    different lengths stay: the parser refuses them."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    lengths = [i for i, line in enumerate(lines) if line[:15].lower() == b"content-length:"]
    if len({lines[i].partition(b":")[2].strip() for i in lengths}) == 1:
        lines = [line for i, line in enumerate(lines) if i not in lengths[1:]]
    return b"\r\n".join(lines)


class BackendConn(asyncio.Protocol):
    """One keep-alive connection to a backend; one request at a time, whose
    answer or failure goes to the ``Exchange`` that sent it."""

    def __init__(self, backend: BackendState) -> None:
        self.backend = backend
        # Looked up once per connection: on Python 3.11 asyncio.get_running_loop()
        # makes a getpid() system call, 5% of the balancer's time under ab -k.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.owner: Exchange | None = None
        self.answer: BackendAnswer | None = None  # complete, handed over once the parser returns
        self.closed = False
        self.unasked = False  # an answer began that no request was waiting for
        self.uses = 0
        self.head_only = False  # the request in flight is a HEAD: its answer ends with its head
        self.spent = False  # a HEAD's answer is complete, and the parser waits for a body that is not due
        self.paused = False  # reading stopped: a streamed answer's client reads slower than it comes
        self.waiting_since = 0.0  # the send, then the last bytes of the answer: the sweep's timeout counts from it
        self.sent_at = 0.0  # the request's send, for the backend's latency
        self.between = True  # the parser is between answers
        self.completed = 0  # answers the parser has finished
        self.oversized = False  # an answer's head, whole in one read, was over MAX_ANSWER_HEAD
        self.gathering: bytes | None = None  # a head the parser refused, read on to its end (_repaired)
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.held = 0  # bytes in self.body
        self.length = 0  # of the body so far
        self.status = 0
        self.version = "1.1"
        self.reason = b""
        self.head_done = False
        self.head_bytes = 0  # read while the head was coming (MAX_ANSWER_HEAD)
        self.head_part = b""  # those bytes, when the head began a read: mended if the parser refuses it later
        self.field_bytes = 0  # of the head's lines, as the parser gave them (the same limit)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def send(self, data: bytes, owner: Exchange) -> None:
        self._reset()
        self.uses += 1
        self.head_only = owner.req.method == b"HEAD"
        self.sent_at = self.waiting_since = time.monotonic()  # the proxy's sweep enforces the response timeout
        self.owner = owner
        self.backend.busy.add(self)
        self.transport.write(data)  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.between = False
        if self.owner is None or self.answer is not None:
            self.unasked = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # (after the body: a chunked answer's trailer fields, dropped)
            self.headers.append((name, value))
            self.field_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.version = self.parser.get_http_version()
        self.head_done = True
        # (a head that came whole in one read, up to 256 KB, was never counted: data_received)
        self.oversized = self.oversized or self.field_bytes + len(self.reason) > MAX_ANSWER_HEAD
        if self.head_only and self.status >= 200:
            # A HEAD's answer ends with its head, whatever its Content-Length says
            # (RFC 9110 9.3.2); httptools cannot be told so, and would wait for that
            # body. The answer is complete here, and the parser is replaced once
            # feed_data returns (data_received). Keep-alive as the parser sees it:
            # without a length the connection is not kept, which is only cautious.
            self._ended(self._declared_length())
            self.head_only = False
            self.spent = True

    def _declared_length(self) -> int | None:
        for k, v in self.headers:
            if k.lower() == b"content-length":
                return int(v)  # (the parser has checked it)
        return None

    def on_body(self, body: bytes) -> None:
        if self.spent:  # a body after a HEAD's answer: nobody asked for it
            self.unasked = True
            return
        self.length += len(body)
        self.body.append(body)
        self.held += len(body)

    def on_message_complete(self) -> None:
        if self.spent:  # a HEAD's answer with a length of 0: complete already
            return
        self._ended(self.length)

    def _ended(self, length: int | None) -> None:
        """The parser is past an answer (a HEAD's: past its head) whose body is ``length`` long."""
        self.between = True
        self.completed += 1
        if self.status < 200:  # an interim answer (100 Continue, 103 Early Hints): the final one follows
            self._reset()
            return
        self._complete(self.parser.should_keep_alive(), length)

    def _complete(self, keep_alive: bool, length: int | None) -> None:
        if self.owner is not None and self.answer is None:
            self.answer = BackendAnswer(self.status, self.reason, self.headers, b"".join(self.body), keep_alive,
                                        length, self.version)
            self._reset()  # (what the parser reads after it goes to new lists, not into this answer)

    def _deliver(self) -> None:
        answer, self.answer = self.answer, None
        owner, self.owner = self.owner, None
        backend = self.backend
        backend.busy.discard(self)
        backend.latency.record((time.monotonic() - self.sent_at) * 1000)
        if owner is not None:
            owner.answered(self, answer)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.waiting_since = time.monotonic()  # a slow answer still coming is no timeout (nginx's read timeout)
        # The steady state under load: the answer the backend gave last, whole in one
        # read, for a GET. A third of the balancer's time per request went to parsing it.
        alone = self.between and self.owner is not None and self.answer is None and not self.head_only
        known = self.backend.known
        if alone and known is not None and known.matches(data):
            self.answer = known.answer
            self._deliver()
            return
        repaired = self.gathering is not None
        if repaired:
            data = self._repaired(data)  # type: ignore[assignment]
            if data is None:
                return
        completed, fresh = self.completed, self.between
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A head with bare LFs or a Content-Length twice, begun by this read or an
            # earlier one (head_part): read to its end, made what the parser takes, and
            # fed to a new parser (once).
            if ((fresh or self.head_part) and not repaired and self.owner is not None and not self.unasked
                    and self.completed == completed and str(exc).startswith(REPAIRABLE)):
                data = self.head_part + data
                self.parser = httptools.HttpResponseParser(self)
                self._reset()
                self.gathering, self.between = b"", True
                self.data_received(data)
                return
            self._drop(BadGateway(str(exc) or type(exc).__name__))  # garbage: a broken backend
            return
        except httptools.HttpParserUpgrade as exc:  # a 101 Switching Protocols nobody asked for
            self._drop(BadGateway(str(exc) or type(exc).__name__))
            return
        if self.spent:  # a HEAD's answer ended its head: a new parser for the next answer
            self.spent = False
            self.parser = httptools.HttpResponseParser(self)
        if self.unasked:
            # An answer no request was waiting for (on an idle connection, or after the
            # answer in the same read): left in the pool, it would pass for the answer to
            # the next request, someone else's. The connection goes, as nginx drops it.
            self._drop(BackendLost("unasked", "the backend sent an answer nobody asked for"))
            return
        if not (self.head_done or self.between):  # in the middle of an answer's head
            self.head_bytes += len(data)
            if fresh or self.head_part:
                self.head_part += data
        if self.oversized or self.head_bytes > MAX_ANSWER_HEAD:
            self.answer = None  # (whole in this read, it is no answer to go on either)
            self._drop(BadGateway(f"answer head over {MAX_ANSWER_HEAD} bytes"))
            return
        if self.answer is not None:  # handed over here, not inside the parser's callback
            if alone and self.between and self.completed == completed + 1 and len(data) <= KNOWN_MAX:
                self.backend.known = KnownAnswer.of(data, self.answer)
            self._deliver()
        elif self.held and self.owner is not None and (self.owner.streaming or self.held > STREAM_AFTER):
            self.owner.stream(self)

    def _repaired(self, data: bytes) -> bytes | None:
        """``data`` added to the head being gathered: once it ends, the head made
        what llhttp takes (``repaired_head``) and the bytes after it; None
        meanwhile, or when it passes ``MAX_ANSWER_HEAD`` (a 502). Refused again,
        the answer is a 502 (``gathering`` is None by then)."""
        data = self.gathering + data  # type: ignore[operator]
        end = head_end(data)
        if end < 0:
            self.gathering = data
            if len(data) > MAX_ANSWER_HEAD:
                self.gathering = None
                self._drop(BadGateway(f"answer head over {MAX_ANSWER_HEAD} bytes"))
            return None
        self.gathering = None
        self.head_bytes = end
        return repaired_head(data[:end]) + data[end:]

    def take_body(self) -> bytes:
        """The body read so far, for a streamed answer; held no more here."""
        body, self.body, self.held = b"".join(self.body), [], 0
        return body

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.waiting_since = time.monotonic()  # waiting for a slow client is not the backend's delay
            if not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def _drop(self, exc: Exception) -> None:
        """End the connection now (it cannot be trusted, its backend is down, or it
        took too long): an answer completed before the trouble still goes to its
        request, else the request fails with ``exc``."""
        self.closed = True  # never pooled again
        if self.answer is not None:
            self._deliver()
        self._fail(exc)
        self.transport.abort()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser = None  # (it holds this object: let both go without the garbage collector)
        if self.owner is None:  # idle, maybe pooled: closed by its backend (its keep-alive timeout)
            try:
                self.backend.idle.remove(self)  # (/stats counted it as idle until a request found it closed)
            except ValueError:
                pass
        if exc is None and self.owner is not None and self.head_done and self._ends_at_close():
            # A body without Content-Length or chunked framing ends where the connection
            # does (RFC 9112 6.3): the close completes it, as HTTP/1.0 servers and CGI answer.
            self._complete(False, self.length)
            self._deliver()
            return
        self._fail(BackendLost("closed", "backend closed the connection") if exc is None
                   else BackendLost("reset", f"backend connection broke: {exc}"))

    def _ends_at_close(self) -> bool:
        framed = any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self.headers)
        return not framed and self.status not in (204, 304)

    def _fail(self, exc: Exception) -> None:
        """The request in flight failed; its Exchange hears of it on the next turn
        of the loop (so that a backend marked down fails its requests in one go
        before any of them is sent on)."""
        self.backend.busy.discard(self)
        owner, self.owner = self.owner, None
        if owner is not None:
            self.loop.call_soon(owner.failed, self, exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
