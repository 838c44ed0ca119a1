"""The first token of a stream goes to the client before the relay reads on.

An upstream that sends its answer in one burst (every chunk already in the socket's buffer)
lets the producer run without a pause: it would fill the queue before the response side ran
once, and the first token would wait for the rest to be read and parsed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from streaming.pipeline import END, Timeouts
from streaming.providers.base import ProviderChunk, ProviderRequest

from .test_relay_deadlines import a_chunk, relay_for

TIMEOUTS = Timeouts(first_token=5, idle=5, total=10, heartbeat=5)


def a_role_chunk() -> ProviderChunk:
    return ProviderChunk(data={"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, text="")


class Burst:
    """A role chunk, then `tokens` content chunks, all without waiting: an answer read at once."""

    name = "fake"

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.sent = 0

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderChunk]:
        yield a_role_chunk()
        for _ in range(self.tokens):
            self.sent += 1
            yield a_chunk()


async def test_the_first_token_of_a_burst_is_handed_over_before_the_rest_is_read() -> None:
    provider = Burst(100)
    relay = relay_for(provider, TIMEOUTS, queue_size=64)  # type: ignore[arg-type]
    relay.start()
    async with asyncio.timeout(5):
        role = await relay.get()
        first_token = await relay.get()
    assert isinstance(role, ProviderChunk) and role.text == ""
    assert isinstance(first_token, ProviderChunk) and first_token.text == "tok "
    assert provider.sent == 1  # the other 99 are still unread

    items = [await relay.get() for _ in range(100)]
    await relay.aclose()
    assert items[-1] is END and provider.sent == 100
    assert relay.outcome.status == "completed" and relay.outcome.content_chunks == 100


async def test_after_the_first_token_a_burst_is_read_ahead_up_to_the_queue_bound() -> None:
    provider = Burst(100)
    relay = relay_for(provider, TIMEOUTS, queue_size=8)  # type: ignore[arg-type]
    relay.start()
    async with asyncio.timeout(5):
        await relay.get()
        await relay.get()  # the first token
        for _ in range(10):
            await asyncio.sleep(0)  # turns enough for the producer to fill the queue, and more
    # The producer filled the queue and waits for room: bounded, however large the burst.
    assert relay.queue.full() and provider.sent == 1 + 8 + 1  # queued, and one waiting in put()
    await relay.aclose()
    assert relay.outcome.status == "cancelled"
