"""One API call's life (any endpoint: `streaming.endpoints`), owned in one place.

    async with ApiCall(principal=..., params=..., request_id=..., simulator=...) as call:
        first = await call.start()                 # UpstreamRefused: failed before any token
        if call.params.stream:
            return SSE(call.stream_frames(first))  # the stream now owns the call's end
        return JSON(await call.complete(first))

Entering admits the call: its route and prompt tokens, the rate limits and the concurrency lease,
the budget hold. Every acquisition runs to its end even if the request is cancelled meanwhile (a
hang-up during admission), and pushes its own give-back on one `AsyncExitStack`. `start()` makes
the upstream attempts (retries, other deployments, fallback models: see its docstring), each
after room in its deployment's shared bucket; every attempt that reached an upstream is a ledger
row, linked to the call by `call_id`, and only the last one's `request_id` is the call's. `finish()` is the single exit: it stops the upstream call, writes the
ledger row (or, if the database does not take it within `GATEWAY_LEDGER_WRITE_TIMEOUT`, puts it
durably in the outbox, `billing.outbox`), gives back the budget hold when no row settled it, and
refunds the limits. It is shielded from cancellation, idempotent, and runs exactly once,
whoever calls it first: the context manager's exit, the stream's last frame or its `finally`,
or the response's `close()` when a server never iterates the body.

Billing policy: a call is billed for what it produced, from the upstream's usage or counted
offline; an upstream failure before any token costs nothing (its row records the error); every
call is stopped at the completion tokens it reserved (its endpoint's `completion_token_cap`:
max_tokens x n, or GATEWAY_DEFAULT_MAX_TOKENS x n), whatever the upstream does with max_tokens.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from types import TracebackType
from typing import Any, Self

from django.conf import settings
from django.utils import timezone

from billing.exceptions import PriceMissing, QuotaExceeded
from billing.ledger_writer import get_ledger_writer
from billing.outbox import LedgerOutbox, Row, get_outbox
from billing.services import Admission, abudget_release, abudget_reserve
from calls import limits as call_limits
from calls import stored as stored_responses
from calls.control import active_calls
from calls.exceptions import (
    CallError,
    LedgerUnavailable,
    LimitExceeded,
    ModelUnavailable,
    UpstreamRefused,
)
from calls.live import live_reporter
from calls.principal import Principal
from infra import observability
from limits import Permit
from streaming.catalog import Catalog, Deployment, ModelRoute, ProviderSpec
from streaming.endpoints import ENDPOINTS
from streaming.pipeline import (
    END,
    CallOutcome,
    CallStopped,
    CompletionCapReached,
    QueueItem,
    StreamRelay,
    Timeouts,
    sse_stream,
)
from streaming.providers import ProviderChunk, ProviderRequest, UpstreamError, get_provider
from streaming.tokens import count_text_tokens
from streaming.validation import CallParams
from upstreams.catalog import acatalog
from upstreams.health import health
from upstreams.routing import attempt_order, call_ended, call_started

logger = logging.getLogger(__name__)

MODEL_NOT_FOUND = "The model `{model}` does not exist or you do not have access to it."
MODEL_NOT_CONFIGURED = "The model `{model}` is not available: its provider `{provider}` is not configured on this gateway."
LEDGER_UNAVAILABLE = "The gateway cannot record calls right now (its ledger journal is not writable). Try again shortly."
BUDGET_WARNING_HEADER = "x-budget-warning"
MODEL_HEADER = "x-gateway-model"
DEPLOYMENT_HEADER = "x-gateway-deployment"
ATTEMPTS_HEADER = "x-gateway-attempts"
DEPLOYMENTS_DOWN = "Every upstream deployment of `{model}` is failing; the gateway is letting them recover. Try again shortly."
# Failures another attempt may not meet; after "auth" (the deployment's credentials are wrong)
# only other deployments are tried.
RETRYABLE = frozenset({"rate_limited", "server_error", "connection", "timeout", "auth"})
# Failures that count against a deployment's health. Not a refused request, and not a 429: that
# says "slower", and the learned limits slow down; a breaker would stop the deployment instead.
DEPLOYMENT_FAULTS = frozenset({"server_error", "connection", "timeout", "auth"})
BUDGET_CAP_ERROR_KIND = "budget_cap"


def resolve_route(catalog: Catalog, model: str) -> ModelRoute:
    route = catalog.route_for(model)
    if route is not None:
        return route
    known = catalog.routes.get(model)
    if known is not None:
        raise ModelUnavailable(MODEL_NOT_CONFIGURED.format(model=model, provider=known.provider))
    raise ModelUnavailable(MODEL_NOT_FOUND.format(model=model))


def _backoff(retry: int) -> float:
    """Seconds before retrying the same deployment: exponential, with full jitter."""
    return random.uniform(0, min(settings.UPSTREAM_BACKOFF_MAX, settings.UPSTREAM_BACKOFF_BASE * 2**retry))


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """The error event that ends a stream whose upstream failed mid-way."""

    message: str
    type: str
    code: str


def upstream_failure(error: UpstreamError) -> UpstreamFailure:
    code = {"timeout": "upstream_timeout", "rate_limited": "upstream_rate_limited"}.get(error.kind, "upstream_error")
    return UpstreamFailure(message=f"The upstream failed mid-stream: {error.message}", type="api_error", code=code)


def _outbox() -> LedgerOutbox:
    outbox = get_outbox()
    outbox.on_depth = observability.OUTBOX_DEPTH.set
    return outbox


def _timeouts(provider: ProviderSpec) -> Timeouts:
    """The gateway's timeouts, the provider's `read_timeout` (how long it may be silent) tightening
    the first-token and idle ones."""
    silence = provider.read_timeout or float("inf")
    return Timeouts(
        first_token=min(settings.GATEWAY_FIRST_TOKEN_TIMEOUT, silence),
        idle=min(settings.GATEWAY_IDLE_TIMEOUT, silence),
        total=settings.GATEWAY_TOTAL_TIMEOUT,
        heartbeat=settings.GATEWAY_HEARTBEAT_INTERVAL,
    )


class ApiCall:
    """One call: admitted on entry, ended once by `finish()` (see the module docstring)."""

    def __init__(self, *, principal: Principal, params: CallParams, request_id: uuid.UUID, simulator: dict[str, str]) -> None:
        self.principal = principal
        self.params = params
        self.endpoint = ENDPOINTS[params.endpoint]
        self.request_id = request_id
        self.simulator = simulator
        self.created_at = timezone.now()
        self.route: ModelRoute | None = None  # the model asked for
        self.serving: ModelRoute | None = None  # the model of the current attempt (it or a fallback)
        self.deployment: Deployment | None = None  # the current attempt's
        self.attempt = 0  # attempts that reached an upstream so far
        self._catalog: Catalog | None = None
        self._upstream_headers: dict[str, str] = {}
        self._first_attempt_at: float | None = None  # time.perf_counter(), as the relays' outcomes
        self._attempt_closed = False  # the current attempt's upstream call was stopped
        self._attempt_recorded = False  # the current attempt's row was written as a retried one
        self.limits: call_limits.Admission | None = None
        self.admission: Admission | None = None
        self.relay: StreamRelay | None = None
        self.prompt_tokens_estimate = 0
        self.completion_token_cap = 0
        # Set once the call is recorded: the usage billed, in OpenAI's shape, and its exact cost.
        self.billed_usage: dict[str, int] | None = None
        self.cost: Decimal | None = None
        self._exit = AsyncExitStack()
        self._recorded = False
        self._streaming = False
        self._finishing: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- admission ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._admit()
        except BaseException:
            await self.finish()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if not self._streaming or error is not None:
            await self.finish()

    async def _admit(self) -> None:
        self._loop = asyncio.get_running_loop()
        params = self.params
        catalog = self._catalog = await acatalog()
        route = self.route = self.serving = resolve_route(catalog, params.model)
        self.prompt_tokens_estimate = await self.endpoint.count_prompt_tokens(params.body, model=route.upstream_model)
        previous = self.endpoint.continued_response(params.body)
        if previous is not None:
            # Only the caller's own response may be continued; the upstream reads its whole
            # context again, so that is part of this call's prompt.
            origin = await stored_responses.origin_of(principal=self.principal, response_id=previous)
            self.prompt_tokens_estimate += origin.context_tokens
        # Worst case: every choice runs to its limit; the gateway imposes one when the request has none.
        completion_tokens = self.completion_token_cap = self.endpoint.completion_token_cap(
            params.body,
            max_tokens=params.max_tokens or settings.GATEWAY_DEFAULT_MAX_TOKENS,
            n=params.n,
            prompt_tokens=self.prompt_tokens_estimate,
        )
        # Rate limits first: they are cheaper than the budget's row lock and hold nothing long.
        self.limits = await self._acquire(
            call_limits.admit(principal=self.principal, estimated_tokens=self.prompt_tokens_estimate + completion_tokens),
            self._give_back_limits,
        )
        self.admission = await self._acquire(
            abudget_reserve(
                user_id=self.principal.user_id,
                model=route.id,
                upstream_model=route.upstream_model,
                prompt_tokens=self.prompt_tokens_estimate,
                completion_tokens=completion_tokens,
                request_id=self.request_id,
                now=self.created_at,
            ),
            self._give_back_hold,
        )

    async def _acquire[T](self, acquisition: Coroutine[Any, Any, T], give_back: Callable[[T], Awaitable[None]]) -> T:
        """Run one acquisition to its end even if cancelled; its give-back runs in `finish()`."""
        task = asyncio.ensure_future(acquisition)

        async def undo() -> None:
            try:
                taken = await task
            except BaseException:
                return  # nothing was taken
            await give_back(taken)

        self._exit.push_async_callback(_logged(undo, "giving back what a call took"))
        return await asyncio.shield(task)

    async def _give_back_limits(self, limits: call_limits.Admission) -> None:
        if self.billed_usage is not None:
            used = self.billed_usage["total_tokens"]
        else:  # refused before its upstream call: nothing used; else unknown, so all of it
            used = limits.reserved_tokens if self.relay is not None else 0
        await call_limits.release(limits, used_tokens=used)

    async def _give_back_hold(self, admission: Admission) -> None:
        if admission.reserved_usd is not None and not self._recorded:
            async with asyncio.timeout(settings.GATEWAY_LEDGER_WRITE_TIMEOUT):
                await abudget_release(request_id=self.request_id)

    def response_headers(self) -> dict[str, str]:
        """Rate-limit headers as OpenAI sends them, a soft-threshold budget warning if any, and
        (once the upstream was called) which model and deployment answered, after how many attempts."""
        headers = dict(self.limits.headers) if self.limits is not None else {}
        if self.admission is not None and self.admission.warning:
            headers[BUDGET_WARNING_HEADER] = self.admission.warning
        if self.deployment is not None and self.serving is not None:
            headers[MODEL_HEADER] = self.serving.id
            headers[DEPLOYMENT_HEADER] = self.deployment.name
            headers[ATTEMPTS_HEADER] = str(self.attempt)
        return headers

    # -- the upstream call --------------------------------------------------------------------

    async def start(self) -> QueueItem:
        """Call the upstream; return its first chunk (or END). Raise `UpstreamRefused` if every
        attempt failed before any token.

        Retries happen here, before anything reaches the client: on a 429, a 5xx, a failed
        connection or a first-token timeout, the next deployment of the model is tried at once,
        or the same one after a backoff (its retry-after when it gave one), while the call is
        within UPSTREAM_RETRY_DEADLINE and UPSTREAM_MAX_ATTEMPTS per model; then the model's
        fallbacks, in order. Every attempt that reached an upstream is a ledger row; the ones
        before the last cost nothing.
        """
        assert self.route is not None and self._loop is not None
        deadline = self._loop.time() + settings.UPSTREAM_RETRY_DEADLINE
        refused: CallError | None = None  # why no attempt could start (capacity, breakers)
        for route in self._models_to_try():
            if route is not self.serving and not await self._switch_model(route):
                continue
            tries = 0
            retries: dict[str, int] = {}
            order = attempt_order(route)
            allowed = max(settings.UPSTREAM_MAX_ATTEMPTS, len(order))  # each deployment once, at least
            while order and tries < allowed:
                deployment = order[tries % len(order)]
                tries += 1
                permit = health.allow(deployment.name)
                if permit is None:
                    refused = refused or UpstreamRefused(UpstreamError("server_error", DEPLOYMENTS_DOWN.format(model=route.id)))
                    continue
                try:
                    await call_limits.await_upstream_capacity(
                        deployment=deployment,
                        model=route.id,
                        estimated_tokens=self._reserved_tokens(),
                        max_wait=min(settings.UPSTREAM_MAX_WAIT, deadline - self._loop.time()),
                    )
                    first = await self._attempt(deployment)
                except BaseException as error:  # no verdict on the deployment: its permit goes back
                    health.release(deployment.name, permit)
                    if not isinstance(error, LimitExceeded):
                        raise
                    # No room in its bucket within the wait: it is full for this call; the next one.
                    refused = error
                    order = [other for other in order if other is not deployment]
                    tries -= 1
                    continue
                self._judge(deployment, permit, first)
                await self._learn(deployment, first)
                if not isinstance(first, UpstreamError) or isinstance(first, CompletionCapReached):
                    return first
                if first.kind not in RETRYABLE:
                    raise UpstreamRefused(first)
                if first.kind == "auth":  # its credentials are wrong: no use trying it again
                    order = [other for other in order if other is not deployment]
                if not order or tries >= allowed:
                    break  # on to the fallbacks, without waiting
                # Another deployment goes at once; the same one again after a backoff.
                wait = 0.0
                if order[tries % len(order)] is deployment or tries >= len(order):
                    retry = retries[deployment.name] = retries.get(deployment.name, 0) + 1
                    wait = max(first.retry_after or 0.0, _backoff(retry))
                if self._loop.time() + wait >= deadline:
                    break
                if wait:
                    await asyncio.sleep(wait)
            if self._loop.time() >= deadline:
                break
        if self.relay is not None:  # the last attempt's error is the call's
            last = self.relay.outcome.error
            assert last is not None
            raise UpstreamRefused(last)
        raise refused or UpstreamRefused(UpstreamError("server_error", DEPLOYMENTS_DOWN.format(model=self.route.id)))

    def _models_to_try(self) -> list[ModelRoute]:
        """The model asked for, then its fallbacks that this gateway serves."""
        assert self.route is not None and self._catalog is not None
        routes = [self.route]
        for name in self.route.fallbacks:
            fallback = self._catalog.route_for(name)
            if fallback is not None and fallback not in routes:
                routes.append(fallback)
        return routes

    def _reserved_tokens(self) -> int:
        assert self.limits is not None
        return self.limits.reserved_tokens

    async def _switch_model(self, route: ModelRoute) -> bool:
        """Fall back to `route`: hold the budget at its price instead. False if the budget or
        its price refuses it (the call then ends with the last upstream error)."""
        admission = self.admission
        assert admission is not None
        # The last attempt on the model before: its row is written as the model it tried, once the
        # switch is made (if the switch fails, that attempt stays the call's last).
        failed = await self._retire_attempt() if self.relay is not None and not self._attempt_recorded else None
        try:
            if admission.reserved_usd is not None:
                await abudget_release(request_id=self.request_id)
            self.admission = await abudget_reserve(
                user_id=self.principal.user_id,
                model=route.id,
                upstream_model=route.upstream_model,
                prompt_tokens=self.prompt_tokens_estimate,
                completion_tokens=self.completion_token_cap,
                request_id=self.request_id,
                now=self.created_at,
            )
        except (QuotaExceeded, PriceMissing) as error:
            logger.info("call %s cannot fall back to %s: %s", self.request_id, route.id, error)
            return False
        self.serving = route
        if failed is not None:
            await self._write_row(failed)
            self._attempt_recorded = True
        return True

    async def _attempt(self, deployment: Deployment) -> QueueItem:
        """One attempt on one deployment: its first item (a chunk, END, or its failure)."""
        if self.relay is not None and not self._attempt_recorded:
            await self._write_row(await self._retire_attempt())
        self._attempt_recorded = self._attempt_closed = False
        self.attempt += 1
        self.deployment = deployment
        self._upstream_headers = {}
        relay = self.relay = StreamRelay(
            provider=get_provider(deployment.provider),
            request=ProviderRequest(
                deployment=deployment,
                endpoint=self.endpoint,
                body=dict(self.params.body),
                simulator=self.simulator if deployment.provider.kind == "simulator" else {},
                request_id=str(self.request_id),
                attempt=self.attempt,
                on_response_headers=self._upstream_headers.update,
            ),
            queue_size=settings.GATEWAY_STREAM_QUEUE_SIZE,
            timeouts=_timeouts(deployment.provider),
            count_text=partial(count_text_tokens, model=deployment.upstream_model),
            completion_token_cap=self.completion_token_cap,
        )
        try:
            _outbox().call_opened(self._row_opened(), progress=lambda: relay.outcome.content_chunks)
        except OSError as error:  # a call that could not be journaled might never be billed
            logger.error("journaling call %s failed (%s); refusing it", self.request_id, error)
            raise LedgerUnavailable(LEDGER_UNAVAILABLE) from error
        if self.attempt == 1:
            self._exit.push_async_callback(_logged(self._end_upstream, "recording a call"))
            observability.ACTIVE_STREAMS.inc()
            active_calls.add(self)
        call_started(deployment)
        relay.start()
        if self._first_attempt_at is None:
            self._first_attempt_at = relay.outcome.started_at
        return await relay.get()

    def _judge(self, deployment: Deployment, permit: Permit, first: QueueItem) -> None:
        """Tell the deployment's breaker (and the metrics) how its attempt went."""
        if isinstance(first, UpstreamError) and not isinstance(first, CompletionCapReached):
            observability.UPSTREAM_ATTEMPTS.labels(deployment.name, first.kind).inc()
            # The simulator fails only when a request asks it to: that says nothing of its health.
            if first.kind in DEPLOYMENT_FAULTS and deployment.provider.kind != "simulator":
                health.failed(deployment.name, permit)
            else:
                health.release(deployment.name, permit)
            return
        observability.UPSTREAM_ATTEMPTS.labels(deployment.name, "answered").inc()
        health.succeeded(deployment.name, permit)
        if self.serving is not self.route and self.route is not None and self.serving is not None:
            observability.UPSTREAM_FALLBACKS.labels(self.route.id, self.serving.id).inc()

    async def _learn(self, deployment: Deployment, first: QueueItem) -> None:
        """Take in what the upstream's answer says of its limits (`upstreams.learned`)."""
        if isinstance(first, UpstreamError) and not isinstance(first, CompletionCapReached):
            if first.kind == "rate_limited":
                await call_limits.note_upstream_rate_limited(
                    deployment=deployment, retry_after=first.retry_after, headers=first.headers, limit_type=first.limit_type
                )
            elif first.headers:
                await call_limits.note_upstream_answer(deployment=deployment, headers=first.headers)
        elif self._upstream_headers:
            await call_limits.note_upstream_answer(deployment=deployment, headers=self._upstream_headers)

    async def _close_attempt(self) -> None:
        """Stop the current attempt's upstream call, once."""
        relay, deployment = self.relay, self.deployment
        assert relay is not None and deployment is not None
        if self._attempt_closed:
            return
        self._attempt_closed = True
        try:
            await relay.aclose()
        finally:
            call_ended(deployment)

    async def _retire_attempt(self) -> Row:
        """The row of an attempt that failed and will be retried: an id of its own, linked to the
        call, and no hold to settle (the call's last attempt settles it)."""
        assert self.relay is not None
        await self._close_attempt()
        row = self._row_finished(self.relay.outcome)
        row["request_id"] = uuid.uuid4()
        row["reserved_usd"] = None
        self.billed_usage = None
        return row

    def stream_frames(self, first: QueueItem) -> AsyncGenerator[bytes]:
        """The SSE body; from now on the stream ends the call (and `close()` as a backstop)."""
        assert self.relay is not None
        self._streaming = True
        return sse_stream(
            self.relay,
            first,
            framer=self.endpoint.framer(include_usage=self.params.include_usage),
            finish=self.finish,
            heartbeat=settings.GATEWAY_HEARTBEAT_INTERVAL,
            on_error=upstream_failure,
            billed_usage=lambda: self.billed_usage,
        )

    async def complete(self, first: QueueItem) -> dict[str, Any]:
        """The non-stream body: the chunks folded into the endpoint's answer, once recorded."""
        assert self.relay is not None
        builder = self.endpoint.aggregator()
        item = first
        while item is not END:
            if isinstance(item, UpstreamError):
                raise UpstreamRefused(item)
            assert isinstance(item, ProviderChunk)
            builder.add(item.data)
            item = await self.relay.get()
        await self.finish()  # the usage returned is what was billed
        billed = self.billed_usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return builder.build(usage=self.endpoint.usage_object(billed))

    def client_gone(self) -> None:
        """The client hung up: stop the upstream at once; `finish()` (which follows) records it."""
        if self.relay is not None:
            self.relay.abort()

    def stop(self, reason: str, message: str) -> None:
        """End a running call now (staff stopped it, its key was revoked, ...): a stream ends with
        an error event whose code is `reason`, and the ledger row's `error_kind` is `reason`."""
        if self.relay is not None:
            self.relay.stop(CallStopped(reason, message))

    def upstream_wait_seconds(self) -> float:
        """Time spent waiting on the upstream before the response could start: from the first
        attempt's start (retries and their backoff are the upstream's time, not the gateway's)."""
        if self.relay is None or self._first_attempt_at is None:
            return 0.0
        outcome = self.relay.outcome
        if not self.params.stream and outcome.finished_at:
            return outcome.finished_at - self._first_attempt_at
        if outcome.first_chunk_at is not None:
            return outcome.first_chunk_at - self._first_attempt_at
        return outcome.started_at - self._first_attempt_at

    # -- the one exit -------------------------------------------------------------------------

    async def finish(self) -> None:
        """End the call once: stop the upstream, record it, give back what it took. Shielded."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._exit.aclose())
        task = self._finishing
        cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def finish_threadsafe(self) -> None:
        """Backstop for a response whose body was never iterated: end the call from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._finishing is not None:
            return

        def begin() -> None:
            if self._finishing is None:
                self._finishing = asyncio.ensure_future(self._exit.aclose())

        loop.call_soon_threadsafe(begin)

    async def _end_upstream(self) -> None:
        relay = self.relay
        assert relay is not None
        active_calls.remove(self)
        try:
            await self._close_attempt()
        except Exception:  # its outcome is final all the same: record it
            logger.exception("closing the upstream call of %s failed", self.request_id)
        finally:
            observability.ACTIVE_STREAMS.dec()
        if self._attempt_recorded:  # it fell back, then found no deployment to try: nothing left to write
            return
        outcome = relay.outcome
        row = self._row_finished(outcome)
        self.cost = await self._write_row(row)
        self._recorded = True
        live_reporter.call_recorded()
        self._observe(outcome)

    async def _write_row(self, row: Row) -> Decimal:
        """Write a ledger row, or keep it durably in the outbox if the database does not take it
        within GATEWAY_LEDGER_WRITE_TIMEOUT. Returns its cost."""
        outbox = _outbox()
        # The row joins the process's next ledger batch (`billing.ledger_writer`). At the
        # deadline a row no batch has taken yet is taken back; one being written cannot be (a
        # batch in flight is never cancelled): it is left to finish (the outbox owns it). Either
        # way the row is deferred; the outbox's write is idempotent.
        writer = get_ledger_writer()
        write = writer.submit(row)
        done, _ = await asyncio.wait({write}, timeout=settings.GATEWAY_LEDGER_WRITE_TIMEOUT)
        error = write.exception() if done else TimeoutError("the ledger write deadline passed")
        if error is not None:
            if not done and not writer.withdraw(write):
                outbox.adopt(write)
            logger.warning("ledger write for %s failed (%s: %s); kept in the outbox", row["request_id"], type(error).__name__, error)
            await outbox.defer(row)
            observability.OUTBOX_DEFERRED.inc()
            cost: Decimal = row["rates"].cost(
                prompt_tokens=row["prompt_tokens"], cached_tokens=row["cached_tokens"], completion_tokens=row["completion_tokens"]
            )
            return cost
        outbox.call_recorded(row["request_id"])
        return write.result()

    def _row_opened(self) -> Row:
        """What the ledger row holds before the call's usage is known (journaled at its start)."""
        route, serving, deployment, admission = self.route, self.serving, self.deployment, self.admission
        assert route is not None and serving is not None and deployment is not None and admission is not None
        return {
            "request_id": self.request_id,
            "call_id": self.request_id,
            "attempt": self.attempt,
            "endpoint": self.endpoint.name,
            "user_id": self.principal.user_id,
            "api_key_id": self.principal.api_key_id,
            "model": serving.id,
            "requested_model": route.id if serving is not route else "",
            "upstream_model": deployment.upstream_model,
            "provider": deployment.provider.name,
            "stream": self.params.stream,
            "created_at": self.created_at,
            "rates": admission.rates,
            "reserved_usd": admission.reserved_usd,
            "prompt_tokens_estimate": self.prompt_tokens_estimate,
        }

    def _row_finished(self, outcome: CallOutcome) -> Row:
        row = self._row_opened()
        del row["prompt_tokens_estimate"]
        upstream = outcome.upstream_usage
        error = outcome.error
        if upstream is not None:
            prompt, completion = upstream.prompt_tokens, upstream.completion_tokens
            cached, reasoning, source = upstream.cached_tokens, upstream.reasoning_tokens, "upstream"
        elif error is not None and outcome.first_chunk_at is None:
            prompt = completion = cached = reasoning = 0  # failed before any token: costs nothing
            source = "estimated"
        else:
            completion = outcome.completion.tokens() if outcome.completion is not None else 0
            prompt, cached, reasoning, source = self.prompt_tokens_estimate, 0, 0, "estimated"
        if isinstance(error, CompletionCapReached) or upstream is None:
            completion = min(completion, self.completion_token_cap)  # never past what was reserved
        cached = min(cached, prompt)
        self.billed_usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        ttft = outcome.ttft_seconds
        row.update(
            status=outcome.status,
            error_kind=_error_kind(error),
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
            token_source=source,
            upstream_id=outcome.upstream_id[:100],
            ttft_us=None if ttft is None else int(ttft * 1_000_000),
            duration_us=int(outcome.duration_seconds * 1_000_000),
        )
        return row

    def _observe(self, outcome: CallOutcome) -> None:
        assert self.serving is not None and self.deployment is not None
        model = self.serving.id
        usage = self.billed_usage or {}
        cost = self.cost
        observability.CALLS.labels(model, outcome.status).inc()
        if outcome.error is not None:
            observability.UPSTREAM_ERRORS.labels(outcome.error.kind).inc()
        if outcome.ttft_seconds is not None:
            observability.TTFT.labels(model).observe(outcome.ttft_seconds)
        observability.TOKENS.labels(model, "prompt").inc(usage.get("prompt_tokens", 0))
        observability.TOKENS.labels(model, "completion").inc(usage.get("completion_tokens", 0))
        if cost is not None:
            observability.COST.labels(model).inc(float(cost))  # Prometheus is float; the ledger is exact
        if self.relay is not None and self.relay.backpressure_waits:
            observability.BACKPRESSURE_WAITS.inc(self.relay.backpressure_waits)
        if not observability.call_log_enabled():
            return
        observability.log_call(
            {
                "request_id": str(self.request_id),
                "user": self.principal.username,
                "key_prefix": self.principal.key_prefix,
                "model": model,
                "provider": self.deployment.provider.name,
                "deployment": self.deployment.name,
                "attempts": self.attempt,
                "endpoint": self.endpoint.name,
                "stream": self.params.stream,
                "status": outcome.status,
                "error_kind": outcome.error.kind if outcome.error else None,
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "cost_usd": None if cost is None else str(cost),
                "ttft_ms": None if outcome.ttft_seconds is None else round(outcome.ttft_seconds * 1000, 3),
                "duration_ms": round(outcome.duration_seconds * 1000, 3),
            }
        )


def _error_kind(error: UpstreamError | None) -> str:
    if isinstance(error, CompletionCapReached):
        return BUDGET_CAP_ERROR_KIND
    if isinstance(error, CallStopped):
        return error.reason
    return error.kind if error is not None else ""


def _logged(step: Callable[[], Awaitable[None]], what: str) -> Callable[[], Awaitable[None]]:
    """A step of `finish()` that logs its own failure, so the steps after it still run."""

    async def run() -> None:
        try:
            await step()
        except Exception:
            logger.exception("%s failed", what)

    return run
