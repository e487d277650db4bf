"""Line protocol v1 of the TCP cluster, as pure functions and state machines.

What it is for: framing a byte stream into messages (``LineFramer``), building
the server's ``REPLY``/``ACK``/``ERR`` lines, and reading them back on the
client side (``ResponseParser``). The server, the balancer, the client and the
stress tool all use this one module.

What it is not: it never touches a socket, a clock or a logger. Bytes go in,
messages or responses come out, so it is tested without a network (see
tests/test_protocol.py, which splits streams at every possible point).

The wire format (SPEC.md):

* a message is one line ending in ``\\n``; a ``\\r`` right before the ``\\n`` is
  dropped; any other byte may appear; a message may be empty;
* for each message ``M`` the server writes ``REPLY <name> <M>\\n`` then
  ``ACK <name> <len(M)>\\n``; an error line ``ERR <code>\\n`` takes the place of
  the pair for the message it concerns.

Server lines end in a bare ``\\n``, never ``\\r\\n``: the parser keeps a ``\\r``
at the end of a ``REPLY`` line as part of the message (a message may end in
``\\r`` when the client sent ``...\\r\\r\\n``), and the ``ACK`` length confirms it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

DEFAULT_MAX_LINE = 65536
"""Longest message, in bytes, not counting the line terminator."""
MAX_MAX_LINE = 64 << 20
"""The largest ``--max-line`` taken: a line is held whole until it ends, per connection."""

REPLY = b"REPLY"
ACK = b"ACK"
ERR = b"ERR"


class ProtocolError(Exception):
    """A breach of the line protocol, with a short hyphenated ``code``.

    The code is what goes on the wire as ``ERR <code>``. Subclasses say whose
    fault it is, as h11 does.
    """

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail

    def error_line(self) -> bytes:
        return build_error(self.code)


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class LineTooLong(RemoteProtocolError):
    def __init__(self, limit: int) -> None:
        super().__init__("line-too-long", f"a line is longer than {limit} bytes")
        self.limit = limit


# --------------------------------------------------------------------------
# Framing: bytes in, messages out


class LineFramer:
    """Splits a byte stream into messages.

    ``feed(chunk)`` returns the messages completed by ``chunk`` (``\\r\\n`` and
    ``\\n`` both end a line). A line longer than ``max_line`` sets ``error`` to a
    ``LineTooLong``: the messages before it are still returned, nothing after it
    is, and every later ``feed`` returns nothing. The buffer never holds more
    than ``max_line + 1`` bytes of an unfinished line, so memory stays bounded
    whatever the peer sends.
    """

    __slots__ = ("max_line", "_partial", "error")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self.max_line = max_line
        self._partial = b""
        self.error: LineTooLong | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line held back."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            return []
        if self._partial:
            data = self._partial + data
        lines = data.split(b"\n")
        partial = lines.pop()
        limit = self.max_line
        if len(data) > limit:
            # Only a long chunk can hold a long line: check lines one by one.
            for i, line in enumerate(lines):
                if len(line) > limit and not (len(line) == limit + 1 and line[-1] == 13):
                    self.error = LineTooLong(limit)
                    self._partial = b""
                    return _strip_cr(lines[:i])
            # One more byte is allowed for a '\r' whose '\n' has not come yet.
            if len(partial) > limit + 1 or (len(partial) == limit + 1 and partial[-1] != 13):
                self.error = LineTooLong(limit)
                self._partial = b""
                return _strip_cr(lines)
        self._partial = partial
        return _strip_cr(lines)


class SlowLineWatch:
    """Whether a line begun has gone unfinished too long (a slowloris), sampled by
    a periodic sweep rather than with a clock read per chunk: ``too_slow`` is told
    whether a line is unfinished and how many lines have ended so far; the same
    unfinished line seen for longer than ``timeout`` is too slow."""

    __slots__ = ("mark", "seen")

    def __init__(self) -> None:
        self.mark = -1  # lines ended when the current unfinished line was first seen
        self.seen = 0.0

    def too_slow(self, unfinished: bool, ended: int, now: float, timeout: float) -> bool:
        if not unfinished:
            self.mark = -1
            return False
        if self.mark != ended:
            self.mark, self.seen = ended, now
            return False
        return now - self.seen > timeout


def _strip_cr(lines: list[bytes]) -> list[bytes]:
    if len(lines) == 1:
        line = lines[0]
        return [line[:-1]] if line[-1:] == b"\r" else lines
    return [line[:-1] if line[-1:] == b"\r" else line for line in lines]


# --------------------------------------------------------------------------
# Building client lines


def message_line(message: bytes) -> bytes:
    """``message`` as a line that reads back as exactly ``message``: the reader
    drops one ``\\r`` before the ``\\n``, so a message that ends in ``\\r``
    gets ``\\r\\n``."""
    return message + b"\r\n" if message[-1:] == b"\r" else message + b"\n"


def message_lines(messages: Iterable[bytes]) -> bytes:
    """``message_line`` for each, as one buffer to write."""
    return b"".join([m + b"\r\n" if m[-1:] == b"\r" else m + b"\n" for m in messages])


# --------------------------------------------------------------------------
# Building server lines


def build_replies(name: bytes, messages: list[bytes]) -> bytes:
    """The ``REPLY``/``ACK`` pairs for ``messages``, as one buffer to write."""
    if len(messages) == 1:
        m = messages[0]
        return b"REPLY %s %s\nACK %s %d\n" % (name, m, name, len(m))
    return b"".join(
        [b"REPLY %s %s\nACK %s %d\n" % (name, m, name, len(m)) for m in messages]
    )


def build_reply(name: bytes, message: bytes) -> bytes:
    return b"REPLY %s %s\nACK %s %d\n" % (name, message, name, len(message))


def build_error(code: str | bytes) -> bytes:
    if isinstance(code, str):
        code = code.encode("ascii")
    if not code or b" " in code or b"\n" in code:
        raise LocalProtocolError("bad-error-code", repr(code))
    return b"ERR %s\n" % code


def check_server_name(name: str) -> bytes:
    """A server name as it goes on the wire: printable ASCII, no spaces."""
    raw = name.encode("utf-8", "replace")  # (non-ASCII: bytes >= 128, refused below)
    if not raw or any(b <= 32 or b >= 127 or b in b'"=\\' for b in raw):
        # (no '=', quote or backslash either: the name leads each of its log lines, and is a value in others)
        raise LocalProtocolError("bad-server-name", f"{name!r}: use printable ASCII without spaces, '=', '\"' or '\\'")
    return raw


# --------------------------------------------------------------------------
# Parsing server lines (client side)


class Response(NamedTuple):
    """What the server said about one message.

    Either ``server`` and ``message`` with the confirmed ``length`` (a complete
    REPLY/ACK pair), or ``error`` with the code of an ``ERR`` line.
    """

    server: bytes | None
    message: bytes | None
    length: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def matches(self, sent: bytes) -> bool:
        """The reply echoes exactly ``sent`` and the confirmation has its length."""
        return self.error is None and self.message == sent and self.length == len(sent)


class ResponseParser:
    """Turns the server's byte stream back into ``Response`` objects.

    ``feed(chunk)`` returns the responses that ``chunk`` completes. A ``REPLY``
    line is held until its ``ACK`` arrives, so a response is never half
    reported. ``first_byte_seen`` tells whether any byte of the next response
    has arrived (the client uses it to stamp latency). Anything off-protocol
    raises ``RemoteProtocolError`` (``ack-without-reply``, ``ack-mismatch``,
    ``unknown-line``, ``line-too-long``).
    """

    __slots__ = ("_framer", "_pending_reply")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        # A REPLY line carries the message plus a prefix and a server name.
        self._framer = _RawLineFramer(max_line + 512)
        self._pending_reply: tuple[bytes, bytes] | None = None

    @property
    def first_byte_seen(self) -> bool:
        return self._pending_reply is not None or self._framer.buffered > 0

    def feed(self, data: bytes) -> list[Response]:
        out: list[Response] = []
        for line in self._framer.feed(data):
            out_item = self._line(line)
            if out_item is not None:
                out.append(out_item)
        return out

    def _line(self, line: bytes) -> Response | None:
        pending = self._pending_reply
        if pending is not None:
            kind, _, rest = line.partition(b" ")
            if kind != ACK:
                raise RemoteProtocolError("ack-missing", f"expected ACK, got {line[:40]!r}")
            name, _, length = rest.partition(b" ")
            server, message = pending
            if name != server:
                raise RemoteProtocolError("ack-mismatch", f"ACK from {name!r} after REPLY from {server!r}")
            try:
                n = int(length)
            except ValueError:
                raise RemoteProtocolError("bad-ack", repr(line[:60])) from None
            self._pending_reply = None
            return Response(server, message, n)
        kind, _, rest = line.partition(b" ")
        if kind == REPLY:
            name, sep, message = rest.partition(b" ")
            if not sep or not name:
                raise RemoteProtocolError("bad-reply", repr(line[:60]))
            self._pending_reply = (name, message)
            return None
        if kind == ERR:
            return Response(None, None, None, rest.decode("ascii", "replace") or "unknown")
        if kind == ACK:
            raise RemoteProtocolError("ack-without-reply", repr(line[:60]))
        raise RemoteProtocolError("unknown-line", repr(line[:60]))


class _RawLineFramer:
    """Splits on ``\\n`` only, keeping every other byte (server lines)."""

    __slots__ = ("max_line", "_partial")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._partial = b""

    @property
    def buffered(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        if self._partial:
            data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.max_line:
            raise LineTooLong(self.max_line)
        return lines


MORE, OFF, NOTICE, CLOSED = range(4)
"""Why ``match_answers`` stopped counting: the buffer (or the messages) ran out; the
next whole line is no answer to the next message; it is a connection notice; the
last answer counted ends the connection."""
CONNECTION_NOTICES = frozenset(build_error(code)[:-1] for code in ("idle-timeout", "shutting-down", "busy"))
"""A server's ERR lines about its connection (said as it closes it, or refuses it),
not about a message: never a message's answer."""
CLOSING_ANSWER = build_error("line-too-long")[:-1]
"""The answer to a line too long, after which the server closes the connection."""


