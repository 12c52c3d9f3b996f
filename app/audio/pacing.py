"""Pacing a stream of items (audio frames sent in real time) against an absolute clock.

Item i is due at start + i * period. Sleeping one period per item instead would add every wake-up delay and every
item's processing time to all later items, so a stream would drift further behind real time the longer it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Pacer:
    """Due times for items 0, 1, 2, ... one `period_seconds` apart, counted from the first wait or `start()`."""

    def __init__(
        self,
        period_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if period_seconds <= 0:
            raise ValueError(f"pacing period must be positive, got {period_seconds} s")
        self.period_seconds = period_seconds
        self._clock = clock
        self._sleep = sleep
        self._start: float | None = None

    def start(self) -> None:
        """Makes item 0 due now; does nothing once started, so that due times never move."""
        if self._start is None:
            self._start = self._clock()

    def due(self, index: int) -> float:
        """The clock time at which item `index` is due."""
        if self._start is None:
            raise RuntimeError("the pacer has not started: call start() or wait() first")
        if index < 0:
            raise ValueError(f"item index must be non-negative, got {index}")
        # A product, not a running sum: no rounding error accumulates over a long stream.
        return self._start + index * self.period_seconds

    async def wait(self, index: int) -> None:
        """Sleeps until item `index` is due; returns at once if it is already late."""
        self.start()
        remaining = self.due(index) - self._clock()
        if remaining > 0:
            await self._sleep(remaining)

    def lateness(self, index: int) -> float:
        """Seconds by which item `index` is past its due time (0 if not yet due)."""
        return max(0.0, self._clock() - self.due(index))
