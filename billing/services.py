"""Billing writes: admit a call against its budget (reserve), record it (ledger + rollup + settle).

Reserve, then settle:

- `budget_reserve`, before any upstream call, prices the call (no price: `PriceMissing`,
  never a free call) and, when the account has limits, holds its worst-case cost and tokens in a
  `Reservation` row. Admissions for one account are serialized by a row lock on the `Account`
  (`SELECT ... FOR UPDATE` on PostgreSQL; on SQLite the transaction is `BEGIN IMMEDIATE`, which
  serializes all writers). Under the lock, one statement reads settled usage plus live holds; a
  call that would take them past a limit is refused with `QuotaExceeded`. From async code
  (`abudget_reserve`) the admissions of one moment are held together (`budget_reserve_many`,
  group-committed by `budget_holds`): one lock and one usage read per account per batch, each
  call checked against the holds granted before it, as if admitted one after another.
- `usage_record_create` (`usage_records_create` for a batch, `billing.ledger_writer`), when the
  call ends, appends the ledger row, adds it to the day's rollups
  (per user, model and endpoint, and per API key) with atomic upserts, and deletes the reservation, in one
  transaction. It takes no account
  lock: the admission's single read statement sees that transaction wholly or not at all.

So at every instant, spend + live holds <= limit for admitted calls; the spend can pass a limit
only by what calls use beyond their estimate (the upstream's exact counts against ours). A call
with no max_tokens is held at GATEWAY_DEFAULT_MAX_TOKENS and stopped there by the relay's cap;
a reasoning model's hidden reasoning tokens are not streamed, so the cap cannot see them.

Holds expire (`BILLING_RESERVATION_TTL`), so a process that dies mid-call frees the budget it held;
expired rows are ignored at once and deleted by the account's next admission. Accounts without
limits reserve nothing and take no lock: their calls are only priced.

Every sync service has an async twin (`a` prefix) that runs it in a worker thread and then hands
the thread's database connection back (`infra.db.release_connections`), so no request holds
a connection for a stream's lifetime. The group-committed batches are the exception on
PostgreSQL: `abudget_reserve_many` and `ausage_records_create` run their statements on the event
loop, on their writer's own connection (`infra.async_postgres`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, Final, Literal

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, transaction
from django.utils import timezone

from billing import pricing_cache
from billing._sql import (
    DeleteWhereAtMost,
    DeleteWhereIn,
    RollupAdd,
    ainsert_add_delete,
    alock_rows,
    delete_where,
    insert_add_delete,
    insert_or_add,
)
from billing.exceptions import PriceMissing, QuotaExceeded
from billing.models import (
    CANCELLED_STATUSES,
    FAILED_STATUSES,
    Account,
    DailyKeyUsage,
    DailyUsage,
    Price,
    PricingPlan,
    Reservation,
    UsageRecord,
)
from billing.money import Rates, money_ratio, money_sum, usd, usd_display
from billing.periods import billing_day, period_containing
from billing.pricefile import PriceRow, read_price_file
from billing.selectors import PeriodUsage, aperiod_usages, period_usage, period_usages, rates_for
from infra.async_postgres import LoopConnection, on_postgres
from infra.db import db_task
from infra.group_commit import GroupCommit

logger = logging.getLogger(__name__)

PRICE_MISSING = (
    "The model `{model}` has no price configured, so the gateway will not serve it. "
    "An operator must add one (admin, or `manage.py importprices`)."
)
SPEND_QUOTA_EXCEEDED = (
    "You exceeded your current quota: this request may cost up to {needed}, and {remaining} of your "
    "{period} budget of {limit} is left. Please check your plan and billing details."
)
TOKEN_QUOTA_EXCEEDED = (
    "You exceeded your current quota: this request may use up to {needed} tokens, and {remaining} of "
    "your {period} budget of {limit} tokens is left. Please check your plan and billing details."
)
SPEND_WARNING = "{period} spend at {percent}% of {limit}"
TOKEN_WARNING = "{period} tokens at {percent}% of {limit}"
PRICE_CONFLICT = (
    "{where}: {model} already has a price effective {effective_from} with other rates. "
    "Prices are history: add a row with a later effective_from instead."
)
DEFAULT_PRICES_MISSING = "Default price file %s not found; no prices loaded."
BAD_LIMIT = "{name} must be a non-negative amount, got {value!r}."
BAD_THRESHOLD = "soft_threshold must be above 0 and at most 1, got {value!r}."

PERIOD_ADJECTIVES: Final = {"day": "daily", "month": "monthly"}


# --- Accounts ---------------------------------------------------------------------------------


def account_get_or_create(*, user_id: int) -> Account:
    """The user's billing account (with its plan), created on first use without limits."""
    account = Account.objects.select_related("plan").filter(user_id=user_id).first()
    if account is None:
        # ON CONFLICT DO NOTHING: concurrent first requests of one user all end up with one row.
        Account.objects.bulk_create([Account(user_id=user_id)], ignore_conflicts=True)
        account = Account.objects.select_related("plan").get(user_id=user_id)
    return account


