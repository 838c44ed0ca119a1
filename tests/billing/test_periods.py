"""Calendar periods in the billing time zone: month ends, leap years, time-zone and DST edges."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from billing.periods import billing_day, billing_zone, period_containing


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("kind", "at", "zone", "first_day", "end_day", "start", "hours"),
    [
        ("day", utc(2025, 6, 15, 12), "UTC", date(2025, 6, 15), date(2025, 6, 16), utc(2025, 6, 15), 24),
        ("day", utc(2025, 6, 15, 0), "UTC", date(2025, 6, 15), date(2025, 6, 16), utc(2025, 6, 15), 24),
        ("month", utc(2025, 1, 31, 23, 59, 59), "UTC", date(2025, 1, 1), date(2025, 2, 1), utc(2025, 1, 1), 31 * 24),
        ("month", utc(2025, 2, 1), "UTC", date(2025, 2, 1), date(2025, 3, 1), utc(2025, 2, 1), 28 * 24),
        ("month", utc(2024, 2, 29, 12), "UTC", date(2024, 2, 1), date(2024, 3, 1), utc(2024, 2, 1), 29 * 24),
        ("day", utc(2024, 2, 29, 23, 59), "UTC", date(2024, 2, 29), date(2024, 3, 1), utc(2024, 2, 29), 24),
        ("month", utc(2100, 2, 15), "UTC", date(2100, 2, 1), date(2100, 3, 1), utc(2100, 2, 1), 28 * 24),
        ("month", utc(2000, 2, 15), "UTC", date(2000, 2, 1), date(2000, 3, 1), utc(2000, 2, 1), 29 * 24),
        ("month", utc(2025, 12, 31, 23), "UTC", date(2025, 12, 1), date(2026, 1, 1), utc(2025, 12, 1), 31 * 24),
        ("month", utc(2025, 4, 30, 12), "UTC", date(2025, 4, 1), date(2025, 5, 1), utc(2025, 4, 1), 30 * 24),
        # 22:30 UTC on 31 March is 00:30 on 1 April in Berlin (CEST, +2): April there.
        ("month", utc(2025, 3, 31, 22, 30), "Europe/Berlin", date(2025, 4, 1), date(2025, 5, 1), utc(2025, 3, 31, 22), 30 * 24),
        # 03:00 UTC on New Year's Day is still 31 December in New York (EST, -5).
        ("month", utc(2025, 1, 1, 3), "America/New_York", date(2024, 12, 1), date(2025, 1, 1), utc(2024, 12, 1, 5), 31 * 24),
        ("day", utc(2025, 1, 1, 3), "America/New_York", date(2024, 12, 31), date(2025, 1, 1), utc(2024, 12, 31, 5), 24),
        # Berlin springs forward on 30 March 2025: a 23-hour day; falls back on 26 October: 25 hours.
        ("day", utc(2025, 3, 30, 12), "Europe/Berlin", date(2025, 3, 30), date(2025, 3, 31), utc(2025, 3, 29, 23), 23),
        ("day", utc(2025, 10, 26, 12), "Europe/Berlin", date(2025, 10, 26), date(2025, 10, 27), utc(2025, 10, 25, 22), 25),
        # March in Berlin has the spring-forward hour missing.
        ("month", utc(2025, 3, 10), "Europe/Berlin", date(2025, 3, 1), date(2025, 4, 1), utc(2025, 2, 28, 23), 31 * 24 - 1),
        # UTC+14: 10:00 UTC is already midnight of the next day.
        ("day", utc(2025, 6, 15, 10), "Pacific/Kiritimati", date(2025, 6, 16), date(2025, 6, 17), utc(2025, 6, 15, 10), 24),
        # A half-hour zone (India, +5:30) at the turn of a month.
        ("month", utc(2025, 5, 31, 18, 30), "Asia/Kolkata", date(2025, 6, 1), date(2025, 7, 1), utc(2025, 5, 31, 18, 30), 30 * 24),
        ("month", utc(2025, 5, 31, 18, 29, 59), "Asia/Kolkata", date(2025, 5, 1), date(2025, 6, 1), utc(2025, 4, 30, 18, 30), 31 * 24),
    ],
    ids=[
        "day-midday", "day-at-midnight", "jan-last-second", "feb-first-instant", "leap-feb", "leap-day",
        "2100-not-leap", "2000-leap", "december-to-next-year", "april-30-days", "berlin-already-april",
        "new-york-still-december", "new-york-still-dec-31", "berlin-spring-forward-day",
        "berlin-fall-back-day", "berlin-march-23h-short", "kiritimati-next-day", "kolkata-june-starts",
        "kolkata-one-second-before-june",
    ],
)
def test_period_containing(kind, at, zone, first_day, end_day, start, hours) -> None:
    period = period_containing(kind, at, zone=ZoneInfo(zone))
    assert (period.first_day, period.end_day) == (first_day, end_day)
    assert period.start == start
    assert period.end - period.start == timedelta(hours=hours)
    assert at in period
    assert period.start in period and period.end not in period


def test_the_zone_comes_from_the_setting(settings) -> None:
    settings.BILLING_TIME_ZONE = "America/New_York"
    assert billing_zone() == ZoneInfo("America/New_York")
    assert billing_day(utc(2025, 1, 1, 3)) == date(2024, 12, 31)
    assert period_containing("month", utc(2025, 1, 1, 3)).first_day == date(2024, 12, 1)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError):
        billing_day(datetime(2025, 1, 1))
