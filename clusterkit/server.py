"""The echo server of the TCP cluster: an asyncio.Protocol driving protocol.py.

What it is for: ``server1.py`` .. ``server3.py`` run ``main()`` with their name
and port. Each message gets ``REPLY <name> <M>`` and ``ACK <name> <len>``
(SPEC.md, line protocol v1), pipelined, in order.

How a connection is handled (all in callbacks, no ``await`` per message):

* ``data_received`` feeds the framer and writes all replies of the chunk in
  one ``write``; a too-long line gets ``ERR line-too-long`` and a close.
* Flow control: when the client does not read and our unsent replies pass
  ``write_high_water``, the transport calls ``pause_writing`` and we stop
  reading from that client until it drains (``resume_writing``). A read is
  answered ``READ_SLICE`` bytes at a time, and what is left of it when the
  writing pauses waits (``held``) for ``resume_writing``: a 256 KiB read of
  empty lines is 7.6 MB of replies, and answered in one go it took a client
  that never reads 3.5-5 MB of memory each. Memory per connection stays
  bounded by the high-water mark, a slice's replies and one read.
* Half-close: ``eof_received`` returns False, so the transport closes itself
  once every reply already written has been sent. Bytes after the last ``\n``
  are no message: they get ``ERR incomplete-line`` (after those replies).
* Idle timeout: one sweep per server (not a timer per message) closes
  connections that sent nothing for ``idle_timeout`` seconds. The same sweep
  gives ``ERR line-timeout`` to a client that began a line and has not ended
  it within ``line_timeout`` (a slowloris trickling bytes is never idle), and
  drops a closing connection whose client has taken nothing for another idle
  period (a client that never reads gets neither its answers nor the close).

Connection states::

    open ──(EOF from client)────────────► closing ──(replies flushed)──► closed
    open ──(line too long / idle)───────► closing
    open ──(SIGTERM: draining, quiet)───► closing
    open ──(drain timeout)──────────────► closing (lingering)
    open ──(2nd signal, or stuck after)─► aborted ─────────────────────► closed

Graceful stop in uvicorn's order: close the listener, let each connection go
on until it has been quiet for ``drain_quiet`` with its replies sent, wait at
most ``drain_timeout``; then a client still sending is wound up (``wind_up``:
its replies go out, a line begun gets ``ERR shutting-down``, a lingering
close), within ``LINGER_SECONDS``, and what is left then is cut. A second
signal forces.

What it is not: the accept loop itself. asyncio and uvloop keep accepting
after EMFILE/ENFILE (asyncio pauses the listener for a second; libuv sheds the
connection), so an overloaded server slows down instead of dying.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import socket
import sys
import time

from . import cli, logs, loops
from .config import ConfigError, ServerConfig
from .linger import LINGER_SECONDS
from .protocol import LineFramer, SlowLineWatch, build_error, build_replies, check_server_name
from .sockets import client_room, host_port, linger_room, peer_name

log = logging.getLogger("clusterkit.server")

_BUSY = build_error("busy")
_SHUTTING_DOWN = build_error("shutting-down")
_LINE_TOO_LONG = build_error("line-too-long")
_INCOMPLETE_LINE = build_error("incomplete-line")
_IDLE = build_error("idle-timeout")
_LINE_TIMEOUT = build_error("line-timeout")


READ_SLICE = 16 * 1024
"""Bytes of a read framed and answered at a time, when a read is larger (see above):
their replies are 30 times as many bytes at most (empty lines)."""


class EchoProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = ("server", "transport", "framer", "conn_id", "peer", "last_activity", "seen_bytes",
                 "messages", "bytes_in", "bytes_out", "paused", "closing", "rejected", "lingering", "elog",
                 "line_watch", "held")

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.elog = server.elog
        self.transport: asyncio.Transport | None = None
        self.framer = LineFramer(server.config.max_line)
        self.conn_id = 0
        self.peer = "-"
        self.last_activity = 0.0
        self.seen_bytes = 0
        self.messages = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.paused = False
        self.closing = False
        self.rejected = False
        self.lingering = False  # its last line (an ERR, or a refusal) is written: what the client sends is dropped
        self.line_watch = SlowLineWatch()
        self.held = b""  # read, not yet answered: the writing paused (see READ_SLICE)

    # -- asyncio.Protocol callbacks ---------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        server = self.server
        self.transport = transport
        self.conn_id = next(server.conn_ids)
        peer = transport.get_extra_info("peername")
        self.peer = peer_name(peer)
        self.last_activity = time.monotonic()
        if len(server.connections) >= server.max_clients or server.stopping:
            self.rejected = True
            transport.write(_SHUTTING_DOWN if server.stopping else _BUSY)
            if server.refusing < server.max_refusing:
                server.refusing += 1
                self._linger()
            else:  # a flood: no descriptor to spare for a lingering close (what it sent may reset it)
                transport.close()
            if server.stopping:  # (few: the listener closes as the stop begins)
                if self.elog.warning:
                    self.elog.line("WARNING", f"event=reject conn={self.conn_id} peer={self.peer} "
                                              f"reason=shutting-down")
            else:  # a flood of these is a line a second, not a line each
                server.turned_away.count()
            return
        server.connections.add(self)
        high = server.config.write_high_water
        transport.set_write_buffer_limits(high=high, low=high // 4)
        if self.elog.info:
            self.elog.line("INFO", f"event=open conn={self.conn_id} peer={self.peer}")

    def data_received(self, data: bytes) -> None:
        # No clock read here: the idle sweep and the drain notice activity by
        # bytes_in changing between two of their rounds.
        if self.lingering:
            return
        if len(data) > READ_SLICE or self.held:
            self._answer_slices(self.held + data if self.held else data)
            return
        self.bytes_in += len(data)
        messages = self.framer.feed(data)
        if messages:
            out = build_replies(self.server.name_bytes, messages)
            self.transport.write(out)  # type: ignore[union-attr]
            self.messages += len(messages)
            self.bytes_out += len(out)
            if self.elog.info:
                line = self.elog.line
                prefix = f"event=message conn={self.conn_id} len="
                for m in messages:
                    line("INFO", f"{prefix}{len(m)} sent=reply,ack")
        if self.framer.error is not None:
            self._fail(_LINE_TOO_LONG, "line-too-long")

    def _answer_slices(self, data: bytes) -> None:
        """``data`` answered a slice at a time (each as a read of its own), until the
        writing pauses: the rest is held for ``resume_writing``."""
        self.held = b""
        pos, end = 0, len(data)
        while pos < end and not self.paused and not self.closing:
            self.data_received(data[pos:pos + READ_SLICE])
            pos += READ_SLICE
        if pos < end and not self.closing:
            self.held = data[pos:]

    def eof_received(self) -> bool:
        if self.lingering:
            return False
        if self.elog.info:
            self.elog.line("INFO", f"event=half-close conn={self.conn_id}")
        if self.framer.buffered and self.framer.error is None:
            # Bytes after the last '\n' are no message (SPEC.md): an error line says
            # so, after the replies already written, instead of a silent drop.
            self._fail(_INCOMPLETE_LINE, "incomplete-line", linger=False)
            return True  # _fail closed the transport
        self.closing = True
        return False  # the transport closes once the replies are sent

    def pause_writing(self) -> None:
        self.paused = True
        self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.paused = False
        if self.held:
            self._answer_slices(self.held)
        if not self.paused and not self.closing:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rejected:
            if self.lingering:
                self.server.refusing -= 1
            return
        self.server.connections.discard(self)
        self.server.total_messages += self.messages
        if self.elog.info:
            reason = f" error={logs.quote(exc)}" if exc else ""
            self.elog.line("INFO", f"event=close conn={self.conn_id} peer={self.peer} messages={self.messages}"
                                   f" bytes_in={self.bytes_in} bytes_out={self.bytes_out}{reason}")

    # -- closing ----------------------------------------------------------

    def _fail(self, line: bytes, code: str, linger: bool = True) -> None:
        """Send an error line (after the replies already written) and close: before
        the client's EOF (``linger``), a lingering close."""
        if self.closing:
            return
        self.closing = True
        transport = self.transport
        assert transport is not None
        transport.write(line)
        if linger:
            self._linger()
        else:
            transport.pause_reading()
            transport.close()
        # An info line, as an HTTP server's 400 or 408: the client's error, answered with an
        # ERR line (at warning, a client repeating it wrote a line a connection, 35 MB a minute).
        if self.elog.info:
            self.elog.line("INFO", f"event=error conn={self.conn_id} peer={self.peer} code={code}")

    def _linger(self) -> None:
        """The close after an error line, as nginx's ``lingering_close`` (``linger.py``):
        the FIN once what is written is out, then what the client still sends is
        dropped (``data_received``) until its EOF or LINGER_SECONDS. Closed on unread
        bytes (a refused client's message, the rest of a too-long line), the
        connection was reset, and a client still sending (then ``shutdown``) got
        an error instead of the ERR line."""
        self.lingering = True
        try:
            self.transport.write_eof()  # type: ignore[union-attr]
        except OSError:  # gone already (the standard loop says so; uvloop does not)
            self.transport.abort()  # type: ignore[union-attr]
            return
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self._end_linger)

    def _end_linger(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():  # the client still takes its answers: no cut
            asyncio.get_running_loop().call_later(LINGER_SECONDS, self._end_linger)
            return
        transport.abort()

    def note_activity(self, now: float) -> float:
        """Update and return the time of the last data seen (sampled by the server's rounds)."""
        if self.bytes_in != self.seen_bytes:
            self.seen_bytes = self.bytes_in
            self.last_activity = now
        return self.last_activity

    def close_idle(self) -> None:
        if self.paused:
            # Its replies back up (the client takes none), so reading stopped: no ERR line
            # or close could reach it behind them. Dropped, with a warning, as the balancer's
            # send-timeout (nginx's send_timeout); an idle client's is the client's doing.
            if self.elog.warning:
                self.elog.line("WARNING", f"event=error conn={self.conn_id} peer={self.peer} code=send-timeout")
            self.abort()
            return
        self._fail(_IDLE, "idle-timeout")

    def line_too_slow(self, now: float, timeout: float) -> bool:
        # Paused: we stopped reading, not the client.
        return self.line_watch.too_slow(self.framer.buffered > 0 and not self.paused, self.messages, now, timeout)

    def end_slow_line(self) -> None:
        self._fail(_LINE_TIMEOUT, "line-timeout")

    def close_quietly(self) -> None:
        """A graceful stop's close of a quiet connection; a line begun and not ended
        gets ``ERR shutting-down`` (it would not be answered: no silent drop)."""
        if not self.closing:
            self.closing = True
            if self.framer.buffered and self.framer.error is None:
                self.transport.write(_SHUTTING_DOWN)  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]

    def wind_up(self) -> None:
        """A graceful stop's deadline (``--drain-timeout``) for a client still
        sending: a line begun gets ``ERR shutting-down``, the replies written go
        out, then a lingering close; what the client sends from now on is not
        answered. Aborted, a client never quiet got a bare close, and the replies
        it had not yet taken were thrown away."""
        if self.closing:
            return
        self.closing = True
        transport = self.transport
        if self.framer.buffered and self.framer.error is None:
            transport.write(_SHUTTING_DOWN)  # type: ignore[union-attr]
        elif not transport.get_write_buffer_size():  # type: ignore[union-attr]
            transport.close()  # type: ignore[union-attr]  # idle between messages: closed as nginx closes idle ones
            return
        if transport.is_closing():  # type: ignore[union-attr]  # (a write that failed at once)
            return
        self._linger()

    def abort(self) -> None:
        self.closing = True
        self.transport.abort()  # type: ignore[union-attr]

    def write_backlog(self) -> int:
        return self.transport.get_write_buffer_size()  # type: ignore[union-attr]


