"""The batching ledger writer: the rows of calls that finish together are written together.

Each finished call hands its ledger row to the process's writer (`get_ledger_writer().submit`)
and awaits the future it gets back: the row's exact cost once it is durable, or the reason it
is not. The writer is a group commit (`infra.group_commit`): a row handed in while no batch is
being written is written at once, alone; rows that arrive while a batch is being written wait,
and become the next batch (at most `MAX_BATCH_ROWS`) as soon as that one is done.

- One batch is one transaction (`billing.services.usage_records_create`): the ledger rows, one
  upsert per rollup row it touches (the calls' amounts added up first) and the DELETE of those
  calls' budget holds (one statement, one round trip on PostgreSQL). A failure leaves neither the rows nor the holds'
  release: it is all or nothing, as for one call.
- A batch the database refuses for a reason of its rows (a `request_id` already in the ledger,
  a deleted user, a value out of range) is written again row by row, so one bad row costs only
  itself: each other row gets its cost, the bad one its error. A database that is away
  (`OperationalError`, `InterfaceError`) fails the whole batch at once: every row gets that
  error, as each would have alone, and none waits its turn to fail again.

What a caller does with a failure, and with a row still unwritten at its deadline, is its own
business (`calls.call.ApiCall._write_row` puts it in the outbox, `billing.outbox`, whose
replay writes it idempotently by `request_id`). `withdraw()` takes back a row no batch has
taken yet, so a row given up on is not written twice; a row already in a batch being written
cannot be taken back (a batch in flight is never cancelled, only at shutdown): it may still commit, and the
outbox's copy is then found in the ledger and not written again.

One writer per process, its batches written one at a time: on PostgreSQL on the event loop, on
a connection of its own (`infra.async_postgres`), elsewhere in the database threads
(`infra.db.db_task`), as is the row-by-row write of a refused batch. The processes' batches run
side by side, in separate transactions.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal

from django.db import InterfaceError, OperationalError

from billing.services import (
    UsageRow,
    ausage_records_create,
    failed_batch_outcomes,
    usage_record_create,
    usage_records_create,
)
from infra.async_postgres import LoopConnection, on_postgres
from infra.db import db_task
from infra.group_commit import GroupCommit

logger = logging.getLogger(__name__)

MAX_BATCH_ROWS = 200

type Outcome = Decimal | BaseException
"""A row's cost once written, or why it was not."""

# The database is away: nothing is written now, whichever the row.
_DATABASE_AWAY = (OperationalError, InterfaceError)


def write_batch(rows: Sequence[UsageRow]) -> Sequence[Outcome]:
    """Write `rows` in one transaction, or row by row if the database refuses one of them (sync, DB).

    Returns one outcome per row, in order.
    """
    try:
        return [record.cost_usd for record in usage_records_create(rows=rows)]
    except Exception as error:
        if (outcomes := failed_batch_outcomes(len(rows), error, items="ledger rows")) is not None:
            return outcomes
    return write_row_by_row(rows)


async def write_batch_on_loop(rows: Sequence[UsageRow]) -> Sequence[Outcome]:
    """`write_batch` on PostgreSQL: the batch's statement on the event loop
    (`infra.async_postgres`); only a batch the database refused goes to a database thread, to
    be written row by row. Elsewhere, all of `write_batch` in a database thread."""
    if not on_postgres():
        return await _write_batch_in_thread(rows)
    try:
        async with _connection.connection() as connection:
            return [record.cost_usd for record in await ausage_records_create(rows=rows, connection=connection)]
    except Exception as error:
        if (outcomes := failed_batch_outcomes(len(rows), error, items="ledger rows")) is not None:
            return outcomes
    return await _write_row_by_row_in_thread(rows)


def write_row_by_row(rows: Sequence[UsageRow]) -> list[Outcome]:
    """Each row in its own transaction: one outcome per row, in order (sync, DB)."""
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
_write_row_by_row_in_thread = db_task(write_row_by_row)
_connection = LoopConnection("ledger")


class LedgerWriter(GroupCommit[UsageRow, Decimal]):
    """The process's group-committing ledger writer (one per process: `get_ledger_writer`)."""

    def __init__(
        self, write: Callable[[Sequence[UsageRow]], Awaitable[Sequence[Outcome]]] | None = None, *, max_batch: int = MAX_BATCH_ROWS
    ) -> None:
        super().__init__(write or write_batch_on_loop, name="llmgateway-ledger-writer", max_batch=max_batch)


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
