"""A small ledger written through the real service, and ways to export it and to read it back.

Three users on three pricing rules (alice: a plan at 1.2 x list; bob: an account override with
six-place rates; carol: list prices), API keys for two of them, calls every 7 h 43 min from the
evening of 30 May to early July (so days and months turn in every time zone the tests use), two
calls at the very same instant, a few cancelled and estimated ones, and a quarter made through the
Responses API (so the rollups hold rows of two endpoints), most with the upstream's id. The billing time zone is
set before any row is written, since the rollups are keyed by local day when a row is written:
parametrize `zone` to change it.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db.models import Count, Sum

from billing.models import AccountPrice, PricingPlan, UsageRecord
from billing.money import Rates, money_sum
from billing.periods import billing_day
from billing.selectors import rates_for
from billing.services import account_get_or_create, account_quota_set, usage_record_create
from llmgateway.services import api_key_create

START = datetime(2025, 5, 30, 20, 0, tzinfo=UTC)
STEP = timedelta(hours=7, minutes=43)
CALLS = 100  # 100 x 7 h 43 min: to 1 July
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-nano")
MONEY_COLUMNS = {"cost_usd", "input_usd_per_1m", "cached_input_usd_per_1m", "output_usd_per_1m", "price_multiplier", "reserved_usd"}
INT_COLUMNS = {
    "id", "user_id", "api_key_id", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens",
    "ttft_us", "duration_us", "requests",
}


@pytest.fixture
def zone() -> str:
    return "UTC"


@dataclass(frozen=True)
class Ledger:
    users: dict[str, Any]
    keys: dict[str, Any]  # by name: alice-1, alice-2, bob-1


@pytest.fixture
def ledger(db: None, settings: Any, zone: str) -> Ledger:
    settings.BILLING_TIME_ZONE = zone
    user_model = get_user_model()
    users = {name: user_model.objects.create(username=name) for name in ("alice", "bob", "carol")}
    keys = {
        name: api_key_create(username=name.split("-")[0], name=name)[0]
        for name in ("alice-1", "alice-2", "bob-1")
    }
    account_quota_set(user_id=users["alice"].pk, plan=PricingPlan.objects.create(name="gold", multiplier=Decimal("1.2")))
    AccountPrice.objects.create(
        account=account_get_or_create(user_id=users["bob"].pk),
        model="gpt-4o",
        input_usd_per_1m=Decimal("1.234567"),
        cached_input_usd_per_1m=Decimal("0.333333"),
        output_usd_per_1m=Decimal("7.777777"),
    )
    key_for = {"alice": [keys["alice-1"].pk, keys["alice-2"].pk, None], "bob": [keys["bob-1"].pk], "carol": [None]}
    names = ("alice", "bob", "carol")
    # The prices do not change over the ledger's weeks: price each user's models once.
    rates = {(name, model): price(users[name], model, START) for name in names for model in MODELS}
    for index in range(CALLS):
        name, turn = names[index % 3], index // 3
        at = START + index * STEP
        if index == 7:
            at = START + 6 * STEP  # the same instant as call 6: the tie is broken by id
        write_call(
            user=users[name],
            api_key_id=key_for[name][turn % len(key_for[name])],
            model=MODELS[turn % len(MODELS)],
            at=at,
            prompt=1000 + 37 * index,
            cached=(index * 53) % 900,
            completion=17 * index + (index % 5) * 101,
            status="cancelled" if index % 11 == 0 else "completed",
            token_source="estimated" if index % 13 == 0 else "upstream",
            rates=rates[name, MODELS[turn % len(MODELS)]],
            endpoint="responses" if index % 4 == 1 else "chat.completions",
            upstream_id="" if index % 9 == 0 else f"{'resp_' if index % 4 == 1 else 'chatcmpl-'}{index:04}",
        )
    return Ledger(users=users, keys=keys)


def price(user: Any, model: str, at: datetime) -> Rates:
    rates = rates_for(account=account_get_or_create(user_id=user.pk), model=model, at=at)
    assert rates is not None, f"no price for {model}"
    return rates


def write_call(
    *, user: Any, api_key_id: int | None, model: str, at: datetime, prompt: int, cached: int, completion: int,
    status: str = "completed", token_source: str = "upstream", rates: Rates | None = None,
    endpoint: str = "chat.completions", upstream_id: str = "",
) -> UsageRecord:
    """One ledger row, priced (`rates_for`) and rolled up by the service, as the gateway writes it."""
    rates = rates or price(user, model, at)
    return usage_record_create(
        request_id=uuid.uuid4(),
        user_id=user.pk,
        api_key_id=api_key_id,
        model=model,
        upstream_model=model,
        provider="openai",
        stream=True,
        status=status,
        error_kind="",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        reasoning_tokens=completion // 10,
        token_source=token_source,
        ttft_us=1000 + prompt,
        duration_us=20_000 + completion,
        created_at=at,
        rates=rates,
        endpoint=endpoint,
        upstream_id=upstream_id,
    )


# --- Running the command ---------------------------------------------------------------------


def export(*args: str) -> bytes:
    """`manage.py export_costs ARGS` to stdout, as the bytes a shell redirect would hold."""
    out = io.StringIO()
    call_command("export_costs", *args, "--no-progress", stdout=out)
    return out.getvalue().encode()


def export_file(tmp_path: Path, *args: str, name: str = "out") -> bytes:
    """`manage.py export_costs ARGS --output FILE`; the file's bytes."""
    path = tmp_path / name
    call_command("export_costs", *args, "--output", str(path), "--no-progress", stdout=io.StringIO())
    return path.read_bytes()


