"""acquire_waiting: smoothing bursts within a budget, and cancellation safety."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest

from limits import Decision, Limiter, LimitKind, LimitSpec, acquire_waiting

from .conftest import Backend


async def test_waits_for_each_token_and_is_admitted(backend: Backend) -> None:
    spec = backend.spec("upstream", limit=2, period=10.0)  # 1 token / 5 s
    started = backend.clock()

    decisions = [
        await acquire_waiting(
            backend.limiter,
            [spec],
            group=backend.group,
            max_wait=60.0,
            clock=backend.clock,
            sleep=backend.clock.sleep,
        )
        for _ in range(5)
    ]

    assert all(d.allowed for d in decisions)
    assert backend.clock() - started == pytest.approx(15.0)  # 3 tokens beyond the burst


async def test_returns_the_rejection_at_once_when_the_wait_exceeds_the_budget(
    backend: Backend,
) -> None:
    spec = backend.spec("upstream", limit=1, period=10.0)
    await backend.acquire(spec)
    started = backend.clock()

    decision = await acquire_waiting(
        backend.limiter,
        [spec],
        group=backend.group,
        max_wait=9.0,
        clock=backend.clock,
        sleep=backend.clock.sleep,
    )

    assert not decision.allowed
    assert decision.retry_after == pytest.approx(10.0)
    assert backend.clock() == started  # no pointless sleep


async def test_never_admissible_returns_at_once(backend: Backend) -> None:
    spec = backend.spec("tpm", limit=10, period=10.0, cost=11)

    decision = await acquire_waiting(
        backend.limiter,
        [spec],
        group=backend.group,
        max_wait=1e6,
        clock=backend.clock,
        sleep=backend.clock.sleep,
    )

    assert decision.retry_after == math.inf


async def test_cancel_while_sleeping_charges_nothing(backend: Backend) -> None:
    spec = backend.spec("upstream", limit=1, period=10.0)
    await backend.acquire(spec)
    sleeping = asyncio.Event()

    async def sleep_forever(seconds: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()

    waiter = asyncio.create_task(
        acquire_waiting(
            backend.limiter, [spec], group=backend.group, max_wait=60.0, sleep=sleep_forever
        )
    )
    await sleeping.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    backend.clock.advance(10.0)

    assert await backend.remaining(spec) == 1


class GatedLimiter:
    """Charges through the real limiter, then holds the reply until the gate opens: the window
    in which a cancelled caller would otherwise keep capacity it never used."""

    def __init__(self, inner: Limiter) -> None:
        self.inner = inner
        self.charged = asyncio.Event()
        self.gate = asyncio.Event()

    async def acquire(self, specs: Sequence[LimitSpec], *, group: str) -> Decision:
        decision = await self.inner.acquire(specs, group=group)
        self.charged.set()
        await self.gate.wait()
        return decision

    async def refund(self, spec: LimitSpec, amount: int, *, group: str) -> None:
        await self.inner.refund(spec, amount, group=group)


@pytest.mark.parametrize("kind", ["token_bucket", "sliding_window"])
async def test_cancel_during_an_acquire_in_flight_refunds_what_it_charged(
    backend: Backend, kind: LimitKind
) -> None:
    rpm = backend.spec("rpm", kind=kind, limit=10, period=60.0)
    tpm = backend.spec("tpm", kind=kind, limit=1000, period=60.0, cost=300)
    gated = GatedLimiter(backend.limiter)

    waiter = asyncio.create_task(
        acquire_waiting(
            gated,
            [rpm, tpm],
            group=backend.group,
            max_wait=60.0,
        )
    )
    await gated.charged.wait()
    charged = (await backend.remaining(rpm), await backend.remaining(tpm))
    waiter.cancel()
    await asyncio.sleep(0)
    gated.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    assert charged == (9, 700)
    assert (await backend.remaining(rpm), await backend.remaining(tpm)) == (10, 1000)


async def test_negative_budget_is_refused(backend: Backend) -> None:
    with pytest.raises(ValueError, match="max_wait"):
        await acquire_waiting(
            backend.limiter, [backend.spec("k")], group=backend.group, max_wait=-1.0
        )
