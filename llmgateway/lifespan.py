"""ASGI lifespan: warm up at start; close the shared upstream clients at shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

logger = logging.getLogger(__name__)


def _warm_up() -> None:
    """Load what the first request would otherwise pay for: tokenizers, provider modules."""
    from streaming.providers import openai, simulator  # noqa: F401
    from streaming.tokens import SUPPORTED_ENCODINGS, get_encoding

    for name in SUPPORTED_ENCODINGS:
        get_encoding(name)


async def _warm_up_limiter() -> None:
    """Connect to Redis and load the acquire script before traffic arrives (a free peek)."""
    from calls.limits import get_limiter
    from limits import LimitSpec

    try:
        await get_limiter().acquire([LimitSpec(key="warmup", kind="token_bucket", limit=1, period_seconds=1, cost=0)], group="warmup")
    except Exception:
        logger.warning("rate limiter warm-up failed; the failure policy applies until it recovers")


def _freeze_startup_objects() -> None:
    """Leave what startup built out of every later garbage collection.

    A worker starts with some 180,000 tracked objects (Django, the OpenAI SDK's models, the
    tokenizers), which a full collection walks each time, stopping the event loop and every
    stream on it: 80 ms at a time, measured here, against 5 ms once they are frozen. The price:
    an object alive now that later becomes part of a reference cycle nobody holds is never
    collected (startup's objects mostly live as long as the process).
    """
    gc.collect()
    gc.freeze()


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    from billing.ledger_writer import aclose_ledger_writer
    from billing.outbox import aclose_outbox, get_outbox
    from billing.services import budget_holds
    from calls import control, live
    from calls.limits import aclose_limiter
    from infra.async_postgres import aclose_connections
    from llmgateway.auth import forget_verified_keys
    from streaming.providers import aclose_providers
    from upstreams.learned import aclose_learned_limits

    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await asyncio.to_thread(_warm_up)
            await _warm_up_limiter()
            get_outbox().start()  # replays the ledger journals of stopped processes
            control.on_principal_stopped.append(lambda order: forget_verified_keys())
            control.message_handlers[live.ASK_MESSAGE] = live.on_ask
            control.listener.start()
            live.reporting.start()
            _freeze_startup_objects()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await aclose_providers()
                await aclose_limiter()
                await aclose_learned_limits()
                await budget_holds.aclose()  # admissions still being held are answered
                await aclose_ledger_writer()  # the rows handed in are written (or fail) before
                await aclose_connections()  # the batch writers' connections, now idle
                await aclose_outbox()  # the outbox's last drain
                await control.listener.stop()
                await live.reporting.stop()
            except Exception:
                logger.exception("closing upstream clients failed")
            await send({"type": "lifespan.shutdown.complete"})
            return
