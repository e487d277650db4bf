"""The HTTP request parser without sockets: a request repeated byte for byte
(on its connection, or on another of the same server) is taken without the
parser, and gives what the parser gives."""

from __future__ import annotations

import pytest

from clusterkit.http.core import KNOWN, KNOWN_BYTES, HttpError, Limits, RequestParser

pytestmark = pytest.mark.timeout(30)

R = (b"GET /page.html HTTP/1.0\r\nHost: t\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n"
     b"Connection: Keep-Alive\r\n\r\n")
R11 = b"GET /style.css HTTP/1.1\r\nHost: t\r\n\r\n"
CLOSE = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
UPGRADE = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
BAD = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"


class Forgets(dict):
    def __setitem__(self, key, value):
        pass


class ParserOnly(RequestParser):
    """The parser with its repeat shortcuts off: every byte goes through httptools."""

    _shared = Forgets()

    @property
    def _known(self):
        return None

    @_known.setter
    def _known(self, value):
        pass


def outcome(parser: RequestParser, chunks: list[bytes]) -> list:
    out = []
    for chunk in chunks:
        for r in parser.feed(chunk):
            out.append((r.method, r.target, r.version, r.headers, r.keep_alive))
        out.append(("error", parser.error.status if isinstance(parser.error, HttpError) else None, parser.last))
    return out


@pytest.mark.parametrize("chunks", [
    [R, R, R],
    [R11, R11, R, R11],
    [R, R[:10], R],  # a request begun: the same bytes again are its continuation, not the known request
    [R, R[:10], R[10:], R],
    [R, R + R, R],  # two at once: parsed; the known one is still the single R
    [R, R + R[:5], R[5:], R],
    [R + R[:5], R[5:], R + R[:5], R[5:]],  # one request and the start of the next: not a known request
    [R, CLOSE, R],
    [CLOSE, CLOSE],
    [R11, UPGRADE, UPGRADE],
    [R, BAD, R],
    [R11, R11 + b"\r\n", R11],
])
def test_a_repeated_request_gives_what_the_parser_gives(chunks):
    assert outcome(RequestParser(Limits()), chunks) == outcome(ParserOnly(Limits()), chunks)


def test_a_repeated_request_is_not_parsed_again_and_is_a_request_of_its_own():
    parser = RequestParser(Limits())
    first = parser.feed(R)[0]
    again = parser.feed(R)[0]
    assert again is not first and again.headers is first.headers  # taken from the known request
    assert (again.method, again.target, again.version, again.keep_alive) == (b"GET", b"/page.html", "1.0", True)
    assert again.started >= first.started
    closing = RequestParser(Limits())
    closing.feed(R11)
    closing.feed(R11)
    assert closing.feed(CLOSE)[0].keep_alive is False and closing.last and closing.feed(R11) == []


def test_a_request_another_connection_sent_is_not_parsed_again():
    """ab without -k: each request on a connection of its own, byte for byte the same."""
    limits = Limits()
    first = RequestParser(limits).feed(R)[0]
    again = RequestParser(limits).feed(R)[0]
    assert again is not first and again.headers is first.headers  # taken from the first
    parsed = ParserOnly(limits).feed(R)[0]
    assert {**again.__dict__, "started": 0} == {**parsed.__dict__, "started": 0}
    assert outcome(RequestParser(limits), [R, R11, R]) == outcome(ParserOnly(limits), [R, R11, R])
    strict = RequestParser(Limits(max_headers=3))  # another server's limits: parsed (and refused)
    assert strict.feed(R) == [] and strict.error.status == 431
    big = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\n\r\n" % (b"a" * KNOWN_BYTES)
    assert RequestParser(limits).feed(big) and big not in KNOWN  # (a bounded memory)


@pytest.mark.parametrize("connection, keep", [(b"keep-alive, close", False), (b"Close, keep-alive", False),
                                              (b"keep-alive", True), (b"keep-alive, closed-caption", True)])
