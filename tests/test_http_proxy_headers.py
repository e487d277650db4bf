"""lb.py's header handling as a proxy (RFC 9110 7.6), over real sockets:
X-Forwarded-For and Via appended to what was received, in order; hop-by-hop
fields and those a Connection header names not passed on, either way; and a
request within the limits that would not be with what lb.py adds refused by
lb.py itself (431), never by a backend with the same limits."""

from __future__ import annotations

import itertools
import queue
import re
import socket
import time

import pytest

from .conftest import fake_backend
from .http_setup import exchange, ok_answer, read_requests, status_of

pytestmark = pytest.mark.timeout(120)

FIXED_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
AB_GET = b"GET /page.html HTTP/1.0\r\nHost: t\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n"
AB_FORWARDED = (b"GET /page.html HTTP/1.1\r\nHost: t\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n"
                b"X-Forwarded-For: 127.0.0.1\r\nVia: 1.0 clusterkit-lb")
TWO_FORWARDED_FOR = (b"GET /x HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n"
                     b"Connection: close\r\n\r\n")
EVIL_VIA = b"GET /x HTTP/1.1\r\nHost: t\r\nVia: 1.0 evil\r\nConnection: close\r\n\r\n"
TWO_VIAS = b"GET /x HTTP/1.1\r\nHost: t\r\nVia: 1.0 a\r\nVia: 1.1 b\r\nConnection: close\r\n\r\n"
CONNECTION_NAMES = (b"GET /x HTTP/1.1\r\nHost: t\r\nX-Secret: hop\r\nConnection: close, X-Secret\r\n"
                    b"Connection: x-other\r\nX-Other: hop\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
                    b"TE: trailers\r\nTrailer: X-Sum\r\nUpgrade: h2c\r\nX-Kept: end-to-end\r\n\r\n")
HOP_FIELDS = (b"connection", b"x-secret", b"x-other", b"keep-alive", b"proxy-connection", b"te", b"trailer",
              b"upgrade")
ODD_ANSWER = (b"HTTP/1.1 200 OK\r\nVia: 1.0 upstream\r\nConnection: keep-alive, X-Internal\r\nX-Internal: secret\r\n"
              b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTrailer: X-Sum\r\n"
              b"X-Public: yes\r\nContent-Length: 3\r\n\r\nok\n")
CONNECTION_NAMES_FORWARDED_FOR = (b"GET /x HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 6.6.6.6\r\nVia: 1.0 x\r\n"
                                  b"Connection: close, X-Forwarded-For, Via, Host\r\n\r\n")


def _recording(heads: queue.Queue, answer: bytes = FIXED_ANSWER):
    """A backend that puts each request head it gets (but the health checks') in
    ``heads``, raw, and answers each with ``answer``."""
    def serve(conn: socket.socket) -> None:
        for head in read_requests(conn):
            if b" /healthz " not in head.split(b"\r\n", 1)[0]:
                heads.put(head)
            conn.sendall(FIXED_ANSWER if b" /healthz " in head else answer)
    return serve


def _fields(head: bytes, name: bytes) -> list[bytes]:
    """The values of every ``name`` line of a head, in order."""
    return [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]
            if line.split(b":", 1)[0].lower() == name.lower()]


def _names(head: bytes) -> set[bytes]:
    return {line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]}


def _read_answer(s: socket.socket) -> bytes:
    """One answer with a Content-Length, from a keep-alive connection."""
    data = b""
    while True:
        head, done, body = data.partition(b"\r\n\r\n")
        if done:
            m = re.search(rb"Content-Length: (\d+)", head)
            if len(body) >= int(m.group(1)):
                return data
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk


@pytest.fixture
def recorded(setup):
    """``(start, heads)``: ``start(odd=False)`` starts lb.py in front of a recording
    backend (answering ODD_ANSWER if ``odd``) and gives its port; ``heads`` has the
    request heads the backends got."""
    heads: queue.Queue = queue.Queue()
    with fake_backend(_recording(heads)) as plain_port, fake_backend(_recording(heads, ODD_ANSWER)) as odd_port:
        def start(odd: bool = False) -> int:
            port = odd_port if odd else plain_port
            return setup.server("lb.py", "--backend", f"fake=127.0.0.1:{port}", "--check-interval", "30").port
        yield start, heads


