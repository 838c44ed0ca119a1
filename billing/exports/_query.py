"""The rows of an export: one queryset of tuples, in a total order, and the columns it yields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from django.contrib.auth import get_user_model
from django.db.models import Aggregate, Count, DateField, F, OrderBy, QuerySet, Sum
from django.db.models.functions import TruncDate, TruncMonth

from billing.exports._spec import ExportSpec, Group
from billing.models import DailyUsage, UsageRecord
from billing.periods import billing_day, billing_zone

# How a column's database value is written (see `billing.exports._formats`).
Kind = Literal["int", "count", "text", "uuid", "bool", "datetime", "date", "month", "money", "money_sum"]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: Kind
    summed: bool = False  # added up in the totals row


def _username() -> str:
    return f"user__{get_user_model().USERNAME_FIELD}"


# Raw ledger rows: (column, lookup, kind, summed). Rates are USD per 1M tokens, money is USD.
_RAW: tuple[tuple[str, str, Kind, bool], ...] = (
    ("id", "id", "int", False),
    ("request_id", "request_id", "uuid", False),
    ("created_at", "created_at", "datetime", False),
    ("user_id", "user_id", "int", False),
    ("username", "<username>", "text", False),
    ("api_key_id", "api_key_id", "int", False),
    ("api_key_prefix", "api_key__prefix", "text", False),
    ("model", "model", "text", False),
    ("upstream_model", "upstream_model", "text", False),
    ("provider", "provider", "text", False),
    ("stream", "stream", "bool", False),
    ("status", "status", "text", False),
    ("error_kind", "error_kind", "text", False),
    # A call's attempts (retries, fallbacks): its id, this row's number, the model asked for.
    ("call_id", "call_id", "uuid", False),
    ("attempt", "attempt", "int", False),
    ("requested_model", "requested_model", "text", False),
    # The API the client called (`UsageRecord.Endpoint`: chat.completions, responses, ...) and the
    # upstream's id of its answer (chatcmpl-..., resp_...; empty if none), for reconciliation.
    ("endpoint", "endpoint", "text", False),
    ("upstream_id", "upstream_id", "text", False),
    ("token_source", "token_source", "text", False),
    ("prompt_tokens", "prompt_tokens", "int", True),
    ("cached_tokens", "cached_tokens", "int", True),
    ("completion_tokens", "completion_tokens", "int", True),
    ("reasoning_tokens", "reasoning_tokens", "int", True),
    ("ttft_us", "ttft_us", "int", False),
    ("duration_us", "duration_us", "int", False),
    ("price_source", "price_source", "text", False),
    ("input_usd_per_1m", "input_usd_per_1m", "money", False),
    ("cached_input_usd_per_1m", "cached_input_usd_per_1m", "money", False),
    ("output_usd_per_1m", "output_usd_per_1m", "money", False),
    ("price_multiplier", "price_multiplier", "money", False),
    ("cost_usd", "cost_usd", "money", True),
    ("reserved_usd", "reserved_usd", "money", False),
)
RAW_ORDER = ("created_at", "id")  # a total order: re-runs write the same bytes

# Grouped rows: the group's columns, then these sums.
_SUMS: tuple[Column, ...] = (
    Column("requests", "count", summed=True),
    Column("prompt_tokens", "count", summed=True),
    Column("cached_tokens", "count", summed=True),
    Column("completion_tokens", "count", summed=True),
    Column("cost_usd", "money_sum", summed=True),
)
_GROUP_COLUMNS: dict[Group, tuple[Column, ...]] = {
    "user": (Column("user_id", "int"), Column("username", "text")),
    "model": (Column("model", "text"),),
    "day": (Column("day", "date"),),
    "month": (Column("month", "month"),),
    "key": (Column("api_key_id", "int"), Column("api_key_prefix", "text")),
}


@dataclass(frozen=True, slots=True)
class Plan:
    """An export's rows (tuples, in `columns` order, totally ordered) and its columns."""

    rows: QuerySet[Any, tuple[Any, ...]]
    columns: tuple[Column, ...]


