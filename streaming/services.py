"""One chat completion call, from a validated request to a response, recorded exactly once."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

import orjson
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from django.utils import timezone

from billing.services import Admission, abudget_release, abudget_reserve, ausage_record_create
from billing.tokens import acount_chat_prompt_tokens, count_text_tokens
from llmgateway import observability, ratelimits
from llmgateway.auth import Principal
from llmgateway.errors import (
    ApiError,
    InvalidRequest,
    NotFound,
    RateLimited,
    UpstreamFailed,
    UpstreamTimeout,
)
from streaming import _sse
from streaming.aggregate import CompletionBuilder
from streaming.catalog import ModelRoute, all_routes, route_for
from streaming.pipeline import (
    END,
    CallOutcome,
    CompletionCapReached,
    QueueItem,
    StreamRelay,
    Timeouts,
    sse_stream,
)
from streaming.providers import ChatRequest, ProviderChunk, UpstreamError, get_provider
from streaming.validation import ChatParams

logger = logging.getLogger(__name__)

MODEL_NOT_FOUND = "The model `{model}` does not exist or you do not have access to it."
MODEL_NOT_CONFIGURED = "The model `{model}` is not available: its provider `{provider}` is not configured on this gateway."
SIMULATOR_HEADER_PREFIX = "x-simulator-"


def resolve_route(model: str) -> ModelRoute:
    route = route_for(model)
    if route is not None:
        return route
    known = all_routes().get(model)
    if known is not None:
        raise NotFound(MODEL_NOT_CONFIGURED.format(model=model, provider=known.provider), param="model", code="model_not_found")
    raise NotFound(MODEL_NOT_FOUND.format(model=model), param="model", code="model_not_found")


def upstream_error_to_api_error(error: UpstreamError) -> ApiError:
    """An upstream failure before any byte was sent to the client becomes an HTTP error."""
    if error.kind == "rate_limited":
        headers = {}
        if error.retry_after is not None:
            headers["retry-after"] = str(max(1, round(error.retry_after)))
        return RateLimited(f"The upstream is rate limiting: {error.message}", code="upstream_rate_limited", headers=headers)
    if error.kind == "bad_request":
        return InvalidRequest(error.message, code="upstream_rejected_request")
    if error.kind == "timeout":
        return UpstreamTimeout(error.message)
    if error.kind == "auth":
        return UpstreamFailed("The gateway could not authenticate to its upstream.", code="upstream_auth_failed")
    return UpstreamFailed(f"The upstream failed: {error.message}")


def upstream_error_frame(error: UpstreamError) -> bytes:
    code = {"timeout": "upstream_timeout", "rate_limited": "upstream_rate_limited"}.get(error.kind, "upstream_error")
    return _sse.error_frame(message=f"The upstream failed mid-stream: {error.message}", type="api_error", code=code)


BUDGET_WARNING_HEADER = "x-budget-warning"
BUDGET_CAP_ERROR_KIND = "budget_cap"


@dataclass(slots=True)
class ChatCall:
    principal: Principal
    params: ChatParams
    route: ModelRoute
    prompt_tokens_estimate: int
    # Billing's admission: the rates this call is billed at and the budget held for it.
    admission: Admission
    # What the call took from the rate limits (given back, in part, when it ends).
    limits: ratelimits.Admission
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: Any = field(default_factory=timezone.now)
    relay: StreamRelay | None = None
    # Completion tokens after which the relay stops the call: set when budget was held for it and
    # the request gave no max_tokens (the hold then assumed GATEWAY_DEFAULT_MAX_TOKENS x n).
    completion_token_cap: int | None = None
    # The usage written to the ledger, in OpenAI's shape; set when the call is recorded.
    billed_usage: dict[str, int] | None = None
    # USD, exact, as written to the ledger; set when the call is recorded.
    cost: Decimal | None = None

    def response_headers(self) -> dict[str, str]:
        """Rate-limit headers as OpenAI sends them, and a soft-threshold budget warning if any."""
        headers = dict(self.limits.headers)
        if self.admission.warning:
            headers[BUDGET_WARNING_HEADER] = self.admission.warning
        return headers

    async def release(self) -> None:
        """Give back the budget and limits held for a call refused before its relay starts.

        Once the relay runs, the relay's finish hook settles both; calling this is then a no-op.
        """
        if self.relay is not None:
            return
        await ratelimits.release(self.limits, used_tokens=0)
        if self.admission.reserved_usd is not None:
            await abudget_release(request_id=self.request_id)

    def upstream_wait_seconds(self) -> float:
        """Time spent waiting on the upstream before the response could start."""
        if self.relay is None:
            return 0.0
        outcome = self.relay.outcome
        if not self.params.stream and outcome.finished_at:
            return outcome.finished_at - outcome.started_at
        if outcome.first_chunk_at is not None:
            return outcome.first_chunk_at - outcome.started_at
        return 0.0

    async def record(self, outcome: CallOutcome) -> None:
        """The relay's on_finish hook: append the ledger row, roll it up and settle the budget hold."""
        upstream = outcome.upstream_usage
        if upstream is not None:
            prompt, completion, cached, reasoning = (
                upstream.prompt_tokens,
                upstream.completion_tokens,
                upstream.cached_tokens,
                upstream.reasoning_tokens,
            )
            source = "upstream"
        else:
            completion = outcome.completion.tokens() if outcome.completion is not None else 0
            prompt, cached, reasoning, source = self.prompt_tokens_estimate, 0, 0, "estimated"
        cached = min(cached, prompt)
        self.billed_usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        ttft = outcome.ttft_seconds
        error_kind = ""
        if isinstance(outcome.error, CompletionCapReached):
            error_kind = BUDGET_CAP_ERROR_KIND
        elif outcome.error is not None:
            error_kind = outcome.error.kind
        record = await ausage_record_create(
            request_id=self.request_id,
            user_id=self.principal.user_id,
            api_key_id=self.principal.api_key_id,
            model=self.route.id,
            upstream_model=self.route.upstream_model,
            provider=self.route.provider,
            stream=self.params.stream,
            status=outcome.status,
            error_kind=error_kind,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
            token_source=source,
            ttft_us=None if ttft is None else int(ttft * 1_000_000),
            duration_us=int(outcome.duration_seconds * 1_000_000),
            created_at=self.created_at,
            rates=self.admission.rates,
            reserved_usd=self.admission.reserved_usd,
        )
        self.cost = record.cost_usd


