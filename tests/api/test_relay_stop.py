"""Stopping a relay (staff stop, key revoked): the client always gets the stop as its last item,
even when the producer was waiting on a full queue to hand over its own last item."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from streaming.catalog import Deployment, ProviderSpec
from streaming.endpoints import ENDPOINTS
from streaming.pipeline import CallStopped, StreamRelay, Timeouts
from streaming.providers.base import ProviderChunk, ProviderRequest, UpstreamError

DEPLOYMENT = Deployment(provider=ProviderSpec(name="fake", kind="openai"), upstream_model="m")
TIMEOUTS = Timeouts(first_token=5, idle=5, total=10, heartbeat=5)


class FailingAfter:
    """Sends `chunks` chunks, then fails, or (fail=False) keeps sending."""

    name = "fake"

    def __init__(self, chunks: int, *, fail: bool) -> None:
        self.chunks = chunks
        self.fail = fail

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderChunk]:
        for _ in range(self.chunks):
            yield ProviderChunk(data={"choices": [{"index": 0, "delta": {"content": "tok "}}]}, text="tok ")
        if self.fail:
            raise UpstreamError("server_error", "boom")
        while True:
            await asyncio.sleep(0.01)
            yield ProviderChunk(data={"choices": [{"index": 0, "delta": {"content": "tok "}}]}, text="tok ")


async def items_after_a_stop(provider: FailingAfter) -> list[object]:
    relay = StreamRelay(
        provider=provider, request=ProviderRequest(endpoint=ENDPOINTS["chat.completions"], deployment=DEPLOYMENT, body={}), queue_size=2, timeouts=TIMEOUTS,
        count_text=len, completion_token_cap=1_000,
    )
    relay.start()
    items: list[object] = [await relay.get() for _ in range(3)]  # then the client stops reading
    await asyncio.sleep(0.05)  # the queue fills again; the producer waits to hand over its next item
    relay.stop(CallStopped("stopped_by_staff", "Stopped."))
    async with asyncio.timeout(2):
        while not isinstance(item := await relay.get(), UpstreamError):
            items.append(item)
    await relay.aclose()
    return [*items, item, relay.outcome]


@pytest.mark.parametrize("fail", [True, False], ids=["waiting-with-its-error", "waiting-with-a-chunk"])
async def test_a_stop_is_the_last_item_even_when_the_queue_was_full(fail: bool) -> None:
    *chunks, last, outcome = await items_after_a_stop(FailingAfter(5, fail=fail))
    assert isinstance(last, CallStopped) and last.reason == "stopped_by_staff"
    assert all(isinstance(chunk, ProviderChunk) for chunk in chunks) and len(chunks) <= 3 + 2
    assert outcome.status == "cancelled" and outcome.error is last
