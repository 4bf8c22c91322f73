"""The pacing of the handlers' daemon loops: what wakes a loop for its next pass, and how long a failed one waits.

The training's loop and the site's loop (`fedtrain.operator.handlers`) are the same shape: a pass,
then a wait until an event asks for the next one or the tick comes. Kept apart from the passes
themselves, which know nothing of when they run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Wakeups:
    """One asyncio event per training: set by Job and resource events, awaited by the training's loop."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}

    def event(self, namespace: str, name: str) -> asyncio.Event:
        """The training's event (created on first use)."""
        return self._events.setdefault((namespace, name), asyncio.Event())

    def wake(self, namespace: str, name: str) -> None:
        """Ask for a pass now."""
        self.event(namespace, name).set()

    def forget(self, namespace: str, name: str) -> None:
        """The training is gone."""
        self._events.pop((namespace, name), None)

    async def wait(self, namespace: str, name: str, timeout: float,
                   until: Callable[[], Awaitable[object]] | None = None) -> None:
        """Until woken, ``until()`` completes (the daemon is stopped) or ``timeout`` seconds passed.

        Clears the event for the next pass.
        """
        event = self.event(namespace, name)
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(event.wait())]
        if until is not None:
            waiters.append(asyncio.ensure_future(until()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        event.clear()


class Backoff:
    """Delays between retries of a pass that failed for a temporary reason: 1, 2, 4... up to a minute."""

    FIRST, LAST = 1.0, 60.0

    def __init__(self) -> None:
        self.failures = 0

    def next(self) -> float:
        """The delay before the next try."""
        self.failures += 1
        return min(self.FIRST * 2 ** (self.failures - 1), self.LAST)

    def reset(self) -> None:
        """A pass went through."""
        self.failures = 0
