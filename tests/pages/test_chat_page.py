"""The web chat page in a real headless Chromium: log in, stream an answer, stop one."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth import get_user_model

from billing.models import UsageRecord

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.ledger]

@pytest.fixture
def page(browser, gateway, transactional_db):
    get_user_model().objects.create_user(username="dana", password="correct horse battery")
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{gateway.base_url}/chat/")
    page.fill("#id_username", "dana")
    page.fill("#id_password", "correct horse battery")
    page.click("#login")
    page.wait_for_url(f"{gateway.base_url}/chat/")
    yield page
    context.close()


def wait_for_records(count: int, timeout: float = 5.0) -> list[UsageRecord]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = list(UsageRecord.objects.order_by("id"))
        if len(records) >= count:
            return records
        time.sleep(0.02)
    raise AssertionError(f"expected {count} usage records")


def test_an_answer_streams_into_the_page_and_is_billed(page) -> None:
    page.select_option("#model", "sim-fast")
    page.fill("#prompt", "Hello there")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=10_000)
    assert answer.locator(".body").inner_text().startswith("The gateway streams each token")
    assert "completion tokens" in answer.locator(".meta").inner_text()
    [record] = wait_for_records(1)
    assert record.status == "completed" and record.api_key is None and record.user.username == "dana"


def test_stop_cancels_the_stream_mid_answer(page) -> None:
    page.select_option("#model", "sim-chat")  # paced: 40 tokens/s, 64 tokens
    page.fill("#prompt", "Tell me a long story")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    page.wait_for_function("document.querySelector('.msg.assistant .body').textContent.length > 0", timeout=10_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]", timeout=5_000)
    shown = answer.locator(".body").inner_text()
    [record] = wait_for_records(1)
    assert record.status == "cancelled"
    assert 0 < record.completion_tokens < 64
    assert shown and "Stopped." in answer.inner_text()


def test_the_chat_page_requires_login(browser, gateway) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{gateway.base_url}/chat/")
    assert "/accounts/login/" in page.url
    context.close()
