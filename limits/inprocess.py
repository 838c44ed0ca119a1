"""The in-process limiter: the embedded default and the fallback while Redis is unreachable.

Same semantics as `RedisLimiter` (``tests/limits`` runs one suite against both), with the
arithmetic of the Lua scripts transcribed line for line: time in milliseconds as floats, a
1e-6 token slack on bucket comparisons and a 1 µs slack on window expiry.

Failure policy and limits of this backend:

- State lives in this process only. Several workers each enforce the full limit, so N workers
  admit up to N times the configured rate. That is the price of needing no Redis; as a
  fallback it is the documented fail-open behaviour.
- Decisions never await, so each one is atomic on the event loop; a `threading.Lock` also makes
  them atomic across threads (sync views running in a thread pool).
- Memory: one small record per live bucket, one ``(time, cost)`` pair per admission still inside
  a window, one entry per live lease or block. Records past their expiry are swept every
  ``sweep_interval`` seconds, so memory is bounded by the keys active in roughly the longest
  period plus that interval.
- It never raises `LimiterError`; `health()` is always ``"ok"``.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _validate
from ._results import NEVER_MS, build_decision
from .clock import Clock, monotonic_clock
from .specs import Decision, LimitSpec, lease_spec

EPS_UNITS = 1e-6  # float slack on token comparisons, as in acquire.lua
EPS_MS = 1e-3  # one microsecond, the resolution of Redis TIME

type _Slot = tuple[str, str]  # (group, key)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    ts: float  # ms of the last refill
    expires: float  # ms at which the bucket is full again (and may be forgotten)


@dataclass(slots=True)
class _Window:
    entries: deque[list[float]] = field(default_factory=deque)  # [admitted_ms, cost], oldest first
    total: int = 0


@dataclass(slots=True)
class _Checked:
    """One spec after refill / expiry, before any charge."""

    spec: LimitSpec
    fits: bool
    wait: float | None  # ms, NEVER_MS, or None when it fits
    tokens: float = 0.0
    total: int = 0  # a window's live costs, or a concurrency spec's live leases
    blocked_ms: float = 0.0


class InProcessLimiter:
    """A `Limiter` whose state is a few dicts in this process."""

    def __init__(self, *, clock: Clock = monotonic_clock, sweep_interval: float = 10.0) -> None:
        self._clock = clock
        self._sweep_interval_ms = sweep_interval * 1000.0
        self._next_sweep_ms = -math.inf
        self._lock = threading.Lock()
        self._buckets: dict[_Slot, _Bucket] = {}
        self._windows: dict[_Slot, _Window] = {}
        self._window_periods: dict[_Slot, float] = {}
        self._leases: dict[_Slot, dict[str, float]] = {}
        self._blocks: dict[_Slot, float] = {}

    # -- Limiter API ---------------------------------------------------------------------------

    async def acquire(self, specs: Sequence[LimitSpec], *, group: str, lease_id: str | None = None) -> Decision:
        """Charge every spec or none (a concurrency spec's slot for ``lease_id``)."""
        _validate.check_acquire(specs, group, lease_id)
        with self._lock:
            now = self._now_ms()
            checked = [self._check(spec, group, now, lease_id) for spec in specs]
            allowed = all(c.fits for c in checked)
            violated, retry = 0, 0.0
            if allowed:
                for c in checked:
                    self._charge(c, group, now, lease_id)
            else:
                for concurrency_pass in (False, True):  # a full concurrency spec only when nothing else refuses
                    for i, c in enumerate(checked, start=1):
                        if c.fits or c.wait is None or (c.spec.kind == "concurrency") != concurrency_pass:
                            continue
                        if c.wait == NEVER_MS:
                            if retry != NEVER_MS:
                                violated, retry = i, NEVER_MS
                        elif retry != NEVER_MS and (violated == 0 or c.wait > retry):
                            violated, retry = i, c.wait
                    if violated:
                        break
            states = [self._state(c, group, now) for c in checked]
        return build_decision(
            specs, allowed=allowed, violated=violated, retry_ms=retry, states=states
        )

    async def refund(self, spec: LimitSpec, amount: int, *, group: str) -> None:
        """Give back ``amount`` units: bucket tokens up to capacity, or the newest window
        entries."""
        _validate.check_refund(spec, amount, group)
        if amount == 0:
            return
        with self._lock:
            now = self._now_ms()
            slot = (group, spec.key)
            period = spec.period_seconds * 1000.0
            if spec.kind == "token_bucket":
                bucket = self._buckets.get(slot)
                if bucket is None:
                    return  # an absent bucket is full
                rate = spec.limit / period
                tokens = self._refilled(bucket, spec.limit, rate, now)
                after = min(spec.limit, tokens + amount)
                self._buckets[slot] = _Bucket(after, now, now + (spec.limit - after) / rate)
                return
            window = self._windows.get(slot)
            if window is None:
                return
            self._expire(window, period, now)
            left = amount
            while left > 0 and window.entries:
                newest = window.entries[-1]
                if newest[1] > left:
                    newest[1] -= left
                    window.total -= left
                    left = 0
                else:
                    window.entries.pop()
                    window.total -= int(newest[1])
                    left -= int(newest[1])
            if not window.entries:
                self._forget_window(slot)

    async def acquire_lease(
        self, key: str, *, limit: int, lease_id: str, ttl_seconds: float, group: str
    ) -> Decision:
        """Take one of ``limit`` slots until ``ttl_seconds`` from now; re-acquiring renews."""
        _validate.check_lease(key, lease_id, group)
        _validate.check_limit(limit)
        _validate.check_seconds(ttl_seconds)
        return await self.acquire([lease_spec(key, limit=limit, ttl_seconds=ttl_seconds)], group=group, lease_id=lease_id)

    async def renew_lease(self, key: str, lease_id: str, *, ttl_seconds: float, group: str) -> bool:
        """Extend a held lease; False if it already expired or was released."""
        _validate.check_lease(key, lease_id, group)
        _validate.check_seconds(ttl_seconds)
        with self._lock:
            now = self._now_ms()
            leases = self._live_leases((group, key), now)
            if lease_id not in leases:
                return False
            leases[lease_id] = now + ttl_seconds * 1000.0
            return True

    async def give_back(
        self, refunds: Sequence[tuple[LimitSpec, int]], *, lease: tuple[str, str] | None = None, group: str
    ) -> None:
        for spec, amount in refunds:
            await self.refund(spec, amount, group=group)
        if lease is not None:
            await self.release_lease(*lease, group=group)

    async def release_lease(self, key: str, lease_id: str, *, group: str) -> None:
        """Free the slot; unknown ids are ignored."""
        _validate.check_lease(key, lease_id, group)
        with self._lock:
            leases = self._leases.get((group, key))
            if leases is not None:
                leases.pop(lease_id, None)
                if not leases:
                    del self._leases[(group, key)]

    async def block(self, key: str, seconds: float, *, group: str) -> None:
        """Reject specs with this key for ``seconds``; a longer existing block stays."""
        _validate.check_group(group)
        _validate.check_key(key)
        _validate.check_seconds(seconds)
        with self._lock:
            now = self._now_ms()
            slot = (group, key)
            self._blocks[slot] = max(self._blocks.get(slot, 0.0), now + seconds * 1000.0)

    async def health(self) -> dict[str, Any]:
        """Always ok; reports how many records are held."""
        with self._lock:
            keys = len(self._buckets) + len(self._windows) + len(self._leases) + len(self._blocks)
        return {"backend": "inprocess", "state": "ok", "keys": keys}

    async def aclose(self) -> None:
        """Drop all state."""
        with self._lock:
            self._buckets.clear()
            self._windows.clear()
            self._window_periods.clear()
            self._leases.clear()
            self._blocks.clear()

    # -- arithmetic (mirrors _lua/acquire.lua) -----------------------------------------------

    def _now_ms(self) -> float:
        now = self._clock() * 1000.0
        if now >= self._next_sweep_ms:
            self._sweep(now)
            self._next_sweep_ms = now + self._sweep_interval_ms
        return now

    @staticmethod
    def _refilled(bucket: _Bucket, limit: int, rate: float, now: float) -> float:
        elapsed = max(0.0, now - bucket.ts)  # a clock stepping back refills nothing
        return min(limit, bucket.tokens + elapsed * rate)

    @staticmethod
    def _expire(window: _Window, period: float, now: float) -> None:
        cutoff = now - period + EPS_MS
        while window.entries and window.entries[0][0] <= cutoff:
            window.total -= int(window.entries.popleft()[1])

    def _check(self, spec: LimitSpec, group: str, now: float, lease_id: str | None) -> _Checked:
        slot = (group, spec.key)
        period = spec.period_seconds * 1000.0
        if spec.kind == "concurrency":
            leases = self._live_leases(slot, now)
            fits = lease_id in leases or len(leases) < spec.limit
            c = _Checked(spec, fits, None if fits else min(leases.values()) - now, total=len(leases))
        elif spec.kind == "token_bucket":
            rate = spec.limit / period
            bucket = self._buckets.get(slot)
            tokens = (
                float(spec.limit)
                if bucket is None
                else self._refilled(bucket, spec.limit, rate, now)
            )
            fits = tokens + EPS_UNITS >= spec.cost
            c = _Checked(spec, fits, None if fits else (spec.cost - tokens) / rate, tokens=tokens)
        else:
            window = self._windows.get(slot)
            if window is not None:
                self._expire(window, period, now)
                if not window.entries:
                    self._forget_window(slot)
                    window = None
            total = 0 if window is None else window.total
            fits = total + spec.cost <= spec.limit
            wait: float | None = None
            if not fits and window is not None:
                need, freed = total + spec.cost - spec.limit, 0
                for admitted, cost in window.entries:
                    freed += int(cost)
                    if freed >= need:
                        wait = admitted + period - now
                        break
            if not fits and wait is None:
                wait = period
            c = _Checked(spec, fits, wait, total=total)
        if spec.cost > spec.limit:
            c.fits, c.wait = False, NEVER_MS
        blocked_ms = self._blocked_ms(slot, now)
        if blocked_ms > 0:
            c.blocked_ms = blocked_ms
            c.fits = False
            if c.wait != NEVER_MS:
                c.wait = max(c.wait or 0.0, blocked_ms)
        return c

    def _charge(self, c: _Checked, group: str, now: float, lease_id: str | None) -> None:
        spec = c.spec
        if spec.cost == 0:
            return
        slot = (group, spec.key)
        period = spec.period_seconds * 1000.0
        if spec.kind == "concurrency":
            assert lease_id is not None  # _validate.check_acquire
            leases = self._leases.setdefault(slot, {})
            leases[lease_id] = now + period
            c.total = len(leases)
        elif spec.kind == "token_bucket":
            rate = spec.limit / period
            c.tokens = max(0.0, c.tokens - spec.cost)
            self._buckets[slot] = _Bucket(c.tokens, now, now + (spec.limit - c.tokens) / rate)
        else:
            window = self._windows.setdefault(slot, _Window())
            self._window_periods[slot] = period
            window.entries.append([now, float(spec.cost)])
            window.total += spec.cost
            c.total = window.total

    def _state(self, c: _Checked, group: str, now: float) -> tuple[int, float]:
        spec = c.spec
        period = spec.period_seconds * 1000.0
        if spec.kind == "concurrency":
            remaining = max(0, spec.limit - c.total)
            leases = self._leases.get((group, spec.key))
            reset = max(0.0, max(leases.values()) - now) if leases else 0.0
        elif spec.kind == "token_bucket":
            remaining = math.floor(c.tokens + EPS_UNITS)
            reset = (spec.limit - c.tokens) / (spec.limit / period)
        else:
            remaining = max(0, spec.limit - c.total)
            window = self._windows.get((group, spec.key))
            reset = 0.0
            if window is not None and window.entries:
                reset = max(0.0, window.entries[-1][0] + period - now)
        if c.blocked_ms > 0:
            remaining, reset = 0, max(reset, c.blocked_ms)
        return remaining, reset

    def _blocked_ms(self, slot: _Slot, now: float) -> float:
        until = self._blocks.get(slot)
        if until is None:
            return 0.0
        if until <= now:
            del self._blocks[slot]
            return 0.0
        return until - now

    def _live_leases(self, slot: _Slot, now: float) -> dict[str, float]:
        leases = self._leases.get(slot, {})
        for lease_id in [i for i, expiry in leases.items() if expiry <= now]:
            del leases[lease_id]
        return leases

    def _forget_window(self, slot: _Slot) -> None:
        self._windows.pop(slot, None)
        self._window_periods.pop(slot, None)

    def _sweep(self, now: float) -> None:
        """Forget records that no longer change any decision."""
        for slot in [s for s, b in self._buckets.items() if b.expires <= now]:
            del self._buckets[slot]
        for slot, window in list(self._windows.items()):
            self._expire(window, self._window_periods[slot], now)
            if not window.entries:
                self._forget_window(slot)
        for slot in list(self._leases):
            if not self._live_leases(slot, now):
                del self._leases[slot]
        for slot in [s for s, until in self._blocks.items() if until <= now]:
            del self._blocks[slot]