def _ledger(spec: ExportSpec, records: QuerySet[UsageRecord] | None) -> QuerySet[UsageRecord]:
    rows = UsageRecord.objects.all() if records is None else records
    if spec.since is not None:
        rows = rows.filter(created_at__gte=spec.since)
    if spec.until is not None:
        rows = rows.filter(created_at__lt=spec.until)
    if spec.user_ids:
        rows = rows.filter(user_id__in=spec.user_ids)
    if spec.models:
        rows = rows.filter(model__in=spec.models)
    return rows


def _rollups(spec: ExportSpec) -> QuerySet[DailyUsage]:
    # Only called with whole-day bounds (ExportSpec.source), so local days bound them exactly.
    zone = billing_zone()
    rows = DailyUsage.objects.all()
    if spec.since is not None:
        rows = rows.filter(day__gte=billing_day(spec.since, zone=zone))
    if spec.until is not None:
        rows = rows.filter(day__lt=billing_day(spec.until, zone=zone))
    if spec.user_ids:
        rows = rows.filter(user_id__in=spec.user_ids)
    if spec.models:
        rows = rows.filter(model__in=spec.models)
    return rows


def _raw_plan(spec: ExportSpec, records: QuerySet[UsageRecord] | None) -> Plan:
    username = _username()
    lookups = [username if lookup == "<username>" else lookup for _, lookup, _, _ in _RAW]
    rows = _ledger(spec, records).order_by(*RAW_ORDER).values_list(*lookups)
    return Plan(rows=rows, columns=tuple(Column(name, kind, summed) for name, _, kind, summed in _RAW))


def _grouped_plan(spec: ExportSpec, records: QuerySet[UsageRecord] | None) -> Plan:
    from_rollups = spec.source == "rollups" and records is None
    zone = billing_zone()
    fields: list[str] = []  # plain lookups to group by
    expressions: dict[str, Any] = {}  # computed ones, by column name
    ordering: list[str | OrderBy] = []
    selected: list[str] = []
    for group in spec.group_by:
        if group == "user":
            fields += ["user_id", _username()]
            selected += ["user_id", _username()]
            ordering.append("user_id")
        elif group == "model":
            fields.append("model")
            selected.append("model")
            ordering.append("model")
        elif group == "day":
            if from_rollups:
                fields.append("day")
            else:
                expressions["day"] = TruncDate("created_at", tzinfo=zone)
            selected.append("day")
            ordering.append("day")
        elif group == "month":
            source = "day" if from_rollups else "created_at"
            expressions["month"] = TruncMonth(source, tzinfo=None if from_rollups else zone, output_field=DateField())
            selected.append("month")
            ordering.append("month")
        elif group == "key":
            fields += ["api_key_id", "api_key__prefix"]
            selected += ["api_key_id", "api_key__prefix"]
            # NULL (a call made without a key, or its key since deleted) sorts first on every database.
            ordering.append(F("api_key_id").asc(nulls_first=True))
    sums: dict[str, Aggregate]
    if from_rollups:
        base: QuerySet[Any] = _rollups(spec)
        sums = {
            "sum_requests": Sum("requests"),
            "sum_prompt_tokens": Sum("prompt_tokens"),
            "sum_cached_tokens": Sum("cached_tokens"),
            "sum_completion_tokens": Sum("completion_tokens"),
            "sum_cost_usd": Sum("cost_usd"),
        }
    else:
        base = _ledger(spec, records)
        sums = {
            "sum_requests": Count("id"),
            "sum_prompt_tokens": Sum("prompt_tokens"),
            "sum_cached_tokens": Sum("cached_tokens"),
            "sum_completion_tokens": Sum("completion_tokens"),
            "sum_cost_usd": Sum("cost_usd"),
        }
    rows = (
        base.order_by()
        .values(*fields, **expressions)
        .annotate(**sums)
        .order_by(*ordering)
        .values_list(*selected, *sums)
    )
    columns = tuple(column for group in spec.group_by for column in _GROUP_COLUMNS[group]) + _SUMS
    return Plan(rows=rows, columns=columns)


def export_plan(spec: ExportSpec, *, records: QuerySet[UsageRecord] | None = None) -> Plan:
    """The rows `spec` exports, from the ledger or its rollups (`ExportSpec.source`).

    `records` narrows the ledger first (the admin's selection); grouped exports of it aggregate
    the ledger, since a rollup row cannot be split by selection.
    """
    if not spec.group_by:
        return _raw_plan(spec, records)
    return _grouped_plan(spec, records)
