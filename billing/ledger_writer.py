"""The batching ledger writer: the rows of calls that finish together are written together.

Each finished call hands its ledger row to the process's writer (`get_ledger_writer().submit`)
and awaits the future it gets back: the row's exact cost once it is durable, or the reason it
is not. The writer is a group commit:

- While no batch is being written, a submitted row starts one at once (no timer: an idle
  gateway adds no delay, and a lone call is a batch of one).
- While a batch is being written, the rows that arrive wait, and become the next batch as soon
  as that one is done (at most `MAX_BATCH_ROWS`, the rest after it). So the busier the process,
  the larger its batches, and a database round trip is paid per batch, not per call.
- One batch is one transaction (`billing.services.usage_records_create`): a multi-row INSERT of
  the ledger rows, one upsert per rollup row it touches (the calls' amounts added up first),
  and the DELETE of those calls' budget holds. A failure leaves neither the rows nor the holds'
  release: it is all or nothing, as for one call.
- A batch the database refuses for a reason of its rows (a `request_id` already in the ledger,
  a deleted user, a value out of range) is written again row by row, so one bad row costs only
  itself: each other row gets its cost, the bad one its error. A database that is away
  (`OperationalError`, `InterfaceError`) fails the whole batch at once: every row gets that
  error, as each would have alone.

What a caller does with a failure, and with a row still unwritten at its deadline, is its own
business (`calls.call.ApiCall._write_row` puts it in the outbox, `billing.outbox`, whose
replay writes it idempotently by `request_id`). `withdraw()` takes back a row no batch has
taken yet, so a row given up on is not written twice; a row already in a batch being written
cannot be taken back (a database thread cannot be cancelled): it may still commit, and the
outbox's copy is then found in the ledger and not written again.

One writer per process, its batches written one at a time in the database threads
(`infra.db.db_task`): with several processes, their batches may run at once, in separate
transactions.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from django.db import InterfaceError, OperationalError

from billing.services import UsageRow, usage_record_create, usage_records_create
from infra.db import db_task
from infra.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

MAX_BATCH_ROWS = 200
CLOSE_TIMEOUT = 10.0  # seconds `aclose` waits for the rows already handed in

type Outcome = Decimal | BaseException
"""A row's cost once written, or why it was not."""

# The database is away: nothing is written now, whichever the row.
_DATABASE_AWAY = (OperationalError, InterfaceError)


def write_batch(rows: Sequence[UsageRow]) -> list[Outcome]:
    """Write `rows` in one transaction, or row by row if the database refuses one of them (sync, DB).

    Returns one outcome per row, in order.
    """
    try:
        return [record.cost_usd for record in usage_records_create(rows=rows)]
    except _DATABASE_AWAY as error:
        return [error] * len(rows)
    except Exception as error:  # a row's own fault: find it, write the others
        if len(rows) == 1:
            return [error]
        logger.info("a ledger batch of %d rows was refused (%s: %s); writing it row by row", len(rows), type(error).__name__, error)
    outcomes: list[Outcome] = []
    for index, row in enumerate(rows):
        try:
            outcomes.append(usage_record_create(**row).cost_usd)
        except _DATABASE_AWAY as error:
            outcomes += [error] * (len(rows) - index)  # gone meanwhile: the rest wait too
            break
        except Exception as error:
            outcomes.append(error)
    return outcomes


_write_batch_in_thread = db_task(write_batch)


@dataclass(slots=True)
class _Entry:
    row: UsageRow
    future: asyncio.Future[Decimal]


class LedgerWriter:
    """The process's group-committing ledger writer (one per process: `get_ledger_writer`)."""

    def __init__(
        self,
        write: Callable[[Sequence[UsageRow]], Awaitable[list[Outcome]]] | None = None,
        *,
        max_batch: int = MAX_BATCH_ROWS,
    ) -> None:
        self._write = write or _write_batch_in_thread
        self.max_batch = max_batch
        self._queue: deque[_Entry] = deque()
        self._in_flight: set[asyncio.Future[Decimal]] = set()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # What it has done, for tests and metrics: batches written (one transaction each, or
        # row by row after a refusal) and the rows they held.
        self.batches = 0
        self.rows = 0
        # Told the size of each batch as it is written (a metrics histogram).
        self.on_batch: Callable[[int], None] = lambda rows: None

    def submit(self, row: UsageRow) -> asyncio.Future[Decimal]:
        """Queue `row` for the next batch; the future gets its cost, or the write's error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decimal] = loop.create_future()
        if self._loop is not loop:  # a new event loop (tests run one each): what the old one had is gone
            self._loop, self._task, self._in_flight = loop, None, set()
            self._queue.clear()
        self._queue.append(_Entry(row, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="llmgateway-ledger-writer")
        return future

    def withdraw(self, future: asyncio.Future[Decimal]) -> bool:
        """Take back a submitted row: True if no batch will write it (it had not been taken),
        False if it is being written now (it may still commit) or was written already."""
        if future.done() or future in self._in_flight:
            return future.cancelled()
        future.cancel()  # its entry is skipped when the next batch is formed
        return True

    @property
    def waiting(self) -> int:
        """Rows handed in and not yet taken into a batch."""
        return sum(1 for entry in self._queue if not entry.future.done())

    async def _run(self) -> None:
        while self._queue:
            batch: list[_Entry] = []
            while self._queue and len(batch) < self.max_batch:
                entry = self._queue.popleft()
                if not entry.future.done():  # withdrawn rows are skipped
                    batch.append(entry)
            if not batch:
                continue
            self._in_flight = {entry.future for entry in batch}
            try:
                self.on_batch(len(batch))
                outcomes = await self._write([entry.row for entry in batch])
            except BaseException as error:  # cancelled (shutdown) or the thread failed: no verdict
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(error if isinstance(error, Exception) else RuntimeError("the ledger writer stopped"))
                if not isinstance(error, Exception):
                    self._fail_waiting()
                    raise
                logger.exception("writing a ledger batch failed")
                continue
            finally:
                self._in_flight = set()
            self.batches += 1
            self.rows += len(batch)
            for entry, outcome in zip(batch, outcomes, strict=True):
                if entry.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    entry.future.set_exception(outcome)
                else:
                    entry.future.set_result(outcome)

    def _fail_waiting(self) -> None:
        """The writer stops: the rows still waiting will not be written by it."""
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(RuntimeError("the ledger writer stopped"))

    async def aclose(self) -> None:
        """Let the rows handed in be written (up to CLOSE_TIMEOUT seconds), then stop."""
        task, self._task = self._task, None
        if task is None or task.done() or self._loop is not asyncio.get_running_loop():
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.shield(task)
        except TimeoutError:
            logger.warning("the ledger writer did not finish within %s s; its callers keep their rows", CLOSE_TIMEOUT)
        await cancel_and_wait(task)


_writer: LedgerWriter | None = None


def get_ledger_writer() -> LedgerWriter:
    global _writer
    if _writer is None:
        _writer = LedgerWriter()
    return _writer


async def aclose_ledger_writer() -> None:
    global _writer
    if _writer is not None:
        writer, _writer = _writer, None
        await writer.aclose()
