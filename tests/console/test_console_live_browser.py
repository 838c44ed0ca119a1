"""The console live, across processes, in a real headless Chromium.

Two gateways share PostgreSQL and Redis (channels-redis): the console is open on one, the calls
run on the other. Today's spend changes when a call completes over there; staff stop a running
stream from the console and its client gets the error event, the ledger row says stopped by
staff; revoking a key in the admin ends its running stream within a second.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from billing import display
from billing.models import UsageRecord
from llmgateway.models import ApiKey
from tests.conftest import Gateway
from tests.faults.conftest import stream_call, wait_until
from tests.gating.conftest import clean_redis  # noqa: F401 - a fixture

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WIDTH = 1280
PASSWORD = "correct horse battery"
MODEL = "gpt-4o-mini"
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "A long answer, please."}], "max_tokens": 2000}


class StreamInThread:
    """A streamed call running in a thread of its own while the browser is driven from this one."""

    def __init__(self, gateway: Gateway, key: str) -> None:
        self.result: dict[str, Any] = {}
        self.ended_at = 0.0
        self.started = threading.Event()

        async def run() -> None:
            tokens_flow = asyncio.Event()
            async with httpx.AsyncClient(timeout=60) as client:
                call = asyncio.create_task(stream_call(client, gateway, key, LONG, started=tokens_flow))
                await tokens_flow.wait()
                self.started.set()
                self.result = await call
                self.ended_at = time.monotonic()

        self.thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
        self.thread.start()
        assert self.started.wait(10), "the stream did not start"

    def join(self, timeout: float) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        return self.result


@pytest.fixture
def two_gateways(gateway_factory, settings, tmp_path, clean_redis) -> tuple[Gateway, Gateway]:  # noqa: F811
    """The console's gateway (with the static files, as scripts/serve has them) and the API's."""
    settings.STATIC_ROOT = tmp_path / "static"
    call_command("collectstatic", interactive=False, verbosity=0)
    static = ("--static-path-route", "/static", "--static-path-mount", str(settings.STATIC_ROOT))
    return gateway_factory(REDIS_URL=clean_redis, granian_args=static), gateway_factory(REDIS_URL=clean_redis)


@pytest.fixture
def console_page(browser, two_gateways) -> Iterator[Any]:
    console, _ = two_gateways
    get_user_model().objects.create_superuser("olivia", "olivia@example.com", PASSWORD)
    context = browser.new_context(viewport={"width": WIDTH, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(f"{console.base_url}/admin/")
    page.fill("#id_username", "olivia")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{console.base_url}/admin/console/")
    page.wait_for_selector("#console-live[data-state=live]", timeout=5000)
    yield page
    context.close()


def test_todays_spend_changes_when_a_call_completes_in_another_process(console_page, two_gateways, api_key_factory) -> None:
    _, api = two_gateways
    page = console_page
    today = page.locator('.card[data-period="day"] .value')
    assert today.inner_text() == "$0.00"
    key = api_key_factory("alice")
    answered = httpx.post(
        f"{api.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 50},
        timeout=10,
    )
    assert answered.status_code == 200
    row = wait_until(lambda: UsageRecord.objects.first(), timeout=5, what="the row")
    assert row.cost_usd > 0
    shown = display.usd_brief(row.cost_usd)
    page.wait_for_function(
        "shown => document.querySelector('.card[data-period=\"day\"] .value').textContent.trim() === shown", arg=shown, timeout=3000
    )
    assert page.locator('.card[data-period="day"] .value').get_attribute("title") == display.usd_exact(row.cost_usd)
    assert page.locator('.card[data-period="month"] .value').inner_text() == shown


def test_staff_stop_a_stream_running_in_another_process(console_page, two_gateways, api_key_factory, fake_upstream, screenshot_dir) -> None:
    _, api = two_gateways
    page = console_page
    fake_upstream.tokens = 1500
    fake_upstream.inter_token_delay = 0.02
    stream = StreamInThread(api, api_key_factory("bob"))

    row = page.locator("#console-live tbody tr")
    row.wait_for(timeout=3000)
    request_id = row.get_attribute("data-request-id")
    assert row.locator("th").inner_text() == "bob"
    assert row.locator("td.model").inner_text() == MODEL
    first_tokens = int(row.locator("td.tokens").inner_text().replace(",", ""))
    page.wait_for_function(
        "before => Number(document.querySelector('#console-live td.tokens').textContent.replace(/,/g, '')) > before",
        arg=first_tokens,
        timeout=3000,
    )
    assert re.fullmatch(r"\$[0-9.]+", row.locator("td.cost").inner_text())
    page.screenshot(path=str(screenshot_dir / "console-live-1280.png"), full_page=True)

    row.locator("button.stop").click()
    result = stream.join(timeout=5)
    assert result["request_id"] == request_id
    assert '"code":"stopped_by_staff"' in result["error"] and not result["done"]
    record = wait_until(lambda: UsageRecord.objects.filter(request_id=request_id).first(), timeout=5, what="the row")
    assert (record.status, record.error_kind) == ("cancelled", "stopped_by_staff")
    assert 0 < record.completion_tokens < 1500
    page.locator("#console-live [data-live-empty]").wait_for(state="visible", timeout=3000)


def test_revoking_a_key_in_the_admin_ends_its_running_stream_within_a_second(console_page, two_gateways, api_key_factory, fake_upstream) -> None:
    console, api = two_gateways
    page = console_page
    fake_upstream.tokens = 1500
    fake_upstream.inter_token_delay = 0.02
    key = api_key_factory("carol")
    api_key = ApiKey.objects.get(user__username="carol")
    stream = StreamInThread(api, key)

    page.goto(f"{console.base_url}/admin/llmgateway/apikey/")
    page.check(f'input[name="_selected_action"][value="{api_key.pk}"]')
    page.select_option('select[name="action"]', "revoke")
    revoked_at = time.monotonic()
    page.click('button[name="index"]')
    result = stream.join(timeout=5)
    assert stream.ended_at - revoked_at < 1
    assert '"code":"api_key_revoked"' in result["error"] and not result["done"]
    record = wait_until(lambda: UsageRecord.objects.filter(request_id=result["request_id"]).first(), timeout=5, what="the row")
    assert (record.status, record.error_kind) == ("cancelled", "api_key_revoked")
