"""Billing: prices, pricing plans, accounts with budgets, the usage ledger, its rollups, reservations.

Units: every rate is USD per 1M tokens (6 places); every cost and budget is USD (10 places); token
counts are integers. Money is never a float (see `billing.money`), in Python or in the database:
every decimal column is an `ExactDecimalField` (`billing.fields`), NUMERIC on PostgreSQL and a
scaled 64-bit integer on SQLite, whose REAL-affinity `decimal` columns would add floats.

Which price a call pays (resolved by `billing.selectors.rates_for`), most specific first:

1. the account's own override for the model (`AccountPrice`), as written;
2. the plan's override for the model (`PlanPrice`), as written;
3. the catalog price (`Price`) in effect when the call started, times the plan's multiplier.

Overrides are final prices: they state what the customer agreed to pay, so the plan multiplier
(a markup or discount over list price) does not scale them again. A model is looked up by its
public name first, then by its upstream model name, so an alias inherits its upstream's price.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any, TypedDict

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

from billing.display import usd_exact
from billing.fields import ExactDecimalField
from billing.money import Rates

IMMUTABLE_RECORD = "Usage records are immutable: record a correction as a new row."
THRESHOLD_RANGE = "The soft threshold is a fraction of the limit, above 0 and at most 1."



class Digits(TypedDict):
    max_digits: int
    decimal_places: int


RATE_DIGITS = Digits(max_digits=12, decimal_places=6)  # USD per 1M tokens, up to 999999.999999
COST_DIGITS = Digits(max_digits=20, decimal_places=10)  # USD, to 1e-10 (the ledger quantum)
# USD, sums of many costs. On SQLite a 64-bit integer of 1e-10 units bounds any amount to
# USD 922,337,203.6854775807 (see billing.fields).
TOTAL_DIGITS = Digits(max_digits=24, decimal_places=10)
# USD, to the ledger quantum, so any sum of costs is a valid budget.
BUDGET_DIGITS = Digits(max_digits=20, decimal_places=10)
MULTIPLIER_DIGITS = Digits(max_digits=8, decimal_places=4)  # a factor: 1.2 = +20 %, 0.8 = -20 %


class RateFields(models.Model):
    """Three rates in USD per 1M tokens; no cached rate means cached tokens pay the input rate."""

    input_usd_per_1m = ExactDecimalField("input (USD / 1M tokens)", **RATE_DIGITS)
    cached_input_usd_per_1m = ExactDecimalField(
        "cached input (USD / 1M tokens)",
        null=True,
        blank=True,
        help_text="Empty: cached prompt tokens are billed at the input rate.",
        **RATE_DIGITS,
    )
    output_usd_per_1m = ExactDecimalField("output (USD / 1M tokens)", **RATE_DIGITS)

    class Meta:
        abstract = True

    @classmethod
    def rate_constraints(cls, prefix: str) -> list[models.BaseConstraint]:
        return [
            models.CheckConstraint(
                condition=models.Q(input_usd_per_1m__gte=0)
                & models.Q(output_usd_per_1m__gte=0)
                & (models.Q(cached_input_usd_per_1m__isnull=True) | models.Q(cached_input_usd_per_1m__gte=0)),
                name=f"{prefix}_rates_non_negative",
            )
        ]

    def rates(self, *, multiplier: Decimal = Decimal(1), source: str = "catalog") -> Rates:
        cached = self.cached_input_usd_per_1m
        return Rates(
            input=self.input_usd_per_1m,
            cached_input=self.input_usd_per_1m if cached is None else cached,
            output=self.output_usd_per_1m,
            multiplier=multiplier,
            source=source,  # type: ignore[arg-type]
        )


class Price(RateFields):
    """A catalog (list) price for a model from `effective_from` on. A change is a new row."""

    model = models.CharField(max_length=100, help_text="Public model name (or upstream model name).")
    effective_from = models.DateTimeField(help_text="Calls started at or after this instant pay this price.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    note = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="price_one_per_model_and_instant"),
            *RateFields.rate_constraints("price"),
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d %H:%M}"

    def in_effect(self, at: Any = None) -> bool:
        return self.effective_from <= (at or timezone.now())


class PricingPlan(models.Model):
    name = models.CharField(max_length=100, unique=True)
    multiplier = ExactDecimalField(
        default=Decimal(1),
        help_text="Applied to catalog prices: 1.2 is a 20 % markup, 0.8 a 20 % discount. Not applied to overrides.",
        **MULTIPLIER_DIGITS,
    )
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.CheckConstraint(condition=models.Q(multiplier__gte=0), name="plan_multiplier_non_negative")]

    def __str__(self) -> str:
        return self.name


class PlanPrice(RateFields):
    """A plan's own price for one model: final, not scaled by the plan multiplier."""

    plan = models.ForeignKey(PricingPlan, on_delete=models.CASCADE, related_name="prices")
    model = models.CharField(max_length=100)

    class Meta:
        ordering = ["plan", "model"]
        constraints = [
            models.UniqueConstraint(fields=["plan", "model"], name="plan_price_one_per_model"),
            *RateFields.rate_constraints("plan_price"),
        ]

    def __str__(self) -> str:
        return f"{self.plan} / {self.model}"


