"""The langchain provider serving `langchain_openai:ChatOpenAI` against the project's fake upstream.

What the fake sent (its `tokens` deltas of `token_text`, its usage) is what the provider streams;
the body the upstream received says the same as the client's; its failures keep their kinds; and
stopping a call closes the upstream connection.

One event loop for the module: langchain-openai keeps one HTTP client per base URL for the process,
and its pooled connections belong to the loop that opened them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import orjson
import pytest

from streaming.catalog import Deployment, ProviderSpec
from streaming.endpoints import ENDPOINTS
from streaming.pipeline import StreamRelay, Timeouts
from streaming.providers.base import ProviderChunk, ProviderRequest, UpstreamError, Usage
from streaming.providers.langchain import LangChainProvider
from streaming.providers.openai import RATE_LIMIT_HEADERS
from streaming.tokens import count_text_tokens
from testbed.fake_upstream import FakeUpstream, await_until, prompt_tokens_for

pytestmark = pytest.mark.asyncio(loop_scope="module")

USER_ONLY = {"model": "lc-openai", "messages": [{"role": "user", "content": "Say something."}]}
_ids = itertools.count()


@pytest.fixture
def chat_openai(fake_upstream: FakeUpstream) -> Iterator[ProviderSpec]:
    """A langchain provider serving ChatOpenAI pointed at the fake upstream (SDK retries off)."""
    yield ProviderSpec(
        name="lc-openai",
        kind="langchain",
        options={
            "runnable": "langchain_openai:ChatOpenAI",
            "kwargs": {
                "model": "gpt-4o-mini",
                "base_url": fake_upstream.base_url,
                "api_key": "sk-test-upstream",
                "max_retries": 0,
                "stream_usage": True,
            },
        },
    )


def request_for(spec: ProviderSpec, body: dict[str, Any] | None = None) -> ProviderRequest:
    return ProviderRequest(
        endpoint=ENDPOINTS["chat.completions"], deployment=Deployment(provider=spec, upstream_model="gpt-4o-mini"), body=body or USER_ONLY, request_id=f"req-{next(_ids)}"
    )


async def test_the_text_and_usage_are_what_the_upstream_sent(chat_openai: ProviderSpec, fake_upstream: FakeUpstream) -> None:
    fake_upstream.tokens = 7
    provider = LangChainProvider(chat_openai)

    chunks = [chunk async for chunk in provider.stream(request_for(chat_openai))]

    sent = fake_upstream.requests[-1]
    assert sent.completed and sent.body["model"] == "gpt-4o-mini" and sent.body["stream_options"] == {"include_usage": True}
    assert "".join(chunk.text for chunk in chunks) == fake_upstream.token_text * 7
    assert chunks[0].data["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2].data["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1].usage == Usage(prompt_tokens=prompt_tokens_for(sent.body), completion_tokens=7)
    assert chunks[-1].data["usage"]["total_tokens"] == prompt_tokens_for(sent.body) + 7


async def test_the_upstream_receives_what_the_client_asked(chat_openai: ProviderSpec, fake_upstream: FakeUpstream) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {
            "role": "user",
            "name": "ana",
            "content": [{"type": "text", "text": "What is here?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"where": "here"}'}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "A cat."},
    ]
    tools = [{"type": "function", "function": {"name": "look", "parameters": {"type": "object", "properties": {"where": {"type": "string"}}}}}]
    body = {
        "model": "lc-openai",
        "messages": messages,
        "tools": tools,
        "tool_choice": "auto",
        "temperature": 0.3,
        "max_tokens": 20,
        "stop": "END",
        "seed": 7,
    }
    provider = LangChainProvider(chat_openai)

    _ = [chunk async for chunk in provider.stream(request_for(chat_openai, body))]

    sent = fake_upstream.requests[-1].body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": messages[1]["content"]},
        {"role": "user", "name": "ana", "content": messages[2]["content"]},
        {"role": "assistant", "content": None, "tool_calls": messages[3]["tool_calls"]},
        {"role": "tool", "tool_call_id": "call_1", "content": "A cat."},
    ]
    assert orjson.loads(sent["messages"][3]["tool_calls"][0]["function"]["arguments"]) == {"where": "here"}
    assert sent["tools"] == tools and sent["tool_choice"] == "auto"
    assert (sent["temperature"], sent["max_completion_tokens"], sent["stop"]) == (0.3, 20, ["END"])
    assert "seed" not in sent  # not a parameter every chat model takes: dropped


async def test_the_providers_base_url_and_key_variable_reach_the_model(
    fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LC_TEST_API_KEY", "sk-from-the-environment")
    spec = ProviderSpec(
        name="lc-openai-env",
        kind="langchain",
        base_url=fake_upstream.base_url,
        api_key_env="LC_TEST_API_KEY",
        options={"runnable": "langchain_openai:ChatOpenAI", "kwargs": {"model": "gpt-4o-mini", "max_retries": 0}},
    )

    chunks = [chunk async for chunk in LangChainProvider(spec).stream(request_for(spec))]

    assert "".join(chunk.text for chunk in chunks) == fake_upstream.token_text * fake_upstream.tokens
    assert fake_upstream.requests[-1].headers["authorization"] == "Bearer sk-from-the-environment"


@pytest.mark.parametrize(
    ("fault", "kind", "status"),
    [("429", "rate_limited", 429), ("500", "server_error", 500), ("401", "auth", 401), ("400", "bad_request", 400)],
)
async def test_an_upstream_refusal_keeps_its_kind(
    fault: str, kind: str, status: int, chat_openai: ProviderSpec, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.fault = fault  # type: ignore[assignment]
    fake_upstream.retry_after = 3
    provider = LangChainProvider(chat_openai)

    with pytest.raises(UpstreamError) as raised:
        async for _ in provider.stream(request_for(chat_openai)):
            pytest.fail("no chunk comes before a refusal")

    assert (raised.value.kind, raised.value.status) == (kind, status)
    if fault == "429":
        assert raised.value.retry_after == 3 and raised.value.headers["retry-after"] == "3"


async def test_a_connection_cut_mid_stream_is_a_connection_error_after_the_text_so_far(
    chat_openai: ProviderSpec, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.fault, fake_upstream.fault_after_tokens = "cut", 3
    provider = LangChainProvider(chat_openai)
    chunks: list[ProviderChunk] = []

    with pytest.raises(UpstreamError) as raised:
        async for chunk in provider.stream(request_for(chat_openai)):
            chunks.append(chunk)

    assert raised.value.kind == "connection"
    assert "".join(chunk.text for chunk in chunks) == fake_upstream.token_text * 3


def relay_for(spec: ProviderSpec, *, timeouts: Timeouts) -> StreamRelay:
    return StreamRelay(
        provider=LangChainProvider(spec),
        request=request_for(spec),
        queue_size=4,
        timeouts=timeouts,
        count_text=partial(count_text_tokens, model="gpt-4o-mini"),
        completion_token_cap=100_000,
    )


async def test_closing_the_relay_mid_stream_closes_the_upstream_connection(
    chat_openai: ProviderSpec, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.tokens, fake_upstream.inter_token_delay = 10_000, 0.005
    relay = relay_for(chat_openai, timeouts=Timeouts(first_token=5, idle=5, total=30, heartbeat=5))
    relay.start()
    for _ in range(5):
        assert isinstance(await relay.get(), ProviderChunk)
    sent = fake_upstream.requests[-1]

    await relay.aclose()

    assert await await_until(lambda: sent.client_disconnected, timeout=5)
    assert not sent.completed and sent.content_chunks_sent < 10_000
    assert relay.outcome.status == "cancelled" and relay.outcome.upstream_usage is None
    assert relay.outcome.completion is not None and relay.outcome.completion.tokens() > 0  # billed from the text


async def test_a_first_token_timeout_ends_the_call_and_closes_the_upstream_connection(
    chat_openai: ProviderSpec, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.ttft = 10
    relay = relay_for(chat_openai, timeouts=Timeouts(first_token=0.2, idle=5, total=30, heartbeat=5))
    relay.start()
    try:
        first = await relay.get()
    finally:
        await relay.aclose()

    assert isinstance(first, UpstreamError) and first.kind == "timeout"
    assert relay.outcome.status == "timeout"
    sent = fake_upstream.requests[-1]
    assert await await_until(lambda: sent.client_disconnected, timeout=5)


async def test_the_upstreams_rate_limit_headers_reach_the_gateway(fake_upstream: FakeUpstream, chat_openai: ProviderSpec) -> None:
    options = {**chat_openai.options, "kwargs": {**chat_openai.options["kwargs"], "include_response_headers": True}}
    spec = ProviderSpec(name="lc-openai-headers", kind="langchain", options=options)
    told: list[Mapping[str, str]] = []
    request = ProviderRequest(
        endpoint=ENDPOINTS["chat.completions"], deployment=Deployment(provider=spec, upstream_model="gpt-4o-mini"), body=USER_ONLY, on_response_headers=told.append
    )
    fake_upstream.rpm_limit, fake_upstream.tpm_limit = 10_000, 1_000_000
    fake_upstream.rate_limit_headers = True

    _ = [chunk async for chunk in LangChainProvider(spec).stream(request)]

    (headers,) = told
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-limit-tokens"]) == ("10000", "1000000")
    assert set(headers) <= set(RATE_LIMIT_HEADERS)
