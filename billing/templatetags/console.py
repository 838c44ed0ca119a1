"""Template filters of the cost console: amounts as `billing.display` writes them, changes, bars.

`{% load console %}`. Money and counts go through `billing.display` (rounded once, there); what
is the console's own is here: a signed change against the period before, the label of a run of
days, and the widths of a budget's bar, computed from `Decimal` shares and written as text.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

from django import template

from billing import display
from billing.console.selectors import Budget, PeriodSpend
from billing.periods import Period

register = template.Library()

_HUNDRED = Decimal(100)
_TENTH = Decimal("0.1")
_WIDTH = Decimal("0.01")
MINUS = "\N{MINUS SIGN}"


@register.filter
def usd(amount: Decimal) -> str:
    return display.usd_brief(amount)


@register.filter
def usd_exact(amount: Decimal) -> str:
    return display.usd_exact(amount)


@register.filter
def count(value: int | None) -> str:
    return display.NO_VALUE if value is None else display.count(value)


@register.filter
def duration(microseconds: int | None) -> str:
    return display.duration_us(microseconds)


@register.filter
def rate(part: int | None, whole: int) -> str:
    """`part` as a share of `whole` calls; a dash when there were none."""
    if part is None or not whole:
        return display.NO_VALUE
    return display.percent_of(part, whole)


@register.filter
def change(spend: PeriodSpend) -> str:
    """`+12%`, `−8.5%` (one decimal under ten), `new` when nothing was spent before, `—` when neither spent."""
    fraction = spend.change
    if fraction is None:
        return "new" if spend.spent > 0 else display.NO_VALUE
    percent = fraction * _HUNDRED
    places = _TENTH if abs(percent) < 10 else Decimal(1)
    shown = abs(percent).quantize(places, rounding=ROUND_HALF_UP)
    if shown.is_zero():
        return "0%"
    return f"{'+' if percent > 0 else MINUS}{shown:,f}%"


@register.filter
def direction(spend: PeriodSpend) -> str:
    """`up`, `down` or `flat`: a class for the change's arrow."""
    if spend.spent == spend.previous_spent:
        return "flat"
    return "up" if spend.spent > spend.previous_spent else "down"


@register.filter
def days_label(period: Period) -> str:
    """`Sun Jun 15`, `Jun 1–15`, `May 26 – Jun 1`, `Dec 30, 2024 – Jan 5, 2025`."""
    first, last = period.first_day, period.end_day - timedelta(days=1)
    if first == last:
        return f"{first:%a %b} {first.day}"
    if first.year != last.year:
        return f"{first:%b} {first.day}, {first.year} \N{EN DASH} {last:%b} {last.day}, {last.year}"
    if first.month == last.month:
        return f"{first:%b} {first.day}\N{EN DASH}{last.day}"
    return f"{first:%b} {first.day} \N{EN DASH} {last:%b} {last.day}"


@register.filter
def amount(value: Decimal, budget: Budget) -> str:
    """A budget's figure: money for a spend limit, a token count for a token quota."""
    return display.usd_brief(value) if budget.kind == "spend" else display.count(int(value))


@register.filter
def bar(budget: Budget, part: str) -> str:
    """Width (of 100) of a budget bar's segment: `spent`, `held` (after spent) or `threshold` (a position)."""
    if part == "spent":
        share = budget.share(budget.spent)
    elif part == "held":
        share = budget.share(budget.used) - budget.share(budget.spent)
    else:
        raise ValueError(f"Unknown bar segment {part!r}.")
    return format((share * _HUNDRED).quantize(_WIDTH, rounding=ROUND_HALF_UP), "f")


@register.filter
def position(fraction: Decimal) -> str:
    """A fraction (such as a soft threshold) as a position of 100."""
    return format((min(fraction, Decimal(1)) * _HUNDRED).quantize(_WIDTH, rounding=ROUND_HALF_UP), "f")


@register.filter
def percent(fraction: Decimal) -> str:
    """A fraction as a percentage: `0.8` is `80%`."""
    return display.percent_of(fraction, 1)


@register.filter
def used(budget: Budget) -> str:
    """The share of the budget used (spent + held), as `billing.display` rounds it (down)."""
    return display.percent_of(budget.used, budget.limit)


@register.filter
def state(budget: Budget, threshold: Decimal) -> str:
    """`over` (used all or more), `warn` (past the soft threshold) or `ok`."""
    if budget.fraction >= 1:
        return "over"
    return "warn" if budget.fraction >= threshold else "ok"
