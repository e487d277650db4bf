"""Event-loop choice, in one place (as uvicorn/loops/auto.py does).

``run(coro)`` runs a coroutine on uvloop when it is installed and on the
standard asyncio loop otherwise; ``loop_name()`` says which, for logs and
reports. ``--loop asyncio`` forces the standard loop, to compare the two.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    if choice not in LOOPS:
        raise ValueError(f"unknown loop {choice!r}; use one of {', '.join(LOOPS)}")
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def loop_name(choice: str = "auto") -> str:
    factory = loop_factory(choice)
    return "asyncio" if factory is asyncio.new_event_loop else "uvloop"


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


class StopSignal:
    """How every server here stops, in uvicorn's order: the first SIGINT or SIGTERM
    asks for a graceful stop (``wait()`` returns, the server drains); a second one
    sets ``forced`` and calls ``on_force`` (abort whatever is left)."""

    def __init__(self, on_force: Callable[[], None] | None = None) -> None:
        self._event = asyncio.Event()
        self._on_force = on_force
        self.forced = False

    def request(self) -> None:
        if self._event.is_set():
            self.forced = True
            if self._on_force is not None:
                self._on_force()
        self._event.set()

    async def wait(self) -> None:
        """Install the signal handlers and wait for the first signal."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request)
        await self._event.wait()
