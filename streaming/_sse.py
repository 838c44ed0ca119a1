"""Server-sent event framing, as OpenAI's API sends it."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
HEARTBEAT = b": ping\n\n"


def data_frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_frame(*, message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    """An error event the OpenAI SDKs raise as `APIError` (a data frame whose JSON has `error`)."""
    return data_frame({"error": {"message": message, "type": type, "param": param, "code": code}})
