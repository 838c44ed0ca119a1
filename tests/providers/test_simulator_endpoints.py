"""The simulator serves every endpoint with the events a real OpenAI upstream sends.

Its stream is driven directly (no pacing, no first-token delay), each event read by the
endpoint's own `chunk()`, and validated with the official SDK's pydantic types, so the shapes are
OpenAI's and not merely what the gateway happens to accept.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any, Literal

import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from streaming.catalog import SIMULATOR, Deployment
from streaming.endpoints import ENDPOINTS, EndpointName
from streaming.providers.base import ProviderChunk, ProviderRequest, UpstreamError
from streaming.providers.simulator import (
    ERROR_EVENT_MESSAGE,
    NOT_CANCELLABLE,
    NOT_FOUND,
    SimulatorProvider,
    simulated_text,
)
from streaming.tokens import count_text_tokens

MODEL = "sim-fast"
DEPLOYMENT = Deployment(provider=SIMULATOR, upstream_model=MODEL, options={"tokens_per_second": 0, "ttft_ms": 0})
RESPONSE_EVENT = TypeAdapter(ResponseStreamEvent)
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "detailed": {"type": "boolean"},
    },
    "required": ["city", "unit"],
}
MINIMAL_BODIES: dict[EndpointName, dict[str, Any]] = {
    "chat.completions": {"messages": [{"role": "user", "content": "Hi."}]},
    "responses": {"input": "Hi."},
    "completions": {"prompt": "Hi."},
    "embeddings": {"input": "Hi."},
}
WEATHER_ARGUMENTS = {"city": "sample", "unit": "celsius", "days": 1, "detailed": True}


def request_for(endpoint: EndpointName, body: dict[str, Any], **simulator: object) -> ProviderRequest:
    return ProviderRequest(
        endpoint=ENDPOINTS[endpoint],
        deployment=DEPLOYMENT,
        body={"model": MODEL, **body},
        simulator={name.replace("_", "-"): str(value) for name, value in simulator.items()},
    )


async def stream(endpoint: EndpointName, body: dict[str, Any], **simulator: object) -> list[ProviderChunk]:
    return [chunk async for chunk in SimulatorProvider().stream(request_for(endpoint, body, **simulator))]


def chat_chunks(chunks: list[ProviderChunk]) -> list[ChatCompletionChunk]:
    return [ChatCompletionChunk.model_validate(chunk.data) for chunk in chunks]


def choice_texts(chunks: list[ChatCompletionChunk]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts


def tool_arguments(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(
        call.function.arguments or ""
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or ()
        if call.function is not None
    )


# --- Chat completions ----------------------------------------------------------------------


async def test_chat_n_choices_interleave_and_are_billed_together() -> None:
    chunks = await stream("chat.completions", {"messages": [{"role": "user", "content": "Hi."}], "n": 3}, tokens=5)
    parsed = chat_chunks(chunks)

    texts = choice_texts(parsed)
    assert sorted(texts) == [0, 1, 2]
    assert texts[0] == "".join(simulated_text(index) for index in range(5))
    assert len(set(texts.values())) == 3  # each choice its own text
    content_indexes = [chunk.choices[0].index for chunk in parsed if chunk.choices and chunk.choices[0].delta.content]
    assert content_indexes[:6] == [0, 1, 2, 0, 1, 2]  # interleaved, token by token
    finishes = {chunk.choices[0].index: chunk.choices[0].finish_reason for chunk in parsed if chunk.choices and chunk.choices[0].finish_reason}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert parsed[-1].choices == [] and parsed[-1].usage is not None
    assert parsed[-1].usage.completion_tokens == 15
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 15
    assert {chunk.upstream_id for chunk in chunks} == {parsed[0].id}


async def test_chat_max_tokens_ends_with_length() -> None:
    parsed = chat_chunks(await stream("chat.completions", {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4}, tokens=10))
    assert choice_texts(parsed)[0] == "".join(simulated_text(index) for index in range(4))
    assert [c.choices[0].finish_reason for c in parsed if c.choices and c.choices[0].finish_reason] == ["length"]
    assert parsed[-1].usage is not None and parsed[-1].usage.completion_tokens == 4


@pytest.mark.parametrize("endpoint", ["chat.completions", "responses", "completions"])
async def test_a_huge_length_is_made_as_it_is_read(endpoint: EndpointName) -> None:
    """`x-simulator-tokens` far beyond memory: the stream starts at once, and stops when closed."""
    body = {**MINIMAL_BODIES[endpoint], "max_tokens": 10**12} if endpoint == "completions" else MINIMAL_BODIES[endpoint]
    chunks = SimulatorProvider().stream(request_for(endpoint, body, tokens=10**12))
    texts = [(await anext(chunks)).text for _ in range(8)]
    await chunks.aclose()  # type: ignore[attr-defined]
    assert simulated_text(0) in texts and simulated_text(2) in texts


async def test_chat_tool_call_round_trip() -> None:
    tools = [
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}},
    ]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    chunks = await stream("chat.completions", {"messages": messages, "tools": tools, "tool_choice": choice})
    parsed = chat_chunks(chunks)

    first = parsed[0].choices[0].delta
    assert first.role == "assistant" and first.content is None and first.tool_calls is not None
    call = first.tool_calls[0]
    assert call.index == 0 and call.type == "function" and call.id is not None and call.id.startswith("call_sim_")
    assert call.function is not None and call.function.name == "get_weather" and call.function.arguments == ""
    arguments = tool_arguments(parsed)
    assert json.loads(arguments) == WEATHER_ARGUMENTS
    assert len([c for c in parsed[1:] if c.choices and c.choices[0].delta.tool_calls]) > 1  # streamed in pieces
    assert [c.choices[0].finish_reason for c in parsed if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert parsed[-1].usage is not None and parsed[-1].usage.completion_tokens == count_text_tokens(arguments, model=MODEL)

    # The client runs the tool and sends its result: the answer is text.
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
    ]
    answer = chat_chunks(await stream("chat.completions", {"messages": messages, "tools": tools}, tokens=6))
    assert choice_texts(answer)[0] == "".join(simulated_text(index) for index in range(6))
    assert tool_arguments(answer) == ""
    assert [c.choices[0].finish_reason for c in answer if c.choices and c.choices[0].finish_reason] == ["stop"]


async def test_chat_tool_choice_none_and_first_tool_by_default() -> None:
    tools = [{"type": "function", "function": {"name": "first", "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "Hi."}]
    plain = chat_chunks(await stream("chat.completions", {"messages": messages, "tools": tools, "tool_choice": "none"}, tokens=3))
    assert tool_arguments(plain) == "" and choice_texts(plain)[0]
    called = chat_chunks(await stream("chat.completions", {"messages": messages, "tools": tools}))
    delta = called[0].choices[0].delta
    assert delta.tool_calls is not None and delta.tool_calls[0].function is not None
    assert delta.tool_calls[0].function.name == "first" and tool_arguments(called) == "{}"


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        pytest.param({"type": "json_object"}, None, id="json_object"),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_PARAMETERS, "strict": True}},
            WEATHER_ARGUMENTS,
            id="json_schema",
        ),
    ],
)
async def test_chat_structured_output_is_a_json_object(response_format: dict[str, Any], expected: dict[str, Any] | None) -> None:
    parsed = chat_chunks(await stream("chat.completions", {"messages": [{"role": "user", "content": "Hi."}], "response_format": response_format}, tokens=4))
    text = choice_texts(parsed)[0]
    value = json.loads(text)
    assert value == (expected or {"answer": "".join(simulated_text(index) for index in range(4))})
    assert parsed[-1].usage is not None and parsed[-1].usage.completion_tokens == count_text_tokens(text, model=MODEL)


async def test_chat_error_fault_is_an_error_event_raised_by_the_endpoint() -> None:
    seen: list[ProviderChunk] = []
    with pytest.raises(UpstreamError) as raised:
        async for chunk in SimulatorProvider().stream(request_for("chat.completions", {"messages": [{"role": "user", "content": "Hi."}]}, fault="error", fault_after=2)):
            seen.append(chunk)
    assert raised.value.kind == "server_error" and raised.value.message == ERROR_EVENT_MESSAGE
    assert [chunk.text for chunk in seen] == ["", simulated_text(0), simulated_text(1)]


@pytest.mark.parametrize("endpoint", ["chat.completions", "responses", "completions", "embeddings"])
async def test_request_faults_apply_to_every_endpoint(endpoint: EndpointName) -> None:
    body = MINIMAL_BODIES[endpoint]
    with pytest.raises(UpstreamError) as limited:
        await stream(endpoint, body, fault=429, retry_after=2)
    assert limited.value.status == 429 and limited.value.retry_after == 2
    with pytest.raises(UpstreamError) as failed:
        await stream(endpoint, body, fault=500)
    assert failed.value.status == 500
    assert await stream(endpoint, body, fault=500, fault_attempts=0)  # the fault spares this attempt


# --- Responses API -------------------------------------------------------------------------


def response_events(chunks: list[ProviderChunk]) -> list[Any]:
    return [RESPONSE_EVENT.validate_python(chunk.data) for chunk in chunks]


async def test_responses_events_in_openais_order_with_usage() -> None:
    body = {"input": "Say something.", "instructions": "Be brief."}
    chunks = await stream("responses", body, tokens=5)
    events = response_events(chunks)

    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    created, final = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.usage is None
    assert created.id.startswith("resp_sim_") and created.instructions == "Be brief." and created.model == MODEL
    text = "".join(simulated_text(index) for index in range(5))
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == text
    assert events[2].item.id.startswith("msg_sim_") and events[2].item.status == "in_progress"
    assert final.status == "completed" and final.output_text == text and final.id == created.id
    input_tokens = await ENDPOINTS["responses"].count_prompt_tokens({"model": MODEL, **body}, model=MODEL)
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (input_tokens, 5, input_tokens + 5)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert "".join(chunk.text for chunk in chunks) == text  # what the gateway tallies


async def test_responses_incomplete_at_max_output_tokens() -> None:
    events = response_events(await stream("responses", {"input": "Say something.", "max_output_tokens": 3}, tokens=10))
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.usage is not None and final.usage.output_tokens == 3
    assert len([event for event in events if event.type == "response.output_text.delta"]) == 3


async def test_responses_function_call_round_trip() -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS, "strict": True}]
    events = response_events(await stream("responses", {"input": "Weather in Paris?", "tools": tools}))
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added = events[2].item
    assert added.type == "function_call" and added.id.startswith("fc_sim_") and added.call_id.startswith("call_sim_")
    assert added.arguments == "" and added.status == "in_progress" and added.name == "get_weather"
    arguments = "".join(event.delta for event in events if event.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == WEATHER_ARGUMENTS
    final = events[-1].response
    assert final.output[0].type == "function_call" and final.output[0].arguments == arguments
    assert final.usage is not None and final.usage.output_tokens == count_text_tokens(arguments, model=MODEL)

    follow_up = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": added.call_id, "name": "get_weather", "arguments": arguments},
        {"type": "function_call_output", "call_id": added.call_id, "output": "18 degrees"},
    ]
    answer = response_events(await stream("responses", {"input": follow_up, "tools": tools}, tokens=4))
    assert answer[-1].response.output_text == "".join(simulated_text(index) for index in range(4))


async def test_responses_error_fault_is_a_numbered_error_event() -> None:
    seen: list[ProviderChunk] = []
    with pytest.raises(UpstreamError) as raised:
        async for chunk in SimulatorProvider().stream(request_for("responses", {"input": "Hi."}, fault="error", fault_after=1)):
            seen.append(chunk)
    assert raised.value.message == ERROR_EVENT_MESSAGE
    assert [chunk.data["type"] for chunk in seen][-1] == "response.output_text.delta"
    assert len(seen) == 5  # created, in_progress, item added, part added, one delta


async def test_responses_are_stored_read_and_deleted() -> None:
    provider = SimulatorProvider()
    events = response_events(await stream("responses", {"input": "Keep this."}, tokens=3))
    response_id = events[-1].response.id
    path = f"/responses/{response_id}"

    stored = await provider.stored(deployment=DEPLOYMENT, method="GET", path=path)
    assert Response.model_validate(stored) == events[-1].response
    with pytest.raises(UpstreamError) as refused:
        await provider.stored(deployment=DEPLOYMENT, method="POST", path=f"{path}/cancel")
    assert (refused.value.status, refused.value.message) == (400, NOT_CANCELLABLE)
    deleted = await provider.stored(deployment=DEPLOYMENT, method="DELETE", path=path)
    assert deleted == {"id": response_id, "object": "response.deleted", "deleted": True}
    methods: tuple[Literal["GET", "DELETE"], ...] = ("GET", "DELETE")
    for method in methods:
        with pytest.raises(UpstreamError) as missing:
            await provider.stored(deployment=DEPLOYMENT, method=method, path=path)
        assert (missing.value.kind, missing.value.status) == ("bad_request", 404)
        assert missing.value.message == NOT_FOUND.format(response_id=response_id)


async def test_responses_with_store_false_are_not_kept() -> None:
    events = response_events(await stream("responses", {"input": "Forget this.", "store": False}, tokens=2))
    assert events[-1].response.store is False
    with pytest.raises(UpstreamError):
        await SimulatorProvider().stored(deployment=DEPLOYMENT, method="GET", path=f"/responses/{events[-1].response.id}")


# --- Legacy completions --------------------------------------------------------------------


def completion_chunks(chunks: list[ProviderChunk]) -> list[tuple[Completion, list[str | None]]]:
    """Each chunk as the SDK's `Completion`, with its choices' finish reasons: OpenAI streams
    `finish_reason: null` until a choice's last chunk, which the SDK's type (shared with the whole
    answer) does not allow, so null is validated as "stop" and returned apart."""
    parsed = []
    for chunk in chunks:
        finishes = [choice["finish_reason"] for choice in chunk.data["choices"]]
        data = {**chunk.data, "choices": [{**choice, "finish_reason": choice["finish_reason"] or "stop"} for choice in chunk.data["choices"]]}
        parsed.append((Completion.model_validate(data), finishes))
    return parsed


async def test_completions_n_choices_and_usage_chunk() -> None:
    chunks = await stream("completions", {"prompt": "Once upon a time", "n": 2, "max_tokens": 5}, tokens=20)
    parsed = completion_chunks(chunks)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for completion, reasons in parsed:
        for choice, reason in zip(completion.choices, reasons, strict=True):
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if reason:
                finishes[choice.index] = reason
    assert texts[0] == "".join(simulated_text(index) for index in range(5)) and texts[1] != texts[0]
    assert finishes == {0: "length", 1: "length"}
    last = parsed[-1][0]
    assert last.choices == [] and last.usage is not None
    prompt_tokens = count_text_tokens("Once upon a time", model=MODEL)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_tokens, 10)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert {completion.object for completion, _ in parsed} == {"text_completion"}


async def test_completions_default_to_16_tokens_and_echo_the_prompt() -> None:
    parsed = completion_chunks(await stream("completions", {"prompt": "Echo me:", "echo": True}, tokens=40))
    text = "".join(choice.text for completion, _ in parsed for choice in completion.choices)
    assert text == "Echo me:" + "".join(simulated_text(index) for index in range(16))
    assert [reason for _, reasons in parsed for reason in reasons if reason] == ["length"]
    usage = parsed[-1][0].usage
    assert usage is not None and usage.completion_tokens == 16


# --- Embeddings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_", "count"),
    [
        pytest.param("one text", 1, id="a-string"),
        pytest.param(["first", "second", "third"], 3, id="strings"),
        pytest.param([1, 2, 3, 4], 1, id="a-token-array"),
        pytest.param([[1, 2], [3, 4, 5]], 2, id="token-arrays"),
    ],
)
async def test_embeddings_one_unit_vector_per_input(input_: object, count: int) -> None:
    chunks = await stream("embeddings", {"input": input_, "dimensions": 64})
    assert len(chunks) == 1
    answer = CreateEmbeddingResponse.model_validate(chunks[0].data)
    assert [item.index for item in answer.data] == list(range(count))
    for item in answer.data:
        assert len(item.embedding) == 64
        assert math.isclose(math.fsum(value * value for value in item.embedding), 1.0, rel_tol=1e-5)
    expected_tokens = await ENDPOINTS["embeddings"].count_prompt_tokens({"input": input_}, model=MODEL)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == expected_tokens
    assert chunks[0].usage is not None and chunks[0].usage.prompt_tokens == expected_tokens


async def test_embeddings_are_deterministic_default_1536_and_base64() -> None:
    floats = CreateEmbeddingResponse.model_validate((await stream("embeddings", {"input": ["a", "b", "a"]}))[0].data)
    vectors = [item.embedding for item in floats.data]
    assert len(vectors[0]) == 1536
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    encoded = (await stream("embeddings", {"input": ["a", "b", "a"], "encoding_format": "base64"}))[0].data
    for item, vector in zip(encoded["data"], vectors, strict=True):
        raw = base64.b64decode(item["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == vector
