"""`ResilientLimiter`: a primary limiter (Redis) guarded by a circuit breaker, with a policy for
when the primary is unreachable.

Failure policy (deliberate; change it here, not at call sites):

- Every primary call that raises `LimiterBackendError` (a Redis error, or the backend's own
  short timeout) counts against the `CircuitBreaker`. While the breaker is open the primary is
  not called at all, so an outage costs each decision nothing; after ``reset_timeout`` a single
  trial call goes through and closes the breaker if it succeeds.
- **fail_open=True** (default): a decision the primary cannot make is made by the in-process
  ``fallback`` limiter. Limits then hold per process only (N workers admit up to N times the
  rate) and start from fresh state; we accept that over refusing all traffic because the
  upstream providers enforce their own limits and the outage is visible (see below).
- **fail_open=False**: such a call raises `LimiterUnavailable` (the API answers 503).
- Each call not served by the primary calls ``on_fallback(operation, reason)`` (reason
  ``"error"`` or ``"breaker_open"``; hook a counter to it) and logs a warning, at most once per
  ``log_interval`` seconds with the number of events since the last warning.
- `health()` reports ``"degraded"`` while the breaker is not closed (and when the closed
  primary's own health check fails); it never touches Redis while the breaker is open.

Races and approximations that remain (fail-open):

- A charge taken by the fallback during an outage is not known to Redis afterwards, and a
  refund is sent to whichever backend is reachable at refund time (bucket refunds are capped
  at capacity, so this can only admit a little more, briefly).
- `block()` and `release_lease()` are always applied to the fallback as well as the primary,
  so a block is honoured in this process during an outage and no fallback slot leaks.
- A give-back (`release_lease()`, `refund()`) that the primary cannot take now (an error, a
  timeout, the breaker open; fail-open or fail-closed alike) is retried against the primary in
  the background every ``retry_interval`` seconds, bypassing the breaker, until it succeeds or
  ``retry_for`` seconds have passed (a lease expires by its TTL by then). A frozen Redis holds
  the attempt in flight, which completes as soon as it thaws, so slots come back within a
  moment of the outage ending instead of at their TTL. One that fails again goes to the back of
  the queue, so it never holds up the others; one that Redis answers with an error
  (`LimiterCommandError`) is dropped and logged, since it would get the same answer again. At
  most ``max_retries`` give-backs wait; past that the oldest is dropped (logged).
- `renew_lease()` served by the fallback returns True even for a lease the fallback never saw
  (it was taken from Redis): during an outage we do not cut healthy streams.
- A primary call that times out after Redis ran the script has charged Redis (over-counting).

Invalid arguments (`ValueError`) and cancellation pass straight through and never count as
failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .breaker import CircuitBreaker
from .clock import Clock, monotonic_clock
from .exceptions import (
    MSG_UNAVAILABLE,
    LimiterBackendError,
    LimiterCommandError,
    LimiterUnavailable,
)
from .specs import Decision, Limiter, LimitSpec

logger = logging.getLogger(__name__)

type FallbackHook = Callable[[str, str], None]
"""``on_fallback(operation, reason)``; must be cheap and must not raise (errors are logged)."""

MSG_NEED_FALLBACK = "fail_open=True needs a fallback limiter"
REASON_ERROR = "error"
REASON_OPEN = "breaker_open"


class ResilientLimiter:
    """A `Limiter` that survives its primary's outages according to ``fail_open``."""

    def __init__(
        self,
        primary: Limiter,
        fallback: Limiter | None,
        *,
        fail_open: bool = True,
        breaker: CircuitBreaker | None = None,
        on_fallback: FallbackHook | None = None,
        log_interval: float = 10.0,
        clock: Clock = monotonic_clock,
        retry_interval: float = 0.25,
        retry_for: float = 900.0,
        max_retries: int = 100_000,
    ) -> None:
        if fail_open and fallback is None:
            raise ValueError(MSG_NEED_FALLBACK)
        self.primary = primary
        self.fallback = fallback
        self.fail_open = fail_open
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self._on_fallback = on_fallback
        self._log_interval = log_interval
        self._clock = clock
        self._next_log_at = -float("inf")
        self._unlogged = 0
        self._retry_interval = retry_interval
        self._retry_for = retry_for
        self._give_backs: deque[tuple[float, str, Callable[[], Awaitable[None]]]] = deque(maxlen=max_retries)
        self._retrier: asyncio.Task[None] | None = None

    # -- Limiter API ---------------------------------------------------------------------------

    async def acquire(self, specs: Sequence[LimitSpec], *, group: str, lease_id: str | None = None) -> Decision:
        return await self._call(
            "acquire",
            lambda: self.primary.acquire(specs, group=group, lease_id=lease_id),
            lambda limiter: limiter.acquire(specs, group=group, lease_id=lease_id),
        )

    async def refund(self, spec: LimitSpec, amount: int, *, group: str) -> None:
        if await self._give_back("refund", lambda: self.primary.refund(spec, amount, group=group)):
            return
        if self.fail_open and self.fallback is not None:
            await self.fallback.refund(spec, amount, group=group)

    async def give_back(
        self, refunds: Sequence[tuple[LimitSpec, int]], *, lease: tuple[str, str] | None = None, group: str
    ) -> None:
        """As `refund()` and `release_lease()` each do, in one give-back to the primary."""
        if lease is not None and self.fallback is not None:
            await self.fallback.release_lease(*lease, group=group)
        if await self._give_back("give_back", lambda: self.primary.give_back(refunds, lease=lease, group=group)):
            return
        if self.fail_open and self.fallback is not None:
            await self.fallback.give_back(refunds, group=group)  # its lease went back above

    async def acquire_lease(
        self, key: str, *, limit: int, lease_id: str, ttl_seconds: float, group: str
    ) -> Decision:
        return await self._call(
            "acquire_lease",
            lambda: self.primary.acquire_lease(
                key, limit=limit, lease_id=lease_id, ttl_seconds=ttl_seconds, group=group
            ),
            lambda limiter: limiter.acquire_lease(
                key, limit=limit, lease_id=lease_id, ttl_seconds=ttl_seconds, group=group
            ),
        )

    async def renew_lease(self, key: str, lease_id: str, *, ttl_seconds: float, group: str) -> bool:
        async def on_fallback(limiter: Limiter) -> bool:
            await limiter.renew_lease(key, lease_id, ttl_seconds=ttl_seconds, group=group)
            return True  # see the module docstring: do not cut streams during an outage

        return await self._call(
            "renew_lease",
            lambda: self.primary.renew_lease(key, lease_id, ttl_seconds=ttl_seconds, group=group),
            on_fallback,
        )

    async def release_lease(self, key: str, lease_id: str, *, group: str) -> None:
        if self.fallback is not None:
            await self.fallback.release_lease(key, lease_id, group=group)
        await self._give_back("release_lease", lambda: self.primary.release_lease(key, lease_id, group=group))

    async def block(self, key: str, seconds: float, *, group: str) -> None:
        if self.fallback is not None:
            await self.fallback.block(key, seconds, group=group)
        await self._call("block", lambda: self.primary.block(key, seconds, group=group), _nothing)

    async def health(self) -> dict[str, Any]:
        """Never raises; ``"degraded"`` while the breaker is not closed."""
        breaker_state = self.breaker.state
        report: dict[str, Any] = {
            "backend": "resilient",
            "state": "ok",
            "breaker": breaker_state,
            "consecutive_failures": self.breaker.failures,
            "fail_open": self.fail_open,
            "primary": None,
        }
        if breaker_state == "closed":
            report["primary"] = await self.primary.health()
            if report["primary"].get("state") != "ok":
                report["state"] = "degraded"
        else:
            report["state"] = "degraded"
        if self.fallback is not None:
            report["fallback"] = await self.fallback.health()
        return report

    @property
    def pending_give_backs(self) -> int:
        """Give-backs waiting for the primary to answer."""
        return len(self._give_backs)

    async def aclose(self) -> None:
        retrier, self._retrier = self._retrier, None
        if retrier is not None:
            retrier.cancel()
            try:
                await retrier
            except asyncio.CancelledError:
                pass
        try:
            await self.primary.aclose()
        finally:
            if self.fallback is not None:
                await self.fallback.aclose()

    # -- plumbing ------------------------------------------------------------------------------

    async def _give_back(self, operation: str, on_primary: Callable[[], Awaitable[None]]) -> bool:
        """Apply a give-back to the primary; if it cannot be now, queue it. True if applied.

        While earlier give-backs wait for the primary, this one queues behind them at once: they
        stay in order, and a call that ends during an outage waits for one timeout at most.
        """
        if not self._give_backs and await self._try_primary(operation, on_primary):
            return True
        if len(self._give_backs) == self._give_backs.maxlen:
            logger.error("rate limiter: too many give-backs wait for Redis; dropping the oldest (%s)", self._give_backs[0][1])
        self._give_backs.append((self._clock() + self._retry_for, operation, on_primary))
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._retry_give_backs(), name="llmgateway-limit-give-backs")
        return False

    async def _try_primary(self, operation: str, on_primary: Callable[[], Awaitable[None]]) -> bool:
        """Apply a give-back to the primary through the breaker; False if it could not be."""

        async def applied() -> bool:
            await on_primary()
            return True

        async def not_applied(limiter: Limiter) -> bool:
            return False

        try:
            return await self._call(operation, applied, not_applied)
        except LimiterUnavailable:  # fail-closed: the give-back waits for the primary all the same
            return False

    async def _retry_give_backs(self) -> None:
        """Apply queued give-backs in order, as soon as the primary takes them (see the docstring)."""
        while self._give_backs:
            deadline, operation, on_primary = self._give_backs[0]
            if self._clock() >= deadline:
                self._give_backs.popleft()
                logger.warning("rate limiter: gave up a %s that Redis did not take in time", operation)
                continue
            try:
                await on_primary()
            except LimiterCommandError as exc:
                logger.error("rate limiter: Redis refused a queued %s (%s); dropped", operation, exc)
            except LimiterBackendError:
                self._give_backs.rotate(-1)  # behind the others: one that keeps failing holds none up
                await asyncio.sleep(self._retry_interval)
                continue
            except Exception:
                logger.exception("rate limiter: a queued %s failed; dropped", operation)
            self._give_backs.popleft()

    async def _call[T](
        self,
        operation: str,
        on_primary: Callable[[], Awaitable[T]],
        on_fallback: Callable[[Limiter], Awaitable[T]],
    ) -> T:
        permit = self.breaker.allow()
        if permit is None:
            return await self._degrade(operation, REASON_OPEN, None, on_fallback)
        try:
            result = await on_primary()
        except LimiterBackendError as exc:
            self.breaker.record_failure(permit)
            return await self._degrade(operation, REASON_ERROR, exc, on_fallback)
        except BaseException:
            self.breaker.release(permit)  # cancelled or a caller bug: no verdict on the backend
            raise
        self.breaker.record_success(permit)
        return result

    async def _degrade[T](
        self,
        operation: str,
        reason: str,
        exc: LimiterBackendError | None,
        on_fallback: Callable[[Limiter], Awaitable[T]],
    ) -> T:
        self._report(operation, reason, exc)
        if not self.fail_open or self.fallback is None:
            raise LimiterUnavailable(MSG_UNAVAILABLE) from exc
        return await on_fallback(self.fallback)

    def _report(self, operation: str, reason: str, exc: LimiterBackendError | None) -> None:
        if self._on_fallback is not None:
            try:
                self._on_fallback(operation, reason)
            except Exception:
                logger.exception("on_fallback hook failed")
        self._unlogged += 1
        now = self._clock()
        if now < self._next_log_at:
            return
        logger.warning(
            "rate limiter primary unavailable (%s: %s); %s; %d such calls since the last warning",
            reason,
            exc if exc is not None else "breaker open",
            "deciding in-process" if self.fail_open else "refusing (fail-closed)",
            self._unlogged,
        )
        self._unlogged = 0
        self._next_log_at = now + self._log_interval


async def _nothing(limiter: Limiter) -> None:
    """Fallback for operations already applied to the fallback limiter."""
