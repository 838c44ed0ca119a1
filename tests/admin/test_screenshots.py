"""The console's lists in a real headless Chromium at 1,280 px: each fits the width with its money
column in view, and a screenshot of each is written to $SCREENSHOT_DIR (else pytest's tmp_path).

The gateway is served by Granian as in production, with the admin's static files collected and
mounted as `scripts/serve` does, so the pages are styled as staff see them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from billing.models import Account, PricingPlan, UsageRecord
from billing.services import account_quota_set
from llmgateway.models import ApiKey
from llmgateway.services import api_key_create
from tests.conftest import Gateway, start_gateway, stop_gateway
from upstreams.models import PublicModel
from upstreams.services import upstreams_import

from .conftest import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.ledger]

WIDTH = 1280
# (screenshot name, admin path, the column that must be in view)
LISTS = [
    ("ledger", "billing/usagerecord/", "cost"),
    ("ledger-filtered", "billing/usagerecord/?status__exact=completed&model=gpt-4o", "cost"),
    ("rollups", "billing/dailyusage/", "cost"),
    ("accounts", "billing/account/", "used"),
    ("api-keys", "llmgateway/apikey/", "spent"),
    ("holds", "billing/reservation/", "worst_case"),
    ("plans", "billing/pricingplan/", "markup"),
    ("prices", "billing/price/", "output_rate"),
    ("upstream-providers", "upstreams/upstreamprovider/", "enabled"),
    ("upstream-models", "upstreams/publicmodel/", "fallback_list"),
    ("upstream-deployments", "upstreams/upstreamdeployment/", "breaker"),
]
# Upstreams as staff would configure them: two providers, a model with two deployments and a fallback.
UPSTREAMS = {
    "providers": [
        {"name": "azure-east", "kind": "openai", "base_url": "https://east.example.openai.azure.com/openai/v1", "api_key_env": "AZURE_EAST_API_KEY"},
        {"name": "vllm", "kind": "openai", "base_url": "http://vllm:8000/v1"},
    ],
    "models": [
        {
            "name": "team-chat",
            "routing": "weighted",
            "fallbacks": ["llama-3.1-8b"],
            "deployments": [
                {"provider": "azure-east", "upstream_model": "gpt-4o-mini-prod", "weight": 3, "rpm": 500, "tpm": 200000},
                {"provider": "vllm", "upstream_model": "meta-llama/Llama-3.1-8B-Instruct", "weight": 1},
            ],
        },
        {"name": "llama-3.1-8b", "deployments": [{"provider": "vllm", "upstream_model": "meta-llama/Llama-3.1-8B-Instruct"}]},
    ],
}


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, django_db_setup, django_db_blocker, upstream) -> Iterator[Gateway]:
    """The gateway served by Granian with the admin's static files, for this module."""
    static = tmp_path_factory.mktemp("static")
    with override_settings(STATIC_ROOT=static):
        call_command("collectstatic", interactive=False, verbosity=0)
    server = start_gateway({}, upstream=upstream, granian_args=("--static-path-route", "/static", "--static-path-mount", str(static)))
    yield server
    stop_gateway(server)


@pytest.fixture
def staff_page(browser, console, django_user_model, ledger_factory):
    """A logged-in superuser's page over a ledger of 60 calls, a plan, a revoked key and a suspended user."""
    django_user_model.objects.create_superuser(username="root", password=PASSWORD, email="root@example.com")
    ledger = ledger_factory(60)
    ledger_factory(10, at=timezone.now() - timedelta(days=1))
    plan = PricingPlan.objects.create(name="enterprise", multiplier=Decimal("1.2"), description="20% over list, support included")
    account_quota_set(user_id=ledger.users[0].pk, plan=plan, monthly_spend_limit_usd=Decimal("0.05"))
    # As the revoke and suspend services leave them (which stop calls through async_to_sync:
    # not from this thread, where Playwright's event loop runs).
    ApiKey.objects.filter(pk=ledger.keys[1].pk).update(revoked_at=timezone.now())
    django_user_model.objects.filter(pk=ledger.users[2].pk).update(is_active=False)
    api_key_create(username="ops-bot", name="nightly report", expires_at=timezone.now() - timedelta(days=1))
    upstreams_import(document=UPSTREAMS)
    context = browser.new_context(viewport={"width": WIDTH, "height": 900})
    page = context.new_page()
    page.goto(f"{console.base_url}/admin/login/?next=/admin/")
    page.fill("#id_username", "root")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(r"/admin/(?!login/)"))  # the index, or whatever landing page it sends staff to
    yield page
    context.close()


