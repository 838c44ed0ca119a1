"""Which limits gate a call, and why a call is refused (`calls.exceptions`).

Per call, before the upstream is contacted:
- per API key and per user: requests per minute, tokens per minute and a concurrent-stream
  lease per key, checked together in one all-or-nothing decision (one Lua script; the user id
  is the hash tag): a call refused for any of them takes nothing from the others. A key's own
  limits win, else the global defaults.
  Tokens per minute reserve prompt tokens + max_tokens (or GATEWAY_DEFAULT_MAX_TOKENS) and the
  unused part is refunded when the call ends, with its stream lease, in one give-back (one
  script). Scripts of concurrent calls share round trips (`limits.redis_backend`).
- the web chat page's calls (a session, no key) instead of a key's limits: the user's chat-page
  requests per minute, tokens per minute and concurrent streams (LIMITS_CHAT_USER_RPM,
  LIMITS_CHAT_USER_TPM, LIMITS_CHAT_USER_MAX_CONCURRENT), on by default, so one person at the
  page cannot flood the upstream; and the per-user limits above, which count the page and the
  user's keys together.
- per deployment, before each attempt: a shared bucket refilled at the deployment's limit as
  learned from the upstream (`upstreams.learned`: the published figure less UPSTREAM_LIMIT_HEADROOM
  to start with, then its headers and its 429s), its burst the headroom's share, so that at the
  start no 60-second window sends more than the published figure. Here a request *waits* (up to
  UPSTREAM_MAX_WAIT) instead of being refused, so bursts are smoothed instead of turned into
  upstream 429s. An upstream 429 blocks the bucket for its retry-after, and an answer saying
  nothing remains blocks it until its reset, for every process.

Failure policy: with REDIS_URL the limiter is Redis behind a circuit breaker; when Redis is slow
or gone (LIMITS_REDIS_TIMEOUT, 2 s by default: never a hang) decisions fall back to the in-process limiter
(LIMITS_FAIL_OPEN=true, the default; logged and counted in `llmgateway_redis_fallbacks_total`)
or the call is refused with `LimiterDown` (LIMITS_FAIL_OPEN=false; the API answers 503). Without REDIS_URL limits are
in-process: exact for one worker, per worker with several.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import cast

from django.conf import settings

from calls.exceptions import LimiterDown, LimitExceeded
from calls.principal import Principal
from infra import observability
from limits import (
    CircuitBreaker,
    Decision,
    InProcessLimiter,
    Limiter,
    LimiterUnavailable,
    LimitKind,
    LimitSpec,
    LimitState,
    RedisLimiter,
    ResilientLimiter,
    acquire_waiting,
    lease_spec,
)
from streaming.catalog import Deployment
from streaming.providers.openai import parse_duration
from upstreams.learned import Unit, learned_limits

MINUTE = 60.0
REQUESTS_EXCEEDED = "Rate limit reached for requests on {scope}: limit {limit} per minute. Try again in {retry}."
TOKENS_EXCEEDED = "Rate limit reached for tokens on {scope}: limit {limit} per minute, requested {requested}. Try again in {retry}."
TOKENS_TOO_LARGE = "Request too large for {scope}: tokens per minute limit {limit}, requested {requested}. Lower max_tokens or the prompt."
CONCURRENCY_EXCEEDED = "Too many concurrent requests on {scope}: limit {limit}. Try again when a stream ends."
UPSTREAM_BUSY = "The upstream for model `{model}` is at capacity. Try again in {retry}."
LIMITER_DOWN = "Rate limiting is unavailable and this gateway is configured to fail closed."

UNLIMITED = Decision(allowed=True, retry_after=0.0, states=())

_limiter: Limiter | None = None


def get_limiter() -> Limiter:
    """The process's limiter: Redis (resilient) when REDIS_URL is set, else in-process; a Redis
    Cluster client when REDIS_CLUSTER is set too (the limiter's keys share a hash tag per call)."""
    global _limiter
    if _limiter is None:
        if settings.REDIS_URL:
            _limiter = ResilientLimiter(
                RedisLimiter.from_url(
                    settings.REDIS_URL,
                    prefix=settings.LIMITS_REDIS_PREFIX,
                    timeout=settings.LIMITS_REDIS_TIMEOUT,
                    cluster=settings.REDIS_CLUSTER,
                ),
                InProcessLimiter(),
                fail_open=settings.LIMITS_FAIL_OPEN,
                breaker=CircuitBreaker(failure_threshold=5, reset_timeout=settings.LIMITS_BREAKER_RESET),
                on_fallback=lambda operation, reason: observability.REDIS_FALLBACKS.inc(),
            )
        else:
            _limiter = InProcessLimiter()
    return _limiter


async def aclose_limiter() -> None:
    global _limiter
    if _limiter is not None:
        limiter, _limiter = _limiter, None
        await limiter.aclose()


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    seconds = math.ceil(seconds)
    minutes, rest = divmod(seconds, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def _retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


@dataclass(slots=True)
class Admission:
    """What a call took from the limits; given back by `release`."""

    group: str
    decision: Decision
    tpm_specs: list[LimitSpec]
    reserved_tokens: int
    lease: tuple[str, str] | None = None  # (key, lease id)
    headers: dict[str, str] = field(default_factory=dict)
    released: bool = False


def _scope_specs(principal: Principal, tokens: int) -> tuple[list[LimitSpec], list[LimitSpec]]:
    rpm_kind = cast(LimitKind, settings.LIMITS_RPM_ALGORITHM)  # LimitSpec refuses any other value
    request_specs, token_specs = [], []
    scopes = []
    if principal.api_key_id is not None:
        scopes.append(
            (
                f"key:{principal.api_key_id}",
                principal.rpm_limit or settings.LIMITS_KEY_RPM,
                principal.tpm_limit or settings.LIMITS_KEY_TPM,
            )
        )
    else:
        scopes.append((f"chat:{principal.user_id}", settings.LIMITS_CHAT_USER_RPM, settings.LIMITS_CHAT_USER_TPM))
    scopes.append((f"user:{principal.user_id}", settings.LIMITS_USER_RPM, settings.LIMITS_USER_TPM))
    for scope, rpm, tpm in scopes:
        if rpm:
            request_specs.append(LimitSpec(key=f"{scope}:rpm", kind=rpm_kind, limit=rpm, period_seconds=MINUTE))
        if tpm:
            token_specs.append(LimitSpec(key=f"{scope}:tpm", kind="token_bucket", limit=tpm, period_seconds=MINUTE, cost=tokens))
    return request_specs, token_specs


def _headers(decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    for suffix, states in (
        ("requests", [s for s in decision.states if s.spec.key.endswith(":rpm")]),
        ("tokens", [s for s in decision.states if s.spec.key.endswith(":tpm")]),
    ):
        if not states:
            continue
        tightest: LimitState = min(states, key=lambda state: (state.remaining, -state.reset_seconds))
        headers[f"x-ratelimit-limit-{suffix}"] = str(tightest.spec.limit)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, tightest.remaining))
        headers[f"x-ratelimit-reset-{suffix}"] = format_duration(tightest.reset_seconds)
    return headers


def _scope_name(spec: LimitSpec) -> str:
    if spec.key.startswith("key:"):
        return "this API key"
    return "the chat page" if spec.key.startswith("chat:") else "this user"


def _stream_lease(principal: Principal) -> tuple[str, int, str]:
    """The concurrent-streams lease a call takes: its key and limit (0: none), and whose it is."""
    if principal.api_key_id is not None:
        limit = principal.max_concurrent or settings.LIMITS_KEY_MAX_CONCURRENT
        return f"key:{principal.api_key_id}:streams", limit, "this API key"
    return f"chat:{principal.user_id}:streams", settings.LIMITS_CHAT_USER_MAX_CONCURRENT, "the chat page"


async def admit(*, principal: Principal, estimated_tokens: int) -> Admission:
    """Charge the key's and user's limits and take a stream slot for one call, all or none, in one
    decision; or raise LimitExceeded / LimiterDown."""
    limiter = get_limiter()
    group = f"u{principal.user_id}"
    request_specs, token_specs = _scope_specs(principal, estimated_tokens)
    lease_key, max_concurrent, lease_scope = _stream_lease(principal)
    ttl_seconds = settings.GATEWAY_TOTAL_TIMEOUT + 30
    lease_specs = [lease_spec(lease_key, limit=max_concurrent, ttl_seconds=ttl_seconds)] if max_concurrent else []
    specs = [*request_specs, *token_specs, *lease_specs]
    lease_id = uuid.uuid4().hex if lease_specs else None
    try:
        decision = await limiter.acquire(specs, group=group, lease_id=lease_id) if specs else UNLIMITED
    except LimiterUnavailable:
        observability.REJECTIONS.labels("limiter_unavailable").inc()
        raise LimiterDown(LIMITER_DOWN) from None
    headers = _headers(decision)
    if not decision.allowed:
        if decision.violated is not None and decision.violated.kind == "concurrency":
            observability.REJECTIONS.labels("concurrency").inc()
            message = CONCURRENCY_EXCEEDED.format(scope=lease_scope, limit=max_concurrent)
            raise LimitExceeded(message, kind="concurrency", headers={"Retry-After": "1", **headers})
        observability.REJECTIONS.labels("rate_limit").inc()
        raise _rejection(decision, headers, estimated_tokens)
    admission = Admission(group=group, decision=decision, tpm_specs=token_specs, reserved_tokens=estimated_tokens, headers=headers)
    if lease_id is not None:
        admission.lease = (lease_key, lease_id)
    return admission


def _rejection(decision: Decision, headers: dict[str, str], requested: int) -> LimitExceeded:
    violated = decision.violated
    assert violated is not None
    scope = _scope_name(violated)
    if math.isinf(decision.retry_after):
        message = TOKENS_TOO_LARGE.format(scope=scope, limit=violated.limit, requested=requested)
        return LimitExceeded(message, kind="request_too_large", headers=headers)
    retry = format_duration(decision.retry_after)
    with_retry = {"Retry-After": _retry_after_header(decision.retry_after), **headers}
    if violated.key.endswith(":tpm"):
        message = TOKENS_EXCEEDED.format(scope=scope, limit=violated.limit, requested=requested, retry=retry)
        return LimitExceeded(message, kind="tokens", headers=with_retry)
    message = REQUESTS_EXCEEDED.format(scope=scope, limit=violated.limit, retry=retry)
    return LimitExceeded(message, kind="requests", headers=with_retry)


async def release(admission: Admission, *, used_tokens: int) -> None:
    """Give back the tokens reserved but not used, and the stream slot. Idempotent."""
    if admission.released:
        return
    admission.released = True
    limiter = get_limiter()
    unused = admission.reserved_tokens - used_tokens
    refunds = [(spec, unused) for spec in admission.tpm_specs] if unused > 0 else []
    try:
        await limiter.give_back(refunds, lease=admission.lease, group=admission.group)
    except LimiterUnavailable:
        pass  # fail-closed with Redis gone: the lease expires by its TTL, refunds are lost


def _upstream_specs(deployment: Deployment, tokens: int) -> list[LimitSpec]:
    learned = learned_limits()
    headroom = settings.UPSTREAM_LIMIT_HEADROOM
    specs = []
    for unit, cost in (("rpm", 1), ("tpm", tokens)):
        limit = learned.current(deployment, cast(Unit, unit))
        if not limit:
            continue
        # Refill = the limit per minute (it starts at the published figure less the headroom);
        # burst = the headroom's share of it, so a burst stays within the published figure. Once
        # the upstream said its own limit, burst + refill stay within it: no 60 s window sends more.
        burst = max(1, math.floor(limit * headroom))
        ceiling = learned.ceiling(deployment, cast(Unit, unit))
        if ceiling is not None and burst + limit > ceiling:
            burst = max(1, math.floor(ceiling - limit))
            limit = max(1.0, min(limit, ceiling - burst))
        specs.append(
            LimitSpec(
                key=_upstream_key(deployment, unit),
                kind="token_bucket",
                limit=burst,
                period_seconds=MINUTE * burst / limit,
                cost=min(cost, burst),
            )
        )
    return specs


def _upstream_key(deployment: Deployment, unit: str) -> str:
    return f"upstream:{deployment.provider.name}:{deployment.upstream_model}:{unit}"


async def await_upstream_capacity(*, deployment: Deployment, model: str, estimated_tokens: int, max_wait: float) -> None:
    """Wait for room in the deployment's shared bucket (up to `max_wait`), or raise LimitExceeded."""
    await learned_limits().refresh(deployment)
    specs = _upstream_specs(deployment, estimated_tokens)
    if not specs:
        return
    try:
        decision = await acquire_waiting(get_limiter(), specs, group="upstream", max_wait=max(0.0, max_wait))
    except LimiterUnavailable:
        raise LimiterDown(LIMITER_DOWN) from None
    if not decision.allowed:
        observability.REJECTIONS.labels("upstream_capacity").inc()
        retry = decision.retry_after if math.isfinite(decision.retry_after) else MINUTE
        raise LimitExceeded(
            UPSTREAM_BUSY.format(model=model, retry=format_duration(retry)),
            kind="upstream_capacity",
            headers={"Retry-After": _retry_after_header(retry)},
        )


async def note_upstream_answer(*, deployment: Deployment, headers: dict[str, str]) -> None:
    """Keep the deployment's bucket in step with what the upstream's answer says of its limits:
    its real limits (learned), and none left until its reset (the bucket is held till then)."""
    await learned_limits().upstream_said(deployment, headers)
    for unit, suffix in (("rpm", "requests"), ("tpm", "tokens")):
        remaining = headers.get(f"x-ratelimit-remaining-{suffix}")
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{suffix}") or "")
        if remaining is not None and remaining.strip() == "0" and reset:
            try:
                await get_limiter().block(_upstream_key(deployment, unit), reset, group="upstream")
            except LimiterUnavailable:
                pass


async def note_upstream_rate_limited(
    *, deployment: Deployment, retry_after: float | None, headers: dict[str, str], limit_type: str | None = None
) -> None:
    """The upstream said 429: hold its bucket for every process until it says to come back, and
    learn that its limit (the one it named: `requests` or `tokens`, else both) is lower than the
    gateway kept to."""
    seconds = retry_after if retry_after and retry_after > 0 else 1.0
    named: dict[str, tuple[Unit, ...]] = {"requests": ("rpm",), "tokens": ("tpm",)}
    units = named.get(limit_type or "", ("rpm", "tpm"))
    limiter = get_limiter()
    try:
        for unit in units:
            await limiter.block(_upstream_key(deployment, unit), seconds, group="upstream")
    except LimiterUnavailable:
        pass
    await learned_limits().upstream_said(deployment, headers)
    await learned_limits().rate_limited(deployment, units=units)