class Account(models.Model):
    """A user's billing account: their plan and budgets. Created on demand; empty limits = none."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="billing_account")
    plan = models.ForeignKey(PricingPlan, null=True, blank=True, on_delete=models.PROTECT, related_name="accounts")
    daily_spend_limit_usd = ExactDecimalField("daily spend limit (USD)", null=True, blank=True, **BUDGET_DIGITS)
    monthly_spend_limit_usd = ExactDecimalField("monthly spend limit (USD)", null=True, blank=True, **BUDGET_DIGITS)
    daily_token_limit = models.PositiveBigIntegerField(null=True, blank=True, help_text="Prompt + completion tokens.")
    monthly_token_limit = models.PositiveBigIntegerField(null=True, blank=True, help_text="Prompt + completion tokens.")
    soft_threshold = ExactDecimalField(
        max_digits=4,
        decimal_places=3,
        default=Decimal("0.8"),
        help_text="Warn (x-budget-warning header, log) once a period's usage reaches this fraction of a limit.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["user__username"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(soft_threshold__gt=0) & models.Q(soft_threshold__lte=1),
                name="account_soft_threshold_fraction",
            ),
            models.CheckConstraint(
                condition=(models.Q(daily_spend_limit_usd__isnull=True) | models.Q(daily_spend_limit_usd__gte=0))
                & (models.Q(monthly_spend_limit_usd__isnull=True) | models.Q(monthly_spend_limit_usd__gte=0)),
                name="account_spend_limits_non_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"account of {self.user}"

    def clean(self) -> None:
        if self.soft_threshold is not None and not Decimal(0) < self.soft_threshold <= Decimal(1):
            raise ValidationError({"soft_threshold": THRESHOLD_RANGE})

    @property
    def has_limits(self) -> bool:
        return any(
            limit is not None
            for limit in (
                self.daily_spend_limit_usd,
                self.monthly_spend_limit_usd,
                self.daily_token_limit,
                self.monthly_token_limit,
            )
        )


class AccountPrice(RateFields):
    """A price negotiated for one account and model: final, the most specific price there is."""

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="prices")
    model = models.CharField(max_length=100)

    class Meta:
        ordering = ["account", "model"]
        constraints = [
            models.UniqueConstraint(fields=["account", "model"], name="account_price_one_per_model"),
            *RateFields.rate_constraints("account_price"),
        ]

    def __str__(self) -> str:
        return f"{self.account} / {self.model}"


class UsageRecord(models.Model):
    """The ledger: one immutable row per call that reached an upstream, however it ended."""

    class Status(models.TextChoices):
        COMPLETED = "completed"
        CANCELLED = "cancelled", "cancelled by client"
        UPSTREAM_ERROR = "upstream_error", "upstream error"
        TIMEOUT = "timeout"
        # Admitted with a budget reservation, then stopped by the gateway when its output reached
        # the completion tokens reserved for it; billed for what it produced.
        REJECTED = "rejected", "rejected after reservation"

    class TokenSource(models.TextChoices):
        UPSTREAM = "upstream", "upstream usage"
        ESTIMATED = "estimated", "local tiktoken count"

    class PriceSource(models.TextChoices):
        CATALOG = "catalog", "catalog price x plan multiplier"
        PLAN = "plan", "plan override"
        ACCOUNT = "account", "account override"

    class Endpoint(models.TextChoices):
        CHAT_COMPLETIONS = "chat.completions", "/v1/chat/completions"
        RESPONSES = "responses", "/v1/responses"
        COMPLETIONS = "completions", "/v1/completions"
        EMBEDDINGS = "embeddings", "/v1/embeddings"

    request_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="usage_records")
    api_key = models.ForeignKey(
        "llmgateway.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_records"
    )
    model = models.CharField(max_length=100, help_text="The public model that answered (the one asked for, or its fallback).")
    # Defaults in the database too, so rows inserted by SQL (bulk loads, benchmarks) need not name them.
    requested_model = models.CharField(max_length=100, blank=True, default="", db_default="", help_text="The model the client asked for, when a fallback answered.")
    upstream_model = models.CharField(max_length=100)
    provider = models.CharField(max_length=40)
    # A call may try several upstreams before one answers: each attempt is a row, linked by the
    # call's id (the client's x-request-id). The last attempt's request_id is the call's id; the
    # ones before it failed before any token and cost nothing. Null on rows from before attempts.
    call_id = models.UUIDField(null=True, blank=True, editable=False)
    attempt = models.PositiveSmallIntegerField(default=1, db_default=1)
    endpoint = models.CharField(
        max_length=24, choices=Endpoint.choices, default=Endpoint.CHAT_COMPLETIONS, db_default=Endpoint.CHAT_COMPLETIONS,
        help_text="The API the client called.",
    )
    # The upstream's id of its answer (chatcmpl-..., resp_..., cmpl-...): reconciliation with the
    # upstream's records, and the owner check of a stored response (`GET /v1/responses/{id}`).
    upstream_id = models.CharField(max_length=100, blank=True, default="", db_default="")
    stream = models.BooleanField()
    status = models.CharField(max_length=20, choices=Status.choices)
    error_kind = models.CharField(max_length=40, blank=True)
    prompt_tokens = models.PositiveIntegerField(help_text="Includes the cached tokens, as OpenAI reports them.")
    completion_tokens = models.PositiveIntegerField()
    cached_tokens = models.PositiveIntegerField(default=0)
    reasoning_tokens = models.PositiveIntegerField(default=0)
    token_source = models.CharField(max_length=20, choices=TokenSource.choices)
    # Microseconds; null when no chunk arrived.
    ttft_us = models.PositiveBigIntegerField(null=True, blank=True)
    duration_us = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)  # indexed with the id: Meta.indexes
    # USD, exact to the ledger quantum (1e-10): billing.money.Rates.cost of the rates below.
    cost_usd = ExactDecimalField("cost (USD)", **COST_DIGITS)
    # The rates this row was billed at (USD per 1M tokens) and the plan multiplier applied, so a
    # later price change never rewrites history. Cached input is resolved (input rate if none).
    input_usd_per_1m = ExactDecimalField(**RATE_DIGITS)
    cached_input_usd_per_1m = ExactDecimalField(**RATE_DIGITS)
    output_usd_per_1m = ExactDecimalField(**RATE_DIGITS)
    price_multiplier = ExactDecimalField(**MULTIPLIER_DIGITS)
    price_source = models.CharField(max_length=10, choices=PriceSource.choices)
    # USD reserved against the budget before the call (worst case); null when nothing was reserved.
    reserved_usd = ExactDecimalField(null=True, blank=True, **COST_DIGITS)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["user", "created_at"]),
            models.Index(fields=["model", "created_at"]),
            # The admin list's two sorts, each with the id that breaks its ties (`ordering`): a page
            # deep in a million rows is found in the index alone (`billing.admin.LedgerPaginator`).
            models.Index(fields=["created_at", "id"], name="usage_created_id"),
            models.Index(fields=["cost_usd", "id"], name="usage_cost_id"),
            models.Index(fields=["call_id"], name="usage_call"),
            models.Index(fields=["upstream_id"], name="usage_upstream_id", condition=~models.Q(upstream_id="")),
        ]
        # Given to staff who may end someone's running call from the cost console.
        permissions = [("stop_call", "Can stop a running call")]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(cached_tokens__lte=models.F("prompt_tokens")),
                name="usage_cached_within_prompt",
            ),
            models.CheckConstraint(
                condition=models.Q(cost_usd__gte=0)
                & models.Q(input_usd_per_1m__gte=0)
                & models.Q(cached_input_usd_per_1m__gte=0)
                & models.Q(output_usd_per_1m__gte=0)
                & models.Q(price_multiplier__gte=0),
                name="usage_money_non_negative",
            ),
        ]

    def __str__(self) -> str:
        # A title for people (the admin's pages): who, which model, when. The user's name when it
        # was loaded with the row (the admin joins it), so a title never costs a query.
        who = self.user if UsageRecord.user.is_cached(self) else f"user {self.user_id}"
        return f"{who} · {self.model} · {timezone.localtime(self.created_at):%Y-%m-%d %H:%M:%S}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not self._state.adding:
            raise ValueError(IMMUTABLE_RECORD)
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(IMMUTABLE_RECORD)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def rates(self) -> Rates:
        return Rates(
            input=self.input_usd_per_1m,
            cached_input=self.cached_input_usd_per_1m,
            output=self.output_usd_per_1m,
            multiplier=self.price_multiplier,
            source=self.price_source,  # type: ignore[arg-type]
        )


class DailyUsage(models.Model):
    """Rollup of the ledger per user x model x endpoint x calendar day (`BILLING_TIME_ZONE`).

    Kept up in the same transaction as each ledger row by an atomic upsert (`billing.services`),
    so its sums always equal the ledger's. The endpoint is part of the row's key (a model is
    mostly called through one API, so it adds few rows) rather than a rollup of its own: one row
    per endpoint and day would be a single row every call of the gateway updates, a lock they
    would all queue on.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="daily_usage")
    model = models.CharField(max_length=100)
    # Rows from before endpoints were recorded (0009) were all chat completions.
    endpoint = models.CharField(
        max_length=24, choices=UsageRecord.Endpoint.choices, default=UsageRecord.Endpoint.CHAT_COMPLETIONS,
        db_default=UsageRecord.Endpoint.CHAT_COMPLETIONS,
    )
    day = models.DateField(help_text="Calendar day in BILLING_TIME_ZONE.")
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    cost_usd = ExactDecimalField("cost (USD)", default=Decimal(0), **TOTAL_DIGITS)
    # How the calls ended (`CANCELLED_STATUSES`, `FAILED_STATUSES`): the console's rates.
    cancelled_requests = models.PositiveBigIntegerField(default=0, help_text="Calls the client cancelled.")
    failed_requests = models.PositiveBigIntegerField(default=0, help_text="Calls that ended in an upstream error or a timeout.")

    class Meta:
        verbose_name_plural = "daily usage"
        ordering = ["-day", "user", "model", "endpoint"]
        constraints = [
            models.UniqueConstraint(fields=["user", "model", "endpoint", "day"], name="daily_usage_one_per_user_model_endpoint_day")
        ]
        # The cost console reads ranges of days across all users.
        indexes = [models.Index(fields=["day"], name="daily_usage_day")]

    def __str__(self) -> str:
        return f"{self.user} {self.model} {self.endpoint} {self.day}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# How the rollups count a call's ending (`billing.services`).
