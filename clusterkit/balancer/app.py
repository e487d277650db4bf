"""The balancer process: listener, health checks, sweeps, admin endpoint and
graceful stop, around the relay of the chosen mode.

Sweeps: one task checks, every quarter of the response timeout, which client
connections have left a message unanswered too long (message mode), and one
closes clients idle past ``idle_timeout``; no timer per message.

Graceful stop (SIGTERM/SIGINT), in uvicorn's order: close the listener, let
each client connection go on until its messages are answered and it has been
quiet for ``drain_quiet``, at most ``drain_timeout``. Then what is left winds
up (``wind_up``): in message mode the answers still due are relayed, a line
begun gets ``ERR shutting-down``, and the session closes, within
``WIND_UP_SECONDS``; a message still unanswered then (its backend stalled)
gets ``ERR shutting-down`` too (``give_up``), and what is left is cut. A second
signal forces.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from functools import partial

from .. import logs, loops
from ..linger import LINGER_SECONDS
from ..config import ConfigError
from ..sockets import client_room, descriptor_room, host_port, is_listener
from .admin import start_admin
from .config import BalancerConfig
from ..epollset import EpollSet, Listener, resolve
from .health import check_forever
from .pool import DOWN, Backend, Pool
from .relay_message import start_client
from .relay_tcp import start_session
from .reuse import IdlePool


WIND_UP_SECONDS = LINGER_SECONDS
"""After ``--drain-timeout``: how long the connections left may take to hand over
the answers still due (``wind_up``) and end their lingering closes."""
GIVE_UP_SECONDS = 0.5
"""After that: how long the lingering closes of connections told ``ERR shutting-down``
for their messages still unanswered (``give_up``) may take."""


def client_limit(max_connections: int, keepalive: int = 0, backends: int = 1) -> tuple[int, int]:
    """``--max-connections`` and ``--keepalive``, lowered to what the open-files
    limit can hold: each client needs two descriptors (its own and its
    backend's); idle backend connections (reuse.py) get at most a quarter of
    the rest, the lingering closes of clients told ``ERR busy`` an eighth.
    HAProxy derives its maxconn from ``ulimit -n`` the same way. Past it,
    clients get ``ERR busy`` rather than a balancer that cannot open backend
    connections."""
    room = descriptor_room()
    if room is None:
        return max_connections, keepalive
    keepalive = min(keepalive, room // 4 // backends)
    return client_room(max_connections, 2, keepalive * backends), max(0, keepalive)


class Balancer:
    def __init__(self, config: BalancerConfig, elog: logs.EventLog) -> None:
        self.config = config
        self.elog = elog
        self.pool = Pool(config, self._state_changed)
        self.connections: set = set()
        self.conn_ids = itertools.count(1)
        self.total_connections = 0
        self.rejected = 0
        self.failovers = 0
        self.no_backend_errors = 0
        self.stopping = False
        self.all_down = False  # no backend healthy, as of the last sweep (message mode: see ALL_DOWN_STALL)
        self.max_clients, keepalive = client_limit(config.max_connections,
                                                   config.keepalive if config.mode == "message" else 0,
                                                   len(config.backends))
        self.idle = IdlePool(keepalive)
        # Clients told ERR busy at the limit: a line a second at most (the sweep says the rest).
        self.turned_away = elog.tally(lambda n: f"event=busy refused={n} open={len(self.connections)} "
                                                f"max_clients={self.max_clients} reason=max-connections")
        # ERR no-backend answers, to every client (tcp mode: clients turned away): a line a
        # second at most (with no backend up, a client per message wrote a line per connection).
        what = "messages" if config.mode == "message" else "clients"
        self.no_backend_said = elog.tally(lambda n: f"event=no-backend {what}={n}")
        # Connect timeouts still counting toward --fall: a line a second at most per backend,
        # with how many since the last (a link that drops some SYNs and lets others through
        # starts the count again and again: the backend never went DOWN, and each was a line).
        self.timeouts_said = [elog.tally_latest(lambda latest, n: f"event=connect-timeout {latest} "
                                                                  f"down_at={self.pool.fall} timeouts={n}")
                              for _ in self.pool.backends]
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.events: EpollSet = None  # type: ignore[assignment]  # the backend connections' sockets (both modes)
        for b in self.pool.backends:
            b.addresses = resolve(b)
            b.address = b.addresses[0]
        self._server: Listener | None = None
        self._admin: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self.stop_signal = loops.StopSignal(on_force=self._abort_all)
        self.started = time.time()

    def _state_changed(self, backend: Backend, old: str, new: str) -> None:
        if not backend.healthy:
            self.idle.close(backend)
            if self.config.mode == "message" and self.loop is not None:
                self.loop.call_soon(self._move_clients, backend)  # (not inside the failure that marked it)
        if self.elog.warning:
            event = "backend-up" if backend.healthy else "backend-down"
            self.elog.line("WARNING", f"event={event} backend={backend.name} from={old} to={new} "
                                      f"reason={logs.quote(backend.reason)}")

    def connect_timed_out(self, backend: Backend, conn_id: int) -> None:
        """A client's connect to ``backend`` timed out; the client goes on to the next
        backend. The backend is DOWN only at ``fall`` of them in a row (pool.py): one
        lost SYN is sent again after a second, and that is no dead backend. Said while
        it counts, a line a second at most per backend (``timeouts_said``): once DOWN, the
        connects still timing out there are not counted."""
        if self.elog.warning and backend.state != DOWN:
            in_a_row = backend.connect_timeouts + 1
            said = self.timeouts_said[backend.index]
            said.count(latest=f"conn={conn_id} backend={backend.name} in_a_row={in_a_row}")
            if in_a_row >= self.pool.fall:
                said.flush(now=True)  # the one that takes it DOWN, before the down line: no more come
        self.pool.connect_timed_out(backend)

    def _move_clients(self, backend: Backend) -> None:
        """Message mode: the clients of a backend just marked DOWN leave it now, its
        unanswered messages resent elsewhere (a client with none takes a healthy
        backend at its next message). Before, each waited out its own response
        timeout on a stalled backend, even one the health checks had given up on.
        Not when no other backend is healthy (its clients would get ERR no-backend
        from a backend that may well be serving them), nor from a backend that is
        only full (``check busy``: it serves the clients it has)."""
        if backend.healthy or "busy" in backend.reason or not any(b.healthy for b in self.pool.backends):
            return
        for conn in list(self.connections):
            if conn.backend is backend and conn.backend_conn is not None and not conn.closed:
                conn.fail_over("backend-down", blame=False)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events = EpollSet(self.loop)
        cfg = self.config
        on_accept = partial(start_client if cfg.mode == "message" else start_session, self)
        if cfg.admin_port:  # first: once the traffic port answers, all of the balancer does
            self._admin = await start_admin(self, cfg.host, cfg.admin_port)
        self._server = Listener(self.events, on_accept).listen(cfg.host, cfg.port, backlog=4096)
        here = [sock.getsockname() for sock in self._server.sockets]
        for b in self.pool.backends:
            if any(is_listener(here, *address) for address in b.addresses):
                where = host_port(b.host, b.port)
                raise ConfigError(f"backend {b.name}{f' ({where})' if where != b.name else ''} is this balancer's "
                                  f"own address: it would send its clients back to itself")
        for b in self.pool.backends:
            self._tasks.append(self.loop.create_task(
                check_forever(self.pool, b, cfg.check_interval, cfg.check_timeout, cfg.check,
                              cfg.connect_timeout, self.idle.make_room)))
        self._tasks.append(self.loop.create_task(self._sweep()))

    async def _sweep(self) -> None:
        cfg = self.config
        period = min(cfg.response_timeout / 4, 0.25)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            self.idle.purge(now)
            self.turned_away.flush()
            self.no_backend_said.flush()
            for said in self.timeouts_said:
                said.flush()
            slow_lines = cfg.line_timeout if cfg.mode == "message" else 0  # tcp: the backend's own
            self.all_down = not any(b.healthy for b in self.pool.backends)
            for conn in list(self.connections):
                conn.check_response_timeout(now, cfg.response_timeout)
                if cfg.idle_timeout and conn.note_activity(now) < now - cfg.idle_timeout:
                    conn.close_idle()  # quiet both ways: idle, or stuck on a peer that takes nothing
                elif slow_lines and not conn.closed and conn.line_too_slow(now, slow_lines):
                    conn.end_slow_line()

    def _abort_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()

    def admit(self, conn) -> bool:
        """Count a new client connection in; False when it is to be refused with
        ``ERR busy`` (over ``--max-connections``, or stopping)."""
        conn.conn_id = next(self.conn_ids)
        if len(self.connections) >= self.max_clients or self.stopping:
            self.rejected += 1
            if not self.stopping:
                self.turned_away.count()
            return False
        self.connections.add(conn)
        self.total_connections += 1
        return True

    async def serve_until_stopped(self) -> None:
        await self.stop_signal.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        cfg = self.config
        self.stopping = True
        self.turned_away.flush(now=True)
        self.no_backend_said.flush(now=True)
        for said in self.timeouts_said:
            said.flush(now=True)
        self.idle.close()  # (and no connection goes back from now on)
        if self._server is not None:
            self._server.close()
        if self.elog.warning:
            self.elog.line("WARNING", f"event=stopping connections={len(self.connections)}")
        deadline = self.loop.time() + cfg.drain_timeout
        while self.connections and self.loop.time() < deadline and not self.stop_signal.forced:
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.idle() and conn.note_activity(now) < now - cfg.drain_quiet:
                    conn.drained()
            await asyncio.sleep(0.02)
        # The deadline: what is left winds up (the answers due, then the close) for at most
        # WIND_UP_SECONDS more, and so do their lingering closes, lest an exit reset them
        # (not those of quiet connections closed before: nothing of theirs is on its way
        # but, at most, an ERR shutting-down for a line begun, sent a drain-quiet ago).
        self.events.lingering.clear()
        for conn in list(self.connections):
            conn.wind_up()
        await self.stop_signal.settle(lambda: bool(self.connections or self.events.lingering), WIND_UP_SECONDS)
        # Messages still unanswered then get ERR shutting-down (give_up), whose closes
        # linger a moment; what is left after that is cut.
        for conn in list(self.connections):
            conn.give_up()
        await self.stop_signal.settle(lambda: bool(self.connections or self.events.lingering), GIVE_UP_SECONDS)
        for conn in list(self.connections):
            conn.abort()
        for task in self._tasks:
            task.cancel()
        if self._admin is not None:
            self._admin.close()
        await asyncio.sleep(0)
        self.no_backend_said.flush(now=True)  # (what the drain answered since)
        for said in self.timeouts_said:
            said.flush(now=True)
        if self.elog.warning:
            self.elog.line("WARNING", f"event=stopped connections={self.total_connections} "
                                      f"failovers={self.failovers}")

    def stats(self) -> dict:
        return {
            "mode": self.config.mode, "algorithm": self.config.algorithm,
            "uptime_s": round(time.time() - self.started, 3),
            "client_connections": len(self.connections), "max_clients": self.max_clients,
            "total_connections": self.total_connections, "rejected": self.rejected, "failovers": self.failovers,
            "no_backend_errors": self.no_backend_errors,
            "messages": None if self.config.mode == "tcp" else sum(b.messages for b in self.pool.backends),
            "backends": [{**b.snapshot(), "idle_connections": self.idle.count(b), **self.relayed(b)}
                         for b in self.pool.backends],
        }

    def relayed(self, b: Backend) -> dict:
        """--mode tcp: the bytes relayed through the backend, its open connections'
        included, as HAProxy counts them; no messages (a byte relay sees none)."""
        if self.config.mode != "tcp":
            return {}
        live = [s for s in self.connections if s.backend is b]
        return {"messages": None, "bytes_in": b.bytes_in + sum(s.bytes_in for s in live),
                "bytes_out": b.bytes_out + sum(s.bytes_out for s in live)}
