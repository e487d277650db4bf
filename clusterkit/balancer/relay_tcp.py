"""TCP mode: a plain byte relay, for speed; failover happens at connect time.

The client's bytes go to the backend and back untouched (HAProxy's ``mode
tcp``). A refused or timed-out connect marks the backend DOWN and the next
healthy backend is tried, so a new client never waits on a dead server; but
once connected, a backend that dies takes its client connection with it (the
client sees the close), as with any TCP proxy. Message mode is the one that
never loses a message.

Flow control: each side stops reading while the other side's socket is full.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ..sockets import local_shortage
from .pool import Backend, connect_failure
from .relay_message import ERR_BUSY, ERR_NO_BACKEND, _peer

if TYPE_CHECKING:
    from .app import Balancer


EARLY_LIMIT = 256 * 1024
"""Bytes kept from a client before its backend connection is up; past this, reading pauses."""


class TcpBackendSide(asyncio.Protocol):
    __slots__ = ("client", "transport", "to_client")

    def __init__(self, client: TcpClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.to_client = client.transport.write  # type: ignore[union-attr]  # bound once: the hot path

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.to_client(data)

    def eof_received(self) -> bool:
        # The backend is done sending: pass the half-close on, and close once
        # both directions are finished.
        client = self.client
        client.backend_eof = True
        if client.client_eof or client.transport is None or not client.transport.can_write_eof():
            return False
        client.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.backend_gone()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()  # type: ignore[union-attr]


class TcpClientSide(asyncio.Protocol):
    def __init__(self, app: Balancer) -> None:
        self.app = app
        self.elog = app.elog
        self.transport: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.peer_side: TcpBackendSide | None = None
        self.to_backend = None  # the backend transport's write, once connected
        self.conn_id = 0
        self.used: list[str] = []
        self.closed = False
        self.rejected = False
        self.bytes_in = 0
        self.early = bytearray()  # bytes that came before the backend connection was up
        self.early_eof = False
        self.connect_task: asyncio.Task | None = None
        self.connect_started = 0.0
        self.client_eof = False
        self.backend_eof = False
        self.seen_bytes = 0
        self.last_activity = time.monotonic()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        app = self.app
        self.transport = transport
        if not app.admit(self, transport):
            self.rejected = True
            return
        # Reading goes on: a first chunk that comes before the backend connection
        # is kept in ``early`` (and reading paused then), which costs less than
        # pausing every new connection up front.
        self.connect_task = app.loop.create_task(self._connect())

    async def _connect(self) -> None:
        pool = self.app.pool
        for _ in range(len(pool.backends)):
            backend = pool.choose()
            if backend is None:
                break
            self.used.append(backend.name)
            self.connect_started = time.monotonic()  # the sweep cancels a connect that takes too long
            try:
                transport, side = await self.app.loop.create_connection(
                    lambda: TcpBackendSide(self), backend.host, backend.port)
            except (OSError, asyncio.CancelledError) as exc:
                self.connect_started = 0.0
                if self.closed and isinstance(exc, asyncio.CancelledError):
                    return
                if local_shortage(exc):  # out of descriptors here: not the backend's fault
                    if self.elog.warning:
                        self.elog.line("WARNING", f"event=busy conn={self.conn_id} reason={connect_failure(exc)}")
                    if not self.closed:
                        self.transport.write(ERR_BUSY)  # type: ignore[union-attr]
                        self.transport.close()  # type: ignore[union-attr]
                    return
                pool.traffic_error(backend, connect_failure(TimeoutError() if isinstance(exc, asyncio.CancelledError)
                                                            else exc))
                continue
            self.connect_started = 0.0
            if self.closed:
                transport.abort()
                return
            self.backend = backend
            backend.active += 1
            backend.connections += 1
            self.peer_side = side
            self.to_backend = transport.write
            if self.early:
                transport.write(bytes(self.early))
            if self.early_eof:
                transport.write_eof()
            elif len(self.early) > EARLY_LIMIT:
                self.transport.resume_reading()  # type: ignore[union-attr]
            self.early.clear()
            return
        self.app.no_backend_errors += 1
        if not self.closed:
            self.transport.write(ERR_NO_BACKEND)  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        to_backend = self.to_backend
        if to_backend is None:
            # Bytes before the backend connection is up: keep them; stop reading only
            # if they pile up (pausing every new connection costs two epoll calls).
            self.early += data
            if len(self.early) > EARLY_LIMIT:
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        to_backend(data)

    def eof_received(self) -> bool:
        self.client_eof = True
        side = self.peer_side
        if side is None:
            self.early_eof = True
            return True
        if self.backend_eof or side.transport is None or not side.transport.can_write_eof():
            return False
        side.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer_side is not None:
            self.peer_side.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.peer_side is not None:
            self.peer_side.transport.resume_reading()  # type: ignore[union-attr]

    def backend_gone(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rejected:
            return
        self.closed = True
        if self.connect_started and self.connect_task is not None:
            self.connect_task.cancel()
        self.app.connections.discard(self)
        if self.peer_side is not None and self.peer_side.transport is not None:
            self.peer_side.transport.close()
        if self.backend is not None:
            self.backend.active -= 1
        if self.elog.info:
            self.elog.line("INFO", f"event=session conn={self.conn_id} peer={_peer(self.transport)} mode=tcp "
                                   f"backends={','.join(self.used) or '-'} bytes_in={self.bytes_in}")

    # -- the balancer's sweeps ---------------------------------------------------

    def check_response_timeout(self, now: float, timeout: float) -> None:
        # A byte relay does not know where messages end; only the connect has a deadline.
        if self.connect_started and now - self.connect_started > self.app.config.connect_timeout:
            self.connect_started = 0.0
            self.connect_task.cancel()  # type: ignore[union-attr]

    def note_activity(self, now: float) -> float:
        if self.bytes_in != self.seen_bytes:
            self.seen_bytes = self.bytes_in
            self.last_activity = now
        return self.last_activity

    def idle(self) -> bool:
        return True

    def close_idle(self) -> None:
        self.close()  # no ERR line: it would land in the middle of someone's byte stream

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

