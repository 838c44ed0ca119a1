"""The chat page's views: the page itself, its JSON API, and bad input as a clean 4xx (never a 500)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from chat import services
from chat.models import Conversation, Message
from llmgateway.chat_views import CHAT_PAGE_CSP
from upstreams.catalog import available_routes

pytestmark = pytest.mark.django_db

MODEL = "sim-chat"
TURNS = "/chat/api/turns"


@pytest.fixture
def alice() -> Any:
    return get_user_model().objects.create_user(username="alice")


@pytest.fixture
def client(alice: Any) -> Client:
    client = Client()
    client.force_login(alice)
    return client


def post(client: Client, url: str, body: object, method: str = "post") -> Any:
    return getattr(client, method)(url, data=json.dumps(body) if not isinstance(body, str) else body, content_type="application/json")


def start(client: Client, content: str = "Hello", **fields: Any) -> dict[str, Any]:
    response = post(client, TURNS, {"content": content, "model": MODEL, **fields})
    assert response.status_code == 200, response.content
    return response.json()


def test_the_page_draws_the_users_conversations_models_and_spend_under_a_strict_policy(client) -> None:
    turn = start(client, "First question")
    response = client.get("/chat/")
    assert response.status_code == 200
    assert response["Content-Security-Policy"] == CHAT_PAGE_CSP
    assert "script-src 'self';" in CHAT_PAGE_CSP and "unsafe" not in CHAT_PAGE_CSP.split("style-src")[0]
    boot = response.context["boot"]
    assert [item["title"] for item in boot["conversations"]] == ["First question"]
    assert boot["conversation"] is None and boot["default_model"] == MODEL
    assert next(model for model in boot["models"] if model["id"] == MODEL)["label"] == "sim-chat · $1.00 in / $2.00 out per 1M tokens"
    assert boot["spend"] == {"month_spent": "$0.00", "day_spent": "$0.00", "budgets": [], "warnings": []}
    reopened = client.get(turn["conversation"]["url"])
    assert reopened.context["boot"]["conversation"]["messages"][0]["content"] == "First question"


def test_a_turn_answers_with_the_openai_request_to_stream(client) -> None:
    turn = start(client, "Hi", system_prompt="Be brief.", temperature="0.7")
    assert turn["request"] == {
        "model": MODEL,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.7,
    }
    assert turn["left_out"] == 0 and turn["prompt_tokens"] > 0
    assert turn["conversation"]["temperature"] == "0.70"


def test_an_answer_is_saved_and_shown_with_the_spend(client) -> None:
    conversation = start(client)["conversation"]
    request_id = str(uuid.uuid4())
    response = post(client, f"/chat/api/conversations/{conversation['id']}/answers", {
        "content": "Hello!", "state": "complete", "model": MODEL, "request_id": request_id,
    })
    assert response.status_code == 201
    body = response.json()
    assert body["message"]["content"] == "Hello!" and body["message"]["request_id"] == request_id
    assert body["message"]["usage"] is None  # that call is not in the ledger
    assert body["spend"]["month_spent"] == "$0.00"
    shown = client.get(f"/chat/api/conversations/{conversation['id']}").json()
    assert [(message["role"], message["content"]) for message in shown["messages"]] == [("user", "Hello"), ("assistant", "Hello!")]


def test_rename_delete_and_search(client) -> None:
    conversation = start(client, "About apples")["conversation"]
    start(client, "About bananas")
    renamed = post(client, f"/chat/api/conversations/{conversation['id']}", {"title": "Red fruit"}, method="patch")
    assert renamed.status_code == 200 and renamed.json()["title"] == "Red fruit"
    found = client.get("/chat/api/conversations", {"q": "apples"}).json()["conversations"]
    assert [item["title"] for item in found] == ["Red fruit"]  # found by its message
    assert client.delete(f"/chat/api/conversations/{conversation['id']}").status_code == 204
    assert [item["title"] for item in client.get("/chat/api/conversations").json()["conversations"]] == ["About bananas"]


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "code"),
    [
        ("post", TURNS, "not json", 400, "invalid_request"),
        ("post", TURNS, "[1, 2]", 400, "invalid_request"),
        ("post", TURNS, {"content": 5, "model": MODEL}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": MODEL, "mode": "explode"}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": "nope"}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": MODEL, "temperature": "warm"}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": MODEL, "temperature": True}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": MODEL, "temperature": [1]}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": MODEL, "temperature": "1e999999999"}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": MODEL, "conversation": "not-a-uuid"}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": MODEL, "conversation": 12}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": MODEL, "conversation": str(uuid.uuid4())}, 404, "conversation_not_found"),
        ("post", TURNS, {"content": "", "model": MODEL, "mode": "regenerate"}, 400, "invalid_request"),
        ("post", TURNS, {"content": "word " * 20_000, "model": MODEL}, 400, "context_too_long"),
        ("get", TURNS, None, 405, "method_not_allowed"),
        ("get", f"/chat/api/conversations/{uuid.uuid4()}", None, 404, "conversation_not_found"),
        ("delete", f"/chat/api/conversations/{uuid.uuid4()}", None, 404, "conversation_not_found"),
        ("patch", f"/chat/api/conversations/{uuid.uuid4()}", {"title": "x"}, 404, "conversation_not_found"),
        ("post", f"/chat/api/conversations/{uuid.uuid4()}/answers", {"content": "x"}, 404, "conversation_not_found"),
        ("post", "/chat/api/conversations", {}, 405, "method_not_allowed"),
        ("get", "/chat/api/conversations?q=a%00b", None, 400, "invalid_request"),
        ("post", TURNS, {"content": "a\x00b", "model": MODEL}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": MODEL, "system_prompt": "x\x00"}, 400, "invalid_request"),
        ("post", TURNS, {"content": "hi", "model": MODEL + "\x00"}, 400, "invalid_request"),
        ("patch", "{mine}", {"title": "t\x00"}, 400, "invalid_request"),
        ("post", "{mine}/answers", {"content": "x\x00", "state": "complete"}, 400, "invalid_request"),
        ("post", "{mine}/answers", {"content": "", "state": "failed", "error": "e\x00"}, 400, "invalid_request"),
        ("post", "{mine}/answers", {"content": "x", "model": "m\x00"}, 400, "invalid_request"),
    ],
    ids=[
        "not-json", "not-an-object", "content-not-text", "unknown-mode", "unknown-model", "temperature-word",
        "temperature-bool", "temperature-list", "temperature-huge", "bad-conversation-id", "conversation-id-number",
        "missing-conversation", "regenerate-nothing", "context-too-long", "get-turns", "read-missing",
        "delete-missing", "rename-missing", "answer-missing", "post-list", "search-nul", "content-nul",
        "system-prompt-nul", "model-nul", "title-nul", "answer-content-nul", "answer-error-nul", "answer-model-nul",
    ],
)
def test_bad_input_is_a_clean_4xx_with_a_message(client, method, url, body, status, code) -> None:
    """`{mine}` is a conversation of the user's own, with their first message in it."""
    if "{mine}" in url:
        url = url.format(mine=f"/chat/api/conversations/{start(client)['conversation']['id']}")
    before = list(Message.objects.values_list("pk", "content"))
    response = post(client, url, body, method=method) if body is not None else getattr(client, method)(url)
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert list(Message.objects.values_list("pk", "content")) == before
    assert "\x00" not in "".join(Conversation.objects.values_list("title", flat=True))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"content": "x", "state": "exploded"}, "Unknown answer state 'exploded'."),
        ({"content": "x", "state": "failed"}, "An answer that failed has no text; one with text is cut off or stopped."),
        ({"content": "x", "request_id": "123"}, "`request_id` must be an id."),
        ({"content": ["x"]}, "`content` must be text."),
    ],
    ids=["unknown-state", "failed-with-text", "bad-request-id", "content-not-text"],
)
def test_a_bad_answer_is_a_400_and_saves_nothing(client, body, message) -> None:
    conversation = start(client)["conversation"]
    response = post(client, f"/chat/api/conversations/{conversation['id']}/answers", body)
    assert response.status_code == 400 and response.json()["error"]["message"] == message
    assert Message.objects.filter(role="assistant").count() == 0


