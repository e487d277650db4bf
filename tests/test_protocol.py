"""Line protocol v1 without sockets: framing, reply building and parsing.

Like h11's tests, a client side and a server side are wired together in
memory; hypothesis splits the byte streams at every possible point.
"""

import pytest
from hypothesis import given, settings, strategies as st

from clusterkit.protocol import (
    CLOSED, MORE, NOTICE, OFF, LineFramer, LineTooLong, LocalProtocolError, RemoteProtocolError, ResponseParser,
    SlowLineWatch, build_error, build_replies, check_server_name, match_answers,
)

SIMPLE = b"hello\n"
CRLF = b"hello\r\n"
EMPTY_LINE = b"\n"
NOT_UTF8 = b"\xff\xfe\x00\x80 bytes\n"
CR_INSIDE = b"a\rb\n"
TRAILING_CR_KEPT = b"a\r\r\n"  # the message is b"a\r": only the last \r goes
PIPELINED = b"one\ntwo\r\nthree\n"

NAME = b"server1"


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def frame_all(chunks, max_line=65536):
    framer = LineFramer(max_line)
    out = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return out, framer


@pytest.mark.parametrize("raw, expected", [
    (SIMPLE, [b"hello"]),
    (CRLF, [b"hello"]),
    (EMPTY_LINE, [b""]),
    (NOT_UTF8, [b"\xff\xfe\x00\x80 bytes"]),
    (CR_INSIDE, [b"a\rb"]),
    (TRAILING_CR_KEPT, [b"a\r"]),
    (PIPELINED, [b"one", b"two", b"three"]),
    (b"no newline yet", []),
])
def test_framing_examples(raw, expected):
    assert frame_all([raw])[0] == expected


def test_line_limit_is_exact():
    ok = b"x" * 16
    assert frame_all([ok + b"\n"], max_line=16)[0] == [ok]
    assert frame_all([ok + b"\r\n"], max_line=16)[0] == [ok]
    msgs, framer = frame_all([b"y" * 17 + b"\n"], max_line=16)
    assert msgs == [] and isinstance(framer.error, LineTooLong)
    assert framer.error.code == "line-too-long"


def test_messages_before_a_long_line_are_kept_and_nothing_after():
    msgs, framer = frame_all([b"a\nb\n" + b"z" * 40 + b"\nc\n"], max_line=16)
    assert msgs == [b"a", b"b"]
    assert framer.error is not None
    assert framer.feed(b"d\n") == []


def test_unfinished_long_line_is_refused_without_buffering_it():
    framer = LineFramer(1024)
    for _ in range(100):
        framer.feed(b"q" * 100)
        if framer.error:
            break
    assert framer.error is not None
    assert framer.buffered == 0


def test_cr_may_wait_for_its_newline_at_the_limit():
    framer = LineFramer(4)
    assert framer.feed(b"abcd\r") == []
    assert framer.error is None
    assert framer.feed(b"\n") == [b"abcd"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
       st.booleans())
def test_any_split_gives_the_same_messages(messages, cuts, crlf):
    end = b"\r\n" if crlf else b"\n"
    stream = b"".join(m + end for m in messages)
    expected = [m[:-1] if (not crlf and m.endswith(b"\r")) else m for m in messages]
    got, framer = frame_all(split_at(stream, cuts))
    assert got == expected
    assert framer.error is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"").rstrip(b"\r")), max_size=25),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_client_and_server_in_memory(messages, client_cuts, server_cuts):
    """The server side frames what the client sent; the client side parses what
    the server answered; each side sees exactly what the other meant."""
    client_stream = b"".join(m + b"\n" for m in messages)
    server_framer = LineFramer()
    server_out = b""
    for chunk in split_at(client_stream, client_cuts):
        server_out += build_replies(NAME, server_framer.feed(chunk))
    parser = ResponseParser()
    responses = []
    for chunk in split_at(server_out, server_cuts):
        responses.extend(parser.feed(chunk))
    assert len(responses) == len(messages)
    for sent, resp in zip(messages, responses):
        assert resp.server == NAME
        assert resp.matches(sent)
    assert match_answers(server_out, messages) == (len(messages), len(server_out), MORE)


def test_reply_keeps_a_trailing_cr_and_the_ack_confirms_it():
    parser = ResponseParser()
    [resp] = parser.feed(build_replies(NAME, [b"a\r"]))
    assert resp.message == b"a\r" and resp.length == 2


def test_error_lines_parse_as_errors():
    parser = ResponseParser()
    [r1, r2] = parser.feed(build_error("no-backend") + build_replies(NAME, [b"x"]))
    assert r1.error == "no-backend" and not r1.ok
    assert r2.matches(b"x")