def test_close_among_the_connection_options_closes(connection, keep):
    """HTTP/1.0 ``Connection: keep-alive, close`` was kept open (llhttp's reading);
    close wins, as nginx has it (RFC 9112 9.3)."""
    [r] = RequestParser(Limits()).feed(b"GET / HTTP/1.0\r\nConnection: %s\r\n\r\n" % connection)
    assert r.keep_alive is keep


@pytest.mark.parametrize("host, good", [(b"a b", False), (b"t/x", False), (b"a@b", False), (b"t", True),
                                        (b"127.0.0.1:45000", True), (b"[::1]:44444", True), (b"", True),
                                        (b"x.example:", True)])
def test_a_host_header_must_be_a_host(host, good):
    """``Host: a b`` was served (RFC 9112 3.2: 400, as nginx answers)."""
    parser = RequestParser(Limits())
    ready = parser.feed(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    assert (len(ready) == 1 and parser.error is None) if good else (not ready and parser.error.status == 400)


def test_a_body_awaited_on_expect_100_continue_is_asked_for_once():
    """Nothing said 100 Continue: curl sent its body a second late."""
    parser = RequestParser(Limits())
    head = b"GET / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    assert parser.feed(head) == [] and parser.expects_continue
    parser.expects_continue = False  # (the server said it)
    [r] = parser.feed(b"hello")
    assert r.target == b"/" and not parser.expects_continue
    # The body in the same read (a client that did not wait), no body, HTTP/1.0: no 100.
    for request in (head + b"hello", b"GET / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
                    b"GET / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"):
        parser = RequestParser(Limits())
        parser.feed(request)
        assert not parser.expects_continue, request


HTTP09 = b"GET /page.html\r\n"
LONG_FIRST_FIELD = b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b" b\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize("stream", [R11, CLOSE, R + R11])
def test_a_request_split_anywhere_is_no_http09_line(stream):
    """Heads that come in pieces, wherever split, wait for the rest: no 505."""
    for cut in range(1, len(stream)):
        for second in range(cut, len(stream)):
            parser = ParserOnly(Limits())
            got = [r for piece in (stream[:cut], stream[cut:second], stream[second:]) for r in parser.feed(piece)]
            assert parser.error is None and len(got) == stream.count(b" HTTP/1."), (cut, second, parser.error)


BODY_WITH_A_LINE = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nab cd\n"


def test_a_body_line_before_a_pipelined_request_is_no_http09_line():
    """The last line of a read was taken for the next request's line: a GET's body
    ``ab cd``, with the next request begun in the same read, got a 505."""
    stream = BODY_WITH_A_LINE + R11
    for cut in range(len(BODY_WITH_A_LINE) - 6, len(stream)):
        parser = ParserOnly(Limits())
        got = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert parser.error is None and len(got) == 2, (cut, parser.error)


@pytest.mark.parametrize("size", [500, 997, 4096])
def test_a_long_first_field_in_pieces_is_no_http09_line(size):
    """A first field of 9,000 bytes in pieces, one of them ending its line: the end
    of its value (``aaa b``) looks like a request line without a version, but the
    line began with ``X-Long:``."""
    end = LONG_FIRST_FIELD.index(b" b\r\n") + 4
    pieces = [LONG_FIRST_FIELD[i:min(i + size, end)] for i in range(0, end, size)] + [LONG_FIRST_FIELD[end:]]
    parser = ParserOnly(Limits())
    got = [r for piece in pieces for r in parser.feed(piece)]
    assert parser.error is None and len(got) == 1


@pytest.mark.parametrize("before", [b"", R11])
def test_a_request_line_without_a_version_is_refused_when_it_ends(before):
    """HTTP/0.9's ``GET /page.html``: a 505 once its line ends, wherever it is split
    (llhttp waits for header fields after it, a head that never came: a 408)."""
    stream = before + HTTP09
    for cut in range(1, len(stream)):
        parser = RequestParser(Limits())
        got = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert len(got) == (1 if before else 0)
        assert parser.error is not None and (parser.error.status, parser.error.detail) == (505, "HTTP/0.9"), cut


LF10 = b"GET /page.html HTTP/1.0\nHost: t\nConnection: keep-alive\n\n"
LF11 = b"GET /style.css HTTP/1.1\nHost: t\n\n"
BODY = b"GET / HTTP/1.1\nHost: t\nContent-Length: 5\n\na\nb\n\n"  # its body's LFs are its 5 bytes


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def requests_and_error(chunks: list[bytes]) -> tuple[list, tuple | None]:
    parser = RequestParser(Limits())
    got = [(r.method, r.target, r.version, r.headers, r.keep_alive) for c in chunks for r in parser.feed(c)]
    return got, (parser.error.status, parser.error.detail) if parser.error else None


@pytest.mark.parametrize("stream", [
    LF10, LF11, LF10 + LF11 + LF10, R11 + LF11 + R,  # alone, pipelined, between CRLF requests
    b"GET /page.html HTTP/1.1\r\nHost: t\n\r\n",  # mixed in one head
    b"GET / HTTP/1.1\nHost: t\n\n" + CLOSE,
    b"GET / HTTP/1.1\n\n",  # (no Host: its 400, as with CRLF)
    b"POST / HTTP/1.1\nHost: t\nContent-Length: 1\n\nx",  # (405)
])
def test_a_head_with_bare_lf_line_ends_is_read_as_with_crlf(stream):
    """RFC 9112 2.2: a bare LF may end a line, and nginx takes it (``nc`` sends
    nothing else); llhttp refused it after the request line's version (400)."""
    want = requests_and_error([crlf(stream)])
    assert want[0] or want[1]
    for cut in range(len(stream) + 1):  # in two reads, cut anywhere
        assert requests_and_error([stream[:cut], stream[cut:]]) == want, cut
    assert requests_and_error(stream.splitlines(keepends=True)) == want  # typed a line at a time


def test_a_body_after_a_bare_lf_head_keeps_its_bytes():
    """Only heads are read a line at a time: the body's LFs are its Content-Length's bytes,
    so the request after it is read where it starts."""
    for cut in range(len(BODY) + len(LF11) + 1):
        stream = BODY + LF11
        got, error = requests_and_error([stream[:cut], stream[cut:]])
        assert error is None and [r[1] for r in got] == [b"/", b"/style.css"], cut


def test_a_crlf_split_over_two_reads_is_one_line_end():
    got, error = requests_and_error([b"GET / HTTP/1.1\r", b"\nHost: t\r", b"\n\r", b"\n"])
    assert error is None and [(r[1], r[3]) for r in got] == [(b"/", [(b"Host", b"t")])]


BODY_AFTER_UPGRADE = b"GET /smuggled HTTP/1.1\r\nHost: s\r\n\r\n"
UPGRADE_WITH_BODY = (b"GET /page.html HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(BODY_AFTER_UPGRADE), BODY_AFTER_UPGRADE))


@pytest.mark.parametrize("cut", range(0, len(UPGRADE_WITH_BODY) + len(R11), 7))
def test_the_body_of_an_ignored_upgrade_is_skipped_wherever_the_reads_end(cut):
    stream = UPGRADE_WITH_BODY + R11
    parser = ParserOnly(Limits())
    got = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
    assert [r.target for r in got] == [b"/page.html", b"/style.css"] and parser.error is None


def test_trailer_fields_stay_out_of_the_request_and_count_against_the_body_limit():
    head = b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
    parser = ParserOnly(Limits())
    (req,) = parser.feed(head + b"Range: bytes=0-1\r\nHost: evil\r\n\r\n")
    assert req.headers == [(b"Host", b"t"), (b"Transfer-Encoding", b"chunked")] and req.keep_alive
    parser = ParserOnly(Limits(max_body=100))
    assert parser.feed(head + b"X-Big: " + b"b" * 200 + b"\r\n\r\n") == []
    assert parser.error is not None and parser.error.status == 413


def test_an_error_in_a_head_request_is_answered_with_the_head_alone():
    from clusterkit.http.core import error_response
    for raw, status in ((b"HEAD / HTTP/1.1\r\n\r\n", 400), (b"HEAD /%s HTTP/1.1\r\n" % (b"a" * 9000), 414),
                        (b"GET / HTTP/1.1\r\n\r\n", 400)):
        parser = ParserOnly(Limits())
        parser.feed(raw)
        assert parser.error is not None and parser.error.status == status
        answer = error_response(parser.error)
        assert answer.endswith(b"\r\n\r\n") is raw.startswith(b"HEAD"), answer


@pytest.mark.parametrize("minor", [b"2", b"9"])
def test_a_higher_http_1_minor_version_is_served_as_1_1(minor):
    """RFC 9110 2.5 (and nginx): HTTP/1.2 is taken as 1.1; llhttp refused it (505)."""
    parser = ParserOnly(Limits())
    (req,) = parser.feed(b"GET /page.html HTTP/1.%s\r\nHost: t\r\n\r\n" % minor)
    assert (req.target, req.version, req.keep_alive, parser.error) == (b"/page.html", "1.1", True, None)
    parser = ParserOnly(Limits())
    assert parser.feed(b"GET / HTTP/2.0\r\nHost: t\r\n\r\n") == [] and parser.error.status == 505


def test_the_body_of_an_ignored_upgrade_with_bare_lf_line_ends_is_skipped_too():
    """A head with bare LF line ends goes to the parser a line at a time: the body
    of such an Upgrade request was parsed as a request, and its length then cut
    from the start of the client's next read (a 400 for a right request)."""
    head = b"GET / HTTP/1.1\nHost: a\nUpgrade: websocket\nConnection: Upgrade\nContent-Length: %d\n\n"
    parser = ParserOnly(Limits())
    got = parser.feed(head % len(BODY_AFTER_UPGRADE) + BODY_AFTER_UPGRADE)
    got += parser.feed(R11)
    assert [r.target for r in got] == [b"/", b"/style.css"] and parser.error is None


def test_a_bad_request_after_a_head_is_answered_with_its_body():
    """The parser still gives the last request's method when the next fails before
    its own: a 400 after a HEAD was sent as a head alone, and said a body was coming."""
    parser = ParserOnly(Limits())
    parser.feed(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    parser.feed(b"\x01bad\r\n\r\n")
    assert parser.error is not None and not parser.error.head_only


@pytest.mark.parametrize("chunks", [[b"FOO /page.html HTTP/1.1\r\nHost: t\r\n\r\n"],
                                    [b"F", b"OO /page.html HTTP/1.1\r\nHost: t\r\n\r\n"],
                                    [b"FOO /page", b".html HTTP/1.1\r\nHost: t\r\n\r\n"],
                                    [b"get /page.html HTTP/1.1\r\n", b"Host: t\r\n\r\n"]])
def test_an_unknown_method_is_a_405_however_its_bytes_come(chunks):
    """Sent in one read, FOO got 405 (as from nginx); "F" then the rest got 400:
    the parser refuses it on the second read, which did not start the message.
    (Refused within the method's name, "FO" then the rest, it is still a 400:
    with no space yet, a token is not told from garbage.)"""
    parser = RequestParser(Limits())
    for chunk in chunks:
        assert parser.feed(chunk) == []
    assert parser.error is not None and parser.error.status == 405


@pytest.mark.parametrize("chunks", [[b"\x16\x03\x01\x02\x00"], [b"\x16", b"\x03\x01 not http\r\n\r\n"],
                                    [b"A" * 100 + b"\r\n\r\n"], [b"SS", b"H-2.0-OpenSSH_9.2\r\n"]])
def test_garbage_stays_a_400(chunks):
    parser = RequestParser(Limits())
    for chunk in chunks:
        parser.feed(chunk)
    assert parser.error is not None and parser.error.status == 400
