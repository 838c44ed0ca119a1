"""Writes: a turn begins (the user's message, the context to send), its answer is saved, a
conversation is renamed or deleted. Each takes the acting user and touches only their own."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.models import UsageRecord
from chat.context import Context, fit_newest
from chat.exceptions import NOT_FOUND, ConversationNotFound, InvalidTurn
from chat.models import (
    ERROR_MAX_CHARS,
    MESSAGE_MAX_CHARS,
    SYSTEM_PROMPT_MAX_CHARS,
    TEMPERATURE_MAX,
    TITLE_MAX_LENGTH,
    Conversation,
    Message,
)
from streaming.catalog import ModelRoute
from upstreams.catalog import route_for

TEMPERATURE_STEP = Decimal("0.01")
TurnMode = Literal["send", "regenerate", "edit"]
TURN_MODES: tuple[TurnMode, ...] = ("send", "regenerate", "edit")

EMPTY_MESSAGE = "Type a message first."
MESSAGE_TOO_LONG = f"A message can be at most {MESSAGE_MAX_CHARS:,} characters."
SYSTEM_PROMPT_TOO_LONG = f"The system prompt can be at most {SYSTEM_PROMPT_MAX_CHARS:,} characters."
BAD_TEMPERATURE = f"The temperature is a number from 0 to {TEMPERATURE_MAX}, or empty for the model's default."
UNKNOWN_MODEL = "The model `{model}` is not available on this gateway."
NOTHING_TO_REDO = "There is no message of yours to answer again in this conversation."
ANSWER_WITHOUT_MESSAGE = "An answer is saved after a message of yours; this conversation ends with an answer."
BAD_STATE = "Unknown answer state {state!r}."
FAILED_WITH_TEXT = "An answer that failed has no text; one with text is cut off or stopped."
ANSWER_SAVED = "This answer is already saved."
NOT_YOUR_CALL = "That request id names another user's call."
UNKNOWN_ANSWER_MODEL = "The model `{model}` is not one this gateway serves, so it answered nothing here."
EMPTY_TITLE = "A conversation needs a title."
TITLE_TOO_LONG = f"A title can be at most {TITLE_MAX_LENGTH} characters."
TOO_MANY_CONVERSATIONS = "You have {count:,} conversations, the most kept for one user: delete some to start a new one."
CONVERSATION_FULL = "This conversation has reached {count:,} messages, the most one can hold: start a new chat to go on."
HISTORY_PAGE = 50  # messages read at a time, newest first, until the model's window is full


@dataclass(frozen=True, slots=True)
class Turn:
    conversation: Conversation
    message: Message  # the user's message being answered
    route: ModelRoute
    context: Context


def title_from(text: str) -> str:
    """A conversation's title from its first message: the first words, on one line."""
    line = re.sub(r"\s+", " ", text).strip()
    if len(line) <= TITLE_MAX_LENGTH:
        return line
    return line[: TITLE_MAX_LENGTH - 1].rstrip() + "…"


def _validated_settings(*, model: str, system_prompt: str, temperature: Decimal | None) -> ModelRoute:
    route = route_for(model)
    if route is None:
        raise InvalidTurn(UNKNOWN_MODEL.format(model=model))
    if len(system_prompt) > SYSTEM_PROMPT_MAX_CHARS:
        raise InvalidTurn(SYSTEM_PROMPT_TOO_LONG)
    if temperature is not None and not (temperature.is_finite() and Decimal(0) <= temperature <= TEMPERATURE_MAX):
        raise InvalidTurn(BAD_TEMPERATURE)
    return route


def _validated_content(content: str) -> str:
    if not content.strip():
        raise InvalidTurn(EMPTY_MESSAGE)
    if len(content) > MESSAGE_MAX_CHARS:
        raise InvalidTurn(MESSAGE_TOO_LONG)
    return content


def _owned(*, user_id: int, conversation_id: uuid.UUID, lock: bool = False) -> Conversation:
    conversations = Conversation.objects.select_for_update() if lock else Conversation.objects.all()
    try:
        return conversations.get(pk=conversation_id, user_id=user_id)
    except Conversation.DoesNotExist:
        raise ConversationNotFound(NOT_FOUND) from None


