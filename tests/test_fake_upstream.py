"""The fake OpenAI upstream, driven by the real OpenAI SDK (and raw httpx for the wire format)."""

import asyncio
import base64
import contextlib
import json
import math
import re
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from testbed.fake_upstream import (
    ERROR_429,
    ERROR_STREAM,
    RPM_WINDOW,
    SYSTEM_FINGERPRINT,
    WRITE_BLOCKED_AFTER,
    FakeUpstream,
    _reset_text,
    input_tokens_for,
    prompt_tokens_for,
)

MODEL = "gpt-4o-mini"
MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},  # 9 chars
    {"role": "user", "content": "Say hello to the fake upstream."},  # 31 chars
]
MESSAGES_PROMPT_TOKENS = (9 + 31) // 4 + 3 * 2 + 3

MakeUpstream = Callable[..., FakeUpstream]
MakeClient = Callable[[FakeUpstream], openai.OpenAI]


@pytest.fixture
def make_upstream() -> Iterator[MakeUpstream]:
    """Return a factory of fake upstreams running in threads, all stopped after the test."""
    with contextlib.ExitStack() as stack:

        def make(**options: Any) -> FakeUpstream:
            return stack.enter_context(FakeUpstream(**options).running_in_thread())

        yield make


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """Return a factory of OpenAI SDK clients pointed at an upstream, closed after the test."""
    clients: list[openai.OpenAI] = []

    def make(upstream: FakeUpstream) -> openai.OpenAI:
        client = openai.OpenAI(base_url=upstream.base_url, api_key="x", max_retries=0, timeout=10.0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_stream_arrives_chunk_by_chunk_with_usage(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(tokens=3, token_text="hi ", inter_token_delay=0.2)
    client = make_client(upstream)

    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = []
    sent_when_first_content_arrived = None
    for chunk in stream:
        chunks.append(chunk)
        if (
            sent_when_first_content_arrived is None
            and chunk.choices
            and chunk.choices[0].delta.content
        ):
            sent_when_first_content_arrived = upstream.last_request.content_chunks_sent

    role, *contents, finish, usage = chunks
    assert role.choices[0].delta.role == "assistant"
    assert role.choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in contents] == ["hi ", "hi ", "hi "]
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == []
    assert usage.usage is not None
    assert usage.usage.prompt_tokens == MESSAGES_PROMPT_TOKENS
    assert usage.usage.completion_tokens == 3
    assert usage.usage.total_tokens == MESSAGES_PROMPT_TOKENS + 3
    assert {c.model for c in chunks} == {MODEL}
    assert len({c.id for c in chunks}) == 1
    # The server was still producing when the first token reached the client.
    assert sent_when_first_content_arrived == 1

    record = upstream.last_request
    assert record.method == "POST"
    assert record.path == "/v1/chat/completions"
    assert record.headers["authorization"] == "Bearer x"
    assert record.body["messages"] == MESSAGES
    assert record.stream and record.status == 200
    assert record.completed and not record.client_disconnected
    assert record.content_chunks_sent == 3
    assert upstream.wait_until(lambda: record.finished_at is not None)
    assert record.first_chunk_at is not None and record.finished_at is not None
    assert record.finished_at - record.first_chunk_at >= 2 * 0.2 - 0.01


def test_stream_frames_match_openai_wire_format(make_upstream: MakeUpstream) -> None:
    upstream = make_upstream(tokens=2, prompt_tokens=11)
    request = {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 1,
    }
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as client:
        with client.stream("POST", "/chat/completions", json=request) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["transfer-encoding"] == "chunked"
            lines = [line for line in response.iter_lines() if line]
        without_usage = client.post("/chat/completions", json={**request, "stream_options": None})
        without_usage_lines = [line for line in without_usage.text.split("\n") if line]

    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    first = events[0]
    assert first == {
        "id": first["id"],
        "object": "chat.completion.chunk",
        "created": first["created"],
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "", "refusal": None},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
        "obfuscation": first["obfuscation"],
    }
    assert first["id"].startswith("chatcmpl-")
    assert first["obfuscation"] and all(e["obfuscation"] for e in events)
    assert [e["choices"][0]["delta"] for e in events[1:-1]] == [{"content": "tok "}, {}]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 1,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }

    assert without_usage_lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in without_usage_lines[:-1])
    # Both responses travelled on one kept-alive connection.
    assert upstream.total_connections == 1
    assert upstream.wait_until(lambda: upstream.open_connections == 0)


