"""Tool calling fields are validated as OpenAI does: a malformed one is a 400 naming it, never a 500.

Every request goes through the gateway served by Granian to an `openai` route backed by the fake
upstream, so "reached no upstream" is counted, not assumed. Before this validation `"tools": ["x"]`
passed as "an array" and `streaming.tokens.count_chat_prompt_tokens` raised `ValueError` on it while
the gateway priced the call: a 500.
"""

from __future__ import annotations

import time

import httpx
import pytest

from billing.models import UsageRecord

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.ledger]

MODEL = "gpt-4o-mini"  # an `openai` route: the gateway's upstream is the fake one
USER = {"role": "user", "content": "What is the weather in Paris?"}
GOOD = {"model": MODEL, "messages": [USER]}
FUNCTION = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
LEGACY_FUNCTION = FUNCTION["function"]


def function_tool(**function: object) -> dict:
    return {"type": "function", "function": function}


def assistant_calling(*tool_calls: object) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": list(tool_calls)}


def conversation(assistant: dict, *replies: dict) -> dict:
    return {**GOOD, "messages": [USER, assistant, *replies], "tools": [FUNCTION]}


def named(kind: str, name: str) -> dict:
    return {"type": kind, kind: {"name": name}}


INVALID = [
    # tools
    pytest.param({"tools": ["x"]}, "tools[0]", "invalid_type", id="tool-is-a-string"),
    pytest.param({"tools": [FUNCTION, 7]}, "tools[1]", "invalid_type", id="second-tool-is-a-number"),
    pytest.param({"tools": "get_weather"}, "tools", "invalid_type", id="tools-not-an-array"),
    pytest.param({"tools": []}, "tools", "empty_array", id="tools-empty"),
    pytest.param({"tools": [FUNCTION] * 129}, "tools", "array_above_max_length", id="tools-over-128"),
    pytest.param({"tools": [{"function": LEGACY_FUNCTION}]}, "tools[0].type", "missing_required_parameter", id="tool-without-type"),
    pytest.param({"tools": [{"type": "retrieval"}]}, "tools[0].type", "invalid_value", id="tool-of-unknown-type"),
    pytest.param({"tools": [{"type": 1}]}, "tools[0].type", "invalid_type", id="tool-type-not-a-string"),
    pytest.param({"tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter", id="tool-without-function"),
    pytest.param({"tools": [{"type": "function", "function": "f"}]}, "tools[0].function", "invalid_type", id="function-not-an-object"),
    pytest.param({"tools": [function_tool()]}, "tools[0].function.name", "missing_required_parameter", id="function-without-name"),
    pytest.param({"tools": [function_tool(name=3)]}, "tools[0].function.name", "invalid_type", id="function-name-not-a-string"),
    pytest.param({"tools": [function_tool(name="get weather")]}, "tools[0].function.name", "invalid_value", id="function-name-with-space"),
    pytest.param({"tools": [function_tool(name="weather.get")]}, "tools[0].function.name", "invalid_value", id="function-name-with-dot"),
    pytest.param({"tools": [function_tool(name="")]}, "tools[0].function.name", "invalid_value", id="function-name-empty"),
    pytest.param({"tools": [function_tool(name="f" * 65)]}, "tools[0].function.name", "string_above_max_length", id="function-name-65-chars"),
    pytest.param({"tools": [FUNCTION, function_tool(name="x/y")]}, "tools[1].function.name", "invalid_value", id="second-function-name-bad"),
    pytest.param({"tools": [function_tool(name="f", description=["d"])]}, "tools[0].function.description", "invalid_type", id="function-description-not-a-string"),
    pytest.param({"tools": [function_tool(name="f", parameters=[])]}, "tools[0].function.parameters", "invalid_type", id="function-parameters-not-an-object"),
    pytest.param({"tools": [function_tool(name="f", strict="yes")]}, "tools[0].function.strict", "invalid_type", id="function-strict-not-a-boolean"),
    pytest.param({"tools": [{"type": "custom", "custom": {}}]}, "tools[0].custom.name", "missing_required_parameter", id="custom-tool-without-name"),
    # tool_choice
    pytest.param({"tools": [FUNCTION], "tool_choice": "always"}, "tool_choice", "invalid_value", id="tool-choice-unknown-mode"),
    pytest.param({"tools": [FUNCTION], "tool_choice": 1}, "tool_choice", "invalid_type", id="tool-choice-a-number"),
    pytest.param({"tool_choice": "required"}, "tool_choice", "invalid_value", id="tool-choice-without-tools"),
    pytest.param({"tool_choice": named("function", "get_weather")}, "tool_choice", "invalid_value", id="named-tool-choice-without-tools"),
    pytest.param({"tools": [FUNCTION], "tool_choice": named("function", "get_time")}, "tool_choice.function.name", "invalid_value", id="tool-choice-names-an-unknown-function"),
    pytest.param({"tools": [FUNCTION], "tool_choice": named("custom", "get_weather")}, "tool_choice.custom.name", "invalid_value", id="tool-choice-names-a-function-as-custom"),
    pytest.param({"tools": [FUNCTION], "tool_choice": {"type": "function"}}, "tool_choice.function", "missing_required_parameter", id="tool-choice-without-function"),
    pytest.param({"tools": [FUNCTION], "tool_choice": {"function": {"name": "get_weather"}}}, "tool_choice.type", "missing_required_parameter", id="tool-choice-without-type"),
    pytest.param(
        {"tools": [FUNCTION], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [named("function", "get_time")]}}},
        "tool_choice.allowed_tools.tools[0].function.name", "invalid_value", id="allowed-tools-names-an-unknown-function",
    ),
    pytest.param(
        {"tools": [FUNCTION], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "none", "tools": [named("function", "get_weather")]}}},
        "tool_choice.allowed_tools.mode", "invalid_value", id="allowed-tools-unknown-mode",
    ),
    # parallel_tool_calls
    pytest.param({"tools": [FUNCTION], "parallel_tool_calls": "no"}, "parallel_tool_calls", "invalid_type", id="parallel-tool-calls-not-a-boolean"),
    pytest.param({"parallel_tool_calls": False}, "parallel_tool_calls", "invalid_value", id="parallel-tool-calls-without-tools"),
    # functions and function_call (deprecated)
    pytest.param({"functions": LEGACY_FUNCTION}, "functions", "invalid_type", id="functions-not-an-array"),
    pytest.param({"functions": []}, "functions", "empty_array", id="functions-empty"),
    pytest.param({"functions": ["get_weather"]}, "functions[0]", "invalid_type", id="function-is-a-string"),
    pytest.param({"functions": [{"description": "d"}]}, "functions[0].name", "missing_required_parameter", id="legacy-function-without-name"),
    pytest.param({"functions": [{"name": "get-the weather"}]}, "functions[0].name", "invalid_value", id="legacy-function-name-bad"),
    pytest.param({"function_call": "auto"}, "function_call", "invalid_value", id="function-call-without-functions"),
    pytest.param({"functions": [LEGACY_FUNCTION], "function_call": "required"}, "function_call", "invalid_value", id="function-call-unknown-mode"),
    pytest.param({"functions": [LEGACY_FUNCTION], "function_call": {"name": "get_time"}}, "function_call.name", "invalid_value", id="function-call-names-an-unknown-function"),
    pytest.param({"functions": [LEGACY_FUNCTION], "function_call": ["get_weather"]}, "function_call", "invalid_type", id="function-call-an-array"),
    # response_format
    pytest.param({"response_format": "json"}, "response_format", "invalid_type", id="response-format-a-string"),
    pytest.param({"response_format": {}}, "response_format.type", "missing_required_parameter", id="response-format-without-type"),
    pytest.param({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value", id="response-format-unknown-type"),
    pytest.param({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "missing_required_parameter", id="json-schema-missing"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name", "missing_required_parameter", id="json-schema-without-name"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "my schema"}}}, "response_format.json_schema.name", "invalid_value", id="json-schema-name-bad"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": "{}"}}}, "response_format.json_schema.schema", "invalid_type", id="json-schema-schema-a-string"),
    # messages: the assistant's tool calls and the replies to them
    pytest.param(conversation({"role": "assistant", "content": None, "tool_calls": CALL}), "messages[1].tool_calls", "invalid_type", id="tool-calls-not-an-array"),
    pytest.param(conversation(assistant_calling()), "messages[1].tool_calls", "empty_array", id="tool-calls-empty"),
    pytest.param(conversation(assistant_calling("call_1")), "messages[1].tool_calls[0]", "invalid_type", id="tool-call-a-string"),
    pytest.param(conversation(assistant_calling({**CALL, "id": None})), "messages[1].tool_calls[0].id", "missing_required_parameter", id="tool-call-without-id"),
    pytest.param(conversation(assistant_calling({**CALL, "type": "python"})), "messages[1].tool_calls[0].type", "invalid_value", id="tool-call-of-unknown-type"),
    pytest.param(
        conversation(assistant_calling({**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})),
        "messages[1].tool_calls[0].function.arguments", "invalid_type", id="tool-call-arguments-an-object",
    ),
    pytest.param(
        conversation(assistant_calling({**CALL, "function": {"name": "get weather", "arguments": "{}"}})),
        "messages[1].tool_calls[0].function.name", "invalid_value", id="tool-call-name-bad",
    ),
    pytest.param(
        conversation(assistant_calling(CALL), {"role": "tool", "content": "18 C"}),
        "messages[2].tool_call_id", "missing_required_parameter", id="tool-message-without-tool-call-id",
    ),
    pytest.param(
        conversation(assistant_calling(CALL), {"role": "tool", "content": "18 C", "tool_call_id": 1}),
        "messages[2].tool_call_id", "invalid_type", id="tool-call-id-not-a-string",
    ),
    pytest.param(
        {**GOOD, "messages": [USER, {"role": "function", "content": "18 C"}]},
        "messages[1].name", "missing_required_parameter", id="function-message-without-name",
    ),
    pytest.param(
        {**GOOD, "messages": [USER, {"role": "assistant", "content": None, "function_call": {"name": "get_weather"}}]},
        "messages[1].function_call.arguments", "missing_required_parameter", id="legacy-function-call-without-arguments",
    ),
]

