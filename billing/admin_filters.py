"""List filters of the cost console that scale with the ledger: typed values, not lists of every choice.

Django's stock filters list every distinct value (`SELECT DISTINCT` over the table, or every user):
fine for a status, not for a million-row ledger or thousands of users. These filters take what
staff type (a username, a key prefix, a date range) in a small GET form in the filter sidebar.
Their query parameters are those of the cost export (`since`, `until`, `user`, `model`), so a link
from the console reads the same: `?user=alice&since=2025-06-01&until=2025-07-01`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, ClassVar

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from billing.models import DailyUsage
from billing.periods import Period, billing_zone, period_containing

BAD_DATE = "{name} must be a date, YYYY-MM-DD: got {value!r}."


@dataclass(frozen=True, slots=True)
class Field:
    """One input of an `InputFilter`: its query parameter, label and HTML input type."""

    name: str
    label: str
    type: str = "text"
    placeholder: str = ""


class InputFilter(admin.ListFilter):
    """A filter staff type into: its `fields` are inputs of one GET form that keeps the other filters."""

    template = "admin/billing/input_filter.html"
    fields: ClassVar[tuple[Field, ...]]

    def __init__(self, request: HttpRequest, params: dict[str, list[str]], model: type[Model], model_admin: Any) -> None:
        super().__init__(request, params, model, model_admin)
        for field in self.fields:
            if field.name in params:
                value = params.pop(field.name)[-1].strip()
                if value:
                    self.used_parameters[field.name] = value

    def has_output(self) -> bool:
        return True

    def expected_parameters(self) -> list[str | None]:
        return [field.name for field in self.fields]

    def value(self, name: str) -> str:
        return str(self.used_parameters.get(name, ""))

    def shortcuts(self, changelist: ChangeList) -> list[tuple[str, str]]:
        """Links that fill the inputs: (label, query string)."""
        return []

    def choices(self, changelist: ChangeList) -> Iterator[dict[str, Any]]:
        mine = [field.name for field in self.fields]
        yield {
            "fields": [(field, self.value(field.name)) for field in self.fields],
            "hidden": [(name, value) for name, values in changelist.filter_params.items() if name not in mine for value in values],
            "clear": changelist.get_query_string(remove=mine) if self.used_parameters else "",
            "shortcuts": self.shortcuts(changelist),
        }


class UserFilter(InputFilter):
    """By username (exact), as the export's `user`."""

    title = "user"
    fields = (Field("user", "Username"),)
    user_path: ClassVar[str] = "user"

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if username := self.value("user"):
            return queryset.filter(**{f"{self.user_path}__username": username})
        return queryset


class AccountUserFilter(UserFilter):
    user_path = "account__user"


class ApiKeyFilter(InputFilter):
    """By API key: the prefix shown in the key list (`sk-gw-abc123`), or its start."""

    title = "API key"
    fields = (Field("key", "Key prefix", placeholder="sk-gw-…"),)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if prefix := self.value("key"):
            return queryset.filter(api_key__prefix__startswith=prefix)
        return queryset


def _day(name: str, value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise IncorrectLookupParameters(BAD_DATE.format(name=name, value=value)) from None


class DateRangeFilter(InputFilter):
    """Calendar days in `BILLING_TIME_ZONE`, half-open as in the export: since (included), until (excluded).

    `date_field` is a `DateField` holding billing days (rollups) or, with `instant = True`, a
    `DateTimeField` (the ledger), compared with the local midnights that bound the range.
    """

    title = "date (BILLING_TIME_ZONE)"
    fields = (
        Field("since", "Since (included)", type="date"),
        Field("until", "Until (excluded)", type="date"),
    )
    date_field: ClassVar[str]
    instant: ClassVar[bool] = False

    def _bound(self, day: date) -> Any:
        if not self.instant:
            return day
        return Period("day", day, day + timedelta(days=1), billing_zone()).start

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if since := self.value("since"):
            queryset = queryset.filter(**{f"{self.date_field}__gte": self._bound(_day("since", since))})
        if until := self.value("until"):
            queryset = queryset.filter(**{f"{self.date_field}__lt": self._bound(_day("until", until))})
        return queryset

    def shortcuts(self, changelist: ChangeList) -> list[tuple[str, str]]:
        today = period_containing("day", timezone.now())
        month = period_containing("month", timezone.now())
        last_month = period_containing("month", month.start - timedelta(days=1))
        ranges = [
            ("Today", today.first_day, today.end_day),
            ("Last 7 days", today.end_day - timedelta(days=7), today.end_day),
            ("This month", month.first_day, month.end_day),
            ("Last month", last_month.first_day, last_month.end_day),
        ]
        return [
            (label, changelist.get_query_string({"since": since.isoformat(), "until": until.isoformat()}))
            for label, since, until in ranges
        ]


class LedgerDateFilter(DateRangeFilter):
    date_field = "created_at"
    instant = True


class RollupDateFilter(DateRangeFilter):
    date_field = "day"


class ModelFilter(admin.SimpleListFilter):
    """By model, as the export's `model`; the choices come from the rollups, not a scan of the ledger."""

    title = "model"
    parameter_name = "model"
    model_path: ClassVar[str] = "model"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        models = DailyUsage.objects.order_by("model").values_list("model", flat=True).distinct()
        return [(model, model) for model in models]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if model := self.value():
            return queryset.filter(**{self.model_path: model})
        return queryset
