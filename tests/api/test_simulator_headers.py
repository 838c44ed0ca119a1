"""`x-simulator-*` request headers steer the built-in simulator, end to end through a served gateway.

Each test asserts the header's effect (the completion's length, the error, where the stream stops,
when the first chunk arrives) on the response and on the ledger row. Header names are
case-insensitive in HTTP; the gateway once compared Django's Title-Case names with lower-case
ones and dropped them all, so the names are sent spelled several ways.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from django.conf import settings

from billing.models import UsageRecord
from streaming.providers.simulator import simulated_text
from streaming.tokens import count_text_tokens

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.ledger]

MODEL = "sim-fast"  # the built-in simulator with no pacing and no first-token delay
MESSAGES = [{"role": "user", "content": "Say something."}]
SPELLINGS = [
    pytest.param(str.lower, id="lower-case"),
    pytest.param(str.title, id="Title-Case"),
    pytest.param(lambda name: name.replace("simulator", "SIMULATOR"), id="mIxEd-case"),
]


def simulator_headers(spell=str.lower, **options: object) -> dict[str, str]:
    """`fault_after=3` becomes `x-simulator-fault-after: 3`, spelled by `spell`."""
    return {spell(f"x-simulator-{name.replace('_', '-')}"): str(value) for name, value in options.items()}


def post(gateway, api_key: str, *, headers: dict[str, str], **body: object) -> httpx.Response:
    return httpx.post(
        f"{gateway.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {api_key}", **headers},
        json={"model": MODEL, "messages": MESSAGES, **body},
        timeout=20,
    )


def sse_events(text: str) -> tuple[list[dict], bool]:
    """The JSON events of an SSE body (heartbeat comments skipped), and whether it ended with [DONE]."""
    events, done = [], False
    for frame in text.split("\n\n"):
        if not frame or frame.startswith(":"):
            continue
        assert frame.startswith("data: "), frame
        assert not done, "an event after [DONE]"
        payload = frame.removeprefix("data: ")
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done


def contents(events: list[dict]) -> list[str]:
    return [
        event["choices"][0]["delta"]["content"]
        for event in events
        if event.get("choices") and event["choices"][0]["delta"].get("content")
    ]


def expected_text(tokens: int) -> str:
    return "".join(simulated_text(index) for index in range(tokens))


def wait_for_record(timeout: float = 5.0, *, attempts: int = 1) -> UsageRecord:
    """The call's ledger row: its last attempt's (a stream's row may land just after its last
    frame). The attempts before it failed, were retried, and are rows that cost nothing."""
    deadline = time.monotonic() + timeout
    while UsageRecord.objects.count() < attempts:
        assert time.monotonic() < deadline, "the call's usage records were not written"
        time.sleep(0.01)
    records = list(UsageRecord.objects.order_by("attempt"))
    assert [record.attempt for record in records] == list(range(1, attempts + 1)), records
    call = records[-1]
    assert all(record.call_id == call.request_id for record in records)
    assert all(record.cost_usd == 0 for record in records[:-1])
    return call


def assert_error(response: httpx.Response, status: int, *, type: str, code: str) -> dict:
    """An HTTP error sent before any token: JSON, OpenAI's shape, no SSE."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (type, code), error
    return error


