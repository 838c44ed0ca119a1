"""The channel layer on Redis as the settings build it (`infra.redis.channel_layer`): a listener
that hears nothing for a while is not failing, and a frozen Redis delays a stop by a bounded time,
never forever. Each test runs a redis-server of its own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest
import redis
from channels.layers import channel_layers, get_channel_layer
from channels_redis.core import RedisChannelLayer
from django.conf import settings

from calls import control
from calls.control import CONTROL_GROUP, StopOrder
from infra.redis import CHANNEL_LAYER_BLOCKING_POP_SECONDS, channel_layer
from testbed.services import RedisServer


@pytest.fixture
def layer_redis(pausable_redis: RedisServer) -> Iterator[RedisServer]:
    """This process's channel layer on a redis-server of the test's own."""
    previous = settings.CHANNEL_LAYERS
    settings.CHANNEL_LAYERS = {"default": channel_layer(pausable_redis.url, cluster=False)}
    channel_layers.backends.clear()
    try:
        yield pausable_redis
    finally:
        pausable_redis.resume()
        settings.CHANNEL_LAYERS = previous
        channel_layers.backends.clear()


async def test_the_stop_order_listener_hears_a_message_sent_after_a_quiet_spell_longer_than_its_blocking_pop(
    layer_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[dict] = []
    monkeypatch.setitem(control.message_handlers, "test.ping", heard.append)
    listening = asyncio.create_task(control._listen())
    try:
        await asyncio.sleep(CHANNEL_LAYER_BLOCKING_POP_SECONDS + 1.5)
        await get_channel_layer().group_send(CONTROL_GROUP, {"type": "test.ping", "n": 1})
        for _ in range(200):
            if heard:
                break
            await asyncio.sleep(0.01)
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
    assert heard == [{"type": "test.ping", "n": 1}]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "the quiet spell was taken for a failure"


async def test_an_order_sent_while_the_listener_reconnects_is_heard_after_and_no_dead_channel_is_left(
    layer_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    heard: list[dict] = []
    monkeypatch.setitem(control.message_handlers, "test.ping", heard.append)
    monkeypatch.setattr(control, "LISTEN_RETRY_SECONDS", 1.0)
    admin = redis.Redis.from_url(layer_redis.url)
    group_key = f"{get_channel_layer().prefix}:group:{CONTROL_GROUP}"
    listening = asyncio.create_task(control._listen())
    try:
        for _ in range(200):
            if admin.zcard(group_key):
                break
            await asyncio.sleep(0.01)
        [member] = admin.zrange(group_key, 0, -1)
        admin.client_kill_filter(_type="normal", skipme=True)  # the listener's connection drops
        await asyncio.sleep(0.2)  # it has failed, and waits to retry
        elsewhere = RedisChannelLayer(**channel_layer(layer_redis.url, cluster=False)["CONFIG"])
        await elsewhere.group_send(CONTROL_GROUP, {"type": "test.ping", "n": 2})
        for _ in range(300):
            if heard:
                break
            await asyncio.sleep(0.01)
        assert heard == [{"type": "test.ping", "n": 2}]
        assert admin.zrange(group_key, 0, -1) == [member]
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        admin.close()


async def test_a_frozen_redis_delays_a_stop_by_at_most_the_publish_timeout_and_the_stop_applies_here(
    layer_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    layer = get_channel_layer()
    await layer.group_send(CONTROL_GROUP, {"type": "test.warm"})  # the pool holds a connection
    layer_redis.pause()
    started = time.monotonic()
    stopped_here = await control.stop_calls(StopOrder(reason="stopped_by_staff", request_id="no-such-call"))
    waited = time.monotonic() - started
    assert stopped_here == 0
    assert waited < control.PUBLISH_TIMEOUT_SECONDS + 1.0
    assert any("could not publish a stop order" in r.getMessage() for r in caplog.records)