CANCELLED_STATUSES = frozenset({UsageRecord.Status.CANCELLED})
FAILED_STATUSES = frozenset({UsageRecord.Status.UPSTREAM_ERROR, UsageRecord.Status.TIMEOUT})


class DailyKeyUsage(models.Model):
    """Rollup of the ledger per API key x calendar day (`BILLING_TIME_ZONE`): what each key spent.

    Kept up with `DailyUsage`, by the same kind of upsert in the same transaction as each ledger
    row. A call made without a key (the chat page) has no row here, so a day's spend without a
    key is its `DailyUsage` total less its keys'. A deleted key takes its rows with it; its
    ledger rows stay, with no key.
    """

    api_key = models.ForeignKey("llmgateway.ApiKey", on_delete=models.CASCADE, related_name="daily_usage")
    day = models.DateField(help_text="Calendar day in BILLING_TIME_ZONE.")
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    cost_usd = ExactDecimalField("cost (USD)", default=Decimal(0), **TOTAL_DIGITS)

    class Meta:
        verbose_name = "daily usage by key"
        verbose_name_plural = "daily usage by key"
        ordering = ["-day", "api_key"]
        constraints = [models.UniqueConstraint(fields=["api_key", "day"], name="daily_key_usage_one_per_key_day")]
        indexes = [models.Index(fields=["day"], name="daily_key_usage_day")]

    def __str__(self) -> str:
        return f"{self.api_key_id} {self.day}"


class Reservation(models.Model):
    """Budget held for a call in flight, from admission until its ledger row is written.

    Deleted in the ledger row's transaction. A process that dies mid-call leaves its row behind;
    once `expires_at` passes it no longer counts and the next admission for the account deletes it.
    """

    request_id = models.UUIDField(unique=True)
    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="reservations")
    model = models.CharField(max_length=100)
    cost_usd = ExactDecimalField("worst-case cost (USD)", **COST_DIGITS)
    tokens = models.PositiveBigIntegerField(help_text="Prompt tokens + reserved completion tokens.")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["account", "expires_at"])]

    def __str__(self) -> str:
        return f"hold of {usd_exact(self.cost_usd)} on {self.model}, {timezone.localtime(self.created_at):%Y-%m-%d %H:%M:%S}"
