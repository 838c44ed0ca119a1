"""Benchmark the cost console and every admin list on a 1,000,000-row ledger in PostgreSQL.

    .venv/bin/python -m bench.admin_pages [--postgres postgres://postgres@127.0.0.1:5432/postgres]
                                          [--rows 1000000] [--runs 7] [--keep | --reuse NAME]
    scripts/bench --phases admin          # the same, as a phase of the benchmark run

Issue 11's acceptance: the console and every admin list answer in under 300 ms of server time.

What one run does:

1. Creates a database `llmgateway_admin_bench_<pid>` on the `--postgres` server (the database in
   the URL is never written), migrates it (which loads the default price catalog and the "Cost
   viewers" group) and fills it with SQL on the server (`generate_series`, `INSERT ... SELECT`):
   `--users` users with an account each (some on a plan, some with budgets, some suspended),
   `--keys` API keys (some revoked or expired), a few hundred holds (most of them live), and
   `--rows` ledger rows over the last `--days` days up to now, in time order as the gateway
   appends them: users and keys skewed (a few spend most), models of the catalog at its prices
   times the account's plan multiplier, 90 % completed, 5 % cancelled, 4 % upstream errors and
   timeouts with their `error_kind`, 1 % rejected, a tenth of the calls without a key (the chat
   page). The rollups (`DailyUsage`, `DailyKeyUsage`) are one `GROUP BY` of the ledger by local
   day in `BILLING_TIME_ZONE`, as `billing.services` keeps them per call, so they equal the
   ledger's sums. Then `VACUUM ANALYZE`, which autovacuum would long have done on a ledger that
   grew over 90 days.
2. In this process, with Django's test `Client` logged in as a superuser (and for some pages as
   a member of "Cost viewers"), requests each page once to warm up, counting its queries, then
   `--runs` times, timing each `client.get` (the server's whole work: middleware, view, queries,
   template rendering; no network).
3. Prints a table (p50 and max ms, queries, status) and writes `bench/results/admin_pages.json`.
   Exits 1 when any page's p50 is over `--bound-ms` (300), or a page did not answer 200.

The database is dropped at the end unless `--keep` (its name is printed); `--reuse NAME` runs the
pages again on a kept database (migrated first, not filled again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_SERVER = "postgres://postgres@127.0.0.1:5432/postgres"
BOUND_MS = 300.0
PASSWORD = "bench-admin-pages"
SUPERUSER = "bench-admin"
VIEWER = "bench-viewer"
# Models of the default catalog the ledger's calls use, most used first.
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1", "gpt-4.1-nano", "o4-mini", "o3", "gpt-3.5-turbo")
ERRORS = ("server_error", "rate_limited", "connection", "bad_request")


# --- The database ------------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def create_database(server: str, name: str) -> None:
    import psycopg

    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')


def drop_database(server: str, name: str) -> None:
    import psycopg
    from django.db import connections

    for connection in connections.all():
        connection.close()
        close_pool = getattr(connection, "close_pool", None)
        if close_pool is not None:
            close_pool()
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmgateway.settings")
    import django
    from django.conf import settings
    from django.core.management import call_command

    django.setup()
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]  # the test Client's host
    call_command("migrate", verbosity=0)


# --- Filling it ------------------------------------------------------------------------------------

# Each statement runs on the server; %(name)s are its parameters (`fill`), any other % is SQL's.
FILL_SQL: list[tuple[str, str]] = [
    (
        "plans",
        """
        INSERT INTO billing_pricingplan (name, multiplier, description)
        VALUES ('standard', 1, 'catalog prices'), ('partner', 0.8, '20 % off'), ('premium', 1.2, 'support included')
        """,
    ),
    (
        "users",
        """
        INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, is_staff, is_active, date_joined)
        SELECT '!', false, 'bench-user-' || lpad(i::text, 4, '0'), '', '', 'user' || i || '@example.com', false,
               i % 37 <> 5, now() - interval '200 days' + i * interval '10 minutes'
        FROM generate_series(1, %(users)s) AS i
        """,
    ),
    (
        "accounts",
        # A third on a plan; a quarter with a monthly spend limit, some of those with a daily
        # spend limit and token limits too.
        """
        INSERT INTO billing_account (user_id, plan_id, daily_spend_limit_usd, monthly_spend_limit_usd,
                                     daily_token_limit, monthly_token_limit, soft_threshold, created_at, updated_at)
        SELECT u.id,
               CASE WHEN u.n % 3 = 0 THEN (SELECT array_agg(id ORDER BY id) FROM billing_pricingplan)[1 + (u.n / 3) % 3] END,
               CASE WHEN u.n % 8 = 0 THEN 20 + (u.n % 7) * 10 END,
               CASE WHEN u.n % 4 = 0 THEN 50 + (u.n % 11) * 50 END,
               CASE WHEN u.n % 12 = 0 THEN 2000000 END,
               CASE WHEN u.n % 12 = 0 THEN 40000000 + (u.n % 5) * 10000000 END,
               0.8, u.date_joined, u.date_joined
        FROM (SELECT id, date_joined, row_number() OVER (ORDER BY id) AS n FROM auth_user WHERE username LIKE 'bench-user-%') AS u
        """,
    ),
    (
        "api keys",
        # Key i belongs to user i mod users: a user has keys/users keys, give or take one.
        """
        INSERT INTO llmgateway_apikey (user_id, name, prefix, key_hash, created_at, last_used_at, revoked_at, expires_at,
                                       rpm_limit, tpm_limit, max_concurrent)
        SELECT u.id, 'service ' || k, 'sk-gw-' || substr(md5('prefix' || k), 1, 6), md5('a' || k) || md5('b' || k),
               now() - interval '120 days' + k * interval '1 minute', now() - (k % 50) * interval '1 hour',
               CASE WHEN k % 23 = 0 THEN now() - interval '10 days' END,
               CASE WHEN k % 31 = 0 THEN now() - interval '5 days' WHEN k % 7 = 0 THEN now() + interval '60 days' END,
               CASE WHEN k % 5 = 0 THEN 600 END, CASE WHEN k % 5 = 0 THEN 200000 END, CASE WHEN k % 10 = 0 THEN 20 END
        FROM generate_series(0, %(keys)s - 1) AS k
        JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS n FROM auth_user WHERE username LIKE 'bench-user-%') AS u
          ON u.n = k % %(users)s
        """,
    ),
    (
        "ledger",
        # One row per call, in time order; each r_* is a uniform draw. Users and keys are skewed
        # (r^2): the first users spend most. Prices are each model's latest catalog price, times
        # the account's plan multiplier (catalog source). Users, keys and models are looked up by
        # number through hash joins (an array subscript per row detoasts the array every time).
        """
        WITH users AS (
            SELECT row_number() OVER (ORDER BY u.id) AS n, u.id, coalesce(p.multiplier, 1) AS multiplier
            FROM auth_user u JOIN billing_account a ON a.user_id = u.id LEFT JOIN billing_pricingplan p ON p.id = a.plan_id
            WHERE u.username LIKE 'bench-user-%'
        ),
        keys AS (SELECT row_number() OVER (ORDER BY id) - 1 AS n, id FROM llmgateway_apikey),
        models AS (
            SELECT m.n, m.name, p.input_usd_per_1m AS input, coalesce(p.cached_input_usd_per_1m, p.input_usd_per_1m) AS cached_rate,
                   p.output_usd_per_1m AS output
            FROM unnest(%(models)s::text[]) WITH ORDINALITY AS m(name, n)
            JOIN LATERAL (SELECT * FROM billing_price WHERE model = m.name ORDER BY effective_from DESC LIMIT 1) AS p ON true
        ),
        draws AS (
            SELECT g, random() AS r_user, random() AS r_key, random() AS r_model, random() AS r_status,
                   random() AS r_prompt, random() AS r_completion, random() AS r_cached, random() AS r_time, random() AS r_kind
            FROM generate_series(0, %(rows)s - 1) AS g
        ),
        calls AS (
            SELECT d.*, u,
                   1 + floor(d.r_model * d.r_model * cardinality(%(models)s::text[]))::int AS m,
                   -- key number k belongs to user number k mod users (0-based): one of this user's
                   CASE WHEN d.r_key >= 0.1
                        THEN u - 1 + %(users)s * floor(d.r_key * d.r_key * ceil((%(keys)s - u + 1)::numeric / %(users)s))::int
                   END AS k,
                   CASE WHEN d.r_status < 0.90 THEN 'completed' WHEN d.r_status < 0.95 THEN 'cancelled'
                        WHEN d.r_status < 0.98 THEN 'upstream_error' WHEN d.r_status < 0.99 THEN 'timeout'
                        ELSE 'rejected' END AS status,
                   20 + floor(d.r_prompt * d.r_prompt * 8000)::int AS prompt,
                   now() - %(days)s * interval '1 day' + (d.g + d.r_time) * (%(days)s * interval '1 day' / %(rows)s) AS at
            FROM draws d, LATERAL (SELECT 1 + floor(d.r_user * d.r_user * %(users)s)::int AS u) AS pick
        ),
        priced AS (
            SELECT c.*, keys.id AS key_id,
                   CASE c.status WHEN 'completed' THEN 1 + floor(c.r_completion * 1500)::int
                                 WHEN 'cancelled' THEN floor(c.r_completion * 300)::int
                                 WHEN 'rejected' THEN 200 + floor(c.r_completion * 800)::int
                                 ELSE 0 END AS completion,
                   CASE WHEN c.r_cached < 0.3 THEN floor(c.prompt * c.r_cached * 3)::int ELSE 0 END AS cached,
                   users.id AS user_id, users.multiplier, models.name AS model, models.input, models.cached_rate, models.output
            FROM calls c JOIN users ON users.n = c.u JOIN models ON models.n = c.m LEFT JOIN keys ON keys.n = c.k
        )
        INSERT INTO billing_usagerecord (request_id, user_id, api_key_id, model, upstream_model, provider, stream, status,
            error_kind, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, token_source, ttft_us,
            duration_us, created_at, cost_usd, input_usd_per_1m, cached_input_usd_per_1m, output_usd_per_1m,
            price_multiplier, price_source, reserved_usd)
        SELECT gen_random_uuid(), user_id, key_id, model, model, 'openai', r_prompt < 0.8, status,
               CASE status WHEN 'upstream_error' THEN (%(errors)s::text[])[1 + floor(r_kind * cardinality(%(errors)s::text[]))::int]
                           WHEN 'timeout' THEN 'timeout' WHEN 'rejected' THEN 'budget_cap' ELSE '' END,
               prompt, completion, cached, CASE WHEN model LIKE 'o%' THEN completion / 3 ELSE 0 END,
               CASE WHEN r_kind < 0.97 THEN 'upstream' ELSE 'estimated' END,
               CASE WHEN completion > 0 THEN 120000 + floor(r_time * r_time * 2500000)::bigint END,
               200000 + completion * 12000 + floor(r_kind * 400000)::bigint, at,
               round(((prompt - cached) * input + cached * cached_rate + completion * output) * multiplier / 1000000, 10),
               input, cached_rate, output, multiplier, 'catalog',
               CASE WHEN user_id % 4 = 0 THEN round((prompt * input + 4096 * output) * multiplier / 1000000, 10) END
        FROM priced
        ORDER BY g
        """,
    ),
    (
        "daily usage",
        """
        INSERT INTO billing_dailyusage (user_id, model, day, requests, prompt_tokens, completion_tokens, cached_tokens,
                                        cost_usd, cancelled_requests, failed_requests)
        SELECT user_id, model, (created_at AT TIME ZONE %(zone)s)::date, count(*), sum(prompt_tokens), sum(completion_tokens),
               sum(cached_tokens), sum(cost_usd), count(*) FILTER (WHERE status = 'cancelled'),
               count(*) FILTER (WHERE status IN ('upstream_error', 'timeout'))
        FROM billing_usagerecord GROUP BY 1, 2, 3
        """,
    ),
    (
        "daily usage by key",
        """
        INSERT INTO billing_dailykeyusage (api_key_id, day, requests, prompt_tokens, completion_tokens, cached_tokens, cost_usd)
        SELECT api_key_id, (created_at AT TIME ZONE %(zone)s)::date, count(*), sum(prompt_tokens), sum(completion_tokens),
               sum(cached_tokens), sum(cost_usd)
        FROM billing_usagerecord WHERE api_key_id IS NOT NULL GROUP BY 1, 2
        """,
    ),
    (
        "holds",
        # Calls in flight of accounts with limits (a few expired: a process died mid-call).
        """
        INSERT INTO billing_reservation (request_id, account_id, model, cost_usd, tokens, created_at, expires_at)
        SELECT gen_random_uuid(), a.id, (%(models)s::text[])[1 + h % 3], 0.0125 * (1 + h % 9), 4096 + h, now() - h * interval '1 second',
               CASE WHEN h % 10 = 0 THEN now() - interval '1 minute' ELSE now() + interval '10 minutes' END
        FROM generate_series(0, %(holds)s - 1) AS h
        JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS n, count(*) OVER () AS total
              FROM billing_account WHERE monthly_spend_limit_usd IS NOT NULL) AS a ON a.n = h % a.total
        """,
    ),
]


@contextmanager
def _bulk_load(cursor: Any, table: str) -> Iterator[None]:
    """Load `table` without its secondary indexes and foreign-key triggers, then build the indexes.

    Five indexes (one on random UUIDs) kept up row by row, and two foreign-key checks per row,
    made the million-row insert take 100 s; built once afterwards they take a few. The rows are
    made to point at existing users and keys, so skipping the checks (`session_replication_role`,
    for this transaction only; the server's superuser) loses nothing.
    """
    cursor.execute(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid), con.conname, pg_get_constraintdef(con.oid) "
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid "
        "WHERE i.indrelid = %s::regclass AND NOT i.indisprimary",
        [table],
    )
    indexes = cursor.fetchall()
    for index, _, constraint, _ in indexes:
        cursor.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT "{constraint}"' if constraint else f'DROP INDEX "{index}"')
    cursor.execute("SET LOCAL session_replication_role = replica")
    cursor.execute("SET LOCAL maintenance_work_mem = '256MB'")
    cursor.execute("SET LOCAL work_mem = '256MB'")  # the sort into time order, in memory
    yield
    cursor.execute("SET LOCAL session_replication_role = origin")
    for _, definition, constraint, constraint_definition in indexes:
        cursor.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT "{constraint}" {constraint_definition}' if constraint else definition)


@dataclass
class Fill:
    rows: int
    users: int
    keys: int
    days: int
    holds: int
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def fill(*, rows: int, users: int, keys: int, days: int, holds: int) -> Fill:
    """Fill the migrated database with SQL on the server (see the module docstring)."""
    from django.conf import settings
    from django.db import connection, transaction

    done = Fill(rows=rows, users=users, keys=keys, days=days, holds=holds)
    params = {
        "rows": rows, "users": users, "keys": keys, "days": days, "holds": holds, "models": list(MODELS),
        "errors": list(ERRORS), "zone": settings.BILLING_TIME_ZONE,
    }
    with connection.cursor() as cursor:
        cursor.execute("SELECT array_agg(m) FROM unnest(%s::text[]) AS m WHERE NOT EXISTS (SELECT FROM billing_price WHERE model = m)", [list(MODELS)])
        missing = cursor.fetchone()[0]
        if missing:
            raise SystemExit(f"the default price catalog has no price for {missing}: edit bench/admin_pages.py MODELS")
    for name, sql in FILL_SQL:
        started = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            if name == "ledger":
                with _bulk_load(cursor, "billing_usagerecord"):
                    cursor.execute(sql.replace("%", "%%").replace("%%(", "%("), params)
            else:
                cursor.execute(sql.replace("%", "%%").replace("%%(", "%("), params)
        done.seconds[name] = round(time.perf_counter() - started, 2)
        _log(f"  filled {name} in {done.seconds[name]:.1f} s")
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
        for table in ("auth_user", "llmgateway_apikey", "billing_usagerecord", "billing_dailyusage", "billing_dailykeyusage", "billing_reservation"):
            cursor.execute(f"SELECT count(*) FROM {table}")  # noqa: S608  # a constant
            done.counts[table] = cursor.fetchone()[0]
    done.seconds["vacuum analyze"] = round(time.perf_counter() - started, 2)
    return done


def staff() -> tuple[Any, Any]:
    """The superuser and the "Cost viewers" member the pages are requested as."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    from llmgateway.staff import COST_VIEWERS

    users = get_user_model().objects
    admin = users.filter(username=SUPERUSER).first() or users.create_superuser(SUPERUSER, "admin@example.com", PASSWORD)
    viewer = users.filter(username=VIEWER).first()
    if viewer is None:
        viewer = users.create_user(VIEWER, "viewer@example.com", PASSWORD, is_staff=True)
        viewer.groups.add(Group.objects.get(name=COST_VIEWERS))
    return admin, viewer


# --- The pages --------------------------------------------------------------------------------------


@dataclass
class Page:
    name: str
    url: str
    who: str = "superuser"


@dataclass
class Measured:
    name: str
    url: str
    who: str
    status: int
    queries: int
    p50_ms: float
    max_ms: float
    runs_ms: list[float]
    rows_shown: int | None = None
    result_count: int | None = None


def pages(ledger_rows: int) -> list[Page]:
    """Every page the acceptance names, with URLs built from the filled data."""
    from datetime import timedelta

    from django.db.models import Sum
    from django.urls import reverse
    from django.utils import timezone

    from billing.admin import UsageRecordAdmin
    from billing.models import Account, DailyKeyUsage, DailyUsage, UsageRecord
    from billing.periods import days_ending, period_containing
    from llmgateway.models import ApiKey

    def changelist(name: str, /, **query: Any) -> str:
        url = reverse(f"admin:{name}_changelist")
        return f"{url}?{urlencode(query)}" if query else url

    heavy = (
        DailyUsage.objects.order_by().values("user_id", "user__username").annotate(n=Sum("requests")).order_by("-n", "user_id").first()
    )
    assert heavy is not None, "the ledger is empty"
    username, user_id = heavy["user__username"], heavy["user_id"]
    busiest = DailyKeyUsage.objects.order_by().values("api_key_id").annotate(n=Sum("requests")).order_by("-n", "api_key_id").first()
    assert busiest is not None
    key_id = busiest["api_key_id"]
    prefix = ApiKey.objects.get(pk=key_id).prefix
    record = UsageRecord.objects.order_by("-id").values_list("id", "request_id").first()
    assert record is not None
    record_id, request_id = record
    now = timezone.now()
    today = period_containing("day", now)
    month = period_containing("month", now)
    last_30 = days_ending(now, days=30)
    last_7 = (today.end_day - timedelta(days=7)).isoformat(), today.end_day.isoformat()
    account_id = Account.objects.filter(monthly_spend_limit_usd__isnull=False).order_by("id").values_list("id", flat=True).first()
    rollup_id = DailyUsage.objects.order_by("-day", "id").values_list("id", flat=True).first()
    console = reverse("admin:console")
    ledger = "billing_usagerecord"
    per_page = UsageRecordAdmin.list_per_page
    deep = max(2, min(10_000, ledger_rows // per_page // 2))  # halfway down a million rows
    listed = [
        Page("console", console),
        Page("console ?days=365", f"{console}?days=365"),
        Page("console ?top=100", f"{console}?top=100"),
        Page("console, sorted by calls", f"{console}?o_user=-requests&o_key=name&o_model=-input"),
        Page("ledger", changelist(ledger)),
        Page("ledger page 2", changelist(ledger, p=2)),
        Page(f"ledger page {deep:,} (offset {(deep - 1) * per_page:,})", changelist(ledger, p=deep)),
        Page("ledger sorted by cost", changelist(ledger, o="-8")),
        Page("ledger ?user (heaviest user)", changelist(ledger, user=username)),
        Page("ledger ?key (busiest key)", changelist(ledger, key=prefix)),
        Page("ledger ?model&status", changelist(ledger, model="gpt-4o", status__exact="completed")),
        Page("ledger ?status=upstream_error", changelist(ledger, status__exact="upstream_error")),
        Page("ledger last 7 days", changelist(ledger, since=last_7[0], until=last_7[1])),
        Page("ledger this month", changelist(ledger, since=month.first_day.isoformat(), until=month.end_day.isoformat())),
        Page("ledger ?user, last 7 days", changelist(ledger, user=username, since=last_7[0], until=last_7[1])),
        Page(
            "ledger from the console (a user, 30 days)",
            changelist(ledger, user__id__exact=user_id, since=last_30.first_day.isoformat(), until=last_30.end_day.isoformat()),
        ),
        Page("ledger search (a request id)", changelist(ledger, q=str(request_id))),
        Page("ledger row", reverse(f"admin:{ledger}_change", args=[record_id])),
        Page("daily usage", changelist("billing_dailyusage")),
        Page("daily usage page 2", changelist("billing_dailyusage", p=2)),
        Page("daily usage ?user", changelist("billing_dailyusage", user=username)),
        Page("daily usage this month", changelist("billing_dailyusage", since=month.first_day.isoformat(), until=month.end_day.isoformat())),
        Page("daily usage row", reverse("admin:billing_dailyusage_change", args=[rollup_id])),
        Page("accounts", changelist("billing_account")),
        Page("accounts ?suspended=yes", changelist("billing_account", suspended="yes")),
        Page("accounts sorted by spend", changelist("billing_account", o="-4")),
        Page("account", reverse("admin:billing_account_change", args=[account_id])),
        Page("API keys", changelist("llmgateway_apikey")),
        Page("API keys ?state=active", changelist("llmgateway_apikey", state="active")),
        Page("API keys sorted by spend", changelist("llmgateway_apikey", o="-5")),
        Page("API keys search", changelist("llmgateway_apikey", q="service 1")),
        Page("API key", reverse("admin:llmgateway_apikey_change", args=[key_id])),
        Page("holds", changelist("billing_reservation")),
        Page("prices", changelist("billing_price")),
        Page("plans", changelist("billing_pricingplan")),
        Page("users", changelist("auth_user")),
        Page("admin index", reverse("admin:index")),
    ]
    as_viewer = ("console", "console ?days=365", "ledger", "ledger ?user (heaviest user)", "daily usage", "accounts", "API keys")
    listed += [Page(page.name, page.url, who="cost viewer") for page in listed if page.name in as_viewer]
    return listed


def measure(page: Page, client: Any, runs: int) -> Measured:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:  # the warm-up run, counted
        response = client.get(page.url)
    queries = len(captured.captured_queries)  # read now: the next request clears the log
    status = response.status_code
    context = getattr(response, "context_data", None) or {}
    changelist = context.get("cl")
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        client.get(page.url)
        times.append((time.perf_counter() - started) * 1000)
    return Measured(
        name=page.name, url=page.url, who=page.who, status=status, queries=queries,
        p50_ms=round(statistics.median(times), 1), max_ms=round(max(times), 1), runs_ms=[round(t, 1) for t in times],
        rows_shown=len(changelist.result_list) if changelist is not None else None,
        result_count=changelist.result_count if changelist is not None else None,
    )


def run_pages(runs: int, only: str | None, ledger_rows: int) -> list[Measured]:
    from django.test import Client

    admin, viewer = staff()
    clients: dict[str, Callable[[], Any]] = {"superuser": Client, "cost viewer": Client}
    logged_in = {}
    for who, user in (("superuser", admin), ("cost viewer", viewer)):
        client = clients[who]()
        client.force_login(user)
        logged_in[who] = client
    measured = []
    for page in pages(ledger_rows):
        if only and only.lower() not in page.name.lower():
            continue
        result = measure(page, logged_in[page.who], runs)
        measured.append(result)
        flag = "" if result.status == 200 and result.p50_ms <= BOUND_MS else "  <-- over"
        _log(f"  {page.who:<11} {page.name:<44} p50 {result.p50_ms:>8.1f} ms  max {result.max_ms:>8.1f} ms  {result.queries:>3} queries  {result.status}{flag}")
    return measured


# --- Report --------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> list[str]:
    """The report's lines without the target (`bench.run` puts that in its table of targets)."""
    meta = results["meta"]
    dirty = f" (+{meta['git_dirty_files']} modified files)" if meta["git_dirty_files"] else ""
    lines = [
        f"Admin pages on PostgreSQL {meta['postgres']}: {meta['ledger_rows']:,} ledger rows, {meta['rollup_rows']:,} daily "
        f"rollups, {meta['key_rollup_rows']:,} key rollups, {meta['users']:,} users, {meta['keys']:,} keys; git {meta['git']}{dirty}; "
        f"{meta['runs']} runs per page after one warm-up; server time = the test Client's call (middleware, view, queries, rendering)",
        f"{'page':<46} {'as':<12} {'p50 ms':>8} {'max ms':>8} {'queries':>8} {'status':>7}",
    ]
    load = meta.get("load_average_1min")
    if load and max(load) > (meta.get("cpus") or 1):
        lines.insert(1, f"WARNING: the machine was busy (1-minute load average {load[0]:.1f} -> {load[1]:.1f} on {meta['cpus']} CPUs): "
                        "the times are pessimistic; rerun with --wait-quiet")
    for page in results["pages"]:
        over = " OVER" if page["p50_ms"] > results["bound_ms"] else ""
        lines.append(
            f"{page['name']:<46} {page['who']:<12} {page['p50_ms']:>8.1f} {page['max_ms']:>8.1f} {page['queries']:>8} {page['status']:>7}{over}"
        )
    if results["pages"]:
        worst = max(results["pages"], key=lambda page: page["p50_ms"])
        lines.append(f"slowest: {worst['name']} ({worst['who']}), p50 {worst['p50_ms']:.1f} ms; bound {results['bound_ms']:g} ms")
    return lines


def render(results: dict[str, Any]) -> str:
    return "\n".join([*table(results), "", f"{'Target':<62} {'measured':<36} {'target':<22} status", target_line(results)])


def target(results: dict[str, Any]) -> tuple[str, str, str, bool | None]:
    """(name, measured, target, passed) for `bench.run`'s table of targets."""
    pages_ = results.get("pages") or []
    name = f"admin pages p50, {results.get('meta', {}).get('ledger_rows', 0):,} ledger rows (worst of {len(pages_)})"
    if not pages_:
        return name, "n/a", f"< {BOUND_MS:g} ms", None
    worst = max(pages_, key=lambda page: page["p50_ms"])
    failed = [page for page in pages_ if page["status"] != 200]
    measured = f"{worst['p50_ms']:.1f} ms ({worst['name'][:24]})" + (f", {len(failed)} not 200" if failed else "")
    return name, measured, f"< {results['bound_ms']:g} ms", worst["p50_ms"] <= results["bound_ms"] and not failed


def target_line(results: dict[str, Any]) -> str:
    name, measured, bound, passed = target(results)
    return f"{name:<62} {measured:<36} {bound:<22} {'n/a' if passed is None else 'PASS' if passed else 'MISS'}"


def wait_quiet(seconds: float) -> None:
    """Wait up to `seconds` for the 1-minute load average to fall under 1 (other work on the machine)."""
    deadline = time.monotonic() + seconds
    while (load := os.getloadavg()[0]) >= 1.0 and time.monotonic() < deadline:
        _log(f"  waiting for a quiet machine: load average {load:.2f}")
        time.sleep(min(10.0, max(deadline - time.monotonic(), 0.0)))


def _git() -> tuple[str, int]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return run("rev-parse", "--short", "HEAD") or "?", len([line for line in run("status", "--porcelain").splitlines() if line.strip()])


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admin_pages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default=DEFAULT_SERVER, metavar="URL", help=f"the PostgreSQL server to create the database on (default {DEFAULT_SERVER}); its database is never written")
    parser.add_argument("--rows", type=int, default=1_000_000, help="ledger rows (default 1,000,000)")
    parser.add_argument("--users", type=int, default=300, help="users, each with an account (default 300)")
    parser.add_argument("--keys", type=int, default=1000, help="API keys (default 1,000)")
    parser.add_argument("--days", type=int, default=90, help="days the ledger spans, ending now (default 90)")
    parser.add_argument("--holds", type=int, default=200, help="budget holds (default 200)")
    parser.add_argument("--runs", type=int, default=7, help="timed requests per page after one warm-up (default 7)")
    parser.add_argument("--bound-ms", type=float, default=BOUND_MS, help=f"the p50 every page must stay under (default {BOUND_MS:g})")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS", help="first wait up to this long for the 1-minute load average to fall under 1 (shared machines)")
    parser.add_argument("--only", metavar="TEXT", help="only the pages whose name contains TEXT")
    parser.add_argument("--output", type=Path, default=RESULTS / "admin_pages.json", help="the JSON results (default bench/results/admin_pages.json)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--keep", action="store_true", help="keep the database (its name is printed)")
    group.add_argument("--reuse", metavar="NAME", help="measure on this kept database (migrated, not filled again); it is kept")
    options = parser.parse_args(argv)
    if options.rows < 1 or options.users < 1 or options.keys < options.users or options.runs < 1:
        parser.error("need rows >= 1, users >= 1, keys >= users, runs >= 1")

    name = options.reuse or f"llmgateway_admin_bench_{os.getpid()}"
    if not options.reuse:
        create_database(options.postgres, name)
    filled: Fill | None = None
    try:
        setup_django(_with_database(options.postgres, name))
        from django.db import connection

        if not options.reuse:
            _log(f"admin pages bench: database {name}, filling {options.rows:,} ledger rows")
            filled = fill(rows=options.rows, users=options.users, keys=options.keys, days=options.days, holds=options.holds)
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            server_version = cursor.fetchone()[0]
            counts = {}
            for table in ("billing_usagerecord", "billing_dailyusage", "billing_dailykeyusage", "auth_user", "llmgateway_apikey"):
                cursor.execute(f"SELECT count(*) FROM {table}")  # noqa: S608  # a constant
                counts[table] = cursor.fetchone()[0]
        if options.wait_quiet > 0:
            wait_quiet(options.wait_quiet)
        load_before = os.getloadavg()[0]
        _log(f"measuring pages ({options.runs} runs each after a warm-up); load average {load_before:.2f}")
        measured = run_pages(options.runs, options.only, counts["billing_usagerecord"])
        load_after = os.getloadavg()[0]
        git, dirty = _git()
        results = {
            "meta": {
                "postgres": server_version, "database": name, "git": git, "git_dirty_files": dirty, "runs": options.runs,
                "ledger_rows": counts["billing_usagerecord"], "rollup_rows": counts["billing_dailyusage"],
                "key_rollup_rows": counts["billing_dailykeyusage"], "users": counts["auth_user"], "keys": counts["llmgateway_apikey"],
                "days": options.days, "python": platform.python_version(), "cpus": os.cpu_count(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "load_average_1min": [round(load_before, 2), round(load_after, 2)],
            },
            "fill": asdict(filled) if filled else None,
            "bound_ms": options.bound_ms,
            "pages": [asdict(page) for page in measured],
        }
        results["target"] = dict(zip(("name", "measured", "target", "passed"), target(results), strict=True))
        options.output.parent.mkdir(parents=True, exist_ok=True)
        options.output.write_text(json.dumps(results, indent=2) + "\n")
        print(render(results))
        print(f"\nJSON: {options.output}")
    finally:
        if options.keep or options.reuse:
            _log(f"kept: database {name} ({_with_database(options.postgres, name)}); rerun with --reuse {name}")
        else:
            drop_database(options.postgres, name)
    return 0 if results["target"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