def test_x_forwarded_for_lines_combine_in_order_then_the_client(recorded):
    """Two incoming lines went as '2.2.2.2, 1.1.1.1, 127.0.0.1' (RFC 9110 5.3: in order)."""
    start, heads = recorded
    data = exchange(start(), TWO_FORWARDED_FOR)
    assert status_of(data) == 200, data[:200]
    assert _fields(heads.get(timeout=10), b"X-Forwarded-For") == [b"1.1.1.1, 2.2.2.2, 127.0.0.1"]


def test_via_received_is_kept_and_ours_appended(recorded):
    """An incoming 'Via: 1.0 evil' was dropped (RFC 9110 7.6.3: a proxy appends its entry)."""
    start, heads = recorded
    port = start()
    exchange(port, EVIL_VIA)
    assert _fields(heads.get(timeout=10), b"Via") == [b"1.0 evil, 1.1 clusterkit-lb"]
    exchange(port, TWO_VIAS)
    assert _fields(heads.get(timeout=10), b"Via") == [b"1.0 a, 1.1 b, 1.1 clusterkit-lb"]


def test_fields_the_connection_header_names_are_not_forwarded(recorded):
    """'Connection: close, X-Secret' with 'X-Secret: hop' passed X-Secret on (RFC 9110
    7.6.1: a proxy removes the fields Connection names, wherever they are), and the
    other hop-by-hop fields are not passed on either; end-to-end ones are."""
    start, heads = recorded
    data = exchange(start(), CONNECTION_NAMES)
    assert status_of(data) == 200, data[:200]
    head = heads.get(timeout=10)
    assert not _names(head) & set(HOP_FIELDS), head
    assert _fields(head, b"X-Kept") == [b"end-to-end"] and _fields(head, b"Host") == [b"t"]


def test_an_http10_request_without_host_goes_with_the_balancers_address_and_version(recorded):
    """It went with an empty Host, which nginx refuses with 400 (and HAProxy's
    default health check sends no Host); its Via entry said 1.1."""
    start, heads = recorded
    port = start()
    assert status_of(exchange(port, b"GET /x HTTP/1.0\r\n\r\n")) == 200
    head = heads.get(timeout=10)
    assert _fields(head, b"Host") == [b"127.0.0.1:%d" % port] and _fields(head, b"Via") == [b"1.0 clusterkit-lb"]