def test_non_stream_returns_completion_with_usage(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(tokens=4, token_text="ab ")
    client = make_client(upstream)

    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert completion.choices[0].message.content == "ab ab ab ab "
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == MESSAGES_PROMPT_TOKENS
    assert completion.usage.completion_tokens == 4

    upstream.tokens = 7  # behaviour is mutable between requests
    capped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage is not None and capped.usage.completion_tokens == 5

    record = upstream.last_request
    assert not record.stream and record.completed and record.status == 200
    assert record.closed_at is None  # the connection is kept alive for reuse
    assert upstream.total_connections == 1


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        ("429", openai.RateLimitError, 429),
        ("500", openai.InternalServerError, 500),
        ("401", openai.AuthenticationError, 401),
        ("400", openai.BadRequestError, 400),
    ],
    ids=["rate-limited", "server-error", "unauthorized", "bad-request"],
)
def test_status_fault_raises_the_sdk_error(
    make_upstream: MakeUpstream,
    make_client: MakeClient,
    fault: str,
    error: type[openai.APIStatusError],
    status: int,
) -> None:
    upstream = make_upstream(fault=fault, retry_after=2)
    client = make_client(upstream)

    with pytest.raises(error) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)

    assert raised.value.status_code == status
    assert isinstance(raised.value.body, dict)
    assert set(raised.value.body) == {"message", "type", "param", "code"}
    assert upstream.last_request.status == status
    assert upstream.rejected_429 == (1 if fault == "429" else 0)


def test_429_carries_retry_after_and_rate_limit_headers(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(fault="429", retry_after=1.5)
    client = make_client(upstream)

    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)

    headers = raised.value.response.headers
    assert headers["retry-after"] == "2"
    assert headers["retry-after-ms"] == "1500"
    assert headers["x-ratelimit-reset-requests"] == "1.5s"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-requests" in headers
    assert raised.value.message.endswith(ERROR_429)
    assert raised.value.code == "rate_limit_exceeded"


def test_rpm_limit_rejects_requests_past_the_limit(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(rpm_limit=2, tokens=1)
    client = make_client(upstream)

    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert 0 < float(raised.value.response.headers["retry-after"]) <= 60
    assert [r.status for r in upstream.requests] == [200, 200, 429]
    assert upstream.rejected_429 == 1
    client.models.list()  # other endpoints are not limited


REQUEST_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)
TOKEN_HEADERS = (
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
# OpenAI's reset durations: 250ms, 1s, 7.66s, 6m0s.
RESET = re.compile(r"\d+ms|\d+(\.\d+)?s|\d+m\d+(\.\d+)?s")


def seconds_of(reset: str) -> float:
    """Read back a reset duration (``250ms``, ``7.66s``, ``1m0s``)."""
    if reset.endswith("ms"):
        return int(reset[:-2]) / 1000
    minutes, _, rest = reset[:-1].rpartition("m")
    return int(minutes or 0) * 60 + float(rest)


def rate_limit_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")}


def chat(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body})


def test_tpm_limit_counts_prompt_and_capped_completion_tokens_and_refuses_past_it(
    make_upstream: MakeUpstream,
) -> None:
    # Each request costs 10 prompt + 5 completion tokens, or 10 + 0 when max_tokens caps it at 0.
    upstream = make_upstream(tpm_limit=40, prompt_tokens=10, tokens=5)
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as client:
        first = chat(client)
        second = chat(client, stream=True)
        refused = chat(client)
        capped = chat(client, max_tokens=0)  # 30 + 10 fits exactly
        too_large = chat(client, max_tokens=1000)  # 40 + 15: refused too

    assert [first.status_code, second.status_code, refused.status_code] == [200, 200, 429]
    assert capped.status_code == 200 and too_large.status_code == 429
    assert first.json()["usage"]["total_tokens"] == 15
    assert first.headers["x-ratelimit-limit-tokens"] == "40"
    assert first.headers["x-ratelimit-remaining-tokens"] == "25"
    assert second.headers["x-ratelimit-remaining-tokens"] == "10"
    assert capped.headers["x-ratelimit-remaining-tokens"] == "0"
    error = refused.json()["error"]
    assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
    assert "Limit 40, Used 30, Requested 15" in error["message"]
    # It fits again when the first request (15 tokens) leaves the 60 s window.
    retry_ms = int(refused.headers["retry-after-ms"])
    assert (RPM_WINDOW - 10) * 1000 < retry_ms <= RPM_WINDOW * 1000
    assert refused.headers["retry-after"] == str(math.ceil(retry_ms / 1000))
    assert refused.headers["x-ratelimit-remaining-tokens"] == "10"
    assert not any(name in refused.headers for name in REQUEST_HEADERS)  # no rpm_limit set
    assert [r.status for r in upstream.requests] == [200, 200, 429, 200, 429]
    assert [r.fault for r in upstream.requests] == [None] * 5
    assert upstream.rejected_429 == 2

    upstream.reset_rate_limit()
    assert upstream.rejected_429 == 0
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as client:
        assert chat(client).headers["x-ratelimit-remaining-tokens"] == "25"