class Unchanged(Enum):
    """Leave a field as it is (distinct from None, which clears a limit)."""

    UNCHANGED = "unchanged"


UNCHANGED: Final = Unchanged.UNCHANGED


@transaction.atomic
def account_quota_set(
    *,
    user_id: int,
    plan: PricingPlan | None | Unchanged = UNCHANGED,
    daily_spend_limit_usd: Decimal | None | Unchanged = UNCHANGED,
    monthly_spend_limit_usd: Decimal | None | Unchanged = UNCHANGED,
    daily_token_limit: int | None | Unchanged = UNCHANGED,
    monthly_token_limit: int | None | Unchanged = UNCHANGED,
    soft_threshold: Decimal | Unchanged = UNCHANGED,
) -> Account:
    """Set an account's plan and budgets; None clears a limit. Raises ValueError for bad values."""
    account_get_or_create(user_id=user_id)
    account = Account.objects.select_for_update().get(user_id=user_id)
    if not isinstance(plan, Unchanged):
        account.plan = plan
    for name, spend in (("daily_spend_limit_usd", daily_spend_limit_usd), ("monthly_spend_limit_usd", monthly_spend_limit_usd)):
        if isinstance(spend, Unchanged):
            continue
        if spend is not None and usd(spend) < 0:
            raise ValueError(BAD_LIMIT.format(name=name, value=spend))
        setattr(account, name, spend)
    for name, tokens in (("daily_token_limit", daily_token_limit), ("monthly_token_limit", monthly_token_limit)):
        if isinstance(tokens, Unchanged):
            continue
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise ValueError(BAD_LIMIT.format(name=name, value=tokens))
        setattr(account, name, tokens)
    if not isinstance(soft_threshold, Unchanged):
        if not Decimal(0) < usd(soft_threshold) <= Decimal(1):
            raise ValueError(BAD_THRESHOLD.format(value=soft_threshold))
        account.soft_threshold = soft_threshold
    account.full_clean(exclude=["user"])
    account.save()
    return Account.objects.select_related("plan", "user").get(pk=account.pk)


# --- Admission: price and reserve -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admission:
    """A call let through: the rates it will be billed at and what was held for it."""

    account_id: int
    rates: Rates
    reserved_usd: Decimal | None  # None: the account has no limits, nothing was held
    reserved_tokens: int | None
    warning: str = ""  # the x-budget-warning header value once a soft threshold is reached


def budget_reserve(
    *,
    user_id: int,
    model: str,
    upstream_model: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    request_id: uuid.UUID,
    now: datetime | None = None,
) -> Admission:
    """Price a call and hold its worst case (`prompt_tokens` + `completion_tokens`, no cache hit).

    Raises `PriceMissing` if the model has no price and `QuotaExceeded` if the hold
    does not fit a budget; either way nothing is held.
    """
    now = now or timezone.now()
    pricing = _pricing(user_id=user_id, model=model, upstream_model=upstream_model, now=now)
    unheld = _admission_without_hold(pricing, model=model)
    if not pricing.has_limits:
        return unheld  # reads only: no transaction, so no write lock on SQLite
    rates = unheld.rates
    estimate = rates.cost(prompt_tokens=prompt_tokens, cached_tokens=0, completion_tokens=completion_tokens)
    tokens = prompt_tokens + completion_tokens
    with transaction.atomic():
        # The lock serializes this account's admissions; its limits are re-read under it.
        account = Account.objects.select_for_update().get(pk=pricing.account_id)
        if not account.has_limits:
            return unheld
        delete_where(Reservation, equal={"account": account.pk}, at_most={"expires_at": now})
        warning = _check_budgets(account, period_usage(account=account, at=now), cost=estimate, tokens=tokens)
        Reservation.objects.create(
            request_id=request_id,
            account=account,
            model=model,
            cost_usd=estimate,
            tokens=tokens,
            created_at=now,
            expires_at=now + timedelta(seconds=settings.BILLING_RESERVATION_TTL),
        )
    if warning:
        logger.warning("budget warning for user %s: %s", user_id, warning)
    return Admission(account_id=account.pk, rates=rates, reserved_usd=estimate, reserved_tokens=tokens, warning=warning)


