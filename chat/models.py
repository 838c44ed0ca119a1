"""A user's conversations on the chat page and their messages.

What an answer cost is not copied here: an assistant message keeps the `request_id` of its call,
and its tokens, cost and time to first token are read from that call's ledger row
(`billing.UsageRecord`) when the conversation is shown (`chat.selectors`). The ledger stays the
one record of money, and a row that reached the database after the answer was saved (a stopped
call is recorded when the gateway sees the hang-up) is found all the same.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

TITLE_MAX_LENGTH = 80
MESSAGE_MAX_CHARS = 100_000
SYSTEM_PROMPT_MAX_CHARS = 10_000
ERROR_MAX_CHARS = 500
TEMPERATURE_MAX = Decimal(2)


class Conversation(models.Model):
    # A UUID, so a conversation's address says nothing of how many there are; access is still
    # checked against its owner on every read and write.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=TITLE_MAX_LENGTH)
    # The settings of its last turn, which a reopened conversation continues with.
    model = models.CharField(max_length=100)
    system_prompt = models.TextField(blank=True, max_length=SYSTEM_PROMPT_MAX_CHARS)
    temperature = models.DecimalField(max_digits=3, decimal_places=2, null=True, blank=True, help_text="0 to 2; empty: the model's default.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-updated_at", "-created_at"]
        indexes = [models.Index(fields=["user", "-updated_at"], name="chat_conversation_recent")]
        constraints = [
            models.CheckConstraint(condition=~Q(title=""), name="chat_conversation_titled"),
            models.CheckConstraint(
                condition=Q(temperature__isnull=True) | (Q(temperature__gte=0) & Q(temperature__lte=TEMPERATURE_MAX)),
                name="chat_conversation_temperature_range",
            ),
        ]

    def __str__(self) -> str:
        return self.title


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class State(models.TextChoices):
        COMPLETE = "complete"
        STOPPED = "stopped", "stopped by the user"
        CUT_OFF = "cut_off", "cut off (the upstream or the connection failed mid-answer)"
        FAILED = "failed", "failed before any text"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=10, choices=Role.choices)
    content = models.TextField(blank=True, max_length=MESSAGE_MAX_CHARS)
    state = models.CharField(max_length=10, choices=State.choices, default=State.COMPLETE)
    # Plain words for why an answer is stopped, cut off or failed.
    error = models.CharField(max_length=ERROR_MAX_CHARS, blank=True)
    model = models.CharField(max_length=100, blank=True, help_text="The model that answered.")
    # The call's ledger row (billing.UsageRecord.request_id); none when no call reached an upstream.
    request_id = models.UUIDField(null=True, blank=True, unique=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["id"]  # the order they were said in
        # A conversation's messages, newest first: its last message (answers, regenerate, edit)
        # and the history a turn sends, read until the model's window is full.
        indexes = [models.Index(fields=["conversation", "-id"], name="chat_message_newest")]
        constraints = [
            # The user's side of a conversation is what they typed: never empty, never a call.
            models.CheckConstraint(
                condition=Q(role="assistant") | (~Q(content="") & Q(state="complete") & Q(request_id__isnull=True)),
                name="chat_message_user_side",
            ),
            models.CheckConstraint(condition=Q(role__in=["user", "assistant"]), name="chat_message_role"),
            models.CheckConstraint(condition=Q(state__in=["complete", "stopped", "cut_off", "failed"]), name="chat_message_state"),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"

    @property
    def in_context(self) -> bool:
        """Whether later turns send this message to the model: anything the user saw as text."""
        return bool(self.content)
