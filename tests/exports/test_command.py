"""`manage.py export_costs`: exact, deterministic, all-or-nothing, and precise about bad input."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db.models import Q

from billing import exports
from billing.models import UsageRecord
from billing.periods import billing_day

from .conftest import (
    CALLS,
    GROUP_COLUMNS,
    MONEY_COLUMNS,
    Ledger,
    database_sums,
    expected_groups,
    export,
    export_file,
    read_csv,
    read_json_rows,
    write_call,
)

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]
D = Decimal
ROOT = Path(__file__).resolve().parents[2]

GROUPINGS = [
    ("user",),
    ("model",),
    ("day",),
    ("month",),
    ("key",),
    ("user", "day"),
    ("day", "user"),
    ("model", "month"),
    ("user", "model", "day"),
    ("month", "key"),
    ("user", "model", "day", "month", "key"),
]
GROUPING_IDS = ["+".join(groups) for groups in GROUPINGS]


def group_args(groups: tuple[str, ...]) -> list[str]:
    return [arg for group in groups for arg in ("--group-by", group)]


# --- Raw ledger rows ----------------------------------------------------------------------------


def test_raw_rows_are_every_ledger_row_in_time_then_id_order_with_exact_values(ledger: Ledger) -> None:
    rows, _ = read_csv(export())

    records = list(UsageRecord.objects.select_related("user", "api_key").order_by("created_at", "id"))
    assert [row["id"] for row in rows] == [record.pk for record in records]
    assert len(rows) == CALLS
    tie = [row for row in rows if row["created_at"] == rows[6]["created_at"]]
    assert [row["id"] for row in tie] == sorted(row["id"] for row in tie) and len(tie) == 2
    for row, record in zip(rows, records, strict=True):
        assert row["request_id"] == str(record.request_id)
        assert row["created_at"] == record.created_at  # parses back to the same instant
        assert (row["user_id"], row["username"]) == (record.user_id, record.user.username)
        assert row["api_key_id"] == record.api_key_id
        assert row["api_key_prefix"] == (record.api_key.prefix if record.api_key else None)
        assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (
            record.prompt_tokens, record.cached_tokens, record.completion_tokens,
        )
        assert row["cost_usd"] == record.cost_usd
        assert (row["input_usd_per_1m"], row["cached_input_usd_per_1m"], row["output_usd_per_1m"]) == (
            record.input_usd_per_1m, record.cached_input_usd_per_1m, record.output_usd_per_1m,
        )
        assert (row["price_multiplier"], row["price_source"], row["status"]) == (
            record.price_multiplier, record.price_source, record.status,
        )
        assert row["stream"] is True and row["reserved_usd"] is None


RAW_COLUMNS = [
    "id", "request_id", "created_at", "user_id", "username", "api_key_id", "api_key_prefix", "model", "upstream_model",
    "provider", "stream", "status", "error_kind", "call_id", "attempt", "requested_model", "endpoint", "upstream_id",
    "token_source", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "ttft_us", "duration_us",
    "price_source", "input_usd_per_1m", "cached_input_usd_per_1m", "output_usd_per_1m", "price_multiplier", "cost_usd",
    "reserved_usd",
]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_raw_rows_have_the_documented_columns_in_order(ledger: Ledger, fmt: str) -> None:
    data = export("--format", fmt)
    if fmt == "csv":
        assert data.decode().splitlines()[0] == ",".join(RAW_COLUMNS)
    else:
        rows, _ = read_json_rows(data, fmt)
        assert list(rows[0]) == RAW_COLUMNS
    documented = " ".join((exports.__doc__ or "").split())  # the package docstring lists them
    assert ", ".join(RAW_COLUMNS) in documented


def test_raw_rows_say_which_endpoint_each_call_used_and_the_upstreams_id(ledger: Ledger) -> None:
    rows, _ = read_csv(export())
    records = UsageRecord.objects.order_by("created_at", "id")
    assert [(row["endpoint"], row["upstream_id"] or "") for row in rows] == list(records.values_list("endpoint", "upstream_id"))
    assert {row["endpoint"] for row in rows} == {"chat.completions", "responses"}
    assert rows[1]["upstream_id"] == "resp_0001" and rows[0]["upstream_id"] is None  # none given: an empty cell
    json_rows, _ = read_json_rows(export("--format", "jsonl"), "jsonl")
    assert (json_rows[1]["endpoint"], json_rows[1]["upstream_id"], json_rows[0]["upstream_id"]) == ("responses", "resp_0001", "")


def test_money_is_written_at_the_stored_precision_without_exponents(ledger: Ledger) -> None:
    # A free call costs 0: Decimal would print it as 0E-10.
    write_call(user=ledger.users["carol"], api_key_id=None, model="gpt-4o-mini", at=datetime(2025, 8, 1, tzinfo=UTC), prompt=0, cached=0, completion=0)
    data = export("--since", "2025-08-01", "--totals").decode()
    header, row, total = data.splitlines()
    cells = dict(zip(header.split(","), row.split(","), strict=True))
    assert cells["cost_usd"] == "0.0000000000"
    assert cells["input_usd_per_1m"] == "0.150000" and cells["price_multiplier"] == "1.0000"
    assert total.split(",")[-2] == "0.0000000000"

    fixed_point = re.compile(r"^\d+\.\d+$")
    *rows, total_row = csv.DictReader(io.StringIO(export("--totals").decode()))
    for row in rows:
        assert all(fixed_point.match(row[name]) for name in MONEY_COLUMNS - {"reserved_usd"}), row
    assert fixed_point.match(total_row["cost_usd"])
    rows, totals = read_json_rows(export("--group-by", "day", "--format", "json", "--totals"), "json")
    assert all(fixed_point.match(row["cost_usd"]) for row in [*rows, totals])


def test_the_plan_multiplier_and_overrides_are_in_the_rate_snapshots(ledger: Ledger) -> None:
    rows, _ = read_csv(export("--user", "bob", "--model", "gpt-4o"))
    assert {(row["input_usd_per_1m"], row["price_source"], row["price_multiplier"]) for row in rows} == {
        (D("1.234567"), "account", D("1")),
    }
    rows, _ = read_csv(export("--user", "alice", "--model", "gpt-4o-mini"))
    assert {(row["input_usd_per_1m"], row["price_multiplier"]) for row in rows} == {(D("0.15"), D("1.2"))}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--totals"],
        ["--group-by", "user", "--group-by", "day", "--totals"],
        ["--group-by", "key", "--group-by", "month", "--since", "2025-06-03T10:30"],
    ],
    ids=["raw", "raw-totals", "user+day-totals", "key+month-from-10:30"],
)
def test_re_runs_write_byte_identical_output(ledger: Ledger, tmp_path: Path, fmt: str, args: list[str]) -> None:
    first = export_file(tmp_path, *args, "--format", fmt, name="first")
    assert first == export_file(tmp_path, *args, "--format", fmt, name="second")
    assert first == export(*args, "--format", fmt)  # a file and stdout hold the same bytes


# --- Groupings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata"])
@pytest.mark.parametrize("groups", GROUPINGS, ids=GROUPING_IDS)
def test_each_grouping_holds_the_ledgers_exact_sums_by_local_day(ledger: Ledger, groups: tuple[str, ...], zone: str) -> None:
    rows, totals = read_csv(export(*group_args(groups), "--totals"), totals=True)

    records = UsageRecord.objects.select_related("user", "api_key")
    assert rows == expected_groups(records, groups)
    sums = database_sums(UsageRecord.objects.all())
    summed = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd")
    assert {name: totals[name] for name in summed} == {name: sums[name] for name in summed}
    group_cells = [name for group in groups for name in GROUP_COLUMNS[group]][1:]  # the first holds "total"
    assert all(totals[name] is None for name in group_cells)


@pytest.mark.parametrize("groups", [g for g in GROUPINGS if "key" not in g], ids=[i for i in GROUPING_IDS if "key" not in i])
@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
def test_rollups_and_the_ledger_give_the_same_bytes(ledger: Ledger, groups: tuple[str, ...], zone: str) -> None:
    spec = exports.export_spec_parse(group_by=groups, since="2025-06-01", until="2025-07-01")
    assert spec.source == "rollups"
    for fmt in ("csv", "jsonl", "json"):
        args = [*group_args(groups), "--format", fmt, "--totals", "--since", "2025-06-01", "--until", "2025-07-01"]
        assert export(*args) == export(*args, "--from-ledger")


@pytest.mark.parametrize(
    ("group_by", "since", "until", "from_ledger", "source"),
    [
        ((), None, None, False, "ledger rows"),
        (("user", "day"), None, None, False, "rollups"),
        (("month",), "2025-06-01", "2025-07-01", False, "rollups"),
        (("day",), "2025-06-01T00:00:00+00:00", None, False, "rollups"),
        (("day",), "2025-06-01T00:00:00-04:00", None, False, "ledger"),
        (("day",), "2025-06-01T10:30", None, False, "ledger"),
        (("model",), None, "2025-06-30T23:59:59", False, "ledger"),
        (("key",), None, None, False, "ledger"),
        (("user", "key"), "2025-06-01", None, False, "ledger"),
        (("user",), None, None, True, "ledger"),
    ],
    ids=[
        "raw", "no-bounds", "whole-days", "utc-midnight", "other-midnight", "mid-day-since",
        "mid-day-until", "key", "key-and-user", "from-ledger",
    ],
)
def test_grouped_exports_use_the_rollups_only_for_whole_days_without_keys(group_by, since, until, from_ledger, source) -> None:
    spec = exports.export_spec_parse(group_by=group_by, since=since, until=until, from_ledger=from_ledger)
    assert spec.source == source


@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
@pytest.mark.parametrize(
    ("groups", "since", "until"),
    [
        (("day",), "2025-06-03T10:30", "2025-06-20T18:00"),
        (("user", "month"), "2025-05-31T12:00:00Z", "2025-07-01T06:00:00+02:00"),
        (("key",), "2025-06-10", "2025-06-12"),
    ],
    ids=["day-within-days", "user+month-offsets", "key-whole-days"],
)
def test_bounds_inside_a_day_aggregate_the_ledger_exactly(ledger: Ledger, groups, since: str, until: str, zone: str) -> None:
    spec = exports.export_spec_parse(since=since, until=until)
    rows, totals = read_csv(export(*group_args(groups), "--since", since, "--until", until, "--totals"), totals=True)

    records = UsageRecord.objects.select_related("user", "api_key").filter(created_at__gte=spec.since, created_at__lt=spec.until)
    assert rows == expected_groups(records, groups)
    assert totals["cost_usd"] == database_sums(records)["cost_usd"]


# --- Filters and totals ---------------------------------------------------------------------------


FILTERS = [
    ([], Q()),
    (["--since", "2025-06-10"], Q(created_at__gte=datetime(2025, 6, 10, tzinfo=UTC))),
    (["--until", "2025-06-10"], Q(created_at__lt=datetime(2025, 6, 10, tzinfo=UTC))),
    (
        ["--since", "2025-06-01", "--until", "2025-07-01"],
        Q(created_at__gte=datetime(2025, 6, 1, tzinfo=UTC), created_at__lt=datetime(2025, 7, 1, tzinfo=UTC)),
    ),
    (["--user", "alice"], Q(user__username="alice")),
    (["--user", "alice", "--user", "carol"], Q(user__username__in=["alice", "carol"])),
    (["--model", "gpt-4o", "--model", "gpt-4.1-nano"], Q(model__in=["gpt-4o", "gpt-4.1-nano"])),
    (
        ["--user", "bob", "--model", "gpt-4o", "--since", "2025-06-05T06:00:00+00:00", "--until", "2025-06-25T06:00"],
        Q(user__username="bob", model="gpt-4o", created_at__gte=datetime(2025, 6, 5, 6, tzinfo=UTC), created_at__lt=datetime(2025, 6, 25, 6, tzinfo=UTC)),
    ),
    (["--model", "gpt-4.1"], Q(model="gpt-4.1")),  # priced but never used: empty, not an error
]
FILTER_IDS = ["none", "since", "until", "june", "one-user", "two-users", "two-models", "everything", "unused-model"]


@pytest.mark.parametrize("groups", [(), ("user",), ("day", "model"), ("month", "key")], ids=["raw", "user", "day+model", "month+key"])
@pytest.mark.parametrize(("args", "where"), FILTERS, ids=FILTER_IDS)
def test_totals_equal_the_database_sum_for_the_same_filters(ledger: Ledger, args: list[str], where: Q, groups) -> None:
    rows, totals = read_csv(export(*args, *group_args(groups), "--totals"), totals=True)

    sums = database_sums(UsageRecord.objects.filter(where))
    assert totals["cost_usd"] == (sums["cost_usd"] or 0)
    assert totals["prompt_tokens"] == (sums["prompt_tokens"] or 0)
    assert totals["completion_tokens"] == (sums["completion_tokens"] or 0)
    assert totals["cached_tokens"] == (sums["cached_tokens"] or 0)
    if groups:
        assert totals["requests"] == sums["requests"]
        assert sum(row["requests"] for row in rows) == sums["requests"]
    else:
        assert len(rows) == sums["requests"]
        assert totals["reasoning_tokens"] == (sums["reasoning_tokens"] or 0)
    # A spreadsheet's SUM of the column is the totals row, to the last stored digit.
    assert sum((row["cost_usd"] for row in rows), D(0)) == totals["cost_usd"]


@pytest.mark.parametrize("zone", ["America/New_York"])
def test_ranges_are_half_open_in_the_billing_time_zone(ledger: Ledger, zone: str) -> None:
    at = datetime(2025, 6, 10, 4, tzinfo=UTC)  # midnight in New York
    before = write_call(user=ledger.users["carol"], api_key_id=None, model="gpt-4o", at=at.replace(microsecond=999_999, second=59, minute=59, hour=3), prompt=1, cached=0, completion=1)
    exactly = write_call(user=ledger.users["carol"], api_key_id=None, model="gpt-4o", at=at, prompt=1, cached=0, completion=1)

    def ids(*args: str) -> set[int]:
        return {row["id"] for row in read_csv(export("--model", "gpt-4o", "--user", "carol", *args))[0]}

    assert exactly.pk in ids("--since", "2025-06-10") and before.pk not in ids("--since", "2025-06-10")
    assert before.pk in ids("--until", "2025-06-10") and exactly.pk not in ids("--until", "2025-06-10")
    assert exactly.pk in ids("--since", "2025-06-10T00:00:00") and exactly.pk not in ids("--since", "2025-06-10T00:00:00.000001")
    assert before.pk in ids("--since", "2025-06-10T03:59:59.999999Z")


@pytest.mark.parametrize("zone", ["America/New_York"])
def test_timestamps_and_days_are_written_in_the_billing_time_zone(ledger: Ledger, zone: str) -> None:
    rows, _ = read_csv(export())
    first = rows[0]
    assert first["created_at"] == datetime(2025, 5, 30, 20, tzinfo=UTC)
    assert export().decode().splitlines()[1].split(",")[2] == "2025-05-30T16:00:00.000000-04:00"
    days, _ = read_csv(export("--group-by", "day"))
    assert days[0]["day"] == billing_day(first["created_at"]) == date(2025, 5, 30)


# --- Formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("groups", [(), ("user", "month"), ("key",)], ids=["raw", "user+month", "key"])
def test_json_formats_parse_and_hold_money_as_strings(ledger: Ledger, fmt: str, groups) -> None:
    data = export(*group_args(groups), "--format", fmt, "--totals")
    rows, totals = read_json_rows(data, fmt)
    csv_rows, csv_totals = read_csv(export(*group_args(groups), "--totals"), totals=True)

    assert len(rows) == len(csv_rows) > 0
    for row, csv_row in zip(rows, csv_rows, strict=True):
        assert isinstance(row["cost_usd"], str)
        assert D(row["cost_usd"]) == csv_row["cost_usd"]
        assert list(row) == list(csv_row)
        assert all(not isinstance(value, float) for value in row.values())
    assert isinstance(totals["cost_usd"], str) and D(totals["cost_usd"]) == csv_totals["cost_usd"]
    if not groups:
        assert rows[0]["stream"] is True and rows[0]["reserved_usd"] is None and isinstance(rows[0]["id"], int)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_an_empty_export_is_still_well_formed(ledger: Ledger, fmt: str) -> None:
    data = export("--since", "2030-01-01", "--format", fmt, "--totals")
    if fmt == "csv":
        rows, totals = read_csv(data, totals=True)
        assert rows == [] and totals["cost_usd"] == D("0") and data.decode().splitlines()[-1].endswith(",0.0000000000,")
    else:
        rows, totals = read_json_rows(data, fmt)
        assert rows == [] and totals["cost_usd"] == "0.0000000000"


def test_csv_is_rfc_4180_and_quotes_what_needs_it(ledger: Ledger) -> None:
    ledger.users["carol"].username = 'carol, "the" auditor'
    ledger.users["carol"].save()
    data = export("--group-by", "user")
    assert data.endswith(b"\r\n") and b'"carol, ""the"" auditor"' in data
    rows, _ = read_csv(data)
    assert rows[-1]["username"] == 'carol, "the" auditor'


# --- Bad arguments ---------------------------------------------------------------------------------


BAD_ARGUMENTS = [
    (["--since", "2025-13-01"], "--since: expected a date (YYYY-MM-DD) or an ISO 8601 datetime, got '2025-13-01'.", "UTC"),
    (["--since", "yesterday"], "--since: expected a date (YYYY-MM-DD) or an ISO 8601 datetime, got 'yesterday'.", "UTC"),
    (["--until", "2025-06-31"], "--until: expected a date (YYYY-MM-DD) or an ISO 8601 datetime, got '2025-06-31'.", "UTC"),
    (["--until", "2025-06-01T25:00"], "--until: expected a date (YYYY-MM-DD) or an ISO 8601 datetime, got '2025-06-01T25:00'.", "UTC"),
    (
        ["--since", "2025-07-01", "--until", "2025-06-01"],
        "--since: must be before until (2025-06-01T00:00:00+00:00), got 2025-07-01T00:00:00+00:00.",
        "UTC",
    ),
    (
        ["--since", "2025-06-01", "--until", "2025-06-01T00:00:00Z"],
        "--since: must be before until (2025-06-01T00:00:00+00:00), got 2025-06-01T00:00:00+00:00.",
        "UTC",
    ),
    (
        ["--since", "2025-03-09T02:30"],
        "--since: '2025-03-09T02:30' does not exist in America/New_York (skipped by a clock change); give a UTC offset.",
        "America/New_York",
    ),
    (
        ["--until", "2025-11-02T01:30"],
        "--until: '2025-11-02T01:30' happens twice in America/New_York (a clock change); give a UTC offset.",
        "America/New_York",
    ),
    (["--user", "mallory"], "--user: no user named 'mallory'.", "UTC"),
    (["--user", "alice", "--user", "mallory"], "--user: no user named 'mallory'.", "UTC"),
    (["--model", "gpt-9"], "--model: no usage or price for a model named 'gpt-9'.", "UTC"),
    (["--group-by", "week"], "--group-by: unknown grouping 'week' (expected none, or any of user, model, day, month, key).", "UTC"),
    (["--group-by", "none", "--group-by", "day"], "--group-by: 'none' (raw ledger rows) cannot be combined with day.", "UTC"),
    (["--format", "xml"], "--format: unknown format 'xml' (expected csv, jsonl or json).", "UTC"),
    (["--format", "CSV"], "--format: unknown format 'CSV' (expected csv, jsonl or json).", "UTC"),
    (["--output", "{tmp}/missing/out.csv"], "--output: directory {tmp}/missing does not exist.", "UTC"),
    (["--output", "{tmp}"], "--output: {tmp} is a directory.", "UTC"),
]
BAD_IDS = [
    "since-bad-month", "since-words", "until-bad-day", "until-bad-hour", "since-after-until", "since-equals-until",
    "since-in-dst-gap", "until-in-dst-overlap", "unknown-user", "one-unknown-user", "unknown-model", "unknown-group",
    "none-with-group", "unknown-format", "format-case", "output-directory-missing", "output-is-directory",
]


@pytest.mark.parametrize(("args", "message", "zone"), BAD_ARGUMENTS, ids=BAD_IDS)
def test_bad_arguments_fail_naming_the_argument_and_write_nothing(ledger: Ledger, tmp_path: Path, args, message, zone) -> None:
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    output = [] if "--output" in args else ["--output", str(tmp_path / "out.csv")]
    with pytest.raises(CommandError) as raised:
        call_command("export_costs", *args, *output, stdout=io.StringIO())
    assert str(raised.value) == message.replace("{tmp}", str(tmp_path))
    assert "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_argument_leaves_an_existing_output_file_as_it_was(ledger: Ledger, tmp_path: Path) -> None:
    path = tmp_path / "costs.csv"
    path.write_bytes(b"last month's export\n")
    with pytest.raises(CommandError):
        call_command("export_costs", "--user", "mallory", "--output", str(path))
    assert path.read_bytes() == b"last month's export\n"
    assert list(tmp_path.iterdir()) == [path]


def test_a_failure_midway_leaves_no_file_and_no_temporary(ledger: Ledger, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "costs.csv"
    path.write_bytes(b"last month's export\n")
    monkeypatch.setattr(exports, "FLUSH_CHARS", 1000)  # many chunks are written before the failure

    def fail(self, totals):
        raise RuntimeError("database went away")

    monkeypatch.setattr("billing.exports._formats.CsvWriter.footer", fail)
    with pytest.raises(RuntimeError, match="database went away"):
        call_command("export_costs", "--output", str(path), "--no-progress")
    assert path.read_bytes() == b"last month's export\n"
    assert list(tmp_path.iterdir()) == [path]


def test_a_new_file_gets_the_usual_permissions_and_an_existing_one_keeps_its_own(ledger: Ledger, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.csv"
        call_command("export_costs", "--output", str(fresh), "--no-progress")
        assert fresh.stat().st_mode & 0o777 == 0o644
        private = tmp_path / "private.csv"
        private.write_bytes(b"")
        private.chmod(0o600)
        call_command("export_costs", "--output", str(private), "--no-progress")
        assert private.stat().st_mode & 0o777 == 0o600 and private.read_bytes() == fresh.read_bytes()
    finally:
        os.umask(umask)


def test_from_a_shell_a_bad_argument_is_one_line_on_stderr_and_exit_status_1(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'unused.sqlite3'}"}
    result = subprocess.run(
        [sys.executable, "manage.py", "export_costs", "--since", "2025-02-30", "--output", str(tmp_path / "out.csv")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "CommandError: --since: expected a date (YYYY-MM-DD) or an ISO 8601 datetime, got '2025-02-30'.\n"
    assert not (tmp_path / "out.csv").exists()


# --- Progress -----------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stderr", "args", "shown"),
    [(Terminal, [], True), (Terminal, ["--no-progress"], False), (io.StringIO, [], False)],
    ids=["terminal", "terminal-no-progress", "not-a-terminal"],
)
def test_a_progress_bar_goes_to_a_terminals_stderr_only(ledger: Ledger, tmp_path: Path, stderr, args, shown: bool) -> None:
    err, out = stderr(), io.StringIO()
    call_command("export_costs", "--output", str(tmp_path / "out.csv"), *args, stdout=out, stderr=err)
    assert out.getvalue() == ""
    if shown:
        assert err.getvalue().startswith("\rexporting ")
        assert err.getvalue().endswith(f"\rexporting 100%  {CALLS} / {CALLS} rows\n")
        assert "\x1b[" not in err.getvalue()  # not coloured as an error
    else:
        assert err.getvalue() == ""
    assert (tmp_path / "out.csv").read_bytes() == export()


def test_stdout_carries_only_the_export_even_with_a_progress_bar(ledger: Ledger) -> None:
    err, out = Terminal(), io.StringIO()
    call_command("export_costs", "--group-by", "user", stdout=out, stderr=err)
    assert out.getvalue().encode() == export("--group-by", "user")
    assert "exporting 100%  3 / 3 rows" in err.getvalue()
