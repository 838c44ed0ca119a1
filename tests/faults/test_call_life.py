"""A call's life under real faults: every upstream call leaves exactly one ledger row, and every
slot and budget hold it took comes back, whatever the database, Redis or the client does.

Each test runs the gateway as a real Granian process against the test database, the fake
OpenAI upstream (which counts the calls it served) and, where limits matter, Redis.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from django.contrib.auth import get_user_model

from billing.models import Reservation, UsageRecord
from billing.services import account_quota_set

from .conftest import hang_up_during_admission, stream_call, streams_through_a_fault, wait_until

pytestmark = [pytest.mark.django_db(transaction=True)]

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


def budget_for(username: str, usd: str = "1000") -> None:
    """Give the user a budget, so each call holds its worst case until it is settled."""
    user = get_user_model().objects.get(username=username)
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=Decimal(usd))


def upstream_calls_since(fake_upstream, before: int) -> int:
    return len(fake_upstream.requests) - before


def assert_ledger_reconciles(expected_rows: int) -> list[UsageRecord]:
    rows = list(UsageRecord.objects.all())
    ids = Counter(row.request_id for row in rows)
    assert len(rows) == expected_rows, (len(rows), expected_rows)
    assert max(ids.values(), default=1) == 1, "a request_id was written twice"
    assert Reservation.objects.count() == 0, "a budget hold was left behind"
    return rows


def upstream_request_ids(fake_upstream, before: int) -> list[str]:
    """The gateway's request ids the upstream received (sent as X-Client-Request-Id)."""
    return [request.headers.get("x-client-request-id", "") for request in fake_upstream.requests[before:]]


def assert_every_upstream_call_has_its_row(fake_upstream, before: int) -> list[UsageRecord]:
    """Each call the upstream saw has exactly one row, under its id. A row the upstream never
    saw is a call whose client hung up while its request was being sent: it produced nothing."""
    seen = upstream_request_ids(fake_upstream, before)
    rows = {str(row.request_id): row for row in UsageRecord.objects.all()}
    assert len(seen) == len(set(seen)) and "" not in seen
    assert set(seen) <= set(rows), set(seen) - set(rows)
    unseen = [row for request_id, row in rows.items() if request_id not in set(seen)]
    assert all(row.status == "cancelled" and row.ttft_us is None and row.completion_tokens == 0 for row in unseen), unseen
    assert Reservation.objects.count() == 0, "a budget hold was left behind"
    return list(rows.values())


def test_postgres_refusing_connections_while_streams_run_loses_no_row(
    gateway_factory, api_key_factory, fake_upstream, postgres_fault, outbox_dir
) -> None:
    key = api_key_factory("dbfault")
    budget_for("dbfault")
    gateway = gateway_factory(
        LEDGER_OUTBOX_DIR=str(outbox_dir), GATEWAY_LEDGER_WRITE_TIMEOUT="1", AUTH_CACHE_SECONDS="60", **postgres_fault.env()
    )
    fake_upstream.tokens = 30
    fake_upstream.inter_token_delay = 0.05
    before = len(fake_upstream.requests)

    async def refuse() -> None:
        await asyncio.to_thread(postgres_fault.refuse)  # the outage outlasts every stream

    results = streams_through_a_fault(gateway, key, {"model": MODEL, "messages": MESSAGES, "max_tokens": 50}, count=6, fault=refuse)
    # Every client saw [DONE]: each row was committed or durably queued before it.
    assert [result["done"] for result in results] == [True] * 6
    journaled = [orjson.loads(line) for path in outbox_dir.rglob("*.jsonl") for line in path.read_bytes().splitlines()]
    assert sum(entry["op"] == "final" for entry in journaled) == 6
    metrics = httpx.get(f"{gateway.base_url}/readyz", timeout=5).json()
    assert metrics["outbox"] == 6

    postgres_fault.allow()
    wait_until(lambda: UsageRecord.objects.count() == 6, timeout=15, what="the outbox to drain")
    rows = assert_ledger_reconciles(upstream_calls_since(fake_upstream, before))
    assert {str(row.request_id) for row in rows} == {result["request_id"] for result in results}
    assert set(upstream_request_ids(fake_upstream, before)) == {result["request_id"] for result in results}
    assert all(row.status == "completed" and row.completion_tokens == 30 for row in rows)
    wait_until(lambda: httpx.get(f"{gateway.base_url}/readyz", timeout=5).json()["outbox"] == 0, timeout=5, what="outbox depth 0")


