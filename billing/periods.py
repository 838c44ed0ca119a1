"""Billing periods: calendar days, weeks and months in `BILLING_TIME_ZONE`, the one place they are computed.

A period is a half-open range of local calendar days `[first_day, end_day)`; its `start` and `end`
are the instants (in UTC) of the local midnights that bound it (a day across a DST change lasts 23
or 25 hours). Rollups are keyed by local day, so a month's usage is the sum of its days' rollups.
Weeks are ISO weeks, Monday to Sunday. Budgets use days and months; the cost console also weeks
and runs of whole days (`days_ending`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Final, Literal
from zoneinfo import ZoneInfo

from django.conf import settings

PeriodKind = Literal["day", "week", "month"]
PERIOD_KINDS: tuple[PeriodKind, ...] = ("day", "week", "month")
DAYS: Final = "days"  # the kind of a run of whole days that is no calendar period (`days_ending`)
NAIVE_DATETIME = "Billing periods need an aware datetime: got {value!r}."
BAD_DAY_COUNT = "A run of days needs a positive number of days: got {value!r}."
UNKNOWN_KIND = "Unknown billing period {kind!r}: expected one of {kinds}."


def billing_zone() -> ZoneInfo:
    return ZoneInfo(settings.BILLING_TIME_ZONE)


@dataclass(frozen=True, slots=True)
class Period:
    kind: PeriodKind | Literal["days"]
    first_day: date
    end_day: date  # exclusive
    zone: tzinfo

    @property
    def days(self) -> int:
        return (self.end_day - self.first_day).days

    @property
    def start(self) -> datetime:
        return _local_midnight(self.first_day, self.zone)

    @property
    def end(self) -> datetime:
        return _local_midnight(self.end_day, self.zone)

    def __contains__(self, at: datetime) -> bool:
        return self.start <= at < self.end

    def first(self, days: int) -> Period:
        """Its first `days` days (all of it if it is shorter): e.g. a month to date."""
        if days < 1:
            raise ValueError(BAD_DAY_COUNT.format(value=days))
        return Period(self.kind, self.first_day, min(self.first_day + timedelta(days=days), self.end_day), self.zone)

    def previous(self) -> Period:
        """The period of the same kind just before this one: the day, ISO week or calendar month
        before, or for a run of days the same number of days before."""
        if self.kind == "month":
            return period_containing("month", _local_midnight(self.first_day - timedelta(days=1), self.zone), zone=self.zone)
        if self.kind == "week":
            return Period("week", self.first_day - timedelta(days=7), self.first_day, self.zone)
        return Period(self.kind, self.first_day - timedelta(days=self.days), self.first_day, self.zone)


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
    """The day, ISO week (Monday first) or month, calendar, in the billing time zone, containing `at`."""
    zone = zone or billing_zone()
    day = billing_day(at, zone=zone)
    if kind == "day":
        return Period(kind, day, day + timedelta(days=1), zone)
    if kind == "week":
        monday = day - timedelta(days=day.weekday())
        return Period(kind, monday, monday + timedelta(days=7), zone)
    if kind == "month":
        first = day.replace(day=1)
        end = date(first.year + 1, 1, 1) if first.month == 12 else date(first.year, first.month + 1, 1)
        return Period(kind, first, end, zone)
    raise ValueError(UNKNOWN_KIND.format(kind=kind, kinds=", ".join(PERIOD_KINDS)))


def days_ending(at: datetime, *, days: int, zone: tzinfo | None = None) -> Period:
    """The `days` whole calendar days (in the billing time zone) that end with the day of `at`."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(BAD_DAY_COUNT.format(value=days))
    zone = zone or billing_zone()
    last = billing_day(at, zone=zone)
    return Period(DAYS, last - timedelta(days=days - 1), last + timedelta(days=1), zone)
