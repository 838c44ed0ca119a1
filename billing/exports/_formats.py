"""Writing rows as CSV, JSON Lines or JSON text, a batch at a time.

Cells are made from database values by their column's kind: money is a fixed-point string at the
stored precision (`format(value, "f")`: never a float, never an exponent), datetimes ISO 8601 in
BILLING_TIME_ZONE with microseconds and offset, days `YYYY-MM-DD`, months `YYYY-MM`. In CSV a
missing value is an empty cell and booleans are `true`/`false`; JSON keeps null, booleans and
integers native and holds money as strings.

In CSV a text cell that a spreadsheet would run as a formula (one starting with `=`, `+`, `-`,
`@`, a tab or a carriage return: a username such as `=HYPERLINK(...)`) is written with a leading
`'`, as OWASP's "CSV Injection" advises. Only text columns are escaped: numbers (tokens, money)
stay plain numbers, and JSON keeps every value as it is.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from datetime import date, datetime, tzinfo
from decimal import Decimal
from typing import Any, Protocol

import orjson

from billing.exports._query import Column, Kind

TOTAL_LABEL = "total"  # the first cell of the CSV totals row
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _money(value: Decimal) -> str:
    return format(value, "f")


def _month(value: date) -> str:
    return f"{value.year:04d}-{value.month:02d}"


def csv_text(value: str) -> str:
    """A text cell a spreadsheet shows as text: a would-be formula gets a leading `'`."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def normalizers(columns: Sequence[Column]) -> list[tuple[int, Callable[[Any], Any]]]:
    """Steps from database values to the exact values written (and totalled).

    Money needs none: sums come back exact, at the stored precision, on PostgreSQL (numeric) and
    on SQLite (integers of the ledger quantum, see `billing.fields`).
    """
    steps: list[tuple[int, Callable[[Any], Any]]] = []
    for index, column in enumerate(columns):
        if column.kind == "count":
            steps.append((index, int))  # PostgreSQL sums bigints as numeric
    return steps


def formatters(columns: Sequence[Column], *, zone: tzinfo, json: bool) -> list[tuple[int, Callable[[Any], Any]]]:
    """Steps from exact values to cells (applied to non-null values only)."""

    def moment(value: datetime) -> str:
        return value.astimezone(zone).isoformat(timespec="microseconds")

    by_kind: dict[Kind, Callable[[Any], Any]] = {
        "money": _money,
        "money_sum": _money,
        "datetime": moment,
        "date": date.isoformat,
        "month": _month,
        "uuid": str,
    }
    if not json:
        by_kind["bool"] = lambda value: "true" if value else "false"
        by_kind["text"] = csv_text
    return [(index, by_kind[column.kind]) for index, column in enumerate(columns) if column.kind in by_kind]


class Writer(Protocol):
    def header(self) -> str: ...

    def rows(self, batch: list[list[Any]]) -> str: ...

    def footer(self, totals: list[Any] | None) -> str: ...


class CsvWriter:
    """RFC 4180 (CRLF line ends, minimal quoting), a header row, and the totals row last."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = columns
        self._buffer = io.StringIO()
        self._csv = csv.writer(self._buffer, lineterminator="\r\n")

    def _take(self) -> str:
        text = self._buffer.getvalue()
        self._buffer.seek(0)
        self._buffer.truncate()
        return text

    def header(self) -> str:
        self._csv.writerow([column.name for column in self.columns])
        return self._take()

    def rows(self, batch: list[list[Any]]) -> str:
        self._csv.writerows(batch)
        return self._take()

    def footer(self, totals: list[Any] | None) -> str:
        if totals is None:
            return ""
        self._csv.writerow([TOTAL_LABEL, *totals[1:]])
        return self._take()


class JsonLinesWriter:
    """One object per line; the totals, if asked for, as a last line `{"totals": {...}}`."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.names = [column.name for column in columns]
        self.summed = [index for index, column in enumerate(columns) if column.summed]

    def header(self) -> str:
        return ""

    def rows(self, batch: list[list[Any]]) -> str:
        names = self.names
        dumps = orjson.dumps
        return "".join([dumps(dict(zip(names, cells, strict=True))).decode() + "\n" for cells in batch])

    def footer(self, totals: list[Any] | None) -> str:
        if totals is None:
            return ""
        return orjson.dumps({"totals": {self.names[index]: totals[index] for index in self.summed}}).decode() + "\n"


class JsonWriter(JsonLinesWriter):
    """One document, `{"rows": [...], "totals": {...}}`, streamed a row per line."""

    def __init__(self, columns: Sequence[Column]) -> None:
        super().__init__(columns)
        self._first = True

    def header(self) -> str:
        return '{"rows":['

    def rows(self, batch: list[list[Any]]) -> str:
        if not batch:
            return ""
        names = self.names
        dumps = orjson.dumps
        text = ",".join(["\n" + dumps(dict(zip(names, cells, strict=True))).decode() for cells in batch])
        if self._first:
            self._first = False
            return text
        return "," + text

    def footer(self, totals: list[Any] | None) -> str:
        if totals is None:
            return "\n]}\n"
        sums = {self.names[index]: totals[index] for index in self.summed}
        return '\n],"totals":' + orjson.dumps(sums).decode() + "}\n"


WRITERS: dict[str, type[CsvWriter] | type[JsonLinesWriter]] = {
    "csv": CsvWriter,
    "jsonl": JsonLinesWriter,
    "json": JsonWriter,
}
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/jsonl; charset=utf-8",
    "json": "application/json",
}
