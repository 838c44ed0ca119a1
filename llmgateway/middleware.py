"""Every response carries `x-request-id` and `x-gateway-overhead-ms` (time the gateway added)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from infra import observability

REQUEST_ID_HEADER = "x-request-id"
OVERHEAD_HEADER = "x-gateway-overhead-ms"


class RequestTimingMiddleware:
    """Stamp the request's arrival; views that wait on an upstream subtract that wait themselves."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self._acall(request)
        request.started_at = time.perf_counter()  # type: ignore[attr-defined]
        return self._stamp(request, self.get_response(request))  # type: ignore[arg-type]

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        request.started_at = time.perf_counter()  # type: ignore[attr-defined]
        return self._stamp(request, await self.get_response(request))  # type: ignore[misc]

    @staticmethod
    def _stamp(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if REQUEST_ID_HEADER not in response:
            response[REQUEST_ID_HEADER] = str(uuid.uuid4())
        if OVERHEAD_HEADER not in response:
            elapsed = time.perf_counter() - request.started_at  # type: ignore[attr-defined]
            response[OVERHEAD_HEADER] = f"{elapsed * 1000:.3f}"
        return response


def stamp_upstream_call(request: HttpRequest, response: HttpResponseBase, *, upstream_seconds: float) -> None:
    """Set the overhead header of a response that waited `upstream_seconds` on the upstream."""
    overhead = max(0.0, time.perf_counter() - request.started_at - upstream_seconds)  # type: ignore[attr-defined]
    observability.OVERHEAD.observe(overhead)
    response[OVERHEAD_HEADER] = f"{overhead * 1000:.3f}"