# --- Reading exports back, as a spreadsheet or a loader would ---------------------------------


def typed(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row with its cells parsed: ints, Decimals (never float), dates, datetimes, months."""
    parsed: dict[str, Any] = {}
    for name, cell in row.items():
        if cell in ("", None):
            parsed[name] = None
        elif name in MONEY_COLUMNS:
            parsed[name] = Decimal(cell)
        elif name in INT_COLUMNS:
            parsed[name] = int(cell)
        elif name == "created_at":
            parsed[name] = datetime.fromisoformat(cell)
        elif name == "day":
            parsed[name] = date.fromisoformat(cell)
        elif name == "month":
            parsed[name] = datetime.strptime(cell, "%Y-%m").date()
        elif name == "stream":
            parsed[name] = {"true": True, "false": False}[cell]
        else:
            parsed[name] = cell
    return parsed


def read_csv(data: bytes, *, totals: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
    total_row = None
    if totals:
        total_row = rows.pop()
        first = next(iter(total_row))
        assert total_row[first] == "total"
        total_row = typed({name: cell for name, cell in total_row.items() if name != first})
    return [typed(row) for row in rows], total_row


def read_json_rows(data: bytes, fmt: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Rows and totals of a JSON or JSON Lines export, parsed with the standard library."""
    if fmt == "json":
        document = json.loads(data)
        return document["rows"], document.get("totals")
    lines = [json.loads(line) for line in data.decode().splitlines()]
    if lines and set(lines[-1]) == {"totals"}:
        return lines[:-1], lines[-1]["totals"]
    return lines, None


# --- What an export should hold, computed in Python from the ledger's rows ----------------------

GROUP_KEYS: dict[str, Callable[[UsageRecord], tuple[Any, ...]]] = {
    "user": lambda record: (record.user_id, record.user.username),
    "model": lambda record: (record.model,),
    "day": lambda record: (billing_day(record.created_at),),
    "month": lambda record: (billing_day(record.created_at).replace(day=1),),
    "key": lambda record: (record.api_key_id, record.api_key.prefix if record.api_key else None),
}
GROUP_COLUMNS = {
    "user": ("user_id", "username"),
    "model": ("model",),
    "day": ("day",),
    "month": ("month",),
    "key": ("api_key_id", "api_key_prefix"),
}


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, 0) if value is None else (1, value)  # NULL first, as the export orders it


def expected_groups(records: Iterable[UsageRecord], groups: Sequence[str]) -> list[dict[str, Any]]:
    """The grouped rows an export of `records` must hold, in order, summed exactly in Python."""
    sums: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, 0, 0, []])
    for record in records:
        key = tuple(value for group in groups for value in GROUP_KEYS[group](record))
        entry = sums[key]
        entry[0] += 1
        entry[1] += record.prompt_tokens
        entry[2] += record.cached_tokens
        entry[3] += record.completion_tokens
        entry[4].append(record.cost_usd)
    names = [name for group in groups for name in GROUP_COLUMNS[group]]
    # Order by each group's first column (user by id, key by id), as the export does.
    order = [index for index, name in enumerate(names) if name in ("user_id", "model", "day", "month", "api_key_id")]
    rows = []
    for key in sorted(sums, key=lambda key: [_sort_key(key[index]) for index in order]):
        requests, prompt, cached, completion, costs = sums[key]
        rows.append({
            **dict(zip(names, key, strict=True)),
            "requests": requests,
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "completion_tokens": completion,
            "cost_usd": money_sum(costs),
        })
    return rows


def database_sums(records: Any) -> dict[str, Any]:
    """The database's own `SUM()` over `records` (a queryset)."""
    return records.aggregate(
        requests=Count("id"),
        prompt_tokens=Sum("prompt_tokens"),
        cached_tokens=Sum("cached_tokens"),
        completion_tokens=Sum("completion_tokens"),
        reasoning_tokens=Sum("reasoning_tokens"),
        cost_usd=Sum("cost_usd"),
    )
