"""The cost console in a real headless Chromium at 1,280 px, served by Granian with its static files.

Staff log in at the admin and land on the console; the page is drawn with the admin's and the
console's stylesheets and a screenshot is written to SCREENSHOT_DIR (else the test's tmp_path).
"""

from __future__ import annotations

import random
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.utils import timezone

from billing.models import Reservation
from billing.selectors import rates_for
from billing.services import account_get_or_create, account_quota_set, usage_record_create
from llmgateway.services import api_key_create

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.ledger]

WIDTH = 1280
PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar")
MODELS = {"gpt-4o-mini": (400_000, 3), "gpt-4o": (650_000, 2), "o3-mini": (1_800_000, 1), "gpt-4.1-nano": (300_000, 2)}
DAYS = 30


@pytest.fixture
def served(gateway_factory, settings, tmp_path):
    """A gateway serving `collectstatic`'s output at /static, as `scripts/serve` does."""
    settings.STATIC_ROOT = tmp_path / "static"
    call_command("collectstatic", interactive=False, verbosity=0)
    return gateway_factory(granian_args=("--static-path-route", "/static", "--static-path-mount", str(settings.STATIC_ROOT)))


def _a_month_of_calls() -> None:
    """Twelve people, their keys and budgets, a month of calls on four models, two calls in flight."""
    dice = random.Random(11)
    now = timezone.now()
    for index, name in enumerate(PEOPLE):
        user = get_user_model().objects.create(username=name)
        keys = [api_key_create(username=name, name=label)[0].pk for label in ("ci", "laptop", "batch")[: 1 + index % 3]]
        appetite = 3 + (index * 7) % 11
        account = account_get_or_create(user_id=user.pk)
        rates = {model: rates_for(account=account, model=model, at=now) for model in MODELS}
        for days_ago in range(DAYS - 1, -1, -1):
            weekday = (now - timedelta(days=days_ago)).weekday()
            for _ in range(dice.randint(0, appetite if weekday < 5 else appetite // 3)):
                model = dice.choices(list(MODELS), weights=[weight for _, weight in MODELS.values()])[0]
                roll = dice.random()
                status = "cancelled" if roll < 0.06 else "upstream_error" if roll < 0.08 else "timeout" if roll < 0.09 else "completed"
                at = now - timedelta(days=days_ago, minutes=dice.randint(1, 600))
                usage_record_create(
                    request_id=uuid.uuid4(), user_id=user.pk, api_key_id=dice.choice([*keys, None]), model=model,
                    upstream_model=model, provider="openai", stream=True, status=status, error_kind="",
                    prompt_tokens=dice.randint(200, 6000), completion_tokens=dice.randint(50, 2500), cached_tokens=0,
                    reasoning_tokens=0, token_source="upstream",
                    ttft_us=int(MODELS[model][0] * (0.6 + dice.random() * dice.random() * 3)),
                    duration_us=3_000_000, created_at=at, rates=rates[model],  # type: ignore[arg-type]
                )
    # Budgets: some past their soft threshold whatever the day of the month the test runs on,
    # through what is held for calls in flight and a large call just now.
    budgets = {
        "alice": ({"monthly_spend_limit_usd": Decimal("0.40")}, None),
        # Bob stays under his thresholds on any day at any hour: his busiest day (ten calls of up
        # to 8,500 tokens) and his hold stay well under 80% of his daily tokens.
        "bob": ({"monthly_spend_limit_usd": Decimal("25"), "daily_token_limit": 150_000}, (Decimal("0.12"), 9000)),
        "carol": ({"monthly_spend_limit_usd": Decimal("1.00"), "soft_threshold": Decimal("0.9")}, (Decimal("0.95"), 40_000)),
        "dave": ({"daily_spend_limit_usd": Decimal("0.50"), "monthly_spend_limit_usd": Decimal("10")}, (Decimal("0.45"), 30_000)),
        "erin": ({"monthly_token_limit": 2_000_000}, None),
        "grace": ({"monthly_spend_limit_usd": Decimal("100")}, None),
    }
    for name, (limits, hold) in budgets.items():
        user = get_user_model().objects.get(username=name)
        account = account_quota_set(user_id=user.pk, **limits)
        if hold is not None:
            Reservation.objects.create(
                request_id=uuid.uuid4(), account=account, model="gpt-4o", cost_usd=hold[0], tokens=hold[1],
                created_at=now, expires_at=now + timedelta(minutes=5),
            )
    alice = get_user_model().objects.get(username="alice")
    usage_record_create(  # 200,000 prompt tokens of gpt-4o: $0.50, over a $0.40 month
        request_id=uuid.uuid4(), user_id=alice.pk, api_key_id=None, model="gpt-4o", upstream_model="gpt-4o",
        provider="openai", stream=True, status="completed", error_kind="", prompt_tokens=200_000,
        completion_tokens=0, cached_tokens=0, reasoning_tokens=0, token_source="upstream", ttft_us=700_000,
        duration_us=9_000_000, created_at=now, rates=rates_for(account=account_get_or_create(user_id=alice.pk), model="gpt-4o", at=now),  # type: ignore[arg-type]
    )


def test_staff_land_on_the_console_and_it_reads_well_at_1280_px(browser, served, screenshot_dir) -> None:
    _a_month_of_calls()
    get_user_model().objects.create_superuser("olivia", "olivia@example.com", "correct horse battery")
    context = browser.new_context(viewport={"width": WIDTH, "height": 900})
    page = context.new_page()
    page.goto(f"{served.base_url}/admin/")
    page.fill("#id_username", "olivia")
    page.fill("#id_password", "correct horse battery")
    page.click("input[type=submit]")
    page.wait_for_url(f"{served.base_url}/admin/console/")
    page.screenshot(path=str(screenshot_dir / "console-1280.png"), full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(screenshot_dir / "console-1280-dark.png"), full_page=True)
    page.emulate_media(color_scheme="light")

    endpoints = page.locator("#by-endpoint")
    endpoints.screenshot(path=str(screenshot_dir / "console-endpoints-1280.png"))
    assert endpoints.is_visible() and "/v1/chat/completions" in endpoints.inner_text()
    assert page.title() == "Cost console | llmgateway"
    assert page.locator("#site-name").inner_text() == "llmgateway"
    # The console's stylesheet is served from the project: the cards are a grid.
    assert page.locator(".cards").evaluate("element => getComputedStyle(element).display") == "grid"
    assert page.locator(".spend-chart circle.point").count() == DAYS
    assert page.locator("#top-users tbody tr").count() == 10
    assert page.locator("#budgets tbody tr").count() == 6
    assert page.locator("#budgets tbody tr").first.get_attribute("data-user") == "alice"  # over her month
    assert page.locator("#budgets tbody tr.past-threshold").count() == 3  # alice, carol, dave
    # Nothing wider than the window: no horizontal scrolling at 1,280 px.
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTH
    page.set_viewport_size({"width": 390, "height": 844})  # a phone, for the reviewer's eye
    page.screenshot(path=str(screenshot_dir / "console-390.png"), full_page=True)
    context.close()
