"""The console's periods: ISO weeks, a period to date against the same days of the one before,
and runs of days, in the billing time zone, at month, week, year and time-zone edges."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from billing.console.selectors import spend_by_period
from billing.periods import days_ending, period_containing


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("at", "zone", "monday"),
    [
        (utc(2025, 6, 15, 23, 59, 59), "UTC", date(2025, 6, 9)),  # a Sunday's last second
        (utc(2025, 6, 16, 0, 0), "UTC", date(2025, 6, 16)),  # the Monday's first instant
        (utc(2026, 1, 1, 12), "UTC", date(2025, 12, 29)),  # a week across New Year
        (utc(2025, 6, 15, 22, 30), "Europe/Berlin", date(2025, 6, 16)),  # already Monday in Berlin
        (utc(2025, 6, 16, 3), "America/New_York", date(2025, 6, 9)),  # still Sunday in New York
        (utc(2025, 10, 26, 12), "Europe/Berlin", date(2025, 10, 20)),  # a week with a 25-hour Sunday
    ],
    ids=["sunday-last-second", "monday-first-instant", "across-new-year", "berlin-already-monday", "new-york-still-sunday", "berlin-fall-back"],
)
def test_a_week_is_monday_to_sunday_in_the_billing_zone(at, zone, monday) -> None:
    week = period_containing("week", at, zone=ZoneInfo(zone))
    assert (week.first_day, week.end_day) == (monday, monday + timedelta(days=7))
    assert at in week and week.start in week and week.end not in week


@pytest.mark.parametrize(
    ("at", "zone", "expected"),
    [
        # A Sunday at noon: the week so far is all of it; the month so far its first 15 days.
        (utc(2025, 6, 15, 12), "UTC", {
            "day": ((2025, 6, 15), (2025, 6, 16), (2025, 6, 14), (2025, 6, 15)),
            "week": ((2025, 6, 9), (2025, 6, 16), (2025, 6, 2), (2025, 6, 9)),
            "month": ((2025, 6, 1), (2025, 6, 16), (2025, 5, 1), (2025, 5, 16)),
        }),
        # A Monday, the 1st: one day of each, compared with the day, Monday and 1st before.
        (utc(2025, 9, 1, 0, 0), "UTC", {
            "day": ((2025, 9, 1), (2025, 9, 2), (2025, 8, 31), (2025, 9, 1)),
            "week": ((2025, 9, 1), (2025, 9, 2), (2025, 8, 25), (2025, 8, 26)),
            "month": ((2025, 9, 1), (2025, 9, 2), (2025, 8, 1), (2025, 8, 2)),
        }),
        # 31 March: all of February is shorter, so all of it is compared.
        (utc(2025, 3, 31, 18), "UTC", {
            "day": ((2025, 3, 31), (2025, 4, 1), (2025, 3, 30), (2025, 3, 31)),
            "week": ((2025, 3, 31), (2025, 4, 1), (2025, 3, 24), (2025, 3, 25)),
            "month": ((2025, 3, 1), (2025, 4, 1), (2025, 2, 1), (2025, 3, 1)),
        }),
        # 30 March of a leap year against the 29 days of February.
        (utc(2024, 3, 30, 12), "UTC", {
            "day": ((2024, 3, 30), (2024, 3, 31), (2024, 3, 29), (2024, 3, 30)),
            "week": ((2024, 3, 25), (2024, 3, 31), (2024, 3, 18), (2024, 3, 24)),
            "month": ((2024, 3, 1), (2024, 3, 31), (2024, 2, 1), (2024, 3, 1)),
        }),
        # 03:00 UTC on New Year's Day is still 31 December in New York: a Tuesday, and December.
        (utc(2025, 1, 1, 3), "America/New_York", {
            "day": ((2024, 12, 31), (2025, 1, 1), (2024, 12, 30), (2024, 12, 31)),
            "week": ((2024, 12, 30), (2025, 1, 1), (2024, 12, 23), (2024, 12, 25)),
            "month": ((2024, 12, 1), (2025, 1, 1), (2024, 11, 1), (2024, 12, 1)),
        }),
        # 18:30 UTC on 31 May is 1 June in Kolkata (+5:30): a new month, the week goes on.
        (utc(2025, 5, 31, 18, 30), "Asia/Kolkata", {
            "day": ((2025, 6, 1), (2025, 6, 2), (2025, 5, 31), (2025, 6, 1)),
            "week": ((2025, 5, 26), (2025, 6, 2), (2025, 5, 19), (2025, 5, 26)),
            "month": ((2025, 6, 1), (2025, 6, 2), (2025, 5, 1), (2025, 5, 2)),
        }),
    ],
    ids=["sunday-mid-june", "monday-the-first", "march-31-vs-february", "leap-march-30", "new-york-new-years-eve", "kolkata-june-starts"],
)
def test_each_period_so_far_is_compared_with_the_same_days_of_the_one_before(db, settings, at, zone, expected) -> None:
    settings.BILLING_TIME_ZONE = zone
    found = {
        spend.kind: (
            spend.current.first_day.timetuple()[:3], spend.current.end_day.timetuple()[:3],
            spend.previous.first_day.timetuple()[:3], spend.previous.end_day.timetuple()[:3],
        )
        for spend in spend_by_period(at=at)
    }
    assert found == expected


@pytest.mark.parametrize(
    ("at", "zone", "days", "first", "end"),
    [
        (utc(2025, 6, 15, 12), "UTC", 30, date(2025, 5, 17), date(2025, 6, 16)),
        (utc(2025, 6, 15, 12), "UTC", 1, date(2025, 6, 15), date(2025, 6, 16)),
        (utc(2025, 3, 1, 12), "UTC", 7, date(2025, 2, 23), date(2025, 3, 2)),
        (utc(2024, 3, 1, 12), "UTC", 7, date(2024, 2, 24), date(2024, 3, 2)),
        (utc(2025, 1, 1, 3), "America/New_York", 365, date(2024, 1, 2), date(2025, 1, 1)),
    ],
    ids=["30-days", "today", "week-over-february", "week-over-leap-february", "year-ending-new-years-eve-in-new-york"],
)
def test_a_run_of_days_ends_today(at, zone, days, first, end) -> None:
    run = days_ending(at, days=days, zone=ZoneInfo(zone))
    assert (run.first_day, run.end_day, run.days) == (first, end, days)
    assert at in run
    assert run.previous().end_day == first and run.previous().days == days


@pytest.mark.parametrize("days", [0, -1, True])
def test_a_run_needs_a_positive_number_of_days(days) -> None:
    with pytest.raises(ValueError, match="positive number of days"):
        days_ending(utc(2025, 6, 15), days=days)
