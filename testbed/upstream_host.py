"""Host a :class:`~testbed.fake_upstream.FakeUpstream` in this process, steered over stdin/stdout.

    python -m testbed.upstream_host

The benchmark runs the fake upstream in its own process (so its CPU is not the gateway's or the
load generator's), but needs what the CLI server cannot give: change its pacing and faults between
phases, and read its per-request records (``closed_at`` for the disconnect storm, ``bytes_written``
for back-pressure). So this helper runs the server with ``running_in_thread()`` and answers one
JSON command per stdin line with one JSON line on stdout:

- ``{"op": "set", "attrs": {...}}``: set behaviour attributes (``tokens``, ``inter_token_delay``,
  ``ttft``, ``fault``, ``fault_after_tokens``, ``max_records``); answers ``{"ok": true}``.
- ``{"op": "clear"}``: forget the records.
- ``{"op": "stats"}``: connection counters.
- ``{"op": "records", "user_prefix": "..."}``: the records whose request body's ``user`` starts
  with the prefix (times are ``time.monotonic()``, one clock for every process on Linux), each
  with the gateway's ``X-Client-Request-Id`` as ``request_id`` (None if it sent none).
- ``{"op": "request_ids", "user_prefix": "..."}``: only those ids, one per record, in order:
  cheap enough to poll while a phase runs.

The first line written is ``{"base_url": ...}``; EOF on stdin stops the server.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from testbed.fake_upstream import FakeUpstream, UpstreamRequest

SETTABLE = frozenset(
    {"tokens", "inter_token_delay", "ttft", "fault", "fault_after_tokens", "max_records"}
)


CLIENT_REQUEST_ID = "x-client-request-id"  # the gateway's id of the call (headers are lower-cased)


def _matching(upstream: FakeUpstream, prefix: str) -> list[tuple[str, UpstreamRequest]]:
    """(user, record) for the records whose body's ``user`` starts with ``prefix``."""
    matching = []
    for record in list(upstream.requests):
        body = record.body
        user = body.get("user") if isinstance(body, dict) else None
        if isinstance(user, str) and user.startswith(prefix):
            matching.append((user, record))
    return matching


def _records(upstream: FakeUpstream, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for user, record in _matching(upstream, prefix):
        rows.append(
            {
                "user": user,
                "request_id": record.headers.get(CLIENT_REQUEST_ID),
                "started_at": record.started_at,
                "first_chunk_at": record.first_chunk_at,
                "closed_at": record.closed_at,
                "client_disconnected": record.client_disconnected,
                "completed": record.completed,
                "content_chunks_sent": record.content_chunks_sent,
                "bytes_written": record.bytes_written,
                "write_blocked": record.write_blocked,
                "max_drain_wait": record.max_drain_wait,
            }
        )
    return rows


def _answer(upstream: FakeUpstream, command: dict[str, Any]) -> dict[str, Any]:
    op = command.get("op")
    if op == "set":
        attrs = command.get("attrs", {})
        unknown = set(attrs) - SETTABLE
        if unknown:
            return {"ok": False, "error": f"not settable: {sorted(unknown)}"}
        for name, value in attrs.items():
            setattr(upstream, name, value)
        return {"ok": True}
    if op == "clear":
        upstream.clear_requests()
        return {"ok": True}
    if op == "stats":
        return {
            "ok": True,
            "open_connections": upstream.open_connections,
            "total_connections": upstream.total_connections,
            "requests": len(upstream.requests),
        }
    if op == "records":
        return {"ok": True, "records": _records(upstream, str(command.get("user_prefix", "")))}
    if op == "request_ids":
        prefix = str(command.get("user_prefix", ""))
        ids = [record.headers.get(CLIENT_REQUEST_ID) for _, record in _matching(upstream, prefix)]
        return {"ok": True, "ids": ids}
    return {"ok": False, "error": f"unknown op {op!r}"}


def main() -> int:
    upstream = FakeUpstream(max_records=0)
    with upstream.running_in_thread():
        print(json.dumps({"base_url": upstream.base_url}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                answer = _answer(upstream, json.loads(line))
            except Exception as error:  # report, keep serving: the benchmark decides
                answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
