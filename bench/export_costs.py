"""Benchmark `manage.py export_costs`: rows/s and peak memory of a raw export at N/10 and N rows.

    .venv/bin/python -m bench.export_costs [--rows 1000000] [--database-url postgres://...] [--keep]

What one run does:

1. Makes a fresh database: a SQLite file in a temporary directory by default; with
   `--database-url postgres://...`, a new database `<name>_export_bench_<pid>` on that server
   (dropped at the end unless `--keep`; the database named in the URL is never written).
2. Migrates it and fills the ledger in bulk (executemany on SQLite, COPY on PostgreSQL), not
   through `usage_record_create`: a million service calls would take most of an hour. Costs are
   still `billing.money.Rates.cost` of catalog rates, and the daily rollups are rebuilt from the
   ledger with one GROUP BY, so grouped exports are consistent too. Rows are spread over 90 days,
   100 users, 200 API keys and six models, deterministically (`--seed`).
3. At N/10 rows, then again after topping up to N rows, exports the raw ledger three ways:
   - the command in-process (`call_command`), timed: rows/s;
   - the same under `tracemalloc`: the peak of Python allocations during the export;
   - the command as its own process (`manage.py export_costs --output ...`), whose peak RSS is
     read from `wait4()`, next to the peak RSS of the same process exporting nothing: the
     difference is what the rows cost in memory, interpreter and Django excluded.
   The two files must be byte-identical (it says so).
4. Times two grouped exports at N (user x day from the rollups, API key from the ledger), prints
   a table and writes the figures to `bench/results/export_costs.json`.

Memory that does not grow with N is the claim under test: a server-side cursor (PostgreSQL) or
batched fetches (SQLite), a batch of rows and about 64 KiB of text at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START = datetime(2025, 4, 1, tzinfo=UTC)
SPAN = timedelta(days=90)
USERS = 100
KEYS = 200
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o4-mini")
FILL_BATCH = 50_000
MB = 1024 * 1024


@dataclass
class Measure:
    rows: int
    file_bytes: int
    seconds: float
    rows_per_second: float
    tracemalloc_peak_bytes: int
    rss_peak_bytes: int
    rss_empty_export_bytes: int
    rss_delta_bytes: int
    identical: bool


# --- The database ------------------------------------------------------------------------------


def fresh_database(url: str | None, directory: Path) -> tuple[str, str | None]:
    """(DATABASE_URL of a new, empty database, PostgreSQL database to drop at the end or None)."""
    if not url:
        return f"sqlite:///{directory / 'export-bench.sqlite3'}", None
    import psycopg

    parts = urlsplit(url)
    name = f"{parts.path.lstrip('/') or 'postgres'}_export_bench_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(parts._replace(path=f"/{name}")), name


def drop_database(url: str, name: str) -> None:
    import psycopg
    from django.db import connections

    for connection in connections.all():
        connection.close()
        close_pool = getattr(connection, "close_pool", None)
        if close_pool is not None:
            close_pool()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ["BILLING_TIME_ZONE"] = "UTC"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmgateway.settings")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


# --- Filling the ledger --------------------------------------------------------------------------


class Filler:
    """Appends deterministic ledger rows in bulk, in created_at order, `add(n)` at a time."""

    def __init__(self, rows_total: int, seed: int) -> None:
        from django.contrib.auth import get_user_model
        from django.db import connection

        from billing.models import UsageRecord
        from billing.selectors import price_in_effect
        from llmgateway.models import ApiKey, generate_api_key, hash_api_key

        self.connection = connection
        self.random = random.Random(seed)
        self.step = SPAN / rows_total
        self.written = 0
        user_model = get_user_model()
        user_model.objects.bulk_create([user_model(username=f"bench-user-{index:03d}") for index in range(USERS)])
        self.users = list(user_model.objects.order_by("pk").values_list("pk", flat=True))
        keys = []
        for index in range(KEYS):
            raw = generate_api_key()
            keys.append(ApiKey(user_id=self.users[index % USERS], name=f"key-{index}", prefix=raw[:12], key_hash=hash_api_key(raw)))
        ApiKey.objects.bulk_create(keys)
        self.keys: dict[int, list[int]] = {}
        for key_id, user_id in ApiKey.objects.order_by("pk").values_list("pk", "user_id"):
            self.keys.setdefault(user_id, []).append(key_id)
        self.rates = {}
        for model in MODELS:
            price = price_in_effect(model=model, at=START)
            assert price is not None, f"the default catalog has no price for {model}"
            self.rates[model] = price.rates()
        self.fields = [field for field in UsageRecord._meta.concrete_fields if not field.primary_key]
        self.table = UsageRecord._meta.db_table
        self.columns = [field.column for field in self.fields]

    def _row(self, index: int) -> dict[str, Any]:
        pick = self.random
        user_id = self.users[pick.randrange(USERS)]
        model = MODELS[pick.randrange(len(MODELS))]
        prompt = pick.randrange(20, 8000)
        cached = pick.randrange(0, prompt) if pick.random() < 0.3 else 0
        completion = pick.randrange(1, 2000)
        rates = self.rates[model]
        keys = self.keys.get(user_id, [])
        return {
            "request_id": uuid.UUID(int=pick.getrandbits(128), version=4),
            "user_id": user_id,
            "api_key_id": keys[index % len(keys)] if keys and index % 10 else None,
            "model": model,
            "upstream_model": model,
            "provider": "openai",
            "stream": index % 4 != 0,
            "status": "cancelled" if index % 50 == 0 else "completed",
            "error_kind": "",
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_tokens": cached,
            "reasoning_tokens": completion // 8 if model == "o4-mini" else 0,
            "token_source": "upstream",
            "ttft_us": pick.randrange(50_000, 900_000),
            "duration_us": pick.randrange(1_000_000, 30_000_000),
            "created_at": START + self.step * index,
            "cost_usd": rates.cost(prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion),
            "input_usd_per_1m": rates.input,
            "cached_input_usd_per_1m": rates.cached_input,
            "output_usd_per_1m": rates.output,
            "price_multiplier": rates.multiplier,
            "price_source": rates.source,
            "reserved_usd": None,
        }

    def _values(self, row: dict[str, Any]) -> list[Any]:
        if self.connection.vendor == "postgresql":
            return [row[field.attname] for field in self.fields]  # COPY adapts Python values itself
        # SQLite: the values Django itself would store (UUID hex, naive UTC text, money as the
        # scaled integer of billing.fields.ExactDecimalField).
        values = []
        for field in self.fields:
            value = row[field.attname]
            if isinstance(value, uuid.UUID):
                value = value.hex
            elif isinstance(value, datetime):
                value = value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
            elif isinstance(value, Decimal):
                value = field.get_db_prep_save(value, self.connection)
            elif isinstance(value, bool):
                value = int(value)
            values.append(value)
        return values

    def add(self, count: int) -> None:
        from django.db import transaction

        quote = self.connection.ops.quote_name
        columns = ", ".join(quote(column) for column in self.columns)
        end = self.written + count
        while self.written < end:
            batch = [self._values(self._row(index)) for index in range(self.written, min(end, self.written + FILL_BATCH))]
            with transaction.atomic(), self.connection.cursor() as cursor:
                if self.connection.vendor == "postgresql":
                    with cursor.cursor.copy(f"COPY {quote(self.table)} ({columns}) FROM STDIN") as copy:
                        for values in batch:
                            copy.write_row(values)
                else:
                    marks = ", ".join(["%s"] * len(self.columns))
                    cursor.executemany(f"INSERT INTO {quote(self.table)} ({columns}) VALUES ({marks})", batch)
            self.written += len(batch)
            print(f"\r  filled {self.written:,} rows", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)


def rebuild_rollups() -> int:
    """Replace the daily rollups with a GROUP BY of the ledger (UTC days)."""
    from django.db import transaction
    from django.db.models import Count, Sum
    from django.db.models.functions import TruncDate

    from billing.models import DailyUsage, UsageRecord

    with transaction.atomic():
        DailyUsage.objects.all().delete()
        groups = (
            UsageRecord.objects.order_by()
            .values("user_id", "model", day=TruncDate("created_at", tzinfo=UTC))
            .annotate(
                n=Count("id"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
                cached=Sum("cached_tokens"), cost=Sum("cost_usd"),
            )
        )
        rows = [
            DailyUsage(
                user_id=group["user_id"], model=group["model"], day=group["day"], requests=group["n"],
                prompt_tokens=group["prompt"], completion_tokens=group["completion"],
                cached_tokens=group["cached"], cost_usd=group["cost"],
            )
            for group in groups.iterator(chunk_size=5000)
        ]
        DailyUsage.objects.bulk_create(rows, batch_size=5000)
    return len(rows)


def analyze() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


# --- Measuring -------------------------------------------------------------------------------------


def export_in_process(path: Path, *args: str) -> float:
    from django.core.management import call_command

    started = time.perf_counter()
    call_command("export_costs", *args, "--output", str(path), "--no-progress", stdout=StringIO())
    return time.perf_counter() - started


def traced_peak(path: Path) -> int:
    tracemalloc.start()
    try:
        export_in_process(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Run in a fresh interpreter: the command, then the process's own peak RSS. Read from VmHWM, the
# high-water mark of the process's memory since exec: ru_maxrss would also count the memory the
# child shared with this (large) process before exec.
_CHILD = """
import os, sys, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmgateway.settings")
django.setup()
from django.core.management import call_command
call_command("export_costs", *sys.argv[1:])
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]) * 1024)
"""


def export_process_rss(path: Path, *args: str) -> int:
    """Peak RSS (bytes) of `export_costs ARGS --output PATH` run in a process of its own."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, *args, "--output", str(path), "--no-progress"],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, check=True,
    )
    return int(result.stdout.split()[-1])


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def measure(rows: int, directory: Path, *, trace: bool) -> Measure:
    in_process, own_process, empty = directory / "in-process.csv", directory / "own-process.csv", directory / "empty.csv"
    seconds = export_in_process(in_process)
    peak = traced_peak(directory / "traced.csv") if trace else 0
    rss = export_process_rss(own_process)
    rss_empty = export_process_rss(empty, "--since", "2100-01-01")
    identical = digest(in_process) == digest(own_process)
    size = in_process.stat().st_size
    for path in (in_process, own_process, empty, directory / "traced.csv"):
        path.unlink(missing_ok=True)
    return Measure(
        rows=rows, file_bytes=size, seconds=seconds, rows_per_second=rows / seconds,
        tracemalloc_peak_bytes=peak, rss_peak_bytes=rss, rss_empty_export_bytes=rss_empty,
        rss_delta_bytes=rss - rss_empty, identical=identical,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.export_costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="Ledger rows at the second measurement (the first is at a tenth).")
    parser.add_argument("--database-url", help="A PostgreSQL server to bench on (postgres://user@host:port/db); default a SQLite file.")
    parser.add_argument("--seed", type=int, default=2025, help="Seed of the generated ledger.")
    parser.add_argument("--no-tracemalloc", action="store_true", help="Skip the traced export (it runs about 3x slower).")
    parser.add_argument("--keep", action="store_true", help="Keep the database (its URL is printed).")
    options = parser.parse_args(argv)
    if options.rows < 10:
        parser.error("--rows must be at least 10")

    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-bench-") as temporary:
        directory = Path(temporary)
        database_url, created = fresh_database(options.database_url, directory)
        try:
            setup_django(database_url)
            from django.db import connection

            vendor = connection.vendor
            print(f"export_costs bench on {vendor} ({database_url}), {options.rows:,} rows", file=sys.stderr)
            filler = Filler(options.rows, options.seed)
            measures: list[Measure] = []
            fill_seconds = 0.0
            for target in (options.rows // 10, options.rows):
                started = time.perf_counter()
                filler.add(target - filler.written)
                fill_seconds += time.perf_counter() - started
                if vendor == "postgresql":
                    analyze()
                print(f"  exporting {target:,} rows", file=sys.stderr)
                measures.append(measure(target, directory, trace=not options.no_tracemalloc))
            started = time.perf_counter()
            rollup_rows = rebuild_rollups()
            rollup_seconds = time.perf_counter() - started
            grouped = {
                "user+day (rollups)": export_in_process(directory / "g1.csv", "--group-by", "user", "--group-by", "day", "--totals"),
                "key (ledger GROUP BY)": export_in_process(directory / "g2.csv", "--group-by", "key", "--totals"),
            }
            report(vendor, options, fill_seconds, rollup_rows, rollup_seconds, measures, grouped)
            (RESULTS / "export_costs.json").write_text(json.dumps({
                "database": vendor, "rows": options.rows, "fill_seconds": fill_seconds,
                "rollup_rows": rollup_rows, "rollup_seconds": rollup_seconds,
                "measures": [asdict(m) for m in measures], "grouped_seconds": grouped,
                "python": platform.python_version(), "machine": platform.machine(),
            }, indent=2) + "\n")
            if options.keep:
                print(f"kept: DATABASE_URL={database_url}", file=sys.stderr)
                if created is None:
                    kept = ROOT / "var" / "export-bench.sqlite3"
                    kept.parent.mkdir(exist_ok=True)
                    os.replace(directory / "export-bench.sqlite3", kept)
                    print(f"moved to {kept}", file=sys.stderr)
        finally:
            if created is not None and not options.keep:
                drop_database(options.database_url, created)
    return 0


def report(
    vendor: str, options: argparse.Namespace, fill_seconds: float, rollup_rows: int, rollup_seconds: float,
    measures: list[Measure], grouped: dict[str, float],
) -> None:
    print()
    print(f"export_costs, raw CSV, {vendor}, Python {platform.python_version()}")
    print(f"fill: {options.rows:,} ledger rows in {fill_seconds:.1f} s ({options.rows / fill_seconds:,.0f} rows/s, bulk); "
          f"rollups rebuilt: {rollup_rows:,} rows in {rollup_seconds:.1f} s")
    print(f"{'rows':>10} {'file MB':>9} {'export s':>9} {'rows/s':>9} {'py peak MB':>11} {'RSS peak MB':>12} "
          f"{'RSS empty MB':>13} {'RSS delta MB':>13} {'same bytes':>11}")
    for m in measures:
        print(f"{m.rows:>10,} {m.file_bytes / MB:>9.1f} {m.seconds:>9.2f} {m.rows_per_second:>9,.0f} "
              f"{m.tracemalloc_peak_bytes / MB:>11.2f} {m.rss_peak_bytes / MB:>12.1f} {m.rss_empty_export_bytes / MB:>13.1f} "
              f"{m.rss_delta_bytes / MB:>13.1f} {'yes' if m.identical else 'NO':>11}")
    small, large = measures
    if small.tracemalloc_peak_bytes:
        print(f"10x the rows: Python peak x{large.tracemalloc_peak_bytes / small.tracemalloc_peak_bytes:.2f}, "
              f"RSS delta {small.rss_delta_bytes / MB:+.1f} MB -> {large.rss_delta_bytes / MB:+.1f} MB")
    for name, seconds in grouped.items():
        print(f"grouped at {options.rows:,} rows: {name} in {seconds:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
