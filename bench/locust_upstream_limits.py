"""The load of ``python -m bench.upstream_limits`` (issue 13): steady calls, each sorted by who refused it.

    locust -f bench/locust_upstream_limits.py --headless -u USERS -r RATE --run-time 600s --host URL

``bench.upstream_limits`` runs it with PYTHONPATH at the checkout (it imports that module's
accounting) and these settings in the environment:

- ``LLMGATEWAY_API_KEY`` (required), ``LLMGATEWAY_MODEL`` (default ``gpt-4o-mini``),
  ``LLMGATEWAY_MAX_TOKENS`` (16), ``LLMGATEWAY_PROMPT``: as ``bench/locustfile.py``;
- ``UPSTREAM_LIMITS_PACING``: seconds between the starts of one user's calls (Locust's
  ``constant_pacing``; longer than a call may last, so users x 1/pacing is the offered rate);
- ``UPSTREAM_LIMITS_TALLY``: where to write the tally (:class:`bench.upstream_limits.Tally` as
  JSON) when Locust quits.

Each call is a streamed chat completion read to its end. Locust's table shows a refusal as a
failure named by its status and error code (``429 upstream_capacity``, ``429
upstream_rate_limited``), so it can be read on its own too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, constant_pacing, events, task

from bench.upstream_limits import OK, Tally, error_code

API_KEY = os.environ.get("LLMGATEWAY_API_KEY", "")
MODEL = os.environ.get("LLMGATEWAY_MODEL", "gpt-4o-mini")
MAX_TOKENS = int(os.environ.get("LLMGATEWAY_MAX_TOKENS", "16"))
PROMPT = os.environ.get("LLMGATEWAY_PROMPT", "In one word: is the sky blue?")
PACING = float(os.environ.get("UPSTREAM_LIMITS_PACING", "35"))
TALLY_PATH = os.environ.get("UPSTREAM_LIMITS_TALLY", "")

if not API_KEY:
    raise SystemExit(
        "Set LLMGATEWAY_API_KEY to a gateway API key (manage.py createapikey USERNAME)."
    )

BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)

# One Locust process (no --processes): its users share this tally in one gevent thread.
tally = Tally()
started = time.monotonic()


@events.test_start.add_listener
def _started(**_: Any) -> None:
    global started
    started = time.monotonic()


@events.quitting.add_listener
def _write_tally(**_: Any) -> None:
    if TALLY_PATH:
        Path(TALLY_PATH).write_text(json.dumps(tally.to_json()))


class UpstreamLimitsUser(HttpUser):
    wait_time = constant_pacing(PACING)

    def on_start(self) -> None:
        self.client.headers.update(
            {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        )

    @task
    def chat_completion(self) -> None:
        began = time.monotonic()
        with self.client.post(
            "/v1/chat/completions",
            data=BODY,
            name=f"/v1/chat/completions {MODEL} stream",
            stream=True,
            catch_response=True,
        ) as response:
            status = response.status_code
            body = b""
            if status == 200:
                # Read the stream to its end; keep only what an error event would need.
                done = False
                for line in response.iter_lines():
                    if line.startswith(b'data: {"error"'):
                        body = line
                    elif line == b"data: [DONE]":
                        done = True
                if not done and not body:
                    body = b'{"error": {"code": "stream_cut"}}'
            else:
                body = response.content or b""
            code = error_code(body) if body else None
            if status == 0:  # no answer: the connection failed
                code = type(response.error).__name__ if response.error else "no answer"
                body = repr(response.error).encode()
            now = time.monotonic()
            outcome = tally.add(status, code, at=now - started, took=now - began, body=body)
            if outcome == OK:
                response.success()
            else:
                response.failure(f"{status} {code}")
