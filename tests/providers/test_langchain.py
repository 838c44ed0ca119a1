"""The langchain provider: a model served by a LangChain chat model or runnable named by dotted path.

Its stream is OpenAI's `chat.completion.chunk`s (a role chunk, content and tool-call deltas, a
finish chunk, then usage when the model reported it), it goes through the real pipeline's bounded
queue, and closing or timing out a call stops the LangChain stream. No network: langchain-core's
fake chat models, and `tests.providers.runnables` (see there for why each one).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from streaming.aggregate import CompletionBuilder
from streaming.catalog import Deployment, ProviderSpec
from streaming.endpoints import ENDPOINTS
from streaming.pipeline import StreamRelay, Timeouts
from streaming.providers.base import ProviderChunk, ProviderRequest, UpstreamError, Usage
from streaming.providers.langchain import LangChainConfigError, LangChainProvider, load_runnable
from streaming.tokens import count_text_tokens
from testbed.fake_upstream import await_until
from tests.providers.runnables import BUILDS, PROBES, Probe

FAKES = "langchain_core.language_models.fake_chat_models"
RUNNABLES = "tests.providers.runnables"
USER_ONLY = {"model": "lc-chat", "messages": [{"role": "user", "content": "Say hello."}]}
TIMEOUTS = Timeouts(first_token=5, idle=5, total=10, heartbeat=5)
_probe_names = itertools.count()


def spec_for(runnable: str, **kwargs: Any) -> ProviderSpec:
    return ProviderSpec(name="lc-test", kind="langchain", options={"runnable": runnable, "kwargs": kwargs})


def request_for(spec: ProviderSpec, body: dict[str, Any] | None = None) -> ProviderRequest:
    return ProviderRequest(endpoint=ENDPOINTS["chat.completions"], deployment=Deployment(provider=spec, upstream_model="fake"), body=body or USER_ONLY, request_id="req-1")


async def stream_of(provider: LangChainProvider, body: dict[str, Any] | None = None) -> list[ProviderChunk]:
    spec = spec_for("unused")
    return [chunk async for chunk in provider.stream(request_for(spec, body))]


def contents(chunks: list[ProviderChunk]) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk.data["choices"])


@pytest.fixture
def probe() -> Iterator[tuple[str, Probe]]:
    """A fresh probe name for a ScriptedChatModel, and the probe it fills."""
    name = f"probe-{next(_probe_names)}"
    PROBES[name] = Probe()
    yield name, PROBES[name]
    del PROBES[name]


def scripted(probe_name: str, chunks: list[dict[str, Any]], **options: Any) -> LangChainProvider:
    return LangChainProvider(spec_for(f"{RUNNABLES}:ScriptedChatModel", chunks=chunks, probe=probe_name, **options))


# --- langchain-core's fake chat models -------------------------------------------------------------


@pytest.mark.parametrize("path", [f"{FAKES}:FakeListChatModel", f"{FAKES}.FakeListChatModel"], ids=["colon", "dotted"])
async def test_a_chat_model_class_named_by_path_streams_its_answer_as_openai_chunks(path: str) -> None:
    provider = LangChainProvider(spec_for(path, responses=["Hello there, friend."]))

    chunks = await stream_of(provider)

    assert contents(chunks) == "Hello there, friend."
    first, *middle, last = chunks
    assert first.data["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last.data["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(chunk.text == chunk.data["choices"][0]["delta"]["content"] for chunk in middle)
    assert {(chunk.data["id"], chunk.data["object"], chunk.data["model"]) for chunk in chunks} == {
        (first.data["id"], "chat.completion.chunk", "fake")
    }
    # The fake reports no usage: no usage chunk, so the gateway counts the text itself.
    assert all(chunk.usage is None and chunk.data["choices"] for chunk in chunks)


async def test_the_model_is_built_once_off_the_event_loop_and_every_call_reuses_it() -> None:
    answers = ["First answer.", "Second answer.", "Third answer."]
    provider = LangChainProvider(spec_for(f"{RUNNABLES}:counted_fake_chat_model", key="built-once", answers=answers))

    # Three calls at once, before anything was built: they wait for one build.
    streams = await asyncio.gather(*(stream_of(provider) for _ in answers))
    later = await stream_of(provider)

    (thread,) = BUILDS.pop("built-once")
    assert thread != threading.current_thread().name  # importing an integration takes seconds of CPU
    # GenericFakeChatModel answers from one iterator: each call got the next answer of one model.
    assert sorted(contents(chunks) for chunks in streams) == sorted(answers)
    assert contents(later) == "First answer."


async def test_a_chain_that_streams_strings_serves_too_and_gets_the_messages_alone() -> None:
    provider = LangChainProvider(spec_for(f"{RUNNABLES}:fake_chat_model_as_text", answers=["Plain text, word by word."]))

    chunks = await stream_of(provider, {**USER_ONLY, "temperature": 0.5, "stop": ["\n"]})

    assert contents(chunks) == "Plain text, word by word."
    assert [chunk.text for chunk in chunks[1:4]] == ["Plain", " ", "text,"]
    assert chunks[-1].data["choices"][0]["finish_reason"] == "stop"


async def test_generic_fakes_tool_calls_stream_as_tool_call_deltas() -> None:
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},
    ]
    provider = LangChainProvider(spec_for(f"{RUNNABLES}:fake_tool_calling_model", tool_calls=calls))

    chunks = await stream_of(provider)

    builder = CompletionBuilder()
    for chunk in chunks:
        builder.add(chunk.data)
    message = builder.build(usage={})["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},
    ]
    # The generated text the gateway counts includes the calls' names and arguments.
    assert "".join(chunk.text for chunk in chunks) == 'get_weather{"city": "Paris"}get_time{"zone": "CET"}'


async def test_a_model_that_cannot_stream_answers_once_with_its_tool_calls_and_usage() -> None:
    provider = LangChainProvider(
        spec_for(
            f"{RUNNABLES}:whole_answer_model",
            content="Checking.",
            tool_calls=[{"id": "call_1", "name": "lookup", "args": {"q": "gateway"}}],
            usage={"input_tokens": 21, "output_tokens": 9, "total_tokens": 30},
        )
    )

    chunks = await stream_of(provider)

    assert [chunk.data["choices"][0]["delta"] if chunk.data["choices"] else "usage" for chunk in chunks] == [
        {"role": "assistant", "content": ""},
        {
            "content": "Checking.",
            "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":"gateway"}'}}
            ],
        },
        {},
        "usage",
    ]
    assert chunks[-2].data["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1].usage == Usage(prompt_tokens=21, completion_tokens=9)


# --- usage, tool-call chunks, parameters (the scripted chat model) -----------------------------------


async def test_usage_metadata_summed_over_the_chunks_becomes_the_usage_chunk(probe: tuple[str, Probe]) -> None:
    # Split as Anthropic's models report it: input tokens first, output tokens at the end.
    provider = scripted(
        probe[0],
        [
            {"content": "", "usage_metadata": {"input_tokens": 120, "output_tokens": 0, "total_tokens": 120, "input_token_details": {"cache_read": 100}}},
            {"content": "Hello"},
            {"content": " world"},
            {
                "content": "",
                "usage_metadata": {"input_tokens": 0, "output_tokens": 40, "total_tokens": 40, "output_token_details": {"reasoning": 30}},
                "response_metadata": {"stop_reason": "end_turn"},
            },
        ],
    )

    chunks = await stream_of(provider)

    assert contents(chunks) == "Hello world"
    finish, usage = chunks[-2:]
    assert finish.data["choices"][0]["finish_reason"] == "stop"
    assert usage.usage == Usage(prompt_tokens=120, completion_tokens=40, cached_tokens=100, reasoning_tokens=30)
    assert usage.data["choices"] == [] and usage.text == ""
    assert usage.data["usage"] == {
        "prompt_tokens": 120,
        "completion_tokens": 40,
        "total_tokens": 160,
        "prompt_tokens_details": {"cached_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 30},
    }


async def test_tool_call_chunks_stream_as_openai_tool_call_deltas(probe: tuple[str, Probe]) -> None:
    provider = scripted(
        probe[0],
        [
            {"content": "", "tool_call_chunks": [{"index": 0, "id": "call_1", "name": "add", "args": '{"a":'}]},
            {"content": "", "tool_call_chunks": [{"index": 0, "args": " 1}"}]},
            {"content": "", "tool_call_chunks": [{"index": 1, "id": "call_2", "name": "neg", "args": ""}]},
            {"content": "", "tool_call_chunks": [{"index": 1, "args": '{"x": 2}'}], "response_metadata": {"finish_reason": "tool_calls"}},
        ],
    )

    chunks = await stream_of(provider)

    assert [chunk.data["choices"][0]["delta"].get("tool_calls") for chunk in chunks[1:-1]] == [
        [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":'}}],
        [{"index": 0, "function": {"arguments": " 1}"}}],
        [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "neg", "arguments": ""}}],
        [{"index": 1, "function": {"arguments": '{"x": 2}'}}],
    ]
    assert chunks[-1].data["choices"][0]["finish_reason"] == "tool_calls"


async def test_openai_messages_reach_the_model_as_langchain_messages(probe: tuple[str, Probe]) -> None:
    name, seen = probe
    provider = scripted(name, [{"content": "ok"}])
    body: dict[str, Any] = {
        "model": "lc-chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "name": "ana", "content": [{"type": "text", "text": "What is here?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"where": "here"}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "look", "arguments": "not json"}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "A cat."},
        ],
    }

    await stream_of(provider, body)

    (messages, _), = seen.calls
    system, developer, user, assistant, tool = messages
    assert isinstance(system, SystemMessage) and system.content == "Be brief." and "__openai_role__" not in system.additional_kwargs
    assert isinstance(developer, SystemMessage) and developer.additional_kwargs == {"__openai_role__": "developer"}
    assert developer.text == "Answer in French."
    assert isinstance(user, HumanMessage) and user.name == "ana" and user.content == body["messages"][2]["content"]
    assert isinstance(assistant, AIMessage) and assistant.content == ""
    assert assistant.tool_calls == [{"type": "tool_call", "id": "call_1", "name": "look", "args": {"where": "here"}}]
    assert [(call["id"], call["args"]) for call in assistant.invalid_tool_calls] == [("call_2", "not json")]
    assert isinstance(tool, ToolMessage) and tool.tool_call_id == "call_1" and tool.content == "A cat."


async def test_sampling_parameters_and_tools_reach_a_chat_model_and_the_rest_is_dropped(probe: tuple[str, Probe]) -> None:
    name, seen = probe
    provider = scripted(name, [{"content": "ok"}])
    tools = [
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "neg", "parameters": {"type": "object"}}},
    ]
    body = {
        **USER_ONLY,
        "temperature": 0.2,
        "top_p": 0.9,
        "max_completion_tokens": 50,
        "stop": "END",
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "neg"}},
        "seed": 7,
        "presence_penalty": 0.5,
        "response_format": {"type": "json_object"},
        "user": "someone",
    }

    await stream_of(provider, body)

    (_, kwargs), = seen.calls
    assert kwargs == {"stop": ["END"], "temperature": 0.2, "top_p": 0.9, "max_tokens": 50, "tools": tools, "tool_choice": "neg"}


async def test_allowed_tools_bind_only_those_tools(probe: tuple[str, Probe]) -> None:
    name, seen = probe
    provider = scripted(name, [{"content": "ok"}])
    tools = [
        {"type": "function", "function": {"name": "add"}},
        {"type": "function", "function": {"name": "neg"}},
    ]
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "add"}}]}}

    await stream_of(provider, {**USER_ONLY, "tools": tools, "tool_choice": choice})

    (_, kwargs), = seen.calls
    assert kwargs["tools"] == tools[:1] and kwargs["tool_choice"] == "required"


@pytest.mark.parametrize(
    ("runnable", "kwargs", "body", "message"),
    [
        (f"{FAKES}:FakeListChatModel", {"responses": ["x"]}, {**USER_ONLY, "n": 2}, "one answer per call"),
        (
            f"{RUNNABLES}:ScriptedChatModel",
            {"chunks": [{"content": "x"}]},
            {**USER_ONLY, "tools": [{"type": "custom", "custom": {"name": "grep"}}]},
            "function tools only",
        ),
        (
            f"{FAKES}:FakeListChatModel",
            {"responses": ["x"]},
            {**USER_ONLY, "tools": [{"type": "function", "function": {"name": "add"}}]},
            "does not take tools",
        ),
    ],
    ids=["n-above-1", "custom-tool", "tools-to-a-model-without-bind-tools"],
)
async def test_requests_the_provider_cannot_honour_are_refused_before_the_model_runs(
    runnable: str, kwargs: dict[str, Any], body: dict[str, Any], message: str
) -> None:
    provider = LangChainProvider(spec_for(runnable, **kwargs))
    chunks: list[ProviderChunk] = []

    with pytest.raises(UpstreamError) as raised:
        async for chunk in provider.stream(request_for(spec_for(runnable), body)):
            chunks.append(chunk)

    assert raised.value.kind == "bad_request" and message in raised.value.message
    assert chunks == []


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("rate_limit", "rate_limited"),
        ("model_timeout", "timeout"),
        ("model_connection", "connection"),
        ("invalid_request", "bad_request"),
        ("timeout", "timeout"),
        ("connection", "connection"),
        ("value", "server_error"),
    ],
)
async def test_a_models_exception_becomes_an_upstream_error_of_its_kind(error: str, kind: str, probe: tuple[str, Probe]) -> None:
    provider = scripted(probe[0], [{"content": "one "}, {"content": "two "}, {"content": "three"}], error=error, fail_after=2)
    chunks: list[ProviderChunk] = []

    with pytest.raises(UpstreamError) as raised:
        async for chunk in provider.stream(request_for(spec_for("unused"))):
            chunks.append(chunk)

    assert raised.value.kind == kind
    assert contents(chunks) == "one two "  # what came before the failure was streamed


async def test_a_runnable_that_streams_neither_text_nor_messages_is_a_server_error() -> None:
    provider = LangChainProvider(spec_for(f"{RUNNABLES}:answers_a_dict"))

    with pytest.raises(UpstreamError) as raised:
        await stream_of(provider)

    assert raised.value.kind == "server_error" and "streamed a dict" in raised.value.message


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("runnable", "kwargs", "message"),
    [
        ("tests.providers.no_such_module:Model", {}, "cannot import 'tests.providers.no_such_module'"),
        (f"{RUNNABLES}:NoSuchModel", {}, "has no attribute 'NoSuchModel'"),
        ("ChatOpenAI", {}, "is not a dotted path"),
        (f"{RUNNABLES}:not_a_runnable", {}, "neither a Runnable nor a class or factory"),
        (f"{RUNNABLES}:answers_a_dict", {"temperature": 1}, "is a Runnable object already: it takes no kwargs"),
        (f"{FAKES}:FakeListChatModel", {"responses": 5, "api_key": "sk-never-shown"}, "with its kwargs failed (ValidationError)"),
        (f"{RUNNABLES}:makes_no_runnable", {}, "returned a dict, not a LangChain Runnable"),
    ],
    ids=["no-module", "no-attribute", "no-module-part", "not-callable", "object-with-kwargs", "factory-fails", "factory-returns-other"],
)
async def test_a_wrong_runnable_fails_every_call_with_a_message_naming_it(runnable: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LangChainConfigError) as raised:
        load_runnable({"runnable": runnable, "kwargs": kwargs})
    assert message in str(raised.value) and runnable in str(raised.value)
    assert "sk-never-shown" not in str(raised.value)

    provider = LangChainProvider(spec_for(runnable, **kwargs))  # built anyway: its calls fail

    with pytest.raises(UpstreamError) as failed:
        await stream_of(provider)
    assert failed.value.kind == "server_error"
    assert failed.value.message == f"The langchain provider 'lc-test' cannot serve calls: {raised.value}."


async def test_without_langchain_core_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "langchain_core.runnables", None)  # as if not installed

    provider = LangChainProvider(spec_for(f"{FAKES}:FakeListChatModel", responses=["x"]))

    with pytest.raises(UpstreamError) as failed:
        await stream_of(provider)
    assert failed.value.kind == "server_error"
    assert f"{FAKES}:FakeListChatModel" in failed.value.message and "[langchain] extra" in failed.value.message


# --- through the pipeline --------------------------------------------------------------------------


def relay_for(provider: LangChainProvider, *, queue_size: int = 64, timeouts: Timeouts = TIMEOUTS) -> StreamRelay:
    return StreamRelay(
        provider=provider,
        request=request_for(spec_for("unused")),
        queue_size=queue_size,
        timeouts=timeouts,
        count_text=partial(count_text_tokens, model="gpt-4o"),
        completion_token_cap=10_000,
    )


async def drain(relay: StreamRelay) -> list[object]:
    items: list[object] = []
    async with asyncio.timeout(5):
        while isinstance(item := await relay.get(), ProviderChunk):
            items.append(item)
    return [*items, item]


async def test_chunks_flow_through_the_relays_bounded_queue(probe: tuple[str, Probe]) -> None:
    words = [{"content": f" w{index}"} for index in range(40)]
    usage = {"content": "", "usage_metadata": {"input_tokens": 12, "output_tokens": 40, "total_tokens": 52}}
    relay = relay_for(scripted(probe[0], [*words, usage]), queue_size=2)
    relay.start()
    try:
        # The client reads nothing yet: the producer fills the queue and waits, so the model waits.
        assert await await_until(lambda: relay.queue.full() and relay.backpressure_waits > 0)
        assert probe[1].chunks_sent < len(words)
        *chunks, end = await drain(relay)
    finally:
        await relay.aclose()

    assert type(end).__name__ == "_End"
    assert contents(chunks) == "".join(word["content"] for word in words)  # type: ignore[arg-type]
    assert relay.outcome.status == "completed"
    assert relay.outcome.upstream_usage == Usage(prompt_tokens=12, completion_tokens=40)


async def test_without_usage_the_pipeline_counts_the_streamed_text() -> None:
    answer = "A fake model reports no usage, so the gateway counts these words itself."
    relay = relay_for(LangChainProvider(spec_for(f"{RUNNABLES}:fake_chat_model", answers=[answer])))
    relay.start()
    try:
        *chunks, _ = await drain(relay)
    finally:
        await relay.aclose()

    assert contents(chunks) == answer  # type: ignore[arg-type]
    assert relay.outcome.status == "completed" and relay.outcome.upstream_usage is None
    assert relay.outcome.completion is not None
    assert relay.outcome.completion.tokens() == count_text_tokens(answer, model="gpt-4o")


def other_tasks() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


async def test_closing_the_relay_mid_stream_cancels_the_model_at_once(probe: tuple[str, Probe]) -> None:
    name, seen = probe
    relay = relay_for(scripted(name, [{"content": "tok "}], delay=0.01, forever=True))
    relay.start()
    for _ in range(4):
        assert isinstance(await relay.get(), ProviderChunk)

    await relay.aclose()

    # The model was awaiting its next token: the cancel landed there, and LangChain's run ended
    # with it, before aclose() returned.
    assert seen.cancelled == 1 and seen.finished == 0
    assert seen.runs == ["CancelledError"]
    assert relay.outcome.status == "cancelled"
    assert other_tasks() == set()


async def test_closing_the_relay_while_the_queue_is_full_closes_the_model_stream(probe: tuple[str, Probe]) -> None:
    name, seen = probe
    relay = relay_for(scripted(name, [{"content": "tok "}], forever=True), queue_size=1)
    relay.start()
    assert await await_until(lambda: relay.queue.full() and relay.backpressure_waits > 0)
    sent = seen.chunks_sent

    await relay.aclose()

    # The provider closed LangChain's stream (its run ended) before aclose() returned. The model's
    # own generator, parked at a yield, is dropped by BaseChatModel.astream and closed by Python
    # in a task of its own on a later loop turn (see the provider's docstring).
    assert seen.runs == ["GeneratorExit"]
    assert await await_until(lambda: seen.closed == 1, timeout=2)
    assert seen.chunks_sent == sent and seen.finished == 0
    assert relay.outcome.status == "cancelled"
    assert await await_until(lambda: other_tasks() == set(), timeout=2)


@pytest.mark.parametrize(
    ("options", "timeouts", "message"),
    [
        ({"first_delay": 30}, Timeouts(first_token=0.05, idle=5, total=10, heartbeat=5), "no first token"),
        ({"delay": 30}, Timeouts(first_token=5, idle=0.05, total=10, heartbeat=5), "stopped sending"),
    ],
    ids=["first-token", "idle"],
)
async def test_a_silent_model_ends_in_a_timeout_and_is_cancelled(
    options: dict[str, Any], timeouts: Timeouts, message: str, probe: tuple[str, Probe]
) -> None:
    name, seen = probe
    relay = relay_for(scripted(name, [{"content": "first "}, {"content": "second"}], **options), timeouts=timeouts)
    relay.start()
    try:
        *_, last = await drain(relay)
    finally:
        await relay.aclose()

    assert isinstance(last, UpstreamError) and last.kind == "timeout" and message in last.message
    assert relay.outcome.status == "timeout"
    assert seen.cancelled == 1 and seen.finished == 0 and seen.runs == ["CancelledError"]