@pytest.mark.parametrize("spell", SPELLINGS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_tokens_header_sets_the_completion_length(gateway, api_key, spell, stream) -> None:
    assert settings.SIMULATOR_COMPLETION_TOKENS != 7  # so the header, not the default, made it 7
    headers = simulator_headers(spell, tokens=7)
    if stream:
        response = post(gateway, api_key, headers=headers, stream=True, stream_options={"include_usage": True})
        assert response.status_code == 200, response.text
        events, done = sse_events(response.text)
        assert done
        assert "".join(contents(events)) == expected_text(7)
        usage = events[-1]["usage"]
    else:
        response = post(gateway, api_key, headers=headers)
        assert response.status_code == 200, response.text
        completion = response.json()
        assert completion["choices"][0]["message"]["content"] == expected_text(7)
        assert completion["choices"][0]["finish_reason"] == "stop"
        usage = completion["usage"]
    assert usage["completion_tokens"] == 7
    record = wait_for_record()
    assert (record.status, record.token_source) == ("completed", "upstream")
    assert (record.prompt_tokens, record.completion_tokens) == (usage["prompt_tokens"], 7)


def test_without_the_tokens_header_the_route_default_applies(gateway, api_key) -> None:
    response = post(gateway, api_key, headers={})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == settings.SIMULATOR_COMPLETION_TOKENS
    assert wait_for_record().completion_tokens == settings.SIMULATOR_COMPLETION_TOKENS


@pytest.mark.parametrize("value", ["seven", "inf", "nan"])
def test_a_tokens_header_that_is_no_finite_number_falls_back_to_the_route(gateway, api_key, value) -> None:
    """`inf` once crashed the simulator (`int(inf)`): a 502 and a logged traceback; `nan` gave 0 tokens."""
    response = post(gateway, api_key, headers=simulator_headers(tokens=value))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == settings.SIMULATOR_COMPLETION_TOKENS
    assert wait_for_record().status == "completed"


def test_a_ttft_header_that_is_no_number_falls_back_to_the_route_not_the_global_default(gateway, api_key) -> None:
    """sim-fast's route sets no first-token delay; a bad header used to bring back the global 250 ms."""
    assert settings.SIMULATOR_TTFT_SECONDS >= 0.2
    response = post(gateway, api_key, headers=simulator_headers(ttft_ms="soon", tokens=3), stream=True)
    assert response.status_code == 200, response.text
    assert wait_for_record().ttft_us < settings.SIMULATOR_TTFT_SECONDS * 1_000_000


def test_max_tokens_caps_the_tokens_header(gateway, api_key) -> None:
    response = post(gateway, api_key, headers=simulator_headers(tokens=7), max_tokens=5)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["choices"][0]["message"]["content"] == expected_text(5)
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"]["completion_tokens"] == 5
    assert wait_for_record().completion_tokens == 5


@pytest.mark.parametrize("spell", SPELLINGS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_fault_500_is_a_502_before_any_token(gateway, api_key, spell, stream) -> None:
    response = post(gateway, api_key, headers=simulator_headers(spell, fault=500), stream=stream)
    error = assert_error(response, 502, type="api_error", code="upstream_error")
    assert "Simulated upstream server error" in error["message"]
    # Every attempt met the fault: the gateway retried (UPSTREAM_MAX_ATTEMPTS), then gave up.
    assert response.headers["x-gateway-attempts"] == "3"
    record = wait_for_record(attempts=3)
    assert str(record.request_id) == response.headers["x-request-id"]
    assert (record.status, record.error_kind) == ("upstream_error", "server_error")
    assert record.completion_tokens == 0


@pytest.mark.parametrize(
    ("stream", "options", "retry_after"),
    [(False, {}, "1"), (True, {}, "1"), (True, {"retry_after": 2}, "2")],
    ids=["json-default-retry-after", "stream-default-retry-after", "stream-retry-after-header"],
)
def test_fault_429_is_a_429_with_retry_after(gateway, api_key, options, retry_after, stream) -> None:
    headers = simulator_headers(str.title, fault=429, **options)
    response = post(gateway, api_key, headers=headers, stream=stream)
    assert_error(response, 429, type="requests", code="upstream_rate_limited")
    assert response.headers["retry-after"] == retry_after
    record = wait_for_record(attempts=3)  # retried after each retry-after, then passed on
    assert (record.status, record.error_kind) == ("upstream_error", "rate_limited")
    assert record.completion_tokens == 0


@pytest.mark.parametrize(("fault", "error_kind"), [("cut", "connection"), ("error", "server_error")])
@pytest.mark.parametrize("after", [3, 5], ids=["after-3", "after-5"])
def test_mid_stream_fault_ends_with_an_error_event_after_n_chunks_and_no_done(gateway, api_key, fault, error_kind, after) -> None:
    headers = simulator_headers(fault=fault, fault_after=after, tokens=20)
    response = post(gateway, api_key, headers=headers, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200, response.text
    events, done = sse_events(response.text)
    assert not done
    received = contents(events)
    assert received == [simulated_text(index) for index in range(after)]
    error = events[-1]["error"]
    assert (error["type"], error["code"]) == ("api_error", "upstream_error")
    assert "upstream failed mid-stream" in error["message"]
    assert not any("usage" in event for event in events)
    record = wait_for_record()
    assert (record.status, record.error_kind, record.token_source) == ("upstream_error", error_kind, "estimated")
    # No upstream usage for a broken stream: the text it sent is counted with tiktoken.
    assert record.completion_tokens == count_text_tokens("".join(received), model=MODEL)


def test_ttft_header_delays_the_first_chunk(gateway, api_key) -> None:
    ttft = 0.4
    headers = simulator_headers(lambda name: name.upper(), ttft_ms=int(ttft * 1000), tokens=3)
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{gateway.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {api_key}", **headers},
        json={"model": MODEL, "messages": MESSAGES, "stream": True},
        timeout=20,
    ) as response:
        assert response.status_code == 200
        first_event_after = None
        for line in response.iter_lines():
            if first_event_after is None and line.startswith("data: "):
                first_event_after = time.monotonic() - started
    assert first_event_after is not None
    assert ttft <= first_event_after < ttft + 5.0
    record = wait_for_record()
    assert record.status == "completed" and record.completion_tokens == 3
    # The relay measures from before the simulator's sleep; 1 ms covers the event loop's clock
    # resolution and the truncation to microseconds.
    assert record.ttft_us >= ttft * 1_000_000 - 1_000


def test_without_the_ttft_header_sim_fast_answers_at_once(gateway, api_key) -> None:
    """The control for the test above: the delay came from the header, not from the route."""
    response = post(gateway, api_key, headers=simulator_headers(tokens=3), stream=True)
    assert response.status_code == 200
    assert wait_for_record().ttft_us < 400_000