def test_an_absolute_form_target_goes_as_its_path_with_its_authority_as_host(recorded):
    """RFC 9112 3.2.2: the target's authority stands for the Host header."""
    start, heads = recorded
    exchange(start(), b"GET http://Example.org:8080/x?y=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head = heads.get(timeout=10)
    assert head.startswith(b"GET /x?y=1 HTTP/1.1\r\n") and _fields(head, b"Host") == [b"Example.org:8080"]


def test_a_head_goes_as_a_head_with_its_range(recorded):
    """A HEAD went to the backend as a GET, without its Range (a GET's Range makes a
    206); the backend made and sent the whole body, for nothing. It goes as it came,
    as nginx and HAProxy forward it (RFC 9110 14.2: a server ignores a HEAD's Range)."""
    start, heads = recorded
    exchange(start(), b"HEAD /x HTTP/1.1\r\nHost: t\r\nRange: bytes=0-1\r\nIf-Range: \"e\"\r\n"
                      b"Connection: close\r\n\r\n")
    head = heads.get(timeout=10)
    assert head.startswith(b"HEAD /x HTTP/1.1\r\n") and _fields(head, b"Range") == [b"bytes=0-1"], head


def _head_aware(seen: list, head_answer: bytes):
    """A backend that answers a HEAD with ``head_answer`` and anything else with its
    path; ``seen`` gets (connection number, request line) of each request but the checks'."""
    numbers = itertools.count()

    def answer(conn: socket.socket) -> None:
        n = next(numbers)
        for head in read_requests(conn):
            line = head.split(b"\r\n", 1)[0]
            if b" /healthz " in line:
                conn.sendall(FIXED_ANSWER)
                continue
            seen.append((n, line))
            conn.sendall(head_answer if line.startswith(b"HEAD ") else ok_answer(line.split(b" ")[1]))
    return answer


def _read_head(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    assert data.endswith(b"\r\n\r\n"), data  # a head, and nothing after it
    return data


def _head_then_get(port: int, paths: tuple[bytes, ...]) -> list[bytes]:
    """On one keep-alive connection, a HEAD then a GET of each path: the HEADs' answers."""
    heads = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for path in paths:
            s.sendall(b"HEAD %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
            heads.append(_read_head(s))
            s.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
            answer = _read_answer(s)  # (a body left over from the HEAD's would come first)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(path), answer
    return heads


def test_a_heads_answer_ends_with_its_head_and_the_connection_serves_on(setup):
    """The answer to a HEAD says Content-Length: 1000 and has no body (RFC 9110
    9.3.2): the client gets that length and no body, and the backend connection
    serves the next requests (httptools' parser cannot be told that such an answer
    has no body, and would wait for 1000 bytes: lb.py replaces it)."""
    seen: list = []
    with fake_backend(_head_aware(seen, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nX-Head: yes\r\n\r\n")) as port:
        lb = setup.server("lb.py", "--backend", f"fake=127.0.0.1:{port}", "--check-interval", "30")
        for head in _head_then_get(lb.port, (b"/a", b"/b")):
            assert status_of(head) == 200 and _fields(head, b"Content-Length") == [b"1000"], head
            assert _fields(head, b"X-Head") == [b"yes"], head
    assert [line for _, line in seen] == [b"HEAD /a HTTP/1.1", b"GET /a HTTP/1.1", b"HEAD /b HTTP/1.1",
                                          b"GET /b HTTP/1.1"]
    assert len({n for n, _ in seen}) == 1, seen  # one backend connection for them all


@pytest.mark.parametrize("head_answer, length", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", [b"5"]),  # a body nobody asked for
    (b"HTTP/1.1 200 OK\r\nX-Head: yes\r\n\r\n", [])])  # no length: the end of the body is the close
def test_after_a_heads_answer_the_backend_connection_goes_unless_it_is_clean(setup, head_answer, length):
    """A backend that sends a body after its answer to a HEAD: kept, the connection
    would give those bytes as the start of the next answer. Without a length, the
    answer would end at the close. Either way the client gets the head (with the
    backend's length, if any) and nothing else, and its next request goes on a new
    backend connection."""
    seen: list = []
    with fake_backend(_head_aware(seen, head_answer)) as port:
        lb = setup.server("lb.py", "--backend", f"fake=127.0.0.1:{port}", "--check-interval", "30")
        for head in _head_then_get(lb.port, (b"/a", b"/b")):
            assert status_of(head) == 200 and _fields(head, b"Content-Length") == length, head
    assert [line for _, line in seen][:2] == [b"HEAD /a HTTP/1.1", b"GET /a HTTP/1.1"]
    assert seen[0][0] != seen[1][0], seen


def test_a_request_repeated_in_another_version_or_method_goes_as_its_own(recorded):
    """lb.py reuses what it sent for a request repeated byte for byte; one that
    differed only in its version went with the other's Via entry (1.1 for 1.0)."""
    start, heads = recorded
    with socket.create_connection(("127.0.0.1", start()), timeout=10) as s:
        for line in (b"GET /x HTTP/1.1", b"GET /x HTTP/1.0", b"HEAD /x HTTP/1.0", b"GET /x HTTP/1.0"):
            s.sendall(line + b"\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
            (_read_head if line.startswith(b"HEAD") else _read_answer)(s)
    got = [heads.get(timeout=10) for _ in range(4)]
    assert [(h.split(b"\r\n", 1)[0], _fields(h, b"Via")) for h in got] == [
        (b"GET /x HTTP/1.1", [b"1.1 clusterkit-lb"]), (b"GET /x HTTP/1.1", [b"1.0 clusterkit-lb"]),
        (b"HEAD /x HTTP/1.1", [b"1.0 clusterkit-lb"]), (b"GET /x HTTP/1.1", [b"1.0 clusterkit-lb"])]


def test_connection_cannot_drop_what_lb_adds_nor_the_host(recorded):
    """A client may make its own X-Forwarded-For and Via hop-by-hop, not lb.py's
    entries, nor the Host the backend needs."""
    start, heads = recorded
    exchange(start(), CONNECTION_NAMES_FORWARDED_FOR)
    head = heads.get(timeout=10)
    assert _fields(head, b"X-Forwarded-For") == [b"127.0.0.1"]
    assert _fields(head, b"Via") == [b"1.1 clusterkit-lb"] and _fields(head, b"Host") == [b"t"]


def test_a_plain_request_goes_as_before_and_a_repeat_is_not_taken_for_another(recorded):
    """The common case (ab's request) is forwarded as it was; on one keep-alive
    connection, requests that differ only in X-Forwarded-For or Via each go with
    their own (lb.py reuses what it sent for a request repeated byte for byte)."""
    start, heads = recorded
    port = start()
    exchange(port, AB_GET)
    assert heads.get(timeout=10) == AB_FORWARDED
    base = b"GET /x HTTP/1.1\r\nHost: t\r\n%s\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for extra, xff, via in [(b"", b"127.0.0.1", b"1.1 clusterkit-lb"),
                                (b"X-Forwarded-For: 9.9.9.9\r\n", b"9.9.9.9, 127.0.0.1", b"1.1 clusterkit-lb"),
                                (b"Via: 1.0 p\r\n", b"127.0.0.1", b"1.0 p, 1.1 clusterkit-lb"),
                                (b"X-Forwarded-For: 9.9.9.9\r\n", b"9.9.9.9, 127.0.0.1", b"1.1 clusterkit-lb"),
                                (b"X-Forwarded-For: 9.9.9.9\r\n", b"9.9.9.9, 127.0.0.1", b"1.1 clusterkit-lb"),
                                (b"", b"127.0.0.1", b"1.1 clusterkit-lb")]:
            s.sendall(base % extra)
            assert status_of(_read_answer(s)) == 200
            head = heads.get(timeout=10)
            assert (_fields(head, b"X-Forwarded-For"), _fields(head, b"Via")) == ([xff], [via]), head


def test_answer_keeps_the_backends_via_and_drops_its_hop_by_hop_fields(recorded):
    """On the way back too: our Via entry after the backend's, in one line; the
    fields the backend's Connection names and the hop-by-hop ones stay here."""
    start, _ = recorded
    port = start(odd=True)
    for _ in range(2):  # (the second: lb.py's kept answer head)
        data = exchange(port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        head = data.partition(b"\r\n\r\n")[0]
        assert status_of(data) == 200 and data.endswith(b"\r\n\r\nok\n"), data
        assert _fields(head, b"Via") == [b"1.0 upstream, 1.1 clusterkit-lb"], head
        assert not _names(head) & {b"x-internal", b"keep-alive", b"proxy-connection", b"upgrade", b"trailer"}, head
        assert _fields(head, b"X-Public") == [b"yes"] and _fields(head, b"X-Backend") == [b"fake"]


# What lb.py adds to a request from 127.0.0.1 with a Host, as the backend's parser
# counts it (name + value + 4): 'X-Forwarded-For: 127.0.0.1' and 'Via: 1.1 clusterkit-lb'.
ADDED_BYTES = (15 + 9 + 4) + (3 + 17 + 4)


def _many_headers(count: int, line: bytes = b"X-H%d: v\r\n") -> bytes:
    """A request of ``count`` header lines, Host among them."""
    lines = b"".join(line.replace(b"%d", b"%d" % i) for i in range(count - 1))
    return b"GET /page.html HTTP/1.1\r\nHost: t\r\n%s\r\n" % lines


def _big_header(total: int) -> bytes:
    """A request whose header fields count ``total`` bytes (Host and one big X-Big) as the parser counts them."""
    return b"GET /page.html HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\n\r\n" % (b"a" * (total - (4 + 1 + 4) - (5 + 4)))


@pytest.mark.parametrize("raw, forwarded_fits", [
    (_many_headers(100), False),  # the audit's: 200 from a backend, its 431 through lb.py
    (_big_header(16348), False),  # a ~16,340-byte header: likewise
    (_many_headers(99), False),
    (_many_headers(98), True),  # 98 + 2 added = 100: the backend's limit, just
    (_many_headers(99, b"X: \r\n"), False),  # the shortest lines
    (_big_header(16384 - ADDED_BYTES), True),
    (_big_header(16384 - ADDED_BYTES + 1), False),
])
def test_a_request_within_the_limits_never_gets_a_backends_431(setup, raw, forwarded_fits):
    """lb.py (default limits) in front of async_server.py (the same): a request the
    backend takes directly is answered 200 through lb.py when what lb.py sends
    still fits, else lb.py's own 431 before any backend is used; it was the
    backend's 431 (with X-Backend) for a request lb.py had accepted."""
    lb = setup.lb(1)
    direct = exchange(setup.backends["backend1"].port, raw)
    assert status_of(direct) == 200, direct[:200]
    data = exchange(lb.port, raw)
    head = data.partition(b"\r\n\r\n")[0]
    if forwarded_fits:
        assert status_of(data) == 200 and b"\r\nX-Backend: backend1" in head, head
    else:
        assert status_of(data) == 431 and b"X-Backend" not in head and b"Via" not in head, head
        setup.wait_log("status=431")
        assert re.search(r' lb event=refused client=\S+ method=GET path=/page.html status=431 reason="request '
                         r'headers too large with X-Forwarded-For and Via added"', setup.log())
    assert "backend-down" not in setup.log()


def _endless_head(start: bytes, sent: list):
    """A backend that answers the checks, and a request with ``start`` and then
    more of the same line, 64 KiB at a time (4 MiB at most, in 10 s at most);
    ``sent`` gets how much of it went before the connection failed or it stopped."""

    def answer(conn: socket.socket) -> None:
        for head in read_requests(conn):
            if b" /healthz " in head.split(b"\r\n", 1)[0]:
                conn.sendall(FIXED_ANSWER)
                continue
            total = 0
            deadline = time.monotonic() + 10
            try:
                conn.sendall(start)
                while total < 4 * 1024 * 1024 and time.monotonic() < deadline:
                    conn.sendall(b"a" * 65536)
                    total += 65536
            finally:
                sent.append(total)
            return
    return answer


@pytest.mark.parametrize("start", [b"HTTP/1.1 200 OK\r\nX-Big: ", b"HTTP/1.1 200 "])
def test_a_backend_answer_whose_head_never_ends_is_a_502_and_its_connection_goes(setup, start):
    """A header field (or status line) that goes on without end: lb.py answers 502
    once the head passes 64 KiB, and drops the backend connection, as nginx does
    past its proxy_buffer_size; it kept all of it (15 MB a second here) and
    answered 504 once the backend went quiet."""
    sent: list = []
    with fake_backend(_endless_head(start, sent)) as port:
        lb = setup.server("lb.py", "--backend", f"fake=127.0.0.1:{port}", "--check-interval", "30",
                          "--response-timeout", "2")
        data = exchange(lb.port, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", timeout=30)
        assert status_of(data) == 502, data[:200]
        deadline = time.monotonic() + 15
        while not sent:
            assert time.monotonic() < deadline, "the backend connection was kept"
            time.sleep(0.05)
    assert sent[0] < 4 * 1024 * 1024, sent


def _whole_head(size: int):
    """A backend that answers the checks, and a request with a whole answer, in one
    write, whose X-Big field makes its head ``size`` bytes."""
    def answer(conn: socket.socket) -> None:
        for head in read_requests(conn):
            if b" /healthz " in head.split(b"\r\n", 1)[0]:
                conn.sendall(FIXED_ANSWER)
                continue
            start = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Big: "
            conn.sendall(start + b"a" * (size - len(start) - 4) + b"\r\n\r\nok\n")
    return answer


@pytest.mark.parametrize("size, status", [(60_000, 200), (100_000, 502), (250_000, 502)])
def test_a_backend_answer_head_over_64_kib_is_a_502_also_when_it_comes_in_one_read(setup, size, status):
    """The limit was counted only over reads that ended inside the head: a 100 KB
    head that came whole in one read went to the client (nginx: 502, "upstream
    sent too big header")."""
    with fake_backend(_whole_head(size)) as port:
        lb = setup.server("lb.py", "--backend", f"fake=127.0.0.1:{port}", "--check-interval", "30")
        data = exchange(lb.port, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", timeout=30)
    assert status_of(data) == status, data[:100]
    assert (data.endswith(b"\r\n\r\nok\n")) is (status == 200)


def test_the_via_entry_on_an_answer_names_the_version_the_backend_answered_in(setup):
    """RFC 9110 7.6.3: the received-protocol of each hop. An HTTP/1.0 backend's
    answer got 'Via: 1.1 clusterkit-lb', as the requests of HTTP/1.0 clients
    already get 1.0."""
    heads: queue.Queue = queue.Queue()
    old = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
    with fake_backend(_recording(heads, old)) as port10, fake_backend(_recording(heads)) as port11:
        for port, via in ((port10, b"Via: 1.0 clusterkit-lb\r\n"), (port11, b"Via: 1.1 clusterkit-lb\r\n")):
            lb = setup.server("lb.py", "--backend", f"b=127.0.0.1:{port}", "--check-interval", "30")
            for _ in range(2):  # (the second: lb.py's kept answer head)
                data = exchange(lb.port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
                assert status_of(data) == 200 and via in data, data
