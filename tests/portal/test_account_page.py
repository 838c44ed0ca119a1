"""An end user's own page: their usage from the rollups, their budgets, their keys; nobody else's."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import Reservation
from billing.money import money_sum
from billing.services import account_quota_set
from llmgateway import portal
from llmgateway.models import ApiKey, hash_api_key
from llmgateway.services import api_key_create

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]



@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """The page's clock, stopped at the test's start."""
    at = timezone.now()
    monkeypatch.setattr(portal, "now", lambda: at)
    return at


def total_on_page(content: bytes) -> Decimal:
    match = re.search(rb'id="period-total" data-cost-usd="([0-9.]+)"', content)
    assert match is not None
    return Decimal(match.group(1).decode())


def test_the_page_needs_a_login(client) -> None:
    response = client.get("/account/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_a_user_sees_only_their_own_usage_by_day_and_by_model(user_factory, client_for, call_factory, frozen_clock) -> None:
    alice, bob = user_factory("alice"), user_factory("bob")
    mine = [
        call_factory(alice, at=frozen_clock - timedelta(days=2), model="gpt-4o-mini"),
        call_factory(alice, at=frozen_clock - timedelta(days=2), model="gpt-4o"),
        call_factory(alice, at=frozen_clock - timedelta(hours=1), model="gpt-4o"),
    ]
    call_factory(alice, at=frozen_clock - timedelta(days=40))  # before the 30 days shown
    call_factory(bob, at=frozen_clock - timedelta(hours=1), model="o3-mini", prompt=900_000)

    response = client_for(alice).get("/account/")

    assert response.status_code == 200
    assert total_on_page(response.content) == money_sum([record.cost_usd for record in mine])
    assert response.context["usage"].totals.requests == 3
    assert [row.model for row in response.context["usage"].by_model] == ["gpt-4o", "gpt-4o-mini"]
    assert b"o3-mini" not in response.content
    assert response.content.count(b'class="point"') == 30  # one point a day, today included
    day_two = next(day for day in response.context["usage"].by_day if day.day == (frozen_clock - timedelta(days=2)).date())
    assert day_two.requests == 2 and day_two.cost_usd == mine[0].cost_usd + mine[1].cost_usd
    assert response["Cache-Control"].startswith("max-age=0") and "no-store" in response["Cache-Control"]
    assert "script-src 'none'" in response["Content-Security-Policy"]  # the page runs no script


def test_a_chosen_range_of_days_includes_both_ends(user_factory, client_for, call_factory, frozen_clock) -> None:
    alice = user_factory("alice")
    first = call_factory(alice, at=datetime.fromisoformat("2025-06-01T00:00:00+00:00"))
    last = call_factory(alice, at=datetime.fromisoformat("2025-06-10T23:59:59+00:00"))
    call_factory(alice, at=datetime.fromisoformat("2025-06-11T00:00:00+00:00"))

    response = client_for(alice).get("/account/", {"first": "2025-06-01", "last": "2025-06-10"})

    assert response.status_code == 200
    assert total_on_page(response.content) == first.cost_usd + last.cost_usd
    assert response.content.count(b'class="point"') == 10


@pytest.mark.parametrize(
    "query",
    [
        {"days": "abc"},
        {"days": "0"},
        {"days": "367"},
        {"first": "2025-13-01", "last": "2025-06-10"},
        {"first": "2025-06-01"},
        {"first": "2025-06-10", "last": "2025-06-01"},
        {"first": "2024-01-01", "last": "2025-06-01"},
        {"first": "'; DROP TABLE x", "last": "\x00"},
        {"first": "9999-12-31", "last": "9999-12-31"},
        {"first": "0001-01-01", "last": "0001-01-02"},
        {"days": "7\x00"},
    ],
    ids=["not-a-number", "zero-days", "too-many-days", "no-such-month", "first-alone", "backwards", "over-a-year", "garbage",
         "last-day-of-the-calendar", "first-day-of-the-calendar", "days-nul"],
)
def test_bad_parameters_give_the_default_range_and_a_400(user_factory, client_for, query) -> None:
    response = client_for(user_factory("alice")).get("/account/", query)
    assert response.status_code == 400
    assert b'id="query-errors"' in response.content
    assert response.context["period"].days == portal.DEFAULT_DAYS


def test_the_page_costs_the_same_queries_whatever_the_keys_and_days(
    user_factory, client_for, call_factory, frozen_clock, django_assert_max_num_queries
) -> None:
    alice = user_factory("alice")
    account_quota_set(user_id=alice.pk, monthly_spend_limit_usd=Decimal("10"), daily_token_limit=100_000)
    client = client_for(alice)
    # The session, the user, the usage, the keys and their spend, the account and its budgets' use.
    with django_assert_max_num_queries(7):
        assert client.get("/account/").status_code == 200
    for index in range(12):
        api_key, _ = api_key_create(username="alice", name=f"key {index}")
        for days_ago in range(0, 60, 3):
            call_factory(alice, at=frozen_clock - timedelta(days=days_ago), api_key=api_key, model=("gpt-4o", "gpt-4o-mini")[index % 2])
    with django_assert_max_num_queries(7):
        response = client.get("/account/", {"days": "90"})
    assert response.status_code == 200
    assert len(response.context["keys"]) == 12


def test_budgets_show_spent_held_and_left(user_factory, client_for, call_factory, frozen_clock) -> None:
    alice = user_factory("alice")
    account = account_quota_set(user_id=alice.pk, monthly_spend_limit_usd=Decimal("1.00"))
    spent = call_factory(alice, at=frozen_clock, model="gpt-4o", prompt=100_000, completion=0)  # $0.25
    Reservation.objects.create(
        request_id="00000000-0000-0000-0000-000000000001", account=account, model="gpt-4o", cost_usd=Decimal("0.10"),
        tokens=1000, created_at=frozen_clock, expires_at=frozen_clock + timedelta(minutes=5),
    )

    response = client_for(alice).get("/account/")

    [budget] = response.context["budgets"].budgets
    assert (budget.kind, budget.period) == ("spend", "month")
    assert budget.spent == spent.cost_usd == Decimal("0.25")
    assert budget.held == Decimal("0.10") and budget.left == Decimal("0.65")
    text = response.content.decode()
    assert "35%" in text and "$0.25 spent + $0.10 held" in text and "$0.65 left" in text
    assert '<rect class="spent" width="25.00"' in text and '<rect class="held" x="25.00" width="10.00"' in text


def test_no_budget_is_said_plainly(user_factory, client_for) -> None:
    response = client_for(user_factory("alice")).get("/account/")
    assert response.context["budgets"] is None
    assert b"No budget or quota is set for you." in response.content


# --- Keys ----------------------------------------------------------------------------------


def test_a_new_key_is_shown_once_then_only_its_prefix(user_factory, client_for) -> None:
    alice = user_factory("alice")
    client = client_for(alice)

    response = client.post("/account/keys/", {"name": "laptop"})

    assert response.status_code == 201
    assert "no-store" in response["Cache-Control"] and "script-src 'none'" in response["Content-Security-Policy"]
    secret = re.search(rb'id="new-key-secret" type="text" readonly value="([^"]+)"', response.content).group(1).decode()
    api_key = ApiKey.objects.get(user=alice)
    assert api_key.name == "laptop" and api_key.key_hash == hash_api_key(secret) and secret.startswith(api_key.prefix)
    again = client.get("/account/")
    assert secret.encode() not in again.content
    assert api_key.prefix.encode() in again.content


@pytest.mark.parametrize("name", ["x" * 101, "a\x00b"], ids=["too-long", "nul"])
def test_a_bad_key_name_is_a_400_and_no_key(user_factory, client_for, name) -> None:
    alice = user_factory("alice")
    response = client_for(alice).post("/account/keys/", {"name": name})
    assert response.status_code == 400 and b'id="key-errors"' in response.content
    assert not ApiKey.objects.filter(user=alice).exists()


def test_a_user_has_at_most_the_set_number_of_active_keys(user_factory, client_for, monkeypatch) -> None:
    monkeypatch.setattr(portal, "MAX_ACTIVE_KEYS", 2)
    alice = user_factory("alice")
    client = client_for(alice)
    assert [client.post("/account/keys/", {"name": str(n)}).status_code for n in range(3)] == [201, 201, 400]
    assert ApiKey.objects.filter(user=alice).count() == 2
    response = client.post("/account/keys/", {"name": "third"})
    assert b"You have 2 active keys, the most you may have." in response.content


def test_revoking_a_key_goes_through_the_service_that_stops_its_calls(user_factory, client_for, monkeypatch) -> None:
    from calls.control import StopOrder
    from llmgateway import services

    orders: list[StopOrder] = []
    monkeypatch.setattr(services, "stop_calls_sync", orders.append)
    alice = user_factory("alice")
    api_key, _ = api_key_create(username="alice", name="ci")

    response = client_for(alice).post(f"/account/keys/{api_key.pk}/revoke")

    assert response.status_code == 303 and response["Location"] == "/account/#keys"
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None
    assert orders == [StopOrder(reason="api_key_revoked", api_key_id=api_key.pk)]
    page = client_for(alice).get("/account/")
    assert b'data-state="revoked"' in page.content


def test_a_user_cannot_touch_another_users_keys(user_factory, client_for) -> None:
    user_factory("alice")
    mallory = user_factory("mallory")
    alices_key, _ = api_key_create(username="alice", name="prod")
    client = client_for(mallory)

    assert client.post(f"/account/keys/{alices_key.pk}/revoke").status_code == 404
    assert client.post(f"/account/keys/{alices_key.pk}/rename", {"name": "pwned"}).status_code == 404
    assert alices_key.prefix.encode() not in client.get("/account/").content
    alices_key.refresh_from_db()
    assert alices_key.revoked_at is None and alices_key.name == "prod"


def test_a_key_is_renamed(user_factory, client_for) -> None:
    alice = user_factory("alice")
    api_key, _ = api_key_create(username="alice", name="old")
    client = client_for(alice)
    assert client.post(f"/account/keys/{api_key.pk}/rename", {"name": "new name"}).status_code == 303
    api_key.refresh_from_db()
    assert api_key.name == "new name"
    assert client.post(f"/account/keys/{api_key.pk}/rename", {"name": "y" * 101}).status_code == 400
    assert client.post(f"/account/keys/{api_key.pk}/rename", {"name": "n\x00"}).status_code == 400
    api_key.refresh_from_db()
    assert api_key.name == "new name"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/account/keys/"),
        ("get", "/account/keys/1/revoke"),
        ("post", "/account/"),
        ("post", "/account/keys/abc/revoke"),
        ("post", f"/account/keys/{10**20}/revoke"),
        ("post", f"/account/keys/{10**20}/rename"),
    ],
    ids=["get-create", "get-revoke", "post-page", "not-an-id", "id-past-bigint", "rename-id-past-bigint"],
)
def test_wrong_methods_and_paths_are_4xx(user_factory, client_for, method, path) -> None:
    response = getattr(client_for(user_factory("alice")), method)(path)
    assert response.status_code in (404, 405)


def test_key_forms_need_the_csrf_token(user_factory, client_for) -> None:
    alice = user_factory("alice")
    api_key, _ = api_key_create(username="alice")
    client = client_for(alice, enforce_csrf_checks=True)
    assert client.post("/account/keys/", {"name": "sneaky"}).status_code == 403
    assert client.post(f"/account/keys/{api_key.pk}/revoke").status_code == 403
    assert ApiKey.objects.filter(user=alice).count() == 1 and ApiKey.objects.get().revoked_at is None
    # With the token the page gives, it works.
    page = client.get("/account/")
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.content).group(1).decode()
    assert client.post("/account/keys/", {"name": "mine", "csrfmiddlewaretoken": token}).status_code == 201


def test_the_chat_page_links_to_the_account_page(user_factory, client_for) -> None:
    response = client_for(user_factory("alice")).get("/chat/")
    assert b'href="/account/"' in response.content


def test_a_suspended_user_is_sent_to_log_in_and_makes_no_key(user_factory, client_for) -> None:
    from llmgateway.services import user_suspend

    alice = user_factory("alice")
    client = client_for(alice)
    user_suspend(user_id=alice.pk)

    assert client.get("/account/").status_code == 302
    assert client.post("/account/keys/", {"name": "after"}).status_code == 302
    assert not ApiKey.objects.filter(user=alice).exists()
