"""The running calls of every gateway process, reported live to the cost console.

While a console watches, each process reports on the channel layer's `LIVE_GROUP` once every
`REPORT_SECONDS` while it runs calls, and once more after its last one ends: its running calls
(who, with which key, which model, since when, tokens and cost so far) and how many calls it
recorded since its previous report. A console asks every process for a report when it connects
and every `ASK_SECONDS` after (`ask_for_reports`, received through the stop-order listener of
`calls.control`); a process answers at once, and reports for `WATCH_SECONDS` after the last ask.
So a process with nothing running and nothing recorded says nothing, and none says anything when
no console is open.

Consoles (the WebSocket consumer at the edge) join the group and keep the latest report of each
process; a process that stops reporting (it died) is forgotten after `REPORT_EXPIRY_SECONDS`.
channels-redis when `REDIS_URL` is set, so every process reports; the in-memory layer otherwise,
where the one process is all there is.

Tokens so far are the chunks that carried text: what the outbox checkpoints, and what the call
would be billed for if its process died now. Cost so far is those tokens and the prompt as
estimated at admission, at the call's rates. Both are estimates until the ledger row is written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypedDict

from channels.layers import get_channel_layer

from calls.control import CONTROL_GROUP, ActiveCalls, active_calls
from infra.tasks import ProcessTask

if TYPE_CHECKING:
    from calls.call import ApiCall

logger = logging.getLogger(__name__)

LIVE_GROUP = "llmgateway.console.live"
REPORT_MESSAGE = "live.report"  # consumers handle it in `live_report`
ASK_MESSAGE = "calls.report"  # from a console to every process, through CONTROL_GROUP
REPORT_SECONDS = 1.0
REPORT_EXPIRY_SECONDS = 3.5
ASK_SECONDS = 10.0
WATCH_SECONDS = 3 * ASK_SECONDS


class RunningCall(TypedDict):
    request_id: str
    user: str
    user_id: int
    key_prefix: str | None
    model: str
    stream: bool
    started_at: float  # Unix time
    completion_tokens: int
    prompt_tokens: int
    cost_usd: str  # a Decimal's exact text


class Report(TypedDict):
    type: str
    process: str
    sent_at: float
    calls: list[RunningCall]
    recorded: int  # calls this process recorded since its previous report


def running_call(call: ApiCall) -> RunningCall:
    """What the console shows of one running call, now."""
    route, admission, relay = call.serving, call.admission, call.relay  # the model answering: a fallback shows as itself
    assert route is not None and admission is not None and relay is not None
    completion = relay.outcome.content_chunks
    cost: Decimal = admission.rates.cost(prompt_tokens=call.prompt_tokens_estimate, cached_tokens=0, completion_tokens=completion)
    principal = call.principal
    return {
        "request_id": str(call.request_id),
        "user": principal.username,
        "user_id": principal.user_id,
        "key_prefix": principal.key_prefix,
        "model": route.id,
        "stream": call.params.stream,
        "started_at": call.created_at.timestamp(),
        "completion_tokens": completion,
        "prompt_tokens": call.prompt_tokens_estimate,
        "cost_usd": str(cost),
    }


class LiveReporter:
    """This process's reports: what runs here, and how many calls it recorded meanwhile."""

    def __init__(self, calls: ActiveCalls, process: str) -> None:
        self._calls = calls
        self.process = process
        self._recorded = 0
        self._reported_calls = False
        self._watched_until = 0.0

    def call_recorded(self) -> None:
        self._recorded += 1

    def watched(self) -> None:
        """A console asked: report for the next WATCH_SECONDS."""
        self._watched_until = time.monotonic() + WATCH_SECONDS

    def report(self, *, always: bool = False) -> Report | None:
        """The next report, or None when there is nothing to say or no one to say it to (and
        `always` is false)."""
        if not always and time.monotonic() > self._watched_until:
            self._recorded = 0
            self._reported_calls = False
            return None
        calls = [running_call(call) for call in self._calls.running()]
        if not (always or calls or self._recorded or self._reported_calls):
            return None
        recorded, self._recorded = self._recorded, 0
        self._reported_calls = bool(calls)
        return {"type": REPORT_MESSAGE, "process": self.process, "sent_at": time.time(), "calls": calls, "recorded": recorded}

    async def publish(self, *, always: bool = False) -> None:
        report = self.report(always=always)
        layer = get_channel_layer()
        if report is None or layer is None:
            return
        try:
            await layer.group_send(LIVE_GROUP, dict(report))
        except Exception as error:
            logger.warning("could not publish the live report (%s)", error)

    async def run(self) -> None:
        """Report every REPORT_SECONDS for the life of the process."""
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            try:
                await self.publish()
            except Exception:  # a call whose state could not be read must not end the reports
                logger.exception("building the live report failed")


live_reporter = LiveReporter(active_calls, process=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")

# Started and stopped by the ASGI lifespan.
reporting = ProcessTask(live_reporter.run, name="llmgateway-live-reports")


async def ask_for_reports() -> None:
    """Ask every process for a report now (a console just connected)."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(CONTROL_GROUP, {"type": ASK_MESSAGE})
    except Exception as error:
        logger.warning("could not ask the gateway processes for live reports (%s)", error)
    live_reporter.watched()  # this process, even where nothing listens
    await live_reporter.publish(always=True)


_asked: set[asyncio.Task[None]] = set()


def on_ask(message: dict[str, Any]) -> None:
    """A console asked for reports (received by the listener of `calls.control`): report now."""
    live_reporter.watched()
    task = asyncio.get_running_loop().create_task(live_reporter.publish(always=True))
    _asked.add(task)
    task.add_done_callback(_asked.discard)