def _pricing(*, user_id: int, model: str, upstream_model: str | None, now: datetime) -> pricing_cache.Pricing:
    """The user's account, whether it has limits, and its rates for the model (cached)."""
    pricing = pricing_cache.get(user_id, model, upstream_model)
    if pricing is None:
        pricing = _pricing_read(user_id, model, upstream_model, now=now)
        pricing_cache.put(user_id, model, upstream_model, pricing)
    return pricing


def _pricing_read(user_id: int, model: str, upstream_model: str | None, *, now: datetime | None = None) -> pricing_cache.Pricing:
    account = account_get_or_create(user_id=user_id)
    return pricing_cache.Pricing(
        account_id=account.pk,
        has_limits=account.has_limits,
        rates=rates_for(account=account, model=model, upstream_model=upstream_model, at=now or timezone.now()),
    )


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """One call's `budget_reserve` arguments, for `budget_reserve_many`."""

    user_id: int
    model: str
    upstream_model: str | None
    prompt_tokens: int
    completion_tokens: int
    request_id: uuid.UUID
    now: datetime


def budget_reserve_many(*, requests: Sequence[HoldRequest]) -> list[Admission | Exception]:
    """`budget_reserve` for many calls in one transaction; one outcome per call, in order: its
    `Admission`, or the `PriceMissing` or `QuotaExceeded` it would have raised alone.

    The batch's accounts are locked together (in id order) and their usage read together, and
    each account's calls admitted in order against its usage plus the holds granted before them
    in the batch. The holds are inserted together, in the statement that deletes the accounts'
    expired holds (which the usage read leaves out already): on PostgreSQL a batch costs the same
    five round trips however many accounts it holds for. That is admitting them one after
    another at the batch's latest instant, which they are milliseconds apart from. An account
    whose calls do not share one billing day and month (a batch across midnight) has them
    admitted one by one instead, each at its own instant. Any other failure raises, and then
    nothing is held.
    """
    outcomes, waiting = _waiting_for_holds(requests, pricing=_pricing)
    if not waiting:
        return outcomes
    holds: list[Reservation] = []
    expired: list[tuple[int, datetime]] = []  # (account, instant): its holds expired by then
    with transaction.atomic():
        # One statement locks the batch's accounts, in id order as every batch takes them, so
        # that two batches never wait on each other crosswise.
        accounts = list(Account.objects.select_for_update().filter(pk__in=waiting).order_by("pk"))
        if len(accounts) != len(waiting):
            raise Account.DoesNotExist(f"accounts {sorted(set(waiting) - {account.pk for account in accounts})} are gone")
        instants = _batch_instants(waiting)
        at_once: list[tuple[Account, datetime]] = []
        for account in accounts:
            if not account.has_limits:
                continue  # its calls keep their admission without a hold
            if account.pk not in instants:  # across a period's end: each call at its own instant, as alone
                for index, request, unheld in waiting[account.pk]:
                    delete_where(Reservation, equal={"account": account.pk}, at_most={"expires_at": request.now})
                    try:
                        hold, outcomes[index] = _hold(account, request, unheld, period_usage(account=account, at=request.now))
                    except QuotaExceeded as refusal:
                        outcomes[index] = refusal
                        continue
                    hold.save(force_insert=True)
                continue
            at_once.append((account, instants[account.pk]))
        for (account, now), usage in zip(at_once, period_usages(asked=at_once), strict=True):
            expired.append((account.pk, now))
            holds += _holds_of(account, waiting[account.pk], usage, outcomes)
        # No savepoint: a refused write rolls the whole batch back (and `_budget_reserve_batch`
        # holds its calls one by one).
        insert_add_delete(
            Reservation, holds, rollups=(), delete=DeleteWhereAtMost(Reservation, "account", "expires_at", expired), savepoint=False
        )
    return outcomes


