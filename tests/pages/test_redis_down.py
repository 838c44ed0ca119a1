"""The login and chat pages keep working when Redis is down or frozen (issue 10).

With REDIS_URL set, django-ratelimit counts the pages' requests in Django's cache on Redis, and
the Channels layer is on the same Redis; `llmgateway.cache.ResilientRedisCache` answers a miss
when Redis cannot be reached, so the page limits fail open (logged and counted) instead of 500.
The gateway tests kill or freeze a redis-server of their own, by its PID.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from django.contrib.auth import get_user_model
from django.test import RequestFactory, override_settings
from django_ratelimit.core import is_ratelimited
from prometheus_client import REGISTRY

from limits import ManualClock
from llmgateway import cache as resilient_cache
from llmgateway.cache import ResilientRedisCache
from testbed.services import RedisServer
from tests.conftest import Gateway, free_port

PASSWORD = "correct horse battery"
FORM_ERROR = "Your username and password didn't match."
METRICS_TOKEN = "test-metrics-token"
BACKEND = "llmgateway.cache.ResilientRedisCache"


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free port, killed (by PID) afterwards."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """The clock of the cache's breakers and warnings created during this test."""
    manual = ManualClock()
    monkeypatch.setattr(resilient_cache, "clock", manual)
    return manual


