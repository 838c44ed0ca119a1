"""ResilientLimiter's policy, with a scripted primary (the real-Redis version of these
behaviours is in test_failure_policy.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from limits import (
    CircuitBreaker,
    Decision,
    InProcessLimiter,
    LimiterBackendError,
    LimiterCommandError,
    LimiterUnavailable,
    LimitSpec,
    ManualClock,
    ResilientLimiter,
)
from limits.exceptions import MSG_UNAVAILABLE

SPEC = LimitSpec("rpm", "token_bucket", limit=3, period_seconds=30.0)


class ScriptedPrimary(InProcessLimiter):
    """An in-process limiter that fails on demand and counts its calls."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock=clock)
        self.down = False
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.at_gate = asyncio.Event()

    async def acquire(self, specs: Sequence[LimitSpec], *, group: str, lease_id: str | None = None) -> Decision:
        self.calls += 1
        if self.gate is not None:
            self.at_gate.set()
            await self.gate.wait()
        if self.down:
            raise LimiterBackendError("boom")
        return await super().acquire(specs, group=group, lease_id=lease_id)

    async def block(self, key: str, seconds: float, *, group: str) -> None:
        if self.down:
            raise LimiterBackendError("boom")
        await super().block(key, seconds, group=group)

    async def health(self) -> dict[str, Any]:
        return {"backend": "scripted", "state": "down" if self.down else "ok"}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def primary(clock: ManualClock) -> ScriptedPrimary:
    return ScriptedPrimary(clock)


@pytest.fixture
def events() -> list[tuple[str, str]]:
    return []


def _limiter(
    primary: ScriptedPrimary,
    clock: ManualClock,
    events: list[tuple[str, str]],
    *,
    fail_open: bool = True,
) -> ResilientLimiter:
    return ResilientLimiter(
        primary,
        InProcessLimiter(clock=clock),
        fail_open=fail_open,
        breaker=CircuitBreaker(failure_threshold=2, reset_timeout=5.0, clock=clock),
        on_fallback=lambda operation, reason: events.append((operation, reason)),
        log_interval=10.0,
        clock=clock,
    )


async def test_healthy_primary_decides_and_fallback_is_untouched(
    primary: ScriptedPrimary, clock: ManualClock, events: list[tuple[str, str]]
) -> None:
    limiter = _limiter(primary, clock, events)
    decisions = [await limiter.acquire([SPEC], group="g") for _ in range(4)]

    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert primary.calls == 4
    assert events == []
    assert (await limiter.health())["state"] == "ok"


async def test_fail_open_uses_the_fallback_and_stops_calling_an_open_primary(
    primary: ScriptedPrimary, clock: ManualClock, events: list[tuple[str, str]]
) -> None:
    limiter = _limiter(primary, clock, events)
    primary.down = True

    decisions = [await limiter.acquire([SPEC], group="g") for _ in range(4)]

    assert [d.allowed for d in decisions] == [True, True, True, False]  # the fallback's limit
    assert primary.calls == 2  # the breaker opened after 2 failures
    assert events == [("acquire", "error")] * 2 + [("acquire", "breaker_open")] * 2
    health = await limiter.health()
    assert health["state"] == "degraded"
    assert health["breaker"] == "open"


async def test_fail_closed_raises_limiter_unavailable(
    primary: ScriptedPrimary, clock: ManualClock, events: list[tuple[str, str]]
) -> None:
    limiter = _limiter(primary, clock, events, fail_open=False)
    primary.down = True

    for _ in range(3):
        with pytest.raises(LimiterUnavailable, match=MSG_UNAVAILABLE):
            await limiter.acquire([SPEC], group="g")

    assert primary.calls == 2
    assert (await limiter.health())["state"] == "degraded"


