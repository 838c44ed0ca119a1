"""Load-test your own llmgateway deployment with Locust (not run in CI).

    pip install -e ".[bench]"
    LLMGATEWAY_API_KEY=sk-gw-... locust -f bench/locustfile.py --host https://gateway.example.com
    # headless: ... --headless --users 100 --spawn-rate 10 --run-time 2m --csv results/run1

Each simulated user sends chat completions in a loop to ``POST /v1/chat/completions``. Settings
come from the environment:

- ``LLMGATEWAY_API_KEY`` (required): a gateway key (``manage.py createapikey USERNAME``).
  Calls are billed and limited like any others: use a key whose budget allows the test.
- ``LLMGATEWAY_MODEL``: the model to ask for (default ``gpt-4o-mini``; ``sim-chat`` or
  ``sim-fast`` use the built-in simulator and cost no upstream tokens).
- ``LLMGATEWAY_STREAM``: ``1`` (default) for SSE streams, ``0`` for plain JSON completions.
- ``LLMGATEWAY_MAX_TOKENS``: ``max_tokens`` per request (default 64).
- ``LLMGATEWAY_PROMPT``: the user message (default: a short question).
- ``LLMGATEWAY_WAIT``: seconds each user waits between requests, as ``MIN,MAX`` (default ``0,1``).

Locust's own row for the POST measures the time to the response headers. For streams this file
adds two rows of its own (request type ``SSE``): ``TTFT <model>``, from sending the request to the
first content delta, and ``stream <model>``, the whole stream until ``data: [DONE]``, whose
"size" is the number of content deltas. A stream that ends without ``[DONE]``, or with an SSE
error event, is a failure. The gateway's ``x-gateway-overhead-ms`` header (the time it says it
added) is reported as ``overhead <model>``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from locust import HttpUser, between, task

API_KEY = os.environ.get("LLMGATEWAY_API_KEY", "")
MODEL = os.environ.get("LLMGATEWAY_MODEL", "gpt-4o-mini")
STREAM = os.environ.get("LLMGATEWAY_STREAM", "1").strip().lower() not in {"0", "false", "no", "off"}
MAX_TOKENS = int(os.environ.get("LLMGATEWAY_MAX_TOKENS", "64"))
PROMPT = os.environ.get("LLMGATEWAY_PROMPT", "In two sentences, why is the sky blue?")
WAIT_MIN, WAIT_MAX = (float(x) for x in os.environ.get("LLMGATEWAY_WAIT", "0,1").split(","))

if not API_KEY:
    raise SystemExit(
        "Set LLMGATEWAY_API_KEY to a gateway API key (manage.py createapikey USERNAME)."
    )


class ChatUser(HttpUser):
    wait_time = between(WAIT_MIN, WAIT_MAX)

    def on_start(self) -> None:
        self.client.headers.update(
            {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        )

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
        }
        if STREAM:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _record(
        self, name: str, started: float, *, length: int = 0, error: Exception | None = None
    ) -> None:
        self.environment.events.request.fire(
            request_type="SSE",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )

    @task
    def chat_completion(self) -> None:
        name = f"/v1/chat/completions {MODEL}{' stream' if STREAM else ''}"
        started = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions",
            data=json.dumps(self._body()),
            name=name,
            stream=STREAM,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            overhead = response.headers.get("x-gateway-overhead-ms")
            if overhead:
                self.environment.events.request.fire(
                    request_type="SSE" if STREAM else "JSON",
                    name=f"overhead {MODEL}",
                    response_time=float(overhead),
                    response_length=0,
                    exception=None,
                    context={},
                )
            if not STREAM:
                try:
                    response.json()["choices"][0]
                except (ValueError, KeyError, IndexError) as error:
                    response.failure(f"not a chat completion: {error}")
                return
            self._read_stream(response, started)

    def _read_stream(self, response: Any, started: float) -> None:
        first_token = False
        deltas = 0
        done = False
        error: Exception | None = None
        for line in response.iter_lines():
            if not line or not line.startswith(b"data: "):
                continue  # blank separators and ": ping" heartbeats
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            try:
                event = json.loads(data)
            except ValueError:
                error = ValueError(f"bad SSE data: {data[:100]!r}")
                break
            if "error" in event:
                error = RuntimeError(f"SSE error event: {event['error'].get('message')}")
                break
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    deltas += 1
                    if not first_token:
                        first_token = True
                        self._record(f"TTFT {MODEL}", started)
        if error is None and not done:
            error = RuntimeError("the stream ended without data: [DONE]")
        self._record(f"stream {MODEL}", started, length=deltas, error=error)
        if error is not None:
            response.failure(str(error))
        else:
            response.success()