def _timeouts() -> Timeouts:
    return Timeouts(
        first_token=settings.GATEWAY_FIRST_TOKEN_TIMEOUT,
        idle=settings.GATEWAY_IDLE_TIMEOUT,
        total=settings.GATEWAY_TOTAL_TIMEOUT,
        heartbeat=settings.GATEWAY_HEARTBEAT_INTERVAL,
    )


async def chat_call_prepare(*, principal: Principal, params: ChatParams) -> ChatCall:
    """Resolve, count and admit a call: price it and hold its worst-case cost against the budget.

    Raises (before any upstream call) `ConfigurationError` for an unpriced model and
    `InsufficientQuota` when the hold does not fit. A call refused after this must `release()`.
    """
    route = resolve_route(params.model)
    prompt_tokens = await acount_chat_prompt_tokens(
        params.body["messages"], model=route.upstream_model, tools=params.body.get("tools")
    )
    # Worst case: every choice runs to its limit; the gateway imposes one when the request has none.
    completion_tokens = (params.max_tokens or settings.GATEWAY_DEFAULT_MAX_TOKENS) * params.n
    request_id = uuid.uuid4()
    created_at = timezone.now()
    # Rate limits first: they are cheaper than the budget's row lock and hold nothing long.
    limits = await ratelimits.admit(principal=principal, estimated_tokens=prompt_tokens + completion_tokens)
    try:
        admission = await abudget_reserve(
            user_id=principal.user_id,
            model=route.id,
            upstream_model=route.upstream_model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            request_id=request_id,
            now=created_at,
        )
    except BaseException:
        await ratelimits.release(limits, used_tokens=0)
        raise
    return ChatCall(
        principal=principal,
        params=params,
        route=route,
        prompt_tokens_estimate=prompt_tokens,
        admission=admission,
        limits=limits,
        request_id=request_id,
        created_at=created_at,
        # A call held against a budget must not outrun its hold; with no max_tokens the upstream
        # would not stop at ours, so the relay does. Calls with nothing held run uncapped.
        completion_token_cap=completion_tokens if admission.reserved_usd is not None and not params.max_tokens else None,
    )


class RelayStreamingResponse(StreamingHttpResponse):
    """A streaming response that stops its relay even if the server never iterates it."""

    relay: StreamRelay

    def close(self) -> None:
        self.relay.cancel_threadsafe()
        super().close()


