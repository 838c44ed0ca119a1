"""The gateway served by Granian, the `openai` provider against a fake upstream, the OpenAI SDK as client."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from billing.models import UsageRecord
from streaming.tokens import count_text_tokens
from tests.api.ledger import the_only_record, wait_for_record
from tests.conftest import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.ledger]

MESSAGES = [{"role": "user", "content": "Say something."}]
# Seconds from a client's hang-up to its upstream call's close that still count as "at once".
STOPPED_AT_ONCE = 1.0


@pytest.fixture
def client(gateway, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.api_url, api_key=api_key, max_retries=0, timeout=20)


def test_a_stream_arrives_chunk_by_chunk_and_ends_with_usage(client, fake_upstream) -> None:
    fake_upstream.tokens = 10
    fake_upstream.inter_token_delay = 0.03
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    contents, usage_chunks = [], []
    upstream_finished_when_first_token_arrived = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if upstream_finished_when_first_token_arrived is None:
                upstream_finished_when_first_token_arrived = fake_upstream.requests[-1].finished_at is not None
            contents.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage_chunks.append(chunk.usage)
    assert contents == ["tok "] * 10
    # The first token reached the client while the upstream was still producing: no buffering.
    assert upstream_finished_when_first_token_arrived is False
    assert len(usage_chunks) == 1
    assert usage_chunks[0].completion_tokens == 10
    record = the_only_record()
    assert record.status == "completed"
    assert record.token_source == "upstream"
    assert (record.prompt_tokens, record.completion_tokens) == (usage_chunks[0].prompt_tokens, 10)
    assert record.stream is True and record.model == "gpt-4o-mini" and record.provider == "openai"
    assert record.ttft_us is not None and record.duration_us >= record.ttft_us


def test_the_raw_stream_is_sse_ending_with_done_and_omits_usage_unless_asked(gateway, api_key, fake_upstream) -> None:
    fake_upstream.tokens = 3
    response = httpx.post(
        f"{gateway.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"]
    frames = [frame for frame in response.text.split("\n\n") if frame]
    assert frames[-1] == "data: [DONE]"
    assert all(frame.startswith("data: ") for frame in frames)
    assert '"usage"' not in response.text
    # The upstream was always asked for usage, so the ledger has exact counts anyway.
    assert fake_upstream.requests[-1].body["stream_options"] == {"include_usage": True}
    assert the_only_record().token_source == "upstream"


def test_a_non_stream_call_returns_a_chat_completion(client, fake_upstream) -> None:
    fake_upstream.tokens = 4
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "tok " * 4
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 4
    record = the_only_record()
    assert record.stream is False and record.status == "completed"
    assert record.completion_tokens == 4


@pytest.mark.parametrize(
    ("fault", "exception", "status", "error_kind"),
    [
        ("429", openai.RateLimitError, 429, "rate_limited"),
        ("500", openai.InternalServerError, 502, "server_error"),
        ("400", openai.BadRequestError, 400, "bad_request"),
        ("401", openai.InternalServerError, 502, "auth"),
    ],
    ids=["upstream-429", "upstream-500", "upstream-400", "upstream-401"],
)
def test_upstream_failures_before_the_stream_are_typed_http_errors(client, fake_upstream, fault, exception, status, error_kind) -> None:
    fake_upstream.fault = fault
    fake_upstream.retry_after = 0.1
    with pytest.raises(exception) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert raised.value.status_code == status
    if fault == "429":
        assert raised.value.response.headers["retry-after"] == "1"
    # A refused request is not retried, nor a deployment with wrong credentials (it has no other);
    # a 429 or a 5xx is, UPSTREAM_MAX_ATTEMPTS times: each attempt is a row, the last the call's.
    attempts = 3 if fault in ("429", "500") else 1
    assert raised.value.response.headers["x-gateway-attempts"] == str(attempts)
    records = list(UsageRecord.objects.order_by("attempt"))
    assert [record.attempt for record in records] == list(range(1, attempts + 1))
    record = records[-1]
    assert str(record.request_id) == raised.value.response.headers["x-request-id"]
    assert all(row.status == "upstream_error" and row.error_kind == error_kind and row.cost_usd == 0 for row in records)
    assert record.completion_tokens == 0


def test_an_unreachable_upstream_is_a_502_not_a_timeout(gateway_factory, api_key) -> None:
    nobody_listens = f"http://127.0.0.1:{free_port()}/v1"
    gateway = gateway_factory(OPENAI_BASE_URL=nobody_listens)
    client = openai.OpenAI(base_url=gateway.api_url, api_key=api_key, max_retries=0, timeout=20)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert time.monotonic() - started < 5  # refused at once, not waited out
    assert raised.value.status_code == 502
    assert "Could not reach the upstream" in raised.value.message
    records = list(UsageRecord.objects.order_by("attempt"))
    assert len(records) == 3  # retried after a backoff, then given up
    assert all((record.status, record.error_kind) == ("upstream_error", "connection") for record in records)


@pytest.mark.parametrize("fault", ["error_frame", "cut"])
def test_a_mid_stream_failure_is_an_sse_error_event_without_done(client, gateway, api_key, fake_upstream, fault) -> None:
    fake_upstream.fault = fault
    fake_upstream.fault_after_tokens = 3
    received = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert received == ["tok "] * 3
    assert "upstream failed mid-stream" in raised.value.message
    record = wait_for_record()
    assert record.status == "upstream_error"
    # No upstream usage for a broken stream: the text produced is counted with tiktoken.
    assert record.completion_tokens == count_text_tokens("tok " * 3, model="gpt-4o-mini")
    assert record.token_source == "estimated"


def test_a_stalled_upstream_gets_heartbeats_then_an_idle_timeout_error(gateway, api_key, fake_upstream) -> None:
    fake_upstream.fault = "stall"
    fake_upstream.fault_after_tokens = 2
    started = time.monotonic()
    response = httpx.post(
        f"{gateway.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
        timeout=20,
    )
    elapsed = time.monotonic() - started
    frames = [frame for frame in response.text.split("\n\n") if frame]
    assert ": ping" in frames  # heartbeats while idle (interval 0.5 s, idle timeout 2 s)
    assert "upstream_timeout" in frames[-1] and "[DONE]" not in response.text
    assert elapsed < 10  # the stream ended; it did not hang
    assert fake_upstream.wait_until(lambda: fake_upstream.requests[-1].closed_at is not None, timeout=5)
    record = wait_for_record()
    assert record.status == "timeout"
    assert record.completion_tokens == count_text_tokens("tok " * 2, model="gpt-4o-mini")


def test_a_client_disconnect_closes_the_upstream_at_once_and_bills_the_partial_stream(gateway, api_key, fake_upstream) -> None:
    fake_upstream.tokens = 500
    fake_upstream.inter_token_delay = 0.02
    with httpx.Client(timeout=10) as http:
        with http.stream(
            "POST",
            f"{gateway.api_url}/chat/completions",
            headers={"Authorization": f"Bearer {api_key}"},
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
        ) as response:
            lines = response.iter_lines()
            content_frames = 0
            while content_frames < 5:
                if '"content":"tok "' in next(lines):
                    content_frames += 1
            closed_at = time.monotonic()
    upstream_request = fake_upstream.requests[-1]
    assert fake_upstream.wait_until(lambda: upstream_request.closed_at is not None, timeout=5)
    assert upstream_request.client_disconnected and not upstream_request.completed
    # At once, not when the answer would have ended (500 tokens, 20 ms apart: 10 s). How soon is
    # the benchmark's to measure (its disconnect storm): a loaded CI machine has taken 150 ms.
    assert upstream_request.closed_at - closed_at < STOPPED_AT_ONCE
    record = wait_for_record()
    assert record.status == "cancelled"
    assert record.token_source == "estimated"
    # Billed for what reached the gateway: at least the 5 chunks the client read, at most what
    # the upstream wrote, far less than the whole answer. The chunks the upstream wrote as the
    # client left (paced 20 ms apart) may still have been on the wire or in the socket's buffer
    # when the call was cut, and never reached the gateway: on a busy machine, several (4 in one
    # CI run whose workers were starved of CPU).
    sent = upstream_request.content_chunks_sent
    assert 5 <= sent < 500
    read_by_client = count_text_tokens("tok " * 5, model="gpt-4o-mini")
    assert read_by_client <= record.completion_tokens <= count_text_tokens("tok " * sent, model="gpt-4o-mini")


def wait_until_stalled(read_progress, *, quiet_for: float = 1.0, timeout: float = 20.0) -> int:
    """Poll until `read_progress()` has not grown for `quiet_for` seconds; return its value."""
    deadline = time.monotonic() + timeout
    last, last_change = read_progress(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        value = read_progress()
        if value != last:
            last, last_change = value, time.monotonic()
        elif time.monotonic() - last_change >= quiet_for:
            return value
    raise AssertionError(f"still progressing after {timeout} s (at {last})")


def test_a_client_that_stops_reading_blocks_the_upstream_and_keeps_memory_bounded(gateway, api_key, fake_upstream) -> None:
    # Warm the worker (imports, tokenizer) so the memory baseline is the steady state.
    httpx.post(
        f"{gateway.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        timeout=10,
    )
    UsageRecord.objects.all()._raw_delete(using="default")
    fake_upstream.fault = "endless"
    baseline_rss = gateway.rss_bytes()
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST",
            f"{gateway.api_url}/chat/completions",
            headers={"Authorization": f"Bearer {api_key}"},
            # A reservation far beyond what the socket buffers hold, so the cap does not end it.
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "max_tokens": 1_500_000},
        ) as response:
            pieces = response.iter_raw(1024)
            next(pieces)  # read one piece, then stop reading (keep `pieces`: dropping it closes)
            upstream_request = fake_upstream.requests[-1]
            written = wait_until_stalled(lambda: upstream_request.bytes_written)
            # The upstream is blocked in its writes after a few socket buffers' worth, not the
            # whole endless answer, and the gateway holds only its bounded queue.
            assert not upstream_request.completed and upstream_request.closed_at is None
            assert written < 32 * 1024 * 1024
            assert gateway.rss_bytes() - baseline_rss < 32 * 1024 * 1024
    assert fake_upstream.wait_until(lambda: upstream_request.closed_at is not None, timeout=5)
    record = wait_for_record()
    assert record.status == "cancelled"
    assert record.completion_tokens > 0


def test_upstream_connections_are_reused_across_streams(gateway, api_key, fake_upstream) -> None:
    fake_upstream.tokens = 3
    client = openai.OpenAI(base_url=gateway.api_url, api_key=api_key, max_retries=0, timeout=10)
    for _ in range(3):
        list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    before = fake_upstream.total_connections
    for _ in range(5):
        list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    # Reading the body to its end after [DONE] returns the connection to the pool: no new
    # connection (and, against a real upstream, no new TLS handshake) per call.
    assert fake_upstream.total_connections == before


def test_more_streams_than_a_default_connection_pool_run_at_once(gateway, api_key_factory, fake_upstream) -> None:
    """HTTP clients cap their pools by default (aiohttp at 100 connections); a gateway worker
    must not quietly queue its callers' 101st concurrent stream behind that cap."""
    streams = 150
    key = api_key_factory("many-streams", max_concurrent=streams, rpm_limit=10 * streams)
    fake_upstream.tokens = 40
    fake_upstream.inter_token_delay = 0.1  # each stream lasts about 4 s
    first_request = len(fake_upstream.requests)

    def upstream_streams_open() -> int:
        return sum(
            1
            for request in fake_upstream.requests[first_request:]
            if request.first_chunk_at is not None and request.closed_at is None and not request.completed
        )

    async def open_streams_and_count() -> int:
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=None)) as http:
            request = http.build_request(
                "POST",
                f"{gateway.api_url}/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
            )
            responses = await asyncio.gather(*(http.send(request, stream=True) for _ in range(streams)))
            try:
                assert [response.status_code for response in responses] == [200] * streams
                await fake_upstream.await_until(lambda: upstream_streams_open() == streams, timeout=3)
                return upstream_streams_open()
            finally:
                await asyncio.gather(*(response.aclose() for response in responses))

    assert asyncio.run(open_streams_and_count()) == streams
    assert fake_upstream.wait_until(lambda: UsageRecord.objects.count() == streams, timeout=10)
