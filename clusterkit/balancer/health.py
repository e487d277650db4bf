"""Active health checks: a real message exchange with each backend, every
``check_interval`` seconds: its connect bounded by ``connect_timeout`` (at most
``check_interval``), the exchange after it by ``check_timeout``, as HAProxy
bounds its checks with ``timeout connect`` and ``timeout check``. (One bound for
both failed every check of a backend half a ``check_timeout`` away, round trip,
while it served its traffic.)

A check opens a connection, sends ``health-check``, and passes when a correct
``REPLY``/``ACK`` pair comes back in time (``--check connect``: when the
connection is accepted, HAProxy's plain ``check``); anything else fails it with a short
reason (``refused``, ``timeout``, ``closed``, ``bad-reply``; an ``ERR`` line's
code, such as ``line-too-long``; ``busy`` from a
server at its connection limit, which a backend that stays full for ``fall``
checks is taken out for, until it has room again; ``shutting-down`` from a
server in its graceful stop; ``connect-timeout`` when the connect took
longer than its own bound). The pool turns
results into state changes (see pool.py). One task per backend; all of them
are cancelled when the balancer stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..protocol import ProtocolError, ResponseParser
from ..sockets import local_shortage, open_socket
from .pool import Backend, Pool

CHECK_MESSAGE = b"health-check"
NO_VERDICT = "local-shortage"
"""A check that could not be made here (out of descriptors or memory): the backend
is not to blame, and the check counts neither way (as the relays' connects)."""


def os_failure(exc: OSError) -> str:
    """A failed check's reason for an OSError: ``refused``, else its strerror in
    words joined by hyphens (``connection-reset-by-peer``); lb.py's checks say the same."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    return (exc.strerror or "error").lower().replace(" ", "-")


async def check_once(backend: Backend, timeout: float, kind: str = "message",
                     connect_timeout: float | None = None) -> str | None:
    """None when the backend answered correctly (with ``kind="connect"``: accepted
    the connection), else the reason it failed (``check_at``).

    A name with several addresses (``localhost``: 127.0.0.1 and ``::1``) is
    checked at its first; refused there (nobody listening), at the others in
    turn, and the first that passes takes the traffic, until the first passes
    again. So a server listening on one of them alone is found, as HAProxy (the
    first address) and nginx (each address a server) would find it: it stayed
    DOWN. The verdict otherwise is the first address's."""
    if not backend.addresses:  # (not resolved at start: a Pool used alone)
        return await check_at(backend.host, backend.port, timeout, kind, connect_timeout)
    first = None
    for address in backend.addresses:
        reason = await check_at(*address[1][:2], timeout, kind, connect_timeout)
        if reason is None:
            backend.address = address
            return None
        if first is None:
            first = reason
            if reason != "refused":
                break
    return first


async def check_at(host: str, port: int, timeout: float, kind: str = "message",
                   connect_timeout: float | None = None) -> str | None:
    """One check at ``host:port``: None when it answered correctly, else why not.
    The connect may take ``connect_timeout`` (``timeout`` when not given), the
    exchange ``timeout`` more."""
    writer = None
    try:
        try:
            async with asyncio.timeout(timeout if connect_timeout is None else connect_timeout):
                reader, writer = await asyncio.open_connection(sock=await open_socket(asyncio.get_running_loop(),
                                                                                       host, port))
        except TimeoutError:
            return "connect-timeout"
        if kind == "connect":
            return None
        async with asyncio.timeout(timeout):
            writer.write(CHECK_MESSAGE + b"\n")
            parser = ResponseParser()
            while True:
                data = await reader.read(4096)
                if not data:
                    return "closed"
                responses = parser.feed(data)
                if responses:
                    first = responses[0]
                    if first.error:  # in its own words (busy, shutting-down; line-too-long from a
                        return first.error  # server whose --max-line is under the check's 12 bytes)
                    return None if first.matches(CHECK_MESSAGE) else "bad-reply"
    except TimeoutError:
        return "timeout"
    except ProtocolError:
        return "bad-reply"
    except OSError as exc:
        if local_shortage(exc):
            return NO_VERDICT
        return os_failure(exc)
    finally:
        if writer is not None:
            writer.transport.abort()


async def check_forever(pool: Pool, backend: Backend, interval: float, timeout: float,
                        kind: str = "message", connect_timeout: float | None = None,
                        make_room: Callable[[Backend], bool] | None = None) -> None:
    """Check ``backend`` every ``interval``. ``make_room``: closes one of the
    balancer's own idle connections to it (reuse.IdlePool), if it holds one: a
    check that finds the server full (``busy``) then counts neither way, as the
    server was full of the balancer's idle connections."""
    # HAProxy's bound of a check's connect: min(timeout connect, inter), so that a long
    # connect timeout does not hold up the checks.
    connect_timeout = min(connect_timeout or timeout, interval)
    while True:
        reason = await check_once(backend, timeout, kind, connect_timeout)
        if reason == "busy" and make_room is not None and make_room(backend):
            reason = NO_VERDICT
        if reason is None:
            pool.check_passed(backend)
        elif reason != NO_VERDICT:
            pool.check_failed(backend, f"check {reason}")
        await asyncio.sleep(interval)
