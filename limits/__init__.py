"""Async rate limiting for the gateway: token buckets, sliding windows, concurrency leases and
blocks, with a Redis backend (atomic Lua, one script per decision, concurrent decisions sharing
round trips) and an in-process one of identical semantics.

Typical wiring (all configuration is passed in; nothing here reads Django settings)::

    limiter = ResilientLimiter(
        RedisLimiter.from_url(redis_url, timeout=0.1),
        InProcessLimiter(),
        fail_open=True,
        breaker=CircuitBreaker(failure_threshold=5, reset_timeout=5.0),
        on_fallback=lambda operation, reason: FALLBACKS.labels(operation, reason).inc(),
    )
    decision = await limiter.acquire(
        [LimitSpec("key:42:rpm", "token_bucket", 60, 60.0),
         LimitSpec("key:42:tpm", "token_bucket", 90_000, 60.0, cost=estimated_tokens)],
        group="key:42",
    )

Failure policies are written in each module: `redis_backend` (timeouts, races),
`resilient` (fail open / closed), `inprocess` (per-process state), `waiting` (cancellation).
"""

from .breaker import BreakerState, CircuitBreaker, Permit
from .clock import Clock, ManualClock, monotonic_clock
from .exceptions import LimiterBackendError, LimiterCommandError, LimiterError, LimiterUnavailable
from .inprocess import InProcessLimiter
from .redis_backend import RedisLimiter
from .resilient import FallbackHook, ResilientLimiter
from .specs import Decision, Limiter, LimitKind, LimitSpec, LimitState, lease_spec
from .waiting import Acquirer, acquire_waiting

__all__ = [
    "Acquirer",
    "BreakerState",
    "CircuitBreaker",
    "Clock",
    "Decision",
    "FallbackHook",
    "InProcessLimiter",
    "LimitKind",
    "LimitSpec",
    "LimitState",
    "Limiter",
    "LimiterBackendError",
    "LimiterCommandError",
    "LimiterError",
    "LimiterUnavailable",
    "ManualClock",
    "Permit",
    "RedisLimiter",
    "ResilientLimiter",
    "acquire_waiting",
    "lease_spec",
    "monotonic_clock",
]
