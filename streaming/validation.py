"""Validation of request bodies against the declared schemas (`streaming.schema`:
`ChatCompletionRequest`, `ResponsesRequest`, `EmbeddingsRequest`, `CompletionRequest`), with
OpenAI's error wording, codes and params.

A body that does not match gets an `InvalidApiRequest` about its first wrong field: `param` is
the field's path in the body as OpenAI writes it (`messages[0].content`, `tools[1].function.name`)
and the message and code are OpenAI's (`Missing required parameter: 'model'.`,
`invalid_type`, `integer_below_min_value`, ...). A malformed request is refused here, before a
paid round trip to the upstream or a crash in the code that counts its prompt tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from streaming.endpoints import EndpointName
from streaming.exceptions import InvalidApiRequest
from streaming.schema import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    NAME_PATTERN,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    ResponsesRequest,
)

INVALID_JSON = "We could not parse the JSON body of your request. The body must be a JSON object."
MISSING_PARAM = "Missing required parameter: '{param}'."
INVALID_TYPE = "Invalid type for '{param}': expected {expected}."
INVALID_VALUE = "Invalid value for '{param}': {reason}"
UNSUPPORTED_VALUE = "Invalid value: '{value}'. Supported values are: {supported}."
NAME_MISMATCH = (
    "Invalid '{param}': string does not match pattern. Expected a string that matches the pattern '{pattern}'."
)
STRING_TOO_LONG = (
    "Invalid '{param}': string too long. Expected a string with maximum length {limit}, "
    "but got a string with length {length} instead."
)
EMPTY_STRING = "Invalid '{param}': empty string. Expected a string with minimum length 1, but got an empty string instead."
EMPTY_ARRAY = (
    "Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead."
)
ARRAY_TOO_LONG = (
    "Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
    "but got an array with length {length} instead."
)
OUT_OF_RANGE = "Invalid '{param}': {kind} {side} {bound} value. Expected a value {operator} {limit}, but got {value} instead."

# What a type error expects, by pydantic's error type.
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
_QUOTED = re.compile(r"'([^']*)'")


@dataclass(frozen=True, slots=True)
class CallParams:
    """A validated request to one of the API's endpoints: what the call's life needs of it."""

    endpoint: EndpointName
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    # The completion tokens one choice may produce, as the request limits it (chat:
    # max_completion_tokens, else max_tokens; Responses: max_output_tokens; legacy completions:
    # max_tokens, else OpenAI's default 16); None: no limit.
    max_tokens: int | None
    n: int


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidApiRequest(INVALID_JSON, code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidApiRequest(INVALID_JSON, code="invalid_json")
    return body


def validate_chat_body(body: dict[str, Any]) -> CallParams:
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as invalid:
        raise _openai_error(invalid, body) from None
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return CallParams(
        endpoint="chat.completions",
        body=body,
        model=request.model,
        stream=bool(request.stream),
        include_usage=request.stream_options.include_usage if request.stream_options is not None else False,
        max_tokens=max_tokens,
        n=request.n if request.n is not None else 1,
    )


def validate_responses_body(body: dict[str, Any]) -> CallParams:
    try:
        request = ResponsesRequest.model_validate(body)
    except ValidationError as invalid:
        raise _openai_error(invalid, body) from None
    return CallParams(
        endpoint="responses",
        body=body,
        model=request.model,
        stream=bool(request.stream),
        include_usage=False,  # a Responses stream always ends with its usage (`response.completed`)
        max_tokens=request.max_output_tokens,
        n=1,
    )


def validate_embeddings_body(body: dict[str, Any]) -> CallParams:
    try:
        request = EmbeddingsRequest.model_validate(body)
    except ValidationError as invalid:
        raise _openai_error(invalid, body) from None
    return CallParams(
        endpoint="embeddings", body=body, model=request.model, stream=False, include_usage=False, max_tokens=None, n=1
    )


def validate_completions_body(body: dict[str, Any]) -> CallParams:
    """Legacy completions. `max_tokens` defaults to OpenAI's 16 for this endpoint, and `n` is the
    choices the upstream generates and bills: `best_of` of them when given, of which `n` return.

    `max_tokens: 0` (with `echo`, to score a prompt) generates nothing, but is reported as 1: a
    0 would read as "no limit" to `params.max_tokens or GATEWAY_DEFAULT_MAX_TOKENS` and reserve the
    gateway's default for a call that generates no token.
    """
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError as invalid:
        raise _openai_error(invalid, body) from None
    max_tokens = request.max_tokens if request.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    n = request.best_of if request.best_of is not None else (request.n if request.n is not None else 1)
    return CallParams(
        endpoint="completions",
        body=body,
        model=request.model,
        stream=bool(request.stream),
        include_usage=request.stream_options.include_usage if request.stream_options is not None else False,
        max_tokens=max(max_tokens, 1),
        n=n,
    )


def _openai_error(invalid: ValidationError, body: dict[str, Any]) -> InvalidApiRequest:
    """The error about the first wrong field, as OpenAI words it."""
    errors = invalid.errors(include_url=False)
    first = errors[0]
    if first["type"] == "invalid_value" and "param" in first.get("ctx", {}):  # the request as a whole
        context = first["ctx"]
        return InvalidApiRequest(context["message"], param=context["param"], code="invalid_value")
    # A union reports one error per member it tried: of those about the same field, the one that
    # got furthest into the body is about what the client meant.
    same_field = [error for error in errors if error["loc"][:1] == first["loc"][:1]]
    located = [(_path_in(body, error), error) for error in same_field]
    path, error = max(located, key=lambda pair: len(pair[0]))
    return _translated(error, path, body)


def _path_in(body: Any, error: ErrorDetails) -> list[str | int]:
    """Where in the body an error is: its location without union members and discriminator tags.

    Pydantic puts the tag of a discriminated union's member (a message's role, a tool's type)
    after the union's place: `("tools", 0, "function", "function", "name")`. It is the value of
    the object's `type` or `role`, and comes once, before the member's own fields.
    """
    path: list[str | int] = []
    data = body
    tag_expected = False
    loc = error["loc"]
    for position, item in enumerate(loc):
        if isinstance(item, str) and item.startswith("~"):
            continue  # a member of a union chosen by JSON type (streaming.schema)
        if tag_expected and isinstance(data, dict) and item in (data.get("type"), data.get("role")):
            tag_expected = False
            continue
        tag_expected = False
        if isinstance(item, int) and isinstance(data, list) and 0 <= item < len(data):
            path.append(item)
            data = data[item]
            tag_expected = True
        elif isinstance(item, str) and isinstance(data, dict) and item in data:
            path.append(item)
            data = data[item]
            tag_expected = True
        elif position == len(loc) - 1 and error["type"] == "missing":
            path.append(item)
    return path


def _value_at(body: Any, path: list[str | int]) -> Any:
    for item in path:
        body = body[item]
    return body


def _param(path: list[str | int]) -> str:
    return "".join(f"[{item}]" if isinstance(item, int) else (f".{item}" if index else item) for index, item in enumerate(path))


def _listed(choices: list[str]) -> str:
    quoted = [f"'{choice}'" for choice in choices]
    if len(quoted) < 3:
        return " and ".join(quoted)
    return f"{', '.join(quoted[:-1])}, and {quoted[-1]}"


def _translated(error: ErrorDetails, path: list[str | int], body: dict[str, Any]) -> InvalidApiRequest:
    kind = error["type"]
    context: dict[str, Any] = dict(error.get("ctx") or {})
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        path = [*path, context["discriminator"].strip("'")]
    param = _param(path)
    value = _value_at(body, path) if kind not in ("missing", "union_tag_not_found") else None

    if kind in ("missing", "union_tag_not_found") or (kind in _EXPECTED and value is None):
        return InvalidApiRequest(MISSING_PARAM.format(param=param), param=param, code="missing_required_parameter")
    if kind in _EXPECTED or kind == "invalid_type" or (kind == "union_tag_invalid" and not isinstance(value, str)):
        expected = error["msg"] if kind == "invalid_type" else _EXPECTED.get(kind, "a string")
        return InvalidApiRequest(INVALID_TYPE.format(param=param, expected=expected), param=param, code="invalid_type")
    if kind in ("union_tag_invalid", "literal_error"):
        supported = _QUOTED.findall(context.get("expected_tags") or context.get("expected", ""))
        message = UNSUPPORTED_VALUE.format(value=value, supported=_listed(supported))
        return InvalidApiRequest(message, param=param, code="invalid_value")
    if kind == "too_short":
        return InvalidApiRequest(EMPTY_ARRAY.format(param=param), param=param, code="empty_array")
    if kind == "too_long":
        message = ARRAY_TOO_LONG.format(param=param, limit=context["max_length"], length=context["actual_length"])
        return InvalidApiRequest(message, param=param, code="array_above_max_length")
    if kind == "string_too_short":
        return InvalidApiRequest(EMPTY_STRING.format(param=param), param=param, code="empty_string")
    if kind == "string_too_long":
        message = STRING_TOO_LONG.format(param=param, limit=context["max_length"], length=len(str(value)))
        return InvalidApiRequest(message, param=param, code="string_above_max_length")
    if kind == "string_pattern_mismatch":
        return InvalidApiRequest(NAME_MISMATCH.format(param=param, pattern=NAME_PATTERN), param=param, code="invalid_value")
    if kind in ("greater_than_equal", "less_than_equal"):
        below = kind == "greater_than_equal"
        limit = context["ge"] if below else context["le"]
        number = "integer" if isinstance(limit, int) else "decimal"  # the field's type, as OpenAI says it
        limit = f"{limit:g}"
        message = OUT_OF_RANGE.format(
            param=param, kind=number, side="below" if below else "above", bound="minimum" if below else "maximum",
            operator=">=" if below else "<=", limit=limit, value=value,
        )
        return InvalidApiRequest(message, param=param, code=f"{number}_{'below_min' if below else 'above_max'}_value")
    return InvalidApiRequest(INVALID_VALUE.format(param=param, reason=error["msg"]), param=param, code="invalid_value")