def test_a_request_larger_than_tpm_limit_never_fits(make_upstream: MakeUpstream) -> None:
    upstream = make_upstream(tpm_limit=10, prompt_tokens=8, tokens=5)
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as client:
        response = chat(client)
    assert response.status_code == 429 and response.json()["error"]["type"] == "tokens"
    assert response.headers["retry-after"] == "60"
    assert response.headers["x-ratelimit-remaining-tokens"] == "10"


def test_every_chat_answer_carries_both_limits_headers(make_upstream: MakeUpstream) -> None:
    upstream = make_upstream(rpm_limit=3, tpm_limit=1000, prompt_tokens=10, tokens=2)
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as client:
        plain = chat(client)
        with client.stream(
            "POST", "/chat/completions", json={"model": MODEL, "messages": [], "stream": True}
        ) as streamed:
            streamed.read()
        upstream.fault = "500"
        failed = chat(client)
        upstream.fault = None
        refused = chat(client)

    assert [plain.status_code, streamed.status_code, failed.status_code] == [200, 200, 500]
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "requests"
    for response in (plain, streamed, failed, refused):
        headers = rate_limit_headers(response)
        assert set(headers) == {*REQUEST_HEADERS, *TOKEN_HEADERS}
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        assert RESET.fullmatch(headers["x-ratelimit-reset-requests"])
        assert RESET.fullmatch(headers["x-ratelimit-reset-tokens"])
    remaining = [
        (r.headers["x-ratelimit-remaining-requests"], r.headers["x-ratelimit-remaining-tokens"])
        for r in (plain, streamed, failed, refused)
    ]
    assert remaining == [("2", "988"), ("1", "976"), ("0", "964"), ("0", "964")]
    # Reset is when the oldest request leaves the window: about a minute away.
    assert 58 < seconds_of(plain.headers["x-ratelimit-reset-requests"]) <= RPM_WINDOW
    assert 58 < seconds_of(refused.headers["x-ratelimit-reset-tokens"]) <= RPM_WINDOW
    assert 58 < float(refused.headers["retry-after-ms"]) / 1000 <= RPM_WINDOW


def test_without_rate_limit_headers_only_the_429s_retry_after_shows_a_limit(
    make_upstream: MakeUpstream,
) -> None:
    upstream = make_upstream(rpm_limit=1, tpm_limit=1000, rate_limit_headers=False)
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as client:
        admitted = chat(client)
        refused = chat(client)
        upstream.rpm_limit = upstream.tpm_limit = None
        upstream.fault = "429"
        faulted = chat(client)

    assert [admitted.status_code, refused.status_code, faulted.status_code] == [200, 429, 429]
    for response in (admitted, refused, faulted):
        assert rate_limit_headers(response) == {}
    assert 58 < int(refused.headers["retry-after-ms"]) / 1000 <= RPM_WINDOW
    assert faulted.headers["retry-after"] == "1" and faulted.headers["retry-after-ms"] == "1000"


def test_fault_schedule_is_used_in_turn_one_entry_per_admitted_request(
    make_upstream: MakeUpstream,
) -> None:
    upstream = make_upstream(fault_schedule=["429", None], retry_after=2, tokens=1)
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as client:
        first = [chat(client) for _ in range(4)]
        # It overrides `fault`, and setting a schedule starts it at its first entry.
        upstream.fault = "401"
        upstream.fault_schedule = ["500", "500", None]
        second = [chat(client) for _ in range(4)]
        # A request the limits refuse takes no entry.
        upstream.fault_schedule = ["500", None]
        upstream.rpm_limit = 2
        third = [chat(client) for _ in range(3)]
        upstream.rpm_limit = None
        fourth = chat(client)
        upstream.fault_schedule = None
        back_to_fault = chat(client)

    assert [r.status_code for r in first] == [429, 200, 429, 200]
    assert first[0].headers["retry-after"] == "2"
    assert first[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert first[1].json()["choices"][0]["message"]["content"] == "tok "
    assert [r.status_code for r in second] == [500, 500, 200, 500]
    assert [r.status_code for r in third] == [500, 200, 429]
    assert fourth.status_code == 500  # the third request took no entry
    assert back_to_fault.status_code == 401
    assert [r.fault for r in upstream.requests] == [
        *["429", None, "429", None],
        *["500", "500", None, "500"],
        *["500", None, None],  # the last of these was refused by rpm_limit, before any fault
        "500",
        "401",
    ]
    assert upstream.rejected_429 == 3  # two scheduled, one over rpm_limit

    with pytest.raises(ValueError, match="unknown fault"):
        upstream.fault_schedule = ["429", "teapot"]  # type: ignore[list-item]
    with pytest.raises(ValueError, match="empty"):
        upstream.fault_schedule = []


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.25, "250ms"), (0.0001, "1ms"), (1, "1s"), (7.66, "7.66s"), (360, "6m0s")],
)
def test_reset_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert _reset_text(seconds) == text


