"""OpenAI-style API errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every error the API returns is one of these classes, so the OpenAI SDKs raise their typed
exceptions (`BadRequestError`, `AuthenticationError`, `NotFoundError`, `RateLimitError`, ...).
The domain packages raise their own exceptions and know nothing of HTTP; `api_error_for` maps
them here, once, for every endpoint.
"""

from __future__ import annotations

from typing import Any

import orjson
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse

from billing.exceptions import PriceMissing, QuotaExceeded
from calls.exceptions import (
    LedgerUnavailable,
    LimiterDown,
    LimitExceeded,
    LimitKind,
    ModelUnavailable,
    StoredResponseNotFound,
    UpstreamRefused,
)
from streaming.exceptions import InvalidApiRequest
from streaming.pipeline import CallStopped
from streaming.providers import UpstreamError


class ApiError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(ApiError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ApiError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(ApiError):
    """A method the endpoint does not take; the answer's `Allow` lists the one it does."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, method: str, *, allowed: str) -> None:
        super().__init__(f"{method} is not allowed on this endpoint; use {allowed}.", headers={"Allow": allowed})


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ApiError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class InsufficientQuota(ApiError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class ServiceUnavailable(ApiError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class UpstreamFailed(ApiError):
    """The upstream failed before the response started; mid-stream failures are SSE error events."""

    status = 502
    type = "api_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamFailed):
    status = 504
    code = "upstream_timeout"


class ConfigurationError(ApiError):
    status = 500
    type = "api_error"
    code = "gateway_misconfigured"


def error_response(error: ApiError) -> HttpResponse:
    response = HttpResponse(
        orjson.dumps(error.body()), status=error.status, content_type="application/json"
    )
    for name, value in error.headers.items():
        response[name] = value
    return response


def _upstream_error(error: UpstreamError) -> ApiError:
    """An upstream failure before any byte was sent to the client."""
    if isinstance(error, CallStopped):
        return PermissionDenied(error.message, code=error.reason)
    if error.kind == "rate_limited":
        headers = {}
        if error.retry_after is not None:
            headers["retry-after"] = str(max(1, round(error.retry_after)))
        return RateLimited(f"The upstream is rate limiting: {error.message}", code="upstream_rate_limited", headers=headers)
    if error.kind == "bad_request" and error.status == 404:
        return NotFound(error.message, code="upstream_not_found")
    if error.kind == "bad_request":
        return InvalidRequest(error.message, code="upstream_rejected_request")
    if error.kind == "timeout":
        return UpstreamTimeout(error.message)
    if error.kind == "auth":
        return UpstreamFailed("The gateway could not authenticate to its upstream.", code="upstream_auth_failed")
    return UpstreamFailed(f"The upstream failed: {error.message}")


# A refused limit's OpenAI error type and code, by the limit that refused it.
_LIMIT_ERRORS: dict[LimitKind, tuple[str, str]] = {
    "requests": ("requests", "rate_limit_exceeded"),
    "tokens": ("tokens", "rate_limit_exceeded"),
    "request_too_large": ("requests", "rate_limit_exceeded"),
    "concurrency": ("requests", "concurrency_limit_exceeded"),
    "upstream_capacity": ("requests", "upstream_capacity"),
}


DATABASE_UNAVAILABLE = "The gateway's database is unavailable. Try again shortly."


def api_error_for(error: Exception) -> ApiError | None:
    """The OpenAI error a domain exception is answered with; None for anything else (a bug)."""
    match error:
        case ApiError():
            return error
        case OperationalError() | InterfaceError():
            # Down, refusing connections, or no pooled connection in time: nothing was called
            # upstream yet (a call's own ledger row never fails this way: it has the outbox).
            return ServiceUnavailable(DATABASE_UNAVAILABLE, code="database_unavailable", headers={"Retry-After": "1"})
        case InvalidApiRequest():
            return InvalidRequest(error.message, param=error.param, code=error.code)
        case StoredResponseNotFound():
            return NotFound(error.message, param="response_id")
        case ModelUnavailable():
            return NotFound(error.message, param=error.param, code="model_not_found")
        case LimitExceeded():
            kind, code = _LIMIT_ERRORS[error.kind]
            limited = RateLimited(error.message, code=code, headers=error.headers)
            limited.type = kind
            return limited
        case LimiterDown():
            return ServiceUnavailable(error.message)
        case LedgerUnavailable():
            return ServiceUnavailable(error.message, code="ledger_unavailable", headers={"Retry-After": "1"})
        case UpstreamRefused():
            return _upstream_error(error.error)
        case QuotaExceeded():
            return InsufficientQuota(error.message)
        case PriceMissing():
            return ConfigurationError(error.message, param="model")
    return None