VALID = [
    pytest.param({"tools": [FUNCTION]}, id="one-function"),
    pytest.param({"tools": [FUNCTION, function_tool(name="get-time_2")], "tool_choice": "required", "parallel_tool_calls": False}, id="required-no-parallel"),
    pytest.param({"tools": [FUNCTION], "tool_choice": named("function", "get_weather")}, id="named-function"),
    pytest.param({"tools": [{"type": "custom", "custom": {"name": "sql"}}], "tool_choice": named("custom", "sql")}, id="custom-tool"),
    pytest.param(
        {"tools": [FUNCTION], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [named("function", "get_weather")]}}},
        id="allowed-tools",
    ),
    pytest.param({"tool_choice": "none"}, id="tool-choice-none-without-tools"),
    pytest.param({"tools": None, "tool_choice": None, "parallel_tool_calls": None}, id="explicit-nulls"),
    pytest.param({"tools": [function_tool(name="f" * 64, parameters={"type": "object", "properties": {"a": {"enum": [1, None]}}})]}, id="name-64-chars-odd-schema"),
    pytest.param({"functions": [LEGACY_FUNCTION], "function_call": {"name": "get_weather"}}, id="legacy-functions"),
    pytest.param({"response_format": {"type": "json_object"}}, id="json-object"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "weather", "schema": {"type": "object"}, "strict": True}}}, id="json-schema"),
    pytest.param(conversation(assistant_calling(CALL), {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}), id="tool-round-trip"),
]


