"""Cost exports: the ledger, raw or grouped, as CSV, JSON Lines or JSON, streamed exactly.

One exporter serves `manage.py export_costs`, the admin's "Export CSV" action and the console's
download (`billing.views`), so for the same arguments all three write the same bytes.

Rows and their order
    Raw exports are ledger rows ordered by `(created_at, id)`, a total order, so a re-run writes
    byte-identical output. They are read with `.iterator(chunk_size=...)`: on PostgreSQL a
    server-side cursor inside a transaction (outside one, Django's cursor is `WITH HOLD`, which
    makes the server materialise the whole result before the first row), on SQLite a plain
    statement fetched in batches. Memory stays flat whatever the row count (see
    `bench/export_costs.py`). On SQLite no transaction is opened: the gateway's transactions
    there are `BEGIN IMMEDIATE`, which would take the write lock for the whole export; a single
    statement reads one snapshot anyway.

Raw columns
    In this order (`_query._RAW`): `id, request_id, created_at, user_id, username, api_key_id,
    api_key_prefix, model, upstream_model, provider, stream, status, error_kind, call_id, attempt,
    requested_model, endpoint, upstream_id, token_source, prompt_tokens, cached_tokens,
    completion_tokens, reasoning_tokens, ttft_us, duration_us, price_source, input_usd_per_1m,
    cached_input_usd_per_1m, output_usd_per_1m, price_multiplier, cost_usd, reserved_usd`.
    `endpoint` is the API called (`chat.completions`, `responses`, `completions`, `embeddings`);
    `upstream_id` the upstream's id of its answer, empty when it gave none.

Grouped exports (`group_by` any of user, model, day, month, key), and where they come from
    - From the daily rollups (`DailyUsage`, rows per user x model x BILLING_TIME_ZONE day) when
      the grouping is within user/model/day/month and `since`/`until` are whole days, i.e. local
      midnights in BILLING_TIME_ZONE (a date such as `2025-06-01` always is).
    - Otherwise from the ledger, aggregated by the database in one `GROUP BY`: always for `key`
      (the rollups are not kept per API key), and for bounds inside a day, which a rollup row
      cannot split. Days and months are then truncated in BILLING_TIME_ZONE, so both sources put
      a call on the same day, and, the rollups being kept in the ledger row's transaction, both
      give the same rows (`from_ledger` forces this path, as a cross-check).
    Groups are ordered by their columns in the order given (user by id, API keys without one
    first); columns are the group's (`user_id, username`, `model`, `day`, `month` as `YYYY-MM`,
    `api_key_id, api_key_prefix`) then `requests, prompt_tokens, cached_tokens,
    completion_tokens, cost_usd`.

Ranges
    `[since, until)`, half-open: `--since 2025-06-01 --until 2025-07-01` is June. A date is the
    first instant of that day in BILLING_TIME_ZONE; a datetime without an offset is read in
    BILLING_TIME_ZONE (a wall time skipped or repeated by a clock change is refused); one with an
    offset is that instant.

Money and totals
    Money is written as a fixed-point string at the stored precision (10 places for costs, 6 for
    rates), never a float or an exponent. The totals row (`totals`) is the exact `Decimal` sum of
    the rows written, so a spreadsheet's sum of the column equals it, and it equals the
    database's `SUM()` over the same filters (tested). CSV puts it last with `total` in the first
    cell; JSON Lines as a last line `{"totals": {...}}`; JSON under the key `totals`.

Output
    Text is produced in chunks of about 64 KiB. `write_atomically` writes a file all or nothing.
    On standard output or over HTTP an export that fails midway is cut short: use a file when a
    partial export must never be seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from decimal import Decimal
from typing import Any

from django.db import connections, transaction
from django.db.models import QuerySet

from billing.exports._files import write_atomically
from billing.exports._formats import CONTENT_TYPES, TOTAL_LABEL, WRITERS, formatters, normalizers
from billing.exports._query import Column, Plan, export_plan
from billing.exports._spec import (
    AMBIGUOUS_TIME,
    BAD_BOUND,
    EMPTY_RANGE,
    FORMATS,
    GROUPS,
    IS_DIRECTORY,
    NO_DIRECTORY,
    NO_GROUPING,
    NONE_AND_GROUPS,
    NONEXISTENT_TIME,
    UNKNOWN_FORMAT,
    UNKNOWN_GROUP,
    UNKNOWN_MODEL,
    UNKNOWN_USER,
    ExportError,
    ExportSpec,
    Format,
    Group,
    export_spec_parse,
    output_path_check,
)
from billing.models import UsageRecord
from billing.money import ledger_quantize, money_sum
from billing.periods import billing_zone

__all__ = [
    "AMBIGUOUS_TIME",
    "BAD_BOUND",
    "CONTENT_TYPES",
    "EMPTY_RANGE",
    "FORMATS",
    "GROUPS",
    "IS_DIRECTORY",
    "NONE_AND_GROUPS",
    "NONEXISTENT_TIME",
    "NO_DIRECTORY",
    "NO_GROUPING",
    "TOTAL_LABEL",
    "UNKNOWN_FORMAT",
    "UNKNOWN_GROUP",
    "UNKNOWN_MODEL",
    "UNKNOWN_USER",
    "Column",
    "ExportError",
    "ExportSpec",
    "Format",
    "Group",
    "export_spec_parse",
    "output_path_check",
    "usage_export",
    "usage_export_count",
    "usage_export_filename",
    "write_atomically",
]

CHUNK_SIZE = 2000  # rows fetched per round trip and written per batch
FLUSH_CHARS = 64 * 1024  # text handed on at a time


def _reading(alias: str) -> AbstractContextManager[Any]:
    if connections[alias].vendor == "postgresql":
        return transaction.atomic(using=alias)  # so the server-side cursor streams (see above)
    return nullcontext()


def usage_export_count(spec: ExportSpec, *, records: QuerySet[UsageRecord] | None = None) -> int:
    """How many rows (ledger rows or groups) `usage_export` will write, for a progress bar."""
    return export_plan(spec, records=records).rows.count()


def usage_export_filename(spec: ExportSpec) -> str:
    return f"costs.{spec.format}"


def _totals_cells(columns: tuple[Column, ...], totals: list[Any]) -> list[Any]:
    cells: list[Any] = []
    for column, total in zip(columns, totals, strict=True):
        if not column.summed:
            cells.append("")
        elif column.kind in ("money", "money_sum"):
            cells.append(format(ledger_quantize(total), "f"))
        else:
            cells.append(total)
    return cells


def usage_export(
    spec: ExportSpec,
    *,
    records: QuerySet[UsageRecord] | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[str]:
    """Yield the export of `spec` as text chunks (about 64 KiB each; the last may be shorter).

    `records` narrows the ledger first (the admin's selection). `progress` is called with the
    number of rows written so far after each batch.
    """
    plan: Plan = export_plan(spec, records=records)
    columns = plan.columns
    normalize = normalizers(columns)
    cell_steps = formatters(columns, zone=billing_zone(), json=spec.format != "csv")
    writer = WRITERS[spec.format](columns)
    summed = [index for index, column in enumerate(columns) if column.summed]
    money = {index for index in summed if columns[index].kind in ("money", "money_sum")}
    totals: list[Any] = [Decimal(0) if index in money else 0 for index in range(len(columns))]

    with _reading(plan.rows.db):
        pending = [writer.header()]
        size = len(pending[0])
        written = 0
        for rows in itertools.batched(plan.rows.iterator(chunk_size=chunk_size), chunk_size):
            batch = [list(row) for row in rows]
            for cells in batch:
                for index, step in normalize:
                    if cells[index] is not None:
                        cells[index] = step(cells[index])
            if spec.totals:
                for index in summed:
                    if index in money:
                        totals[index] = money_sum([totals[index], *(cells[index] for cells in batch)])
                    else:
                        totals[index] += sum(cells[index] for cells in batch)
            for cells in batch:
                for index, step in cell_steps:
                    if cells[index] is not None:
                        cells[index] = step(cells[index])
            text = writer.rows(batch)
            pending.append(text)
            size += len(text)
            written += len(batch)
            if progress is not None:
                progress(written)
            if size >= FLUSH_CHARS:
                yield "".join(pending)
                pending, size = [], 0
    pending.append(writer.footer(_totals_cells(columns, totals) if spec.totals else None))
    if last := "".join(pending):
        yield last
