"""The rollups the console reads: how calls ended and what each key spent, kept with every ledger
row, equal to the ledger's own sums, and filled from an existing ledger by the migration."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.db import connection
from django.db.models import Count, Q, Sum

from billing.models import DailyKeyUsage, DailyUsage, UsageRecord
from llmgateway.services import api_key_create

from .conftest import NOW

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]

STATUSES = ("completed", "cancelled", "upstream_error", "timeout", "rejected")


def test_a_call_adds_to_its_key_and_counts_how_it_ended(call, user_factory) -> None:
    user = user_factory("nia")
    key, _ = api_key_create(username="nia")
    call(user, api_key_id=key.pk, status="cancelled", prompt=1500, completion=10)
    call(user, api_key_id=key.pk, status="timeout", prompt=500)
    call(user, api_key_id=None, status="upstream_error")  # no key: no key rollup
    rollup = DailyUsage.objects.get()
    assert (rollup.requests, rollup.cancelled_requests, rollup.failed_requests) == (3, 1, 2)
    [by_key] = DailyKeyUsage.objects.all()
    assert (by_key.api_key_id, by_key.day, by_key.requests) == (key.pk, NOW.date(), 2)
    assert (by_key.prompt_tokens, by_key.completion_tokens, by_key.cost_usd) == (2000, 10, Decimal("2.02"))


def test_a_models_calls_through_each_endpoint_are_rolled_up_apart(call, user_factory) -> None:
    user = user_factory("ola")
    call(user, prompt=1000)
    call(user, prompt=2000, endpoint="responses", status="cancelled")
    call(user, prompt=500, endpoint="responses")
    rows = {row.endpoint: row for row in DailyUsage.objects.filter(user=user)}
    assert set(rows) == {"chat.completions", "responses"}
    assert (rows["chat.completions"].requests, rows["chat.completions"].cost_usd) == (1, Decimal(1))
    assert (rows["responses"].requests, rows["responses"].cost_usd, rows["responses"].cancelled_requests) == (2, Decimal("2.5"), 1)


def test_the_rollups_equal_the_ledgers_sums_by_key_and_by_ending(call, user_factory, settings) -> None:
    settings.BILLING_TIME_ZONE = "Asia/Kolkata"  # local days are not UTC days
    users = [user_factory(f"sum-{n}") for n in range(3)]
    keys = [api_key_create(username=user.username)[0].pk for user in users] + [None]
    for n in range(120):
        call(
            users[n % 3], api_key_id=keys[n % 4], status=STATUSES[n % 5], prompt=37 * n + 1, completion=n,
            at=datetime(2025, 6, 1, tzinfo=UTC) + n * timedelta(hours=5, minutes=17),
        )
    ledger_by_key = {
        (row["api_key_id"], row["day"]): (row["n"], row["prompt"], row["completion"], row["cost"])
        for row in _by_local_day(UsageRecord.objects.filter(api_key__isnull=False), "api_key_id")
        .annotate(n=Count("id"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), cost=Sum("cost_usd"))
    }
    assert ledger_by_key == {
        (row.api_key_id, row.day): (row.requests, row.prompt_tokens, row.completion_tokens, row.cost_usd)
        for row in DailyKeyUsage.objects.all()
    }
    ledger_endings = {
        (row["user_id"], row["model"], row["day"]): (row["cancelled"], row["failed"])
        for row in _by_local_day(UsageRecord.objects.all(), "user_id", "model").annotate(
            cancelled=Count("id", filter=Q(status="cancelled")),
            failed=Count("id", filter=Q(status__in=["upstream_error", "timeout"])),
        )
    }
    assert ledger_endings == {
        (row.user_id, row.model, row.day): (row.cancelled_requests, row.failed_requests) for row in DailyUsage.objects.all()
    }


def _by_local_day(records, *fields):
    from django.db.models.functions import TruncDate

    from billing.periods import billing_zone

    return records.order_by().values(*fields, day=TruncDate("created_at", tzinfo=billing_zone()))


# --- The migration, on an SQLite database with a ledger ---------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _manage(database: Path, *args: str) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{database}", "BILLING_TIME_ZONE": "America/New_York"}
    subprocess.run([sys.executable, "manage.py", *args, "-v", "0"], cwd=ROOT, env=env, check=True, timeout=120)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="runs once, in the SQLite pass (it migrates its own SQLite file)")
def test_the_migration_fills_the_new_rollups_from_the_ledger(tmp_path: Path) -> None:
    database = tmp_path / "before.sqlite3"
    _manage(database, "migrate", "auth")
    _manage(database, "migrate", "llmgateway")
    _manage(database, "migrate", "billing", "0003")
    # (key, status, UTC instant, cost in 1e-10 USD): 03:00 UTC on 2 June is still 1 June in New York.
    calls = [
        (1, "completed", "2025-06-01 12:00:00", 10_000_000_000),
        (1, "cancelled", "2025-06-02 03:00:00", 5_000_000_000),
        (2, "timeout", "2025-06-02 12:00:00", 1),
        (None, "upstream_error", "2025-06-02 13:00:00", 7),
    ]
    with sqlite3.connect(database) as db:
        user = db.execute(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, is_staff, is_active,"
            " date_joined) VALUES ('', 0, 'old', '', '', '', 0, 1, '2025-01-01 00:00:00')"
        ).lastrowid
        for key in (1, 2):
            db.execute(
                "INSERT INTO llmgateway_apikey (id, user_id, name, prefix, key_hash, created_at) VALUES (?, ?, '', ?, ?, '2025-01-01')",
                (key, user, f"sk-gw-00000{key}", f"{key:064d}"),
            )
        rollups: dict[tuple[str, str], list[int]] = {}
        for key, status, at, cost in calls:
            db.execute(
                "INSERT INTO billing_usagerecord (request_id, user_id, api_key_id, model, upstream_model, provider, stream,"
                " status, error_kind, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, token_source,"
                " duration_us, created_at, cost_usd, input_usd_per_1m, cached_input_usd_per_1m, output_usd_per_1m,"
                " price_multiplier, price_source) VALUES (?, ?, ?, 'm', 'm', 'openai', 1, ?, '', 10, 5, 0, 0, 'upstream',"
                " 1, ?, ?, 1, 1, 1, 10000, 'catalog')",
                (uuid.uuid4().hex, user, key, status, at, cost),
            )
            day = "2025-06-01" if at < "2025-06-02 04:00:00" else "2025-06-02"
            rollups.setdefault(("m", day), [0, 0])
            rollups["m", day][0] += 1
            rollups["m", day][1] += cost
        for (model, day), (requests, cost) in rollups.items():
            db.execute(
                "INSERT INTO billing_dailyusage (user_id, model, day, requests, prompt_tokens, completion_tokens,"
                " cached_tokens, cost_usd) VALUES (?, ?, ?, ?, 0, 0, 0, ?)",
                (user, model, day, requests, cost),
            )

    _manage(database, "migrate", "billing")

    with sqlite3.connect(database) as db:
        assert db.execute(
            "SELECT day, requests, cancelled_requests, failed_requests FROM billing_dailyusage ORDER BY day"
        ).fetchall() == [("2025-06-01", 2, 1, 0), ("2025-06-02", 2, 0, 2)]
        assert db.execute(
            "SELECT api_key_id, day, requests, prompt_tokens, completion_tokens, cost_usd FROM billing_dailykeyusage"
            " ORDER BY api_key_id, day"
        ).fetchall() == [(1, "2025-06-01", 2, 20, 10, 15_000_000_000), (2, "2025-06-02", 1, 10, 5, 1)]
        # 0009: the rollups' rows from before endpoints were all chat completions.
        assert db.execute("SELECT DISTINCT endpoint FROM billing_dailyusage").fetchall() == [("chat.completions",)]
