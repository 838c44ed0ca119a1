"""The chat page's calls go through per-user limits of their own, on by default, kept in Redis:
one person at the page cannot flood the upstream, and is told when to come back."""

from __future__ import annotations

import httpx
import pytest
import redis
from django.conf import settings

from llmgateway.services import api_key_create
from tests.portal.conftest import PASSWORD

pytestmark = pytest.mark.django_db(transaction=True)


def chat_session(base_url: str, username: str) -> httpx.Client:
    """A client logged in at the page as a browser is: the session cookie, and the CSRF token as a header."""
    client = httpx.Client(base_url=base_url, timeout=20)
    client.get("/accounts/login/")
    response = client.post(
        "/accounts/login/",
        data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": client.cookies["csrftoken"], "next": "/account/"},
    )
    assert response.status_code == 302 and response.headers["location"] == "/account/"
    client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
    return client


def ask(client: httpx.Client, model: str = "sim-fast") -> httpx.Response:
    return client.post("/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})


def test_by_default_one_user_at_the_chat_page_is_held_to_a_number_of_requests_a_minute(gateway_factory, user_factory, clean_redis) -> None:
    gateway = gateway_factory(REDIS_URL=clean_redis)  # no limit set: the defaults
    user_factory("sam")
    client = chat_session(gateway.base_url, "sam")
    allowed = settings.LIMITS_CHAT_USER_RPM
    assert 0 < allowed <= 100
    assert {ask(client).status_code for _ in range(allowed)} == {200}
    refused = ask(client)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_chat_page_requests_per_minute_are_counted_per_user_across_gateways_in_redis(
    gateway_factory, user_factory, clean_redis
) -> None:
    limits = {"REDIS_URL": clean_redis, "LIMITS_CHAT_USER_RPM": "3", "LIMITS_RPM_ALGORITHM": "sliding_window"}
    first, second = gateway_factory(**limits), gateway_factory(**limits)
    user_factory("paula")
    user_factory("quinn")
    raw_key = api_key_create(username="paula")[1]
    paula = chat_session(first.base_url, "paula")

    assert [ask(paula).status_code for _ in range(3)] == [200, 200, 200]
    paula.base_url = httpx.URL(second.base_url)  # same session, another process: the same count
    refused = ask(paula)

    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert error["message"].startswith("Rate limit reached for requests on the chat page: limit 3 per minute.")
    assert refused.headers["x-ratelimit-limit-requests"] == "3" and refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert redis.Redis.from_url(clean_redis).keys("llmgw:rl:*chat:*")  # the count is Redis's
    # Another user at the page, and the same user's API key, are not held back by it.
    assert ask(chat_session(second.base_url, "quinn")).status_code == 200
    api_call = httpx.post(
        f"{first.api_url}/chat/completions", headers={"Authorization": f"Bearer {raw_key}"},
        json={"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}, timeout=20,
    )
    assert api_call.status_code == 200


def test_a_user_has_at_most_the_set_number_of_answers_streaming_at_once(gateway_factory, user_factory, clean_redis) -> None:
    gateway = gateway_factory(REDIS_URL=clean_redis, LIMITS_CHAT_USER_MAX_CONCURRENT="1")
    user_factory("rosa")
    client = chat_session(gateway.base_url, "rosa")
    body = {"model": "sim-chat", "messages": [{"role": "user", "content": "a long story"}], "stream": True}
    slow = {"X-Simulator-Tokens": "100", "X-Simulator-Tps": "20"}  # five seconds of answer

    with client.stream("POST", "/chat/completions", json=body, headers=slow) as streaming:
        assert streaming.status_code == 200
        lines = streaming.iter_lines()
        next(lines)  # the first answer is under way
        refused = ask(client)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["message"] == "Too many concurrent requests on the chat page: limit 1. Try again when a stream ends."
        assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert "data: [DONE]" in list(lines)  # read to its end
    assert ask(client).status_code == 200  # its place was given back
