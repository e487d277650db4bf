"""The blocking client: send a message, get its reply and confirmation, time both.

What it is for: ``client_send_message()`` (one connection per message, as the
original assignment's client did) and ``Client`` (one persistent connection
for many messages). Both return a ``ClientResult`` with the reply, the
confirmation and the timings of SPEC.md, from a monotonic clock:

* ``connect``: TCP connect time (only when the call opened the connection);
* ``latency``: send of the message until the first byte of its reply;
* ``rtt``: send of the message until its confirmation (``ACK``) has arrived.

Every wait is bounded by ``timeout``. Failures raise ``ClientError`` with a
short code (``connection-refused``, ``timeout``, ``closed``, ``protocol``, or
the server's own ``ERR`` code) so callers can count them by kind.

What it is not: a load generator (see ``clusterkit.stress``) or a printer
(the command line lives in ``client_cli.py``).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from .protocol import DEFAULT_MAX_LINE, ProtocolError, Response, ResponseParser, message_line
from .sockets import connect_any, host_port

_ns = time.perf_counter_ns


@dataclass(frozen=True)
class ClientResult:
    message: bytes
    server: str
    reply: str
    """The ``REPLY`` line as received (without its newline)."""
    confirmation: str
    """The ``ACK`` line as received."""
    length: int
    connect_ms: float | None
    latency_ms: float
    rtt_ms: float

    @property
    def one_way_estimate_ms(self) -> float:
        """The textbook one-way delay estimate, rtt / 2 (an estimate, not a measurement)."""
        return self.rtt_ms / 2


class ClientError(Exception):
    """A message that got no good answer; ``code`` says what kind of failure."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def _encode(message: str | bytes) -> bytes:
    # surrogateescape: the bytes a command line gave, also when they are no UTF-8 (SPEC: any byte but \n).
    data = message.encode("utf-8", "surrogateescape") if isinstance(message, str) else bytes(message)
    if b"\n" in data:
        raise ValueError("a message is one line: it may not contain a newline")
    return data


class Client:
    """One persistent connection to a line-protocol server (or the balancer)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 7000, timeout: float = 5.0,
                 max_line: int = DEFAULT_MAX_LINE) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_line = max_line
        self.sock: socket.socket | None = None
        self.connect_ms: float | None = None
        self._parser = ResponseParser(max_line)
        self._ready: list[Response] = []
        self._addresses: list[tuple] | None = None  # the name looked up once, before any connect is timed

    def _resolve(self) -> list[tuple]:
        if self._addresses is None:
            try:
                self._addresses = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:  # (UnicodeError: a label over 63 characters)
                raise ClientError("connect-failed", f"cannot resolve {self.host!r}: "
                                                    f"{getattr(exc, 'strerror', None) or exc}") from None
        return self._addresses

    def _open(self) -> socket.socket:
        """``socket.create_connection`` without its name lookup (done before the clock starts)."""
        return connect_any(self._resolve(), self.timeout)

    def connect(self) -> float:
        """Open the connection; returns the connect time in ms: the TCP connect's
        (SPEC), not the name lookup's, which took 1.7 ms the first time in a process."""
        self._resolve()
        start = _ns()
        try:
            sock = self._open()
        except ConnectionRefusedError:
            raise ClientError("connection-refused", f"connection refused by {host_port(self.host, self.port)} "
                                                    f"(is the server running?)") from None
        except TimeoutError:
            raise ClientError("timeout", f"connect to {host_port(self.host, self.port)} timed out "
                                         f"after {self.timeout:g}s") from None
        except OSError as exc:
            raise ClientError("connect-failed", f"cannot connect to {host_port(self.host, self.port)}: "
                                                f"{exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.connect_ms = (_ns() - start) / 1e6
        return self.connect_ms

    def send_message(self, message: str | bytes) -> ClientResult:
        """Send one message and wait for its reply and confirmation."""
        data = _encode(message)
        connect_ms = None
        if self.sock is None:
            connect_ms = self.connect()
        sock = self.sock
        assert sock is not None
        sent_at = _ns()
        try:
            sock.sendall(message_line(data))
        except OSError as exc:
            self.close()
            raise ClientError("closed", f"send failed: {exc.strerror or exc}") from None
        first_byte_at = None
        deadline = time.monotonic() + self.timeout
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise ClientError("timeout", f"no reply from {host_port(self.host, self.port)} "
                                             f"within {self.timeout:g}s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                self.close()
                raise ClientError("closed", f"connection lost: {exc.strerror or exc}") from None
            now = _ns()
            if not chunk:
                self.close()
                raise ClientError("closed", f"{host_port(self.host, self.port)} closed the connection "
                                            "before the reply was complete")
            if first_byte_at is None:
                first_byte_at = now
            try:
                self._ready.extend(self._parser.feed(chunk))
            except ProtocolError as exc:
                self.close()
                raise ClientError("protocol", f"bad reply from the server: {exc}") from None
            done_at = now
        response = self._ready.pop(0)
        if self._ready:  # more answers than messages: the server answered this one twice
            self.close()
            raise ClientError("extra-answer", "the server answered the message more than once")
        if response.error is not None:
            why = " (the balancer has no healthy backend)" if response.error == "no-backend" else ""
            raise ClientError(response.error, f"the server answered ERR {response.error}{why}")
        if response.message != data:
            raise ClientError("wrong-reply", f"the reply does not echo the message (got {response.message[:60]!r})")
        if response.length != len(data):
            raise ClientError("bad-ack", f"the confirmation gives length {response.length}, not {len(data)}")
        server = response.server.decode("ascii", "replace")
        return ClientResult(
            message=data, server=server,
            reply=f"REPLY {server} {response.message.decode('utf-8', 'backslashreplace')}",
            confirmation=f"ACK {server} {response.length}", length=response.length,
            connect_ms=connect_ms, latency_ms=(first_byte_at - sent_at) / 1e6,
            rtt_ms=(done_at - sent_at) / 1e6)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
                self._parser = ResponseParser(self.max_line)
                self._ready.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def client_send_message(message: str | bytes, host: str = "127.0.0.1", port: int = 7000,
                        timeout: float = 5.0) -> ClientResult:
    """Open a connection, send ``message``, return its reply, confirmation and timings."""
    with Client(host, port, timeout) as client:
        return client.send_message(message)
