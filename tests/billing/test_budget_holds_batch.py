"""Budget holds of calls admitted together: one lock and one read of the account per batch, and
exactly the admissions that holding them one after another would give."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.exceptions import QuotaExceeded
from billing.models import Reservation
from billing.services import (
    Admission,
    HoldRequest,
    abudget_reserve,
    abudget_reserve_many,
    account_quota_set,
    budget_holds,
    budget_reserve,
    budget_reserve_many,
)
from infra.async_postgres import LoopConnection

from .conftest import NOW

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.ledger]

MODEL = "gpt-4o-mini"
# gpt-4o-mini's catalog price: 1,000 prompt + 500 completion tokens hold 0.00045 USD, so this
# budget takes exactly ten holds (a hold that reaches the limit exactly fits).
TEN_HOLDS = Decimal("0.0045")


def request(user: Any, at: datetime = NOW) -> HoldRequest:
    return HoldRequest(
        user_id=user.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=1000, completion_tokens=500, request_id=uuid.uuid4(), now=at
    )


type HoldBatch = Callable[[Sequence[HoldRequest]], list[Admission | Exception]]


# Batches run on the event loop on PostgreSQL only.
HOLD_BATCH_WAYS = ["in a database thread", *(["on the event loop"] if connection.vendor == "postgresql" else [])]


@pytest.fixture(params=HOLD_BATCH_WAYS)
def hold_batch(request: pytest.FixtureRequest) -> Iterator[HoldBatch]:
    """A batch of holds as the process writes it: `budget_reserve_many` in a database thread (any
    database), or `abudget_reserve_many` on a connection of the event loop (PostgreSQL)."""
    if request.param == "in a database thread":
        yield lambda requests: budget_reserve_many(requests=requests)
        return
    loop_connection = LoopConnection("test holds")

    async def on_the_loop(requests: Sequence[HoldRequest]) -> list[Admission | Exception]:
        return await abudget_reserve_many(requests=requests, on=loop_connection)

    yield lambda requests: asyncio.run(on_the_loop(requests))
    asyncio.run(loop_connection.aclose())


def outcome_kinds(outcomes: list[Any]) -> list[str]:
    return ["held" if isinstance(o, Admission) and o.reserved_usd is not None else type(o).__name__ for o in outcomes]


def test_admissions_of_one_moment_are_held_in_order_in_one_transaction(user, hold_batch: HoldBatch) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=TEN_HOLDS, soft_threshold=Decimal("0.5"))
    requests = [request(user) for _ in range(14)]

    outcomes = hold_batch(requests)

    assert outcome_kinds(outcomes) == ["held"] * 10 + ["QuotaExceeded"] * 4
    assert [o.warning != "" for o in outcomes[:10]] == [False] * 4 + [True] * 6  # from 50% on
    assert set(Reservation.objects.values_list("request_id", flat=True)) == {r.request_id for r in requests[:10]}
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(DISTINCT xmin::text) FROM billing_reservation")
            assert cursor.fetchone()[0] == 1


def test_a_batch_admits_what_one_by_one_admissions_would(user, user_factory, hold_batch: HoldBatch) -> None:
    alone = user_factory()
    for each in (user, alone):
        account_quota_set(user_id=each.pk, monthly_spend_limit_usd=TEN_HOLDS, daily_token_limit=9_000, soft_threshold=Decimal("0.8"))
    for each in (user, alone):  # some of the day's room is held already
        budget_reserve(user_id=each.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=1000, completion_tokens=500, request_id=uuid.uuid4(), now=NOW)

    batched = hold_batch([request(user) for _ in range(8)])
    one_by_one: list[Any] = []
    for _ in range(8):
        try:
            one_by_one.append(
                budget_reserve(user_id=alone.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=1000, completion_tokens=500, request_id=uuid.uuid4(), now=NOW)
            )
        except QuotaExceeded as refusal:
            one_by_one.append(refusal)

    assert outcome_kinds(batched) == outcome_kinds(one_by_one) == ["held"] * 5 + ["QuotaExceeded"] * 3  # 6 x 1,500 tokens a day
    assert [getattr(o, "warning", str(o)) for o in batched] == [getattr(o, "warning", str(o)) for o in one_by_one]


def test_a_batch_across_midnight_holds_each_call_at_its_own_instant(user, user_factory, hold_batch: HoldBatch) -> None:
    alone = user_factory()
    before, after = datetime(2025, 6, 15, 23, 59, 59, 999000, tzinfo=UTC), datetime(2025, 6, 16, 0, 0, 0, 1000, tzinfo=UTC)
    for each in (user, alone):
        account_quota_set(user_id=each.pk, daily_token_limit=4_500)
    instants = [before, before, after, after, before, after, before, after]

    batched = hold_batch([request(user, at) for at in instants])
    one_by_one: list[Any] = []
    for at in instants:
        try:
            one_by_one.append(
                budget_reserve(user_id=alone.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=1000, completion_tokens=500, request_id=uuid.uuid4(), now=at)
            )
        except QuotaExceeded as refusal:
            one_by_one.append(refusal)

    assert outcome_kinds(batched) == outcome_kinds(one_by_one)
    assert Reservation.objects.filter(account__user=user).count() == Reservation.objects.filter(account__user=alone).count()


def test_concurrent_admissions_share_batches_and_never_hold_past_the_budget(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=TEN_HOLDS)
    batches_before = budget_holds.batches

    async def admit_all() -> list[Any]:
        return await asyncio.gather(
            *(
                abudget_reserve(user_id=user.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=1000, completion_tokens=500, request_id=uuid.uuid4(), now=NOW + timedelta(milliseconds=i))
                for i in range(30)
            ),
            return_exceptions=True,
        )

    outcomes = asyncio.run(admit_all())

    assert sorted(outcome_kinds(outcomes)) == sorted(["held"] * 10 + ["QuotaExceeded"] * 20)
    assert Reservation.objects.count() == 10
    assert budget_holds.batches - batches_before < 30  # admissions of one moment shared transactions


def test_a_call_whose_hold_the_database_refuses_fails_alone(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=TEN_HOLDS)
    taken = request(user)
    budget_reserve(**asdict(taken))  # its request_id is held already
    others = [request(user) for _ in range(3)]

    async def admit_together() -> list[Any]:  # handed in in one turn of the loop: one batch
        return await asyncio.gather(*(budget_holds.submit(each) for each in [others[0], taken, *others[1:]]), return_exceptions=True)

    outcomes = asyncio.run(admit_together())

    assert outcome_kinds(outcomes) == ["held", "IntegrityError", "held", "held"]
    assert set(Reservation.objects.values_list("request_id", flat=True)) == {taken.request_id, *(each.request_id for each in others)}


def _twins(user_factory: Any, limits: dict[str, Any]) -> tuple[Any, Any]:
    """Two users with the same limits and the same hold already taken: one for a batch, one alone."""
    pair = (user_factory(), user_factory())
    for each in pair:
        account_quota_set(user_id=each.pk, **limits)
        budget_reserve(user_id=each.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=1000, completion_tokens=500, request_id=uuid.uuid4(), now=NOW)
        # A hold from long ago, expired: it counts for nothing, and the batch deletes its own.
        budget_reserve(user_id=each.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=1000, completion_tokens=500, request_id=uuid.uuid4(), now=NOW - timedelta(days=1))
    return pair


def test_a_batch_for_several_accounts_admits_each_as_it_would_alone(user_factory, hold_batch: HoldBatch) -> None:
    limits = [
        {"monthly_spend_limit_usd": TEN_HOLDS},  # 9 more holds fit
        {"daily_token_limit": 6_000},  # 3 more
        {"monthly_spend_limit_usd": Decimal("0.0009"), "soft_threshold": Decimal("0.5")},  # 1 more, with a warning
        {},  # no limits: no hold
    ]
    twins = [_twins(user_factory, each) for each in limits]
    order = [twin for _ in range(9) for twin in twins]  # the accounts' calls interleaved

    batched = hold_batch([request(batch_user, NOW + timedelta(milliseconds=1)) for batch_user, _ in order])
    alone: list[Any] = []
    for _, alone_user in order:
        try:
            alone.append(
                budget_reserve(user_id=alone_user.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=1000, completion_tokens=500, request_id=uuid.uuid4(), now=NOW + timedelta(milliseconds=1))
            )
        except QuotaExceeded as refusal:
            alone.append(refusal)

    assert outcome_kinds(batched) == outcome_kinds(alone)
    assert [getattr(o, "warning", str(o)) for o in batched] == [getattr(o, "warning", str(o)) for o in alone]
    assert outcome_kinds(batched[:4]) == ["held", "held", "held", "Admission"]
    assert outcome_kinds(batched[-4:]) == ["held", "QuotaExceeded", "QuotaExceeded", "Admission"]
    for batch_user, alone_user in twins:
        held = [Reservation.objects.filter(account__user=each).count() for each in (batch_user, alone_user)]
        assert held[0] == held[1]
    assert not Reservation.objects.filter(expires_at__lte=NOW).exists()


@pytest.mark.postgresql
def test_a_batch_costs_the_same_statements_for_many_accounts_as_for_one(user, user_factory) -> None:
    others = [user_factory() for _ in range(5)]
    for each in (user, *others):
        account_quota_set(user_id=each.pk, monthly_spend_limit_usd=TEN_HOLDS)
    budget_reserve_many(requests=[request(each) for each in (user, *others)])  # their prices are cached now

    def statements(users: list[Any]) -> int:
        with CaptureQueriesContext(connection) as captured:
            outcomes = budget_reserve_many(requests=[request(each) for each in users])
        assert outcome_kinds(outcomes) == ["held"] * len(users)
        return len(captured.captured_queries)

    assert statements([user] * 6) == statements(others) == 5  # BEGIN, lock, usage, holds written, COMMIT
