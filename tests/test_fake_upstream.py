"""The fake OpenAI upstream, driven by the real OpenAI SDK (and raw httpx for the wire format)."""

import asyncio
import contextlib
import json
import math
import re
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench.fake_upstream import (
    ERROR_429,
    ERROR_STREAM,
    RPM_WINDOW,
    WRITE_BLOCKED_AFTER,
    FakeUpstream,
    _reset_text,
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
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    }
    assert first["id"].startswith("chatcmpl-")
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
        [sys.executable, "-m", "bench.fake_upstream", "--port", "0", "--tokens", "2"],
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
            sys.executable, "-m", "bench.fake_upstream", "--port", "0", "--tokens", "5",
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
