"""Each list and detail page of the cost console: it renders, in queries that do not grow with its
rows, money reads as money, and the ledger's and rollups' totals are the sums of the filtered rows."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db.models import Count, Sum
from django.urls import reverse
from django.utils import timezone

from billing import display
from billing.models import Account, DailyUsage, PricingPlan, Reservation, UsageRecord
from billing.periods import period_containing
from billing.selectors import UsageTotals, ledger_totals, rollup_totals
from llmgateway.models import ApiKey

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]

# Session and user (2), the count with its totals, the page's rows, a filter's choices, and a
# few more on pages with inlines or actions: a fixed bound, whatever the number of rows.
MAX_QUERIES = 10

LISTS = [
    "billing_price",
    "billing_pricingplan",
    "billing_account",
    "billing_usagerecord",
    "billing_dailyusage",
    "billing_reservation",
    "llmgateway_apikey",
]


@pytest.mark.parametrize("model", LISTS)
def test_each_list_renders_in_queries_that_do_not_grow_with_its_rows(admin_client, ledger_factory, django_assert_max_num_queries, model) -> None:
    PricingPlan.objects.create(name="gold", multiplier=Decimal("1.2"))
    queries = []
    for more_rows in (5, 45):  # 5 rows, then 50
        ledger_factory(more_rows)
        with django_assert_max_num_queries(MAX_QUERIES) as captured:
            response = admin_client.get(reverse(f"admin:{model}_changelist"))
            assert response.status_code == 200
            response.render()
        queries.append(len(captured.captured_queries))
    assert queries[0] == queries[1], f"{queries[0]} queries with 5 rows, {queries[1]} with 50"


def change_page_objects():
    return [
        ("billing_usagerecord", lambda: UsageRecord.objects.first()),
        ("billing_dailyusage", lambda: DailyUsage.objects.first()),
        ("billing_account", lambda: Account.objects.first()),
        ("billing_reservation", lambda: Reservation.objects.first()),
        ("llmgateway_apikey", lambda: ApiKey.objects.first()),
        ("billing_pricingplan", lambda: PricingPlan.objects.first()),
    ]


@pytest.mark.parametrize(("model", "pick"), change_page_objects(), ids=[model for model, _ in change_page_objects()])
def test_each_detail_page_renders_in_bounded_queries(admin_client, ledger_factory, django_assert_max_num_queries, model, pick) -> None:
    ledger_factory(10)
    PricingPlan.objects.create(name="gold", multiplier=Decimal("1.2"))
    obj = pick()
    with django_assert_max_num_queries(12):
        response = admin_client.get(reverse(f"admin:{model}_change", args=[obj.pk]))
        assert response.status_code == 200
        response.render()


def totals_on_page(response) -> UsageTotals:
    return response.context["totals"]


def test_the_ledger_totals_are_the_selectors_sums_for_a_user(admin_client, ledger_factory) -> None:
    ledger = ledger_factory(20)
    user = ledger.users[1]
    response = admin_client.get(reverse("admin:billing_usagerecord_changelist"), {"user": user.username})
    assert response.status_code == 200
    assert totals_on_page(response) == ledger_totals(user_id=user.pk)
    assert totals_on_page(response).requests == 5
    assert display.usd_brief(ledger_totals(user_id=user.pk).cost_usd) in response.content.decode()


def test_the_ledger_totals_are_the_databases_sum_for_a_model_and_status(admin_client, ledger_factory) -> None:
    ledger_factory(20)
    response = admin_client.get(reverse("admin:billing_usagerecord_changelist"), {"model": "gpt-4o", "status__exact": "completed"})
    rows = UsageRecord.objects.filter(model="gpt-4o", status="completed")
    expected = rows.aggregate(requests=Count("id"), cost=Sum("cost_usd"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
    totals = totals_on_page(response)
    assert (totals.requests, totals.cost_usd, totals.prompt_tokens, totals.completion_tokens) == (
        expected["requests"], expected["cost"], expected["prompt"], expected["completion"],
    )
    assert 0 < totals.requests < UsageRecord.objects.count()
    # The page lists exactly those rows.
    assert {record.pk for record in response.context["cl"].result_list} == set(rows.values_list("pk", flat=True))


def test_the_ledger_filters_by_key_prefix(admin_client, ledger_factory) -> None:
    ledger = ledger_factory(20)
    key = ledger.keys[2]
    response = admin_client.get(reverse("admin:billing_usagerecord_changelist"), {"key": key.prefix})
    assert totals_on_page(response).requests == UsageRecord.objects.filter(api_key=key).count() > 0


def test_the_ledger_filters_by_date_range_in_the_billing_time_zone(admin_client, ledger_factory, settings) -> None:
    settings.BILLING_TIME_ZONE = "America/New_York"
    now = timezone.now()
    recent = ledger_factory(10, at=now).records
    ledger_factory(10, at=now - timedelta(days=40))
    today = period_containing("day", now)
    response = admin_client.get(
        reverse("admin:billing_usagerecord_changelist"),
        {"since": (today.first_day - timedelta(days=1)).isoformat(), "until": today.end_day.isoformat()},
    )
    assert totals_on_page(response).requests == 10
    assert totals_on_page(response).cost_usd == sum((record.cost_usd for record in recent), Decimal(0))


def test_a_date_that_is_no_date_is_refused_as_a_bad_filter(admin_client, ledger_factory) -> None:
    ledger_factory(5)
    response = admin_client.get(reverse("admin:billing_usagerecord_changelist"), {"since": "last tuesday"})
    assert response.status_code == 302 and response["Location"].endswith("?e=1")


def test_the_rollup_totals_are_the_selectors_sums_and_equal_the_ledgers(admin_client, ledger_factory) -> None:
    ledger = ledger_factory(20)
    user = ledger.users[0]
    response = admin_client.get(reverse("admin:billing_dailyusage_changelist"), {"user": user.username})
    assert totals_on_page(response) == rollup_totals(user_id=user.pk) == ledger_totals(user_id=user.pk)
    everything = admin_client.get(reverse("admin:billing_dailyusage_changelist"))
    assert totals_on_page(everything) == rollup_totals() == ledger_totals()


def test_a_ledger_row_reads_as_a_call_not_as_columns(admin_client, ledger_factory) -> None:
    record = ledger_factory(5).records[0]
    response = admin_client.get(reverse("admin:billing_usagerecord_change", args=[record.pk]))
    when = f"{timezone.localtime(record.created_at):%Y-%m-%d %H:%M:%S}"
    assert response.context["subtitle"] == f"{record.user.username} · {record.model} · {when}"  # not its UUID
    page = response.content.decode()
    assert "251 ms" in page and "1.2 s" in page  # TTFT 250,733 us, duration 1,234,567 us
    assert "Ttft us" not in page and "Duration us" not in page
    assert display.usd_exact(record.cost_usd) in page  # every stored digit on the detail page
    assert "time to first token" in page.lower()


def test_the_ledger_list_shows_money_and_humane_units(admin_client, ledger_factory) -> None:
    record = ledger_factory(5).records[0]
    page = admin_client.get(reverse("admin:billing_usagerecord_changelist")).content.decode()
    assert display.usd_brief(record.cost_usd) in page
    assert "251 ms" in page
    assert not re.search(r"\b0\.\d{10}\b", page), "a raw ledger decimal in the list"


def test_the_account_list_shows_spent_held_left_and_share_used(admin_client, ledger_factory) -> None:
    ledger = ledger_factory(5)
    user = ledger.users[0]
    response = admin_client.get(reverse("admin:billing_account_changelist"))
    [account] = [row for row in response.context["cl"].result_list if row.user_id == user.pk]
    spent = ledger_totals(user_id=user.pk).cost_usd
    held = Reservation.objects.get(account__user=user).cost_usd
    assert (account._month_spend, account._held) == (spent, held)
    page = response.content.decode()
    left = Decimal(5) - spent - held
    for shown in (display.usd_brief(spent), display.usd_brief(held), display.usd_brief(left), display.percent_of(spent + held, Decimal(5)), "$5.00"):
        assert shown in page
    assert "25.0000000000" not in page and "0.00360700000000000" not in page


def test_an_accounts_page_shows_each_budget_now(admin_client, ledger_factory) -> None:
    user = ledger_factory(5).users[0]
    account = Account.objects.get(user=user)
    page = admin_client.get(reverse("admin:billing_account_change", args=[account.pk])).content.decode()
    assert "spend this month" in page and "held (calls in flight)" in page
    assert display.usd_exact(ledger_totals(user_id=user.pk).cost_usd) in page


def test_a_hold_is_titled_by_its_amount_and_model(admin_client, ledger_factory) -> None:
    ledger_factory(5)
    hold = Reservation.objects.first()
    response = admin_client.get(reverse("admin:billing_reservation_change", args=[hold.pk]))
    assert response.context["subtitle"].startswith(f"hold of {display.usd_exact(hold.cost_usd)} on gpt-4o, ")


@pytest.mark.parametrize(
    ("model", "explains"),
    [
        ("billing_reservation", "this list is empty when no such call is running"),
        ("billing_pricingplan", "Accounts without a plan pay catalog prices"),
        ("billing_account", "held"),
    ],
)
def test_lists_that_may_be_empty_say_why(admin_client, model, explains) -> None:
    assert explains in admin_client.get(reverse(f"admin:{model}_changelist")).content.decode()


def test_a_plans_page_explains_overrides_and_the_multiplier(admin_client) -> None:
    plan = PricingPlan.objects.create(name="gold", multiplier=Decimal("1.2"))
    page = admin_client.get(reverse("admin:billing_pricingplan_change", args=[plan.pk])).content.decode()
    assert "Overrides are final prices" in page
    assert "USD per 1M cached prompt tokens" in page  # the rate columns' help
    listing = admin_client.get(reverse("admin:billing_pricingplan_changelist")).content.decode()
    assert "×1.2 (+20%)" in listing


# --- Endpoints ----------------------------------------------------------------------------------


def test_the_ledger_filters_by_endpoint_and_shows_each_rows_endpoint(admin_client, ledger_factory) -> None:
    ledger_factory(12)
    url = reverse("admin:billing_usagerecord_changelist")
    response = admin_client.get(url, {"endpoint__exact": "responses"})
    assert response.status_code == 200
    responses = UsageRecord.objects.filter(endpoint="responses")
    listed = response.context["cl"].result_list
    assert {record.pk for record in listed} == set(responses.values_list("pk", flat=True)) and len(listed) == 4
    totals = totals_on_page(response)
    assert (totals.requests, totals.cost_usd) == (4, responses.aggregate(cost=Sum("cost_usd"))["cost"])
    page = response.content.decode()
    assert '<span title="/v1/responses">responses</span>' in page
    assert '<span title="/v1/chat/completions">chat</span>' not in page
    # The filter offers every endpoint, those without calls too (its choices are the field's).
    assert "?endpoint__exact=embeddings" in page and "?endpoint__exact=chat.completions" in page

    chat = admin_client.get(url, {"endpoint__exact": "chat.completions"})
    assert totals_on_page(chat).requests == 8
    assert totals_on_page(admin_client.get(url, {"endpoint__exact": "embeddings"})).requests == 0


def test_a_ledger_rows_page_shows_its_endpoint_and_upstream_id(admin_client, ledger_factory) -> None:
    record = ledger_factory(5).records[1]
    assert record.endpoint == "responses" and record.upstream_id.startswith("resp_")
    page = admin_client.get(reverse("admin:billing_usagerecord_change", args=[record.pk])).content.decode()
    assert "/v1/responses" in page
    assert record.upstream_id in page


def test_the_ledger_finds_a_call_by_its_upstream_id_exactly(admin_client, ledger_factory) -> None:
    record = ledger_factory(10).records[4]
    url = reverse("admin:billing_usagerecord_changelist")
    found = admin_client.get(url, {"q": record.upstream_id}).context["cl"].result_list
    assert [row.pk for row in found] == [record.pk]
    for near in (record.upstream_id[:-1], record.upstream_id.upper(), "resp_", "chatcmpl-"):
        assert list(admin_client.get(url, {"q": near}).context["cl"].result_list) == [], near


@pytest.mark.postgresql
def test_the_upstream_id_search_reads_its_partial_index(ledger_factory) -> None:
    from django.db import connection

    record = ledger_factory(10).records[4]
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # a tiny table: the planner would scan it
        sql, params = UsageRecord.objects.filter(upstream_id=record.upstream_id).values("pk").query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "usage_upstream_id" in plan, plan


def test_the_rollup_list_has_a_row_per_endpoint_and_filters_by_it(admin_client, ledger_factory) -> None:
    ledger = ledger_factory(12)
    url = reverse("admin:billing_dailyusage_changelist")
    response = admin_client.get(url, {"endpoint__exact": "responses"})
    rows = response.context["cl"].result_list
    assert rows and {row.endpoint for row in rows} == {"responses"}
    assert totals_on_page(response).requests == UsageRecord.objects.filter(endpoint="responses").count() == 4
    assert '<span title="/v1/responses">responses</span>' in response.content.decode()
    user = ledger.users[0]
    assert DailyUsage.objects.filter(user=user).values("endpoint").distinct().count() == 2
