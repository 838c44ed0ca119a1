"""A circuit breaker per deployment: after UPSTREAM_BREAKER_FAILURES failures in a row, a deployment
is skipped for UPSTREAM_BREAKER_COOLDOWN seconds, then one call probes it (`limits.CircuitBreaker`).

Each process keeps its own breakers (a deployment's health is judged by the calls this process
made, as a load balancer's outlier detection does; no shared store sits on the call's path).
Their states are in `/metrics` (`llmgateway_upstream_breaker_state`: 0 closed, 1 probing, 2
open; the highest across processes), and each change is written to Django's cache so the admin
shows the latest one whichever process serves it (a cache that cannot be reached is skipped:
the breaker works without it). That write is synchronous, on the event loop: it happens only when
a breaker changes state, and costs at most the cache's socket timeout (0.5 s) while Redis is
frozen, after which the cache's own breaker stops trying (`llmgateway.cache`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import cache

from infra import observability
from limits import BreakerState, CircuitBreaker, Clock, Permit, monotonic_clock

logger = logging.getLogger(__name__)

STATE_VALUES: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}
CACHE_KEY = "upstreams:breaker:{name}"


@dataclass(frozen=True, slots=True)
class BreakerView:
    """A deployment's breaker as its last change left it, in whichever process changed it."""

    state: BreakerState
    since: float  # time.time()
    failures: int
    process: int


class DeploymentHealth:
    def __init__(self, *, clock: Clock = monotonic_clock) -> None:
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._states: dict[str, BreakerState] = {}

    def _breaker(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = CircuitBreaker(
                failure_threshold=settings.UPSTREAM_BREAKER_FAILURES,
                reset_timeout=settings.UPSTREAM_BREAKER_COOLDOWN,
                clock=self._clock,
            )
        return breaker

    def allow(self, name: str) -> Permit | None:
        """Leave to call the deployment, or None while its breaker is open (or a probe runs)."""
        breaker = self._breaker(name)
        permit = breaker.allow()
        self._observe(name, breaker)
        return permit

    def state(self, name: str) -> BreakerState:
        return self._breaker(name).state

    def succeeded(self, name: str, permit: Permit) -> None:
        breaker = self._breaker(name)
        breaker.record_success(permit)
        self._observe(name, breaker)

    def failed(self, name: str, permit: Permit) -> None:
        breaker = self._breaker(name)
        breaker.record_failure(permit)
        self._observe(name, breaker)

    def release(self, name: str, permit: Permit) -> None:
        """The call gave no verdict on the deployment (the client went away, its request was bad)."""
        self._breaker(name).release(permit)

    def _observe(self, name: str, breaker: CircuitBreaker) -> None:
        state = breaker.state
        if self._states.get(name, "closed") == state:
            return
        self._states[name] = state
        observability.UPSTREAM_BREAKER_STATE.labels(name).set(STATE_VALUES[state])
        if state == "open":
            logger.warning("deployment %s failed %d times in a row: skipped for %g s", name, breaker.failures, breaker.reset_timeout)
        else:
            logger.info("deployment %s breaker is %s", name, state)
        view = {"state": state, "since": time.time(), "failures": breaker.failures, "process": os.getpid()}
        try:
            cache.set(CACHE_KEY.format(name=name), view, timeout=max(60.0, settings.UPSTREAM_BREAKER_COOLDOWN * 10))
        except Exception as error:  # the admin's view is a convenience; the breaker goes on
            logger.debug("could not share the breaker state of %s: %s", name, error)


def shared_state(name: str) -> BreakerView | None:
    """The last change to a deployment's breaker in any process, or None if none is known."""
    try:
        value: Any = cache.get(CACHE_KEY.format(name=name))
    except Exception:
        return None
    if not isinstance(value, dict):
        return None
    return BreakerView(state=value["state"], since=value["since"], failures=value["failures"], process=value["process"])


health = DeploymentHealth()
