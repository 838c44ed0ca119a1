"""The ledger outbox's journals: what a stopped process leaves is written once, and only once."""

from __future__ import annotations

import fcntl
import os
import uuid
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from billing.models import DailyUsage, Reservation, UsageRecord
from billing.outbox import LOCK_FILE, _encode, claim_orphans, database_key
from billing.services import budget_reserve

from .conftest import NOW, rates_now

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.ledger]

MODEL = "gpt-4o-mini"


def opened_row(user, request_id: uuid.UUID, reserved: Decimal | None = None) -> dict:
    return {
        "request_id": request_id,
        "user_id": user.pk,
        "api_key_id": None,
        "model": MODEL,
        "upstream_model": MODEL,
        "provider": "openai",
        "stream": True,
        "created_at": NOW,
        "rates": rates_now(user, MODEL),
        "reserved_usd": reserved,
        "prompt_tokens_estimate": 12,
    }


def finished_row(user, request_id: uuid.UUID, completion: int) -> dict:
    row = opened_row(user, request_id)
    del row["prompt_tokens_estimate"]
    row.update(
        status="completed", error_kind="", prompt_tokens=12, completion_tokens=completion, cached_tokens=0,
        reasoning_tokens=0, token_source="upstream", ttft_us=1000, duration_us=5000,
    )
    return row


def stopped_process_journal(root: Path, entries: list[dict], *, alive: bool = False) -> tuple[Path, int | None]:
    """A journal as a process leaves it; `alive` keeps its lock held (a running process)."""
    directory = root / database_key() / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True)
    lock = os.open(directory / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (directory / "00000001.jsonl").write_bytes(b"".join(orjson.dumps(entry) + b"\n" for entry in entries))
    if alive:
        return directory, lock
    os.close(lock)
    return directory, None


def test_a_stopped_process_journal_is_written_once_and_removed(user, tmp_path, settings) -> None:
    settings.LEDGER_OUTBOX_DIR = tmp_path
    finished, interrupted, already = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    hold = budget_reserve(user_id=user.pk, model=MODEL, upstream_model=MODEL, prompt_tokens=12, completion_tokens=100, request_id=interrupted, now=NOW)
    from billing.services import usage_record_create

    usage_record_create(**finished_row(user, already, 3))
    directory, _ = stopped_process_journal(
        tmp_path,
        [
            {"op": "open", "id": str(finished), "row": _encode(opened_row(user, finished))},
            {"op": "open", "id": str(interrupted), "row": _encode(opened_row(user, interrupted, hold.reserved_usd))},
            {"op": "open", "id": str(already), "row": _encode(opened_row(user, already))},
            {"op": "progress", "id": str(interrupted), "completion_tokens": 4},
            {"op": "progress", "id": str(interrupted), "completion_tokens": 9},
            {"op": "final", "id": str(finished), "row": _encode(finished_row(user, finished, 20))},
        ],
    )
    # A line cut by a kill mid-write is skipped, not fatal.
    with (directory / "00000001.jsonl").open("ab") as journal:
        journal.write(b'{"op": "progress", "id": "')

    call_command("drain_outbox")
    call_command("drain_outbox")  # a second replay finds nothing left

    rows = {row.request_id: row for row in UsageRecord.objects.all()}
    assert set(rows) == {finished, interrupted, already}
    assert (rows[finished].status, rows[finished].completion_tokens) == ("completed", 20)
    cut = rows[interrupted]
    assert (cut.status, cut.error_kind, cut.prompt_tokens, cut.completion_tokens, cut.token_source) == (
        "cancelled", "interrupted", 12, 9, "estimated",
    )
    assert cut.cost_usd == rates_now(user, MODEL).cost(prompt_tokens=12, cached_tokens=0, completion_tokens=9)
    assert rows[already].completion_tokens == 3  # it was in the ledger: left as it was
    assert not Reservation.objects.exists()  # the interrupted call's hold was settled with its row
    assert DailyUsage.objects.get().requests == 3
    assert not directory.exists()


def test_a_running_process_journal_is_left_to_it(user, tmp_path, settings) -> None:
    settings.LEDGER_OUTBOX_DIR = tmp_path
    request_id = uuid.uuid4()
    directory, lock = stopped_process_journal(
        tmp_path, [{"op": "final", "id": str(request_id), "row": _encode(finished_row(user, request_id, 5))}], alive=True
    )
    try:
        assert claim_orphans(tmp_path).journals == 0
        assert not UsageRecord.objects.exists() and directory.exists()
    finally:
        assert lock is not None
        os.close(lock)
    assert claim_orphans(tmp_path).journals == 1
    assert UsageRecord.objects.get().request_id == request_id


def test_a_row_the_database_refuses_for_good_goes_to_the_dead_letter_file(user, tmp_path, settings) -> None:
    settings.LEDGER_OUTBOX_DIR = tmp_path
    orphan, good = uuid.uuid4(), uuid.uuid4()
    bad_row = finished_row(user, orphan, 5)
    bad_row["user_id"] = user.pk + 10_000  # no such user: an integrity error, forever
    stopped_process_journal(
        tmp_path,
        [
            {"op": "final", "id": str(orphan), "row": _encode(bad_row)},
            {"op": "final", "id": str(good), "row": _encode(finished_row(user, good, 5))},
        ],
    )
    call_command("drain_outbox")
    assert [row.request_id for row in UsageRecord.objects.all()] == [good]
    [letter] = (tmp_path / database_key() / "dead-letter.jsonl").read_bytes().splitlines()
    assert orjson.loads(letter)["row"]["request_id"] == str(orphan)


def test_drain_outbox_fails_loudly_when_the_database_fails(user, tmp_path, settings, monkeypatch) -> None:
    settings.LEDGER_OUTBOX_DIR = tmp_path
    request_id = uuid.uuid4()
    directory, _ = stopped_process_journal(tmp_path, [{"op": "final", "id": str(request_id), "row": _encode(finished_row(user, request_id, 5))}])

    def database_down(**kwargs):
        from django.db import OperationalError

        raise OperationalError("connection refused")

    monkeypatch.setattr("billing.services.usage_record_create", database_down)
    with pytest.raises(CommandError, match="could not be written"):
        call_command("drain_outbox")
    assert directory.exists()  # kept for the next attempt
    monkeypatch.undo()
    call_command("drain_outbox")
    assert UsageRecord.objects.get().request_id == request_id
    assert not directory.exists()
    assert UsageRecord.objects.get().created_at == NOW  # the call's own time, not the replay's
