"""Argument checks shared by every backend, so both refuse exactly the same calls.

All failures raise `ValueError` with a message built from a module constant: these are
programming errors in the caller, never limiter outcomes, and `ResilientLimiter` does not
treat them as backend failures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .specs import LimitSpec

MSG_BAD_GROUP = "group must be a non-empty string without braces (it is the Redis hash tag)"
MSG_NO_SPECS = "acquire() needs at least one spec"
MSG_DUPLICATE_KEY = "duplicate limit key in one call"
MSG_LEASE_NEEDS_ID = "a concurrency spec in acquire() needs a lease_id, and a lease_id one concurrency spec"
MSG_ONE_LEASE = "acquire() takes at most one concurrency spec, at cost 1"
MSG_REFUND_KIND = "refund() applies to token_bucket and sliding_window specs"
MSG_BAD_AMOUNT = "refund amount must be a non-negative integer"
MSG_BAD_SECONDS = "seconds must be a positive finite number"
MSG_BAD_LEASE_ID = "lease_id must be a non-empty string"
MSG_BAD_KEY = "key must be a non-empty string"
MSG_BAD_LIMIT = "limit must be a positive integer"


def check_group(group: str) -> None:
    """Refuse a group that would break the ``{hash-tag}``."""
    if not isinstance(group, str) or not group or "{" in group or "}" in group:
        raise ValueError(MSG_BAD_GROUP)


def check_acquire(specs: Sequence[LimitSpec], group: str, lease_id: str | None = None) -> None:
    """Refuse an empty call, one key named twice (the second check would not see the first
    charge), or a concurrency spec without its lease id (and the reverse)."""
    check_group(group)
    if not specs:
        raise ValueError(MSG_NO_SPECS)
    seen: set[str] = set()
    leases = 0
    for spec in specs:
        if spec.kind == "concurrency":
            leases += 1
            if spec.cost != 1:
                raise ValueError(MSG_ONE_LEASE)
        if spec.key in seen:
            raise ValueError(f"{MSG_DUPLICATE_KEY}: {spec.key!r}")
        seen.add(spec.key)
    if leases > 1:
        raise ValueError(MSG_ONE_LEASE)
    if (leases == 1) != (lease_id is not None):
        raise ValueError(MSG_LEASE_NEEDS_ID)
    if lease_id is not None and (not isinstance(lease_id, str) or not lease_id):
        raise ValueError(MSG_BAD_LEASE_ID)


def check_refund(spec: LimitSpec, amount: int, group: str) -> None:
    check_group(group)
    if spec.kind == "concurrency":
        raise ValueError(MSG_REFUND_KIND)
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ValueError(MSG_BAD_AMOUNT)


def check_seconds(seconds: float) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(MSG_BAD_SECONDS)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(MSG_BAD_SECONDS)


def check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(MSG_BAD_KEY)


def check_lease(key: str, lease_id: str, group: str) -> None:
    check_group(group)
    check_key(key)
    if not isinstance(lease_id, str) or not lease_id:
        raise ValueError(MSG_BAD_LEASE_ID)


def check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(MSG_BAD_LIMIT)