def test_clients_hanging_up_during_admission_leave_no_slot_and_no_hold(
    gateway_factory, api_key_factory, fake_upstream, clean_redis
) -> None:
    key = api_key_factory("hangups", max_concurrent=4)
    budget_for("hangups")
    gateway = gateway_factory(REDIS_URL=clean_redis, LIMITS_REDIS_PREFIX=f"t{uuid.uuid4().hex[:8]}")
    fake_upstream.tokens = 5
    fake_upstream.inter_token_delay = 0.01
    before = len(fake_upstream.requests)
    body = orjson.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "stream": True})
    rng = random.Random(7)

    async def hang_ups() -> None:
        await asyncio.gather(
            *(asyncio.to_thread(hang_up_during_admission, gateway, key, body, rng.uniform(0, 0.04)) for _ in range(120))
        )

    asyncio.run(hang_ups())

    # Within 3 s of the last hang-up every slot is free: four calls at once are all admitted.
    async def four_at_once() -> list[dict]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(stream_call(client, gateway, key, {"model": MODEL, "messages": MESSAGES, "max_tokens": 10}) for _ in range(4))
            )

    deadline = time.monotonic() + 3
    while True:
        statuses = [result["status"] for result in asyncio.run(four_at_once())]
        if statuses == [200] * 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert statuses == [200] * 4
    wait_until(lambda: UsageRecord.objects.count() >= upstream_calls_since(fake_upstream, before), timeout=5, what="a row per upstream call")
    wait_until(lambda: Reservation.objects.count() == 0, timeout=2, what="no hold left")
    assert_every_upstream_call_has_its_row(fake_upstream, before)


def test_redis_paused_while_streams_end_frees_their_slots_within_a_second_of_resuming(
    gateway_factory, api_key_factory, fake_upstream, pausable_redis
) -> None:
    key = api_key_factory("redispause", max_concurrent=3)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    gateway = gateway_factory(REDIS_URL=pausable_redis.url, LIMITS_REDIS_PREFIX=prefix, LIMITS_REDIS_TIMEOUT="0.5")
    fake_upstream.tokens = 20
    fake_upstream.inter_token_delay = 0.05
    store = redis.Redis.from_url(pausable_redis.url)

    def slots_taken() -> int:
        return sum(store.zcard(name) for name in store.scan_iter(match=f"{prefix}:*:lease:*"))

    async def pause() -> None:
        assert await asyncio.to_thread(slots_taken) == 3
        pausable_redis.pause()

    try:
        results = streams_through_a_fault(gateway, key, {"model": MODEL, "messages": MESSAGES, "max_tokens": 50}, count=3, fault=pause)
        time.sleep(1)  # the releases time out against the frozen Redis and wait for it
    finally:
        pausable_redis.resume()
    resumed = time.monotonic()
    wait_until(lambda: slots_taken() == 0, timeout=1, interval=0.02, what="every slot free")
    assert time.monotonic() - resumed < 1
    assert [result["done"] for result in results] == [True] * 3
    wait_until(lambda: UsageRecord.objects.count() == 3, timeout=5, what="three rows")


@pytest.mark.parametrize("fault", ["429", "500", "400", "401"])
def test_an_upstream_error_before_any_token_costs_nothing_and_is_recorded_with_its_request_id(
    gateway, api_key, fake_upstream, fault
) -> None:
    fake_upstream.fault = fault
    fake_upstream.retry_after = 1
    response = httpx.post(
        f"{gateway.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": MODEL, "messages": MESSAGES},
        timeout=10,
    )
    assert response.status_code >= 400
    assert response.json()["error"]["message"]
    row = wait_until(lambda: UsageRecord.objects.first(), timeout=5, what="the row")
    assert str(row.request_id) == response.headers["x-request-id"]
    assert row.status == "upstream_error" and row.error_kind
    assert (row.prompt_tokens, row.completion_tokens, row.cost_usd) == (0, 0, Decimal(0))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_an_upstream_that_ignores_max_tokens_is_stopped_and_billed_at_what_was_reserved(
    gateway, api_key_factory, fake_upstream, stream
) -> None:
    key = api_key_factory("greedy")
    budget_for("greedy", "0.01")
    fake_upstream.fault = "endless"
    response = httpx.post(
        f"{gateway.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "stream": stream},
        timeout=10,
    )
    row = wait_until(lambda: UsageRecord.objects.first(), timeout=5, what="the row")
    assert row.completion_tokens == 5
    assert str(row.request_id) == response.headers["x-request-id"]
    assert Reservation.objects.count() == 0
    if stream:
        assert "budget_reservation_reached" in response.text and "[DONE]" not in response.text
    else:
        assert response.status_code == 400


