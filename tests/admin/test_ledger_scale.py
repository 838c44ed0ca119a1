"""The ledger list as built for a million rows (`bench/admin_pages.py`): totals from the rollups when
they answer, pages found by their ids, sorts an index serves, the search by request id; the API keys'
month spend from the key rollups. Each still shows exactly what the ledger holds."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.admin.templatetags.admin_list import result_headers
from django.db import connection
from django.db.models import Count, QuerySet, Sum
from django.http import QueryDict
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.admin import ledger_rollup
from billing.models import DailyKeyUsage, DailyUsage, Reservation, UsageRecord
from billing.periods import period_containing
from billing.selectors import UsageTotals
from llmgateway.models import ApiKey

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]

LEDGER = "admin:billing_usagerecord_changelist"


def ledger_sums(rows: QuerySet[UsageRecord]) -> UsageTotals:
    """A fresh SUM() over ledger rows, as the list's totals read."""
    sums = rows.aggregate(
        requests=Count("id"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), cached=Sum("cached_tokens"), cost=Sum("cost_usd")
    )
    return UsageTotals(
        requests=sums["requests"], prompt_tokens=sums["prompt"] or 0, completion_tokens=sums["completion"] or 0,
        cached_tokens=sums["cached"] or 0, cost_usd=sums["cost"] or 0,
    )


def sums_read_from_the_ledger(queries: list[dict[str, Any]]) -> bool:
    return any('FROM "billing_usagerecord"' in query["sql"] and "SUM(" in query["sql"] for query in queries)


@pytest.fixture
def two_months(ledger_factory: Callable[..., Any], settings: Any) -> Any:
    """20 calls today and 10 forty days ago, days in a zone that is not UTC."""
    settings.BILLING_TIME_ZONE = "America/New_York"
    now = timezone.now()
    today = ledger_factory(20, at=now)
    ledger_factory(10, at=now - timedelta(days=40))
    return today


# Each case: the list's parameters, and the ledger rows they select.
ROLLUP_CASES: list[tuple[str, Callable[[Any], dict[str, str]], Callable[[Any], QuerySet[UsageRecord]]]] = [
    ("unfiltered", lambda ledger: {}, lambda ledger: UsageRecord.objects.all()),
    (
        "since and until",
        lambda ledger: {"since": period_containing("day", timezone.now()).first_day.isoformat(), "until": period_containing("day", timezone.now()).end_day.isoformat()},
        lambda ledger: UsageRecord.objects.filter(created_at__gte=period_containing("day", timezone.now()).start),
    ),
    ("user", lambda ledger: {"user": ledger.users[1].username}, lambda ledger: UsageRecord.objects.filter(user=ledger.users[1])),
    ("model", lambda ledger: {"model": "gpt-4o"}, lambda ledger: UsageRecord.objects.filter(model="gpt-4o")),
    (
        "user, model and since",
        lambda ledger: {"user": ledger.users[0].username, "model": "gpt-4o-mini", "since": "2000-01-01"},
        lambda ledger: UsageRecord.objects.filter(user=ledger.users[0], model="gpt-4o-mini"),
    ),
    ("key prefix", lambda ledger: {"key": ledger.keys[2].prefix}, lambda ledger: UsageRecord.objects.filter(api_key=ledger.keys[2])),
    ("every key", lambda ledger: {"key": "sk-gw-"}, lambda ledger: UsageRecord.objects.filter(api_key__isnull=False)),
    (
        "key and its user",
        lambda ledger: {"key": ledger.keys[2].prefix, "user": ledger.keys[2].user.username},
        lambda ledger: UsageRecord.objects.filter(api_key=ledger.keys[2]),
    ),
    ("key and another user", lambda ledger: {"key": ledger.keys[2].prefix, "user": ledger.users[0].username}, lambda ledger: UsageRecord.objects.none()),
    ("blank values and a page", lambda ledger: {"user": " ", "model": "", "p": "1", "o": "-1"}, lambda ledger: UsageRecord.objects.all()),
    (
        "the console's link for a user",
        lambda ledger: {"user__id__exact": str(ledger.users[1].pk), "since": "2000-01-01", "until": "2100-01-01"},
        lambda ledger: UsageRecord.objects.filter(user=ledger.users[1]),
    ),
    ("the console's link for a key", lambda ledger: {"api_key__id__exact": str(ledger.keys[3].pk)}, lambda ledger: UsageRecord.objects.filter(api_key=ledger.keys[3])),
    ("the console's link for a model", lambda ledger: {"model__exact": "gpt-4o-mini"}, lambda ledger: UsageRecord.objects.filter(model="gpt-4o-mini")),
    ("two models", lambda ledger: {"model__exact": "gpt-4o-mini", "model": "gpt-4o"}, lambda ledger: UsageRecord.objects.none()),
    ("endpoint", lambda ledger: {"endpoint__exact": "responses"}, lambda ledger: UsageRecord.objects.filter(endpoint="responses")),
    (
        "endpoint, user, model and days",
        lambda ledger: {"endpoint__exact": "chat.completions", "user": ledger.users[0].username, "model": "gpt-4o-mini", "since": "2000-01-01"},
        lambda ledger: UsageRecord.objects.filter(endpoint="chat.completions", user=ledger.users[0], model="gpt-4o-mini"),
    ),
    ("an endpoint with no calls", lambda ledger: {"endpoint__exact": "embeddings"}, lambda ledger: UsageRecord.objects.none()),
]


