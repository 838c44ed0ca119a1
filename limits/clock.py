"""Clocks for the in-process limiter and the helpers: seconds as ``float``, monotonic.

`ManualClock` is the injectable clock tests move instead of sleeping. The Redis backend uses
Redis ``TIME`` unless given one of these (tests only: several hosts' clocks disagree).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

type Clock = Callable[[], float]

MSG_BACKWARDS = "a ManualClock only moves forward"


def monotonic_clock() -> float:
    """Return `time.monotonic()`; the default clock."""
    return time.monotonic()


class ManualClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        # A large start keeps millisecond arithmetic in the same range as a real clock.
        self._now = float(start)

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds``; refuse to go back."""
        if seconds < 0:
            raise ValueError(MSG_BACKWARDS)
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        """Stand-in for `asyncio.sleep` that advances the clock instead of waiting."""
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)  # still a suspension point, so cancellation lands here