async def abudget_reserve_many(*, requests: Sequence[HoldRequest], on: LoopConnection) -> list[Admission | Exception]:
    """`budget_reserve_many` on a PostgreSQL connection of the event loop (`infra.async_postgres`):
    the same statements and admissions, in one transaction of that connection, taken only when
    a call needs a hold.

    Prices come from the cache, and those it does not have are read in a database thread. A
    batch with an account whose calls do not share one billing day and month (across midnight)
    is `budget_reserve_many`'s, in a database thread.
    """
    prices: dict[tuple[int, str, str | None], pricing_cache.Pricing] = {}
    for request in requests:
        key = (request.user_id, request.model, request.upstream_model)
        if key not in prices and (cached := pricing_cache.get(*key)) is not None:
            prices[key] = cached
    if missing := [request for request in requests if (request.user_id, request.model, request.upstream_model) not in prices]:
        prices.update(await _read_prices_in_thread(missing))
    outcomes, waiting = _waiting_for_holds(
        requests, pricing=lambda *, user_id, model, upstream_model, now: prices[(user_id, model, upstream_model)]
    )
    if not waiting:
        return outcomes
    instants = _batch_instants(waiting)
    if len(instants) != len(waiting):
        return await _budget_reserve_many_in_thread(requests=requests)
    holds: list[Reservation] = []
    expired: list[tuple[int, datetime]] = []
    async with on.connection() as connection, connection.transaction():
        accounts = await alock_rows(Account, sorted(waiting), connection=connection)
        if len(accounts) != len(waiting):
            raise Account.DoesNotExist(f"accounts {sorted(set(waiting) - {account.pk for account in accounts})} are gone")
        at_once = [(account, instants[account.pk]) for account in accounts if account.has_limits]
        for (account, now), usage in zip(at_once, await aperiod_usages(asked=at_once, connection=connection), strict=True):
            expired.append((account.pk, now))
            holds += _holds_of(account, waiting[account.pk], usage, outcomes)
        await ainsert_add_delete(
            Reservation, holds, rollups=(), delete=DeleteWhereAtMost(Reservation, "account", "expires_at", expired), connection=connection
        )
    return outcomes


type _Waiting = dict[int, list[tuple[int, HoldRequest, Admission]]]
"""A batch's calls that need a hold, by account: (their index in the batch, the request, their
admission without a hold)."""


def _read_prices(requests: Sequence[HoldRequest]) -> dict[tuple[int, str, str | None], pricing_cache.Pricing]:
    """`_pricing` of each request's user and model (read, and cached), by (user, model, upstream model)."""
    return {
        (request.user_id, request.model, request.upstream_model): _pricing(
            user_id=request.user_id, model=request.model, upstream_model=request.upstream_model, now=request.now
        )
        for request in requests
    }


def _waiting_for_holds(
    requests: Sequence[HoldRequest], *, pricing: Callable[..., pricing_cache.Pricing]
) -> tuple[list[Admission | Exception], _Waiting]:
    """Each call's outcome without a hold (its admission, or `PriceMissing`), and the calls of
    accounts with limits, which need one."""
    outcomes: list[Admission | Exception] = []
    waiting: _Waiting = {}
    for index, request in enumerate(requests):
        try:
            priced = pricing(user_id=request.user_id, model=request.model, upstream_model=request.upstream_model, now=request.now)
            unheld = _admission_without_hold(priced, model=request.model)
        except PriceMissing as refusal:
            outcomes.append(refusal)
            continue
        outcomes.append(unheld)
        if priced.has_limits:
            waiting.setdefault(priced.account_id, []).append((index, request, unheld))
    return outcomes, waiting


def _batch_instants(waiting: _Waiting) -> dict[int, datetime]:
    """The instant each account's calls are admitted at, their latest: for the accounts whose
    calls share one billing day and month (all but those of a batch across midnight)."""
    instants: dict[int, datetime] = {}
    for account_id, calls in waiting.items():
        periods = {(period_containing("day", request.now).first_day, period_containing("month", request.now).first_day) for _, request, _ in calls}
        if len(periods) == 1:
            instants[account_id] = max(request.now for _, request, _ in calls)
    return instants


def _holds_of(
    account: Account, calls: Sequence[tuple[int, HoldRequest, Admission]], usage: PeriodUsage, outcomes: list[Admission | Exception]
) -> list[Reservation]:
    """The holds of one account's calls, admitted in order against `usage` plus the holds granted
    before them; each call's outcome set (its admission, or `QuotaExceeded`)."""
    holds: list[Reservation] = []
    for index, request, unheld in calls:
        try:
            hold, outcomes[index] = _hold(account, request, unheld, usage)
        except QuotaExceeded as refusal:
            outcomes[index] = refusal
            continue
        holds.append(hold)
        usage = replace(usage, reserved_usd=money_sum([usage.reserved_usd, hold.cost_usd]), reserved_tokens=usage.reserved_tokens + hold.tokens)
    return holds