class EchoServer:
    """Listens, tracks connections, sweeps idle ones, stops gracefully."""

    def __init__(self, config: ServerConfig, elog: logs.EventLog | None = None) -> None:
        self.config = config
        self.elog = elog or logs.EventLog(config.name, None, logging.CRITICAL)
        self.name_bytes = check_server_name(config.name)
        self.connections: set[EchoProtocol] = set()
        self.max_clients = client_room(config.max_connections)  # (what the open-files limit holds)
        self._limit = "max-connections" if self.max_clients == config.max_connections else "open-files-limit"
        self.max_refusing = linger_room()
        """Clients told ``ERR busy`` whose close lingers at once; more are closed at once."""
        self.refusing = 0
        self.turned_away = self.elog.tally(
            lambda n: f"event=busy refused={n} open={len(self.connections)} max_clients={self.max_clients} "
                      f"reason={self._limit}",
            later=lambda delay, say: asyncio.get_running_loop().call_later(delay, say))
        """Clients told ``ERR busy``: a line a second at most, with the count (``logs.Tally``)."""
        self.conn_ids = itertools.count(1)
        self.total_messages = 0
        self.stopping = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self.stop_signal = loops.StopSignal(on_force=self._abort_all)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self._server = await loops.create_server(
            loop, lambda: EchoProtocol(self), cfg.host, cfg.port,
            backlog=cfg.backlog, reuse_address=True, family=_family(cfg.host))
        if cfg.idle_timeout > 0 or cfg.line_timeout > 0:
            self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        idle, line = self.config.idle_timeout, self.config.line_timeout
        period = min(max(min(t for t in (idle, line) if t > 0) / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.closing:
                    # Closed, with answers the client has not taken: one idle period
                    # more, then it is dropped rather than held open for ever.
                    if idle and conn.note_activity(now) < now - 2 * idle:
                        conn.abort()
                    continue
                if idle and conn.note_activity(now) < now - idle:
                    conn.close_idle()
                elif line and conn.line_too_slow(now, line):
                    conn.end_slow_line()

    def _abort_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()

    async def serve_until_stopped(self) -> None:
        await self.stop_signal.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        cfg = self.config
        self.stopping = True
        self.turned_away.flush(now=True)
        if self._server is not None:
            self._server.close()
        if self.elog.warning:
            self.elog.line("WARNING", f"event=stopping connections={len(self.connections)}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.drain_timeout
        while self.connections and loop.time() < deadline and not self.stop_signal.forced:
            now = time.monotonic()
            for conn in list(self.connections):
                if (conn.note_activity(now) < now - cfg.drain_quiet and not conn.paused
                        and conn.write_backlog() == 0):
                    conn.close_quietly()
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.wind_up()
        # (for the replies still to go out, and the lingering closes)
        await self.stop_signal.settle(lambda: bool(self.connections), LINGER_SECONDS)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)
        if self.elog.warning:
            self.elog.line("WARNING", f"event=stopped messages={self.total_messages}")


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_UNSPEC


# --------------------------------------------------------------------------
# Command line


def build_parser(name: str, port: int) -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        description=f"{name}: a TCP echo server of the cluster. Each message line gets "
                    f"'REPLY <name> <message>' and 'ACK <name> <length>' (line protocol v1).")
    p.add_argument("--host", default=d.host, type=cli.host_name, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=cli.port_number, default=port,
                   help="port to listen on, 0 for any free port (default: %(default)s)")
    p.add_argument("--name", default=name, help="server name put in every reply (default: %(default)s)")
    p.add_argument("--max-line", type=cli.positive_int, default=d.max_line,
                   help="longest message in bytes; a longer line gets 'ERR line-too-long' "
                        "and a close (default: %(default)s)")
    p.add_argument("--idle-timeout", type=cli.non_negative_float, default=d.idle_timeout,
                   help="seconds a client may stay silent before it is disconnected, 0 for never "
                        "(default: %(default)s)")
    p.add_argument("--line-timeout", type=cli.non_negative_float, default=d.line_timeout,
                   help="seconds a client may take to finish a line it began; slower gets "
                        "'ERR line-timeout' and a close (a slowloris), 0 for never (default: %(default)s)")
    p.add_argument("--max-connections", type=cli.positive_int, default=d.max_connections,
                   help="clients served at once, lowered to what the open-files limit holds; more get "
                        "'ERR busy' and a close (default: %(default)s)")
    p.add_argument("--drain-timeout", type=cli.non_negative_float, default=d.drain_timeout,
                   help="on SIGTERM/SIGINT/SIGHUP: seconds a connection may go on (it is served until "
                        "quiet) before it is closed (default: %(default)s)")
    p.add_argument("--loop", choices=loops.LOOPS, default="auto",
                   help="event loop: uvloop when installed (auto), or force one (default: %(default)s)")
    cli.add_logging_args(p)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(name=args.name, host=args.host, port=args.port, max_line=args.max_line,
                        idle_timeout=args.idle_timeout, line_timeout=args.line_timeout,
                        max_connections=args.max_connections,
                        drain_timeout=args.drain_timeout, log_level=args.log_level,
                        log_dir=args.log_dir, loop=args.loop)


async def _serve(config: ServerConfig, elog: logs.EventLog) -> None:
    server = EchoServer(config, elog)
    try:
        await server.start()
    except OSError as exc:
        raise cli.listen_error(config.name, config.host, config.port, exc) from None
    print(f"{config.name} listening on {host_port(config.host, server.port)} "
          f"({loops.loop_name(config.loop)}, pid {os.getpid()}); Ctrl-C to stop", file=sys.stderr, flush=True)
    if server.max_clients < config.max_connections:
        print(f"{config.name}: at most {server.max_clients} clients at once (the open-files limit allows no more; "
              f"--max-connections is {config.max_connections}): more get 'ERR busy'", file=sys.stderr, flush=True)
    if elog.warning:
        elog.line("WARNING", f"event=listen host={config.host} port={server.port} loop={loops.loop_name(config.loop)} "
                             f"max_clients={server.max_clients}")
    await server.serve_until_stopped()


def main(argv: list[str] | None = None, *, name: str = "server1", port: int = 7001) -> int:
    @cli.main_wrapper
    def run(args_list: list[str] | None) -> int:
        args = build_parser(name, port).parse_args(args_list)
        try:
            config = config_from_args(args)
        except ConfigError as exc:
            raise cli.Fatal(str(exc), cli.EXIT_USAGE) from None
        cli.raise_fd_limit()
        elog = logs.configure(config.name, level=config.log_level, log_dir=config.log_dir,
                              file_name=logs.SERVER_LOG)
        loops.run(_serve(config, elog), config.loop)
        return cli.EXIT_OK

    return run(argv)
