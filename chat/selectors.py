"""Reads for the chat page: a user's conversations, a conversation's messages with what each
answer cost (from the ledger), the models they may pick with their prices, and their spend."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

from django.db.models import Exists, OuterRef, Q, QuerySet, Sum

from billing.console.selectors import Budget
from billing.models import Account, DailyUsage, UsageRecord
from billing.periods import period_containing
from billing.portal.selectors import user_budgets
from billing.selectors import rates_for_models
from chat.exceptions import NOT_FOUND, ConversationNotFound
from chat.models import Conversation, Message
from upstreams.catalog import available_routes

CONVERSATIONS_LISTED = 200
MILLION = 1_000_000


def conversations_for(*, user_id: int, search: str = "") -> QuerySet[Conversation]:
    """The user's conversations, most recently active first; `search` matches a title or any message."""
    conversations = Conversation.objects.filter(user_id=user_id)
    search = search.strip()
    if search:
        said = Message.objects.filter(conversation=OuterRef("pk"), content__icontains=search)
        conversations = conversations.filter(Q(title__icontains=search) | Exists(said))
    return conversations.order_by("-updated_at", "-created_at")[:CONVERSATIONS_LISTED]


def conversation_for(*, user_id: int, conversation_id: uuid.UUID) -> Conversation:
    try:
        return Conversation.objects.get(pk=conversation_id, user_id=user_id)
    except Conversation.DoesNotExist:
        raise ConversationNotFound(NOT_FOUND) from None


@dataclass(frozen=True, slots=True)
class AnswerUsage:
    """What one answer's call cost, as its ledger row says."""

    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    ttft_us: int | None
    status: str


@dataclass(frozen=True, slots=True)
class ShownMessage:
    message: Message
    usage: AnswerUsage | None  # None for the user's messages, and until the call is in the ledger


def messages_with_usage(conversation: Conversation) -> list[ShownMessage]:
    """The conversation's messages in order, each answer with its call's ledger figures. Two queries."""
    return with_usage(list(conversation.messages.order_by("id")), user_id=conversation.user_id)


def with_usage(messages: list[Message], *, user_id: int) -> list[ShownMessage]:
    """`messages`, each answer with the ledger figures of its call (only the user's own calls)."""
    request_ids = [message.request_id for message in messages if message.request_id is not None]
    usage: dict[uuid.UUID, AnswerUsage] = {}
    if request_ids:
        rows = UsageRecord.objects.filter(user_id=user_id, request_id__in=request_ids).values_list(
            "request_id", "prompt_tokens", "completion_tokens", "cost_usd", "ttft_us", "status"
        )
        usage = {
            request_id: AnswerUsage(prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost, ttft_us=ttft, status=status)
            for request_id, prompt, completion, cost, ttft, status in rows
        }
    return [
        ShownMessage(message=message, usage=None if message.request_id is None else usage.get(message.request_id))
        for message in messages
    ]


@dataclass(frozen=True, slots=True)
class ModelChoice:
    id: str
    context_window: int
    input_usd_per_1m: Decimal | None  # what this user pays, plan and overrides applied; None if unpriced
    output_usd_per_1m: Decimal | None


def account_of(user_id: int) -> Account | None:
    """The user's account with its plan, read once for `model_choices` and `spend_summary`."""
    return Account.objects.filter(user_id=user_id).select_related("plan").first()


def model_choices(*, account: Account | None, at: datetime) -> list[ModelChoice]:
    """The models this gateway serves, each with the price the account's user pays for it at
    `at` (the catalog's with no account yet, as their first call would create it). Three queries
    at most, however many models the catalog holds."""
    routes = list(available_routes())
    prices = rates_for_models(account=account, models=[(route.id, route.upstream_model) for route in routes], at=at)
    choices = []
    for route in routes:
        rates = prices[route.id]
        choices.append(
            ModelChoice(
                id=route.id,
                context_window=route.context_window,
                input_usd_per_1m=None if rates is None else rates.cost(prompt_tokens=MILLION, cached_tokens=0, completion_tokens=0),
                output_usd_per_1m=None if rates is None else rates.cost(prompt_tokens=0, cached_tokens=0, completion_tokens=MILLION),
            )
        )
    return choices


@dataclass(frozen=True, slots=True)
class SpendSummary:
    """What the user has spent this month and today, and their budgets (the limits set)."""

    month_spent_usd: Decimal
    day_spent_usd: Decimal
    budgets: tuple[Budget, ...]
    soft_threshold: Decimal | None

    @property
    def past_threshold(self) -> list[Budget]:
        """The budgets used past the account's warning threshold."""
        if self.soft_threshold is None:
            return []
        return [budget for budget in self.budgets if budget.fraction >= self.soft_threshold]


def spend_summary(*, user_id: int, at: datetime, account: Account | None | Literal["unread"] = "unread") -> SpendSummary:
    """Spend in the day and month containing `at`, and each budget's use as an admission counts it.

    `account`: the user's (`account_of`), None if they have none, when the caller read it already."""
    month = period_containing("month", at)
    today = Q(day=period_containing("day", at).first_day)
    spent = DailyUsage.objects.filter(user_id=user_id, day__gte=month.first_day, day__lt=month.end_day).aggregate(
        month=Sum("cost_usd"), day=Sum("cost_usd", filter=today)
    )
    if account is None:
        board = None  # no account: no budget
    else:
        board = user_budgets(user_id=user_id, at=at, account=account if isinstance(account, Account) else None)
    return SpendSummary(
        month_spent_usd=spent["month"] or Decimal(0),
        day_spent_usd=spent["day"] or Decimal(0),
        budgets=board.budgets if board is not None else (),
        soft_threshold=board.soft_threshold if board is not None else None,
    )
