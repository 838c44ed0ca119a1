"""The batching ledger writer: calls that finish together share one transaction, and nothing a
single call's write guaranteed is lost (one row each, exact costs, rollups, holds, bad rows)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import IntegrityError, OperationalError, connection
from prometheus_client import REGISTRY

from billing.ledger_writer import LedgerWriter, Outcome, write_batch_on_loop
from billing.models import DailyKeyUsage, DailyUsage, Reservation, UsageRecord
from billing.money import Rates, money_sum
from billing.periods import billing_day
from billing.services import UsageRow, account_quota_set, budget_reserve, usage_records_create
from llmgateway.services import api_key_create

from .conftest import NOW

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.ledger]

MODEL = "gpt-4o-mini"
# Rates with every decimal place a rate column has, so a cost that is off by a rounding shows.
RATES = Rates(
    input=Decimal("0.153791"), cached_input=Decimal("0.076903"), output=Decimal("0.611117"), multiplier=Decimal("1.2345"), source="catalog"
)
STATUSES = ("completed", "completed", "cancelled", "upstream_error", "timeout")


def row(user_id: int, index: int, *, api_key_id: int | None = None, request_id: uuid.UUID | None = None, day_offset: int = 0) -> dict[str, Any]:
    """A finished call's row, as `ApiCall._row_finished` makes it; its amounts vary with `index`."""
    prompt = 7 + 13 * index
    return {
        "request_id": request_id or uuid.uuid4(),
        "call_id": None,
        "attempt": 1,
        "endpoint": "chat.completions",
        "user_id": user_id,
        "api_key_id": api_key_id,
        "model": MODEL,
        "requested_model": "",
        "upstream_model": MODEL,
        "provider": "openai",
        "stream": False,
        "created_at": NOW + timedelta(days=day_offset),
        "rates": RATES,
        "reserved_usd": None,
        "status": STATUSES[index % len(STATUSES)],
        "error_kind": "",
        "prompt_tokens": prompt,
        "completion_tokens": 3 + 5 * index,
        "cached_tokens": (prompt // 3) if index % 2 else 0,
        "reasoning_tokens": 0,
        "token_source": "upstream",
        "upstream_id": "",
        "ttft_us": 900,
        "duration_us": 1800,
    }


def cost_of(call: dict[str, Any]) -> Decimal:
    return RATES.cost(prompt_tokens=call["prompt_tokens"], cached_tokens=call["cached_tokens"], completion_tokens=call["completion_tokens"])


class Recorder:
    """A writer's database step, watched: the size of every batch, and a gate to hold one open."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate: asyncio.Event | None = None  # while set to an unset event, batches wait for it
        self.started = asyncio.Event()

    async def __call__(self, rows: Sequence[UsageRow]) -> list[Outcome]:
        self.sizes.append(len(rows))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return await write_batch_on_loop(rows)


def run[T](main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(main())  # type: ignore[arg-type]


async def submit_all(writer: LedgerWriter, rows: list[dict[str, Any]]) -> list[Decimal | BaseException]:
    futures = [writer.submit(call) for call in rows]
    return list(await asyncio.gather(*futures, return_exceptions=True))


def transactions_that_wrote_the_ledger() -> int:
    """On PostgreSQL, the distinct transactions that inserted the ledger's rows (their `xmin`)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(DISTINCT xmin::text) FROM billing_usagerecord")
        return int(cursor.fetchone()[0])


def test_rows_handed_in_together_are_one_transaction(user) -> None:
    calls = [row(user.pk, index) for index in range(60)]
    recorder = Recorder()
    writer = LedgerWriter(recorder)

    costs = run(lambda: submit_all(writer, calls))

    assert recorder.sizes == [60] and writer.batches == 1
    assert costs == [cost_of(call) for call in calls]
    assert UsageRecord.objects.count() == 60
    if connection.vendor == "postgresql":
        assert transactions_that_wrote_the_ledger() == 1


def test_rows_arriving_while_a_batch_is_written_wait_and_form_the_next_one(user) -> None:
    recorder = Recorder()
    writer = LedgerWriter(recorder)

    async def main() -> list[Decimal | BaseException]:
        recorder.gate = asyncio.Event()
        first = writer.submit(row(user.pk, 0))  # alone: written at once, no timer
        await recorder.started.wait()
        later = [writer.submit(row(user.pk, index)) for index in range(1, 41)]
        assert writer.waiting == 40
        recorder.gate.set()
        return list(await asyncio.gather(first, *later, return_exceptions=True))

    costs = run(main)

    assert recorder.sizes == [1, 40]
    assert all(isinstance(cost, Decimal) for cost in costs)
    assert UsageRecord.objects.count() == 41
    if connection.vendor == "postgresql":
        assert transactions_that_wrote_the_ledger() == 2


def test_each_batch_reports_its_size_and_how_long_its_write_took(user) -> None:
    def metric(sample: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(f"llmgateway_batch_{sample}", {"writer": "llmgateway-ledger-writer", **labels}) or 0.0

    samples = [("items_count", {}), ("items_sum", {}), ("items_bucket", {"le": "1.0"}), ("seconds_count", {}), ("seconds_sum", {})]
    before = [metric(sample, **labels) for sample, labels in samples]
    recorder = Recorder()
    writer = LedgerWriter(recorder)

    async def main() -> None:
        recorder.gate = asyncio.Event()
        first = writer.submit(row(user.pk, 0))
        await recorder.started.wait()
        later = [writer.submit(row(user.pk, index)) for index in range(1, 6)]
        await asyncio.sleep(0.2)  # the first batch's write is held open this long
        recorder.gate.set()
        await asyncio.gather(first, *later)

    run(main)

    items, items_sum, batches_of_one, writes, seconds = (metric(s, **labels) - b for (s, labels), b in zip(samples, before, strict=True))
    assert recorder.sizes == [1, 5]
    assert (items, items_sum, batches_of_one, writes) == (2, 6, 1, 2)
    assert seconds >= 0.2


def test_a_batch_is_bounded(user) -> None:
    recorder = Recorder()
    writer = LedgerWriter(recorder, max_batch=8)

    run(lambda: submit_all(writer, [row(user.pk, index) for index in range(20)]))

    assert recorder.sizes == [8, 8, 4]
    assert UsageRecord.objects.count() == 20


def test_each_row_once_its_cost_exact_and_the_rollups_the_sums_of_the_rows(user, user_factory) -> None:
    other = user_factory()
    key, _ = api_key_create(username=user.username, name="a")
    other_key, _ = api_key_create(username=other.username, name="b")
    calls = [
        row(owner.pk, index, api_key_id=api_key.pk, day_offset=index % 2)
        for index in range(90)
        for owner, api_key in ([(user, key), (other, other_key)][index % 2],)
    ]
    calls += [row(user.pk, 90 + index) for index in range(10)]  # without a key (the chat page)

    costs = run(lambda: submit_all(LedgerWriter(), calls))

    assert costs == [cost_of(call) for call in calls]  # to the 1e-10 USD, as Decimals
    ledger = {record.request_id: record for record in UsageRecord.objects.all()}
    assert len(ledger) == len(calls)
    for call in calls:
        record = ledger[call["request_id"]]
        assert (record.cost_usd, record.prompt_tokens, record.completion_tokens, record.cached_tokens, record.status) == (
            cost_of(call), call["prompt_tokens"], call["completion_tokens"], call["cached_tokens"], call["status"],
        )
    daily = {(r.user_id, r.model, r.endpoint, r.day): r for r in DailyUsage.objects.all()}
    expected: dict[tuple[Any, ...], list[UsageRecord]] = {}
    for record in ledger.values():
        expected.setdefault((record.user_id, record.model, record.endpoint, billing_day(record.created_at)), []).append(record)
    assert set(daily) == set(expected)
    for rollup_key, records in expected.items():
        rollup = daily[rollup_key]
        assert rollup.requests == len(records)
        assert rollup.prompt_tokens == sum(r.prompt_tokens for r in records)
        assert rollup.completion_tokens == sum(r.completion_tokens for r in records)
        assert rollup.cached_tokens == sum(r.cached_tokens for r in records)
        assert rollup.cost_usd == money_sum(r.cost_usd for r in records)
        assert rollup.cancelled_requests == sum(r.status == "cancelled" for r in records)
        assert rollup.failed_requests == sum(r.status in ("upstream_error", "timeout") for r in records)
    for by_key in DailyKeyUsage.objects.all():
        records = [r for r in ledger.values() if r.api_key_id == by_key.api_key_id and billing_day(r.created_at) == by_key.day]
        assert (by_key.requests, by_key.cost_usd) == (len(records), money_sum(r.cost_usd for r in records))
    assert sum(r.requests for r in DailyKeyUsage.objects.all()) == 90


def test_the_holds_of_a_batch_are_released_with_its_rows(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=Decimal("100"))
    calls = [row(user.pk, index) for index in range(25)]
    for call in calls:
        budget_reserve(
            user_id=user.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=10, completion_tokens=10, request_id=call["request_id"], now=NOW
        )
    assert Reservation.objects.count() == 25

    run(lambda: submit_all(LedgerWriter(), calls))

    assert UsageRecord.objects.count() == 25
    assert not Reservation.objects.exists()


def test_a_batch_that_fails_leaves_neither_its_rows_nor_the_release_of_its_holds(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=Decimal("100"))
    calls = []
    for index in range(5):
        request_id = uuid.uuid4()
        budget_reserve(user_id=user.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=10, completion_tokens=10, request_id=request_id, now=NOW)
        calls.append(row(user.pk, index, request_id=request_id))
    # No such user: the foreign key is checked when the transaction commits, after every other
    # statement of the batch (inserts, rollups, the holds' DELETE) has run.
    calls.append(row(user.pk + 10_000, 5))

    with pytest.raises(IntegrityError):
        usage_records_create(rows=calls)

    assert not UsageRecord.objects.exists()
    assert not DailyUsage.objects.exists()
    assert Reservation.objects.count() == 5


def test_one_bad_row_does_not_lose_the_others(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=Decimal("100"))
    calls = []
    for index in range(8):
        request_id = uuid.uuid4()
        budget_reserve(user_id=user.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=10, completion_tokens=10, request_id=request_id, now=NOW)
        calls.append(row(user.pk, index, request_id=request_id))
    written = row(user.pk, 50)
    usage_records_create(rows=[written])
    calls.insert(2, row(user.pk + 10_000, 8))  # no such user
    calls.insert(5, dict(row(user.pk, 9), request_id=written["request_id"]))  # already in the ledger
    recorder = Recorder()

    outcomes = run(lambda: submit_all(LedgerWriter(recorder), calls))

    assert recorder.sizes == [10]  # one batch, refused, then written row by row
    assert isinstance(outcomes[2], IntegrityError) and isinstance(outcomes[5], IntegrityError)
    good = [call for index, call in enumerate(calls) if index not in (2, 5)]
    assert [outcome for index, outcome in enumerate(outcomes) if index not in (2, 5)] == [cost_of(call) for call in good]
    assert set(UsageRecord.objects.values_list("request_id", flat=True)) == {call["request_id"] for call in good} | {written["request_id"]}
    assert UsageRecord.objects.get(request_id=written["request_id"]).completion_tokens == written["completion_tokens"]  # left as it was
    assert not Reservation.objects.exists()
    assert DailyUsage.objects.get().requests == 9
    assert DailyUsage.objects.get().cost_usd == money_sum([*(cost_of(call) for call in good), cost_of(written)])


def test_a_database_that_is_away_fails_the_whole_batch_at_once(user, monkeypatch) -> None:
    row_by_row: list[object] = []

    def database_away(**kwargs: object) -> None:
        raise OperationalError("connection refused")

    async def database_away_on_the_loop(**kwargs: object) -> None:
        database_away()

    monkeypatch.setattr("billing.ledger_writer.usage_records_create", database_away)
    monkeypatch.setattr("billing.ledger_writer.ausage_records_create", database_away_on_the_loop)
    monkeypatch.setattr("billing.ledger_writer.usage_record_create", lambda **row: row_by_row.append(row))
    calls = [row(user.pk, index) for index in range(12)]

    outcomes = run(lambda: submit_all(LedgerWriter(), calls))

    assert all(isinstance(outcome, OperationalError) for outcome in outcomes)
    assert row_by_row == []  # no row waits its turn against a database that is away
    assert not UsageRecord.objects.exists()


def test_a_row_withdrawn_before_a_batch_took_it_is_never_written(user) -> None:
    recorder = Recorder()
    writer = LedgerWriter(recorder)
    first, second = row(user.pk, 0), row(user.pk, 1)

    async def main() -> tuple[bool, bool]:
        recorder.gate = asyncio.Event()
        written = writer.submit(first)
        await recorder.started.wait()
        given_up = writer.submit(second)
        taken_back = writer.withdraw(given_up)
        in_flight = writer.withdraw(written)  # being written: it cannot be taken back
        recorder.gate.set()
        await written
        return taken_back, in_flight

    assert run(main) == (True, False)
    assert recorder.sizes == [1]
    assert list(UsageRecord.objects.values_list("request_id", flat=True)) == [first["request_id"]]