def _hold(account: Account, request: HoldRequest, unheld: Admission, usage: PeriodUsage) -> tuple[Reservation, Admission]:
    """The hold of one call if it fits `usage` (else `QuotaExceeded`), unsaved, and its admission."""
    estimate = unheld.rates.cost(prompt_tokens=request.prompt_tokens, cached_tokens=0, completion_tokens=request.completion_tokens)
    tokens = request.prompt_tokens + request.completion_tokens
    warning = _check_budgets(account, usage, cost=estimate, tokens=tokens)
    if warning:
        logger.warning("budget warning for user %s: %s", request.user_id, warning)
    hold = Reservation(
        request_id=request.request_id,
        account=account,
        model=request.model,
        cost_usd=estimate,
        tokens=tokens,
        created_at=request.now,
        expires_at=request.now + timedelta(seconds=settings.BILLING_RESERVATION_TTL),
    )
    admission = Admission(account_id=account.pk, rates=unheld.rates, reserved_usd=estimate, reserved_tokens=tokens, warning=warning)
    return hold, admission


def _budget_reserve_batch(requests: Sequence[HoldRequest]) -> Sequence[Admission | Exception]:
    """`budget_reserve_many`, or one by one if a call's hold is refused by the database (a
    `request_id` held already, say), so that call alone fails; a database that is away fails
    every call at once."""
    try:
        return budget_reserve_many(requests=requests)
    except Exception as error:
        if (outcomes := failed_batch_outcomes(len(requests), error, items="budget holds")) is not None:
            return outcomes
    return _hold_one_by_one(requests)


async def _budget_reserve_batch_on_loop(requests: Sequence[HoldRequest]) -> Sequence[Admission | Exception]:
    """`_budget_reserve_batch` on PostgreSQL: the batch's transaction on the event loop
    (`infra.async_postgres`), and only a batch the database refused held one by one in a database
    thread. Elsewhere, all of `_budget_reserve_batch` in a database thread."""
    if not on_postgres():
        return await _budget_reserve_batch_in_thread(requests)
    try:
        return await abudget_reserve_many(requests=requests, on=_holds_connection)
    except Exception as error:
        if (outcomes := failed_batch_outcomes(len(requests), error, items="budget holds")) is not None:
            return outcomes
    return await _hold_one_by_one_in_thread(requests)


def failed_batch_outcomes(size: int, error: Exception, *, items: str) -> Sequence[Exception] | None:
    """The outcomes of a batch of `size` `items` whose write raised `error`: each item fails with it
    when the database is away (`OperationalError`, `InterfaceError`: none waits its turn to fail
    again) or the batch is of one; None when its items are to be written one by one (a refusal
    for one item's sake: find it, write the others). The ledger's batches and the holds' alike."""
    if isinstance(error, (OperationalError, InterfaceError)):
        return [error] * size
    if size == 1:
        return [error]
    logger.info("a batch of %d %s was refused (%s: %s); writing them one by one", size, items, type(error).__name__, error)
    return None


def _hold_one_by_one(requests: Sequence[HoldRequest]) -> list[Admission | Exception]:
    outcomes: list[Admission | Exception] = []
    for index, request in enumerate(requests):
        try:
            outcomes.append(budget_reserve(**asdict(request)))
        except (OperationalError, InterfaceError) as error:
            outcomes += [error] * (len(requests) - index)
            break
        except Exception as error:
            outcomes.append(error)
    return outcomes


_budget_reserve_many_in_thread = db_task(budget_reserve_many)
_read_prices_in_thread = db_task(_read_prices)
_budget_reserve_batch_in_thread = db_task(_budget_reserve_batch)
_hold_one_by_one_in_thread = db_task(_hold_one_by_one)
_holds_connection = LoopConnection("budget holds")


MAX_HOLD_BATCH = 200
# The process's admissions with a hold, group-committed as its ledger rows are (`infra.group_commit`).
budget_holds: GroupCommit[HoldRequest, Admission] = GroupCommit(
    _budget_reserve_batch_on_loop, name="llmgateway-budget-holds", max_batch=MAX_HOLD_BATCH
)


