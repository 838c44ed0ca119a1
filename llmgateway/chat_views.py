"""The chat page and its small JSON API: conversations, turns, answers and the user's spend.

A turn takes three requests from the page, so that the stream itself stays the gateway's own
OpenAI-shaped endpoint (`/chat/completions`, served lean: see `llmgateway.asgi`):

1. `POST chat/api/turns` saves the user's message and answers with the request to send: the
   conversation so far, trimmed to the model's window (`chat.context`);
2. the page streams that request from `/chat/completions`, whose `x-request-id` names the call's
   ledger row;
3. `POST chat/api/conversations/<id>/answers` saves what arrived (whole, stopped, cut off or
   failed) with that request id; its tokens and cost are read from the ledger row.

Views are synchronous, like the other pages, so django-ratelimit guards them. Bad input is a 4xx
with a plain message (`{"error": {"message": ...}}`), never a 500.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from functools import wraps
from pathlib import Path
from typing import Any, Literal

import orjson
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET
from django_ratelimit.decorators import ratelimit

from billing import display
from billing.models import Account
from chat import selectors, services
from chat.exceptions import NOT_FOUND, ChatError, ContextTooLong, ConversationNotFound
from chat.models import Conversation
from llmgateway.page_helpers import LOGIN_REQUIRED, page_rate, user_id_of

JsonView = Callable[..., HttpResponse]

METHOD_NOT_ALLOWED = "{method} is not allowed here."
BAD_JSON = "The request body is not a JSON object."
BAD_FIELD = "`{field}` must be {kind}."
TEXT_WITHOUT_NUL = "text without NUL characters"
DEFAULT_MODEL = "sim-chat"
# The chat page runs only its own scripts, from this origin: model output drawn into the page can
# never load or run anything, even if it got past the sanitiser.
CHAT_PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
FAVICON = Path(__file__).resolve().parent / "static" / "llmgateway" / "favicon.ico"
BUDGET_LABELS = {
    ("spend", "day"): "today's spend",
    ("spend", "month"): "this month's spend",
    ("tokens", "day"): "today's tokens",
    ("tokens", "month"): "this month's tokens",
}


def _json(payload: object, status: int = 200) -> HttpResponse:
    return HttpResponse(orjson.dumps(payload), status=status, content_type="application/json")


def _error(message: str, status: int, code: str | None = None) -> HttpResponse:
    return _json({"error": {"message": message, "code": code}}, status=status)


def _json_api(*methods: str) -> Callable[[JsonView], JsonView]:
    """A JSON endpoint of the page: the logged-in user only (401, not a redirect), the methods
    given (405), and the chat's refusals as 4xx."""

    def decorate(view: JsonView) -> JsonView:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated:
                return _error(LOGIN_REQUIRED, 401, "session_required")
            if request.method not in methods:
                response = _error(METHOD_NOT_ALLOWED.format(method=request.method), 405, "method_not_allowed")
                response["Allow"] = ", ".join(methods)
                return response
            try:
                return view(request, *args, **kwargs)
            except ConversationNotFound as error:
                return _error(error.message, 404, "conversation_not_found")
            except ContextTooLong as error:
                return _error(error.message, 400, "context_too_long")
            except ChatError as error:
                return _error(error.message, 400, "invalid_request")

        limited = ratelimit(key="user_or_ip", rate=page_rate, block=True)(wrapped)
        return limited

    return decorate


def _body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        raise services.InvalidTurn(BAD_JSON) from None
    if not isinstance(body, dict):
        raise services.InvalidTurn(BAD_JSON)
    return body