@pytest.mark.parametrize("bad, code", [
    (b"ACK server1 3\n", "ack-without-reply"),
    (b"REPLY server1 abc\nREPLY server1 abc\n", "ack-missing"),
    (b"REPLY server1 abc\nACK server2 3\n", "ack-mismatch"),
    (b"HELLO\n", "unknown-line"),
    (b"REPLY server1 x\nACK server1 three\n", "bad-ack"),
])
def test_off_protocol_replies_are_remote_errors(bad, code):
    with pytest.raises(RemoteProtocolError) as info:
        ResponseParser().feed(bad)
    assert info.value.code == code


def test_partial_reply_is_not_reported_until_its_ack():
    parser = ResponseParser()
    assert parser.feed(b"REPLY s1 hi\nAC") == []
    assert parser.first_byte_seen
    [resp] = parser.feed(b"K s1 2\n")
    assert resp.matches(b"hi")


def test_match_answers_stops_at_a_half_pair():
    buf = build_replies(NAME, [b"a", b"b"]) + b"REPLY server1 c\n"
    n, end, why = match_answers(buf, [b"a", b"b", b"c"])
    assert n == 2 and buf[end:] == b"REPLY server1 c\n" and why == MORE
    assert match_answers(build_error("oops"), [b"x"]) == (1, 9, MORE)  # an ERR takes a message's place
    assert match_answers(build_replies(NAME, [b"a", b"b"]), [b"a"]) == (1, len(build_replies(NAME, [b"a"])), MORE)


@pytest.mark.parametrize("tail", [b"garbage\n", b"REPLY server1 c\nnot an ack\n", b"ACK server1 1\n", b"\n",
                                  b"REPLY server1 b\nACK server1 1\n", b"REPLY server1 cc\nACK server1 2\n",
                                  b"REPLY server1\nACK server1 1\n",
                                  # the ACK that does not confirm its REPLY: another length, another
                                  # server's name, a bare or a padded line (a relay passed these on)
                                  b"REPLY server1 c\nACK server1 2\n", b"REPLY server1 c\nACK server2 1\n",
                                  b"REPLY server1 c\nACK server11 1\n", b"REPLY server1 c\nACK \n",
                                  b"REPLY server1 c\nACK server1 11\n", b"REPLY server1 c\nACK server1 1 \n",
                                  b"REPLY server1 c\nACK server1x1\n"])
def test_match_answers_flags_what_is_not_the_next_messages_answer(tail):
    good = build_replies(NAME, [b"a", b"b"])
    n, end, why = match_answers(good + tail + build_replies(NAME, [b"c"]), [b"a", b"b", b"c"])
    assert (n, end, why) == (2, len(good), OFF)
    # Not yet a whole line: not known to be bad.
    assert match_answers(good + b"garb", [b"a", b"b", b"c"]) == (2, len(good), MORE)


@pytest.mark.parametrize("notice", [b"ERR idle-timeout\n", b"ERR shutting-down\n", b"ERR busy\n"])
def test_match_answers_takes_no_connection_notice_for_an_answer(notice):
    good = build_replies(NAME, [b"a"])
    assert match_answers(good + notice, [b"a", b"b"]) == (1, len(good), NOTICE)


def test_match_answers_stops_after_an_answer_that_ends_the_connection():
    good = build_replies(NAME, [b"a"]) + b"ERR line-too-long\n"
    assert match_answers(good + build_replies(NAME, [b"c"]), [b"a", b"b", b"c"]) == (2, len(good), CLOSED)


def test_bad_names_and_codes_are_local_errors():
    with pytest.raises(LocalProtocolError):
        check_server_name("two words")
    with pytest.raises(LocalProtocolError):
        build_error("has space")


def test_slow_line_watch_times_only_a_line_that_does_not_end():
    w = SlowLineWatch()
    assert not w.too_slow(True, 0, now=0.0, timeout=1.0)    # first seen unfinished: the clock starts
    assert not w.too_slow(True, 0, now=1.0, timeout=1.0)    # exactly the timeout: not yet
    assert w.too_slow(True, 0, now=1.5, timeout=1.0)        # the same line, still unfinished
    assert not w.too_slow(True, 3, now=2.0, timeout=1.0)    # lines ended meanwhile: a new line, a new clock
    assert not w.too_slow(False, 3, now=9.0, timeout=1.0)   # nothing unfinished
    assert not w.too_slow(True, 3, now=9.5, timeout=1.0)    # begun again after that: clock from now
    assert w.too_slow(True, 3, now=10.6, timeout=1.0)
