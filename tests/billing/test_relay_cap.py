"""The relay's completion-token cap: a call stops after exactly `cap` content chunks, with an
error event instead of [DONE], the upstream closed, and the call finished once, as rejected."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from calls.call import upstream_failure
from streaming.catalog import Deployment, ProviderSpec
from streaming.endpoints import ENDPOINTS
from streaming.pipeline import (
    CAP_REACHED,
    END,
    CallOutcome,
    CompletionCapReached,
    StreamRelay,
    Timeouts,
    sse_stream,
)
from streaming.providers.base import ProviderChunk, ProviderRequest, Usage

DEPLOYMENT = Deployment(provider=ProviderSpec(name="fake", kind="openai"), upstream_model="m")
TIMEOUTS = Timeouts(first_token=5, idle=5, total=10, heartbeat=5)


class CountingProvider:
    name = "fake"

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.sent = 0
        self.closed = False

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderChunk]:
        try:
            yield ProviderChunk(data={"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, text="")
            for _ in range(self.tokens):
                self.sent += 1
                yield ProviderChunk(data={"choices": [{"index": 0, "delta": {"content": "tok "}}]}, text="tok ")
            yield ProviderChunk(data={"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, text="")
            yield ProviderChunk(data={"choices": []}, text="", usage=Usage(prompt_tokens=3, completion_tokens=self.tokens))
        finally:
            self.closed = True


async def relay_frames(tokens: int, cap: int) -> tuple[list[bytes], list[CallOutcome], CountingProvider]:
    provider = CountingProvider(tokens)
    recorded: list[CallOutcome] = []
    relay = StreamRelay(
        provider=provider,
        request=ProviderRequest(endpoint=ENDPOINTS["chat.completions"], deployment=DEPLOYMENT, body={}),
        queue_size=4,
        timeouts=TIMEOUTS,
        count_text=lambda text: len(text.split()),
        completion_token_cap=cap,
    )

    async def finish() -> None:
        await relay.aclose()
        if not recorded:
            recorded.append(relay.outcome)

    relay.start()
    first = await relay.get()
    frames = [
        frame
        async for frame in sse_stream(
            relay,
            first,
            framer=ENDPOINTS["chat.completions"].framer(include_usage=False),
            finish=finish,
            heartbeat=5,
            on_error=upstream_failure,
        )
    ]
    return b"".join(frames).split(b"\n\n"), recorded, provider


def contents(frames: list[bytes]) -> int:
    return sum(b'"content":"tok "' in frame for frame in frames)


@pytest.mark.parametrize(
    ("tokens", "cap", "delivered", "status"),
    [(10, 3, 3, "rejected"), (3, 3, 3, "completed"), (10, 10_000, 10, "completed"), (0, 1, 0, "completed")],
    ids=["cut-at-cap", "exactly-cap", "under-cap", "empty-answer"],
)
async def test_the_cap_stops_the_call_after_exactly_cap_tokens(tokens, cap, delivered, status) -> None:
    frames, recorded, provider = await relay_frames(tokens, cap)
    assert contents(frames) == delivered
    assert len(recorded) == 1
    outcome = recorded[0]
    assert (outcome.status, outcome.content_chunks, outcome.completion.tokens()) == (status, delivered, delivered)
    assert provider.closed
    if status == "rejected":
        assert provider.sent == cap + 1  # the chunk past the cap was read, never forwarded
        assert isinstance(outcome.error, CompletionCapReached)
        assert outcome.upstream_usage is None  # billed from the text produced
        error = json.loads(frames[-2].removeprefix(b"data: "))["error"]
        assert error == {"message": CAP_REACHED.format(cap=cap), "type": "insufficient_quota", "param": None, "code": "budget_reservation_reached"}
        assert b"[DONE]" not in b"".join(frames)
    else:
        assert frames[-2] == b"data: [DONE]"


async def test_the_cap_error_reaches_a_non_streaming_consumer_as_an_upstream_error() -> None:
    provider = CountingProvider(10)
    relay = StreamRelay(provider=provider, request=ProviderRequest(endpoint=ENDPOINTS["chat.completions"], deployment=DEPLOYMENT, body={}), queue_size=64, timeouts=TIMEOUTS, count_text=len, completion_token_cap=2)
    relay.start()
    items = []
    while (item := await relay.get()) is not END and not isinstance(item, CompletionCapReached):
        items.append(item)
    await relay.aclose()
    assert isinstance(item, CompletionCapReached) and item.kind == "bad_request" and item.cap == 2
    assert sum(bool(chunk.text) for chunk in items) == 2

