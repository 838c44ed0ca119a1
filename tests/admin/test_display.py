"""How the console writes amounts for people (`billing.display`): tables of cases."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.display import count, duration_us, percent_of, usd_brief, usd_exact


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        pytest.param("0", "$0.00", id="zero"),
        pytest.param("0E-10", "$0.00", id="zero-at-ledger-places"),
        pytest.param("0.0036070000", "$0.0036", id="tiny-two-significant-digits"),
        pytest.param("0.0000000001", "$0.0000000001", id="one-ledger-quantum"),
        pytest.param("0.0030000000", "$0.003", id="tiny-no-trailing-zero"),
        pytest.param("0.004999", "$0.005", id="tiny-rounds-half-up"),
        pytest.param("0.00995", "$0.01", id="tiny-rounds-up-to-a-cent"),
        pytest.param("0.01", "$0.01", id="one-cent"),
        pytest.param("0.0155", "$0.016", id="under-a-dime-two-significant-digits"),
        pytest.param("0.05", "$0.05", id="five-cents"),
        pytest.param("0.0999", "$0.10", id="rounds-up-to-a-dime"),
        pytest.param("0.45", "$0.45", id="cents"),
        pytest.param("0.125", "$0.13", id="cents-half-up-not-half-even"),
        pytest.param("0.1249999999", "$0.12", id="cents-just-below-half"),
        pytest.param("25.0000000000", "$25.00", id="budget-at-ledger-places"),
        pytest.param("1234.5600000000", "$1,234.56", id="thousands"),
        pytest.param("1234.565", "$1,234.57", id="thousands-half-up"),
        pytest.param("999.995", "$1,000.00", id="rounds-into-thousands"),
        pytest.param("922337203.6854775807", "$922,337,203.69", id="largest-on-sqlite"),
        pytest.param("-12.5", "-$12.50", id="negative"),
        pytest.param("-0.0036", "-$0.0036", id="negative-tiny"),
    ],
)
def test_money_in_lists(amount: str, shown: str) -> None:
    assert usd_brief(Decimal(amount)) == shown


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        pytest.param("0E-10", "$0.00", id="zero"),
        pytest.param("0.0036070000", "$0.003607", id="tiny-every-digit"),
        pytest.param("0.0000000001", "$0.0000000001", id="one-ledger-quantum"),
        pytest.param("25.0000000000", "$25.00", id="whole-dollars-keep-cents"),
        pytest.param("1234.5", "$1,234.50", id="thousands"),
        pytest.param("1234.5678901234", "$1,234.5678901234", id="nothing-rounded"),
        pytest.param("-0.125", "-$0.125", id="negative"),
    ],
)
def test_money_on_detail_pages_is_exact(amount: str, shown: str) -> None:
    assert usd_exact(Decimal(amount)) == shown
    assert Decimal(shown.replace("$", "").replace(",", "")) == Decimal(amount)


def test_money_refuses_floats() -> None:
    with pytest.raises(TypeError):
        usd_brief(0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        usd_exact(0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("part", "whole", "shown"),
    [
        pytest.param("0", "25", "0%", id="nothing-used"),
        pytest.param("0.0001", "25", "<0.1%", id="a-sliver"),
        pytest.param("0.99", "10", "9.9%", id="under-ten-one-decimal"),
        pytest.param("10.5", "25", "42%", id="whole-percent"),
        pytest.param("24.99", "25", "99%", id="rounds-down-not-to-100"),
        pytest.param("25", "25", "100%", id="all-used"),
        pytest.param("30", "25", "120%", id="over-budget"),
        pytest.param("0", "0", "100%", id="a-zero-budget-is-used-up"),
    ],
)
def test_share_of_a_budget(part: str, whole: str, shown: str) -> None:
    assert percent_of(Decimal(part), Decimal(whole)) == shown


@pytest.mark.parametrize(
    ("microseconds", "shown"),
    [
        pytest.param(None, "—", id="none"),
        pytest.param(0, "0.0 ms", id="zero"),
        pytest.param(400, "0.4 ms", id="sub-millisecond"),
        pytest.param(9_949, "9.9 ms", id="under-ten-ms"),
        pytest.param(9_950, "10 ms", id="rounds-into-whole-ms"),
        pytest.param(250_733, "251 ms", id="ttft"),
        pytest.param(999_499, "999 ms", id="just-under-a-second"),
        pytest.param(999_500, "1.0 s", id="rounds-into-seconds"),
        pytest.param(1_234_567, "1.2 s", id="seconds"),
        pytest.param(59_949_999, "59.9 s", id="under-a-minute"),
        pytest.param(59_950_000, "1 min", id="rounds-into-minutes"),
        pytest.param(125_000_000, "2 min 5 s", id="minutes"),
        pytest.param(3_720_000_000, "1 h 2 min", id="hours"),
    ],
)
def test_durations(microseconds: int | None, shown: str) -> None:
    assert duration_us(microseconds) == shown


@pytest.mark.parametrize(("value", "shown"), [(0, "0"), (999, "999"), (1_234_567, "1,234,567")], ids=["zero", "hundreds", "millions"])
def test_counts(value: int, shown: str) -> None:
    assert count(value) == shown
