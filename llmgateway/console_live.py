"""The cost console's live feed: a WebSocket at `/ws/console/` (`ConsoleLiveConsumer`).

Staff who may read the console (the view permission on usage records, as the page itself) get,
as JSON messages:

- `{"type": "hello", "may_stop": bool}` once connected;
- `{"type": "spend", "periods": [...]}`: today, this week and this month so far, each with its
  change against the same days before (as the page's cards show them), whenever a gateway process
  reports calls recorded (at most once a second), and every `SPEND_REFRESH_SECONDS` anyway (a row
  the ledger outbox wrote late);
- `{"type": "streams", "calls": [...], "processes": n}`: every running call of every process that
  reports (`calls.live`), whenever a report arrives or one expires.

And they may send `{"action": "stop", "request_id": "..."}`, which needs the `billing.stop_call`
permission: the call is stopped in whichever process runs it (`calls.control.stop_calls`), its
client gets an SSE error event `stopped_by_staff`, and its ledger row says so. The answer is
`{"type": "stop_sent", "request_id": ...}` or `{"type": "error", "message": ...}`.

A visitor, or staff without the permission, is refused at the handshake (HTTP 403).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from decimal import Decimal
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone

from billing import display
from billing.console.selectors import PeriodSpend, spend_by_period
from billing.console.views import console_permitted
from billing.templatetags.console import change, direction
from calls.control import StopOrder, stop_calls
from calls.live import ASK_SECONDS, LIVE_GROUP, REPORT_EXPIRY_SECONDS, RunningCall, ask_for_reports
from infra.db import db_task

logger = logging.getLogger(__name__)

SPEND_REFRESH_SECONDS = 15.0
SPEND_MIN_INTERVAL_SECONDS = 1.0
TICK_SECONDS = 0.5
CALLS_SHOWN = 200  # the longest-running first; the rest are counted

NOT_PERMITTED = "You may not stop calls: ask for the “Can stop a running call” permission."
NOT_UNDERSTOOD = "The console did not understand that message."


def _rights(user: Any) -> tuple[str, bool] | None:
    """(username, may stop calls) for whoever may read the console page; None for anyone else."""
    if user is None or not user.is_active or not user.is_staff:  # as the admin lets in its pages
        return None
    as_a_request = HttpRequest()
    as_a_request.user = user
    if not console_permitted(as_a_request, admin.site):
        return None
    return user.get_username(), user.has_perm("billing.stop_call")


def _spend_message() -> dict[str, Any]:
    return {"type": "spend", "periods": [_period(spend) for spend in spend_by_period(at=timezone.now())]}


def _period(spend: PeriodSpend) -> dict[str, str]:
    return {
        "kind": spend.kind,
        "spent": display.usd_brief(spend.spent),
        "spent_exact": display.usd_exact(spend.spent),
        "change": change(spend),
        "direction": direction(spend),
        "previous": display.usd_brief(spend.previous_spent),
    }


def shown_call(call: RunningCall, *, now: float) -> dict[str, Any]:
    """A running call as the console's table shows it (money and counts formatted here)."""
    cost = Decimal(call["cost_usd"])
    return {
        "request_id": call["request_id"],
        "user": call["user"],
        "key": call["key_prefix"] or "chat page",
        "model": call["model"],
        "stream": call["stream"],
        "started_at": call["started_at"],
        "running_for": display.duration_us(max(int((now - call["started_at"]) * 1_000_000), 0)),
        "tokens": display.count(call["completion_tokens"]),
        "cost": display.usd_brief(cost),
        "cost_exact": display.usd_exact(cost),
    }


class ConsoleLiveConsumer(AsyncJsonWebsocketConsumer):
    """One console's live feed, and its staff's stop orders."""

    async def connect(self) -> None:
        rights = await database_sync_to_async(_rights)(self.scope.get("user"))
        if rights is None:
            await self.close()  # before accepting: the handshake is refused with a 403
            return
        self.username, self.may_stop = rights
        self.reports: dict[str, tuple[float, list[RunningCall]]] = {}
        self.spend_sent_at = 0.0
        self.spend_due = False
        await self.channel_layer.group_add(LIVE_GROUP, self.channel_name)
        await self.accept()
        await self.send_json({"type": "hello", "may_stop": self.may_stop})
        await self._send_spend()
        await self._send_streams()
        await ask_for_reports()
        self.asked_at = time.monotonic()
        self.ticking = asyncio.get_running_loop().create_task(self._tick())

    async def disconnect(self, code: int) -> None:
        ticking = getattr(self, "ticking", None)
        if ticking is not None:
            ticking.cancel()
        await self.channel_layer.group_discard(LIVE_GROUP, self.channel_name)

    # -- from the gateway's processes ---------------------------------------------------------

    async def live_report(self, report: dict[str, Any]) -> None:
        self.reports[report["process"]] = (time.monotonic(), report["calls"])
        self._forget_silent_processes()
        await self._send_streams()
        if report.get("recorded"):
            self.spend_due = True
            if time.monotonic() - self.spend_sent_at >= SPEND_MIN_INTERVAL_SECONDS:
                await self._send_spend()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                if self._forget_silent_processes():
                    await self._send_streams()
                if time.monotonic() - self.asked_at >= ASK_SECONDS:  # still watching
                    self.asked_at = time.monotonic()
                    await ask_for_reports()
                since = time.monotonic() - self.spend_sent_at
                if (self.spend_due and since >= SPEND_MIN_INTERVAL_SECONDS) or since >= SPEND_REFRESH_SECONDS:
                    await self._send_spend()
            except Exception:
                logger.exception("the console's live feed failed to refresh")

    def _forget_silent_processes(self) -> bool:
        cutoff = time.monotonic() - REPORT_EXPIRY_SECONDS
        silent = [process for process, (received_at, _) in self.reports.items() if received_at < cutoff]
        for process in silent:
            del self.reports[process]
        return bool(silent)

    async def _send_streams(self) -> None:
        now = time.time()
        calls = sorted((call for _, calls in self.reports.values() for call in calls), key=lambda call: call["started_at"])
        await self.send_json(
            {
                "type": "streams",
                "calls": [shown_call(call, now=now) for call in calls[:CALLS_SHOWN]],
                "hidden": max(len(calls) - CALLS_SHOWN, 0),
                "processes": len(self.reports),
            }
        )

    async def _send_spend(self) -> None:
        self.spend_due = False
        self.spend_sent_at = time.monotonic()
        try:
            message = await db_task(_spend_message)()
        except Exception as error:  # the database is down: the live calls go on; the figure waits
            logger.warning("the console's live spend could not be read (%s)", error)
            return
        await self.send_json(message)

    # -- from staff ---------------------------------------------------------------------------

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict) or content.get("action") != "stop":
            await self.send_json({"type": "error", "message": NOT_UNDERSTOOD})
            return
        try:
            request_id = str(uuid.UUID(str(content.get("request_id"))))
        except ValueError:
            await self.send_json({"type": "error", "message": NOT_UNDERSTOOD})
            return
        if not self.may_stop:
            await self.send_json({"type": "error", "message": NOT_PERMITTED, "request_id": request_id})
            return
        logger.info("%s stopped call %s from the cost console", self.username, request_id)
        await stop_calls(StopOrder("stopped_by_staff", request_id=request_id))
        await self.send_json({"type": "stop_sent", "request_id": request_id})

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        try:
            content = json.loads(text_data) if text_data else None
        except ValueError:
            content = None
        await self.receive_json(content)
