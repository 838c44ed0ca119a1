"""Amounts for people: money, shares of a budget, token counts and durations, as the admin shows them.

Pure functions of `Decimal` and `int` (a float is refused, as in `billing.money`). Each rounds once,
at this display boundary, with a named rounding mode; stored values are never rounded here.

- Money in lists (`usd_brief`) rounds half-up to the cent, like `billing.money.usd_display`; an
  amount under ten cents keeps two significant digits (`$0.0036`, `$0.016`), so a cheap call never
  reads as `$0.00` and a 1.55-cent one not as 2 cents. Detail pages show `usd_exact`: every stored
  digit, trailing zeros past the cent dropped.
- A share of a budget (`percent_of`) rounds down (toward zero): a budget reads `100%` only once it is
  wholly used, never while a little is left.
- Durations round half-up in the unit they are shown in (`250 ms`, `1.2 s`, `2 min 5 s`).
"""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal

from django.utils import timezone

from billing.money import money_ratio, usd

MONEY_ROUNDING = ROUND_HALF_UP
PERCENT_ROUNDING = ROUND_DOWN
DURATION_ROUNDING = ROUND_HALF_UP

CENT = Decimal("0.01")
DIME = Decimal("0.1")
SIGNIFICANT_DIGITS_UNDER_A_DIME = 2
NO_VALUE = "—"
BAD_COUNT = "Expected a non-negative int, got {value!r}."

_ONE = Decimal(1)
_TENTH = Decimal("0.1")
_HUNDRED = Decimal(100)


def _signed(text: str, negative: bool) -> str:
    return f"-{text}" if negative else text


def usd_brief(amount: Decimal | int | str) -> str:
    """`$1,234.56` for lists; under ten cents, two significant digits: `$0.016`, `$0.0036`, `$0.000001`."""
    value = usd(amount)
    if value.is_zero():
        return "$0.00"
    magnitude = abs(value)
    if magnitude < DIME:
        places = SIGNIFICANT_DIGITS_UNDER_A_DIME - 1 - magnitude.adjusted()
        rounded = magnitude.quantize(_ONE.scaleb(-places), rounding=MONEY_ROUNDING)
        if rounded < DIME:  # else it rounded up to ten cents: shown in cents below
            # Under a dime, at least two places remain once trailing zeros go: $0.05, $0.0036.
            return _signed(f"${format(rounded.normalize(), 'f')}", value < 0)
    cents = magnitude.quantize(CENT, rounding=MONEY_ROUNDING)
    return _signed(f"${format(cents, ',f')}", value < 0)


def usd_exact(amount: Decimal | int | str) -> str:
    """Every stored digit, with at least cents: `$0.003607` for `0.0036070000`, `$25.00` for `25.0000000000`."""
    value = usd(amount)
    magnitude = abs(value)
    cents = magnitude.quantize(CENT, rounding=ROUND_DOWN)
    shown = cents if cents == magnitude else magnitude.normalize()  # nothing is rounded either way
    return _signed(f"${format(shown, ',f')}", value < 0)


def percent_of(part: Decimal | int, whole: Decimal | int) -> str:
    """`part` as a share of `whole`, rounded down: `42%`, `9.9%` under ten, `<0.1%` for a sliver.

    A whole of zero (a budget of nothing) is wholly used: `100%`.
    """
    part, whole = usd(part), usd(whole)
    if whole <= 0:
        return "100%"
    share = money_ratio(part, whole) * _HUNDRED
    if share <= 0:
        return "0%"
    if share < 10:
        shown = share.quantize(_TENTH, rounding=PERCENT_ROUNDING)
        return "<0.1%" if shown.is_zero() else f"{shown}%"
    return f"{share.quantize(_ONE, rounding=PERCENT_ROUNDING):,f}%"


def count(value: int) -> str:
    """A count of tokens or requests: `1,234,567`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(BAD_COUNT.format(value=value))
    return f"{value:,}"


def duration_us(microseconds: int | None) -> str:
    """A duration held in microseconds: `0.4 ms`, `250 ms`, `1.2 s`, `2 min 5 s`, `1 h 2 min`."""
    if microseconds is None:
        return NO_VALUE
    if isinstance(microseconds, bool) or not isinstance(microseconds, int) or microseconds < 0:
        raise TypeError(BAD_COUNT.format(value=microseconds))
    ms = Decimal(microseconds) / 1000
    if (tenths := ms.quantize(_TENTH, rounding=DURATION_ROUNDING)) < 10:
        return f"{tenths} ms"
    if (whole_ms := ms.quantize(_ONE, rounding=DURATION_ROUNDING)) < 1000:
        return f"{whole_ms} ms"
    seconds = Decimal(microseconds) / 1_000_000
    if (tenths := seconds.quantize(_TENTH, rounding=DURATION_ROUNDING)) < 60:
        return f"{tenths} s"
    total = int(seconds.quantize(_ONE, rounding=DURATION_ROUNDING))
    if total < 3600:
        minutes, rest = divmod(total, 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    total_minutes = int((seconds / 60).quantize(_ONE, rounding=DURATION_ROUNDING))
    hours, minutes = divmod(total_minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def when(at: datetime | None) -> str:
    """An instant in the current time zone, to the minute: `2025-06-15 12:00`."""
    if at is None:
        return NO_VALUE
    return f"{timezone.localtime(at):%Y-%m-%d %H:%M}"


def when_brief(at: datetime, *, now: datetime | None = None) -> str:
    """An instant as short as a list needs, in the current time zone: `14:03:27` today,
    `Jun 15 14:03` this year, `2024-06-15` before."""
    local, today = timezone.localtime(at), timezone.localtime(now or timezone.now())
    if local.date() == today.date():
        return f"{local:%H:%M:%S}"
    if local.year == today.year:
        return f"{local:%b} {local.day} {local:%H:%M}"
    return f"{local:%Y-%m-%d}"


def when_exact(at: datetime) -> str:
    """An instant to the microsecond, with its zone: `2025-06-15 14:03:27.123456 UTC`."""
    return f"{timezone.localtime(at):%Y-%m-%d %H:%M:%S.%f %Z}"