@dataclass(frozen=True, slots=True)
class _Budget:
    """One limit as it stands at admission: `used` is settled usage plus live holds."""

    kind: Literal["spend", "tokens"]
    period: Literal["day", "month"]
    limit: Decimal
    used: Decimal
    needed: Decimal

    def _show(self, amount: Decimal) -> str:
        return usd_display(amount) if self.kind == "spend" else str(int(amount))

    def refusal(self) -> str:
        template = SPEND_QUOTA_EXCEEDED if self.kind == "spend" else TOKEN_QUOTA_EXCEEDED
        remaining = max(money_sum([self.limit, -self.used]), Decimal(0))
        return template.format(
            needed=self._show(self.needed), remaining=self._show(remaining),
            period=PERIOD_ADJECTIVES[self.period], limit=self._show(self.limit),
        )

    def warning(self, after: Decimal) -> str:
        template = SPEND_WARNING if self.kind == "spend" else TOKEN_WARNING
        percent = int(money_ratio(after, self.limit) * 100)
        return template.format(period=PERIOD_ADJECTIVES[self.period], percent=percent, limit=self._show(self.limit))


def _check_budgets(account: Account, usage: PeriodUsage, *, cost: Decimal, tokens: int) -> str:
    """Raise QuotaExceeded if the call does not fit a limit; return the soft-threshold warning."""
    spend_held, tokens_held = usage.reserved_usd, usage.reserved_tokens
    candidates: list[tuple[Literal["spend", "tokens"], Literal["day", "month"], Decimal | int | None, Decimal, Decimal]] = [
        ("spend", "day", account.daily_spend_limit_usd, money_sum([usage.day_cost_usd, spend_held]), cost),
        ("spend", "month", account.monthly_spend_limit_usd, money_sum([usage.month_cost_usd, spend_held]), cost),
        ("tokens", "day", account.daily_token_limit, Decimal(usage.day_tokens + tokens_held), Decimal(tokens)),
        ("tokens", "month", account.monthly_token_limit, Decimal(usage.month_tokens + tokens_held), Decimal(tokens)),
    ]
    warnings: list[str] = []
    for kind, period, limit, used, needed in candidates:
        if limit is None:
            continue
        budget = _Budget(kind=kind, period=period, limit=Decimal(limit), used=used, needed=needed)
        after = money_sum([budget.used, budget.needed])
        if after > budget.limit:
            raise QuotaExceeded(budget.refusal())
        if budget.limit > 0 and money_ratio(after, budget.limit) >= account.soft_threshold:
            warnings.append(budget.warning(after))
    return "; ".join(warnings)


def budget_release(*, request_id: uuid.UUID) -> None:
    """Drop a call's hold without a ledger row: for a call refused after admission, before any upstream call."""
    Reservation.objects.filter(request_id=request_id).delete()


# --- The ledger -------------------------------------------------------------------------------


def usage_record_create(
    *,
    request_id: uuid.UUID,
    user_id: int,
    api_key_id: int | None,
    model: str,
    upstream_model: str,
    provider: str,
    stream: bool,
    status: str,
    error_kind: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    reasoning_tokens: int,
    token_source: str,
    ttft_us: int | None,
    duration_us: int,
    created_at: datetime,
    rates: Rates,
    reserved_usd: Decimal | None = None,
    call_id: uuid.UUID | None = None,
    attempt: int = 1,
    requested_model: str = "",
    endpoint: str = UsageRecord.Endpoint.CHAT_COMPLETIONS,
    upstream_id: str = "",
) -> UsageRecord:
    """Append a finished call's ledger row, add it to its rollup and settle its hold: one transaction.

    `request_id` is unique: a second write for the same call fails and changes nothing.
    """
    (record,) = usage_records_create(rows=[{
        "request_id": request_id, "user_id": user_id, "api_key_id": api_key_id, "model": model,
        "upstream_model": upstream_model, "provider": provider, "stream": stream, "status": status,
        "error_kind": error_kind, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens, "reasoning_tokens": reasoning_tokens, "token_source": token_source,
        "ttft_us": ttft_us, "duration_us": duration_us, "created_at": created_at, "rates": rates,
        "reserved_usd": reserved_usd, "call_id": call_id, "attempt": attempt, "requested_model": requested_model,
        "endpoint": endpoint, "upstream_id": upstream_id,
    }])  # fmt: skip
    return record


type UsageRow = Mapping[str, Any]
"""The keyword arguments of `usage_record_create` for one call (`billing.outbox.Row`)."""