def post(gateway, api_key: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"{gateway.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json=body if "model" in body else {**GOOD, **body},
        timeout=10,
    )


@pytest.mark.parametrize(("body", "param", "code"), INVALID)
def test_malformed_tool_calling_fields_get_400_naming_the_parameter(gateway, api_key, fake_upstream, body, param, code) -> None:
    upstream_calls = len(fake_upstream.requests)
    response = post(gateway, api_key, body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
    assert error["message"]
    assert len(fake_upstream.requests) == upstream_calls
    assert UsageRecord.objects.count() == 0


@pytest.mark.parametrize("body", VALID)
def test_well_formed_tool_calling_fields_reach_the_upstream_unchanged(gateway, api_key, fake_upstream, body) -> None:
    """The other half of the table: the 400s above are not the gateway refusing tools altogether."""
    fake_upstream.tokens = 2
    upstream_calls = len(fake_upstream.requests)
    response = post(gateway, api_key, body)
    assert response.status_code == 200, response.text
    assert len(fake_upstream.requests) == upstream_calls + 1
    sent = fake_upstream.requests[-1].body
    fields = body if "model" not in body else {"tools": body["tools"], "messages": body["messages"]}
    for name, value in fields.items():
        assert sent.get(name) == value, name
    deadline = time.monotonic() + 5
    while not UsageRecord.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert UsageRecord.objects.count() == 1
