"""Money: the one place USD amounts are computed. `Decimal` only; a float is refused on sight.

Rates are USD per 1M tokens. A call's cost is computed exactly (a local context wide enough that
no digit is lost) and rounded once, half-even, to the ledger's quantum of 1e-10 USD: that stored
value is what rollups and budgets add up, so ledger, rollups and a fresh `SUM()` agree exactly.
Display rounding (`usd_display`) is a separate, named boundary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation, localcontext
from typing import Literal

TOKENS_PER_RATE_UNIT = 1_000_000  # rates are USD per this many tokens
LEDGER_PLACES = 10
LEDGER_QUANTUM = Decimal(1).scaleb(-LEDGER_PLACES)  # 1e-10 USD
LEDGER_ROUNDING = ROUND_HALF_EVEN
DISPLAY_QUANTUM = Decimal("0.000001")  # USD, in messages and headers
DISPLAY_ROUNDING = ROUND_HALF_UP
# Wide enough for 1e12 tokens x 1e6 USD/1M x a multiplier with 4 places, with no digit lost.
_EXACT_PRECISION = 60

FLOAT_REFUSED = "Money must be a Decimal, an int or a numeric string, never a float: got {value!r}."
NOT_A_NUMBER = "Not a decimal amount: {value!r}."
NEGATIVE_AMOUNT = "{name} must not be negative: got {value}."
BAD_TOKEN_COUNT = "{name} must be a non-negative int: got {value!r}."
CACHED_EXCEEDS_PROMPT = "cached_tokens ({cached}) cannot exceed prompt_tokens ({prompt})."

PriceSource = Literal["catalog", "plan", "account"]


def usd(value: Decimal | int | str) -> Decimal:
    """Return `value` as a finite Decimal; refuse floats (and bools), which cannot hold money."""
    if isinstance(value, bool | float):
        raise TypeError(FLOAT_REFUSED.format(value=value))
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(NOT_A_NUMBER.format(value=value)) from None
    else:
        raise TypeError(FLOAT_REFUSED.format(value=value))
    if not amount.is_finite():
        raise ValueError(NOT_A_NUMBER.format(value=value))
    return amount


def money_sum(values: Iterable[Decimal | int | str]) -> Decimal:
    """Add amounts exactly."""
    with localcontext(prec=_EXACT_PRECISION):
        return sum((usd(value) for value in values), Decimal(0))


def money_ratio(part: Decimal, whole: Decimal) -> Decimal:
    """`part / whole` (whole > 0), e.g. for a budget's used fraction."""
    with localcontext(prec=_EXACT_PRECISION):
        return usd(part) / usd(whole)


def usd_display(value: Decimal) -> str:
    """A USD amount for people: `$0.000435`."""
    return f"${usd(value).quantize(DISPLAY_QUANTUM, rounding=DISPLAY_ROUNDING)}"


def ledger_quantize(value: Decimal) -> Decimal:
    with localcontext(prec=_EXACT_PRECISION):
        return usd(value).quantize(LEDGER_QUANTUM, rounding=LEDGER_ROUNDING)


def _tokens(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(BAD_TOKEN_COUNT.format(name=name, value=value))
    return value


@dataclass(frozen=True, slots=True)
class Rates:
    """The prices one call is billed at: what the ledger snapshots next to the cost.

    `cached_input` is already resolved (a model without a cached price bills cached tokens at the
    input rate). `multiplier` is the plan's markup or discount actually applied (1 for overrides).
    """

    input: Decimal  # USD per 1M prompt tokens that were not cached
    cached_input: Decimal  # USD per 1M cached prompt tokens
    output: Decimal  # USD per 1M completion tokens (reasoning tokens included, as OpenAI bills)
    multiplier: Decimal = Decimal(1)
    source: PriceSource = "catalog"

    def __post_init__(self) -> None:
        for name in ("input", "cached_input", "output", "multiplier"):
            amount = usd(getattr(self, name))
            if amount < 0:
                raise ValueError(NEGATIVE_AMOUNT.format(name=name, value=amount))
            object.__setattr__(self, name, amount)

    def cost(self, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> Decimal:
        """The exact cost in USD, rounded once to the ledger quantum.

        `prompt_tokens` includes `cached_tokens`, as OpenAI reports them: the uncached part is
        billed at the input rate and the cached part at the cached rate.
        """
        prompt = _tokens("prompt_tokens", prompt_tokens)
        cached = _tokens("cached_tokens", cached_tokens)
        completion = _tokens("completion_tokens", completion_tokens)
        if cached > prompt:
            raise ValueError(CACHED_EXCEEDS_PROMPT.format(cached=cached, prompt=prompt))
        with localcontext(prec=_EXACT_PRECISION):
            per_million = (prompt - cached) * self.input + cached * self.cached_input + completion * self.output
            exact = per_million * self.multiplier / TOKENS_PER_RATE_UNIT
            return exact.quantize(LEDGER_QUANTUM, rounding=LEDGER_ROUNDING)
