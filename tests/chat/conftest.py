"""Fixtures for the chat page: a gateway that serves its static files, a fake upstream whose answer a
test writes, and a Chromium page logged in as a user with a password."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import override_settings

from billing.models import UsageRecord
from testbed.fake_upstream import FakeUpstream
from tests.conftest import Gateway, start_gateway, stop_gateway

PASSWORD = "correct horse battery"
UPSTREAM_SETTINGS = ("tokens", "token_text", "inter_token_delay", "ttft", "fault", "fault_after_tokens", "retry_after")


@pytest.fixture(scope="module")
def served(django_db_setup: Any, django_db_blocker: Any, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway serving `collectstatic`'s output at /static, as `scripts/serve` does."""
    static_root = tmp_path_factory.mktemp("static")
    with override_settings(STATIC_ROOT=static_root):
        call_command("collectstatic", interactive=False, verbosity=0)
    # Many logins and turns from one address within a minute: the page limits are not under test.
    server = start_gateway(
        {"LOGIN_RATE": "1000/m", "CHAT_PAGE_RATE": "1000/m"}, upstream=upstream, granian_args=("--static-path-route", "/static", "--static-path-mount", str(static_root))
    )
    yield server
    stop_gateway(server)


@pytest.fixture
def answer(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake upstream, its answer set by the test (`tokens` chunks of `token_text`), restored after."""
    saved = {name: getattr(upstream, name) for name in UPSTREAM_SETTINGS}
    upstream.clear_requests()
    yield upstream
    for name, value in saved.items():
        setattr(upstream, name, value)


@pytest.fixture
def user(transactional_db: None) -> Any:
    return get_user_model().objects.create_user(username="dana", password=PASSWORD)


def log_in(page: Any, base_url: str, username: str = "dana") -> None:
    page.goto(f"{base_url}/chat/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("#login")
    page.wait_for_url(f"{base_url}/chat/")
    page.wait_for_selector("#spend-line")


@pytest.fixture
def page_factory(browser: Any, served: Gateway, user: Any) -> Iterator[Callable[..., Any]]:
    """`make(width=1280, height=800)`: a new browser context and page, logged in as dana."""
    contexts = []

    def make(width: int = 1280, height: int = 800) -> Any:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        log_in(page, served.base_url)
        return page

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def page(page_factory: Callable[..., Any]) -> Any:
    return page_factory()


def wait_for_records(count: int, timeout: float = 5.0) -> list[UsageRecord]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = list(UsageRecord.objects.order_by("created_at", "id"))
        if len(records) >= count:
            return records
        time.sleep(0.02)
    raise AssertionError(f"expected {count} usage records")


def wait_for_js(page: Any, expression: str, timeout: float = 10.0) -> Any:
    """Poll `expression` in the page until it is truthy; return its value.

    Playwright's own `wait_for_function` evaluates its predicate with `eval`, which the chat
    page's Content Security Policy refuses (as it should); `evaluate` is not subject to it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still falsy after {timeout} s: {expression}")
        time.sleep(0.02)


def screenshot(page: Any, directory: Path, name: str) -> Path:
    path = directory / name
    page.screenshot(path=str(path), full_page=False)
    return path
