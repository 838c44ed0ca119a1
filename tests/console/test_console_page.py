"""The cost console page: who may see it, what it costs to render, and that its figures are the ledger's."""

from __future__ import annotations

import io
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.display import usd_brief, usd_exact
from billing.models import Reservation
from billing.services import account_quota_set
from llmgateway.services import api_key_create

from .conftest import NOW

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]

# Session and user, permissions (two), then the console's own reads: spend per period, the range's
# totals per day, model and endpoint and with a key (two), the user and key tables (the models are
# ranked from the range's totals), latency, budgets (three).
MAX_QUERIES = 13


# --- Who may see it ----------------------------------------------------------------------------


def test_staff_with_the_cost_permission_see_the_console(viewer_client, console_url, clock) -> None:
    response = viewer_client.get(console_url)
    assert response.status_code == 200
    # billing's page extends the console's (its sections below: spend per endpoint)
    assert [template.name for template in response.templates[:2]] == ["admin/billing/console.html", "admin/console.html"]
    page = response.content.decode()
    assert "<h1>Cost console</h1>" in page
    assert 'id="console-live"' in page  # where the live figures will go


def test_a_visitor_and_a_non_staff_user_are_sent_to_the_login(client, user_factory, console_url) -> None:
    response = client.get(console_url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('admin:login')}?next={console_url}"
    client.force_login(user_factory("customer"))
    response = client.get(console_url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_staff_without_the_view_permission_on_usage_records_are_refused(client, staff_factory, console_url) -> None:
    client.force_login(staff_factory("prices-only", "billing.view_price", "billing.change_price"))
    assert client.get(console_url).status_code == 403
    # ... and are shown no link to it.
    page = client.get(reverse("admin:index")).content.decode()
    assert console_url not in page


def test_the_admin_is_branded_and_links_to_the_console(viewer_client, console_url) -> None:
    page = viewer_client.get(reverse("admin:index")).content.decode()
    assert "Django administration" not in page and "Django site admin" not in page
    assert re.search(r"<title>[^<]*\| llmgateway</title>", page)
    assert f'<a href="{console_url}" id="console-link">Cost console</a>' in page  # the header
    assert 'id="console-module"' in page  # the index
    assert f'<div id="site-name"><a href="{console_url}">llmgateway</a></div>' in page


def test_staff_who_may_read_costs_land_on_the_console_after_logging_in(client, staff_factory, console_url) -> None:
    viewer = staff_factory("lands", "billing.view_usagerecord")
    viewer.set_password("pw-for-the-console")
    viewer.save()
    other = staff_factory("no-costs", "billing.view_price")
    other.set_password("pw-for-the-console")
    other.save()
    index = reverse("admin:index")
    login = reverse("admin:login")
    response = client.post(f"{login}?next={index}", {"username": "lands", "password": "pw-for-the-console", "next": index})
    assert response.status_code == 302 and response["Location"] == console_url
    client.logout()
    # A `next` elsewhere is kept; staff who may not read costs land on the index as before.
    elsewhere = reverse("admin:billing_price_changelist")
    response = client.post(login, {"username": "lands", "password": "pw-for-the-console", "next": elsewhere})
    assert response["Location"] == elsewhere
    client.logout()
    response = client.post(login, {"username": "no-costs", "password": "pw-for-the-console", "next": index})
    assert response["Location"] == index


# --- What it costs to render ---------------------------------------------------------------------


def _populate(call, user_factory, *, users: int, first: int = 0) -> None:
    """`users` users, each with a key, a budget, a live hold and calls on three days and two models."""
    for number in range(first, first + users):
        user = user_factory(f"spender-{number:03}")
        key, _ = api_key_create(username=user.username, name=f"key of {number}")
        account = account_quota_set(user_id=user.pk, monthly_spend_limit_usd=Decimal(10), daily_token_limit=50_000)
        Reservation.objects.create(request_id=uuid.uuid4(), account=account, model="console-test", cost_usd=Decimal("0.5"), tokens=500,
                                   created_at=NOW, expires_at=NOW + timedelta(minutes=5))
        for days_ago, model in ((0, "console-test"), (3, "console-test"), (9, "console-other")):
            call(user, at=NOW - timedelta(days=days_ago), model=model, api_key_id=key.pk, prompt=100 + number)


def test_the_page_takes_the_same_queries_for_3_users_or_30(viewer_client, console_url, clock, call, user_factory, django_assert_max_num_queries) -> None:
    _populate(call, user_factory, users=3)
    with django_assert_max_num_queries(MAX_QUERIES), CaptureQueriesContext(connection) as small:
        assert viewer_client.get(console_url).status_code == 200
    _populate(call, user_factory, users=27, first=3)
    with django_assert_max_num_queries(MAX_QUERIES), CaptureQueriesContext(connection) as large:
        response = viewer_client.get(f"{console_url}?top=25")
    assert response.status_code == 200
    assert len(response.context["users"].rows) == 25 and len(response.context["budgets"]) == 30
    assert len(large) == len(small)


# --- Its figures are the ledger's ---------------------------------------------------------------


def _export_totals(since: str, until: str) -> dict:
    out = io.StringIO()
    call_command("export_costs", "--since", since, "--until", until, "--totals", "--format", "jsonl", "--no-progress", stdout=out)
    return json.loads(out.getvalue().splitlines()[-1])["totals"]


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata"])
def test_the_months_spend_is_what_export_costs_totals_for_that_month(viewer_client, console_url, clock, call, user_factory, settings, zone) -> None:
    settings.BILLING_TIME_ZONE = zone
    local = ZoneInfo(zone)
    alice, bob = user_factory("alice"), user_factory("bob")
    june_1 = datetime(2025, 6, 1, tzinfo=local)
    july_1 = datetime(2025, 7, 1, tzinfo=local)
    now = july_1 - timedelta(minutes=30)  # the month's last half hour, local time
    clock(now)
    call(alice, at=june_1 - timedelta(microseconds=1), prompt=5000)  # May: in neither
    call(alice, at=june_1, prompt=1234, completion=567)
    call(bob, at=june_1 + timedelta(days=14, hours=5), prompt=77, completion=3)
    call(bob, at=now - timedelta(minutes=1), prompt=999_999, completion=1, status="cancelled")
    call(alice, at=july_1, prompt=4000)  # July: in neither
    totals = _export_totals("2025-06-01", "2025-07-01")

    response = viewer_client.get(console_url)
    [month] = [spend for spend in response.context["periods"] if spend.kind == "month"]
    assert month.spent == Decimal(totals["cost_usd"]) == Decimal("1002.4520000000")
    assert (month.current.first_day, month.current.end_day) == (june_1.date(), july_1.date())
    assert f'title="{usd_exact(month.spent)}">{usd_brief(month.spent)}</div>' in response.content.decode()


def test_each_row_links_to_its_calls_in_the_ledger(viewer_client, console_url, clock, call, user_factory) -> None:
    carol, dave = user_factory("carol"), user_factory("dave")
    key, _ = api_key_create(username="carol", name="ci")
    call(carol, api_key_id=key.pk, at=NOW - timedelta(hours=1))
    call(carol, at=NOW - timedelta(days=2), model="console-other")
    call(dave, at=NOW - timedelta(days=29), status="upstream_error")
    call(dave, at=NOW - timedelta(days=30))  # outside the 30 days shown: not in any row's count
    context = viewer_client.get(console_url).context
    rows = [row for name in ("users", "keys", "models") for row in context[name].rows]
    assert len(rows) == 2 + 1 + 2
    for row in rows:
        ledger = viewer_client.get(row.ledger_url)
        assert ledger.status_code == 200, row.ledger_url
        assert ledger.context["cl"].result_count == row.spend.sums.requests, row.ledger_url


def test_the_tables_sort_by_any_column_and_show_the_top_n(viewer_client, console_url, clock, call, user_factory) -> None:
    for name, calls, prompt in (("erin", 1, 9000), ("frank", 3, 1000), ("gina", 2, 2000), ("hal", 4, 100)):
        user = user_factory(name)
        for _ in range(calls):
            call(user, prompt=prompt)

    def names(query: str) -> list[str]:
        return [row.spend.label for row in viewer_client.get(f"{console_url}?{query}").context["users"].rows]

    assert names("") == ["erin", "gina", "frank", "hal"]  # spend: 9, 4, 3, 0.4
    assert names("o_user=-requests") == ["hal", "frank", "gina", "erin"]
    assert names("o_user=name") == ["erin", "frank", "gina", "hal"]
    assert names("o_user=-name") == ["hal", "gina", "frank", "erin"]
    assert names("o_user=cost&top=10") == ["hal", "frank", "gina", "erin"]
    page = viewer_client.get(f"{console_url}?o_user=-requests").content.decode()
    # The sorted heading says so and its link reverses the order; the others sort largest first.
    assert 'aria-sort="descending"' in page and 'href="?o_user=requests"' in page and 'href="?o_user=-cost"' in page


def test_the_models_table_sorts_by_any_column_with_ties_by_name(viewer_client, console_url, clock, call, user_factory) -> None:
    uma = user_factory("uma")
    for model, calls, prompt, completion in (("m-b", 2, 1000, 0), ("m-a", 1, 2000, 10), ("m-c", 1, 500, 10), ("M-d", 4, 100, 0)):
        for _ in range(calls):
            call(uma, model=model, prompt=prompt, completion=completion)

    def models(query: str) -> list[str]:
        return [row.spend.label for row in viewer_client.get(f"{console_url}?{query}").context["models"].rows]

    # spend: m-a 2.02, m-b 2, m-c 0.52, M-d 0.4; calls 1, 2, 1, 4; tokens out 10, 0, 10, 0
    assert models("") == ["m-a", "m-b", "m-c", "M-d"]
    assert models("o_model=cost") == ["M-d", "m-c", "m-b", "m-a"]
    assert models("o_model=-requests") == ["M-d", "m-b", "m-a", "m-c"]  # m-a and m-c tie: by name
    assert models("o_model=requests") == ["m-a", "m-c", "m-b", "M-d"]
    assert models("o_model=-output") == ["m-a", "m-c", "M-d", "m-b"]
    assert models("o_model=name") == ["M-d", "m-a", "m-b", "m-c"]  # code point order
    assert models("o_model=-name") == ["m-c", "m-b", "m-a", "M-d"]
    [row] = viewer_client.get(f"{console_url}?o_model=-requests").context["models"].rows[:1]
    assert (row.spend.id, row.spend.sums.requests, row.spend.sums.prompt_tokens) == ("M-d", 4, 400)
    assert len(viewer_client.get(console_url).context["models"].rows) == 4


def test_bad_parameters_show_the_defaults_with_a_400(viewer_client, console_url, clock) -> None:
    response = viewer_client.get(f"{console_url}?days=0&top=7&o_key=price")
    assert response.status_code == 400
    assert set(response.context["errors"]) == {"days", "top", "o_key"}
    assert response.context["days"].days == 30 and len(response.context["chart"]) > 0


def test_error_and_cancel_rates_and_tokens_come_from_the_rollups(viewer_client, console_url, clock, call, user_factory) -> None:
    ivan = user_factory("ivan")
    for status in ("completed", "completed", "cancelled", "upstream_error", "timeout", "rejected", "completed", "completed"):
        call(ivan, status=status, prompt=10, completion=5)
    response = viewer_client.get(console_url)
    [model] = response.context["models"].rows
    sums = model.spend.sums
    assert (sums.requests, sums.failed_requests, sums.cancelled_requests) == (8, 2, 1)
    assert (sums.prompt_tokens, sums.completion_tokens) == (80, 40)
    page = response.content.decode()
    assert '<td class="num">25%</td>' in page and '<td class="num">12%</td>' in page  # 2/8 failed, 1/8 cancelled


def test_spend_by_key_and_without_a_key(viewer_client, console_url, clock, call, user_factory) -> None:
    jo = user_factory("jo")
    ci, _ = api_key_create(username="jo", name="ci")
    laptop, _ = api_key_create(username="jo", name="laptop")
    call(jo, api_key_id=ci.pk, prompt=3000)
    call(jo, api_key_id=laptop.pk, prompt=1000)
    call(jo, api_key_id=None, prompt=500)  # the chat page
    response = viewer_client.get(console_url)
    keys = response.context["keys"].rows
    assert [(row.spend.label, row.spend.detail, row.spend.sums.cost_usd) for row in keys] == [
        (ci.prefix, "ci · jo", Decimal(3)), (laptop.prefix, "laptop · jo", Decimal(1)),
    ]
    assert response.context["totals"].without_a_key_usd == Decimal("0.5")


def test_ttft_percentiles_per_model_read_the_last_24_hours(viewer_client, console_url, clock, call, user_factory) -> None:
    kim = user_factory("kim")
    for ms in range(20, 0, -1):  # 20 calls: 1 ms to 20 ms
        call(kim, ttft_us=ms * 1000, at=NOW - timedelta(minutes=ms))
    call(kim, ttft_us=None, at=NOW - timedelta(minutes=1))  # no first token: not ranked
    call(kim, ttft_us=900_000, at=NOW - timedelta(hours=24, seconds=1))  # before the window
    call(kim, model="console-other", ttft_us=1_500_000, at=NOW - timedelta(hours=23))
    latency = viewer_client.get(console_url).context["latency"]
    # Nearest rank: p50 is the 10th of 20 values, p95 the 19th.
    assert {model: (entry.calls, entry.p50_us, entry.p95_us) for model, entry in latency.items()} == {
        "console-test": (20, 10_000, 19_000),
        "console-other": (1, 1_500_000, 1_500_000),
    }
    page = viewer_client.get(console_url).content.decode()
    assert '<td class="num">10 ms</td><td class="num">19 ms</td>' in page
    assert '<td class="num">1.5 s</td><td class="num">1.5 s</td>' in page


# --- Budgets -----------------------------------------------------------------------------------


def test_budgets_past_their_soft_threshold_come_first_then_the_fullest(viewer_client, console_url, clock, call, user_factory) -> None:
    def account(name: str, **limits):
        user = user_factory(name)
        return user, account_quota_set(user_id=user.pk, **limits)

    calm, _ = account("calm", monthly_spend_limit_usd=Decimal(10))
    call(calm, prompt=2000)  # 20 %
    close, _ = account("close", monthly_spend_limit_usd=Decimal(10), soft_threshold=Decimal("0.95"))
    call(close, prompt=9000)  # 90 %, under its 95 % threshold
    tokens, _ = account("tokens", daily_token_limit=1000)
    call(tokens, prompt=850, at=NOW - timedelta(hours=1))  # 85 % of today's tokens
    call(tokens, prompt=5000, at=NOW - timedelta(days=1))  # yesterday: not today's
    held, held_account = account("held", monthly_spend_limit_usd=Decimal(10))
    call(held, prompt=5000)
    Reservation.objects.create(request_id=uuid.uuid4(), account=held_account, model="console-test", cost_usd=Decimal(4), tokens=10,
                               created_at=NOW, expires_at=NOW + timedelta(minutes=1))  # 50 % + 40 % held
    Reservation.objects.create(request_id=uuid.uuid4(), account=held_account, model="console-test", cost_usd=Decimal(100), tokens=10,
                               created_at=NOW - timedelta(hours=1), expires_at=NOW)  # expired: not held
    over, _ = account("over", daily_spend_limit_usd=Decimal(1), monthly_spend_limit_usd=Decimal(100))
    call(over, prompt=1200)  # 120 % of the day
    user_factory("free")  # no limits: not listed

    response = viewer_client.get(console_url)
    boards = response.context["budgets"]
    assert [board.username for board in boards] == ["over", "held", "tokens", "close", "calm"]
    assert [board.past_threshold for board in boards] == [True, True, True, False, False]
    [held_budget] = boards[1].budgets
    assert (held_budget.spent, held_budget.held, held_budget.left) == (Decimal(5), Decimal(4), Decimal(1))
    page = response.content.decode()
    assert [m for m in re.findall(r'<tr class="(past-threshold)?" data-user="(\w+)"', page)] == [
        ("past-threshold", "over"), ("past-threshold", "held"), ("past-threshold", "tokens"), ("", "close"), ("", "calm"),
    ]
    assert '<rect class="spent" width="50.00" height="8"/>' in page
    assert '<rect class="held" x="50.00" width="40.00" height="8"/>' in page
    assert "over by $0.20" in page


# --- The chart -----------------------------------------------------------------------------------


@pytest.mark.parametrize("days", [1, 7, 30, 90])
def test_the_chart_has_one_point_per_day_of_the_range(viewer_client, console_url, clock, call, user_factory, days) -> None:
    lee = user_factory("lee")
    call(lee, at=NOW - timedelta(days=days - 1), prompt=3000)  # the range's first day
    call(lee, at=NOW - timedelta(days=days), prompt=99_000)  # the day before it: not drawn
    page = viewer_client.get(f"{console_url}?days={days}").content.decode()
    drawn = re.findall(r'<circle class="point" cx="[\d.]+" cy="([\d.]+)" r="3.5" data-day="([\d-]+)"', page)
    first = (NOW - timedelta(days=days - 1)).date()
    assert [day for _, day in drawn] == [(first + timedelta(days=n)).isoformat() for n in range(days)]
    assert drawn[0][0] == "16.00"  # the largest day touches the top
    assert 'data-peak-usd="3.0000000000"' in page


def test_period_cards_compare_with_the_same_days_before(viewer_client, console_url, clock, call, user_factory) -> None:
    mo = user_factory("mo")
    clock(datetime(2025, 6, 18, 9, tzinfo=UTC))  # a Wednesday
    call(mo, at=datetime(2025, 6, 18, 8, tzinfo=UTC), prompt=3000)  # today
    call(mo, at=datetime(2025, 6, 17, 8, tzinfo=UTC), prompt=1000)  # yesterday
    call(mo, at=datetime(2025, 6, 11, 8, tzinfo=UTC), prompt=2000)  # last Wednesday
    call(mo, at=datetime(2025, 6, 12, 8, tzinfo=UTC), prompt=7000)  # last Thursday: after the days compared
    call(mo, at=datetime(2025, 5, 2, 12, tzinfo=UTC), prompt=30_000)  # compared with 1-18 June
    call(mo, at=datetime(2025, 5, 18, 23, 59, tzinfo=UTC), prompt=500)  # the last day compared
    call(mo, at=datetime(2025, 5, 19, 0, tzinfo=UTC), prompt=9000)  # 19 May: not compared
    response = viewer_client.get(console_url)
    periods = {spend.kind: (spend.spent, spend.previous_spent) for spend in response.context["periods"]}
    assert periods == {
        "day": (Decimal(3), Decimal(1)),
        "week": (Decimal(4), Decimal(2)),
        "month": (Decimal(13), Decimal("30.5")),
    }
    page = response.content.decode()
    assert '<span class="change up">+200%</span>' in page  # today against yesterday
    assert '<span class="change down">\N{MINUS SIGN}57%</span>' in page  # June 1-18 against May 1-18: 13 / 30.5


# --- Spend per endpoint -------------------------------------------------------------------------


def test_spend_per_endpoint_over_the_range_with_its_share_and_ledger_link(viewer_client, console_url, clock, call, user_factory) -> None:
    kim, lou = user_factory("kim"), user_factory("lou")
    call(kim, prompt=3000, completion=500)  # chat completions: $3 + $1
    call(lou, prompt=1000, status="upstream_error")  # $1
    call(kim, endpoint="responses", prompt=2000, completion=1000, status="cancelled")  # $2 + $2
    call(lou, endpoint="embeddings", model="console-embed", prompt=1000, ttft_us=None)  # $1
    call(kim, endpoint="responses", prompt=1000, at=NOW - timedelta(days=40))  # before the range
    response = viewer_client.get(console_url)
    assert response.status_code == 200
    rows = response.context["endpoints"]
    assert [(row.spend.endpoint, row.spend.path) for row in rows] == [
        ("chat.completions", "/v1/chat/completions"), ("responses", "/v1/responses"), ("embeddings", "/v1/embeddings"),
    ]
    assert [
        (row.spend.sums.cost_usd, row.spend.sums.requests, row.spend.sums.prompt_tokens, row.spend.sums.completion_tokens)
        for row in rows
    ] == [(Decimal(5), 2, 4000, 500), (Decimal(4), 1, 2000, 1000), (Decimal(1), 1, 1000, 0)]
    assert [(row.spend.sums.failed_requests, row.spend.sums.cancelled_requests) for row in rows] == [(1, 0), (0, 1), (0, 0)]
    assert [row.spend.share for row in rows] == [Decimal("0.5"), Decimal("0.4"), Decimal("0.1")]
    assert sum(row.spend.sums.cost_usd for row in rows) == response.context["totals"].all_calls.cost_usd

    page = response.content.decode()
    section = page[page.index('id="by-endpoint"'):]
    assert "<code>/v1/responses</code>" in section and usd_brief(Decimal(4)) in section
    assert '<td class="num">40%</td>' in section
    # Each endpoint opens its calls of the range in the ledger, which agrees.
    link = re.search(r'<tr data-id="responses">\s*<th scope="row"><a href="([^"]+)"', section)
    assert link is not None
    ledger = viewer_client.get(link.group(1).replace("&amp;", "&"))
    assert ledger.status_code == 200
    assert ledger.context["totals"].requests == 1 and ledger.context["totals"].cost_usd == Decimal(4)


def test_spend_per_endpoint_follows_the_days_asked_for(viewer_client, console_url, clock, call, user_factory) -> None:
    mo = user_factory("mo")
    call(mo, endpoint="completions", prompt=1000, at=NOW - timedelta(days=40))
    assert viewer_client.get(console_url).context["endpoints"] == []
    assert "No calls in this range." in viewer_client.get(console_url).content.decode()
    [row] = viewer_client.get(console_url, {"days": 90}).context["endpoints"]
    assert (row.spend.endpoint, row.spend.sums.cost_usd, row.spend.share) == ("completions", Decimal(1), Decimal(1))
