"""Exceptions raised by the limiters.

    LimiterError                 base class; never raised itself
    ├── LimiterBackendError      a backend call failed or overran its timeout (RedisLimiter);
    │   │                        ResilientLimiter counts these against its circuit breaker
    │   └── LimiterCommandError  the backend answered, with an error: trying again will not help
    └── LimiterUnavailable       ResilientLimiter in fail-closed mode cannot reach its primary;
                                 the API answers 503

Invalid arguments raise `ValueError` (see ``_validate``); those are bugs in the caller, not
outages, and never trip the breaker.
"""

from __future__ import annotations

MSG_BACKEND_ERROR = "rate-limit backend failed"
MSG_BACKEND_TIMEOUT = "rate-limit backend timed out"
MSG_UNAVAILABLE = "rate limiter unavailable"


class LimiterError(Exception):
    """Base class for limiter failures."""


class LimiterBackendError(LimiterError):
    """A backend call failed or timed out; whether it took effect is unknown."""


class LimiterUnavailable(LimiterError):
    """The limiter refuses to decide (fail-closed while its primary is unreachable)."""


class LimiterCommandError(LimiterBackendError):
    """The backend answered with an error (Redis `ResponseError`: a wrong type, a script error).

    A `LimiterBackendError` all the same (the breaker counts it), but a give-back that got one
    is dropped rather than retried: the same command would get the same answer.
    """