def test_a_worker_killed_at_the_shutdown_deadline_leaves_its_calls_in_the_outbox(
    gateway_factory, api_key_factory, fake_upstream, outbox_dir
) -> None:
    key = api_key_factory("shutdown")
    budget_for("shutdown")
    env = {"LEDGER_OUTBOX_DIR": str(outbox_dir), "AUTH_CACHE_SECONDS": "60"}
    gateway = gateway_factory(granian_args=("--workers-kill-timeout", "2"), **env)
    fake_upstream.tokens = 400
    fake_upstream.inter_token_delay = 0.02
    before = len(fake_upstream.requests)

    async def terminate() -> None:
        await asyncio.sleep(1)  # some tokens, and a checkpoint of them, before the signal
        gateway.process.send_signal(signal.SIGTERM)

    results = streams_through_a_fault(gateway, key, {"model": MODEL, "messages": MESSAGES, "max_tokens": 500}, count=5, fault=terminate)
    try:
        gateway.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        raise
    produced = [result["contents"] for result in results if isinstance(result, dict)]
    assert UsageRecord.objects.count() < 5 or not produced  # the kill cut them before their rows

    # The next gateway on the same database replays the dead worker's journal at start.
    gateway_factory(**env)
    calls = upstream_calls_since(fake_upstream, before)
    rows = wait_until(lambda: list(UsageRecord.objects.all()) if UsageRecord.objects.count() == calls else None, timeout=15, what="the journal replayed")
    assert_ledger_reconciles(calls)
    interrupted = [row for row in rows if row.error_kind == "interrupted"]
    assert interrupted, [row.status for row in rows]
    assert all(row.status == "cancelled" and row.completion_tokens > 0 and row.cost_usd > 0 for row in interrupted)
    assert not any(Path(outbox_dir).rglob("*.jsonl"))


def logged_in_client(gateway, username: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=gateway.base_url, timeout=30)
    client.get("/accounts/login/")
    response = client.post(
        "/accounts/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": client.cookies["csrftoken"]},
    )
    assert response.status_code == 302, response.text
    return client


def test_chat_page_streams_hold_no_database_connection(gateway_factory, api_key_factory, fake_upstream) -> None:
    key = api_key_factory("apiuser")
    get_user_model().objects.create_user(username="chatter", password="correct horse battery")
    # Four streams of one user at the page at once: past the chat page's default concurrency.
    gateway = gateway_factory(DATABASE_POOL_MAX_SIZE="2", DATABASE_POOL_TIMEOUT="3", LIMITS_CHAT_USER_MAX_CONCURRENT="4")
    fake_upstream.tokens = 60
    fake_upstream.inter_token_delay = 0.05
    browser = logged_in_client(gateway, "chatter", "correct horse battery")
    csrf = browser.cookies["csrftoken"]
    session_cookies = dict(browser.cookies)
    before = len(fake_upstream.requests)

    async def chat_stream(client: httpx.AsyncClient, started: asyncio.Event) -> dict:
        result = {"status": None, "done": False}
        async with client.stream(
            "POST",
            f"{gateway.base_url}/chat/completions",
            headers={"X-CSRFToken": csrf, "Referer": f"{gateway.base_url}/chat/"},
            json={"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 100},
        ) as response:
            result["status"] = response.status_code
            async for line in response.aiter_lines():
                if '"content":' in line:
                    started.set()
                result["done"] = result["done"] or line == "data: [DONE]"
        return result

    async def run() -> tuple[list[dict], httpx.Response]:
        started = [asyncio.Event() for _ in range(4)]
        async with httpx.AsyncClient(timeout=30, cookies=session_cookies) as client:
            chats = [asyncio.create_task(chat_stream(client, event)) for event in started]
            await asyncio.gather(*(event.wait() for event in started))
            async with httpx.AsyncClient(timeout=30) as api:
                answer = await api.post(
                    f"{gateway.api_url}/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5},
                )
            return await asyncio.gather(*chats), answer

    chats, answer = asyncio.run(run())
    browser.close()
    # Four chat streams ran on a pool of two connections, and an API call still got its answer.
    assert answer.status_code == 200, answer.text
    assert [chat["status"] for chat in chats] == [200] * 4 and all(chat["done"] for chat in chats)
    wait_until(lambda: UsageRecord.objects.count() == upstream_calls_since(fake_upstream, before), timeout=5, what="a row per call")
    assert UsageRecord.objects.filter(api_key__isnull=True).count() == 4
    assert_ledger_reconciles(5)
