"""Validation of `/v1/chat/completions` request bodies, with OpenAI's error wording and params.

Only what the gateway itself relies on is checked strictly (model, messages, stream flags, token
limits) plus the common sampling parameters and the shapes of tool calling (`tools`, `tool_choice`,
`parallel_tool_calls`, the deprecated `functions` and `function_call`, `response_format`, and the
`tool_calls` / `tool_call_id` of messages), so a malformed request gets a 400 here instead of a
paid round trip to the upstream, or a crash in the code that counts its prompt tokens. Unknown
fields pass through to the upstream unchanged.

The wording, `param` paths (`tools[0].function.name`) and codes follow what OpenAI answers. Where
OpenAI is stricter than a harmless request needs, this module is lenient on purpose, because the
upstream may be another OpenAI-compatible server: `tool_choice: "none"` without `tools` passes,
and JSON schemas (`parameters`, `response_format.json_schema.schema`) are only checked to be objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from streaming.exceptions import InvalidChatRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_N = 16
# OpenAI's limits on tool definitions and on function, tool and schema names.
MAX_TOOLS = 128
MAX_NAME_LENGTH = 64
NAME_PATTERN = "^[a-zA-Z0-9_-]+$"
_NAME_RE = re.compile(r"[a-zA-Z0-9_-]+")
TOOL_TYPES = ("function", "custom")
TOOL_CHOICE_MODES = ("none", "auto", "required")
TOOL_CHOICE_TYPES = ("function", "custom", "allowed_tools")
ALLOWED_TOOLS_MODES = ("auto", "required")
FUNCTION_CALL_MODES = ("none", "auto")
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")

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
EMPTY_ARRAY = (
    "Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead."
)
ARRAY_TOO_LONG = (
    "Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
    "but got an array with length {length} instead."
)
ONLY_WITH = "'{param}' is only allowed when '{needs}' are specified."
UNKNOWN_TOOL = "no {kind} named '{name}' in '{source}'."


@dataclass(frozen=True, slots=True)
class ChatParams:
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None  # max_completion_tokens, else max_tokens
    n: int


def _type_error(param: str, expected: str) -> InvalidChatRequest:
    return InvalidChatRequest(INVALID_TYPE.format(param=param, expected=expected), param=param, code="invalid_type")


def _value_error(param: str, reason: str) -> InvalidChatRequest:
    return InvalidChatRequest(INVALID_VALUE.format(param=param, reason=reason), param=param, code="invalid_value")


def _missing(param: str) -> InvalidChatRequest:
    return InvalidChatRequest(MISSING_PARAM.format(param=param), param=param, code="missing_required_parameter")


def _unsupported(param: str, value: str, supported: tuple[str, ...]) -> InvalidChatRequest:
    quoted = [f"'{choice}'" for choice in supported]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])}, and {quoted[-1]}"
    return InvalidChatRequest(
        UNSUPPORTED_VALUE.format(value=value, supported=listed), param=param, code="invalid_value"
    )


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidChatRequest(INVALID_JSON, code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidChatRequest(INVALID_JSON, code="invalid_json")
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
        raise InvalidChatRequest(MISSING_PARAM.format(param=f"{param}.role"), param=f"{param}.role", code="missing_required_parameter")
    if not isinstance(role, str):
        raise _type_error(f"{param}.role", "a string")
    if role not in ROLES:
        raise _value_error(f"{param}.role", f"'{role}' is not one of {sorted(ROLES)}.")
    content = message.get("content")
    if content is None:
        if role in {"user", "system", "developer", "tool"}:
            raise InvalidChatRequest(
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
    if role == "tool":
        _required_string(f"{param}.tool_call_id", message.get("tool_call_id"))
    elif role == "function":
        _required_string(f"{param}.name", message.get("name"))
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        _validate_tool_calls(f"{param}.tool_calls", tool_calls)
    function_call = message.get("function_call")
    if function_call is not None:
        _validate_call(f"{param}.function_call", function_call, payload="arguments")


def _required_string(param: str, value: Any) -> str:
    if value is None:
        raise _missing(param)
    if not isinstance(value, str):
        raise _type_error(param, "a string")
    return value


def _optional(param: str, value: Any, kind: type, expected: str) -> None:
    if value is not None and not isinstance(value, kind):
        raise _type_error(param, expected)


def _required_object(param: str, value: Any) -> dict[str, Any]:
    if value is None:
        raise _missing(param)
    if not isinstance(value, dict):
        raise _type_error(param, "an object")
    return value


def _required_name(param: str, value: Any) -> str:
    """A function, tool or schema name as OpenAI accepts it: `^[a-zA-Z0-9_-]+$`, at most 64 long."""
    name = _required_string(param, value)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidChatRequest(
            STRING_TOO_LONG.format(param=param, limit=MAX_NAME_LENGTH, length=len(name)),
            param=param,
            code="string_above_max_length",
        )
    if not _NAME_RE.fullmatch(name):
        raise InvalidChatRequest(NAME_MISMATCH.format(param=param, pattern=NAME_PATTERN), param=param, code="invalid_value")
    return name


def _required_array(param: str, value: Any, *, limit: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise _type_error(param, "an array")
    if not value:
        raise InvalidChatRequest(EMPTY_ARRAY.format(param=param), param=param, code="empty_array")
    if limit is not None and len(value) > limit:
        raise InvalidChatRequest(
            ARRAY_TOO_LONG.format(param=param, limit=limit, length=len(value)),
            param=param,
            code="array_above_max_length",
        )
    return value


def _required_choice(param: str, value: Any, supported: tuple[str, ...]) -> str:
    choice = _required_string(param, value)
    if choice not in supported:
        raise _unsupported(param, choice, supported)
    return choice


def _validate_call(param: str, call: Any, *, payload: str) -> None:
    """A function or custom tool call made by the assistant: `{"name", "arguments" | "input"}`."""
    call = _required_object(param, call)
    _required_name(f"{param}.name", call.get("name"))
    _required_string(f"{param}.{payload}", call.get(payload))


def _validate_tool_calls(param: str, tool_calls: Any) -> None:
    for index, tool_call in enumerate(_required_array(param, tool_calls)):
        item = f"{param}[{index}]"
        tool_call = _required_object(item, tool_call)
        _required_string(f"{item}.id", tool_call.get("id"))
        kind = _required_choice(f"{item}.type", tool_call.get("type"), TOOL_TYPES)
        _validate_call(f"{item}.{kind}", tool_call.get(kind), payload="arguments" if kind == "function" else "input")


def _validate_function_definition(param: str, function: Any) -> str:
    """A function as `tools[i].function` or `functions[i]` define it; return its name."""
    function = _required_object(param, function)
    name = _required_name(f"{param}.name", function.get("name"))
    _optional(f"{param}.description", function.get("description"), str, "a string")
    _optional(f"{param}.parameters", function.get("parameters"), dict, "an object")
    _optional(f"{param}.strict", function.get("strict"), bool, "a boolean")
    return name


def _validate_tools(tools: Any) -> set[tuple[str, str]]:
    """Check `tools`; return the (type, name) of every tool it defines."""
    defined: set[tuple[str, str]] = set()
    for index, tool in enumerate(_required_array("tools", tools, limit=MAX_TOOLS)):
        param = f"tools[{index}]"
        tool = _required_object(param, tool)
        kind = _required_choice(f"{param}.type", tool.get("type"), TOOL_TYPES)
        if kind == "function":
            name = _validate_function_definition(f"{param}.function", tool.get("function"))
        else:
            custom = _required_object(f"{param}.custom", tool.get("custom"))
            name = _required_name(f"{param}.custom.name", custom.get("name"))
            _optional(f"{param}.custom.description", custom.get("description"), str, "a string")
            _optional(f"{param}.custom.format", custom.get("format"), dict, "an object")
        defined.add((kind, name))
    return defined


def _validate_named_tool(param: str, reference: Any, defined: set[tuple[str, str]]) -> None:
    """A `{"type": "function", "function": {"name": ...}}` reference to a tool of `tools`."""
    reference = _required_object(param, reference)
    kind = _required_choice(f"{param}.type", reference.get("type"), TOOL_TYPES)
    target = _required_object(f"{param}.{kind}", reference.get(kind))
    name = _required_string(f"{param}.{kind}.name", target.get("name"))
    if (kind, name) not in defined:
        raise _value_error(f"{param}.{kind}.name", UNKNOWN_TOOL.format(kind=f"{kind} tool", name=name, source="tools"))


def _validate_tool_choice(choice: Any, defined: set[tuple[str, str]] | None) -> None:
    if isinstance(choice, str):
        _required_choice("tool_choice", choice, TOOL_CHOICE_MODES)
        # OpenAI refuses even "none" without tools; it asks for nothing, so it passes here.
        if defined is None and choice != "none":
            raise _value_error("tool_choice", ONLY_WITH.format(param="tool_choice", needs="tools"))
        return
    if not isinstance(choice, dict):
        raise _type_error("tool_choice", "a string or an object")
    if defined is None:
        raise _value_error("tool_choice", ONLY_WITH.format(param="tool_choice", needs="tools"))
    kind = _required_choice("tool_choice.type", choice.get("type"), TOOL_CHOICE_TYPES)
    if kind != "allowed_tools":
        _validate_named_tool("tool_choice", choice, defined)
        return
    allowed = _required_object("tool_choice.allowed_tools", choice.get("allowed_tools"))
    _required_choice("tool_choice.allowed_tools.mode", allowed.get("mode"), ALLOWED_TOOLS_MODES)
    references = allowed.get("tools")
    if references is None:
        raise _missing("tool_choice.allowed_tools.tools")
    for index, reference in enumerate(_required_array("tool_choice.allowed_tools.tools", references)):
        _validate_named_tool(f"tool_choice.allowed_tools.tools[{index}]", reference, defined)


def _validate_functions(functions: Any) -> set[str]:
    """Check the deprecated `functions`; return the names it defines."""
    return {
        _validate_function_definition(f"functions[{index}]", function)
        for index, function in enumerate(_required_array("functions", functions, limit=MAX_TOOLS))
    }


def _validate_function_call(function_call: Any, defined: set[str] | None) -> None:
    if isinstance(function_call, str):
        _required_choice("function_call", function_call, FUNCTION_CALL_MODES)
        if defined is None and function_call != "none":
            raise _value_error("function_call", ONLY_WITH.format(param="function_call", needs="functions"))
        return
    if not isinstance(function_call, dict):
        raise _type_error("function_call", "a string or an object")
    if defined is None:
        raise _value_error("function_call", ONLY_WITH.format(param="function_call", needs="functions"))
    name = _required_string("function_call.name", function_call.get("name"))
    if name not in defined:
        raise _value_error("function_call.name", UNKNOWN_TOOL.format(kind="function", name=name, source="functions"))


def _validate_response_format(response_format: Any) -> None:
    if not isinstance(response_format, dict):
        raise _type_error("response_format", "an object")
    kind = _required_choice("response_format.type", response_format.get("type"), RESPONSE_FORMAT_TYPES)
    if kind != "json_schema":
        return
    json_schema = _required_object("response_format.json_schema", response_format.get("json_schema"))
    _required_name("response_format.json_schema.name", json_schema.get("name"))
    _optional("response_format.json_schema.description", json_schema.get("description"), str, "a string")
    _optional("response_format.json_schema.schema", json_schema.get("schema"), dict, "an object")
    _optional("response_format.json_schema.strict", json_schema.get("strict"), bool, "a boolean")


def _validate_tool_calling(body: dict[str, Any]) -> None:
    """`tools`, `functions`, the choices that refer to them, and `response_format`."""
    tools = body.get("tools")
    defined_tools = None if tools is None else _validate_tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        _validate_tool_choice(choice, defined_tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise _type_error("parallel_tool_calls", "a boolean")
        if defined_tools is None:
            raise _value_error("parallel_tool_calls", ONLY_WITH.format(param="parallel_tool_calls", needs="tools"))
    functions = body.get("functions")
    defined_functions = None if functions is None else _validate_functions(functions)
    function_call = body.get("function_call")
    if function_call is not None:
        _validate_function_call(function_call, defined_functions)
    response_format = body.get("response_format")
    if response_format is not None:
        _validate_response_format(response_format)


def validate_chat_body(body: dict[str, Any]) -> ChatParams:
    model = body.get("model")
    if model is None:
        raise InvalidChatRequest(MISSING_PARAM.format(param="model"), param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _type_error("model", "a non-empty string")
    messages = body.get("messages")
    if messages is None:
        raise InvalidChatRequest(MISSING_PARAM.format(param="messages"), param="messages", code="missing_required_parameter")
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
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, list | str):
        raise _type_error("stop", "a string or an array")
    _validate_tool_calling(body)

    return ChatParams(body=body, model=model, stream=stream, include_usage=include_usage, max_tokens=max_tokens, n=n)