def test_another_users_conversation_is_not_found_for_reading_or_writing(client) -> None:
    conversation = start(client, "mine")["conversation"]
    mallory = get_user_model().objects.create_user(username="mallory")
    intruder = Client()
    intruder.force_login(mallory)
    assert intruder.get(conversation["url"]).status_code == 404
    assert intruder.get(f"/chat/api/conversations/{conversation['id']}").status_code == 404
    assert post(intruder, TURNS, {"content": "hi", "model": MODEL, "conversation": conversation["id"]}).status_code == 404
    assert intruder.delete(f"/chat/api/conversations/{conversation['id']}").status_code == 404
    assert intruder.get("/chat/api/conversations").json() == {"conversations": []}
    assert Conversation.objects.get().title == "mine"


def test_without_a_session_the_api_answers_401_and_the_page_redirects_to_login() -> None:
    anonymous = Client()
    response = post(anonymous, TURNS, {"content": "hi", "model": MODEL})
    assert response.status_code == 401 and response.json()["error"]["code"] == "session_required"
    assert anonymous.get("/chat/api/conversations").status_code == 401
    page = anonymous.get("/chat/")
    assert page.status_code == 302 and page["Location"].startswith("/accounts/login/")


def test_the_api_checks_csrf(alice) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert post(client, TURNS, {"content": "hi", "model": MODEL}).status_code == 403
    token = client.get("/chat/").context["boot"]["csrf"]
    response = client.post(TURNS, data=json.dumps({"content": "hi", "model": MODEL}), content_type="application/json", headers={"X-CSRFToken": token})
    assert response.status_code == 200


def test_the_favicon_is_an_icon(client) -> None:
    response = Client().get("/favicon.ico")
    assert response.status_code == 200 and response["Content-Type"] == "image/x-icon"
    assert response.content.startswith(b"\x00\x00\x01\x00")  # an ICO header


PAGE_QUERIES = 8  # session, user, the conversation and its messages, the account, prices, spend, the sidebar


def test_the_pages_queries_do_not_grow_with_the_catalog_conversations_or_messages(client, django_assert_num_queries, monkeypatch) -> None:
    def page_of_last_conversation() -> None:
        conversation = Conversation.objects.order_by("-updated_at").first()
        with django_assert_num_queries(PAGE_QUERIES):
            assert client.get(f"/chat/c/{conversation.pk}/").status_code == 200

    for _ in range(2):
        start(client)
    page_of_last_conversation()

    first = Conversation.objects.order_by("-updated_at").first()
    for index in range(10):
        start(client, f"more {index}")
        start(client, "again", conversation=str(first.pk))
    routes = list(available_routes())
    more_models = routes + [dataclasses.replace(route, id=f"{route.id}-copy-{n}") for n in range(5) for route in routes]
    monkeypatch.setattr("chat.selectors.available_routes", lambda: more_models)
    page_of_last_conversation()


def test_past_the_conversation_cap_a_new_chat_is_a_400_in_plain_words(client, settings) -> None:
    settings.CHAT_MAX_CONVERSATIONS = 1
    start(client)
    response = post(client, TURNS, {"content": "another", "model": MODEL})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": services.TOO_MANY_CONVERSATIONS.format(count=1), "code": "invalid_request"}
