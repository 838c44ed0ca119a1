"""Generated requests for the API's fuzz test (tests/api/test_fuzz.py) and its longer run
(`python -m bench.fuzz`): nearly valid chat bodies with one or more random mutations, bodies
that are not JSON objects, odd paths, methods and headers; and the check every answer must pass.

A mutation replaces a value anywhere in a valid body with any JSON value, drops a key, or adds
one. Paths are the API's own with odd characters (percent-encoded control bytes, newlines,
dots) or unknown ones. Header values stay printable (a control byte is refused by the HTTP
server before the application runs; see the README).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
from hypothesis import strategies as st
from pydantic import ValidationError

from streaming.schema import ChatCompletion, ChatCompletionChunk, ErrorResponse

# Fast ones first (the simulator's sim-fast, and the test's fake upstream behind gpt-4o-mini).
MODELS = ["sim-fast", "gpt-4o-mini", "no-such-model", "", "sim-fast\n", "../sim-fast", "sim-chat"]
ROLES = ["system", "developer", "user", "assistant", "tool", "function"]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
CHAT_PATH = "/v1/chat/completions"

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def messages(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(min_value=1, max_value=3))
    turns: list[dict[str, Any]] = []
    for _ in range(count):
        role = draw(st.sampled_from(ROLES))
        message: dict[str, Any] = {"role": role, "content": draw(st.text(max_size=40))}
        if role == "tool":
            message["tool_call_id"] = "call_1"
        if role == "function":
            message["name"] = "lookup"
        if role == "assistant" and draw(st.booleans()):
            message["tool_calls"] = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
        turns.append(message)
    return turns


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw(st.sampled_from(MODELS[:2])), "messages": draw(messages())}
    body["max_tokens"] = draw(st.integers(min_value=1, max_value=12))
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
    if draw(st.booleans()):
        body["temperature"] = draw(st.floats(min_value=0, max_value=2))
    if draw(st.booleans()):
        body["tools"] = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        body["tool_choice"] = draw(st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "lookup"}}]))
    if draw(st.booleans()):
        body["response_format"] = draw(st.sampled_from([{"type": "text"}, {"type": "json_object"}]))
    if draw(st.booleans()):
        body["n"] = draw(st.integers(min_value=1, max_value=3))
    return body


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value: keys of objects and indexes of arrays."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


@st.composite
def mutated_bodies(draw: st.DrawFn) -> Any:
    body = draw(valid_bodies())
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        places = [place for place in _paths(body) if place]
        if not places:
            return draw(json_values)
        place = draw(st.sampled_from(places))
        parent: Any = body
        for step in place[:-1]:
            parent = parent[step]
        last = place[-1]
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if action == "replace":
            parent[last] = draw(json_values)
        elif action == "drop":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    # A few big numbers would ask the simulator for long answers: keep the fuzz run short.
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) and body["max_tokens"] > 12:
        body["max_tokens"] = 12
    return body


odd_segments = st.sampled_from(["%0a", "%0d%0a", "%00", "%7f", "%09", "..", ".", "%2e%2e", "%2F", "%20", "%E2%80%AE", "%ff"])
odd_paths = st.one_of(
    st.builds(lambda suffix: CHAT_PATH + suffix, odd_segments),
    st.builds(lambda middle: f"/v1/models/{middle}", st.one_of(odd_segments, st.text(max_size=20).map(quote))),
    st.builds(lambda rest: f"/v1/{rest}", st.text(max_size=20).map(quote)),
    st.just("/v1/models"),
    st.just("/v1/"),
)

printable_header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", "", "multipart/form-data", "application/x-www-form-urlencoded"])


@dataclass
class FuzzRequest:
    method: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def _encoded(body: Any) -> bytes:
    """JSON as a client could send it: integers past 64 bits and `Infinity` included."""
    return body if isinstance(body, bytes) else json.dumps(body).encode()


@st.composite
def requests(draw: st.DrawFn) -> FuzzRequest:
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "mutated", "valid", "not_an_object", "bytes", "path", "method", "headers"]))
    headers = {"Content-Type": "application/json"}
    if kind == "valid":
        return FuzzRequest("POST", CHAT_PATH, _encoded(draw(valid_bodies())), headers)
    if kind == "mutated":
        return FuzzRequest("POST", CHAT_PATH, _encoded(draw(mutated_bodies())), headers)
    if kind == "not_an_object":
        return FuzzRequest("POST", CHAT_PATH, _encoded(draw(json_values)), headers)
    if kind == "bytes":
        return FuzzRequest("POST", CHAT_PATH, draw(st.binary(max_size=64)), headers)
    if kind == "path":
        return FuzzRequest(draw(st.sampled_from(METHODS)), draw(odd_paths), _encoded(draw(valid_bodies())), headers)
    if kind == "method":
        return FuzzRequest(draw(st.sampled_from(METHODS)), draw(st.sampled_from([CHAT_PATH, "/v1/models", "/v1/models/sim-fast"])), b"", {})
    headers = {
        "Content-Type": draw(content_types),
        "Accept": draw(printable_header_values),
        "X-Simulator-Fault": draw(st.sampled_from(["", "error_after:1", "nonsense"])),
        "OpenAI-Organization": draw(printable_header_values),
    }
    return FuzzRequest("POST", CHAT_PATH, _encoded(draw(valid_bodies())), headers)


def problems(request: FuzzRequest, status: int, headers: dict[str, str], body: bytes) -> list[str]:
    """What is wrong with an answer (nothing for a good one): no 5xx; every error OpenAI-shaped
    with a request id; every 200 of a chat call a completion or a stream that ends."""
    found: list[str] = []
    upstream_fault_asked = bool(request.headers.get("X-Simulator-Fault"))
    if status >= 500 and not (upstream_fault_asked and status in (502, 504)):
        found.append(f"a {status}")
    if not headers.get("x-request-id"):
        found.append("no x-request-id")
    if status >= 400 and request.method != "HEAD":
        try:
            error = ErrorResponse.model_validate_json(body).error
            if set(orjson.loads(body)["error"]) != {"message", "type", "param", "code"} or not error.message:
                found.append(f"an error body of the wrong shape: {body[:200]!r}")
        except ValidationError:
            found.append(f"an error that is not OpenAI's JSON: {body[:200]!r}")
    if status == 405 and not headers.get("allow"):
        found.append("a 405 without Allow")
    if status == 200 and request.method == "POST" and request.path == CHAT_PATH:
        if headers.get("content-type", "").startswith("text/event-stream"):
            found += _stream_problems(body)
        else:
            try:
                ChatCompletion.model_validate_json(body)
            except ValidationError as invalid:
                found.append(f"a 200 that is not a completion ({invalid.error_count()} errors): {body[:200]!r}")
    return found


def _stream_problems(body: bytes) -> list[str]:
    """Every event a chunk, and the stream ends with [DONE] or an error event."""
    lines = [line for line in body.decode().split("\n") if line and not line.startswith(":")]
    if not lines or not all(line.startswith("data: ") for line in lines):
        return [f"a stream with lines that are not events: {body[-200:]!r}"]
    *events, last = (line.removeprefix("data: ") for line in lines)
    if last != "[DONE]":
        try:
            ErrorResponse.model_validate_json(last)
        except ValidationError:
            return [f"a stream that does not end with [DONE] or an error: {body[-200:]!r}"]
    for event in events:
        try:
            ChatCompletionChunk.model_validate_json(event)
        except ValidationError:
            return [f"an event that is not a chunk: {event[:200]!r}"]
    return []
