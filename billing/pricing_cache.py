"""A short-lived, per-process cache of "which account and rates does this user's call get".

Admission reads the account and up to four price tables per call; for a user without budgets
that is the whole database cost of admitting a call. The answer changes only when staff edit
prices, plans, overrides or quotas, so it is cached for BILLING_RATES_CACHE_SECONDS (default 2 s).
Any save or delete of those models clears this process's cache at once (signals); other gateway
processes see the change within the TTL. The ledger row stores the rates actually used, so
every bill stays auditable. A user with budgets still takes the account lock on every call;
only the price lookup is cached for them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from billing.money import Rates


@dataclass(frozen=True, slots=True)
class Pricing:
    account_id: int
    has_limits: bool
    rates: Rates | None


_lock = threading.Lock()
_entries: dict[tuple[int, str, str | None], tuple[float, Pricing]] = {}
_MAX_ENTRIES = 50_000


def get(user_id: int, model: str, upstream_model: str | None) -> Pricing | None:
    entry = _entries.get((user_id, model, upstream_model))
    if entry is None or entry[0] < time.monotonic():
        return None
    return entry[1]


def put(user_id: int, model: str, upstream_model: str | None, pricing: Pricing) -> None:
    ttl = settings.BILLING_RATES_CACHE_SECONDS
    if ttl <= 0:
        return
    with _lock:
        if len(_entries) >= _MAX_ENTRIES:
            _entries.clear()
        _entries[(user_id, model, upstream_model)] = (time.monotonic() + ttl, pricing)


def clear(**_: Any) -> None:
    with _lock:
        _entries.clear()