async def chat_call_respond(call: ChatCall, *, simulator_headers: dict[str, str]) -> HttpResponse:
    """Start the upstream call and return the response: SSE for streams, JSON otherwise.

    An upstream failure before the first chunk is returned as an HTTP error (so SDKs raise their
    typed exceptions and may retry); after it, as an SSE error event.
    """
    body = dict(call.params.body)
    request = ChatRequest(
        route=call.route,
        body=body,
        simulator=simulator_headers if call.route.is_simulated else {},
    )
    relay = StreamRelay(
        provider=get_provider(call.route.provider),
        request=request,
        queue_size=settings.GATEWAY_STREAM_QUEUE_SIZE,
        timeouts=_timeouts(),
        on_finish=lambda outcome: _finish(call, outcome),
        count_text=partial(count_text_tokens, model=call.route.upstream_model),
        completion_token_cap=call.completion_token_cap,
    )
    try:
        await ratelimits.await_upstream_capacity(route=call.route, estimated_tokens=call.limits.reserved_tokens)
    except BaseException:
        await call.release()
        raise
    call.relay = relay
    observability.ACTIVE_STREAMS.inc()
    relay.start()
    handed_over = False
    try:
        first = await relay.get()
        if isinstance(first, UpstreamError):
            if first.kind == "rate_limited":
                await ratelimits.note_upstream_rate_limited(route=call.route, retry_after=first.retry_after)
            raise upstream_error_to_api_error(first)
        if not call.params.stream:
            return await _collect_completion(call, relay, first)
        response = RelayStreamingResponse(
            _stream_body(call, relay, first),
            content_type="text/event-stream; charset=utf-8",
        )
        response.relay = relay
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        handed_over = True
        return response
    finally:
        if not handed_over:
            await relay.aclose()


async def _finish(call: ChatCall, outcome: CallOutcome) -> None:
    """The relay's on_finish hook: record the call, then count and log it (even if recording failed)."""
    try:
        await call.record(outcome)
    finally:
        observability.ACTIVE_STREAMS.dec()
        used_tokens = (call.billed_usage or {}).get("total_tokens", call.limits.reserved_tokens)
        await ratelimits.release(call.limits, used_tokens=used_tokens)
        _observe(call, outcome)


def _observe(call: ChatCall, outcome: CallOutcome) -> None:
    model = call.route.id
    usage = call.billed_usage or {}
    cost = call.cost
    observability.CALLS.labels(model, outcome.status).inc()
    if outcome.error is not None:
        observability.UPSTREAM_ERRORS.labels(outcome.error.kind).inc()
    if outcome.ttft_seconds is not None:
        observability.TTFT.labels(model).observe(outcome.ttft_seconds)
    observability.TOKENS.labels(model, "prompt").inc(usage.get("prompt_tokens", 0))
    observability.TOKENS.labels(model, "completion").inc(usage.get("completion_tokens", 0))
    if cost is not None:
        observability.COST.labels(model).inc(float(cost))  # Prometheus is float; the ledger is exact
    if call.relay is not None and call.relay.backpressure_waits:
        observability.BACKPRESSURE_WAITS.inc(call.relay.backpressure_waits)
    observability.log_call(
        {
            "request_id": str(call.request_id),
            "user": call.principal.username,
            "key_prefix": call.principal.key_prefix,
            "model": model,
            "provider": call.route.provider,
            "stream": call.params.stream,
            "status": outcome.status,
            "error_kind": outcome.error.kind if outcome.error else None,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "cost_usd": None if cost is None else str(cost),
            "ttft_ms": None if outcome.ttft_seconds is None else round(outcome.ttft_seconds * 1000, 3),
            "duration_ms": round(outcome.duration_seconds * 1000, 3),
        }
    )


def _stream_body(call: ChatCall, relay: StreamRelay, first: QueueItem) -> AsyncIterator[bytes]:
    return sse_stream(
        relay,
        first,
        include_usage=call.params.include_usage,
        heartbeat=settings.GATEWAY_HEARTBEAT_INTERVAL,
        on_error=upstream_error_frame,
    )


async def _collect_completion(call: ChatCall, relay: StreamRelay, first: QueueItem) -> HttpResponse:
    builder = CompletionBuilder()
    item = first
    while item is not END:
        if isinstance(item, UpstreamError):
            raise upstream_error_to_api_error(item)
        assert isinstance(item, ProviderChunk)
        builder.add(item.data)
        item = await relay.get()
    await relay.aclose()  # wait for the ledger row, so the usage returned is what was billed
    completion = builder.build(usage=call.billed_usage or {})
    return HttpResponse(orjson.dumps(completion), content_type="application/json")
