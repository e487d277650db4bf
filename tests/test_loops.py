"""loops.create_server: connections waiting in the kernel's queue are taken in one go
on uvloop too, not one per turn of the loop (libuv 1.45 and later)."""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest

from clusterkit import loops

pytestmark = pytest.mark.timeout(60)

WAITING = 200


class Counted(asyncio.Protocol):
    made: list[asyncio.Transport]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.made.append(transport)
        transport.write(b"hi\n")


async def _taken_after_a_few_turns(factory) -> tuple[int, list[socket.socket], asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    server = await factory(loop)
    port = server.sockets[0].getsockname()[1]
    # The loop does not run while these connect: all of them wait in the kernel's queue.
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(WAITING)]
    for _ in range(8):
        await asyncio.sleep(0)
    return len(Counted.made), clients, server


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_a_burst_of_waiting_connections_is_taken_within_a_few_turns(loop_name):
    Counted.made = []

    async def main():
        made, clients, server = await _taken_after_a_few_turns(
            lambda loop: loops.create_server(loop, Counted, "127.0.0.1", 0, backlog=1024))
        for c in clients:  # every one of them is served: its greeting arrives
            assert c.recv(3) == b"hi\n"
            c.close()
        server.close()
        return made

    assert loops.run(main(), loop_name) == WAITING


def test_uvloop_alone_takes_one_per_turn():
    """The behaviour the batch is for; if a uvloop release changes it, this says so."""
    Counted.made = []

    async def main():
        made, clients, server = await _taken_after_a_few_turns(
            lambda loop: loop.create_server(Counted, "127.0.0.1", 0, backlog=1024))
        for c in clients:
            c.close()
        server.close()
        return made

    assert loops.run(main(), "uvloop") < WAITING // 4


def test_a_closed_server_takes_nothing_more_and_leaves_descriptors_alone():
    Counted.made = []

    async def main():
        loop = asyncio.get_running_loop()
        server = await loops.create_server(loop, Counted, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        first = socket.create_connection(("127.0.0.1", port), timeout=10)
        while not Counted.made:
            await asyncio.sleep(0.01)
        assert first.recv(3) == b"hi\n"
        server.close()
        await server.wait_closed()
        # The listener's descriptor number is free now; a new socket may get it, and
        # nothing of the closed server may touch it (close it, accept on it).
        other = socket.create_server(("127.0.0.1", 0))
        gc.collect()
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10)
        late = socket.create_connection(other.getsockname(), timeout=10)
        conn, _ = other.accept()  # still open and still listening
        for s in (first, late, conn, other):
            s.close()
        return len(Counted.made)

    assert loops.run(main(), "uvloop") == 1
