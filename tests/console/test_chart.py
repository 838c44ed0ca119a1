"""The daily spend chart: one point per day, scaled to the largest day, coordinates from Decimals."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from datetime import date, timedelta
from decimal import Decimal

import pytest

from billing.console.chart import HEIGHT, LEFT, PLOT_HEIGHT, RIGHT, TOP, WIDTH, spend_chart_svg
from billing.console.selectors import DaySpend

SVG = "{http://www.w3.org/2000/svg}"
BOTTOM = TOP + PLOT_HEIGHT


def days_of(*costs: str) -> list[DaySpend]:
    first = date(2025, 6, 1)
    return [DaySpend(day=first + timedelta(days=n), cost_usd=Decimal(cost), requests=n) for n, cost in enumerate(costs)]


def points(svg: str) -> list[dict[str, str]]:
    return [circle.attrib for circle in ElementTree.fromstring(svg).iter(f"{SVG}circle")]


@pytest.mark.parametrize("count", [1, 2, 7, 30, 366])
def test_one_point_per_day_in_order_across_the_plot(count) -> None:
    days = days_of(*(str(n % 5) for n in range(count)))
    drawn = points(spend_chart_svg(days))
    assert [point["data-day"] for point in drawn] == [day.day.isoformat() for day in days]
    xs = [Decimal(point["cx"]) for point in drawn]
    assert xs == sorted(xs)
    if count > 1:
        assert (xs[0], xs[-1]) == (LEFT, WIDTH - RIGHT)


def test_the_largest_day_touches_the_top_and_the_others_scale_to_it() -> None:
    drawn = points(spend_chart_svg(days_of("0", "0.0000000001", "12.5", "25.0000000000", "6.25")))
    assert [Decimal(point["cy"]) for point in drawn] == [
        BOTTOM, BOTTOM, TOP + PLOT_HEIGHT / Decimal(2), TOP, BOTTOM - PLOT_HEIGHT / Decimal(4),
    ]
    # Each point keeps its exact amount; a tiny one is not lost to rounding.
    assert [point["data-cost-usd"] for point in drawn] == ["0", "0.0000000001", "12.5", "25.0000000000", "6.25"]


def test_coordinates_are_written_with_two_decimals_never_as_floats() -> None:
    svg = str(spend_chart_svg(days_of("1", "3", "0.3333333333")))
    for point in points(svg):
        for name in ("cx", "cy"):
            whole, _, places = point[name].partition(".")
            assert whole.isdigit() and len(places) == 2 and "e" not in point[name]
    assert f'viewBox="0 0 {WIDTH} {HEIGHT}"' in svg


def test_a_range_with_no_spend_is_a_flat_line_at_zero() -> None:
    svg = str(spend_chart_svg(days_of("0", "0", "0")))
    assert {Decimal(point["cy"]) for point in points(svg)} == {BOTTOM}
    assert "Nothing was spent in this range." in svg


def test_each_point_links_to_its_day_and_says_what_it_is() -> None:
    svg = str(spend_chart_svg(days_of("0", "1234.5"), link=lambda day: f"/ledger/?day={day:%Y-%m-%d}&x=<>"))
    root = ElementTree.fromstring(svg)
    links = list(root.iter(f"{SVG}a"))
    assert [link.attrib["href"] for link in links] == ["/ledger/?day=2025-06-01&x=<>", "/ledger/?day=2025-06-02&x=<>"]
    assert [title.text for title in root.iter(f"{SVG}title")][-1] == "Mon 2025-06-02: $1,234.50 (1 call)"
    assert "&amp;x=&lt;&gt;" in svg  # escaped in the markup
