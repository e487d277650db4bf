"""Message mode's idle backend connections, kept for the next clients
(``--keepalive N``, as nginx's upstream ``keepalive`` and HAProxy's
``http-reuse``).

Why: message mode knows where each answer ends, so once a client has left
with every message answered, its backend connection is as good as new. The
next client takes it instead of opening one: no ``connect`` and ``close``
here, no ``accept`` and new connection in the server. With one connection per
message that is most of what a message costs: here it took the balancer's
rate from 0.8x HAProxy's ``mode tcp`` (which cannot know where messages end,
so connects anew for every client) to about 1.5x.

The rules:
- A connection goes back only clean: nothing unanswered, no part of an
  answer read, nothing unsent, its backend healthy, the balancer not stopping,
  and fewer than ``limit`` idle ones for that backend (the rest are closed).
- An idle connection stays in the epoll set: a byte or a close from the
  server (its idle timeout, a restart, a kill) drops it at once. It is closed
  after ``IDLE_SECONDS`` unused, and when its backend goes DOWN.
- Newest first (LIFO): under light load the same few stay warm and the others
  age out.
- The race no check can close: a server that closes (or says ``ERR
  idle-timeout``) just as a client is given the connection. The relay treats
  a failure of a reused connection before its first answer as stale, not as
  the backend's: the messages go again on a new connection to the same
  backend, and nothing is marked DOWN (``ClientSide.backend_lost``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import Backend
    from .relay_message import BackendSide

IDLE_SECONDS = 10.0
"""An idle connection unused this long is closed (well inside the servers' own idle timeout)."""


class IdlePool:
    """Idle backend connections by backend, newest last."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.idle: dict[Backend, list[tuple[float, BackendSide]]] = {}

    def put(self, side: BackendSide) -> bool:
        """Keep ``side`` for a later client; False when there is no room (the caller closes it)."""
        conns = self.idle.setdefault(side.backend, [])
        if len(conns) >= self.limit:
            _forget_closed(conns)  # (the purge's, early)
            if len(conns) >= self.limit:
                return False
        conns.append((time.monotonic(), side))
        return True

    def take(self, backend: Backend) -> BackendSide | None:
        """The newest idle connection to ``backend`` still open, or None."""
        conns = self.idle.get(backend)
        while conns:
            side = conns.pop()[1]
            if not side.closed:
                return side
        return None

    def make_room(self, backend: Backend) -> bool:
        """Close the oldest idle connection to ``backend``; whether there was one. A
        server at its own connection limit with our idle ones refuses the health
        check (``ERR busy``): it is full of us, not of clients, and was marked down
        for it, every client then told ERR no-backend (health.check_forever)."""
        conns = self.idle.get(backend)
        _forget_closed(conns or [])
        if not conns:
            return False
        conns.pop(0)[1].drop()
        return True

    def count(self, backend: Backend) -> int:
        return sum(not side.closed for _, side in self.idle.get(backend, ()))

    def purge(self, now: float) -> None:
        """Close what has been idle past ``IDLE_SECONDS``, and forget what was closed."""
        old = now - IDLE_SECONDS
        for conns in self.idle.values():
            for since, side in conns:
                if since < old:
                    side.drop()
            _forget_closed(conns)

    def close(self, backend: Backend | None = None) -> None:
        """Close the idle connections of ``backend`` (one going DOWN), or all (a stop)."""
        for b, conns in self.idle.items():
            if backend is None or b is backend:
                for _, side in conns:
                    side.drop()
                conns.clear()


def _forget_closed(conns: list[tuple[float, BackendSide]]) -> None:
    conns[:] = [(since, side) for since, side in conns if not side.closed]
