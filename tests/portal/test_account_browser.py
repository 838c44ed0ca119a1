"""An end user's own page in a real headless Chromium, served by Granian: its total is the export's,
and a key made there works with the OpenAI SDK until it is revoked there."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from decimal import Decimal

import openai
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.utils import timezone

from billing.display import usd_brief
from billing.services import account_quota_set
from llmgateway.models import ApiKey
from llmgateway.services import api_key_create
from tests.portal.conftest import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.ledger]

WIDE, NARROW = 1280, 390
SERVED_SECRET_KEY = "test-only-secret-key-for-served-gateways"  # tests.conftest.start_gateway's


def logged_in_page(browser, gateway, username: str, width: int):
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.goto(f"{gateway.base_url}/accounts/login/?next=/account/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("#login")
    page.wait_for_url(f"{gateway.base_url}/account/")
    return context, page


def export_costs(username: str, since: str, until: str) -> dict:
    """`manage.py export_costs --user U --since ... --until ... --totals` (as JSON): the ledger's rows and their totals."""
    out = io.StringIO()
    call_command("export_costs", "--user", username, "--since", since, "--until", until, "--totals", "--format", "json", "--no-progress", stdout=out)
    return json.loads(out.getvalue())


def test_the_usage_total_is_the_exports_total_for_the_same_days(browser, gateway, user_factory, call_factory, screenshot_dir) -> None:
    uma, other = user_factory("uma"), user_factory("otto")
    now = timezone.now()
    api_key, _ = api_key_create(username="uma", name="notebook")
    for days_ago, model, prompt in [(0, "gpt-4o", 60_000), (1, "gpt-4o", 40_000), (3, "gpt-4o-mini", 250_000), (6, "gpt-4o", 9_000), (12, "o3-mini", 33_000), (20, "gpt-4o", 5_000)]:
        call_factory(uma, at=now - timedelta(days=days_ago), model=model, prompt=prompt, completion=prompt // 7)
        call_factory(uma, at=now - timedelta(days=days_ago, hours=2), model=model, prompt=prompt // 3, api_key=api_key)
    call_factory(other, at=now - timedelta(days=2), model="gpt-4o", prompt=500_000)
    account_quota_set(user_id=uma.pk, monthly_spend_limit_usd=Decimal("2.50"), daily_token_limit=200_000)
    first = (now - timedelta(days=14)).date()
    last = now.date()

    for width in (WIDE, NARROW):
        context, page = logged_in_page(browser, gateway, "uma", width)
        page.goto(f"{gateway.base_url}/account/?first={first:%Y-%m-%d}&last={last:%Y-%m-%d}")
        page.screenshot(path=str(screenshot_dir / f"account-usage-{width}.png"), full_page=True)

        export = export_costs("uma", f"{first:%Y-%m-%d}", f"{last + timedelta(days=1):%Y-%m-%d}")
        totals = export["totals"]
        shown = page.locator("#period-total")
        assert Decimal(shown.get_attribute("data-cost-usd")) == Decimal(totals["cost_usd"]) > 0
        assert shown.inner_text() == usd_brief(Decimal(totals["cost_usd"]))
        assert page.locator("#period-calls").inner_text() == str(len(export["rows"])) == "10"
        assert page.locator(".spend-chart circle.point").count() == 15
        assert page.locator("#by-model tbody tr").count() == 3
        assert page.locator("[data-budget=spend-month] svg.bar").is_visible()
        assert page.locator("#key-list tr[data-prefix]").count() == 1
        # Nothing wider than the window: the page never scrolls sideways, at phone width either.
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        context.close()


def test_a_key_made_on_the_page_works_with_the_openai_sdk_until_revoked_there(browser, gateway, user_factory, screenshot_dir) -> None:
    user_factory("vera")
    context, page = logged_in_page(browser, gateway, "vera", WIDE)
    page.fill("#id_name", "sdk test")
    page.click("#create-key")
    secret = page.locator("#new-key-secret").input_value()
    page.screenshot(path=str(screenshot_dir / "account-new-key-1280.png"), full_page=True)
    api_key = ApiKey.objects.get(user__username="vera")
    assert secret.startswith(api_key.prefix) and api_key.name == "sdk test"

    client = openai.OpenAI(base_url=gateway.api_url, api_key=secret, max_retries=0, timeout=20)
    completion = client.chat.completions.create(model="sim-fast", messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert completion.choices[0].message.content

    page.goto(f"{gateway.base_url}/account/")
    assert secret not in page.content()  # shown once
    row = page.locator(f"#key-list tr[data-prefix='{api_key.prefix}']")
    row.get_by_role("button", name="Revoke").click()
    page.wait_for_selector(f"#key-list tr[data-prefix='{api_key.prefix}'][data-state=revoked]")
    assert "Revoked" in page.locator(".messages").inner_text()

    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model="sim-fast", messages=[{"role": "user", "content": "Hello again"}], max_tokens=8)
    assert refused.value.status_code == 401
    context.close()

    context, page = logged_in_page(browser, gateway, "vera", NARROW)
    page.screenshot(path=str(screenshot_dir / "account-keys-390.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW
    context.close()


def test_a_user_given_a_link_by_createlogin_sets_a_password_logs_in_and_changes_it(browser, gateway, screenshot_dir, settings) -> None:
    settings.SECRET_KEY = SERVED_SECRET_KEY  # the link is signed: made with the server's secret key
    api_key_create(username="wanda")  # a user with a key and no password, as createapikey makes them
    out = io.StringIO()
    call_command("createlogin", "wanda", "--base-url", gateway.base_url, stdout=out, stderr=io.StringIO())
    link = out.getvalue().strip()
    context = browser.new_context(viewport={"width": NARROW, "height": 800})
    page = context.new_page()

    page.goto(link)
    page.screenshot(path=str(screenshot_dir / "password-set-390.png"), full_page=True)
    page.fill("#id_new_password1", "first chosen passphrase")
    page.fill("#id_new_password2", "first chosen passphrase")
    page.click("#set-password")
    page.wait_for_selector("#password-set-done")
    page.goto(link)
    assert page.locator("#invalid-link").is_visible()  # it worked once

    page.goto(f"{gateway.base_url}/accounts/login/?next=/account/")
    page.fill("#id_username", "wanda")
    page.fill("#id_password", "first chosen passphrase")
    page.click("#login")
    page.wait_for_url(f"{gateway.base_url}/account/")
    assert page.locator("#key-list tr[data-prefix]").count() == 1

    page.click("text=Change your password")
    page.fill("#id_old_password", "first chosen passphrase")
    page.fill("#id_new_password1", "second chosen passphrase")
    page.fill("#id_new_password2", "second chosen passphrase")
    page.click("#change-password")
    page.wait_for_selector("#password-changed")
    context.close()
    assert get_user_model().objects.get(username="wanda").check_password("second chosen passphrase")
