"""Group commit: items handed in while one batch is being written become the next batch.

    writer = GroupCommit(write_batch, name="llmgateway-ledger-writer", max_batch=200)
    result = await writer.submit(item)     # the item's own outcome from its batch

`write` takes a batch of items and returns one outcome per item, in order: a value, which the
item's future gets, or an exception, which it raises. The loop:

- While no batch is being written, a submitted item starts one at once (no timer: an idle
  process adds no delay, and a lone item is a batch of one). Items handed in during the same
  turn of the event loop go together.
- While a batch is being written, the items that arrive wait, and become the next batch as soon
  as that one is done (at most `max_batch`, the rest after it). So the busier the process, the
  larger its batches, and what a batch costs (a transaction, a round trip) is paid per batch.
- `withdraw()` takes back an item no batch has taken yet; one in a batch being written cannot
  be taken back (its write may be in a thread, which cannot be cancelled).

Each batch's size and the time its write took go to `/metrics` (`llmgateway_batch_items`,
`llmgateway_batch_seconds`, labelled by the writer's `name`): how long items wait for a batch
is about that long again, so these say what a database or Redis that slows down costs a call.

The writer owns one task, started by the first item and ended when nothing waits; `aclose()`
lets the items handed in be written (bounded), then stops it. Each event loop gets its own state
(a test suite runs one loop per test).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from infra.observability import BATCH_ITEMS, BATCH_SECONDS
from infra.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 10.0  # seconds `aclose` waits for the items already handed in
STOPPED = "the writer stopped before this item was written"


class WriterStopped(RuntimeError):
    """The writer was stopped (cancelled) before the item's batch was written."""


@dataclass(slots=True)
class _Entry[T, R]:
    item: T
    future: asyncio.Future[R]


class GroupCommit[T, R]:
    """A per-process group-committing writer of `T`s, each answered with an `R` (see module)."""

    def __init__(
        self,
        write: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        name: str,
        max_batch: int,
    ) -> None:
        self._write = write
        self.name = name
        self.max_batch = max_batch
        self._queue: deque[_Entry[T, R]] = deque()
        self._in_flight: set[asyncio.Future[R]] = set()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # What it has done, for tests: batches written and the items they held.
        self.batches = 0
        self.items = 0
        self._batch_items = BATCH_ITEMS.labels(writer=name)
        self._batch_seconds = BATCH_SECONDS.labels(writer=name)

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue `item` for the next batch; the future gets its outcome."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if self._loop is not loop:  # a new event loop: what an old one had is gone with it
            self._loop, self._task, self._in_flight = loop, None, set()
            self._queue.clear()
        self._queue.append(_Entry(item, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name=self.name)
        return future

    def withdraw(self, future: asyncio.Future[R]) -> bool:
        """Take back a submitted item: True if no batch will write it (it had not been taken),
        False if it is being written now (it may still take effect) or was written already."""
        if future.done() or future in self._in_flight:
            return future.cancelled()
        future.cancel()  # its entry is skipped when the next batch is formed
        return True

    @property
    def waiting(self) -> int:
        """Items handed in and not yet taken into a batch."""
        return sum(1 for entry in self._queue if not entry.future.done())

    async def _run(self) -> None:
        while self._queue:
            batch: list[_Entry[T, R]] = []
            while self._queue and len(batch) < self.max_batch:
                entry = self._queue.popleft()
                if not entry.future.done():  # withdrawn items are skipped
                    batch.append(entry)
            if not batch:
                continue
            self._in_flight = {entry.future for entry in batch}
            self._batch_items.observe(len(batch))
            started = time.perf_counter()
            try:
                outcomes = await self._write([entry.item for entry in batch])
            except asyncio.CancelledError:
                self._fail([*batch, *self._queue], WriterStopped(STOPPED))
                self._queue.clear()
                raise
            except Exception as error:  # no verdict on any item: each gets the error
                logger.exception("%s: writing a batch failed", self.name)
                self._fail(batch, error)
                continue
            finally:
                self._in_flight = set()
                self._batch_seconds.observe(time.perf_counter() - started)
            self.batches += 1
            self.items += len(batch)
            for entry, outcome in zip(batch, outcomes, strict=True):
                if entry.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    entry.future.set_exception(outcome)
                else:
                    entry.future.set_result(outcome)

    @staticmethod
    def _fail(entries: Sequence[_Entry[T, R]], error: Exception) -> None:
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(error)

    async def aclose(self) -> None:
        """Let the items handed in be written (up to CLOSE_TIMEOUT seconds), then stop."""
        task, self._task = self._task, None
        if task is None or task.done() or self._loop is not asyncio.get_running_loop():
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.shield(task)
        except TimeoutError:
            logger.warning("%s did not finish within %s s; its callers keep their items", self.name, CLOSE_TIMEOUT)
        await cancel_and_wait(task)
