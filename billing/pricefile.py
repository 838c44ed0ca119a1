"""Price files: the catalog as JSON or CSV, read into `PriceRow`s that name their line.

Both formats carry the same fields; rates are USD per 1M tokens, written as strings or plain
numbers (JSON numbers are read as `Decimal`, never float):

    JSON: [{"model": "gpt-4o", "input_usd_per_1m": "2.50", "cached_input_usd_per_1m": "1.25",
            "output_usd_per_1m": "10.00", "effective_from": "2024-01-01T00:00:00Z", "note": ""}, ...]
    CSV:  model,input_usd_per_1m,cached_input_usd_per_1m,output_usd_per_1m,effective_from,note

`cached_input_usd_per_1m` may be null or empty (cached tokens then pay the input rate); `note` is
optional. `effective_from` is an ISO 8601 datetime with a time zone.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.utils.dateparse import parse_datetime

from billing.money import usd

REQUIRED_FIELDS = ("model", "input_usd_per_1m", "output_usd_per_1m", "effective_from")
OPTIONAL_FIELDS = ("cached_input_usd_per_1m", "note")
FIELDS = (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)

UNKNOWN_FORMAT = "{source}: unknown price file format; use a .json or .csv file."
UNREADABLE = "{source}: cannot read the file: {reason}"
BAD_JSON = "{source} line {line}: invalid JSON: {reason}."
NOT_AN_ARRAY = "{source} line {line}: expected a JSON array of price objects."
NOT_AN_OBJECT = "{source} line {line}: expected a price object, got {kind}."
MISSING_FIELD = "{source} line {line}: missing field '{field}'."
UNKNOWN_FIELD = "{source} line {line}: unknown field '{field}' (expected: {fields})."
BAD_RATE = "{source} line {line}: '{field}' must be a non-negative decimal amount (USD per 1M tokens), got {value!r}."
BAD_MODEL = "{source} line {line}: 'model' must be a non-empty name, got {value!r}."
BAD_INSTANT = "{source} line {line}: 'effective_from' must be an ISO 8601 datetime with a time zone, got {value!r}."
DUPLICATE_ROW = "{source} line {line}: a second price for {model} effective {effective_from} (first on line {first})."
MISSING_COLUMNS = "{source} line 1: the header lacks column(s) {columns}."


class PriceFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class PriceRow:
    source: str
    line: int
    model: str
    input_usd_per_1m: Decimal
    cached_input_usd_per_1m: Decimal | None
    output_usd_per_1m: Decimal
    effective_from: datetime
    note: str = ""

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}"


def read_price_file(path: Path) -> list[PriceRow]:
    """Read and validate a whole price file; raise `PriceFileError` naming the first bad line."""
    source = path.name
    suffix = path.suffix.lower()
    if suffix not in {".json", ".csv"}:
        raise PriceFileError(UNKNOWN_FORMAT.format(source=source))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise PriceFileError(UNREADABLE.format(source=path, reason=error)) from None
    entries = _json_entries(text, source) if suffix == ".json" else _csv_entries(text, source)
    rows: list[PriceRow] = []
    first_seen: dict[tuple[str, datetime], int] = {}
    for line, entry in entries:
        row = _row(entry, source=source, line=line)
        key = (row.model, row.effective_from)
        if key in first_seen:
            raise PriceFileError(
                DUPLICATE_ROW.format(
                    source=source, line=line, model=row.model,
                    effective_from=row.effective_from.isoformat(), first=first_seen[key],
                )
            )
        first_seen[key] = line
        rows.append(row)
    return rows


def _json_entries(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """Yield (line, value) for each element of the top-level array, decoding one at a time."""
    decoder = json.JSONDecoder(parse_float=Decimal)

    def skip(index: int) -> int:
        while index < len(text) and text[index] in " \t\r\n":
            index += 1
        return index

    def line_at(index: int) -> int:
        return text.count("\n", 0, index) + 1

    index = skip(0)
    if index >= len(text) or text[index] != "[":
        raise PriceFileError(NOT_AN_ARRAY.format(source=source, line=line_at(index)))
    index = skip(index + 1)
    if index < len(text) and text[index] == "]":
        index = skip(index + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, index)
            except json.JSONDecodeError as error:
                raise PriceFileError(BAD_JSON.format(source=source, line=error.lineno, reason=error.msg)) from None
            yield line_at(index), value
            index = skip(end)
            if index < len(text) and text[index] == ",":
                index = skip(index + 1)
                continue
            if index < len(text) and text[index] == "]":
                index = skip(index + 1)
                break
            raise PriceFileError(BAD_JSON.format(source=source, line=line_at(index), reason="expected ',' or ']'"))
    if index != len(text):
        raise PriceFileError(BAD_JSON.format(source=source, line=line_at(index), reason="extra data after the array"))


def _csv_entries(text: str, source: str) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in REQUIRED_FIELDS if name not in header]
    if missing:
        raise PriceFileError(MISSING_COLUMNS.format(source=source, columns=", ".join(missing)))
    reader.fieldnames = header
    for record in reader:
        if not any((value or "").strip() for value in record.values() if isinstance(value, str)):
            continue  # a blank line
        yield reader.line_num, record


def _row(entry: Any, *, source: str, line: int) -> PriceRow:
    where = {"source": source, "line": line}
    if not isinstance(entry, Mapping):
        raise PriceFileError(NOT_AN_OBJECT.format(kind=type(entry).__name__, **where))
    for field in entry:
        if field not in FIELDS:
            raise PriceFileError(UNKNOWN_FIELD.format(field=field, fields=", ".join(FIELDS), **where))
    for field in REQUIRED_FIELDS:
        if entry.get(field) in (None, ""):
            raise PriceFileError(MISSING_FIELD.format(field=field, **where))
    model = entry["model"]
    if not isinstance(model, str) or not model.strip() or len(model.strip()) > 100:
        raise PriceFileError(BAD_MODEL.format(value=model, **where))
    raw_instant = entry["effective_from"]
    instant = parse_datetime(raw_instant.strip()) if isinstance(raw_instant, str) else None
    if instant is None or instant.tzinfo is None:
        raise PriceFileError(BAD_INSTANT.format(value=raw_instant, **where))
    cached = entry.get("cached_input_usd_per_1m")
    note = entry.get("note") or ""
    return PriceRow(
        source=source,
        line=line,
        model=model.strip(),
        input_usd_per_1m=_rate(entry["input_usd_per_1m"], "input_usd_per_1m", where),
        cached_input_usd_per_1m=None if cached in (None, "") else _rate(cached, "cached_input_usd_per_1m", where),
        output_usd_per_1m=_rate(entry["output_usd_per_1m"], "output_usd_per_1m", where),
        effective_from=instant,
        note=str(note).strip()[:200],
    )


def _rate(value: Any, field: str, where: dict[str, Any]) -> Decimal:
    try:
        rate = usd(value)
    except (TypeError, ValueError):
        raise PriceFileError(BAD_RATE.format(field=field, value=value, **where)) from None
    # The column holds 6 decimal places and 6 integer digits.
    if rate < 0 or rate >= Decimal(10) ** 6 or rate != rate.quantize(Decimal("0.000001")):
        raise PriceFileError(BAD_RATE.format(field=field, value=value, **where))
    return rate
