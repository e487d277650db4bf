"""Lingering close, as nginx's ``lingering_close``: after an error answer the
server says it is done (FIN), then reads and drops what the client still
sends, for at most LINGER_SECONDS and LINGER_BYTES, before it closes.

Why: closing a socket with unread bytes in it resets the connection, and the
reset can reach the client before it has read the answer, which is then lost
(a 414 after a 100 KB request line, a 400 in the middle of a pipelined batch).

``linger(sock)`` for the threaded server's blocking sockets; ``Linger`` for the
asyncio protocols (the async server on ``epollset.SocketTransport``, lb.py on
the loop's transports; through their ``write_eof``), whose sweep ends it; the
balancer's raw sockets have theirs in ``epollset.py`` (``linger_close``).
"""

from __future__ import annotations

import asyncio
import socket
import time

from .sockets import kernel_timeouts

LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20


def linger(sock: socket.socket) -> None:
    """A blocking socket's lingering close, up to the close itself (the caller's)."""
    sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + LINGER_SECONDS
    taken = 0
    while taken < LINGER_BYTES:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        kernel_timeouts(sock, left)
        data = sock.recv(65536)  # BlockingIOError (an OSError) when the timeout runs out
        if not data:
            return
        taken += len(data)


def turn_away(server, protocol, transport: asyncio.Transport, answer: bytes) -> None:
    """An HTTP server at its client limit (``server.max_clients``: the open-files
    limit near) turns ``protocol``'s client away: ``answer`` (a 503), counted in
    ``server.turned_away``, then a lingering close (``protocol.lingering``, fed and
    swept by the protocol, among ``server.connections`` so that a stop waits for
    it), or, past ``server.max_lingering`` of them, in a flood with no descriptor
    to spare, a close at once (what the client sent meanwhile may reset it)."""
    server.turned_away.count()
    protocol.closing = True
    transport.write(answer)
    if len(server.connections) < server.max_clients + server.max_lingering:
        protocol.lingering = Linger(transport)
        server.connections.add(protocol)
    else:
        transport.close()


class Linger:
    """An asyncio transport's lingering close: begun here (the FIN goes after what
    is buffered); the protocol gives it what it reads (``take``) and its sweep
    the time (``sweep``), and either ends the connection when the bounds are
    passed; the client's EOF closes it before (``eof_received`` returning False)."""

    __slots__ = ("transport", "until", "taken", "unsent", "stall")

    def __init__(self, transport: asyncio.Transport, stall: float = LINGER_SECONDS) -> None:
        try:
            transport.write_eof()
        except OSError:  # gone already (the standard loop says so; uvloop does not)
            transport.abort()
        self.transport = transport
        self.taken = 0
        self.stall = stall
        """While answers are still going out: how long the client may take none of them
        (the server's keep-alive timeout; LINGER_SECONDS once they are all out)."""
        self.unsent = transport.get_write_buffer_size()
        self.until = self._deadline(time.monotonic())

    def take(self, data: bytes) -> None:
        """Drop ``data``; past LINGER_BYTES, end the connection."""
        self.taken += len(data)
        if self.taken > LINGER_BYTES:
            self.transport.abort()

    def sweep(self, now: float) -> None:
        """End the connection once the bounds are passed. While answers are still
        going out, the client reading them is not cut (an 8 MB answer to a slow
        reader was, 2 s in): the wait counts from its last progress, and
        LINGER_SECONDS from when all is out."""
        unsent = self.transport.get_write_buffer_size()
        if unsent < self.unsent:  # it took some (or all): its time counts from now
            self.unsent = unsent
            self.until = self._deadline(now)
        if now > self.until:
            self.transport.abort()

    def _deadline(self, now: float) -> float:
        return now + (max(self.stall, LINGER_SECONDS) if self.unsent else LINGER_SECONDS)
