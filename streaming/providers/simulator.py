"""The built-in simulator: a deterministic, paced, fault-injecting stand-in for an LLM upstream.

It is the embedded default, so the gateway runs and demos with no upstream account, and it is what
load tests and fault drills point at. Pacing comes from the route's options, overridable per request
with headers (the gateway passes `x-simulator-*` headers only to this provider):

- `x-simulator-tokens`: completion length in tokens (capped by the request's max_tokens)
- `x-simulator-tps`: tokens per second (0 = as fast as possible)
- `x-simulator-ttft-ms`: time to the first token
- `x-simulator-fault`: `429` | `500` | `stall` | `cut` | `error`, after `x-simulator-fault-after`
  tokens for the mid-stream ones (default 3). `429` honours `x-simulator-retry-after` (seconds).
- `x-simulator-fault-attempts`: how many of the call's attempts meet the fault (default: all), so
  `x-simulator-fault: 429` with `x-simulator-fault-attempts: 1` shows the gateway's retry answering.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from django.conf import settings

from streaming.catalog import Deployment
from streaming.providers.base import ProviderChunk, ProviderRequest, UpstreamError, Usage

_WORDS = (
    "The gateway streams each token as soon as it arrives, keeps memory bounded when a client "
    "reads slowly, bills exactly what was produced, and tells every caller when to come back. "
    "This answer comes from the built-in simulator, so no upstream account is needed to try it."
).split(" ")
FAULTS = frozenset({"429", "500", "stall", "cut", "error"})
# Without pacing, hand the event loop back every this many tokens so one stream cannot starve others.
_YIELD_EVERY = 16


def _option(request: ProviderRequest, header: str, route_key: str, default: float) -> float:
    """The header's value if it is a finite number (at least 0), else the route's option, else *default*.

    `inf` and `nan` parse as floats but are no length or delay: `int(inf)` crashed the stream.
    """
    raw = request.simulator.get(header)
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value)
    return float(request.deployment.options.get(route_key, default))


def simulated_text(token_index: int) -> str:
    word = _WORDS[token_index % len(_WORDS)]
    return word if token_index == 0 else " " + word


class SimulatorProvider:
    name = "simulator"

    async def aclose(self) -> None:
        return None

    async def stored(self, *, deployment: Deployment, method: Literal["GET", "DELETE", "POST"], path: str) -> dict[str, Any]:
        raise UpstreamError("bad_request", "The simulator stores no responses yet.", status=404)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderChunk]:
        from streaming.tokens import acount_chat_prompt_tokens

        body = request.body
        tokens = int(_option(request, "tokens", "completion_tokens", settings.SIMULATOR_COMPLETION_TOKENS))
        tokens_per_second = _option(request, "tps", "tokens_per_second", settings.SIMULATOR_TOKENS_PER_SECOND)
        ttft = _option(request, "ttft-ms", "ttft_ms", settings.SIMULATOR_TTFT_SECONDS * 1000) / 1000
        fault = request.simulator.get("fault")
        if fault is not None and request.attempt > _option(request, "fault-attempts", "fault_attempts", math.inf):
            fault = None
        fault_after = int(_option(request, "fault-after", "fault_after", 3))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish_reason = "stop"
        if limit is not None and limit < tokens:
            tokens, finish_reason = int(limit), "length"

        if fault == "429":
            retry_after = _option(request, "retry-after", "retry_after", 1.0)
            raise UpstreamError(
                "rate_limited",
                "Simulated upstream rate limit.",
                status=429,
                retry_after=retry_after,
                headers={"retry-after": f"{retry_after:g}"},
            )
        if fault == "500":
            raise UpstreamError("server_error", "Simulated upstream server error.", status=500)

        prompt_tokens = await acount_chat_prompt_tokens(body.get("messages") or [], model=request.deployment.upstream_model)
        completion_id = f"chatcmpl-sim-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = request.deployment.upstream_model

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        loop = asyncio.get_running_loop()
        start = loop.time()
        if ttft > 0:
            await asyncio.sleep(ttft)
        yield ProviderChunk(data=chunk({"role": "assistant", "content": ""}), text="")
        interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        for index in itertools.islice(itertools.count(), tokens):
            if fault in {"stall", "cut", "error"} and index == fault_after:
                if fault == "stall":
                    await asyncio.Event().wait()  # until the gateway's idle timeout cancels us
                if fault == "cut":
                    raise UpstreamError("connection", "Simulated upstream connection lost mid-stream.")
                raise UpstreamError("server_error", "Simulated upstream error event mid-stream.")
            if interval:
                # Pace against an absolute schedule so sleep overshoot does not accumulate.
                delay = start + ttft + index * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif index % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            text = simulated_text(index)
            yield ProviderChunk(data=chunk({"content": text}), text=text)
        yield ProviderChunk(data=chunk({}, finish_reason), text="")
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens)
        usage_chunk = chunk({})
        usage_chunk["choices"] = []
        usage_chunk["usage"] = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        yield ProviderChunk(data=usage_chunk, text="", usage=usage)
