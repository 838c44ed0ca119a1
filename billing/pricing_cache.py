"""A short-lived, per-process cache of "which account and rates does this user's call get".

Admission reads the account and up to four price tables per call; for a user without budgets
that is the whole database cost of admitting a call. The answer changes only when staff edit
prices, plans, overrides or quotas, so it is cached for BILLING_RATES_CACHE_SECONDS (default 2 s)
and, while calls use it, read again ahead of that in a database thread (`infra.refresh`): a
busy process's calls do not wait for the database each time an entry would expire.
Any save or delete of those models clears this process's cache at once (signals); other gateway
processes see the change within the TTL. The ledger row stores the rates actually used, so
every bill stays auditable. A user with budgets still takes the account lock on every call;
only the price lookup is cached for them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from billing.money import Rates
from infra.refresh import RefreshAhead

type PricingKey = tuple[int, str, str | None]  # user id, model, upstream model


@dataclass(frozen=True, slots=True)
class Pricing:
    account_id: int
    has_limits: bool
    rates: Rates | None


# How an ageing entry is read again (`billing.services`, which builds on this module, sets it).
read: Callable[[int, str, str | None], Awaitable[Pricing]] | None = None


async def _read(key: PricingKey) -> tuple[Pricing, float]:
    assert read is not None, "billing.services sets pricing_cache.read"
    return await read(*key), settings.BILLING_RATES_CACHE_SECONDS


_cache: RefreshAhead[PricingKey, Pricing] = RefreshAhead(_read, name="account pricing", max_entries=50_000)


def get(user_id: int, model: str, upstream_model: str | None) -> Pricing | None:
    """The cached pricing, if any (from any thread; reads nothing)."""
    return _cache.peek((user_id, model, upstream_model))


def cached(user_id: int, model: str, upstream_model: str | None) -> Pricing | None:
    """The cached pricing, if any, from the event loop: one in the second half of its time is
    read again meanwhile (in a database thread), so calls in steady use always find it."""
    return _cache.cached((user_id, model, upstream_model))


def put(user_id: int, model: str, upstream_model: str | None, pricing: Pricing) -> None:
    _cache.put((user_id, model, upstream_model), pricing, settings.BILLING_RATES_CACHE_SECONDS)


def clear(**_: Any) -> None:
    _cache.clear()
