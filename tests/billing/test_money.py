"""Cost arithmetic: exact Decimal, cached tokens at the cached rate, one rounding, no floats."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.money import FLOAT_REFUSED, Rates, money_sum, usd, usd_display

D = Decimal
GPT_4O_MINI = Rates(input=D("0.15"), cached_input=D("0.075"), output=D("0.60"))
GPT_4O = Rates(input=D("2.50"), cached_input=D("1.25"), output=D("10.00"))
# gpt-4-turbo has no cached price: cached tokens pay the input rate.
GPT_4_TURBO = Rates(input=D("10"), cached_input=D("10"), output=D("30"))
GPT_41_NANO = Rates(input=D("0.10"), cached_input=D("0.025"), output=D("0.40"))


@pytest.mark.parametrize(
    ("rates", "prompt", "cached", "completion", "expected"),
    [
        (GPT_4O_MINI, 1000, 0, 500, D("0.00045")),
        (GPT_4O_MINI, 1000, 200, 500, D("0.000435")),  # 800 x 0.15 + 200 x 0.075 + 500 x 0.60
        (GPT_4O, 1_000_000, 1_000_000, 0, D("1.25")),
        (GPT_4O, 0, 0, 1_000_000, D("10")),
        (GPT_4_TURBO, 1000, 400, 100, D("0.013")),
        (GPT_41_NANO, 12345, 345, 6789, D("0.003924225")),
        (Rates(input=D("0.15"), cached_input=D("0.075"), output=D("0.60"), multiplier=D("1.2")), 1000, 200, 500, D("0.000522")),
        (Rates(input=D("0.10"), cached_input=D("0.025"), output=D("0.40"), multiplier=D("0.8")), 12345, 345, 6789, D("0.00313938")),
        (GPT_4O_MINI, 0, 0, 0, D("0")),
        (Rates(input=D("999999.999999"), cached_input=D("0"), output=D("0")), 10**9, 0, 0, D("999999999.999")),
        # One rounding, half-even, to the ledger quantum of 1e-10 USD.
        (Rates(input=D("0.00015"), cached_input=D("0"), output=D("0")), 1, 0, 0, D("0.0000000002")),
        (Rates(input=D("0.00005"), cached_input=D("0"), output=D("0")), 1, 0, 0, D("0")),
        (Rates(input=D("0.00025"), cached_input=D("0"), output=D("0")), 1, 0, 0, D("0.0000000002")),
    ],
    ids=[
        "mini-no-cache", "mini-cached", "4o-all-cached", "4o-output-only", "turbo-no-cached-rate",
        "nano-odd-counts", "plan-markup-1.2", "plan-discount-0.8", "zero", "huge-exact",
        "half-even-up", "half-even-down-to-zero", "half-even-to-even",
    ],
)
def test_cost_is_exact(rates: Rates, prompt: int, cached: int, completion: int, expected: Decimal) -> None:
    cost = rates.cost(prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion)
    assert isinstance(cost, Decimal)
    assert cost == expected
    assert cost.as_tuple().exponent == -10  # stored at the ledger quantum


@pytest.mark.parametrize("value", [0.1, 1.0, float("nan")], ids=["tenth", "one", "nan"])
def test_floats_are_refused_everywhere_money_enters(value: float) -> None:
    with pytest.raises(TypeError) as raised:
        usd(value)  # type: ignore[arg-type]
    assert str(raised.value) == FLOAT_REFUSED.format(value=value)
    with pytest.raises(TypeError):
        Rates(input=value, cached_input=D(0), output=D(0))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        money_sum([D("1"), value])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("value", "error"),
    [(True, TypeError), ("abc", ValueError), ("Infinity", ValueError), (None, TypeError)],
    ids=["bool", "text", "infinity", "none"],
)
def test_non_amounts_are_refused(value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        usd(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prompt", "cached", "completion"),
    [(10, 11, 0), (-1, 0, 0), (0, 0, -5), (1.0, 0, 0), (True, 0, 0)],
    ids=["cached-over-prompt", "negative-prompt", "negative-completion", "float-count", "bool-count"],
)
def test_bad_token_counts_are_refused(prompt: object, cached: object, completion: object) -> None:
    with pytest.raises(ValueError):
        GPT_4O_MINI.cost(prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion)  # type: ignore[arg-type]


def test_negative_rates_are_refused() -> None:
    with pytest.raises(ValueError):
        Rates(input=D("-0.01"), cached_input=D(0), output=D(0))


def test_sums_are_exact_where_floats_drift() -> None:
    assert money_sum([D("0.1")] * 10) == D("1")
    assert money_sum(["0.0000000001"] * 3) == D("0.0000000003")


def test_display_rounds_half_up_to_the_micro_dollar() -> None:
    assert usd_display(D("0.0000005")) == "$0.000001"
    assert usd_display(D("12.5")) == "$12.500000"
