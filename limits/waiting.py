"""`acquire_waiting`: queue for capacity instead of being rejected (upstream protection).

Failure policy: errors from the limiter (`LimiterError`, `ValueError`) propagate unchanged.
Cancellation is safe: a cancel while sleeping charges nothing; a cancel while an ``acquire()``
is in flight lets that call finish (shielded) and refunds every spec it charged, so a waiter
that gave up never keeps capacity. The refund runs in a task kept alive by this module even if
the caller is cancelled again; its own failures are logged, not raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from .clock import Clock, monotonic_clock
from .specs import Decision, LimitSpec

logger = logging.getLogger(__name__)

type Sleep = Callable[[float], Awaitable[None]]

MIN_SLEEP = 0.001  # seconds; guards against a busy loop on a zero wait
MSG_BAD_MAX_WAIT = "max_wait must be a non-negative number"


class Acquirer(Protocol):
    """The part of `Limiter` this helper uses (any `Limiter` qualifies)."""

    async def acquire(self, specs: Sequence[LimitSpec], *, group: str) -> Decision: ...

    async def refund(self, spec: LimitSpec, amount: int, *, group: str) -> None: ...


_settling: set[asyncio.Task[None]] = set()  # strong refs: the loop only keeps weak ones


async def acquire_waiting(
    limiter: Acquirer,
    specs: Sequence[LimitSpec],
    *,
    group: str,
    max_wait: float,
    clock: Clock = monotonic_clock,
    sleep: Sleep = asyncio.sleep,
) -> Decision:
    """Acquire, sleeping for each rejection's ``retry_after`` until admitted or out of budget.

    Returns the first allowed decision, or the last rejection once waiting for it would
    overrun ``max_wait``: a rejection whose ``retry_after`` exceeds the budget left is returned
    at once (including ``math.inf``) instead of sleeping for an answer that cannot change.
    ``clock`` and ``sleep`` are injectable for tests.
    """
    if not max_wait >= 0:
        raise ValueError(MSG_BAD_MAX_WAIT)
    deadline = clock() + max_wait
    while True:
        decision = await _acquire_or_refund(limiter, specs, group=group)
        if decision.allowed or decision.retry_after > deadline - clock():
            return decision
        await sleep(max(decision.retry_after, MIN_SLEEP))


async def _acquire_or_refund(
    limiter: Acquirer, specs: Sequence[LimitSpec], *, group: str
) -> Decision:
    call = asyncio.ensure_future(limiter.acquire(specs, group=group))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        settle = asyncio.ensure_future(_refund_if_charged(call, limiter, specs, group=group))
        _settling.add(settle)
        settle.add_done_callback(_settling.discard)
        await asyncio.shield(settle)  # a second cancel leaves it running, owned by _settling
        raise


async def _refund_if_charged(
    call: asyncio.Future[Decision], limiter: Acquirer, specs: Sequence[LimitSpec], *, group: str
) -> None:
    try:
        decision = await call
    except Exception:
        return  # the call failed; whatever it may have charged is unknowable
    if not decision.allowed:
        return
    for spec in specs:
        if spec.cost:
            try:
                await limiter.refund(spec, spec.cost, group=group)
            except Exception:
                logger.warning("could not refund %s after a cancelled acquire", spec.key)
