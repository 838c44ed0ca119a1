"""Limits learned from the upstream: what a deployment really takes, per minute, kept in step with
what it says and does.

A deployment's limit (requests and tokens per minute, each on its own) is the rate its shared
bucket lets through in a steady stream (`calls.limits` adds a burst of UPSTREAM_LIMIT_HEADROOM's
share on top). It starts at the published figure minus that headroom. Then:

- the upstream's `x-ratelimit-limit-requests` / `-tokens` headers, read on every answer, are its
  real limit: the ceiling. A limit above it comes down to it at once; a deployment with no
  published figure starts at it, minus the headroom.
- an upstream 429 cuts the limit by UPSTREAM_LIMIT_CUT (20%), at most once per
  UPSTREAM_LIMIT_CUT_INTERVAL, since one overload answers many calls at once with 429s;
- without 429s it regains UPSTREAM_LIMIT_RECOVERY of its ceiling (the header's, else the
  published figure) per minute, up to that ceiling: additive increase, multiplicative decrease,
  the rule operators apply by hand after a load test. An upstream that publishes nothing is
  found this way: the limit rises until the upstream refuses, and settles below where it did.

`calls.limits` also blocks the bucket when the upstream says nothing remains (until its reset)
or answers 429 (for its retry-after).

Shared: with REDIS_URL (a Redis Cluster with REDIS_CLUSTER) the state is one Redis hash per deployment and unit, which each process
reads at most once a second and writes on a cut or a new ceiling (two processes cutting at once
write the same cut: benign). Failure policy: when Redis cannot be reached, a process keeps
learning on its own state and tries Redis again a second later; without REDIS_URL the state is
per process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import redis
from django.conf import settings

from infra import observability
from infra.redis import UNREACHABLE, AsyncClient, async_client
from streaming.catalog import Deployment

logger = logging.getLogger(__name__)

Unit = Literal["rpm", "tpm"]
UNITS: tuple[Unit, ...] = ("rpm", "tpm")
REFRESH_SECONDS = 1.0
REDIS_TIMEOUT = 0.25  # seconds: learning must never hold a call up
MINIMUM_SHARE = 0.05  # a cut never takes a limit below this share of its ceiling
_REDIS_FAILED: tuple[type[Exception], ...] = (*UNREACHABLE, redis.RedisError, OSError)
_READ_FAILED: tuple[type[Exception], ...] = (*_REDIS_FAILED, KeyError, ValueError)  # or a hash not ours
HEADER_LIMITS: dict[Unit, str] = {"rpm": "x-ratelimit-limit-requests", "tpm": "x-ratelimit-limit-tokens"}


@dataclass(slots=True)
class LearnedLimit:
    limit: float  # per minute, at `at`
    at: float  # time.time() of the last cut or set
    ceiling: float | None = None  # the upstream's own figure, from its headers
    cut_at: float = 0.0  # time.time() of the last cut

    def now(self, *, published: int | None, at: float) -> float:
        """The limit at time `at`: recovered since the last cut, up to the ceiling."""
        cap = self.ceiling or published or self.limit
        recovered = self.limit + settings.UPSTREAM_LIMIT_RECOVERY * cap * max(0.0, at - self.at) / 60.0
        return min(cap, recovered)


def _published(deployment: Deployment, unit: Unit) -> int | None:
    return deployment.rpm if unit == "rpm" else deployment.tpm


def _starting_point(figure: float) -> float:
    """Where learning starts from a published (or an upstream's own) figure: less the headroom."""
    return max(1.0, figure * (1.0 - settings.UPSTREAM_LIMIT_HEADROOM))


class LearnedLimits:
    def __init__(self, redis_url: str, *, prefix: str, cluster: bool = False) -> None:
        # At most one immediate retry (a stale pooled connection, or a cluster's topology re-read).
        self._client: AsyncClient | None = async_client(redis_url, cluster=cluster, timeout=REDIS_TIMEOUT, retries=1) if redis_url else None
        self._prefix = prefix
        self._state: dict[tuple[str, Unit], LearnedLimit] = {}
        self._read_at: dict[str, float] = {}

    def _key(self, deployment: Deployment, unit: Unit) -> str:
        return f"{self._prefix}:learned:{deployment.name}:{unit}"

    def current(self, deployment: Deployment, unit: Unit) -> float | None:
        """The limit per minute to keep to now, or None when nothing is published or learned."""
        published = _published(deployment, unit)
        state = self._state.get((deployment.name, unit))
        if state is None and published is None:
            return None
        value = _starting_point(published) if state is None and published is not None else None
        if state is not None:
            value = state.now(published=published, at=time.time())
        if value is None:
            return None
        observability.UPSTREAM_LEARNED_LIMIT.labels(deployment.name, unit).set(value)
        return value

    def ceiling(self, deployment: Deployment, unit: Unit) -> float | None:
        """The upstream's own limit, from its headers; None until it said one."""
        state = self._state.get((deployment.name, unit))
        return None if state is None else state.ceiling

    async def refresh(self, deployment: Deployment) -> None:
        """Take in what other processes learned (at most once a second)."""
        client = self._client
        monotonic = time.monotonic()
        if client is None or monotonic - self._read_at.get(deployment.name, -REFRESH_SECONDS) < REFRESH_SECONDS:
            return
        self._read_at[deployment.name] = monotonic
        try:
            for unit in UNITS:
                stored = await client.hgetall(self._key(deployment, unit))
                if stored:
                    ceiling = stored.get(b"ceiling")
                    self._state[(deployment.name, unit)] = LearnedLimit(
                        limit=float(stored[b"limit"]),
                        at=float(stored[b"at"]),
                        ceiling=float(ceiling) if ceiling else None,
                        cut_at=float(stored.get(b"cut_at") or 0.0),
                    )
        except _READ_FAILED as error:
            logger.info("reading learned limits of %s failed (%s); learning locally", deployment.name, error)

    async def _store(self, deployment: Deployment, unit: Unit, state: LearnedLimit) -> None:
        self._state[(deployment.name, unit)] = state
        observability.UPSTREAM_LEARNED_LIMIT.labels(deployment.name, unit).set(state.limit)
        if self._client is None:
            return
        mapping: dict[str | bytes, str | bytes] = {
            "limit": repr(state.limit),
            "at": repr(state.at),
            "ceiling": "" if state.ceiling is None else repr(state.ceiling),
            "cut_at": repr(state.cut_at),
        }
        try:
            await self._client.hset(self._key(deployment, unit), mapping=mapping)  # type: ignore[arg-type]
        except _REDIS_FAILED as error:
            logger.info("sharing learned limits of %s failed (%s); learning locally", deployment.name, error)

    async def upstream_said(self, deployment: Deployment, headers: dict[str, str]) -> None:
        """Take the upstream's own limits from its answer's headers."""
        for unit, header in HEADER_LIMITS.items():
            raw = headers.get(header)
            if not raw:
                continue
            try:
                ceiling = float(raw)
            except ValueError:
                continue
            if ceiling <= 0:
                continue
            state = self._state.get((deployment.name, unit))
            if state is not None and state.ceiling == ceiling:
                continue
            now = time.time()
            published = _published(deployment, unit)
            if state is None:
                start = _starting_point(published if published is not None else ceiling)
                state = LearnedLimit(limit=min(start, ceiling), at=now, ceiling=ceiling)
            else:
                limit = min(state.now(published=published, at=now), ceiling)
                state = LearnedLimit(limit=limit, at=now, ceiling=ceiling, cut_at=state.cut_at)
            await self._store(deployment, unit, state)

    async def rate_limited(self, deployment: Deployment, *, units: tuple[Unit, ...] = UNITS) -> None:
        """The upstream answered 429: cut its limits (`units`: the one it said was reached, else
        both), once per cut interval."""
        now = time.time()
        for unit in units:
            published = _published(deployment, unit)
            state = self._state.get((deployment.name, unit))
            if state is None:
                if published is None:
                    continue
                state = LearnedLimit(limit=_starting_point(published), at=now)
            if now - state.cut_at < settings.UPSTREAM_LIMIT_CUT_INTERVAL:
                continue
            current = state.now(published=published, at=now)
            floor = max(1.0, MINIMUM_SHARE * (state.ceiling or published or current))
            cut = max(floor, current * (1.0 - settings.UPSTREAM_LIMIT_CUT))
            logger.info("upstream 429 from %s: its %s limit goes from %.1f to %.1f", deployment.name, unit, current, cut)
            await self._store(deployment, unit, LearnedLimit(limit=cut, at=now, ceiling=state.ceiling, cut_at=now))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


_learned: LearnedLimits | None = None


def learned_limits() -> LearnedLimits:
    global _learned
    if _learned is None:
        _learned = LearnedLimits(settings.REDIS_URL, prefix=settings.LIMITS_REDIS_PREFIX, cluster=settings.REDIS_CLUSTER)
    return _learned


async def aclose_learned_limits() -> None:
    global _learned
    if _learned is not None:
        learned, _learned = _learned, None
        await learned.aclose()
