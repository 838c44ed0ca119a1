"""The console's daily spend chart: an SVG drawn on the server, no script and no chart library.

Coordinates are computed from `Decimal` ratios (`billing.money.money_ratio`) and written with two
decimals, so money never passes through a float, even on its way to a pixel. The y axis runs from
zero to the range's largest day exactly: that day's point touches the top of the plot.
Each day is a point (a `circle` with `data-day` and `data-cost-usd`, the exact amount), linked to
that day's ledger when a `link` is given, with a tooltip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from html import escape

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from billing.console.selectors import DaySpend
from billing.display import usd_brief
from billing.money import money_ratio

WIDTH = 1200
HEIGHT = 260
LEFT = 72  # room for the y labels
RIGHT = 16
TOP = 16
BOTTOM = 30  # room for the x labels
PLOT_WIDTH = WIDTH - LEFT - RIGHT
PLOT_HEIGHT = HEIGHT - TOP - BOTTOM
GRID_LINES = 4  # horizontal lines above zero
X_LABELS = 8  # at most, plus the last day
COORDINATE = Decimal("0.01")


def _coordinate(value: Decimal) -> str:
    return format(value.quantize(COORDINATE, rounding=ROUND_HALF_UP), "f")


def _x(index: int, count: int) -> Decimal:
    if count == 1:
        return Decimal(LEFT) + Decimal(PLOT_WIDTH) / 2
    return Decimal(LEFT) + Decimal(PLOT_WIDTH) * index / (count - 1)


def _y(amount: Decimal, peak: Decimal) -> Decimal:
    bottom = Decimal(TOP + PLOT_HEIGHT)
    if peak <= 0:
        return bottom
    return bottom - Decimal(PLOT_HEIGHT) * money_ratio(amount, peak)


def _day_label(day: date) -> str:
    return f"{day:%b} {day.day}"


def spend_chart_svg(days: Sequence[DaySpend], *, link: Callable[[date], str] | None = None) -> SafeString:
    """The SVG of spend per day, one point per entry of `days` (in order), scaled to the largest."""
    if not days:
        return mark_safe("")
    peak = max(day.cost_usd for day in days)
    count = len(days)
    points = [(_coordinate(_x(index, count)), _coordinate(_y(day.cost_usd, peak)), day) for index, day in enumerate(days)]
    bottom = _coordinate(Decimal(TOP + PLOT_HEIGHT))
    grid = []
    for step_up in range(GRID_LINES + 1):
        amount = peak * step_up / GRID_LINES if peak > 0 else Decimal(0)
        y = _coordinate(Decimal(TOP + PLOT_HEIGHT) - Decimal(PLOT_HEIGHT) * step_up / GRID_LINES)
        grid.append((y, usd_brief(amount) if peak > 0 or step_up == 0 else ""))
    step = max(1, -(-count // X_LABELS))  # ceil
    labelled = [index for index in range(count) if index % step == 0]
    if count - 1 not in labelled:
        if labelled and count - 1 - labelled[-1] < step / 2:
            labelled.pop()  # too close to the last day's label
        labelled.append(count - 1)
    first, last = days[0], days[-1]
    peak_day = max(days, key=lambda day: (day.cost_usd, day.day))
    title = f"Spend per day, {first.day:%Y-%m-%d} to {last.day:%Y-%m-%d}"
    description = (
        f"Largest day: {usd_brief(peak)} on {peak_day.day:%Y-%m-%d}." if peak > 0 else "Nothing was spent in this range."
    )
    line = " ".join(f"{x},{y}" for x, y, _ in points)
    area = f"{points[0][0]},{bottom} {line} {points[-1][0]},{bottom}"

    def point(x: str, y: str, day: DaySpend) -> str:
        # Up to 366 of them: each value escaped here (`format_html` took three times as long).
        dot = (
            f'<circle class="point" cx="{escape(x)}" cy="{escape(y)}" r="3.5" data-day="{day.day:%Y-%m-%d}"'
            f' data-cost-usd="{escape(format(day.cost_usd, "f"))}"><title>{day.day:%a %Y-%m-%d}: {escape(usd_brief(day.cost_usd))}'
            f" ({day.requests:,} call{'' if day.requests == 1 else 's'})</title></circle>"
        )
        if link is None:
            return dot
        return f'<a href="{escape(link(day.day))}">{dot}</a>'

    return format_html(
        '<svg class="spend-chart" viewBox="0 0 {width} {height}" role="img" aria-labelledby="spend-chart-title spend-chart-desc"'
        ' data-peak-usd="{peak}" data-top="{top}" data-bottom="{bottom}" xmlns="http://www.w3.org/2000/svg">'
        '<title id="spend-chart-title">{title}</title><desc id="spend-chart-desc">{description}</desc>'
        "{grid}{xlabels}"
        '<polygon class="area" points="{area}"/><polyline class="line" points="{line}"/>'
        "{points}</svg>",
        width=WIDTH,
        height=HEIGHT,
        peak=format(peak, "f"),
        top=TOP,
        bottom=TOP + PLOT_HEIGHT,
        title=title,
        description=description,
        grid=format_html_join(
            "",
            '<line class="grid" x1="{}" x2="{}" y1="{}" y2="{}"/><text class="y-label" x="{}" y="{}">{}</text>',
            ((LEFT, WIDTH - RIGHT, y, y, LEFT - 8, y, label) for y, label in grid),
        ),
        xlabels=format_html_join(
            "",
            '<text class="x-label" x="{}" y="{}">{}</text>',
            ((points[index][0], HEIGHT - 8, _day_label(days[index].day)) for index in labelled),
        ),
        area=area,
        line=line,
        points=mark_safe("".join(point(x, y, day) for x, y, day in points)),  # noqa: S308  # escaped in point()
    )
