"""Billing periods: calendar days and months in `BILLING_TIME_ZONE`, the one place they are computed.

A period is a half-open range of local calendar days `[first_day, end_day)`; its `start` and `end`
are the instants (in UTC) of the local midnights that bound it (a day across a DST change lasts 23
or 25 hours). Rollups are keyed by local day, so a month's usage is the sum of its days' rollups.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo

from django.conf import settings

PeriodKind = Literal["day", "month"]
PERIOD_KINDS: tuple[PeriodKind, ...] = ("day", "month")
NAIVE_DATETIME = "Billing periods need an aware datetime: got {value!r}."
UNKNOWN_KIND = "Unknown billing period {kind!r}: expected one of {kinds}."


def billing_zone() -> ZoneInfo:
    return ZoneInfo(settings.BILLING_TIME_ZONE)


@dataclass(frozen=True, slots=True)
class Period:
    kind: PeriodKind
    first_day: date
    end_day: date  # exclusive
    zone: tzinfo

    @property
    def start(self) -> datetime:
        return _local_midnight(self.first_day, self.zone)

    @property
    def end(self) -> datetime:
        return _local_midnight(self.end_day, self.zone)

    def __contains__(self, at: datetime) -> bool:
        return self.start <= at < self.end


def _local_midnight(day: date, zone: tzinfo) -> datetime:
    # In UTC: Python subtracts two datetimes sharing a tzinfo as wall-clock times, so a
    # 23-hour DST day would measure 24 hours in local time.
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def billing_day(at: datetime, *, zone: tzinfo | None = None) -> date:
    """The calendar day `at` falls on in the billing time zone."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(NAIVE_DATETIME.format(value=at))
    return at.astimezone(zone or billing_zone()).date()


def period_containing(kind: PeriodKind, at: datetime, *, zone: tzinfo | None = None) -> Period:
    """The day or month (calendar, in the billing time zone) that contains the instant `at`."""
    zone = zone or billing_zone()
    day = billing_day(at, zone=zone)
    if kind == "day":
        return Period(kind, day, day + timedelta(days=1), zone)
    if kind == "month":
        first = day.replace(day=1)
        end = date(first.year + 1, 1, 1) if first.month == 12 else date(first.year, first.month + 1, 1)
        return Period(kind, first, end, zone)
    raise ValueError(UNKNOWN_KIND.format(kind=kind, kinds=", ".join(PERIOD_KINDS)))
