"""What a limit is, what a decision says, and the contract every backend keeps.

A `LimitSpec` names one limit; a `Limiter` charges a set of specs all-or-nothing and returns a
`Decision` carrying one `LimitState` per spec (enough for ``x-ratelimit-*`` headers).

Semantics shared by every backend (the shared test suite in ``tests/limits`` is the
specification):

- **token_bucket**: capacity ``limit`` (the burst), refilled continuously at
  ``limit / period_seconds`` tokens per second; a call is admitted when the bucket holds at
  least ``cost`` tokens. An unseen bucket is full.
- **sliding_window**: an exact log. A call is admitted when the costs admitted during the last
  ``period_seconds`` plus ``cost`` do not exceed ``limit``. An admission at time ``t`` counts
  until ``t + period_seconds`` exclusive: at exactly that instant it has expired.
- **concurrency**: ``limit`` slots held by lease ids until each lease's TTL
  (``period_seconds``) from its last taking. In ``acquire(..., lease_id=...)`` (at most one
  such spec, ``cost`` 1) it takes a slot for ``lease_id`` together with the other specs, all or
  none; a lease id that already holds a slot re-takes it (a renewal) and always fits.
  `Limiter.acquire_lease` is that with the one spec. A decision names a full concurrency spec
  as ``violated`` only when no other spec refuses (its wait, until the oldest lease's TTL, says
  little: streams usually end sooner).
- ``cost`` greater than ``limit`` can never be admitted: the decision is a rejection with
  ``retry_after == math.inf`` (answer 413/400 rather than 429). ``cost == 0`` charges nothing
  and reports the current state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

type LimitKind = Literal["token_bucket", "sliding_window", "concurrency"]

KINDS: frozenset[str] = frozenset({"token_bucket", "sliding_window", "concurrency"})

MSG_EMPTY_KEY = "limit key must be a non-empty string"
MSG_BAD_KIND = "limit kind must be one of token_bucket, sliding_window, concurrency"
MSG_BAD_LIMIT = "limit must be a positive integer"
MSG_BAD_PERIOD = "period_seconds must be a positive finite number"
MSG_BAD_COST = "cost must be a non-negative integer"


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One limit to check.

    ``key`` identifies the limit within its group (e.g. ``"key:42:rpm"``); the backend adds its
    prefix and the group hash tag. ``limit`` is the bucket capacity (burst), the window maximum
    or the number of lease slots. ``period_seconds`` is the time a token bucket takes to refill
    ``limit`` tokens (sustained rate ``limit / period_seconds``), the window length, or the lease
    TTL. ``cost`` is what this call takes (1 per request, estimated tokens for TPM).
    """

    key: str
    kind: LimitKind
    limit: int
    period_seconds: float
    cost: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(MSG_EMPTY_KEY)
        if self.kind not in KINDS:
            raise ValueError(MSG_BAD_KIND)
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(MSG_BAD_LIMIT)
        period = self.period_seconds
        if isinstance(period, bool) or not isinstance(period, int | float):
            raise ValueError(MSG_BAD_PERIOD)
        if not math.isfinite(period) or period <= 0:
            raise ValueError(MSG_BAD_PERIOD)
        if isinstance(self.cost, bool) or not isinstance(self.cost, int) or self.cost < 0:
            raise ValueError(MSG_BAD_COST)


@dataclass(frozen=True, slots=True)
class LimitState:
    """The state of one spec after a decision.

    ``remaining`` is what a following call could still take (whole units, never negative);
    ``reset_seconds`` is the time until the limit is fully replenished (0.0 when it already is).
    A blocked key reports ``remaining == 0`` and at least the time left on the block.
    """

    spec: LimitSpec
    remaining: int
    reset_seconds: float


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one call.

    ``retry_after`` is the time until this same call could be admitted if nobody else took
    capacity meanwhile (0.0 when allowed, ``math.inf`` when never). ``violated`` is the spec that
    forces the longest wait, or ``None`` when allowed.
    """

    allowed: bool
    retry_after: float
    states: tuple[LimitState, ...]
    violated: LimitSpec | None = None


@runtime_checkable
class Limiter(Protocol):
    """An async rate limiter. Every method may raise `LimiterError` subclasses.

    ``group`` is the hash tag shared by every key of one call (e.g. the user or API-key id), so
    that one atomic script can touch them all on Redis Cluster. It must be non-empty and free of
    braces.
    """

    async def acquire(self, specs: Sequence[LimitSpec], *, group: str, lease_id: str | None = None) -> Decision:
        """Charge every spec or none; keys must be unique within the call. ``lease_id`` names the
        lease a concurrency spec among ``specs`` takes (required with one, refused without)."""
        ...

    async def refund(self, spec: LimitSpec, amount: int, *, group: str) -> None:
        """Give back ``amount`` units (token bucket: never above capacity)."""
        ...

    async def give_back(
        self, refunds: Sequence[tuple[LimitSpec, int]], *, lease: tuple[str, str] | None = None, group: str
    ) -> None:
        """What a call gives back when it ends, at once: each ``refund()`` and, with ``lease``
        (key, lease id), ``release_lease()``."""
        ...

    async def acquire_lease(
        self, key: str, *, limit: int, lease_id: str, ttl_seconds: float, group: str
    ) -> Decision:
        """Take one of ``limit`` concurrent slots until ``ttl_seconds`` from now: ``acquire()`` of
        that one concurrency spec (`lease_spec`)."""
        ...

    async def renew_lease(self, key: str, lease_id: str, *, ttl_seconds: float, group: str) -> bool:
        """Push a held lease's expiry to ``ttl_seconds`` from now; False if it was lost."""
        ...

    async def release_lease(self, key: str, lease_id: str, *, group: str) -> None:
        """Free a slot; releasing an unknown or expired lease is a no-op."""
        ...

    async def block(self, key: str, seconds: float, *, group: str) -> None:
        """Reject ``acquire()`` on specs with this key for ``seconds`` (never shortens a block)."""
        ...

    async def health(self) -> dict[str, Any]:
        """Report ``{"backend": ..., "state": "ok" | "degraded" | "down", ...}``; never raises."""
        ...

    async def aclose(self) -> None:
        """Release connections; the limiter is unusable afterwards."""
        ...


def lease_spec(key: str, *, limit: int, ttl_seconds: float) -> LimitSpec:
    """Describe a concurrency limit, for the states of a lease decision."""
    return LimitSpec(key=key, kind="concurrency", limit=limit, period_seconds=ttl_seconds)
