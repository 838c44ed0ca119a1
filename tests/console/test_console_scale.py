"""The console's reads as built for a year of rollups (`bench/admin_pages.py`): the chart's days and
the range's totals from one pass, the top tables grouped by their key alone and named after."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.console.selectors import console_days, range_totals, top_spenders
from billing.money import money_ratio
from llmgateway.services import api_key_create

from .conftest import NOW

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]


def test_the_chart_days_add_up_to_the_range_totals(call, user_factory) -> None:
    ann, bob = user_factory("ann"), user_factory("bob")
    for days_ago, user, status in ((0, ann, "completed"), (0, bob, "cancelled"), (2, ann, "upstream_error"), (6, bob, "completed"), (7, ann, "completed")):
        call(user, at=NOW - timedelta(days=days_ago), prompt=1000 * (days_ago + 1), completion=10, status=status)
    totals = range_totals(days=console_days(at=NOW, days=7))  # the 7th day back is outside
    assert [day.cost_usd for day in totals.by_day] == [Decimal("7.02"), 0, 0, 0, Decimal("3.02"), 0, Decimal("2.04")]
    assert [day.requests for day in totals.by_day] == [1, 0, 0, 0, 1, 0, 2]
    assert sum(day.cost_usd for day in totals.by_day) == totals.all_calls.cost_usd == Decimal("12.08")
    assert (totals.all_calls.requests, totals.all_calls.failed_requests, totals.all_calls.cancelled_requests) == (4, 1, 1)
    assert totals.all_calls.prompt_tokens == 12_000 and totals.all_calls.completion_tokens == 40


def test_an_empty_range_has_zero_totals_and_a_flat_chart(db) -> None:
    totals = range_totals(days=console_days(at=NOW, days=3))
    assert totals.all_calls.cost_usd == 0 and totals.all_calls.requests == 0 and totals.all_calls.failed_requests == 0
    assert [(day.cost_usd, day.requests) for day in totals.by_day] == [(0, 0)] * 3
    assert (totals.by_model, totals.by_endpoint, totals.with_a_key_usd) == ({}, [], 0)


def test_one_pass_gives_the_range_per_model_and_endpoint_too(call, user_factory) -> None:
    cat, dan = user_factory("cat"), user_factory("dan")
    key, _ = api_key_create(username="cat")
    call(cat, prompt=1000, completion=5, api_key_id=key.pk)
    call(dan, prompt=2000, status="cancelled", at=NOW - timedelta(days=1))
    call(cat, model="m-two", endpoint="responses", prompt=3000, status="timeout", at=NOW - timedelta(days=1))
    call(cat, model="m-two", prompt=1, at=NOW - timedelta(days=2), api_key_id=key.pk)
    call(dan, prompt=9000, at=NOW - timedelta(days=3))  # outside the 3 days
    with CaptureQueriesContext(connection) as captured:
        totals = range_totals(days=console_days(at=NOW, days=3))
    assert len(captured) == 2  # the rollups per day, model and endpoint; the keys' spend
    model = {name: (sums.requests, sums.prompt_tokens, sums.cost_usd, sums.cancelled_requests, sums.failed_requests)
             for name, sums in totals.by_model.items()}
    assert model == {
        "console-test": (2, 3000, Decimal("3.01"), 1, 0),
        "m-two": (2, 3001, Decimal("3.001"), 0, 1),
    }
    assert [(row.endpoint, row.path, row.sums.requests, row.sums.cost_usd, row.share) for row in totals.by_endpoint] == [
        ("chat.completions", "/v1/chat/completions", 3, Decimal("3.011"), money_ratio(Decimal("3.011"), Decimal("6.011"))),
        ("responses", "/v1/responses", 1, Decimal(3), money_ratio(Decimal(3), Decimal("6.011"))),
    ]
    assert totals.all_calls.cost_usd == Decimal("6.011") and totals.all_calls.requests == 4
    assert totals.with_a_key_usd == Decimal("1.011") and totals.without_a_key_usd == Decimal(5)


def _group_by(sql: str) -> str:
    return sql.split("GROUP BY", 1)[1].split("ORDER BY", 1)[0]


@pytest.mark.parametrize("sort", ["-cost", "name", "-name", "requests"])
def test_the_top_tables_group_by_their_key_alone_and_name_the_groups(call, user_factory, sort) -> None:
    users = [user_factory(name) for name in ("cy", "al", "bo")]
    keys = [api_key_create(username=user.username, name=f"{user.username}'s key")[0] for user in users]
    for index, (user, key) in enumerate(zip(users, keys, strict=True)):
        call(user, prompt=1000 * (index + 1), api_key_id=key.pk)
    days = console_days(at=NOW, days=30)
    with CaptureQueriesContext(connection) as captured:
        by_user = top_spenders(by="user", days=days, sort=sort)
        by_key = top_spenders(by="key", days=days, sort=sort)
    for query in captured.captured_queries:  # one grouping column; the names are read per group
        group = _group_by(query["sql"])
        assert "SELECT" not in group and "," not in group, group
    expected = {
        "-cost": ["bo", "al", "cy"], "requests": ["cy", "al", "bo"], "name": ["al", "bo", "cy"], "-name": ["cy", "bo", "al"],
    }[sort]
    assert [row.label for row in by_user] == expected
    if not sort.endswith("name"):  # keys sort by their random prefixes
        assert [row.detail for row in by_key] == [f"{name}'s key · {name}" for name in expected]
    assert {row.label for row in by_key} == {key.prefix for key in keys}
    assert [row.id for row in by_user] == [next(user.pk for user in users if user.username == name) for name in expected]
