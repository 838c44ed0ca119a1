"""The console's live feed (llmgateway/console_live.py) and the reports it is fed (calls/live.py).

The consumer is driven directly with Channels' WebsocketCommunicator on the in-memory layer; the
reports come from `LiveReporter` over real `ApiCall`-shaped objects, or are sent to the group as
another process would. The whole path through Granian, Redis and Chromium is in
test_console_live_browser.py.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.utils import timezone

from billing.money import Rates
from calls import live
from calls.control import CONTROL_GROUP, STOP_MESSAGE, ActiveCalls
from llmgateway.console_live import ConsoleLiveConsumer

pytestmark = [pytest.mark.django_db(transaction=True)]

RATES = Rates(input=Decimal("0.15"), cached_input=Decimal("0.075"), output=Decimal("0.60"))


def a_running_call(*, user: str = "alice", key_prefix: str | None = "gw_ab12cd", tokens: int = 120, prompt: int = 1000) -> Any:
    """A ApiCall as far as the live report reads it."""
    return SimpleNamespace(
        request_id=uuid.uuid4(),
        principal=SimpleNamespace(username=user, user_id=7, key_prefix=key_prefix, api_key_id=3),
        serving=SimpleNamespace(id="gpt-4o-mini"),
        admission=SimpleNamespace(rates=RATES),
        relay=SimpleNamespace(outcome=SimpleNamespace(content_chunks=tokens)),
        params=SimpleNamespace(stream=True),
        prompt_tokens_estimate=prompt,
        created_at=datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
    )


@pytest.fixture
def operator(staff_factory) -> Any:
    """Staff who may read costs and stop calls."""
    return staff_factory("oscar", "billing.view_usagerecord", "billing.stop_call")


async def connected(user: Any, *, settled: bool = True) -> WebsocketCommunicator:
    """A console's feed; `settled`: past its first messages and this process's first report."""
    communicator = WebsocketCommunicator(ConsoleLiveConsumer.as_asgi(), "/ws/console/")
    communicator.scope["user"] = user
    accepted, _ = await communicator.connect()
    assert accepted
    if settled:
        while (await next_of(communicator, "streams"))["processes"] == 0:
            pass
    return communicator


async def next_of(communicator: WebsocketCommunicator, kind: str, within: float = 3) -> dict[str, Any]:
    """The next message of type `kind`, skipping others."""
    async with asyncio.timeout(within):
        while True:
            message = await communicator.receive_json_from(timeout=within)
            if message["type"] == kind:
                return message


# -- who may watch and act -----------------------------------------------------------------------


@pytest.mark.parametrize("who", ["visitor", "not staff", "staff without the cost permission"])
async def test_only_staff_who_may_read_costs_are_let_in(who: str, staff_factory) -> None:
    if who == "visitor":
        user: Any = AnonymousUser()
    elif who == "not staff":
        user = await asyncio.to_thread(lambda: get_user_model().objects.create_user("mallory", password="x"))
    else:
        user = await asyncio.to_thread(staff_factory, "sam")
    communicator = WebsocketCommunicator(ConsoleLiveConsumer.as_asgi(), "/ws/console/")
    communicator.scope["user"] = user
    accepted, _ = await communicator.connect()
    assert not accepted


async def test_a_cost_viewer_gets_the_spend_and_the_running_calls_and_may_not_stop(cost_viewer) -> None:
    communicator = await connected(cost_viewer, settled=False)
    hello = await communicator.receive_json_from()
    assert hello == {"type": "hello", "may_stop": False}
    spend = await next_of(communicator, "spend")
    assert [period["kind"] for period in spend["periods"]] == ["day", "week", "month"]
    assert spend["periods"][0]["spent"] == "$0.00"
    streams = await next_of(communicator, "streams")
    assert streams["calls"] == [] and streams["processes"] == 0
    here = await next_of(communicator, "streams")  # this process answered the console's ask
    assert here["calls"] == [] and here["processes"] == 1
    await communicator.disconnect()


# -- what the reports say ------------------------------------------------------------------------


def test_a_report_says_who_runs_what_and_its_cost_so_far() -> None:
    calls = ActiveCalls()
    call = a_running_call(tokens=120, prompt=1000)
    calls.add(call)
    reporter = live.LiveReporter(calls, process="p1")
    reporter.watched()
    report = reporter.report()
    assert report is not None
    [shown] = report["calls"]
    assert shown["request_id"] == str(call.request_id)
    assert (shown["user"], shown["key_prefix"], shown["model"]) == ("alice", "gw_ab12cd", "gpt-4o-mini")
    assert (shown["prompt_tokens"], shown["completion_tokens"]) == (1000, 120)
    # 1,000 prompt tokens at $0.15/1M and 120 completion tokens at $0.60/1M, exactly.
    assert Decimal(shown["cost_usd"]) == Decimal("0.000222")


def test_a_process_reports_while_it_runs_calls_once_after_and_then_is_quiet() -> None:
    calls = ActiveCalls()
    reporter = live.LiveReporter(calls, process="p1")
    reporter.watched()
    assert reporter.report() is None  # nothing running, nothing recorded
    call = a_running_call()
    calls.add(call)
    assert len(reporter.report()["calls"]) == 1  # type: ignore[index]
    calls.remove(call)
    reporter.call_recorded()
    last = reporter.report()
    assert last is not None and last["calls"] == [] and last["recorded"] == 1
    assert reporter.report() is None
    forced = reporter.report(always=True)  # a console asked
    assert forced is not None and forced["calls"] == [] and forced["recorded"] == 0


def test_a_process_says_nothing_when_no_console_has_asked_lately(monkeypatch) -> None:
    calls = ActiveCalls()
    calls.add(a_running_call())
    reporter = live.LiveReporter(calls, process="p1")
    reporter.call_recorded()
    assert reporter.report() is None  # no console asked
    reporter.watched()
    assert reporter.report() is not None
    monkeypatch.setattr(live, "WATCH_SECONDS", 0.0)
    reporter.watched()
    assert reporter.report() is None  # the console left: it stopped asking


async def test_reports_from_other_processes_are_merged_and_shown_as_money(cost_viewer) -> None:
    communicator = await connected(cost_viewer)
    layer = get_channel_layer()
    first, second = a_running_call(user="alice", tokens=10), a_running_call(user="bob", key_prefix=None, tokens=2500)
    for process, call in (("host-a:1", first), ("host-b:2", second)):
        await layer.group_send(live.LIVE_GROUP, dict(live.LiveReporter(ActiveCalls(), process).report(always=True) or {}) | {"calls": [live.running_call(call)]})
        streams = await next_of(communicator, "streams")
    assert streams["processes"] == 3  # and this one
    assert [call["user"] for call in streams["calls"]] == ["alice", "bob"]
    bob = streams["calls"][1]
    assert bob["key"] == "chat page"  # no key: a call from the chat page
    assert bob["tokens"] == "2,500"
    assert bob["cost"] == "$0.0017" and bob["cost_exact"] == "$0.00165"  # 1,000 × $0.15/1M + 2,500 × $0.60/1M
    await communicator.disconnect()


async def test_a_process_that_stops_reporting_is_forgotten(monkeypatch, cost_viewer) -> None:
    monkeypatch.setattr("llmgateway.console_live.REPORT_EXPIRY_SECONDS", 0.3)
    monkeypatch.setattr("llmgateway.console_live.TICK_SECONDS", 0.1)
    communicator = await connected(cost_viewer)
    report = live.LiveReporter(ActiveCalls(), "gone:1").report(always=True)
    await get_channel_layer().group_send(live.LIVE_GROUP, {**report, "calls": [live.running_call(a_running_call())]})  # type: ignore[dict-item]
    assert len((await next_of(communicator, "streams"))["calls"]) == 1
    # Reports from live processes may refresh the list before the silent one expires.
    async with asyncio.timeout(2):
        while (await next_of(communicator, "streams"))["calls"]:
            pass
    await communicator.disconnect()


async def test_the_spend_is_read_again_when_a_process_records_a_call(call, cost_viewer) -> None:
    communicator = await connected(cost_viewer, settled=False)
    assert (await next_of(communicator, "spend"))["periods"][0]["spent"] == "$0.00"
    await asyncio.to_thread(call, cost_viewer, at=timezone.now(), prompt=1250)  # $1.25 at the tests' rates
    await asyncio.sleep(1.0)  # the consumer reads the spend at most once a second
    report = live.LiveReporter(ActiveCalls(), "p9").report(always=True)
    await get_channel_layer().group_send(live.LIVE_GROUP, {**report, "recorded": 1})  # type: ignore[dict-item]
    spend = await next_of(communicator, "spend")
    assert [period["spent"] for period in spend["periods"]] == ["$1.25"] * 3
    await communicator.disconnect()


# -- stopping a call -----------------------------------------------------------------------------


async def test_staff_with_the_permission_stop_a_call_in_every_process(operator) -> None:
    layer = get_channel_layer()
    elsewhere = await layer.new_channel()
    await layer.group_add(CONTROL_GROUP, elsewhere)  # another gateway process's listener
    communicator = await connected(operator, settled=False)
    assert (await communicator.receive_json_from())["may_stop"] is True
    request_id = str(uuid.uuid4())
    await communicator.send_json_to({"action": "stop", "request_id": request_id})
    assert (await next_of(communicator, "stop_sent"))["request_id"] == request_id
    async with asyncio.timeout(2):
        while (order := await layer.receive(elsewhere))["type"] != STOP_MESSAGE:
            pass
    assert (order["reason"], order["request_id"]) == ("stopped_by_staff", request_id)
    await communicator.disconnect()


async def test_a_cost_viewer_cannot_stop_a_call(cost_viewer) -> None:
    layer = get_channel_layer()
    elsewhere = await layer.new_channel()
    await layer.group_add(CONTROL_GROUP, elsewhere)
    communicator = await connected(cost_viewer)
    await communicator.send_json_to({"action": "stop", "request_id": str(uuid.uuid4())})
    error = await next_of(communicator, "error")
    assert "permission" in error["message"]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            while (await layer.receive(elsewhere))["type"] != STOP_MESSAGE:
                pass
    await communicator.disconnect()


@pytest.mark.parametrize("sent", ["not json", '{"action": "stop", "request_id": "not-a-uuid"}', '{"action": "reboot"}', "[1, 2]"])
async def test_a_message_it_does_not_understand_gets_an_error_and_the_feed_goes_on(sent: str, operator) -> None:
    communicator = await connected(operator)
    await communicator.send_to(text_data=sent)
    assert (await next_of(communicator, "error"))["message"] == "The console did not understand that message."
    await communicator.send_to(bytes_data=b"\x00\x01")
    assert (await next_of(communicator, "error"))["type"] == "error"
    await communicator.disconnect()
