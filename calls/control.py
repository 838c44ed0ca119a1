"""Running calls, and stopping them from outside: one call, or every call of a key or a user.

Each process keeps a registry of the calls it is running (`active_calls`). A stop is an order
published on the channel layer's `CONTROL_GROUP`: channels-redis when `REDIS_URL` is set (its
pub/sub layer on a Redis Cluster), so it reaches every gateway process; the in-memory layer otherwise (one process, which is then all
there is). Every process listens from its start (`listener`, started by the ASGI lifespan)
and stops the matching calls it runs: a stream ends with an SSE error event whose code is the
order's reason, a non-stream call with an error, and the ledger row says why in `error_kind`.

The publisher also applies an order to its own process at once, so a stop works where nothing
listens (a process without a lifespan) and never waits for the layer's round trip here; applying
an order twice is harmless.

Failure policy: when the channel layer cannot be reached the order is applied in this process
only, and logged. A revoked key or suspended user is still refused new calls by authentication
(within AUTH_CACHE_SECONDS in other processes); only their running calls elsewhere go on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from infra.tasks import ProcessTask

if TYPE_CHECKING:
    from calls.call import ApiCall

logger = logging.getLogger(__name__)

CONTROL_GROUP = "llmgateway.calls.control"
STOP_MESSAGE = "calls.stop"

StopReason = Literal["stopped_by_staff", "api_key_revoked", "user_suspended"]
STOP_MESSAGES: dict[StopReason, str] = {
    "stopped_by_staff": "This call was stopped by the gateway's staff.",
    "api_key_revoked": "This call was stopped: its API key was revoked.",
    "user_suspended": "This call was stopped: its account was suspended.",
}


@dataclass(frozen=True, slots=True)
class StopOrder:
    """Stop the calls that match every field given (one call, a key's or a user's)."""

    reason: StopReason
    request_id: str | None = None
    api_key_id: int | None = None
    user_id: int | None = None

    def matches(self, call: ApiCall) -> bool:
        principal = call.principal
        return (
            (self.request_id is None or self.request_id == str(call.request_id))
            and (self.api_key_id is None or self.api_key_id == principal.api_key_id)
            and (self.user_id is None or self.user_id == principal.user_id)
        )


class ActiveCalls:
    """The calls this process is running, from their upstream call to their end."""

    def __init__(self) -> None:
        self._calls: dict[uuid.UUID, ApiCall] = {}

    def add(self, call: ApiCall) -> None:
        self._calls[call.request_id] = call

    def remove(self, call: ApiCall) -> None:
        self._calls.pop(call.request_id, None)

    def running(self) -> list[ApiCall]:
        return list(self._calls.values())

    def apply(self, order: StopOrder) -> int:
        """Stop the matching calls; return how many were running here."""
        stopped = 0
        for call in list(self._calls.values()):
            if order.matches(call):
                call.stop(order.reason, STOP_MESSAGES[order.reason])
                stopped += 1
        return stopped


active_calls = ActiveCalls()


# The most a stop waits for the channel layer: a frozen Redis must not hold up staff's action.
PUBLISH_TIMEOUT_SECONDS = 2.0


async def stop_calls(order: StopOrder) -> int:
    """Stop the matching calls in every process; return how many ran in this one."""
    stopped_here = active_calls.apply(order)
    layer = get_channel_layer()
    if layer is not None:
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                await layer.group_send(CONTROL_GROUP, {"type": STOP_MESSAGE, **asdict(order)})
        except Exception as error:
            logger.warning("could not publish a stop order to other processes (%r); applied here only", error)
    return stopped_here


def stop_calls_sync(order: StopOrder) -> int:
    """`stop_calls` from synchronous code (admin actions, services, commands)."""
    return async_to_sync(stop_calls)(order)


def _order_from(message: dict[str, Any]) -> StopOrder:
    return StopOrder(
        reason=message["reason"],
        request_id=message.get("request_id"),
        api_key_id=message.get("api_key_id"),
        user_id=message.get("user_id"),
    )


# Told of every order a process receives that names a key or a user (the edge forgets its cached
# authentication of them, so new calls are refused at once too).
on_principal_stopped: list[Callable[[StopOrder], None]] = []
# Other messages sent to CONTROL_GROUP, by their type (a console asking for live reports).
message_handlers: dict[str, Callable[[dict[str, Any]], None]] = {}

LISTEN_RETRY_SECONDS = 1.0
REJOIN_SECONDS = 3600.0


def _handle(message: dict[str, Any]) -> None:
    if message.get("type") != STOP_MESSAGE:
        handler = message_handlers.get(message.get("type", ""))
        if handler is not None:
            handler(message)
        return
    order = _order_from(message)
    active_calls.apply(order)
    if order.api_key_id is not None or order.user_id is not None:
        for hook in on_principal_stopped:
            hook(order)


async def _listen() -> None:
    """Hear CONTROL_GROUP on one channel for the life of the process.

    The channel outlives failures: what was sent to it while Redis was out of reach, or while
    the listener waited to retry, is still read after (channels-redis's default layer keeps it
    for its expiry), and no dead channel is left in the group. The group is joined again every
    REJOIN_SECONDS (that layer forgets members after its group_expiry, a day by default) without
    cancelling the receive in flight: the pub/sub layer (REDIS_CLUSTER) drops a channel whose
    receive is cancelled.
    """
    layer = get_channel_layer()
    if layer is None:
        return
    channel: str | None = None
    receiving: asyncio.Future[dict[str, Any]] | None = None
    try:
        while True:
            try:
                if channel is None:
                    channel = await layer.new_channel()
                await layer.group_add(CONTROL_GROUP, channel)
                while True:
                    if receiving is None:
                        receiving = asyncio.ensure_future(layer.receive(channel))
                    done, _ = await asyncio.wait({receiving}, timeout=REJOIN_SECONDS)
                    if not done:
                        await layer.group_add(CONTROL_GROUP, channel)
                        continue
                    finished, receiving = receiving, None
                    _handle(finished.result())  # or raise what the receive raised
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("listening for stop orders failed (%s); retrying", error)
                await asyncio.sleep(LISTEN_RETRY_SECONDS)
    finally:
        if receiving is not None and not receiving.done():
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)


# Started and stopped by the ASGI lifespan: stop orders are heard for the life of the process.
listener = ProcessTask(_listen, name="llmgateway-stop-orders")
