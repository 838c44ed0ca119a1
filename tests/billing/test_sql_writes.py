"""The ledger's and the holds' plain-statement writes (`billing._sql`) store exactly what the ORM
would: every field read back equal, keys set on the objects, refusals as Django's errors."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction

from billing._sql import (
    DeleteWhereAtMost,
    delete_where,
    delete_where_in,
    insert_add_delete,
    insert_many,
)
from billing.models import Reservation, UsageRecord
from billing.services import _usage_record, account_get_or_create, usage_records_create

from .conftest import NOW
from .test_ledger_writer import row

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.ledger]


def _field_values(record: UsageRecord) -> dict[str, Any]:
    return {field.attname: getattr(record, field.attname) for field in UsageRecord._meta.concrete_fields}


@pytest.mark.parametrize("rows", [1, 7], ids=["one row (plain execute)", "a batch (pipelined)"])
def test_ledger_rows_read_back_field_for_field_with_their_keys_set(user: Any, rows: int) -> None:
    records = [_usage_record(row(user.pk, index)) for index in range(rows)]

    with transaction.atomic():
        insert_many(UsageRecord, records)

    assert all(record.pk is not None and not record._state.adding for record in records)
    assert len({record.pk for record in records}) == rows
    for record in records:
        stored = UsageRecord.objects.get(request_id=record.request_id)
        assert _field_values(stored) == _field_values(record)
    # Exact money: a cost with all ten places survives the round trip on both databases.
    assert {type(record.cost_usd) for record in UsageRecord.objects.all()} == {Decimal}


def test_a_saved_ledger_row_is_immutable_like_one_the_orm_saved(user: Any) -> None:
    record = _usage_record(row(user.pk, 1))
    insert_many(UsageRecord, [record])

    with pytest.raises(ValueError):
        record.save()


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in a batch"])
def test_a_refused_row_is_djangos_integrity_error_and_the_transaction_writes_nothing(user: Any, alone: bool) -> None:
    taken = uuid.uuid4()
    insert_many(UsageRecord, [_usage_record(row(user.pk, 0, request_id=taken))])
    refused = _usage_record(row(user.pk, 2, request_id=taken))
    batch = [refused] if alone else [_usage_record(row(user.pk, 1)), refused]

    with pytest.raises(IntegrityError), transaction.atomic():
        insert_many(UsageRecord, batch)

    assert UsageRecord.objects.count() == 1


def test_holds_are_inserted_and_only_the_named_ones_deleted(user: Any) -> None:
    account = account_get_or_create(user_id=user.pk)
    holds = [
        Reservation(
            request_id=uuid.uuid4(), account=account, model="gpt-4o-mini", cost_usd=Decimal("0.0000000001") * (index + 1),
            tokens=100 + index, created_at=NOW, expires_at=NOW + timedelta(minutes=5),
        )
        for index in range(5)
    ]
    insert_many(Reservation, holds)
    assert sorted(Reservation.objects.values_list("cost_usd", flat=True)) == [hold.cost_usd for hold in holds]

    delete_where_in(Reservation, "request_id", [holds[1].request_id, holds[3].request_id, uuid.uuid4()])
    delete_where_in(Reservation, "request_id", [])

    assert set(Reservation.objects.values_list("pk", flat=True)) == {holds[0].pk, holds[2].pk, holds[4].pk}


def test_delete_where_takes_only_the_rows_equal_to_and_at_most_the_values(user: Any, user_factory: Any) -> None:
    mine, theirs = account_get_or_create(user_id=user.pk), account_get_or_create(user_id=user_factory().pk)

    def hold(account: Any, expires_in: timedelta) -> Reservation:
        return Reservation(
            request_id=uuid.uuid4(), account=account, model="gpt-4o-mini", cost_usd=Decimal("0.001"), tokens=1,
            created_at=NOW, expires_at=NOW + expires_in,
        )

    expired, due_now, live = hold(mine, -timedelta(seconds=1)), hold(mine, timedelta(0)), hold(mine, timedelta(seconds=1))
    other_expired = hold(theirs, -timedelta(seconds=1))
    insert_many(Reservation, [expired, due_now, live, other_expired])

    delete_where(Reservation, equal={"account": mine.pk}, at_most={"expires_at": NOW})

    assert set(Reservation.objects.values_list("request_id", flat=True)) == {live.request_id, other_expired.request_id}


def test_holds_are_inserted_in_the_statement_that_deletes_each_accounts_expired_ones(user: Any, user_factory: Any) -> None:
    mine, theirs, third = (account_get_or_create(user_id=each.pk) for each in (user, user_factory(), user_factory()))

    def hold(account: Any, expires_at: Any) -> Reservation:
        return Reservation(
            request_id=uuid.uuid4(), account=account, model="gpt-4o-mini", cost_usd=Decimal("0.0000000003"), tokens=7,
            created_at=NOW - timedelta(minutes=10), expires_at=expires_at,
        )

    second = timedelta(seconds=1)
    mine_expired, mine_live = hold(mine, NOW - second), hold(mine, NOW + second)
    theirs_expired, theirs_live = hold(theirs, NOW + second), hold(theirs, NOW + 2 * second)  # theirs: at NOW + 1 s
    third_expired = hold(third, NOW - second)  # not named: kept
    insert_many(Reservation, [mine_expired, mine_live, theirs_expired, theirs_live, third_expired])
    new = [hold(mine, NOW + timedelta(minutes=5)), hold(theirs, NOW - second)]  # one already expired: inserted all the same

    insert_add_delete(Reservation, new, rollups=(), delete=DeleteWhereAtMost(Reservation, "account", "expires_at", [(mine.pk, NOW), (theirs.pk, NOW + second)]))

    assert all(each.pk is not None and not each._state.adding for each in new)
    kept = {mine_live, theirs_live, third_expired, *new}
    assert set(Reservation.objects.values_list("request_id", flat=True)) == {each.request_id for each in kept}
    stored = Reservation.objects.get(pk=new[0].pk)
    assert (stored.request_id, stored.account_id, stored.cost_usd, stored.tokens, stored.expires_at) == (
        new[0].request_id, mine.pk, Decimal("0.0000000003"), 7, NOW + timedelta(minutes=5),
    )


def test_an_empty_batch_of_holds_still_deletes_the_expired_ones(user: Any) -> None:
    account = account_get_or_create(user_id=user.pk)
    insert_many(Reservation, [
        Reservation(request_id=uuid.uuid4(), account=account, model="gpt-4o-mini", cost_usd=Decimal("0.001"), tokens=1, created_at=NOW, expires_at=NOW)
    ])

    insert_add_delete(Reservation, [], rollups=(), delete=DeleteWhereAtMost(Reservation, "account", "expires_at", [(account.pk, NOW)]))

    assert not Reservation.objects.exists()


@pytest.mark.postgresql
def test_the_ledgers_statement_is_sent_with_its_parameters_apart_and_prepared_after_a_few_runs(user: Any) -> None:
    runs = settings.DATABASES["default"]["OPTIONS"]["prepare_threshold"]
    # A connection of its own: a pooled one may have run (and prepared) it in earlier tests.
    connection.close()
    connection.close_pool()

    def prepared() -> list[str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            return [statement for (statement,) in cursor.fetchall() if statement.startswith('WITH written_0 AS (INSERT INTO "billing_usagerecord"')]

    for index in range(runs):  # counted, not prepared yet
        usage_records_create(rows=[row(user.pk, index)])
        assert prepared() == []

    usage_records_create(rows=[row(user.pk, runs)])

    (statement,) = prepared()
    assert "$1::uuid[]" in statement  # the batch's values are parameters, not quoted into the text
    assert UsageRecord.objects.count() == runs + 1
