"""Bad input gets a 4xx with an OpenAI-style error body, never a 500, and reaches no upstream."""

from __future__ import annotations

import json

import pytest
from django.test import AsyncClient

from billing.models import UsageRecord

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.ledger]

CHAT = "/v1/chat/completions"
GOOD = {"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(response, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    error = json.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


class KeyedClient(AsyncClient):
    """An AsyncClient that sends one API key on every request."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def generic(self, *args, headers=None, **kwargs):
        return super().generic(*args, headers={"Authorization": f"Bearer {self.key}", **(headers or {})}, **kwargs)


@pytest.fixture
def client(api_key: str) -> AsyncClient:
    return KeyedClient(api_key)


async def post(client: AsyncClient, body: object, **extra):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(CHAT, data=raw, content_type="application/json", **extra)


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Basic abc", "Bearer sk-gw-not-a-real-key", "Bearer wrongprefix"],
    ids=["missing", "empty", "no-token", "wrong-scheme", "unknown-key", "foreign-format"],
)
async def test_requests_without_a_valid_key_get_401(authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await AsyncClient().post(CHAT, data=json.dumps(GOOD), content_type="application/json", headers=headers)
    assert_openai_error(response, 401, code="invalid_api_key")


async def test_revoked_and_expired_keys_are_refused(api_key_factory) -> None:
    from datetime import timedelta

    from asgiref.sync import sync_to_async
    from django.utils import timezone

    from llmgateway.models import ApiKey, hash_api_key

    revoked = await sync_to_async(api_key_factory)("bob")
    await ApiKey.objects.filter(key_hash=hash_api_key(revoked)).aupdate(revoked_at=timezone.now())
    expired = await sync_to_async(api_key_factory)("carol", expires_at=timezone.now() - timedelta(seconds=1))
    for key in (revoked, expired):
        response = await post(KeyedClient(key), GOOD)
        assert_openai_error(response, 401, code="invalid_api_key")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "missing_required_parameter"),
        ({"model": 7, "messages": [{"role": "user", "content": "x"}]}, "model", "invalid_type"),
        ({"model": "sim-fast"}, "messages", "missing_required_parameter"),
        ({"model": "sim-fast", "messages": []}, "messages", "empty_array"),
        ({"model": "sim-fast", "messages": "hi"}, "messages", "invalid_type"),
        ({"model": "sim-fast", "messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
        ({"model": "sim-fast", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"model": "sim-fast", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        ({**GOOD, "stream": "yes"}, "stream", "invalid_type"),
        ({**GOOD, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({**GOOD, "max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({**GOOD, "max_tokens": "10"}, "max_tokens", "invalid_type"),
        ({**GOOD, "max_completion_tokens": 1.5}, "max_completion_tokens", "invalid_type"),
        ({**GOOD, "temperature": 3}, "temperature", "decimal_above_max_value"),
        ({**GOOD, "n": 0}, "n", "integer_below_min_value"),
        ({**GOOD, "tools": {"a": 1}}, "tools", "invalid_type"),
    ],
    ids=[
        "malformed-json", "json-array", "no-model", "model-not-string", "no-messages", "empty-messages",
        "messages-not-array", "message-without-role", "unknown-role", "content-wrong-type",
        "stream-not-bool", "stream-options-without-stream", "max-tokens-zero", "max-tokens-string",
        "max-completion-tokens-float", "temperature-out-of-range", "n-zero", "tools-not-array",
    ],
)
async def test_invalid_bodies_get_400_naming_the_parameter(client: AsyncClient, body, param, code) -> None:
    response = await post(client, body)
    error = assert_openai_error(response, 400, code=code, param=param)
    assert error["type"] == "invalid_request_error"
    assert await UsageRecord.objects.acount() == 0


async def test_unknown_model_is_404(client: AsyncClient) -> None:
    response = await post(client, {**GOOD, "model": "no-such-model"})
    error = assert_openai_error(response, 404, code="model_not_found", param="model")
    assert "no-such-model" in error["message"]


async def test_a_model_whose_provider_is_not_configured_is_404_and_says_why(client: AsyncClient, settings) -> None:
    settings.OPENAI_API_KEY = ""
    response = await post(client, {**GOOD, "model": "gpt-4o"})
    error = assert_openai_error(response, 404, code="model_not_found")
    assert "not configured" in error["message"]


async def test_oversized_body_is_413(client: AsyncClient, settings) -> None:
    settings.GATEWAY_MAX_BODY_BYTES = 1000
    body = {**GOOD, "messages": [{"role": "user", "content": "x" * 2000}]}
    assert_openai_error(await post(client, body), 413, code="request_too_large")
    assert await UsageRecord.objects.acount() == 0


async def test_wrong_method_is_405(client: AsyncClient) -> None:
    assert_openai_error(await client.get(CHAT), 405)


async def test_unknown_v1_endpoint_is_openai_style_404(client: AsyncClient) -> None:
    assert_openai_error(await client.get("/v1/embeddingz"), 404, code="unknown_url")


async def test_models_lists_the_simulator_clearly_named(client: AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    models = {m["id"]: m for m in json.loads(response.content)["data"]}
    assert models["sim-fast"]["owned_by"] == "llmgateway-simulator"
    assert models["sim-chat"]["object"] == "model"


async def test_a_call_that_cannot_be_journaled_is_refused_with_a_503_and_holds_nothing(client: AsyncClient, monkeypatch) -> None:
    from billing.models import Reservation
    from billing.outbox import get_outbox

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(get_outbox(), "call_opened", disk_full)
    response = await post(client, GOOD)
    error = assert_openai_error(response, 503, code="ledger_unavailable")
    assert "ledger" in error["message"]
    assert response["Retry-After"] == "1"
    assert await UsageRecord.objects.acount() == 0  # no upstream call was made
    assert await Reservation.objects.acount() == 0  # and its budget hold was given back