# Rollup columns a batch adds up per rollup row, and the ledger column each sums.
_DAILY_SUMS: Final = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd", "cancelled_requests", "failed_requests")
_KEY_SUMS: Final = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd")


def usage_records_create(*, rows: Sequence[UsageRow]) -> list[UsageRecord]:
    """Append many calls' ledger rows, add them to their rollups and settle their holds: one transaction.

    The batching writer's unit of work (`billing.ledger_writer`): the ledger rows, one upsert per
    rollup row the batch touches (its calls' amounts added up first, in a fixed order of rollup
    rows, so two batches never wait on each other's rows crosswise), and one DELETE of the
    batch's holds (`billing._sql.insert_add_delete`: one statement on PostgreSQL). All or
    nothing: any row the database refuses (a
    `request_id` already in the ledger, a deleted user, a value out of range) rolls the whole
    batch back, holds included; the writer then writes the rows one by one.
    """
    records, rollups, settled = _ledger_batch(rows)
    insert_add_delete(UsageRecord, records, rollups=rollups, delete=settled)
    return records


async def ausage_records_create(*, rows: Sequence[UsageRow], connection: psycopg.AsyncConnection[Any]) -> list[UsageRecord]:
    """`usage_records_create` on a PostgreSQL connection of the event loop (`infra.async_postgres`):
    the same one statement, its own transaction."""
    records, rollups, settled = _ledger_batch(rows)
    await ainsert_add_delete(UsageRecord, records, rollups=rollups, delete=settled, connection=connection)
    return records


def _ledger_batch(rows: Sequence[UsageRow]) -> tuple[list[UsageRecord], list[RollupAdd], DeleteWhereIn]:
    """A batch's ledger rows (unsaved, costs exact), its rollup rows and the DELETE of its holds."""
    records = [_usage_record(row) for row in rows]
    daily: dict[tuple[int, str, str, date], dict[str, Decimal | int]] = {}
    by_key: dict[tuple[int, date], dict[str, Decimal | int]] = {}
    for record in records:
        day = billing_day(record.created_at)
        amounts: dict[str, Decimal | int] = {
            "requests": 1,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "cached_tokens": record.cached_tokens,
            "cost_usd": record.cost_usd,
            "cancelled_requests": int(record.status in CANCELLED_STATUSES),
            "failed_requests": int(record.status in FAILED_STATUSES),
        }
        _add_to(daily.setdefault((record.user_id, record.model, record.endpoint, day), {}), amounts, _DAILY_SUMS)
        if record.api_key_id is not None:
            _add_to(by_key.setdefault((record.api_key_id, day), {}), amounts, _KEY_SUMS)
    return (
        records,
        [
            RollupAdd(
                DailyUsage,
                key=("user", "model", "endpoint", "day"),
                sums=_DAILY_SUMS,
                rows=[
                    {"user": user_id, "model": model, "endpoint": endpoint, "day": day, **sums}
                    for (user_id, model, endpoint, day), sums in sorted(daily.items(), key=lambda item: item[0])
                ],
            ),
            RollupAdd(
                DailyKeyUsage,
                key=("api_key", "day"),
                sums=_KEY_SUMS,
                rows=[{"api_key": api_key_id, "day": day, **sums} for (api_key_id, day), sums in sorted(by_key.items(), key=lambda item: item[0])],
            ),
        ],
        DeleteWhereIn(Reservation, "request_id", [record.request_id for record in records]),
    )


def _add_to(total: dict[str, Decimal | int], amounts: dict[str, Decimal | int], names: tuple[str, ...]) -> None:
    for name in names:
        before = total.get(name)
        if before is None:
            total[name] = amounts[name]
        elif isinstance(before, Decimal):
            total[name] = money_sum([before, amounts[name]])
        else:
            total[name] = before + amounts[name]


def _usage_record(row: UsageRow) -> UsageRecord:
    """The unsaved ledger row of one call, its cost computed from its rates (exact)."""
    fields = dict(row)
    rates: Rates = fields.pop("rates")
    prompt_tokens, completion_tokens = fields["prompt_tokens"], fields["completion_tokens"]
    cached_tokens = fields["cached_tokens"] = min(fields["cached_tokens"], prompt_tokens)
    return UsageRecord(
        **fields,
        cost_usd=rates.cost(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens, completion_tokens=completion_tokens),
        input_usd_per_1m=rates.input,
        cached_input_usd_per_1m=rates.cached_input,
        output_usd_per_1m=rates.output,
        price_multiplier=rates.multiplier,
        price_source=rates.source,
    )


