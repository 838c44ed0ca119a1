"""The channel layer on the local Redis Cluster (REDIS_CLUSTER: channels-redis's pub/sub layer):
this process's layer is attached to one master, "another process's" to another, and the console's
live reports, the requests for them and staff stop orders still reach every listener, since
Redis Cluster delivers a PUBLISH on one node to the subscribers of every node.

Each test uses a channel prefix of its own (so its groups are its own on the shared cluster), and
flushes both layers at the end: pub/sub keeps nothing in Redis."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio as aioredis
from channels.layers import channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings

from calls import control, live
from calls.control import CONTROL_GROUP, STOP_MESSAGE, StopOrder
from infra.redis import channel_layer
from llmgateway.console_live import ConsoleLiveConsumer
from tests.console.test_console_live import a_running_call, next_of
from tests.redis_cluster import primary_urls, require_cluster


class Layers:
    """This process's layer (get_channel_layer(), on the first master) and another process's (on
    the second), sharing a channel prefix."""

    def __init__(self, here: Any, elsewhere: RedisPubSubChannelLayer, prefix: str, nodes: list[str]) -> None:
        self.here, self.elsewhere, self.prefix, self.nodes = here, elsewhere, prefix, nodes

    async def subscribed(self, node: int, group: str) -> None:
        """Wait until the node counts a subscriber to the group (a PUBLISH before that is lost)."""
        name = f"{self.prefix}__group__{group}"
        client = aioredis.Redis.from_url(self.nodes[node])
        try:
            for _ in range(500):  # 5 s
                if dict(await client.pubsub_numsub(name)).get(name.encode(), 0) >= 1:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"nothing subscribed to {name} on {self.nodes[node]}")
        finally:
            await client.aclose()


@pytest.fixture
async def layers() -> AsyncIterator[Layers]:
    nodes = primary_urls(require_cluster())
    prefix = f"test{uuid.uuid4().hex[:8]}."
    previous = settings.CHANNEL_LAYERS
    settings.CHANNEL_LAYERS = {"default": channel_layer(nodes[0], cluster=True, prefix=prefix)}
    channel_layers.backends.clear()
    elsewhere = RedisPubSubChannelLayer(**channel_layer(nodes[1], cluster=True, prefix=prefix)["CONFIG"])
    try:
        yield Layers(get_channel_layer(), elsewhere, prefix, nodes)
    finally:
        await elsewhere.flush()
        await get_channel_layer().flush()
        settings.CHANNEL_LAYERS = previous
        channel_layers.backends.clear()


async def test_group_send_reaches_a_layer_attached_to_another_node(layers: Layers) -> None:
    channel = await layers.elsewhere.new_channel()
    await layers.elsewhere.group_add("g", channel)
    await layers.subscribed(1, "g")
    await layers.here.group_send("g", {"type": "hello", "n": 1})
    async with asyncio.timeout(5):
        assert await layers.elsewhere.receive(channel) == {"type": "hello", "n": 1}


async def test_a_stop_order_from_another_node_stops_the_call_even_after_the_listener_rejoined(
    layers: Layers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener joins its group again every REJOIN_SECONDS without dropping its channel
    (the pub/sub layer forgets a channel whose receive is cancelled)."""
    monkeypatch.setattr(control, "REJOIN_SECONDS", 0.1)
    stopped: list[str] = []
    heard = asyncio.Event()

    def stop(reason: str, message: str) -> None:
        stopped.append(reason)
        heard.set()

    call: Any = SimpleNamespace(
        request_id=uuid.uuid4(), principal=SimpleNamespace(api_key_id=3, user_id=7), stop=stop
    )
    control.active_calls.add(call)
    listening = asyncio.get_running_loop().create_task(control._listen())
    try:
        with caplog.at_level(logging.WARNING, logger="calls.control"):
            await layers.subscribed(0, CONTROL_GROUP)
            await asyncio.sleep(0.35)  # a few rejoins
            order = StopOrder(reason="stopped_by_staff", request_id=str(call.request_id))
            await layers.elsewhere.group_send(CONTROL_GROUP, {"type": STOP_MESSAGE, **asdict(order)})
            async with asyncio.timeout(5):
                await heard.wait()
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        control.active_calls.remove(call)
    assert stopped == ["stopped_by_staff"]
    assert [record.getMessage() for record in caplog.records] == []


@pytest.mark.django_db(transaction=True)
async def test_the_console_shows_other_nodes_reports_and_its_stops_reach_them(layers: Layers, staff_factory) -> None:
    operator = await asyncio.to_thread(staff_factory, "olga", "billing.view_usagerecord", "billing.stop_call")
    listener = await layers.elsewhere.new_channel()  # another process's stop-order listener
    await layers.elsewhere.group_add(CONTROL_GROUP, listener)
    await layers.subscribed(1, CONTROL_GROUP)
    communicator = WebsocketCommunicator(ConsoleLiveConsumer.as_asgi(), "/ws/console/")
    communicator.scope["user"] = operator
    assert (await communicator.connect())[0]
    await layers.subscribed(0, live.LIVE_GROUP)

    report = live.LiveReporter(control.ActiveCalls(), "host-b:2").report(always=True)
    assert report is not None
    await layers.elsewhere.group_send(live.LIVE_GROUP, {**report, "calls": [live.running_call(a_running_call(user="bob"))]})
    while "bob" not in [call["user"] for call in (await next_of(communicator, "streams", within=5))["calls"]]:
        pass

    request_id = str(uuid.uuid4())
    await communicator.send_json_to({"action": "stop", "request_id": request_id})
    assert (await next_of(communicator, "stop_sent"))["request_id"] == request_id
    async with asyncio.timeout(5):
        while (order := await layers.elsewhere.receive(listener))["type"] != STOP_MESSAGE:
            pass  # the console's request for reports comes first
    assert (order["reason"], order["request_id"]) == ("stopped_by_staff", request_id)
    await communicator.disconnect()