@pytest.mark.parametrize(("params", "rows"), [case[1:] for case in ROLLUP_CASES], ids=[case[0] for case in ROLLUP_CASES])
def test_totals_the_rollups_answer_come_from_them_and_equal_the_ledgers(admin_client, two_months, params, rows) -> None:
    ledger = two_months
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(reverse(LEDGER), params(ledger))
    assert response.status_code == 200
    expected = ledger_sums(rows(ledger))
    assert response.context["totals"] == expected
    assert response.context["cl"].result_count == expected.requests
    assert not sums_read_from_the_ledger(captured.captured_queries), "the totals were summed over the ledger"


OTHER_FILTERS: list[tuple[str, Callable[[Any], dict[str, str]], Callable[[Any], QuerySet[UsageRecord]]]] = [
    ("status", lambda ledger: {"status__exact": "cancelled"}, lambda ledger: UsageRecord.objects.filter(status="cancelled")),
    ("key and model", lambda ledger: {"key": "sk-gw-", "model": "gpt-4o"}, lambda ledger: UsageRecord.objects.filter(api_key__isnull=False, model="gpt-4o")),
    ("user and status", lambda ledger: {"user": ledger.users[0].username, "status__exact": "completed"}, lambda ledger: UsageRecord.objects.filter(user=ledger.users[0], status="completed")),
    ("an instant", lambda ledger: {"created_at__gte": (timezone.now() - timedelta(days=1)).isoformat()}, lambda ledger: UsageRecord.objects.filter(created_at__gte=timezone.now() - timedelta(days=1))),
    ("a request id", lambda ledger: {"q": str(ledger.records[3].request_id)}, lambda ledger: UsageRecord.objects.filter(pk=ledger.records[3].pk)),
    ("an upstream id", lambda ledger: {"q": f" {ledger.records[4].upstream_id} "}, lambda ledger: UsageRecord.objects.filter(pk=ledger.records[4].pk)),
    ("key and endpoint", lambda ledger: {"key": "sk-gw-", "endpoint__exact": "responses"}, lambda ledger: UsageRecord.objects.filter(api_key__isnull=False, endpoint="responses")),
]


@pytest.mark.parametrize(("params", "rows"), [case[1:] for case in OTHER_FILTERS], ids=[case[0] for case in OTHER_FILTERS])
def test_other_filters_are_summed_over_the_ledger(admin_client, two_months, params, rows) -> None:
    ledger = two_months
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(reverse(LEDGER), params(ledger))
    expected = ledger_sums(rows(ledger))
    assert 0 < expected.requests < UsageRecord.objects.count()
    assert response.context["totals"] == expected
    assert {record.pk for record in response.context["cl"].result_list} == set(rows(ledger).values_list("pk", flat=True))
    assert sums_read_from_the_ledger(captured.captured_queries)


@pytest.mark.parametrize(
    ("query", "rollup"),
    [
        ("", DailyUsage),
        ("since=2025-06-01&until=2025-07-01&user=alice&model=gpt-4o&p=3&o=-9&all=", DailyUsage),
        ("key=sk-gw-abc&user=alice&since=2025-06-01", DailyKeyUsage),
        ("key=sk-gw-abc&model=gpt-4o", None),
        ("status__exact=completed", None),
        ("q=0b7f5b9e-1c1a-4e8e-9a55-3c2f4f1d2e10", None),
        ("created_at__gte=2025-06-01T00:00:00%2B00:00", None),
        ("since=yesterday", None),
        ("api_key__id__exact=7&user__id__exact=3&until=2025-07-01", DailyKeyUsage),
        ("api_key__id__exact=seven", None),
        ("model__exact=gpt-4o&model=gpt-4o&user__id__exact=3", DailyUsage),
        ("user=alice&user=", DailyUsage),  # the last value counts, as in the filter: blank, no filter
        ("endpoint__exact=responses&user=alice&since=2025-06-01", DailyUsage),
        ("key=sk-gw-abc&endpoint__exact=responses", None),  # the key rollups have no endpoint
    ],
    ids=[
        "nothing", "days-user-model", "key-user-days", "key-model", "status", "search", "instant", "bad-date", "key-id-user-id",
        "bad-id", "model-twice", "repeated", "endpoint-user-days", "key-endpoint",
    ],
)
def test_which_list_parameters_the_rollups_answer(query, rollup) -> None:
    rows = ledger_rollup(QueryDict(query))
    assert (rows.model if rows is not None else None) is rollup