def _text(body: dict[str, Any], field: str, default: str = "") -> str:
    value = body.get(field, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise services.InvalidTurn(BAD_FIELD.format(field=field, kind="text"))
    return _no_nul(value, field)


def _no_nul(value: str, field: str) -> str:
    """`value`, refused if it holds a NUL character, which a PostgreSQL text column cannot keep."""
    if "\x00" in value:
        raise services.InvalidTurn(BAD_FIELD.format(field=field, kind=TEXT_WITHOUT_NUL))
    return value


def _uuid(value: object, field: str) -> uuid.UUID | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise services.InvalidTurn(BAD_FIELD.format(field=field, kind="an id"))


def _temperature(value: object) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise services.InvalidTurn(services.BAD_TEMPERATURE)
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise services.InvalidTurn(services.BAD_TEMPERATURE) from None


# --- Shapes ---------------------------------------------------------------------------------


def _conversation_summary(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": str(conversation.pk),
        "title": conversation.title,
        "updated_at": conversation.updated_at.isoformat(),
        "model": conversation.model,
        "system_prompt": conversation.system_prompt,
        "temperature": None if conversation.temperature is None else str(conversation.temperature),
        "url": reverse("chat-conversation", args=[conversation.pk]),
    }


def _message(shown: selectors.ShownMessage) -> dict[str, Any]:
    message, usage = shown.message, shown.usage
    return {
        "id": message.pk,
        "role": message.role,
        "content": message.content,
        "state": message.state,
        "error": message.error,
        "model": message.model,
        "request_id": None if message.request_id is None else str(message.request_id),
        "usage": None
        if usage is None
        else {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "tokens_in": display.count(usage.prompt_tokens),
            "tokens_out": display.count(usage.completion_tokens),
            "cost_usd": str(usage.cost_usd),
            "cost": display.usd_brief(usage.cost_usd),
            "ttft": None if usage.ttft_us is None else display.duration_us(usage.ttft_us),
            "status": usage.status,
        },
    }


def _conversation_detail(conversation: Conversation) -> dict[str, Any]:
    return {**_conversation_summary(conversation), "messages": [_message(shown) for shown in selectors.messages_with_usage(conversation)]}


def _spend(user_id: int, account: Account | None | Literal["unread"] = "unread") -> dict[str, Any]:
    summary = selectors.spend_summary(user_id=user_id, at=timezone.now(), account=account)

    def amount(kind: str, value: Decimal) -> str:
        return display.usd_brief(value) if kind == "spend" else f"{display.count(int(value))} tokens"

    budgets = [
        {
            "kind": budget.kind,
            "period": budget.period,
            "label": BUDGET_LABELS[(budget.kind, budget.period)],
            "used": amount(budget.kind, budget.used),
            "left": amount(budget.kind, budget.left),
            "limit": amount(budget.kind, budget.limit),
            "percent": display.percent_of(budget.used, budget.limit),
            "share": str(budget.share(budget.used)),
        }
        for budget in summary.budgets
    ]
    warnings = [
        f"You have used {display.percent_of(budget.used, budget.limit)} of {BUDGET_LABELS[(budget.kind, budget.period)]} budget."
        for budget in summary.past_threshold
    ]
    return {
        "month_spent": display.usd_brief(summary.month_spent_usd),
        "day_spent": display.usd_brief(summary.day_spent_usd),
        "budgets": budgets,
        "warnings": warnings,
    }


def _models(account: Account | None) -> list[dict[str, Any]]:
    choices = []
    for choice in selectors.model_choices(account=account, at=timezone.now()):
        if choice.input_usd_per_1m is None or choice.output_usd_per_1m is None:
            price = "price not set"
        else:
            price = f"{display.usd_brief(choice.input_usd_per_1m)} in / {display.usd_brief(choice.output_usd_per_1m)} out per 1M tokens"
        choices.append({"id": choice.id, "label": f"{choice.id} · {price}", "price": price, "context_window": choice.context_window})
    return choices


# --- The page ---------------------------------------------------------------------------------


@ratelimit(key="ip", rate=page_rate, block=True)
@ratelimit(key="user_or_ip", rate=page_rate, block=True)
@login_required
@require_GET
def chat_page(request: HttpRequest, conversation_id: uuid.UUID | None = None) -> HttpResponse:
    """The page: a conversation (or a new one), the sidebar of conversations, the spend."""
    user_id = user_id_of(request)
    conversation = None
    if conversation_id is not None:
        try:
            conversation = selectors.conversation_for(user_id=user_id, conversation_id=conversation_id)
        except ConversationNotFound:
            raise Http404(NOT_FOUND) from None
    account = selectors.account_of(user_id)
    models = _models(account)
    ids = [model["id"] for model in models]
    if conversation is not None and conversation.model in ids:
        default = conversation.model
    else:
        default = DEFAULT_MODEL if DEFAULT_MODEL in ids else (ids[0] if ids else "")
    boot = {
        "csrf": get_token(request),
        "models": models,
        "default_model": default,
        "conversations": [_conversation_summary(item) for item in selectors.conversations_for(user_id=user_id)],
        "conversation": None if conversation is None else _conversation_detail(conversation),
        "spend": _spend(user_id, account),
        "urls": {
            "page": reverse("chat"),
            "stream": reverse("chat-stream"),
            "conversations": reverse("chat-conversations"),
            "turns": reverse("chat-turns"),
            "spend": reverse("chat-spend"),
            "account": reverse("account"),
        },
    }
    response = render(request, "chat.html", {"boot": boot})
    response["Content-Security-Policy"] = CHAT_PAGE_CSP
    return response


# --- The JSON API -----------------------------------------------------------------------------


@_json_api("GET")
def conversations(request: HttpRequest) -> HttpResponse:
    """The sidebar: the user's conversations, newest first; `?q=` searches titles and messages."""
    search = _no_nul(request.GET.get("q", ""), "q")
    found = selectors.conversations_for(user_id=user_id_of(request), search=search)
    return _json({"conversations": [_conversation_summary(item) for item in found]})


@_json_api("GET", "PATCH", "DELETE")
def conversation(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """One conversation: read it with its messages, rename it (`{"title"}`), or delete it."""
    user_id = user_id_of(request)
    if request.method == "DELETE":
        services.conversation_delete(user_id=user_id, conversation_id=conversation_id)
        return HttpResponse(status=204)
    if request.method == "PATCH":
        renamed = services.conversation_rename(user_id=user_id, conversation_id=conversation_id, title=_text(_body(request), "title"))
        return _json(_conversation_summary(renamed))
    return _json(_conversation_detail(selectors.conversation_for(user_id=user_id, conversation_id=conversation_id)))


@_json_api("POST")
def turns(request: HttpRequest) -> HttpResponse:
    """Begin a turn (`send`, `regenerate` or `edit`); answer with the request to stream."""
    body = _body(request)
    mode = _text(body, "mode", "send")
    if mode not in services.TURN_MODES:
        raise services.InvalidTurn(BAD_FIELD.format(field="mode", kind=" or ".join(services.TURN_MODES)))
    turn = services.turn_begin(
        user_id=user_id_of(request),
        conversation_id=_uuid(body.get("conversation"), "conversation"),
        mode=mode,
        content=_text(body, "content"),
        model=_text(body, "model"),
        system_prompt=_text(body, "system_prompt"),
        temperature=_temperature(body.get("temperature")),
    )
    chat_request: dict[str, Any] = {
        "model": turn.route.id,
        "messages": turn.context.messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if turn.conversation.temperature is not None:
        chat_request["temperature"] = float(turn.conversation.temperature)
    return _json(
        {
            "conversation": _conversation_detail(turn.conversation),
            "request": chat_request,
            "prompt_tokens": turn.context.prompt_tokens,
            "left_out": turn.context.left_out,
        }
    )


@_json_api("POST")
def answers(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """Save the answer to the conversation's last message; answer with it and the spend now."""
    body = _body(request)
    answer = services.answer_record(
        user_id=user_id_of(request),
        conversation_id=conversation_id,
        content=_text(body, "content"),
        state=_text(body, "state", "complete"),
        error=_text(body, "error"),
        model=_text(body, "model"),
        request_id=_uuid(body.get("request_id"), "request_id"),
    )
    [shown] = selectors.with_usage([answer], user_id=user_id_of(request))
    return _json({"message": _message(shown), "spend": _spend(user_id_of(request))}, status=201)


@_json_api("GET")
def spend(request: HttpRequest) -> HttpResponse:
    return _json(_spend(user_id_of(request)))


def favicon(request: HttpRequest) -> HttpResponse:
    """`/favicon.ico`, which browsers ask for on every site whatever the page links."""
    response = HttpResponse(FAVICON.read_bytes(), content_type="image/x-icon")
    response["Cache-Control"] = "public, max-age=86400"
    return response
