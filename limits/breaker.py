"""A small circuit breaker for the limiter's primary backend.

    closed --(failure_threshold consecutive failures)--> open
    open --(reset_timeout elapsed)--> half_open: exactly one trial call is let through
    half_open --trial succeeds--> closed;  --trial fails--> open (the timeout starts again)

`allow()` hands out a `Permit` (or ``None``: do not call the primary). Every permit must end in
exactly one of `record_success`, `record_failure` or `release` (a call that produced no verdict:
cancelled, or a caller bug raising `ValueError`); otherwise a trial would never end. Verdicts of
calls that began before the breaker opened do not close it again: only the trial does.
Single event loop, no locking: every method is synchronous and short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._validate import check_seconds
from .clock import Clock, monotonic_clock

type BreakerState = Literal["closed", "open", "half_open"]

MSG_BAD_THRESHOLD = "failure_threshold must be a positive integer"


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to call the primary once; ``trial`` marks the half-open probe."""

    trial: bool


class CircuitBreaker:
    """Count consecutive failures; stop calling the primary while open."""

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 5.0,
        *,
        clock: Clock = monotonic_clock,
    ) -> None:
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int):
            raise ValueError(MSG_BAD_THRESHOLD)
        if failure_threshold < 1:
            raise ValueError(MSG_BAD_THRESHOLD)
        check_seconds(reset_timeout)
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker past its timeout reads as half_open)."""
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.reset_timeout:
            return "half_open"
        return "open"

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far."""
        return self._failures

    def allow(self) -> Permit | None:
        """Return a permit to call the primary, or None while open (or a trial is running)."""
        state = self.state
        if state == "closed":
            return Permit(trial=False)
        if state == "half_open" and not self._trial_in_flight:
            self._trial_in_flight = True
            return Permit(trial=True)
        return None

    def record_success(self, permit: Permit) -> None:
        if permit.trial:
            self._trial_in_flight = False
        elif self._opened_at is not None:
            return  # a call from before the breaker opened proves nothing now
        self._failures = 0
        self._opened_at = None

    def record_failure(self, permit: Permit) -> None:
        self._failures += 1
        if permit.trial:
            self._trial_in_flight = False
            self._opened_at = self._clock()
        elif self._opened_at is None and self._failures >= self.failure_threshold:
            self._opened_at = self._clock()

    def release(self, permit: Permit) -> None:
        """End a permit that produced no verdict."""
        if permit.trial:
            self._trial_in_flight = False
