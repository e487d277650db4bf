"""The HTTP core every server here shares: parsing, limits, errors, responses.

Parsing uses httptools, the Python binding of llhttp (Node's C parser, the one
behind uvicorn): fast, strict about framing, and already hardened against the
request-smuggling tricks a hand-written parser falls for. ``RequestParser``
wraps it as a sans-I/O object: bytes in, ``Request`` objects out, or an
``HttpError`` whose status says what was wrong:

    400  malformed request, Content-Length with Transfer-Encoding, two Content-Lengths,
         an HTTP/1.1 request without Host or with two, a Host that is no host[:port]
    405  a method other than GET or HEAD (with ``Allow``)
    408  headers not complete within the header timeout (decided by the server)
    413  a body larger than ``max_body``
    414  a request target longer than ``max_url``
    431  request headers larger than ``max_header_bytes``
    505  an HTTP version other than 1.x (HTTP/0.9's line without one: once that line ends; 1.2 is 1.1)

``Connection: close`` closes whatever else the header says (``keep-alive,
close`` from an HTTP/1.0 client kept the connection open, as llhttp reads
it). A request with a body and ``Expect: 100-continue`` sets
``expects_continue`` when its head is complete: the server says ``100
Continue`` (``CONTINUE``), and the client sends its body at once instead of
after its own timeout (curl: a second).

A head's lines may end in a bare LF, as ``nc`` sends a request typed by hand
(RFC 9112 2.2 allows it; nginx takes it): llhttp refuses one after the request
line, so such a head is fed a line at a time, each bare LF made CRLF.

A request that arrives again byte for byte, alone in one read (what ab, wrk
and a balancer's keep-alive connections send), is taken as the same request
without the parser: 0.5 us instead of 4.7 here, the same ``Request``. Also on
a new connection (ab without ``-k``: every request on one of its own): the
last ``KNOWN_MAX`` such requests are remembered by the server (``KNOWN``), as
a connection's first read, whole, is nearly always one of them.

What it is not: a socket owner. The async server, the threaded server and the
proxy feed it and write what ``build_response`` returns.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

import httptools

REASONS = {200: "OK", 206: "Partial Content", 301: "Moved Permanently", 304: "Not Modified", 400: "Bad Request",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
           412: "Precondition Failed", 414: "URI Too Long", 416: "Range Not Satisfiable",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}
ALLOWED_METHODS = (b"GET", b"HEAD")
CONDITIONAL = (b"if-none-match", b"if-modified-since", b"range", b"if-match", b"if-unmodified-since")
"""Request headers that can change a static answer (``Request.conditional``)."""
SERVER = b"clusterkit"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
HOST = re.compile(rb"([A-Za-z0-9._~!$&'()*+,;=%-]*|\[[0-9A-Fa-f:.]+\])(:[0-9]*)?")
"""RFC 9112 3.2's Host: uri-host [":" port] (a reg-name, an IPv4 address or an [IPv6] one)."""
_GOOD_HOSTS: set[bytes] = set()
"""Host values found good (at most 256): the regex costs a microsecond, a set look-up nothing."""
KNOWN_MAX = 64
KNOWN_BYTES = 4096
KNOWN: dict[bytes, tuple[Limits, Request]] = {}
"""Requests that came alone in one read, by their bytes (up to ``KNOWN_BYTES``:
256 KiB in all), with the limits they were read under: any connection's
(``RequestParser.feed``; emptied when full)."""
_USUAL_CONNECTION = {v: frozenset((v.lower(),)) for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close")}
"""Connection values as nearly every client and server spells them: their options without a split."""


def connection_options(value: bytes) -> frozenset[bytes]:
    """The options a ``Connection`` value lists, lower case (RFC 9110 7.6.1):
    ``close``, ``keep-alive``, or the names of hop-by-hop fields."""
    usual = _USUAL_CONNECTION.get(value)
    if usual is not None:
        return usual
    return frozenset(o for o in (part.strip(b" \t").lower() for part in value.split(b",")) if o)


def good_host(value: bytes) -> bool:
    if value in _GOOD_HOSTS:
        return True
    if HOST.fullmatch(value.strip()) is None:
        return False
    if len(_GOOD_HOSTS) < 256:
        _GOOD_HOSTS.add(value)
    return True


def reason_phrase(status: int) -> bytes:
    """The reason phrase for a status: ours, else the standard one (RFC 9110), else none."""
    if status in REASONS:
        return REASONS[status].encode()
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class HttpError(Exception):
    """A request we refuse, with the status to answer; the connection closes after it."""

    def __init__(self, status: int, detail: str = "", head_only: bool = False) -> None:
        super().__init__(f"{status} {REASONS.get(status, '')}: {detail}")
        self.status = status
        self.detail = detail
        self.head_only = head_only
        """The refused request is a HEAD: its answer has no body (RFC 9110 9.3.2)."""


@dataclass(frozen=True)
class Limits:
    max_url: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body: int = 1 << 20
    header_timeout: float = 10.0
    """Seconds a client has to send a whole request head (slowloris gets 408)."""
    keepalive_timeout: float = 15.0
    """Seconds an idle keep-alive connection is kept open."""


@dataclass
class Request:
    method: bytes
    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    client: str = "-"
    started: float = field(default_factory=time.monotonic)
    conditional: bool = True
    """It may have a header that changes the answer (``If-None-Match``,
    ``If-Modified-Since``, ``Range``); False: it has none (the parser knows)."""
    path: bytes = b"/"
    """The target's path, without its query (``split_target``)."""

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


def split_target(target: bytes) -> tuple[bytes, bytes, bytes | None] | None:
    """A request target as (origin-form target, path, authority), RFC 9112 3.2:
    origin-form as it came, and its path; absolute-form (``GET http://h:8/p?q``)
    as its path and query (``/`` when it names no path, as nginx takes it) and
    its host[:port], which stands for the Host header (3.2.2); None for any
    other form, or a target httptools cannot take apart (a 400)."""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return None
    if target[:1] == b"/":
        return (target, url.path, None) if url.path else None
    if url.schema is None or url.schema.lower() not in (b"http", b"https") or not url.host:
        return None
    path = url.path or b"/"
    host = b"[%s]" % url.host if b":" in url.host else url.host
    return (path if url.query is None else path + b"?" + url.query, path,
            host if url.port is None else b"%s:%d" % (host, url.port))


class RequestParser:
    """Feed bytes, get complete requests; raises HttpError for a bad one."""

    _shared = KNOWN

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self.ready: list[Request] = []
        self.error: HttpError | None = None
        """The stream went bad after the requests ``feed`` returned: answer them, then this, then close."""
        self.last = False  # a request that closes the connection is complete: nothing after it is read
        self._reset()
        self._conditional = True
        self.in_progress = False
        """Bytes of a request head have arrived and the head is not complete yet."""
        self.expects_continue = False
        """A head with ``Expect: 100-continue`` and a body is complete: say ``CONTINUE``, then clear it."""
        self._close = False  # the request's Connection header says close
        self.head_started = 0.0
        self._open = False  # between a message's first byte and its end (head or body)
        self._known: bytes | None = None  # the bytes of the last request that came alone in one read,
        self._known_request: Request | None = None  # and what they parsed to
        self._line = b""  # the stream's last unended line, while a head without a header field is in progress
        self._skip = 0  # bytes still to come of the body of an Upgrade request (see _feed)
        self._prev = b""  # the bytes fed before
        self._start: bytes | None = b""  # a message's first bytes, while it spans reads (None: it began within one)

    @property
    def between_requests(self) -> bool:
        """No request begun: the connection is idle, or its last request is being answered."""
        return not self._open

    def _reset(self) -> None:
        self._url = b""
        self._path = b"/"
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body = 0
        self._length: int | None = None  # the body's Content-Length
        self._trailers = False  # the head is complete: header fields now are a chunked body's trailer
        self._head = False  # the request is a HEAD, known once its target begins (on_url: until then
        # the parser's method is the last request's)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()
        self._open = True
        self.in_progress = True
        self.head_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        if not self._url:
            self._head = self._parser.get_method() == b"HEAD"
        self._url += url
        if len(self._url) > self.limits.max_url:
            self._fail(HttpError(414, "request target too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailers:
            # A chunked body's trailer fields are not merged into the head (RFC 9110
            # 6.5.1; nginx ignores them too): a trailer "Range" made a 206, "Host" a
            # second Host behind lb.py. They count as body against the limit.
            self.on_body(name + value)
            return
        self._header_bytes += len(name) + len(value) + 4
        self._headers.append((name, value))
        if self._header_bytes > self.limits.max_header_bytes or len(self._headers) > self.limits.max_headers:
            self._fail(HttpError(431, "request headers too large"))

    def on_headers_complete(self) -> None:
        self.in_progress = False
        self._trailers = True
        hosts = 0
        lengths = []
        codings: list[bytes] = []  # Transfer-Encoding values
        conditional = False
        close = False
        expect = False
        upgrade = False
        upgrade_asked = False  # Connection: upgrade
        bad_host = False
        for k, v in self._headers:
            k = k.lower()
            if k == b"host":
                hosts += 1
                bad_host = bad_host or not good_host(v)
            elif k == b"content-length":
                lengths.append(v)
            elif k == b"transfer-encoding":
                codings.append(v)
            elif k in CONDITIONAL:
                conditional = True
            elif k == b"connection":
                options = connection_options(v)
                close = close or b"close" in options
                upgrade_asked = upgrade_asked or b"upgrade" in options
            elif k == b"expect":
                expect = v.strip().lower() == b"100-continue"
            elif k == b"upgrade":
                upgrade = True
        self._conditional = conditional
        self._close = close
        if len(lengths) > 1:
            self._fail(HttpError(400, "more than one Content-Length"))
        chunked = bool(codings)
        if lengths and chunked:
            self._fail(HttpError(400, "both Content-Length and Transfer-Encoding"))
        if lengths:
            self._length = int(lengths[0].strip() or b"0")
            if self._length > self.limits.max_body:
                self._fail(HttpError(413, "body too large"))
        version = self._parser.get_http_version()
        if version not in ("1.0", "1.1"):
            self._fail(HttpError(505, f"HTTP/{version}"))
        # RFC 9112 3.2: an HTTP/1.1 request without Host, or with more than one, gets 400.
        # As nginx: a request body is chunked, and nothing else (a server that does not
        # understand a coding answers 501, RFC 9112 6.1; llhttp took "gzip, chunked" as
        # chunked and the gzip unseen); and HTTP/1.0 has no Transfer-Encoding, so a proxy
        # of that version in front would have framed the body otherwise (a smuggling).
        if chunked and version == "1.0":
            self._fail(HttpError(400, "Transfer-Encoding in an HTTP/1.0 request"))
        if chunked and (len(codings) > 1 or codings[0].strip().lower() != b"chunked"):
            self._fail(HttpError(501, "a Transfer-Encoding other than chunked"))
        if chunked and upgrade and upgrade_asked:
            # llhttp ends an Upgrade request at its head and hands back what follows
            # as the new protocol's; the upgrade is ignored (see _feed), so a body
            # would be read as the next request. A Content-Length body is skipped
            # there; a chunked one is refused, as nothing here would find its end.
            self._fail(HttpError(400, "an Upgrade request with a chunked body"))
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            self._fail(HttpError(400, "no Host header" if hosts == 0 else "more than one Host header"))
        if bad_host:
            self._fail(HttpError(400, "a Host header that is no host[:port]"))
        method = self._parser.get_method()
        if method not in ALLOWED_METHODS:
            # Refused now, not once its body is in: a client waiting on "Expect:
            # 100-continue" has its 405 at once (as from nginx; curl waited a second),
            # and no body is read for nothing (the lingering close drops it).
            self._fail(HttpError(405, f"method {method.decode('latin-1')}"))
        parts = split_target(self._url)
        if parts is None:
            self._fail(HttpError(400, "a request target that names no path"))
        self._url, self._path, authority = parts
        if authority is not None:  # absolute-form: its authority is the Host (RFC 9112 3.2.2)
            self._headers = [(k, v) for k, v in self._headers if k.lower() != b"host"] + [(b"Host", authority)]
        if expect and version == "1.1" and (chunked or (lengths and lengths[0].strip() not in (b"", b"0"))):
            self.expects_continue = True

    def on_body(self, body: bytes) -> None:
        self._body += len(body)
        if self._body > self.limits.max_body:
            self._fail(HttpError(413, "body too large"))

    def on_message_complete(self) -> None:
        self._open = False
        self._head = False  # (what fails before the next one's target is no HEAD)
        self.expects_continue = False  # its body came unasked: no 100 now (it would follow the answer)
        p = self._parser
        # (llhttp takes a trailer's "Connection: close" for the head's, and reads nothing
        # after it: the connection closes, the one trailer field it heeds)
        keep_alive = p.should_keep_alive() and not self._close
        self.ready.append(Request(p.get_method(), self._url, p.get_http_version(), self._headers, keep_alive,
                                  conditional=self._conditional, path=self._path))
        if not keep_alive:
            self.last = True

    def _fail(self, error: HttpError) -> None:
        error.head_only = self._head
        self.error = error
        raise error

    def feed(self, data: bytes) -> list[Request]:
        """The requests ``data`` completes, in order; never raises.

        A pipelined batch is answered as far as it is good, as nginx and HAProxy
        do: when the stream turns bad after some complete requests, those are
        returned and ``error`` is set (answer them, then the error, then close).
        Bytes after a request that closes the connection (``Connection: close``,
        HTTP/1.0 without keep-alive) are ignored, not an error."""
        if self.error is not None or self.last:
            return []
        if self._skip:
            data = self._skipped(data)
            if not data:
                return []
        if not self._open:
            if data == self._known:
                return [self._again()]
            # (a longer read is never remembered: not hashed to look for it, a 64 KiB pipelined batch)
            seen = self._shared.get(data) if len(data) <= KNOWN_BYTES else None
            if seen is not None and seen[0] is self.limits:  # another connection's, the same server's
                self._known, self._known_request = data, seen[1]
                return [self._again()]
        prev = self._prev
        self._prev = data or prev
        # (in a head, or in a body whose end is known: the next head may be in this read)
        heads = self.in_progress or not self._open or self._length is not None
        if heads and data.count(b"\n") != data.count(b"\r\n"):
            return self._feed_lines(data, prev)
        return self._feed(data)

    def _feed_lines(self, data: bytes, prev: bytes) -> list[Request]:
        """``feed`` for a head with a line ended by a bare LF (``nc`` and ``echo``
        send nothing else): RFC 9112 2.2 lets a server take it as a line's end,
        and nginx does; llhttp does not after the request line (a 400). So the
        head goes to the parser a line at a time, each bare LF made CRLF, until
        the parser has the whole head. A body goes as it came, its
        Content-Length's bytes, and the next head a line at a time again (a
        chunked body: the rest as it came)."""
        ready: list[Request] = []
        pos, n = 0, len(data)
        cr = prev.endswith(b"\r")  # a CRLF split over two reads
        while pos < n and self.error is None and not self.last:
            if self._skip:  # an ignored Upgrade's body, as it came (see _feed)
                k = min(self._skip, n - pos)
                self._skip -= k
                pos += k
                continue
            if self._open and not self.in_progress:  # a body
                if self._length is None:
                    break
                end = min(n, pos + max(1, self._length - self._body))
                ready += self._feed(data[pos:end])
                pos = end
                continue
            end = data.find(b"\n", pos) + 1 or n
            line = data[pos:end]
            if line.endswith(b"\n") and not line.endswith(b"\r\n") and not (line == b"\n" and cr):
                line = line[:-1] + b"\r\n"
            cr = False
            ready += self._feed(line)
            pos = end
        if pos < n:
            ready += self._feed(data[pos:])
        return ready

    def _feed(self, data: bytes) -> list[Request]:
        """``feed``, through the parser."""
        if self.error is not None or self.last:
            return []
        fresh = not self._open
        clean = True  # no error, no upgrade
        while True:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                clean = False
                # An Upgrade (h2c from ``curl --http2``, a WebSocket) is ignored, as RFC 9110
                # 7.8 allows: the request is answered over HTTP/1.1 and the bytes after it
                # are HTTP/1.1 again, for a new parser. CONNECT gets its 405 and the close.
                if self.error is None and self.ready and self.ready[-1].method != b"CONNECT":
                    data = data[exc.args[0]:]
                    self._parser = httptools.HttpRequestParser(self)
                    # Its body, though, is a body (RFC 9112 6.3), not the next request:
                    # llhttp ended the message at the head. Skipped, here and in the
                    # reads to come (a chunked one was refused: on_headers_complete).
                    self._skip = self._length or 0
                    data = self._skipped(data)
                    if data:
                        continue
            except httptools.HttpParserError as exc:
                clean = False
                if self.error is None and not self.last:  # (else: our own limit's, or bytes after the last)
                    detail = str(exc)
                    newer = HIGHER_MINOR.match(data) if fresh and not self.ready else None
                    if newer is not None and detail.startswith("Invalid HTTP version"):
                        # HTTP/1.2 and up, which llhttp refuses: served as 1.1, as RFC 9110
                        # 2.5 asks and nginx does (it was a 505).
                        data = newer.group(1) + b"1" + data[newer.end(1) + 1:]
                        self._parser = httptools.HttpRequestParser(self)
                        clean = True
                        continue
                    # (``head``: the bad message's start, when it began a read, this one or
                    # one before: "F" then "OO / HTTP/1.1" is the 405 "FOO / ..." is)
                    head = b"" if self.ready else data if fresh else (self._start or b"") + data[:START_KEPT]
                    self.error = HttpError(error_status(detail, head), detail, self._head)
            break
        if clean and self.in_progress and not self._headers and not self.last:
            self._check_request_line(data)
        elif self._line:
            self._line = b""
        ready, self.ready = self.ready, []
        if self._open and self.error is None:  # a message goes on in the next read: its start, kept
            if ready:
                self._start = None  # (it began within this read: where, the parser does not say)
            elif fresh:
                self._start = data[:START_KEPT]
            elif self._start is not None and len(self._start) < START_KEPT:
                self._start += data[:START_KEPT - len(self._start)]
        if clean and fresh and len(ready) == 1 and not self._open:
            data = bytes(data)
            self._known, self._known_request = data, ready[0]
            if len(data) <= KNOWN_BYTES:
                shared = self._shared
                if len(shared) >= KNOWN_MAX:
                    shared.clear()
                shared[data] = (self.limits, ready[0])
        return ready

    def _skipped(self, data: bytes) -> bytes:
        """``data`` without what is left of an ignored Upgrade's body (``_skip``)."""
        n = min(self._skip, len(data))
        self._skip -= n
        return data[n:] if n else data

    def _check_request_line(self, data: bytes) -> None:
        """A request line without a version (``GET /``, HTTP/0.9's) has its 505 when
        it ends, as it has when the empty line follows: llhttp waits for header
        fields after it, so it waited for the header timeout (408). A line that
        merely arrives in pieces (``GET / HT``, then ``TP/1.1``) waits for the rest."""
        text = self._line + data
        end = text.rfind(b"\n")
        # (its start tells a request line; a request line longer than this is the parser's 414)
        self._line = text[end + 1:end + 1 + self.limits.max_url + 64]
        line = HTTP09_LINE.fullmatch(text, text.rfind(b"\n", 0, end) + 1, end) if end >= 0 else None
        # (and it is this request's line, its target the one the parser has: not a line of
        # the body of the request before it, ``ab cd``, ended in the same read)
        if line is not None and line.group(1) == self._url:
            self.error = HttpError(505, "HTTP/0.9")

    def _again(self) -> Request:
        """The request the last lone one was, byte for byte, without the parser:
        a client repeating its request (ab, wrk, a balancer's health check) is
        answered at a quarter of the parsing cost. The parser is between
        messages before and after such a request, as it would be had it read it."""
        known = self._known_request
        assert known is not None
        if not known.keep_alive:
            self.last = True
        return Request(known.method, known.target, known.version, known.headers, known.keep_alive,
                       conditional=known.conditional, path=known.path)

    def close(self) -> None:
        """The connection is over: nothing more is parsed, and the parser lets go
        of this object (they hold each other; left so, each connection's pair
        would wait for the garbage collector, whose passes cost a server ~3% of
        its time with a connection per request)."""
        self.last = True
        self._parser = None  # type: ignore[assignment]


# --------------------------------------------------------------------------
# Responses

_date_cache = [0, b""]


def http_date(now: float | None = None) -> bytes:
    """The Date header's value, formatted at most once a second."""
    second = int(now if now is not None else time.time())
    if second != _date_cache[0]:
        _date_cache[0] = second
        _date_cache[1] = formatdate(second, usegmt=True).encode()
    return _date_cache[1]


def build_response(status: int, body: bytes = b"", *, content_type: bytes = b"text/plain; charset=utf-8",
                   headers: bytes = b"", keep_alive: bool = True, head_only: bool = False) -> bytes:
    """A whole response; ``headers`` are extra header lines, each ending in CRLF.
    HTTP/1.1 to every client, as nginx: a server sends its highest version within
    the request's major one (RFC 9110 6.2); an HTTP/1.0 client's keep-alive is
    in ``Connection``, which is always there."""
    conn = b"keep-alive" if keep_alive else b"close"
    head = (b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"%sConnection: %s\r\n\r\n" % (status, reason_phrase(status),
                                           SERVER, http_date(), content_type, len(body), headers, conn))
    return head if head_only or status == 304 else head + body


TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
"""An HTTP token (RFC 9110 5.6.2), as a method is one."""
METHOD_LINE = re.compile(TOKEN + rb" ")
"""A request line's start: a method the parser does not know is a method still."""
START_KEPT = 64
"""Bytes of a message's start kept while it comes, to judge what the parser refuses."""
HIGHER_MINOR = re.compile(rb"(" + TOKEN + rb" [^ \r\n]+ HTTP/1\.)[2-9]\r?\n")
"""A request line of HTTP/1.2 to 1.9 (the minor version at the end of group 1)."""
HTTP09_LINE = re.compile(TOKEN + rb" ([^ \r\n]+)\r?")
"""A whole request line without an HTTP version, as HTTP/0.9 sent them (``GET /``)."""


def error_status(detail: str, head: bytes) -> int:
    """The status for what httptools refused in a message that starts with ``head``:
    505 for a version other than 1.x, 405 for a method it does not know (FOO, SEARCH:
    nginx says 405 too; it was a bare 400), 400 for the rest (a TLS handshake on
    the plain port, garbage; and an unknown method behind other requests in one read)."""
    if detail.startswith("Invalid HTTP version"):
        return 505
    if detail.startswith("Invalid method") and METHOD_LINE.match(head):
        return 405
    return 400


def error_response(error: HttpError, extra_headers: bytes = b"") -> bytes:
    """The answer to a refused request; the connection is closed after it. To a
    HEAD, the head alone (its Content-Length the body's a GET would get)."""
    body = f"{error.status} {REASONS.get(error.status, '')}\n".encode()
    if error.status == 405:
        extra_headers += b"Allow: GET, HEAD\r\n"
    return build_response(error.status, body, headers=extra_headers, keep_alive=False, head_only=error.head_only)
