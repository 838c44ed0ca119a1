"""Export bounds: dates and datetimes read in BILLING_TIME_ZONE, the range half-open."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from billing.exports import ExportError, export_spec_parse


@pytest.mark.parametrize(
    ("zone", "raw", "instant"),
    [
        ("UTC", "2025-06-01", datetime(2025, 6, 1, tzinfo=UTC)),
        ("America/New_York", "2025-06-01", datetime(2025, 6, 1, 4, tzinfo=UTC)),
        ("America/New_York", "2025-01-15", datetime(2025, 1, 15, 5, tzinfo=UTC)),
        ("America/New_York", "2025-03-09", datetime(2025, 3, 9, 5, tzinfo=UTC)),
        ("America/New_York", "2025-06-01T10:30", datetime(2025, 6, 1, 14, 30, tzinfo=UTC)),
        ("America/New_York", "2025-06-01T10:30:00.250000", datetime(2025, 6, 1, 14, 30, 0, 250_000, tzinfo=UTC)),
        ("America/New_York", "2025-06-01T10:30:00+00:00", datetime(2025, 6, 1, 10, 30, tzinfo=UTC)),
        ("America/New_York", "2025-06-01T10:30:00Z", datetime(2025, 6, 1, 10, 30, tzinfo=UTC)),
        ("America/New_York", "2025-11-02T01:30-04:00", datetime(2025, 11, 2, 5, 30, tzinfo=UTC)),
        ("Asia/Kolkata", "2025-06-01", datetime(2025, 5, 31, 18, 30, tzinfo=UTC)),
        # Chile's clocks skip midnight on 7 September 2025: the day begins at 01:00 (-03).
        ("America/Santiago", "2025-09-07", datetime(2025, 9, 7, 4, tzinfo=UTC)),
        ("UTC", " 2025-06-01 ", datetime(2025, 6, 1, tzinfo=UTC)),
    ],
    ids=[
        "utc-date", "new-york-summer-date", "new-york-winter-date", "new-york-dst-day", "local-datetime",
        "local-microseconds", "utc-offset", "z-suffix", "offset-in-repeated-hour", "half-hour-zone",
        "midnight-skipped", "spaces",
    ],
)
def test_a_bound_is_read_in_the_billing_time_zone(settings, zone: str, raw: str, instant: datetime) -> None:
    settings.BILLING_TIME_ZONE = zone
    assert export_spec_parse(since=raw).since == instant
    assert export_spec_parse(until=raw).until == instant


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"since": "2025-06-01", "until": "2025-05-31T23:59:59.999999"}, "since"),
        ({"since": "2025-06-01T12:00", "until": "2025-06-01T12:00:00Z"}, "since"),
        ({"format": "parquet"}, "format"),
        ({"group_by": ["user", "hour"]}, "group_by"),
        ({"since": "01/06/2025"}, "since"),
        ({"until": "2025-06"}, "until"),
    ],
    ids=["until-before-since", "empty-range", "format", "group", "slashes", "month-only"],
)
def test_errors_name_their_argument(kwargs, argument: str) -> None:
    with pytest.raises(ExportError) as raised:
        export_spec_parse(**kwargs)
    assert raised.value.argument == argument
    assert raised.value.for_option().startswith(f"--{argument.replace('_', '-')}: ")


def test_groups_keep_their_order_and_repeats_count_once() -> None:
    assert export_spec_parse(group_by=["day", "user", "day"]).group_by == ("day", "user")
    assert export_spec_parse(group_by=["none"]).group_by == ()
