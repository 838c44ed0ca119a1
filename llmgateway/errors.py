"""OpenAI-style API errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every error the API returns is one of these classes, so the OpenAI SDKs raise their typed
exceptions (`BadRequestError`, `AuthenticationError`, `NotFoundError`, `RateLimitError`, ...).
"""

from __future__ import annotations

from typing import Any

import orjson
from django.http import HttpResponse


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
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


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
