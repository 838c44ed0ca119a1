"""Stopping running calls from another process: staff stop one call, revoking a key ends its
streams. The order travels over the channel layer (Redis), the client gets an error event, the
upstream connection is closed and the ledger row says why."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from channels.layers import channel_layers
from django.conf import settings
from django.contrib.auth import get_user_model

from billing.models import UsageRecord
from infra.redis import channel_layer
from llmgateway.models import ApiKey
from llmgateway.services import api_key_revoke, user_suspend
from tests.conftest import ROOT, database_url

from .conftest import stream_call, wait_until

pytestmark = [pytest.mark.django_db(transaction=True)]

MODEL = "gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "A long answer, please."}], "max_tokens": 500}


@pytest.fixture
def redis_channel_layer(clean_redis: str) -> Iterator[str]:
    """This test process's channel layer on the same Redis as the gateway under test."""
    previous = settings.CHANNEL_LAYERS
    settings.CHANNEL_LAYERS = {"default": channel_layer(clean_redis, cluster=False)}
    channel_layers.backends.clear()
    yield clean_redis
    settings.CHANNEL_LAYERS = previous
    channel_layers.backends.clear()


def stream_until_stopped(gateway, key: str, stop) -> tuple[dict, float]:
    """Stream a long answer; once tokens flow, call `stop(request_id)`; return how the stream
    ended and how long after the stop it did."""

    async def run() -> tuple[dict, float]:
        started = asyncio.Event()
        async with httpx.AsyncClient(timeout=30) as client:
            call = asyncio.create_task(stream_call(client, gateway, key, BODY, started=started))
            await started.wait()
            stop_at = time.monotonic()
            await asyncio.to_thread(stop)
            result = await call
            return result, time.monotonic() - stop_at

    return asyncio.run(run())


def test_staff_stop_a_stream_served_by_another_process(gateway_factory, api_key_factory, fake_upstream, clean_redis) -> None:
    key = api_key_factory("stopped")
    gateway = gateway_factory(REDIS_URL=clean_redis)
    fake_upstream.tokens = 400
    fake_upstream.inter_token_delay = 0.02
    before = len(fake_upstream.requests)

    def stop_from_the_command_line() -> None:
        [request] = fake_upstream.requests[before:]
        request_id = request.headers["x-client-request-id"]
        env = {**os.environ, "DATABASE_URL": database_url(), "REDIS_URL": clean_redis, "LOG_LEVEL": "WARNING"}
        subprocess.run(
            [sys.executable, "manage.py", "stop_calls", "--request-id", request_id], cwd=ROOT, env=env, check=True, capture_output=True
        )

    result, _ = stream_until_stopped(gateway, key, stop_from_the_command_line)
    assert result["status"] == 200 and not result["done"]
    assert '"code":"stopped_by_staff"' in result["error"]
    row = wait_until(lambda: UsageRecord.objects.first(), timeout=5, what="the row")
    assert str(row.request_id) == result["request_id"]
    assert (row.status, row.error_kind) == ("cancelled", "stopped_by_staff")
    assert 0 < row.completion_tokens < 400
    upstream = fake_upstream.requests[before]
    wait_until(lambda: upstream.closed_at is not None, timeout=2, what="the upstream connection closed")


def revoke_the_key(username: str) -> None:
    api_key_revoke(api_key=ApiKey.objects.get(user__username=username))


def suspend_the_user(username: str) -> None:
    user_suspend(user_id=get_user_model().objects.get(username=username).pk)


def deactivate_on_djangos_users_page(username: str) -> None:
    user = get_user_model().objects.get(username=username)
    user.is_active = False
    user.save()  # what the Users admin page does


@pytest.mark.parametrize(
    ("action", "reason"),
    [(revoke_the_key, "api_key_revoked"), (suspend_the_user, "user_suspended"), (deactivate_on_djangos_users_page, "user_suspended")],
    ids=["revoke-key", "suspend-user", "deactivate-user"],
)
def test_revoking_a_key_or_suspending_its_user_ends_its_running_stream_within_a_second(
    gateway_factory, api_key_factory, fake_upstream, redis_channel_layer, action, reason
) -> None:
    key = api_key_factory("revoked")
    gateway = gateway_factory(REDIS_URL=redis_channel_layer)
    fake_upstream.tokens = 400
    fake_upstream.inter_token_delay = 0.02

    result, ended_after = stream_until_stopped(gateway, key, lambda: action("revoked"))
    assert ended_after < 1
    assert f'"code":"{reason}"' in result["error"] and not result["done"]
    row = wait_until(lambda: UsageRecord.objects.first(), timeout=5, what="the row")
    assert (row.status, row.error_kind) == ("cancelled", reason)
    refused = httpx.post(f"{gateway.api_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=BODY, timeout=10)
    assert refused.status_code == 401  # and no new call with it, at once