async def test_after_the_reset_timeout_one_trial_returns_to_the_primary(
    primary: ScriptedPrimary, clock: ManualClock, events: list[tuple[str, str]]
) -> None:
    limiter = _limiter(primary, clock, events)
    primary.down = True
    for _ in range(3):
        await limiter.acquire([SPEC], group="g")
    primary.down = False
    clock.advance(5.0)

    decision = await limiter.acquire([SPEC], group="g")

    assert decision.allowed
    assert primary.calls == 3
    assert limiter.breaker.state == "closed"
    assert (await limiter.health())["state"] == "ok"


async def test_while_the_trial_is_in_flight_others_use_the_fallback(
    primary: ScriptedPrimary, clock: ManualClock, events: list[tuple[str, str]]
) -> None:
    limiter = _limiter(primary, clock, events)
    primary.down = True
    for _ in range(2):
        await limiter.acquire([SPEC], group="g")
    primary.down = False
    clock.advance(5.0)
    primary.gate = asyncio.Event()

    async with asyncio.TaskGroup() as tasks:
        trial = tasks.create_task(limiter.acquire([SPEC], group="g"))
        await primary.at_gate.wait()
        fallback_calls_before = len(events)
        for _ in range(2):
            await limiter.acquire([SPEC], group="g")
        primary.gate.set()

    assert trial.result().allowed
    assert len(events) == fallback_calls_before + 2
    assert primary.calls == 3
    assert events[-2:] == [("acquire", "breaker_open")] * 2


async def test_a_cancelled_trial_hands_the_trial_back(
    primary: ScriptedPrimary, clock: ManualClock, events: list[tuple[str, str]]
) -> None:
    limiter = _limiter(primary, clock, events)
    primary.down = True
    for _ in range(2):
        await limiter.acquire([SPEC], group="g")
    primary.down = False
    clock.advance(5.0)
    primary.gate = asyncio.Event()

    trial = asyncio.create_task(limiter.acquire([SPEC], group="g"))
    await primary.at_gate.wait()
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    primary.gate = None

    await limiter.acquire([SPEC], group="g")

    assert primary.calls == 4  # the next call got to run the trial
    assert limiter.breaker.state == "closed"


async def test_invalid_arguments_pass_through_and_do_not_count(
    primary: ScriptedPrimary, clock: ManualClock, events: list[tuple[str, str]]
) -> None:
    limiter = _limiter(primary, clock, events)
    for _ in range(5):
        with pytest.raises(ValueError):
            await limiter.acquire([SPEC, SPEC], group="g")

    assert limiter.breaker.failures == 0
    assert events == []