def test_a_page_is_the_same_rows_read_by_their_ids(admin_client, ledger_factory, monkeypatch) -> None:
    ledger_factory(11)  # all at one instant: the id breaks the ties
    monkeypatch.setattr(admin.site.get_model_admin(UsageRecord), "list_per_page", 3)
    by_time = list(UsageRecord.objects.order_by("-created_at", "-id").values_list("pk", flat=True))
    by_cost = list(UsageRecord.objects.order_by("-cost_usd", "-id").values_list("pk", flat=True))
    for page, rows in ((1, by_time[0:3]), (2, by_time[3:6]), (4, by_time[9:11])):
        listed = admin_client.get(reverse(LEDGER), {"p": page}).context["cl"].result_list
        assert [record.pk for record in listed] == rows, f"page {page}"
    listed = admin_client.get(reverse(LEDGER), {"p": 2, "o": "-9"}).context["cl"].result_list
    assert [record.pk for record in listed] == by_cost[3:6]
    # Past the last page: the admin's own answer to a bad page.
    assert admin_client.get(reverse(LEDGER), {"p": 5}).status_code == 302


def test_the_ledger_sorts_by_the_columns_an_index_serves(admin_client, ledger_factory) -> None:
    ledger_factory(5)
    changelist = admin_client.get(reverse(LEDGER)).context["cl"]
    sortable = {header["text"] for header in result_headers(changelist) if header["sortable"]}
    assert sortable == {"time", "cost"}


@pytest.mark.parametrize("column", ["user", "key", "model", "status_badge"])
def test_a_sort_typed_into_the_url_by_another_column_is_ignored(admin_client, ledger_factory, column) -> None:
    ledger_factory(10)
    default = admin_client.get(reverse(LEDGER)).context["cl"]
    index = default.list_display.index(column)  # as the list numbers its columns (after the checkbox)
    by_hand = admin_client.get(reverse(LEDGER), {"o": str(index)}).context["cl"]
    assert by_hand.result_list.query.order_by == default.result_list.query.order_by
    assert [row.pk for row in by_hand.result_list] == [row.pk for row in default.result_list]


@pytest.mark.parametrize("spelling", [str, lambda request_id: str(request_id).upper(), lambda request_id: f"  {request_id.hex} "])
def test_the_search_finds_a_call_by_its_request_id(admin_client, ledger_factory, spelling) -> None:
    record = ledger_factory(10).records[4]
    response = admin_client.get(reverse(LEDGER), {"q": spelling(record.request_id)})
    assert [row.pk for row in response.context["cl"].result_list] == [record.pk]
    assert response.context["totals"].requests == 1


def test_a_search_that_is_no_request_id_finds_nothing(admin_client, ledger_factory) -> None:
    ledger_factory(5)
    response = admin_client.get(reverse(LEDGER), {"q": "spender-1"})
    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [] and response.context["totals"].requests == 0


def test_a_hold_is_found_by_its_request_id(admin_client, ledger_factory) -> None:
    ledger_factory(10)
    hold = Reservation.objects.order_by("pk")[1]
    response = admin_client.get(reverse("admin:billing_reservation_changelist"), {"q": str(hold.request_id)})
    assert [row.pk for row in response.context["cl"].result_list] == [hold.pk]
    assert list(admin_client.get(reverse("admin:billing_reservation_changelist"), {"q": "gpt-4o"}).context["cl"].result_list) == []


def test_the_key_lists_month_spend_reads_the_key_rollups_not_the_ledger(admin_client, ledger_factory) -> None:
    ledger = ledger_factory(20)
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(reverse("admin:llmgateway_apikey_changelist"), {"o": "-5"})
    rows = {key.pk: key._month_spend for key in response.context["cl"].result_list}
    for api_key in ledger.keys:
        assert rows[api_key.pk] == ledger_sums(UsageRecord.objects.filter(api_key=api_key)).cost_usd
    assert list(rows.values()) == sorted(rows.values(), reverse=True)
    assert not any("billing_usagerecord" in query["sql"] for query in captured.captured_queries)
    assert ApiKey.objects.count() == len(rows)