def test_error_frame_raises_api_error_mid_stream(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(fault="error_frame", fault_after_tokens=2)
    client = make_client(upstream)
    contents = []

    with pytest.raises(openai.APIError) as raised:
        for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
            contents.append(chunk.choices[0].delta.content)

    assert type(raised.value) is openai.APIError
    assert raised.value.message == ERROR_STREAM
    assert contents == ["", "tok ", "tok "]
    record = upstream.last_request
    assert not record.completed and record.content_chunks_sent == 2


def test_cut_raises_connection_error_mid_stream(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(fault="cut", fault_after_tokens=3)
    client = make_client(upstream)
    contents = []

    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
            contents.append(chunk.choices[0].delta.content)

    assert contents == ["", "tok ", "tok ", "tok "]
    record = upstream.last_request
    assert record.closed_at is not None
    assert not record.completed and not record.client_disconnected
    assert upstream.wait_until(lambda: upstream.open_connections == 0)


def test_stall_notices_the_client_closing(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(fault="stall", fault_after_tokens=2)
    client = make_client(upstream)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    chunks = iter(stream)
    received = [next(chunks).choices[0].delta.content for _ in range(3)]
    record = upstream.last_request
    assert received == ["", "tok ", "tok "]
    assert record.closed_at is None and record.finished_at is None

    stream.close()

    assert upstream.wait_until(lambda: record.closed_at is not None)
    assert record.client_disconnected and not record.completed
    assert upstream.wait_until(lambda: record.finished_at is not None)
    assert upstream.wait_until(lambda: upstream.open_connections == 0)


def test_endless_stream_blocks_on_a_slow_reader(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(fault="endless")
    client = make_client(upstream)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    next(iter(stream))  # read once, then stop reading
    record = upstream.last_request

    assert upstream.wait_until(lambda: record.write_blocked, timeout=10)
    blocked_at = record.bytes_written
    # Kernel socket buffers plus one transport buffer, not an ever-growing queue.
    assert blocked_at < 64 * 2**20
    assert not upstream.wait_until(lambda: record.bytes_written != blocked_at, timeout=0.5)
    assert record.write_blocked

    stream.close()

    assert upstream.wait_until(lambda: record.closed_at is not None)
    assert upstream.wait_until(lambda: record.finished_at is not None)
    assert record.client_disconnected and not record.completed
    assert not record.write_blocked
    assert record.max_drain_wait >= 0.5 > WRITE_BLOCKED_AFTER
    assert upstream.wait_until(lambda: upstream.open_connections == 0)


def test_ttft_delays_the_first_chunk(make_upstream: MakeUpstream, make_client: MakeClient) -> None:
    upstream = make_upstream(tokens=1, ttft=0.2)
    client = make_client(upstream)

    contents = [
        c.choices[0].delta.content
        for c in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    ]

    assert contents == ["", "tok ", None]
    record = upstream.last_request
    assert record.first_byte_at is not None and record.first_chunk_at is not None
    assert record.first_chunk_at - record.first_byte_at >= 0.2 - 0.01


def test_models_list(make_upstream: MakeUpstream, make_client: MakeClient) -> None:
    upstream = make_upstream(models=("gpt-a", "gpt-b"))
    client = make_client(upstream)

    assert [m.id for m in client.models.list()] == ["gpt-a", "gpt-b"]
    assert client.models.retrieve("gpt-b").id == "gpt-b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-z")


def test_stop_drops_held_connections_and_frees_the_port(
    make_client: MakeClient,
) -> None:
    with FakeUpstream(fault="stall").running_in_thread() as upstream:
        client = make_client(upstream)
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        next(iter(stream))
        assert upstream.base_url == f"http://127.0.0.1:{upstream.port}/v1"
        assert upstream.open_connections == 1

    assert upstream.open_connections == 0
    with pytest.raises(openai.APIConnectionError):
        list(stream)
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", upstream.port), timeout=5),
    ):
        pass


async def test_runs_inside_a_running_loop_with_the_async_sdk() -> None:
    upstream = FakeUpstream(tokens=3, fault="stall", fault_after_tokens=1)
    await upstream.start()
    try:
        async with openai.AsyncOpenAI(
            base_url=upstream.base_url, api_key="x", max_retries=0, timeout=10.0
        ) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True
            )
            async with stream:
                assert (await anext(aiter(stream))).choices[0].delta.role == "assistant"
                assert (await anext(aiter(stream))).choices[0].delta.content == "tok "
            record = upstream.last_request
            assert await upstream.await_until(lambda: record.client_disconnected)

            upstream.fault = None
            completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert completion.choices[0].message.content == "tok tok tok "
    finally:
        await upstream.stop()
    assert upstream.open_connections == 0


async def test_many_paced_streams_each_get_every_token_and_a_leaver_is_noticed() -> None:
    upstream = FakeUpstream(tokens=8, inter_token_delay=0.01)
    await upstream.start()
    request = {"model": MODEL, "messages": MESSAGES, "stream": True}

    async def read_all(client: httpx.AsyncClient) -> list[str]:
        async with client.stream("POST", "/chat/completions", json=request) as response:
            return [line async for line in response.aiter_lines() if line]

    async def leave_after_two_tokens(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/chat/completions", json=request) as response:
            tokens_seen = 0
            async for line in response.aiter_lines():
                tokens_seen += '"tok "' in line
                if tokens_seen == 2:
                    return  # closes the response, and with it the connection

    try:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(
            base_url=upstream.base_url, timeout=10.0, limits=limits
        ) as client:
            async with asyncio.TaskGroup() as group:
                readers = [group.create_task(read_all(client)) for _ in range(50)]
                group.create_task(leave_after_two_tokens(client))
        for reader in readers:
            lines = reader.result()
            assert lines[-1] == "data: [DONE]"
            assert sum('"tok "' in line for line in lines) == 8
        assert await upstream.await_until(
            lambda: all(r.finished_at is not None for r in upstream.requests)
        )
        left = [r for r in upstream.requests if not r.completed]
        assert len(left) == 1
        assert left[0].client_disconnected and left[0].content_chunks_sent < 8
    finally:
        await upstream.stop()


def test_malformed_request_gets_400_and_a_closed_connection(make_upstream: MakeUpstream) -> None:
    upstream = make_upstream()
    with socket.create_connection(("127.0.0.1", upstream.port), timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk

    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in response
    assert upstream.last_request.status == 400


def test_cli_prints_its_url_and_stops_on_sigterm() -> None:
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-m", "testbed.fake_upstream", "--port", "0", "--tokens", "2"],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "the CLI did not print its URL"
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")

        with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=10.0) as client:
            completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert completion.choices[0].message.content == "tok tok "

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_cli_sets_the_token_limit_the_fault_schedule_and_no_rate_limit_headers() -> None:
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [
            sys.executable, "-m", "testbed.fake_upstream", "--port", "0", "--tokens", "5",
            "--prompt-tokens", "5", "--tpm-limit", "20", "--fault-schedule", "500,none",
            "--no-rate-limit-headers",
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "the CLI did not print its URL"
        base_url = process.stdout.readline().strip()
        with httpx.Client(base_url=base_url, timeout=10.0) as client:
            responses = [chat(client) for _ in range(3)]
        assert [r.status_code for r in responses] == [500, 200, 429]
        assert responses[2].json()["error"]["type"] == "tokens"
        assert all(rate_limit_headers(r) == {} for r in responses)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.parametrize(
    ("body", "fixed", "expected"),
    [
        ({"messages": []}, None, 3),
        ({}, None, 3),
        ({"messages": [{"role": "user", "content": "abcd"}]}, None, 1 + 3 + 3),
        ({"messages": [{"role": "assistant", "content": None}]}, None, 0 + 3 + 3),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "abcdefgh"},
                            {"type": "image_url", "image_url": {"url": "data:,"}},
                        ],
                    }
                ]
            },
            None,
            2 + 3 + 3,
        ),
        ({"messages": [{"role": "user", "content": "abcd"}]}, 42, 42),
    ],
    ids=["empty", "no-messages", "one-message", "null-content", "content-parts", "fixed"],
)
def test_prompt_tokens_for(body: dict[str, Any], fixed: int | None, expected: int) -> None:
    assert prompt_tokens_for(body, fixed) == expected


