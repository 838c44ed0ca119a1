"""CSV exports never hand a spreadsheet a formula: text that starts like one gets a leading `'`
(OWASP, "CSV Injection"), in the command's files and in the admin's downloads alike, while
numbers stay numbers and JSON keeps the values as they are."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from billing.models import UsageRecord

from .conftest import START, export, write_call

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]

# username as stored -> as a CSV cell
HOSTILE = {
    "=1+2": "'=1+2",
    "-2+3": "'-2+3",
    "@SUM(A1)": "'@SUM(A1)",
    "+cmd|' /C calc'!A0": "'+cmd|' /C calc'!A0",
    "\tTAB": "'\tTAB",
    "\rCR": "'\rCR",
    "a=b": "a=b",  # only a leading formula character makes a formula
    "plain": "plain",
}


@pytest.fixture
def hostile_ledger() -> dict[str, UsageRecord]:
    user_model = get_user_model()
    records = {}
    for index, username in enumerate(HOSTILE):
        user = user_model.objects.create(username=username)
        records[username] = write_call(
            user=user, api_key_id=None, model="gpt-4o-mini", at=START + timedelta(minutes=index),
            prompt=1000 + index, cached=0, completion=50 + index,
        )  # fmt: skip
    return records


def csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode(), newline="")))


def assert_escaped_with_numbers_intact(rows: list[dict[str, str]], records: dict[str, UsageRecord], *, raw: bool) -> None:
    by_cell = {row["username"]: row for row in rows}
    assert set(by_cell) == set(HOSTILE.values())
    for username, cell in HOSTILE.items():
        row, record = by_cell[cell], records[username]
        assert row["user_id"] == str(record.user_id)
        assert row["prompt_tokens"] == str(record.prompt_tokens)
        assert row["cost_usd"] == format(record.cost_usd, "f") and Decimal(row["cost_usd"]) > 0
        if raw:
            assert row["output_usd_per_1m"] == format(record.output_usd_per_1m, "f")


def test_the_command_escapes_formula_usernames_in_raw_rows(hostile_ledger) -> None:
    rows = csv_rows(export("--format", "csv"))
    assert_escaped_with_numbers_intact(rows, hostile_ledger, raw=True)


def test_the_command_escapes_them_in_groups_and_leaves_the_totals_row_numeric(hostile_ledger) -> None:
    rows = csv_rows(export("--format", "csv", "--group-by", "user", "--totals"))
    totals = rows.pop()
    assert_escaped_with_numbers_intact(rows, hostile_ledger, raw=False)
    assert totals["user_id"] == "total"
    assert totals["prompt_tokens"] == str(sum(record.prompt_tokens for record in hostile_ledger.values()))


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_exports_keep_the_usernames_as_they_are(hostile_ledger, fmt: str) -> None:
    data = export("--format", fmt)
    rows = json.loads(data)["rows"] if fmt == "json" else [json.loads(line) for line in data.decode().splitlines()]
    assert {row["username"] for row in rows} == set(HOSTILE)


def test_the_admin_action_and_download_escape_them_too(admin_client, hostile_ledger) -> None:
    selected = [str(record.pk) for record in hostile_ledger.values()]
    action = admin_client.post(
        reverse("admin:billing_usagerecord_changelist"), {"action": "export_csv", "_selected_action": selected}
    )
    download = admin_client.get(reverse("admin:billing_usagerecord_export") + "?format=csv&group_by=user")

    action_rows = csv_rows(body(action))
    assert_escaped_with_numbers_intact(action_rows, hostile_ledger, raw=True)
    assert_escaped_with_numbers_intact(csv_rows(body(download)), hostile_ledger, raw=False)
    # The admin's user (who has no usage) is not in the selection: only the hostile ledger is.
    assert len(action_rows) == len(HOSTILE)


def body(response: Any) -> bytes:
    assert response.status_code == 200
    return b"".join(response.streaming_content)