def test_each_list_fits_1280_px_with_its_money_in_view(staff_page, console, screenshot_dir) -> None:
    page = staff_page
    misfits = []
    for name, path, column in LISTS:
        response = page.goto(f"{console.base_url}/admin/{path}")
        assert response is not None and response.status == 200, name
        assert page.evaluate("getComputedStyle(document.body).fontFamily") != "", name
        width = page.evaluate("document.documentElement.scrollWidth")
        # The admin scrolls a wide table inside its own box: that box must not need to.
        table = page.evaluate("(() => { const r = document.querySelector('#changelist-form .results'); return r && [r.scrollWidth, r.clientWidth, r.getBoundingClientRect().right]; })()")
        header = page.locator(f"#result_list th.column-{column}")
        box = header.bounding_box() if header.count() else None
        page.screenshot(path=str(screenshot_dir / f"admin-{name}.png"), full_page=True)
        if width > WIDTH or table is None or table[0] > table[1] or box is None or box["x"] + box["width"] > table[2] + 1:
            misfits.append(f"{name}: page {width} px wide, table {table} (scroll, client, right), {column} column at {box}")
    assert not misfits, misfits


def test_detail_pages_fit_1280_px(staff_page, console, screenshot_dir) -> None:
    page = staff_page
    record = UsageRecord.objects.order_by("-cost_usd").first()
    account = Account.objects.get(user__username="spender-0")
    pages = [
        ("ledger-row", f"billing/usagerecord/{record.pk}/change/"),
        ("account", f"billing/account/{account.pk}/change/"),
        ("export", "billing/usagerecord/export/"),
        ("upstream-model", f"upstreams/publicmodel/{PublicModel.objects.get(name='team-chat').pk}/change/"),
    ]
    misfits = []
    for name, path in pages:
        response = page.goto(f"{console.base_url}/admin/{path}")
        assert response is not None and response.status == 200, name
        page.screenshot(path=str(screenshot_dir / f"admin-{name}.png"), full_page=True)
        if (width := page.evaluate("document.documentElement.scrollWidth")) > WIDTH:
            misfits.append(f"{name}: {width} px wide")
        inline = page.evaluate("(() => { const t = document.querySelector('.inline-group .tabular'); return t && [t.scrollWidth, t.clientWidth]; })()")
        if inline is not None and inline[0] > inline[1]:
            misfits.append(f"{name}: its inline table needs {inline[0]} px of {inline[1]}")
        assert page.locator("ol.breadcrumbs li").count() >= 3, name
    assert not misfits, misfits


def test_a_key_created_in_the_browser_is_shown_once(staff_page, console, django_user_model, screenshot_dir) -> None:
    page = staff_page
    owner = django_user_model.objects.create(username="carol")
    page.goto(f"{console.base_url}/admin/llmgateway/apikey/add/")
    page.screenshot(path=str(screenshot_dir / "admin-api-key-add.png"), full_page=True)
    page.fill("#id_user", str(owner.pk))
    page.fill("#id_name", "reporting service")
    page.fill("#id_rpm_limit", "120")
    page.click("input[name=_save]")
    secret = page.input_value("#api-key-secret")
    assert re.fullmatch(r"sk-gw-[A-Za-z0-9_-]{40,}", secret)
    page.screenshot(path=str(screenshot_dir / "admin-api-key-created.png"), full_page=True)
    page.click("text=Done")
    page.wait_for_url(f"{console.base_url}/admin/llmgateway/apikey/")
    listing = page.content()
    assert secret[:12] in listing and secret not in listing
