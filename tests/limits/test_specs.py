"""What a LimitSpec accepts, and the checks every backend applies to its arguments."""

from __future__ import annotations

import math

import pytest

from limits import InProcessLimiter, LimitSpec


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": ""}, "non-empty"),
        ({"kind": "fixed_window"}, "kind"),
        ({"limit": 0}, "positive integer"),
        ({"limit": 1.5}, "positive integer"),
        ({"limit": True}, "positive integer"),
        ({"period_seconds": 0}, "period_seconds"),
        ({"period_seconds": math.inf}, "period_seconds"),
        ({"period_seconds": math.nan}, "period_seconds"),
        ({"cost": -1}, "cost"),
    ],
    ids=[
        "empty-key",
        "kind",
        "zero-limit",
        "float-limit",
        "bool-limit",
        "zero-period",
        "inf-period",
        "nan-period",
        "negative-cost",
    ],
)
def test_invalid_specs_are_refused(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "key": "k",
        "kind": "token_bucket",
        "limit": 1,
        "period_seconds": 1.0,
    }
    with pytest.raises(ValueError, match=message):
        LimitSpec(**{**base, **kwargs})  # type: ignore[arg-type]


async def test_acquire_refuses_empty_calls_and_a_lease_without_its_id_or_an_id_without_a_lease() -> None:
    limiter = InProcessLimiter()
    lease = LimitSpec("s", "concurrency", 2, 30.0)
    rpm = LimitSpec("r", "token_bucket", 2, 30.0)
    with pytest.raises(ValueError, match="needs a lease_id"):
        await limiter.acquire([lease], group="g")
    with pytest.raises(ValueError, match="needs a lease_id"):
        await limiter.acquire([rpm], group="g", lease_id="L1")
    with pytest.raises(ValueError, match="at most one concurrency spec"):
        await limiter.acquire([lease, LimitSpec("t", "concurrency", 2, 30.0)], group="g", lease_id="L1")
    with pytest.raises(ValueError, match="at most one concurrency spec"):
        await limiter.acquire([LimitSpec("s", "concurrency", 2, 30.0, cost=2)], group="g", lease_id="L1")
    with pytest.raises(ValueError, match="lease_id"):
        await limiter.acquire([lease], group="g", lease_id="")
    with pytest.raises(ValueError, match="at least one"):
        await limiter.acquire([], group="g")


@pytest.mark.parametrize("amount", [-1, 1.5], ids=["negative", "float"])
async def test_refund_refuses_bad_amounts(amount: int) -> None:
    with pytest.raises(ValueError, match="amount"):
        await InProcessLimiter().refund(LimitSpec("k", "token_bucket", 1, 1.0), amount, group="g")