def _daily_usage_add(
    *,
    user_id: int,
    model: str,
    day: date,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    cost_usd: Decimal,
    cancelled_requests: int = 0,
    failed_requests: int = 0,
    endpoint: str = UsageRecord.Endpoint.CHAT_COMPLETIONS,
    using: str = DEFAULT_DB_ALIAS,
) -> None:
    """Add one call to its user x model x endpoint x day rollup (`billing._sql.insert_or_add`)."""
    insert_or_add(
        DailyUsage,
        key={"user": user_id, "model": model, "endpoint": endpoint, "day": day},
        sums={
            "requests": 1,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cached_tokens": cached_tokens,
            "cost_usd": cost_usd,
            "cancelled_requests": cancelled_requests,
            "failed_requests": failed_requests,
        },
        using=using,
    )


# --- Prices -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PriceImportResult:
    created: int
    unchanged: int
    kept: int  # rows that differ from the database and were left as they are (keep_existing)


def price_import(*, rows: Sequence[PriceRow], keep_existing: bool = False, using: str = DEFAULT_DB_ALIAS) -> PriceImportResult:
    """Add catalog prices; idempotent. A row already present with other rates is an error
    (`ValueError` naming its line), or left as it is with `keep_existing`."""
    with transaction.atomic(using=using):
        prices = Price.objects.using(using)
        existing = {(price.model, price.effective_from): price for price in prices.filter(model__in={row.model for row in rows})}
        new: list[Price] = []
        unchanged = kept = 0
        for row in rows:
            current = existing.get((row.model, row.effective_from))
            if current is None:
                new.append(
                    Price(
                        model=row.model,
                        input_usd_per_1m=row.input_usd_per_1m,
                        cached_input_usd_per_1m=row.cached_input_usd_per_1m,
                        output_usd_per_1m=row.output_usd_per_1m,
                        effective_from=row.effective_from,
                        note=row.note,
                    )
                )
            elif (current.input_usd_per_1m, current.cached_input_usd_per_1m, current.output_usd_per_1m) == (
                row.input_usd_per_1m, row.cached_input_usd_per_1m, row.output_usd_per_1m,
            ):
                unchanged += 1
            elif keep_existing:
                kept += 1
            else:
                raise ValueError(
                    PRICE_CONFLICT.format(where=row.where, model=row.model, effective_from=row.effective_from.isoformat())
                )
        prices.bulk_create(new, ignore_conflicts=True)
    return PriceImportResult(created=len(new), unchanged=unchanged, kept=kept)


def price_defaults_load(*, using: str = DEFAULT_DB_ALIAS) -> PriceImportResult | None:
    """Load the default catalog (`BILLING_DEFAULT_PRICES_FILE`), keeping rows already present."""
    path = settings.BILLING_DEFAULT_PRICES_FILE
    if not path.exists():
        logger.warning(DEFAULT_PRICES_MISSING, path)
        return None
    return price_import(rows=read_price_file(path), keep_existing=True, using=using)


# --- Async twins ------------------------------------------------------------------------------

def _admission_without_hold(pricing: pricing_cache.Pricing, *, model: str) -> Admission:
    if pricing.rates is None:
        raise PriceMissing(PRICE_MISSING.format(model=model))
    return Admission(account_id=pricing.account_id, rates=pricing.rates, reserved_usd=None, reserved_tokens=None)


async def abudget_reserve(
    *,
    user_id: int,
    model: str,
    upstream_model: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    request_id: uuid.UUID,
    now: datetime | None = None,
) -> Admission:
    """`budget_reserve` from async code. A user without budgets whose pricing is cached needs no
    database work at all (and while calls use it, it is read again ahead of its expiry), so that
    case is answered here without a hop to a worker thread; the others are batched with the
    admissions of the same moment (`budget_holds`), which cache the pricing they read."""
    pricing = pricing_cache.cached(user_id, model, upstream_model)
    if pricing is not None and not pricing.has_limits:
        return _admission_without_hold(pricing, model=model)
    # Admissions that arrive together are held together (`budget_reserve_many`): one lock of
    # the account and one read of its usage for the batch, not one per call.
    return await budget_holds.submit(
        HoldRequest(
            user_id=user_id,
            model=model,
            upstream_model=upstream_model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            request_id=request_id,
            now=now or timezone.now(),
        )
    )


pricing_cache.read = db_task(_pricing_read)
abudget_release = db_task(budget_release)
ausage_record_create = db_task(usage_record_create)
