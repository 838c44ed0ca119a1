"""The relay's deadlines (first token, idle, total) and the response's heartbeat, kept with one
timer per stream rather than one per chunk: they must still fire when they should, and only then."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from streaming import _sse
from streaming.catalog import Deployment, ProviderSpec
from streaming.endpoints import ENDPOINTS
from streaming.pipeline import END, StreamRelay, Timeouts, sse_stream
from streaming.providers.base import ProviderChunk, ProviderRequest, UpstreamError

DEPLOYMENT = Deployment(provider=ProviderSpec(name="fake", kind="openai"), upstream_model="m")


def a_chunk() -> ProviderChunk:
    return ProviderChunk(data={"choices": [{"index": 0, "delta": {"content": "tok "}}]}, text="tok ")


class Paced:
    """Sends `chunks` chunks `gap` seconds apart after `first_delay`, then goes silent (or ends)."""

    name = "fake"

    def __init__(self, chunks: int, *, gap: float, first_delay: float = 0.0, then_silent: bool = False) -> None:
        self.chunks, self.gap, self.first_delay, self.then_silent = chunks, gap, first_delay, then_silent
        self.sent = 0
        self.closed = False  # the stream was cut short (cancelled at an await, or closed at a yield)

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderChunk]:
        try:
            await asyncio.sleep(self.first_delay)
            for index in range(self.chunks):
                if index:
                    await asyncio.sleep(self.gap)
                self.sent += 1
                yield a_chunk()
            if self.then_silent:
                await asyncio.sleep(3600)
        except (asyncio.CancelledError, GeneratorExit):
            self.closed = True
            raise


def relay_for(provider: Paced, timeouts: Timeouts, *, queue_size: int = 64) -> StreamRelay:
    return StreamRelay(
        provider=provider,
        request=ProviderRequest(endpoint=ENDPOINTS["chat.completions"], deployment=DEPLOYMENT, body={}),
        queue_size=queue_size,
        timeouts=timeouts,
        count_text=len,
        completion_token_cap=10_000,
    )


async def drain(relay: StreamRelay) -> list[object]:
    items: list[object] = []
    async with asyncio.timeout(5):
        while True:
            item = await relay.get()
            items.append(item)
            if not isinstance(item, ProviderChunk):
                return items


async def test_chunks_closer_than_the_idle_timeout_never_trip_it_however_long_the_stream() -> None:
    # 30 chunks 20 ms apart last 0.6 s: far past the 0.1 s idle timeout, never silent that long.
    provider = Paced(30, gap=0.02)
    relay = relay_for(provider, Timeouts(first_token=1, idle=0.1, total=10, heartbeat=5))
    relay.start()
    items = await drain(relay)
    await relay.aclose()
    assert items[-1] is END and len(items) == 31
    assert relay.outcome.status == "completed"


async def test_silence_after_the_first_chunk_ends_in_the_idle_timeout_not_the_first_token_one() -> None:
    provider = Paced(2, gap=0.01, then_silent=True)
    relay = relay_for(provider, Timeouts(first_token=30, idle=0.1, total=60, heartbeat=5))
    loop = asyncio.get_running_loop()
    started = loop.time()
    relay.start()
    *chunks, last = await drain(relay)
    waited = loop.time() - started
    await relay.aclose()
    assert len(chunks) == 2
    assert isinstance(last, UpstreamError) and last.kind == "timeout" and "idle" in last.message
    assert 0.1 <= waited < 2  # the idle timeout, not the first-token one (30 s)
    assert provider.closed and relay.outcome.status == "timeout"


async def test_no_first_token_ends_in_the_first_token_timeout() -> None:
    relay = relay_for(Paced(1, gap=0, first_delay=3600), Timeouts(first_token=0.05, idle=5, total=60, heartbeat=5))
    relay.start()
    (last,) = await drain(relay)
    await relay.aclose()
    assert isinstance(last, UpstreamError) and "first token" in last.message


async def test_a_client_that_stops_reading_is_not_upstream_silence_but_the_total_still_applies() -> None:
    # The queue (2) fills at once; the producer then waits for room far longer than the idle
    # timeout without the upstream being blamed. The total timeout ends it all the same.
    provider = Paced(1_000, gap=0.0)
    relay = relay_for(provider, Timeouts(first_token=1, idle=0.05, total=0.6, heartbeat=5), queue_size=2)
    relay.start()
    await asyncio.sleep(0.3)  # six idle timeouts' worth, the client reading nothing
    assert relay.outcome.status == "completed" and not provider.closed  # nothing tripped yet
    await asyncio.sleep(0.5)  # past the total
    items = await drain(relay)
    await relay.aclose()
    assert isinstance(items[-1], UpstreamError) and "total timeout" in items[-1].message
    assert relay.outcome.status == "timeout" and provider.closed


async def test_a_stream_with_chunks_flowing_gets_no_heartbeat_and_an_idle_one_does() -> None:
    finished: list[bool] = []

    async def finish() -> None:
        finished.append(True)

    async def frames_of(provider: Paced) -> list[bytes]:
        relay = relay_for(provider, Timeouts(first_token=1, idle=5, total=10, heartbeat=0.1))
        relay.start()
        first = await relay.get()
        stream = sse_stream(relay, first, framer=ENDPOINTS["chat.completions"].framer(include_usage=False), finish=finish, heartbeat=0.1, on_error=lambda error: error)
        frames = [frame async for frame in stream]
        await relay.aclose()
        return frames

    busy = await frames_of(Paced(20, gap=0.03))  # 0.6 s of chunks, never 0.1 s apart
    assert _sse.HEARTBEAT not in busy
    quiet = await frames_of(Paced(2, gap=0.35))  # one gap of 0.35 s: three heartbeats' worth
    assert 2 <= quiet.count(_sse.HEARTBEAT) <= 4
    assert quiet[-1] == _sse.DONE and finished
