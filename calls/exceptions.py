"""Why a call was refused or failed, in the application's terms; the API edge maps each to an
OpenAI error once (`llmgateway.errors.api_error_for`).

    CallError
    ├── ModelUnavailable       the model is unknown, or its provider is not configured
    ├── LimitExceeded          a rate limit, the concurrency limit or the upstream's capacity
    ├── LimiterDown            the limiter is unreachable and configured to fail closed
    ├── LedgerUnavailable      the call could not be journaled, so it could not be accounted for
    ├── StoredResponseNotFound no stored response of the caller's has that id
    └── UpstreamRefused        the upstream failed before the first token
"""

from __future__ import annotations

from typing import Literal

from streaming.providers import UpstreamError


class CallError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelUnavailable(CallError):
    def __init__(self, message: str, *, param: str = "model") -> None:
        super().__init__(message)
        self.param = param


LimitKind = Literal["requests", "tokens", "concurrency", "upstream_capacity", "request_too_large"]


class LimitExceeded(CallError):
    """A limit refused the call; `headers` are OpenAI's rate-limit headers (and Retry-After)."""

    def __init__(self, message: str, *, kind: LimitKind, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.kind = kind
        self.headers = headers


class LimiterDown(CallError):
    pass


class LedgerUnavailable(CallError):
    """The ledger outbox could not journal the call (disk full, unwritable): it is not made."""


class StoredResponseNotFound(CallError):
    """No response of this user has that id (or the upstream that stored it is gone)."""


class UpstreamRefused(CallError):
    """The upstream failed before the first token: the edge answers with an HTTP error."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error
