"""Turn the raw numbers both backends compute (milliseconds, 1-based indexes) into `Decision`s.

Kept in one place so the Redis script's reply and the in-process arithmetic become identical
objects: ``retry_ms == -1`` means "never" and becomes ``math.inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .specs import Decision, LimitSpec, LimitState

NEVER_MS = -1.0


def seconds(ms: float) -> float:
    """Convert a non-negative duration in ms to seconds; -1 (never) becomes infinity."""
    if ms == NEVER_MS:
        return math.inf
    return max(0.0, ms) / 1000.0


def build_decision(
    specs: Sequence[LimitSpec],
    *,
    allowed: bool,
    violated: int,
    retry_ms: float,
    states: Sequence[tuple[int, float]],
) -> Decision:
    """Assemble a `Decision`; ``violated`` is 1-based (0 = none), ``states`` are
    ``(remaining, reset_ms)`` pairs in spec order."""
    return Decision(
        allowed=allowed,
        retry_after=0.0 if allowed else seconds(retry_ms),
        states=tuple(
            LimitState(spec=spec, remaining=int(remaining), reset_seconds=seconds(reset_ms))
            for spec, (remaining, reset_ms) in zip(specs, states, strict=True)
        ),
        violated=None if allowed or violated == 0 else specs[violated - 1],
    )
