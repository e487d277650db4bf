"""epollset: the Listener takes every address its host resolves to, and a
SocketTransport closes (at once or lingering) and half-closes (write_eof) as
its owner asks. Real sockets on loopback, one event loop per test."""

from __future__ import annotations

import asyncio
import socket

import pytest

from clusterkit import epollset, loops
from clusterkit.epollset import EpollSet, Listener, SocketTransport

pytestmark = pytest.mark.timeout(60)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Answer(asyncio.Protocol):
    """Answers each read with ``answer`` and then does ``then`` to its transport."""

    def __init__(self, answer: bytes, then: str) -> None:
        self.answer = answer
        self.then = then
        self.lost = asyncio.get_running_loop().create_future()
        self.after: list[bytes] = []
        self.answered = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.answered:
            self.after.append(data)  # read on after the half-close
            return
        self.answered = True
        self.transport.write(self.answer)
        getattr(self.transport, self.then)()

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


BIG = 16 << 20
"""An answer more than the sockets on both sides hold: some of it waits in the transport's buffer."""


async def serve(then: str, lingers: bool, host: str = "127.0.0.1",
                size: int = 100_000) -> tuple[Listener, list[Answer]]:
    """A Listener on a free port whose connections run ``Answer`` (``.events``: its EpollSet)."""
    events = EpollSet(asyncio.get_running_loop())
    made: list[Answer] = []

    def accepted(sock, peer) -> None:
        made.append(Answer(b"x" * size, then))
        SocketTransport(events, sock, peer, made[-1], lingers=lingers).start()
    listener = Listener(events, accepted).listen(host, 0, 16)
    listener.events = events
    return listener, made


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 10)


async def asked_and_answered(listener: Listener) -> asyncio.StreamWriter:
    """A client that sends and reads the whole answer, to the server's FIN."""
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
    writer.write(b"hello")
    assert len(await read_to_eof(reader)) == BIG
    return writer


async def until(done, what: str) -> None:
    for _ in range(500):
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(what)


def test_the_listener_takes_every_address_of_its_host_on_one_port(monkeypatch):
    """A name that resolves to 127.0.0.1 and ::1 (``localhost`` on many machines)
    is listened on at both, on the same port even when the kernel picks it, as
    asyncio's create_server does: the balancer listened on the first alone, and a
    client whose resolver gave it the other address was refused."""
    if not has_ipv6_loopback():
        pytest.skip("no ::1 on this machine")
    real = socket.getaddrinfo

    def both(host, port, *args, **kwargs):
        if host != "dual.test":
            return real(host, port, *args, **kwargs)
        return real("127.0.0.1", port, *args, **kwargs) + real("::1", port, *args, **kwargs)
    monkeypatch.setattr(epollset.socket, "getaddrinfo", both)

    async def main() -> None:
        listener, made = await serve("close", lingers=False, host="dual.test")
        try:
            ports = {s.getsockname()[1] for s in listener.sockets}
            assert len(listener.sockets) == 2 and len(ports) == 1, listener.sockets
            port = ports.pop()
            for host in ("127.0.0.1", "::1"):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"hello")
                assert len(await read_to_eof(reader)) == 100_000, host
                writer.close()
            assert len(made) == 2
        finally:
            listener.close()
    loops.run(main())


@pytest.mark.parametrize("lingers", [False, True])
def test_close_after_an_answer_closes_once_it_is_out_lingering_only_if_asked(lingers):
    """The answer (more than the sockets take at once) is all there, then the EOF.
    Not lingering, the close is at once (the HTTP server's, after a complete answer);
    lingering, the server waits for the client's EOF (the balancer's, after ERR)."""
    async def main() -> None:
        listener, made = await serve("close", lingers=lingers, size=BIG)
        try:
            writer = await asked_and_answered(listener)
            await asyncio.wait_for(made[0].lost, 10)  # (the protocol is let go of either way)
            lingering = listener.events.lingering
            assert len(lingering) == lingers  # lingering: the socket waits for our EOF
            writer.close()
            await until(lambda: not lingering, "still lingering after the client's close")
        finally:
            listener.close()
    loops.run(main())


def test_write_eof_half_closes_once_the_buffer_is_out_and_reads_on():
    """The HTTP server's lingering close after an error answer: the FIN after the
    whole answer, and what the client sends after it still reaches the protocol
    (a write_eof that shut the socket at once cut the answer short)."""
    async def main() -> None:
        listener, made = await serve("write_eof", lingers=False, size=BIG)
        try:
            writer = await asked_and_answered(listener)
            writer.write(b"more")
            await writer.drain()
            await until(lambda: made[0].after, "nothing read after the half-close")
            assert made[0].after == [b"more"]
            writer.close()
            await asyncio.wait_for(made[0].lost, 10)  # our EOF ends it
        finally:
            listener.close()
    loops.run(main())