def make_cache(url: str) -> ResilientRedisCache:
    return ResilientRedisCache(
        url, {"OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}}
    )


def dead_url() -> str:
    """A Redis URL on a free port nobody listens on: every connection is refused."""
    return f"redis://127.0.0.1:{free_port()}/0"


def failures(operation: str) -> float:
    return (
        REGISTRY.get_sample_value("llmgateway_cache_failures_total", {"operation": operation})
        or 0.0
    )


# --- the cache backend, in this process --------------------------------------------------------


def test_each_operation_answers_a_miss_and_is_counted_when_redis_is_down() -> None:
    cache = make_cache(dead_url())
    operations = [
        "get",
        "get_many",
        "has_key",
        "add",
        "set",
        "set_many",
        "touch",
        "delete",
        "delete_many",
        "incr",
    ]
    before = {operation: failures(operation) for operation in operations}

    assert cache.get("k", "fallback") == "fallback"
    assert cache.get_many(["a", "b"]) == {}
    assert cache.has_key("k") is False
    assert cache.add("k", 1, 60) is False
    assert cache.set("k", 1, 60) is None
    assert cache.set_many({"a": 1, "b": 2}, 60) == ["a", "b"]
    assert cache.touch("k", 60) is False
    assert cache.delete("k") is False
    assert cache.delete_many(["a", "b"]) is None
    with pytest.raises(ValueError, match=re.escape(resilient_cache.MSG_UNREACHABLE)):
        cache.incr("k")

    assert {
        operation: failures(operation) - before[operation] for operation in operations
    } == dict.fromkeys(operations, 1.0)


def test_one_warning_per_interval_names_the_operation_and_counts_the_rest(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_cache(dead_url())
    with caplog.at_level(logging.WARNING, logger="llmgateway.cache"):
        for _ in range(10):
            assert cache.add("k", 1, 60) is False
        [first] = caplog.records
        assert first.levelno == logging.WARNING
        assert first.getMessage().startswith("cache add: Redis unreachable (")
        assert "1 such cache operations since the last warning" in first.getMessage()

        clock.advance(resilient_cache.LOG_INTERVAL)
        with pytest.raises(ValueError):
            cache.incr("k")
    [_, second] = caplog.records
    assert second.getMessage().startswith("cache incr: Redis unreachable (")
    assert (
        "10 such cache operations since the last warning" in second.getMessage()
    )  # 9 adds + this incr


def test_a_frozen_redis_costs_one_timeout_per_operation_then_none_until_the_breaker_retries(
    private_redis: RedisServer, clock: ManualClock
) -> None:
    cache = make_cache(private_redis.url)
    direct = redis.Redis.from_url(private_redis.url)
    assert cache.add("warm", 1, 60) is True

    private_redis.pause()
    try:
        for attempt in range(resilient_cache.FAILURE_THRESHOLD):
            started = time.monotonic()
            assert cache.add(f"frozen{attempt}", 1, 60) is False
            assert time.monotonic() - started < 2.0  # the 0.5 s socket timeout, with slack
    finally:
        private_redis.resume()

    # The breaker is open: Redis answers again but is not asked until RESET_SECONDS have passed.
    assert cache.add("skipped", 1, 60) is False
    assert direct.exists(":1:skipped") == 0
    clock.advance(resilient_cache.RESET_SECONDS)
    assert cache.add("trial", 1, 60) is True  # the trial reaches Redis and closes the breaker
    assert cache.add("after", 1, 60) is True
    assert direct.exists(":1:trial", ":1:after") == 2
    direct.close()


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_django_ratelimit_lets_requests_through_only_with_fail_open(fail_open: bool) -> None:
    """Pins the chain this module relies on: add() False, then incr() ValueError, then
    RATELIMIT_FAIL_OPEN decides (django-ratelimit 4.1, core.get_usage)."""
    caches = {
        "default": {
            "BACKEND": BACKEND,
            "LOCATION": dead_url(),
            "OPTIONS": {"socket_connect_timeout": 0.5},
        }
    }
    request = RequestFactory().post("/accounts/login/", REMOTE_ADDR="203.0.113.7")
    with override_settings(
        CACHES=caches, RATELIMIT_USE_CACHE="default", RATELIMIT_FAIL_OPEN=fail_open
    ):
        limited = [
            is_ratelimited(
                request, group="login", key="ip", rate="1/h", method="POST", increment=True
            )
            for _ in range(3)
        ]
    assert limited == [not fail_open] * 3


# --- the pages, served by Granian -------------------------------------------------------------


def login(http: httpx.Client, password: str) -> httpx.Response:
    page = http.get("/accounts/login/")
    assert page.status_code == 200, page.text
    return http.post(
        "/accounts/login/",
        data={
            "username": "dana",
            "password": password,
            "next": "/chat/",
            "csrfmiddlewaretoken": http.cookies["csrftoken"],
        },
    )


def cache_failures_reported(gateway: Gateway, operation: str) -> float:
    metrics = httpx.get(
        f"{gateway.base_url}/metrics",
        headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
        timeout=5,
    )
    assert metrics.status_code == 200
    match = re.search(
        rf'^llmgateway_cache_failures_total\{{operation="{operation}"\}} (\S+)$', metrics.text, re.M
    )
    return float(match.group(1)) if match else 0.0


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


@pytest.fixture
def page_gateway(
    private_redis: RedisServer, gateway_factory: Callable[..., Gateway], transactional_db: None
) -> Gateway:
    get_user_model().objects.create_user(username="dana", password=PASSWORD)
    # An hourly login rate: a per-minute window could end in the middle of the test.
    return gateway_factory(
        REDIS_URL=private_redis.url,
        LOGIN_RATE="5/h",
        CHAT_PAGE_RATE="1000/h",
        METRICS_TOKEN=METRICS_TOKEN,
    )


def test_login_and_chat_work_with_redis_down_and_are_limited_again_once_it_is_back(
    private_redis: RedisServer, page_gateway: Gateway
) -> None:
    private_redis.kill()
    with httpx.Client(base_url=page_gateway.base_url, timeout=10) as http:
        wrong = login(http, "wrong password")
        assert wrong.status_code == 200 and FORM_ERROR in wrong.text

        right = login(http, PASSWORD)
        assert right.status_code == 302 and right.headers["location"] == "/chat/"
        chat = http.get("/chat/")
        assert chat.status_code == 200
        assert '<span class="muted">dana</span>' in chat.text and 'id="prompt"' in chat.text

        assert cache_failures_reported(page_gateway, "add") >= 1

        # Redis is back on the same port: once the breaker's trial succeeds the counts live in
        # Redis again (a key appears) and the login limit applies.
        private_redis.start()
        direct = redis.Redis.from_url(private_redis.url)
        wait_for(
            lambda: http.get("/chat/").status_code == 200 and bool(direct.keys(":1:rl:*")),
            15,
            "the page limits did not count in Redis again",
        )
        direct.close()
        codes = [login(http, "wrong password").status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]


def test_login_answers_in_bounded_time_with_redis_frozen(
    private_redis: RedisServer, page_gateway: Gateway
) -> None:
    with httpx.Client(base_url=page_gateway.base_url, timeout=10) as http:
        assert http.get("/accounts/login/").status_code == 200  # the CSRF cookie, before the freeze
        private_redis.pause()
        try:
            started = time.monotonic()
            right = login(http, PASSWORD)
            elapsed = time.monotonic() - started
            assert right.status_code == 302 and right.headers["location"] == "/chat/"
            # Two limits, an add and an incr each: at most FAILURE_THRESHOLD socket timeouts of
            # 0.5 s before the breaker opens, plus hashing the password.
            assert elapsed < 5.0, elapsed
            assert http.get("/chat/").status_code == 200
            wrong = login(http, "wrong password")
            assert wrong.status_code == 200 and FORM_ERROR in wrong.text
        finally:
            private_redis.resume()