async def test_warnings_are_rate_limited_and_count_what_they_skipped(
    primary: ScriptedPrimary,
    clock: ManualClock,
    events: list[tuple[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = _limiter(primary, clock, events)
    primary.down = True
    caplog.set_level(logging.WARNING, logger="limits.resilient")

    for _ in range(50):
        await limiter.acquire([SPEC], group="g")
    clock.advance(10.0)
    await limiter.acquire([SPEC], group="g")

    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "1 such calls" in warnings[0]
    assert "50 such calls" in warnings[1]
    assert len(events) == 51


async def test_a_failing_hook_never_breaks_a_decision(
    primary: ScriptedPrimary, clock: ManualClock
) -> None:
    def hook(operation: str, reason: str) -> None:
        raise RuntimeError("metrics are down too")

    limiter = ResilientLimiter(
        primary, InProcessLimiter(clock=clock), on_fallback=hook, clock=clock
    )
    primary.down = True

    assert (await limiter.acquire([SPEC], group="g")).allowed


async def test_blocks_reach_the_fallback_even_when_the_primary_takes_them(
    primary: ScriptedPrimary, clock: ManualClock, events: list[tuple[str, str]]
) -> None:
    limiter = _limiter(primary, clock, events)
    await limiter.block("rpm", 30.0, group="g")  # primary is up
    primary.down = True

    decision = await limiter.acquire([SPEC], group="g")  # decided by the fallback

    assert not decision.allowed
    assert decision.retry_after == pytest.approx(30.0)


def test_fail_open_needs_a_fallback(primary: ScriptedPrimary) -> None:
    with pytest.raises(ValueError, match="needs a fallback"):
        ResilientLimiter(primary, None, fail_open=True)
    ResilientLimiter(primary, None, fail_open=False)


class GiveBackPrimary(InProcessLimiter):
    """Releases leases, except those it is told to fail with a given error."""

    def __init__(self, clock: ManualClock, failures: dict[str, Exception]) -> None:
        super().__init__(clock=clock)
        self.failures = failures
        self.released: list[str] = []

    async def release_lease(self, key: str, lease_id: str, *, group: str) -> None:
        error = self.failures.get(lease_id)
        if error is not None:
            raise error
        self.released.append(lease_id)


async def _released(limiter: ResilientLimiter, primary: GiveBackPrimary, expected: list[str], pending: int) -> None:
    """Wait (2 s at most) until `expected` were released and `pending` give-backs still wait."""
    for _ in range(200):
        if primary.released == expected and limiter.pending_give_backs == pending:
            return
        await asyncio.sleep(0.01)
    assert (primary.released, limiter.pending_give_backs) == (expected, pending)


async def test_a_give_back_redis_refuses_is_dropped_and_those_behind_it_still_apply(clock: ManualClock) -> None:
    primary = GiveBackPrimary(clock, {"refused": LimiterCommandError("WRONGTYPE Operation against a key holding the wrong kind of value")})
    limiter = ResilientLimiter(primary, InProcessLimiter(clock=clock), retry_interval=0.01, clock=clock)
    await limiter.release_lease("k", "refused", group="g")
    await limiter.release_lease("k", "fine", group="g")  # queued behind the refused one
    await _released(limiter, primary, ["fine"], pending=0)
    await limiter.aclose()


async def test_a_give_back_that_keeps_failing_holds_up_none_of_the_others(clock: ManualClock) -> None:
    primary = GiveBackPrimary(clock, {"stuck": LimiterBackendError("READONLY You can't write against a read only replica")})
    limiter = ResilientLimiter(primary, InProcessLimiter(clock=clock), retry_interval=0.01, clock=clock)
    await limiter.release_lease("k", "stuck", group="g")
    for lease in ("one", "two", "three"):
        await limiter.release_lease("k", lease, group="g")
    await _released(limiter, primary, ["one", "two", "three"], pending=1)  # the stuck one still retried
    clock.advance(901)  # past retry_for: a lease has expired by its TTL by then
    await _released(limiter, primary, ["one", "two", "three"], pending=0)
    await limiter.aclose()


class AwayPrimary(InProcessLimiter):
    """A primary whose give-backs fail while it is away, and that records those it takes."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock=clock)
        self.away = True
        self.taken: list[tuple[list[tuple[LimitSpec, int]], tuple[str, str] | None]] = []

    async def give_back(self, refunds: Sequence[tuple[LimitSpec, int]], *, lease: tuple[str, str] | None = None, group: str) -> None:
        if self.away:
            raise LimiterBackendError("Redis is away")
        self.taken.append((list(refunds), lease))
        await super().give_back(refunds, lease=lease, group=group)


async def test_a_calls_give_back_frees_its_slot_here_at_once_and_reaches_redis_whole_once_it_is_back(clock: ManualClock) -> None:
    primary, fallback = AwayPrimary(clock), InProcessLimiter(clock=clock)
    limiter = ResilientLimiter(primary, fallback, retry_interval=0.01, clock=clock)
    await fallback.acquire_lease("streams", limit=1, lease_id="a", ttl_seconds=30, group="g")

    await limiter.give_back([(SPEC, 1)], lease=("streams", "a"), group="g")

    assert limiter.pending_give_backs == 1
    assert (await fallback.acquire_lease("streams", limit=1, lease_id="b", ttl_seconds=30, group="g")).allowed
    primary.away = False
    for _ in range(200):
        if not limiter.pending_give_backs:
            break
        await asyncio.sleep(0.01)
    assert primary.taken == [([(SPEC, 1)], ("streams", "a"))]
    await limiter.aclose()
