"""Validation of `/v1/chat/completions` request bodies, with OpenAI's error wording and params.

Only what the gateway itself relies on is checked strictly (model, messages, stream flags, token
limits) plus the common sampling parameters, so a malformed request gets a 400 here instead of a
paid round trip to the upstream. Unknown fields pass through to the upstream unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from llmgateway.errors import InvalidRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_N = 16

INVALID_JSON = "We could not parse the JSON body of your request. The body must be a JSON object."
MISSING_PARAM = "Missing required parameter: '{param}'."
INVALID_TYPE = "Invalid type for '{param}': expected {expected}."
INVALID_VALUE = "Invalid value for '{param}': {reason}"


@dataclass(frozen=True, slots=True)
class ChatParams:
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None  # max_completion_tokens, else max_tokens
    n: int


def _type_error(param: str, expected: str) -> InvalidRequest:
    return InvalidRequest(INVALID_TYPE.format(param=param, expected=expected), param=param, code="invalid_type")


def _value_error(param: str, reason: str) -> InvalidRequest:
    return InvalidRequest(INVALID_VALUE.format(param=param, reason=reason), param=param, code="invalid_value")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(INVALID_JSON, code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest(INVALID_JSON, code="invalid_json")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _validate_message(index: int, message: Any) -> None:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _type_error(param, "an object")
    role = message.get("role")
    if role is None:
        raise InvalidRequest(MISSING_PARAM.format(param=f"{param}.role"), param=f"{param}.role", code="missing_required_parameter")
    if role not in ROLES:
        raise _value_error(f"{param}.role", f"'{role}' is not one of {sorted(ROLES)}.")
    content = message.get("content")
    if content is None:
        if role in {"user", "system", "developer", "tool"}:
            raise InvalidRequest(
                MISSING_PARAM.format(param=f"{param}.content"), param=f"{param}.content", code="missing_required_parameter"
            )
    elif isinstance(content, list):
        for part_index, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _type_error(f"{param}.content[{part_index}]", "an object with a 'type'")
    elif not isinstance(content, str):
        raise _type_error(f"{param}.content", "a string or an array of content parts")
    if "name" in message and not isinstance(message["name"], str):
        raise _type_error(f"{param}.name", "a string")


def validate_chat_body(body: dict[str, Any]) -> ChatParams:
    model = body.get("model")
    if model is None:
        raise InvalidRequest(MISSING_PARAM.format(param="model"), param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _type_error("model", "a non-empty string")
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest(MISSING_PARAM.format(param="messages"), param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array")
    if not messages:
        raise _value_error("messages", "the array must contain at least one message.")
    for index, message in enumerate(messages):
        _validate_message(index, message)

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _type_error("stream", "a boolean")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _type_error("stream_options", "an object")
        if not stream:
            raise _value_error("stream_options", "only allowed when 'stream' is true.")
        include_usage = stream_options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _type_error("stream_options.include_usage", "a boolean")

    limits = {}
    for param in ("max_tokens", "max_completion_tokens"):
        value = body.get(param)
        if value is None:
            continue
        if not _is_int(value):
            raise _type_error(param, "an integer")
        if value < 1:
            raise _value_error(param, "must be at least 1.")
        limits[param] = value
    max_tokens = limits.get("max_completion_tokens", limits.get("max_tokens"))

    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n):
        raise _type_error("n", "an integer")
    if not 1 <= n <= MAX_N:
        raise _value_error("n", f"must be between 1 and {MAX_N}.")

    for param, low, high in (("temperature", 0, 2), ("top_p", 0, 1), ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2)):
        value = body.get(param)
        if value is None:
            continue
        if not _is_number(value):
            raise _type_error(param, "a number")
        if not low <= value <= high:
            raise _value_error(param, f"must be between {low} and {high}.")
    for param in ("tools", "stop"):
        value = body.get(param)
        if value is not None and not isinstance(value, list | str if param == "stop" else list):
            raise _type_error(param, "an array" if param == "tools" else "a string or an array")

    return ChatParams(body=body, model=model, stream=stream, include_usage=include_usage, max_tokens=max_tokens, n=n)