# -- the Responses API -----------------------------------------------------------------------

RESPONSE_EVENTS_AROUND_DELTAS = (
    ["response.created", "response.in_progress"],
    ["response.output_item.added", "response.content_part.added"],
    ["response.output_text.done", "response.content_part.done", "response.output_item.done"],
)
INSTRUCTIONS = "Be brief."  # 9 chars
INPUT = "Say hello to the fake upstream."  # 31 chars
RESPONSE_INPUT_TOKENS = MESSAGES_PROMPT_TOKENS  # the same two messages, counted alike


def response_event_types(tokens: int, last: str = "response.completed") -> list[str]:
    opening, item, closing = RESPONSE_EVENTS_AROUND_DELTAS
    return [*opening, *item, *["response.output_text.delta"] * tokens, *closing, last]


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """Split an SSE body into (event, data) pairs."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


def test_response_stream_yields_typed_events_ending_in_completed_with_usage(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(tokens=3, token_text="hi ")
    client = make_client(upstream)

    events = list(
        client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input=INPUT, stream=True)
    )

    assert [e.type for e in events] == response_event_types(3)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and completed.type == "response.completed"
    assert created.response.status == "in_progress" and created.response.output == []
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["hi "] * 3
    response = completed.response
    assert response.id == created.response.id and response.id.startswith("resp_")
    assert response.status == "completed" and response.model == MODEL
    assert response.instructions == INSTRUCTIONS
    assert response.output_text == "hi hi hi "
    assert response.output[0].type == "message" and response.output[0].id.startswith("msg_")
    assert response.usage is not None
    assert response.usage.input_tokens == RESPONSE_INPUT_TOKENS
    assert response.usage.output_tokens == 3
    assert response.usage.total_tokens == RESPONSE_INPUT_TOKENS + 3
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0

    record = upstream.last_request
    assert record.path == "/v1/responses" and record.stream and record.status == 200
    assert record.completed and record.content_chunks_sent == 3
    # A streamed response is stored too.
    assert client.responses.retrieve(response.id).output_text == "hi hi hi "


def test_response_stream_wire_format(make_upstream: MakeUpstream) -> None:
    # More tokens than one write batch (256), so the sequence numbers cross batches.
    upstream = make_upstream(tokens=600, prompt_tokens=7)
    request = {"model": MODEL, "input": INPUT, "stream": True}
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as client:
        with client.stream("POST", "/responses", json=request) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            events = sse_events(response.read().decode())

    assert "[DONE]" not in [data for _, data in events]
    payloads = [json.loads(data) for _, data in events]
    assert [name for name, _ in events] == [p["type"] for p in payloads]
    assert [p["type"] for p in payloads] == response_event_types(600)
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    item_id = payloads[2]["item"]["id"]
    assert payloads[4] == {
        "type": "response.output_text.delta",
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": "tok ",
        "logprobs": [],
        "sequence_number": 4,
    }
    assert payloads[-1]["response"]["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 600,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 607,
    }


def test_paced_response_stream_numbers_every_delta(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(tokens=5, inter_token_delay=0.01)
    client = make_client(upstream)

    events = list(client.responses.create(model=MODEL, input=INPUT, stream=True))

    assert [e.type for e in events] == response_event_types(5)
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_non_stream_response_is_stored_retrieved_deleted_and_not_cancellable(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(tokens=2)
    client = make_client(upstream)

    response = client.responses.create(model=MODEL, input=[{"role": "user", "content": INPUT}])

    assert response.object == "response" and response.status == "completed"
    assert response.output_text == "tok tok "
    assert response.usage is not None and response.usage.input_tokens == 31 // 4 + 3 + 3
    assert not upstream.last_request.stream
    retrieved = client.responses.retrieve(response.id)
    assert retrieved.model_dump() == response.model_dump()
    with pytest.raises(openai.BadRequestError) as cancelled:
        client.responses.cancel(response.id)
    assert cancelled.value.body == {
        "message": "Only responses created with background=true can be cancelled.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }

    deleted = client.responses.with_raw_response.delete(response.id)
    assert deleted.http_response.json() == {
        "id": response.id,
        "object": "response.deleted",
        "deleted": True,
    }
    for call in (client.responses.retrieve, client.responses.delete, client.responses.cancel):
        with pytest.raises(openai.NotFoundError) as missing:
            call(response.id)
        assert missing.value.message.endswith(f"Response with id '{response.id}' not found.")
    assert upstream.stored_responses == {}

    unstored = client.responses.create(model=MODEL, input=INPUT, store=False)
    assert unstored.to_dict()["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_response_capped_by_max_output_tokens_is_incomplete(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(tokens=5)
    client = make_client(upstream)

    events = list(
        client.responses.create(model=MODEL, input=INPUT, max_output_tokens=2, stream=True)
    )
    response = client.responses.create(model=MODEL, input=INPUT, max_output_tokens=2)

    assert [e.type for e in events] == response_event_types(2, last="response.incomplete")
    last = events[-1]
    assert last.type == "response.incomplete"
    for final in (last.response, response):
        assert final.status == "incomplete" and final.output_text == "tok tok "
        assert final.incomplete_details is not None
        assert final.incomplete_details.reason == "max_output_tokens"
        assert final.usage is not None and final.usage.output_tokens == 2


def test_response_error_event_mid_stream(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(fault="error_frame", fault_after_tokens=2)
    client = make_client(upstream)

    events = list(client.responses.create(model=MODEL, input=INPUT, stream=True))

    assert [e.type for e in events] == [*response_event_types(2)[:6], "error"]
    error = events[-1]
    assert error.type == "error"
    assert (error.code, error.message, error.param) == ("server_error", ERROR_STREAM, None)
    assert error.sequence_number == 6
    record = upstream.last_request
    assert not record.completed and record.content_chunks_sent == 2
    assert upstream.stored_responses == {}


def test_response_cut_mid_stream_raises_connection_error(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(fault="cut", fault_after_tokens=1)
    client = make_client(upstream)
    types = []

    with pytest.raises(openai.APIConnectionError):
        for event in client.responses.create(model=MODEL, input=INPUT, stream=True):
            types.append(event.type)

    assert types == response_event_types(1)[:5]
    assert upstream.wait_until(lambda: upstream.last_request.closed_at is not None)


def test_responses_count_against_the_limits_and_take_faults(make_upstream: MakeUpstream) -> None:
    upstream = make_upstream(tpm_limit=30, prompt_tokens=10, tokens=5)
    body = {"model": MODEL, "input": INPUT}
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as client:
        first = client.post("/responses", json=body)
        second = client.post("/responses", json={**body, "stream": True})
        refused = client.post("/responses", json=body)
        upstream.reset_rate_limit()
        upstream.fault_schedule = ["500", None]
        faulted = client.post("/responses", json=body)

    assert [first.status_code, second.status_code, refused.status_code] == [200, 200, 429]
    assert first.headers["x-ratelimit-remaining-tokens"] == "15"
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.json()["error"]["type"] == "tokens"
    assert faulted.status_code == 500 and faulted.headers["x-ratelimit-remaining-tokens"] == "15"
    assert upstream.stored_responses.keys() == {
        first.json()["id"],
        second.headers["x-request-id"][4:],
    }


@pytest.mark.parametrize(
    ("body", "fixed", "expected"),
    [
        ({}, None, 3),
        ({"input": "abcd"}, None, 1 + 3 + 3),
        ({"instructions": "abcdefgh", "input": "abcd"}, None, 3 + 6 + 3),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "abcdefgh"}]},
                    {"type": "function_call_output", "call_id": "c", "output": "abcd"},
                ]
            },
            None,
            3 + 6 + 3,
        ),
        ({"input": "abcd"}, 42, 42),
    ],
    ids=["empty", "string", "instructions", "items", "fixed"],
)
def test_input_tokens_for(body: dict[str, Any], fixed: int | None, expected: int) -> None:
    assert input_tokens_for(body, fixed) == expected


# -- embeddings ---------------------------------------------------------------------------------


def test_embeddings_answer_one_vector_per_input_with_usage(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream()
    client = make_client(upstream)
    inputs = [f"sentence number {i:03d}" for i in range(100)]  # 19 chars: 4 tokens each

    result = client.embeddings.create(model="text-embedding-3-small", input=inputs)

    assert result.object == "list" and result.model == "text-embedding-3-small"
    assert [d.index for d in result.data] == list(range(100))
    assert {len(d.embedding) for d in result.data} == {8}
    assert result.usage.prompt_tokens == result.usage.total_tokens == 400
    assert all(math.isclose(sum(x * x for x in d.embedding), 1, rel_tol=1e-5) for d in result.data)
    assert len({tuple(d.embedding) for d in result.data}) == 100
    # The SDK asked for base64 (its default) and decoded it.
    assert upstream.last_request.body["encoding_format"] == "base64"

    floats = client.embeddings.create(
        model="text-embedding-3-small", input=inputs[3], dimensions=16, encoding_format="float"
    )
    again = client.embeddings.create(model="text-embedding-3-small", input=inputs[3])
    assert len(floats.data) == 1 and len(floats.data[0].embedding) == 16
    assert again.data[0].embedding == pytest.approx(result.data[3].embedding)
    assert upstream.last_request.path == "/v1/embeddings" and upstream.last_request.completed


def test_embeddings_wire_format_and_token_inputs(make_upstream: MakeUpstream) -> None:
    upstream = make_upstream()
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as client:
        floats = client.post(
            "/embeddings", json={"model": "e", "input": "hello", "encoding_format": "float"}
        )
        packed = client.post(
            "/embeddings", json={"model": "e", "input": "hello", "encoding_format": "base64"}
        )
        token_ids = client.post("/embeddings", json={"model": "e", "input": [1, 2, 3]})
        token_lists = client.post("/embeddings", json={"model": "e", "input": [[1, 2], [3]]})
        invalid = client.post("/embeddings", json={"model": "e", "input": [1, "a"]})

    body = floats.json()
    assert body == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": body["data"][0]["embedding"]}],
        "model": "e",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
    decoded = struct.unpack("<8f", base64.b64decode(packed.json()["data"][0]["embedding"]))
    assert decoded == pytest.approx(body["data"][0]["embedding"], rel=1e-6)
    assert len(token_ids.json()["data"]) == 1 and token_ids.json()["usage"]["prompt_tokens"] == 3
    assert len(token_lists.json()["data"]) == 2
    assert token_lists.json()["usage"]["prompt_tokens"] == 3
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "input"


def test_embeddings_count_against_the_limits_and_take_faults(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(rpm_limit=2, fault_schedule=["500", None])
    client = make_client(upstream)

    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="e", input="x")
    client.embeddings.create(model="e", input="x")
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="e", input="x")


# -- legacy completions -------------------------------------------------------------------------


def test_completions_stream_n_choices_with_usage(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(tokens=3, token_text="hi ")
    client = make_client(upstream)

    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="Say hello to the fake upstream.",  # 31 chars: 7 tokens
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    *choices, usage = chunks
    assert {c.object for c in chunks} == {"text_completion"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert all(len(c.choices) == 1 for c in choices)
    texts: dict[int, str] = {0: "", 1: ""}
    for chunk in choices:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == {0: "hi hi hi ", 1: "hi hi hi "}
    assert [c.choices[0].finish_reason for c in choices[-2:]] == ["stop", "stop"]
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (7, 6)
    assert usage.usage.total_tokens == 13
    assert upstream.last_request.path == "/v1/completions" and upstream.last_request.completed


def test_completions_wire_format_and_non_stream(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(tokens=4)
    request = {"model": "m", "prompt": "abcdefgh", "stream": True, "max_tokens": 1}
    with httpx.Client(base_url=upstream.base_url, timeout=10.0) as http_client:
        lines = [
            line for line in http_client.post("/completions", json=request).text.split("\n") if line
        ]

    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events == [
        {
            "id": events[0]["id"],
            "object": "text_completion",
            "created": events[0]["created"],
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "model": "m",
            "system_fingerprint": None,
        }
        for text, finish in (("tok ", None), ("", "length"))
    ]

    completion = make_client(upstream).completions.create(model="m", prompt=["a", "b"], n=2)
    assert completion.object == "text_completion"
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert {c.text for c in completion.choices} == {"tok tok tok tok "}
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 16)


# -- chat: n choices and tool calls -------------------------------------------------------------


def test_chat_n_choices_stream_and_not(
    make_upstream: MakeUpstream, make_client: MakeClient
) -> None:
    upstream = make_upstream(tokens=2)
    client = make_client(upstream)

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)

    *choices, usage = chunks
    assert all(len(c.choices) == 1 for c in choices)
    assert [c.choices[0].index for c in choices] == [0, 1] * 4  # role, 2 tokens, finish
    texts = {0: "", 1: ""}
    for chunk in choices:
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert texts == {0: "tok tok ", 1: "tok tok "}
    assert usage.usage is not None and usage.usage.completion_tokens == 4
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.message.content for c in completion.choices] == ["tok tok "] * 2
    assert completion.usage is not None and completion.usage.completion_tokens == 4


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def test_chat_tool_call_round_trip(make_upstream: MakeUpstream, make_client: MakeClient) -> None:
    upstream = make_upstream(tokens=4, auto_tool_calls=True)
    client = make_client(upstream)
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER_TOOL], stream=True
        )
    )

    first, *pieces, finish = chunks
    first_call = first.choices[0].delta.tool_calls
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content is None
    assert first_call is not None and len(first_call) == 1
    assert first_call[0].index == 0 and first_call[0].id is not None
    assert first_call[0].id.startswith("call_") and first_call[0].type == "function"
    assert first_call[0].function is not None
    assert first_call[0].function.name == "get_weather"
    assert first_call[0].function.arguments == ""
    arguments = ""
    for chunk in pieces:
        (call,) = chunk.choices[0].delta.tool_calls or []
        assert call.index == 0 and call.id is None and call.function is not None
        assert call.function.name is None
        arguments += call.function.arguments or ""
    assert len(pieces) == 4
    assert json.loads(arguments) == {"city": "tok", "unit": "celsius"}
    assert finish.choices[0].finish_reason == "tool_calls"

    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": first_call[0].id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": first_call[0].id, "content": "Sunny, 21 C."},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "tok tok tok tok "
    assert answer.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    ("tool_choice", "auto_tool_calls", "called"),
    [
        ("required", False, "get_weather"),
        ({"type": "function", "function": {"name": "get_time"}}, False, "get_time"),
        ("auto", False, None),
        (None, False, None),
        ("none", True, None),
        ("auto", True, "get_weather"),
    ],
    ids=["required", "named", "auto", "no-choice", "none", "auto-opted-in"],
)
def test_chat_tool_choice_decides_the_call(
    make_upstream: MakeUpstream,
    make_client: MakeClient,
    tool_choice: Any,
    auto_tool_calls: bool,
    called: str | None,
) -> None:
    upstream = make_upstream(tokens=3, auto_tool_calls=auto_tool_calls)
    client = make_client(upstream)
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}

    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL, TIME_TOOL], **extra
    )

    message = completion.choices[0].message
    if called is None:
        assert message.tool_calls is None and message.content == "tok tok tok "
        assert completion.choices[0].finish_reason == "stop"
        return
    assert message.content is None and message.tool_calls is not None
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == called
    assert isinstance(json.loads(call.function.arguments), dict)
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 3
