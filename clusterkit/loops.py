"""Event-loop choice, in one place (as uvicorn/loops/auto.py does).

``run(coro)`` runs a coroutine on uvloop when it is installed and on the
standard asyncio loop otherwise; ``loop_name()`` says which, for logs and
reports. ``--loop asyncio`` forces the standard loop, to compare the two.
"""

from __future__ import annotations

import asyncio
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