_digits: dict[int, bytes] = {}
"""Message lengths as an ACK line writes them (``match_answers``), as they come."""


def _digits_of(size: int) -> bytes:
    if len(_digits) > 100_000:
        _digits.clear()
    digits = _digits[size] = b"%d" % size
    return digits


def match_answers(buf: bytes | bytearray, messages: Iterable[bytes]) -> tuple[int, int, int]:
    """How many of ``messages`` (in order) ``buf`` answers with whole answers from its
    start, without parsing them: a ``REPLY`` that echoes the message, with the
    ``ACK`` line that confirms it (the same server's name, the message's length)
    after it, or one ``ERR`` line in place of the pair.

    Returns ``(answers, end, why)``: the count; the offset just after the last answer
    counted; and why counting stopped (``MORE``: the buffer or the messages ran out,
    with a line maybe half there; ``OFF``: the next whole line is no answer to the
    next message, a ``REPLY`` echoing another message or without its ``ACK``, or
    not the protocol at all; ``NOTICE``: a line of ``CONNECTION_NOTICES`` is at
    ``end``; ``CLOSED``: the last answer counted is ``CLOSING_ANSWER``). A relay
    uses this to forward answers as whole units and to catch a backend that
    answers another message, or twice, or not in the protocol."""
    count = 0
    pos = 0
    for message in messages:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            break
        if buf.startswith(b"REPLY ", pos):
            nl2 = buf.find(b"\n", nl + 1)
            if nl2 < 0:
                break
            sp = buf.find(b" ", pos + 6, nl)  # after the server's name (it has no spaces)
            size = len(message)
            digits = _digits.get(size) or _digits_of(size)
            if (sp < 0 or nl - sp - 1 != size or not buf.startswith(message, sp + 1)
                    # the ACK that confirms it: ACK, the same name and space, the message's length
                    or nl2 - nl - sp + pos != len(digits) or not buf.startswith(b"ACK ", nl + 1)
                    or buf[nl + 5:nl + sp - pos] != buf[pos + 6:sp + 1] or not buf.startswith(digits, nl + sp - pos)):
                return count, pos, OFF
            pos = nl2 + 1
        elif buf.startswith(b"ERR ", pos):
            line = bytes(buf[pos:nl])
            if line in CONNECTION_NOTICES:
                return count, pos, NOTICE
            pos = nl + 1
            if line == CLOSING_ANSWER:
                return count + 1, pos, CLOSED
        else:
            return count, pos, OFF
        count += 1
    return count, pos, MORE
