"""How the response writes the frames that are ready: joined into writes of about WRITE_BYTES, so
that a burst costs few writes and a client that stops reading leaves the server holding a few
small writes, not the relay's whole queue in each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from streaming import _sse
from streaming.endpoints import ENDPOINTS
from streaming.pipeline import WRITE_BYTES, Timeouts, sse_stream
from streaming.providers.base import ProviderChunk, ProviderRequest
from tests.api.test_relay_deadlines import Paced, relay_for


class Burst(Paced):
    """`chunks` chunks at once; `all_sent` is set once the relay has taken the last one."""

    def __init__(self, chunks: int) -> None:
        super().__init__(chunks, gap=0.0)
        self.all_sent = asyncio.Event()

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderChunk]:
        async for chunk in super().stream(request):
            yield chunk
        self.all_sent.set()


async def nothing() -> None:
    return None


async def test_a_burst_of_ready_frames_goes_out_in_writes_of_about_write_bytes_in_order() -> None:
    provider = Burst(300)
    relay = relay_for(provider, Timeouts(first_token=1, idle=5, total=10, heartbeat=5), queue_size=512)
    relay.start()
    await asyncio.wait_for(provider.all_sent.wait(), 5)  # all 300 wait in the queue
    first = await relay.get()
    framer = ENDPOINTS["chat.completions"].framer(include_usage=False)
    stream = sse_stream(relay, first, framer=framer, finish=nothing, heartbeat=5, on_error=lambda error: error)
    writes = [write async for write in stream]
    await relay.aclose()

    *data_writes, last = writes
    assert last == _sse.DONE
    frame = data_writes[0].split(b"\n\n")[0] + b"\n\n"
    assert b"".join(data_writes) == frame * 300  # every frame, once, in order
    assert all(len(write) < WRITE_BYTES + len(frame) for write in data_writes)
    assert all(len(write) >= WRITE_BYTES for write in data_writes[:-1])  # joined, not one by one
