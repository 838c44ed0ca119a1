"""CircuitBreaker transitions, on a manual clock."""

from __future__ import annotations

import pytest

from limits import CircuitBreaker, ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def breaker(clock: ManualClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, reset_timeout=5.0, clock=clock)


def _fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        permit = breaker.allow()
        assert permit is not None
        breaker.record_failure(permit)


def test_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker) -> None:
    _fail(breaker, 2)
    assert breaker.state == "closed"
    _fail(breaker, 1)
    assert breaker.state == "open"
    assert breaker.allow() is None


def test_a_success_resets_the_count(breaker: CircuitBreaker) -> None:
    _fail(breaker, 2)
    permit = breaker.allow()
    assert permit is not None
    breaker.record_success(permit)
    _fail(breaker, 2)
    assert breaker.state == "closed"


def test_half_open_lets_exactly_one_trial_through(
    breaker: CircuitBreaker, clock: ManualClock
) -> None:
    _fail(breaker, 3)
    clock.advance(4.9)
    assert breaker.allow() is None
    clock.advance(0.1)

    trial = breaker.allow()
    second = breaker.allow()

    assert breaker.state == "half_open"
    assert trial is not None and trial.trial
    assert second is None


@pytest.mark.parametrize(
    ("verdict", "state_after"),
    [("success", "closed"), ("failure", "open"), ("release", "half_open")],
    ids=["trial-succeeds", "trial-fails", "trial-cancelled"],
)
def test_the_trial_verdict_decides(
    breaker: CircuitBreaker, clock: ManualClock, verdict: str, state_after: str
) -> None:
    _fail(breaker, 3)
    clock.advance(5.0)
    trial = breaker.allow()
    assert trial is not None

    {
        "success": breaker.record_success,
        "failure": breaker.record_failure,
        "release": breaker.release,
    }[verdict](trial)

    assert breaker.state == state_after
    if verdict == "failure":  # the reset timeout starts again from the failed trial
        clock.advance(4.9)
        assert breaker.state == "open"
    if verdict == "release":  # another caller may run the trial
        assert breaker.allow() is not None


def test_a_late_success_from_before_the_outage_does_not_close_it(
    breaker: CircuitBreaker,
) -> None:
    early = breaker.allow()
    assert early is not None
    _fail(breaker, 3)

    breaker.record_success(early)

    assert breaker.state == "open"


@pytest.mark.parametrize(
    ("threshold", "reset"), [(0, 1.0), (1, 0.0), (1, -1.0)], ids=["threshold", "zero", "negative"]
)
def test_invalid_settings_are_refused(threshold: int, reset: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=threshold, reset_timeout=reset)
