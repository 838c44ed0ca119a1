"""A per-process cache whose entries are read again before they expire, one read per key at a time.

    verified = RefreshAhead(look_up, name="verified API keys", max_entries=100_000)
    principal = await verified.get(key_hash)

`look_up(key)` (a database read, say) returns the value (never None) and how many seconds it
may be trusted.

- A key with no trusted value: the callers share one read (a burst of calls that finds an entry
  expired makes one read, not one per call, so they do not crowd the database threads), and
  wait for it; its exception is theirs.
- A key whose value is in the second half of its time: the caller gets that value at once, and
  the first such caller starts the read that replaces it (refresh ahead), so a key in steady use
  never makes a caller wait. A refresh that fails with one of `drop_on` (the key was revoked)
  drops the entry; any other failure leaves it until it expires, and is logged.
- `clear()` (from any thread: the models' signals call it) forgets every value, and a read that
  began before it does not store its answer: a change is never undone by a read that raced it.

The reads are the cache's own tasks: it keeps each one until it ends and takes its outcome,
whether or not a caller still waits for it (a caller that is cancelled leaves the read to end).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Entry[V]:
    value: V
    refresh_at: float  # by the cache's clock (time.monotonic)
    expires_at: float


class RefreshAhead[K: Hashable, V]:
    """See the module docstring."""

    def __init__(
        self,
        look_up: Callable[[K], Awaitable[tuple[V, float]]],
        *,
        name: str,
        max_entries: int,
        drop_on: tuple[type[BaseException], ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._look_up = look_up
        self._clock = clock
        self.name = name
        self._max_entries = max_entries
        self._drop_on = drop_on
        self._entries: dict[K, _Entry[V]] = {}
        self._reads: dict[K, asyncio.Task[V]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0  # moved on by clear(): reads begun before it store nothing

    def cached(self, key: K) -> V | None:
        """The key's trusted value, or None; from the event loop's thread. When the value is in
        the second half of its time, the first caller starts the read that replaces it."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires_at:
            return None
        if now >= entry.refresh_at and key not in self._reads_of_this_loop():
            self._start(key, refresh=True)
        return entry.value

    async def get(self, key: K) -> V:
        """The key's value: the trusted one (see `cached`), else the one its shared read gives."""
        value = self.cached(key)
        if value is not None:
            return value
        read = self._reads_of_this_loop().get(key) or self._start(key, refresh=False)
        return await asyncio.shield(read)

    def peek(self, key: K) -> V | None:
        """The key's trusted value if there is one, from any thread (no read is started)."""
        entry = self._entries.get(key)
        return entry.value if entry is not None and self._clock() < entry.expires_at else None

    def put(self, key: K, value: V, ttl: float) -> None:
        """Trust `value` for `ttl` seconds, from any thread (code that read it itself)."""
        if ttl <= 0:
            return
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        now = self._clock()
        self._entries[key] = _Entry(value, refresh_at=now + ttl / 2, expires_at=now + ttl)

    def clear(self) -> None:
        """Forget every value (reads in progress still end, but store nothing)."""
        self._generation += 1
        self._entries.clear()

    def _reads_of_this_loop(self) -> dict[K, asyncio.Task[V]]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a test's): the old one's reads went with it
            self._loop, self._reads = loop, {}
        return self._reads

    def _start(self, key: K, *, refresh: bool) -> asyncio.Task[V]:
        read = asyncio.get_running_loop().create_task(self._read(key, self._generation), name=f"{self.name}: read")
        self._reads[key] = read
        read.add_done_callback(lambda done: self._ended(key, done, refresh=refresh))
        return read

    async def _read(self, key: K, generation: int) -> V:
        try:
            value, ttl = await self._look_up(key)
        except self._drop_on:
            self._entries.pop(key, None)
            raise
        if generation == self._generation:
            self.put(key, value, ttl)
        return value

    def _ended(self, key: K, read: asyncio.Task[V], *, refresh: bool) -> None:
        if self._reads.get(key) is read:
            del self._reads[key]
        if read.cancelled():
            return
        error = read.exception()  # taken here, so an unawaited refresh's error is not "never retrieved"
        if refresh and error is not None and not isinstance(error, self._drop_on):
            logger.warning("%s: reading an entry again failed (%s); the cached one stands until it expires", self.name, error)