def turn_begin(
    *,
    user_id: int,
    conversation_id: uuid.UUID | None,
    mode: TurnMode,
    content: str,
    model: str,
    system_prompt: str = "",
    temperature: Decimal | None = None,
) -> Turn:
    """Start a turn and return what to send the model.

    `send` adds the user's message (to a new conversation when `conversation_id` is None);
    `regenerate` answers the last message of theirs again, dropping the answer after it; `edit`
    replaces their last message (and its answer) with `content`. The conversation keeps the
    model, system prompt and temperature for its next turn. Nothing is saved if the context
    does not fit the model (ContextTooLong), nor past the caps CHAT_MAX_CONVERSATIONS (per user)
    and CHAT_MAX_MESSAGES (per conversation, the answer counted). Two new conversations started
    at the same moment may pass the first cap by one: it bounds growth, it is not a quota.
    """
    route = _validated_settings(model=model, system_prompt=system_prompt, temperature=temperature)
    if temperature is not None:
        temperature = temperature.quantize(TEMPERATURE_STEP)  # as the column keeps it
    if mode != "regenerate":
        content = _validated_content(content)
    elif conversation_id is None:
        raise InvalidTurn(NOTHING_TO_REDO)
    now = timezone.now()
    with transaction.atomic():
        if conversation_id is None:
            count = Conversation.objects.filter(user_id=user_id).count()
            if count >= settings.CHAT_MAX_CONVERSATIONS:
                raise InvalidTurn(TOO_MANY_CONVERSATIONS.format(count=count))
            conversation = Conversation.objects.create(user_id=user_id, title=title_from(content), model=route.id, created_at=now)
        else:
            conversation = _owned(user_id=user_id, conversation_id=conversation_id, lock=True)
            if mode == "send":
                count = conversation.messages.count()
                if count + 2 > settings.CHAT_MAX_MESSAGES:  # room for the message and its answer
                    raise InvalidTurn(CONVERSATION_FULL.format(count=count))
        if mode == "send":
            message = Message.objects.create(conversation=conversation, role=Message.Role.USER, content=content, created_at=now)
        else:
            last_question = conversation.messages.filter(role=Message.Role.USER).order_by("-id").first()
            if last_question is None:
                raise InvalidTurn(NOTHING_TO_REDO)
            conversation.messages.filter(pk__gt=last_question.pk).delete()
            if mode == "edit":
                last_question.delete()
                message = Message.objects.create(conversation=conversation, role=Message.Role.USER, content=content, created_at=now)
            else:
                message = last_question
        conversation.model = route.id
        conversation.system_prompt = system_prompt
        conversation.temperature = temperature
        conversation.updated_at = now
        conversation.save(update_fields=["model", "system_prompt", "temperature", "updated_at"])
        context = fit_newest(
            system_prompt=system_prompt,
            newest_first=_history_newest_first(conversation),
            total=conversation.messages.exclude(content="").count(),
            route=route,
        )
    return Turn(conversation=conversation, message=message, route=route, context=context)


def _history_newest_first(conversation: Conversation) -> Iterator[dict[str, str]]:
    """The conversation's messages with text, newest first, HISTORY_PAGE at a time (by index), as
    long as the reader asks for more."""
    said = conversation.messages.exclude(content="").order_by("-id")
    before: int | None = None
    while True:
        page = list((said if before is None else said.filter(id__lt=before)).values_list("id", "role", "content")[:HISTORY_PAGE])
        for _, role, text in page:
            yield {"role": role, "content": text}
        if len(page) < HISTORY_PAGE:
            return
        before = page[-1][0]


def answer_record(
    *,
    user_id: int,
    conversation_id: uuid.UUID,
    content: str,
    state: str,
    error: str = "",
    model: str = "",
    request_id: uuid.UUID | None = None,
) -> Message:
    """Save the answer to the conversation's last message: whole, stopped, cut off or failed.

    Its tokens and cost are the ledger row's of `request_id` (see `chat.models`). The page says
    what arrived, so the text is the client's word; what it may claim is bounded: text at most
    MESSAGE_MAX_CHARS (a model's longest answer through this gateway is far shorter), a model
    this gateway serves, and a call that is not another user's. A request id whose ledger row is
    not written yet (a stopped call is recorded a moment later) is taken; the unique constraint,
    not a read before the write, makes a call's answer saved once, however many saves race.
    """
    if state not in Message.State.values:
        raise InvalidTurn(BAD_STATE.format(state=state))
    if state == Message.State.FAILED and content:
        raise InvalidTurn(FAILED_WITH_TEXT)
    if len(content) > MESSAGE_MAX_CHARS:
        raise InvalidTurn(MESSAGE_TOO_LONG)
    if model and route_for(model) is None:
        raise InvalidTurn(UNKNOWN_ANSWER_MODEL.format(model=model[:100]))
    if request_id is not None and UsageRecord.objects.filter(request_id=request_id).exclude(user_id=user_id).exists():
        raise InvalidTurn(NOT_YOUR_CALL)
    try:
        with transaction.atomic():
            conversation = _owned(user_id=user_id, conversation_id=conversation_id, lock=True)
            last = conversation.messages.order_by("-id").first()
            if last is None or last.role != Message.Role.USER:
                raise InvalidTurn(ANSWER_WITHOUT_MESSAGE)
            now = timezone.now()
            answer = Message.objects.create(
                conversation=conversation,
                role=Message.Role.ASSISTANT,
                content=content,
                state=state,
                error=error[:ERROR_MAX_CHARS],
                model=model,
                request_id=request_id,
                created_at=now,
            )
            Conversation.objects.filter(pk=conversation.pk).update(updated_at=now)
    except IntegrityError:
        # The one constraint a checked answer can break: its call's answer is saved (by another
        # request, perhaps at the same moment).
        raise InvalidTurn(ANSWER_SAVED) from None
    return answer


def conversation_rename(*, user_id: int, conversation_id: uuid.UUID, title: str) -> Conversation:
    title = re.sub(r"\s+", " ", title).strip()
    if not title:
        raise InvalidTurn(EMPTY_TITLE)
    if len(title) > TITLE_MAX_LENGTH:
        raise InvalidTurn(TITLE_TOO_LONG)
    with transaction.atomic():
        conversation = _owned(user_id=user_id, conversation_id=conversation_id, lock=True)
        conversation.title = title
        conversation.save(update_fields=["title"])
    return conversation


def conversation_delete(*, user_id: int, conversation_id: uuid.UUID) -> None:
    """Delete a conversation and its messages (its calls stay in the ledger)."""
    deleted, _ = Conversation.objects.filter(pk=conversation_id, user_id=user_id).delete()
    if not deleted:
        raise ConversationNotFound(NOT_FOUND)
