"""Bodies of `/v1/responses`, `/v1/embeddings` and `/v1/completions` are validated as OpenAI does:
a wrong one is refused before any work with OpenAI's message, `param` and `code`, and a good one
gives the call what it reserves for (`CallParams`: stream, usage, max tokens, choices billed).

Pure validation, no server: the API edge's answer to `InvalidApiRequest` (a 400 in OpenAI's error
shape) is the chat path's, tested there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from streaming.exceptions import InvalidApiRequest
from streaming.schema import (
    BACKGROUND_REFUSED,
    BEST_OF_BELOW_N,
    BEST_OF_STREAMED,
    STREAM_OPTIONS_WITHOUT_STREAM,
)
from streaming.validation import (
    CallParams,
    validate_completions_body,
    validate_embeddings_body,
    validate_responses_body,
)

Validate = Callable[[dict[str, Any]], CallParams]
MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
COMPLETION_MODEL = "gpt-3.5-turbo-instruct"

RESPONSE = {"model": MODEL, "input": "Say hello."}
EMBEDDING = {"model": EMBEDDING_MODEL, "input": "The food was delicious."}
COMPLETION = {"model": COMPLETION_MODEL, "prompt": "Say hello."}
FUNCTION = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def missing(param: str) -> tuple[str, str, str]:
    return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"


def wrong_type(param: str, expected: str) -> tuple[str, str, str]:
    return f"Invalid type for '{param}': expected {expected}.", param, "invalid_type"


def unsupported(param: str, value: str, supported: str) -> tuple[str, str, str]:
    return f"Invalid value: '{value}'. Supported values are: {supported}.", param, "invalid_value"


def empty_array(param: str) -> tuple[str, str, str]:
    message = f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead."
    return message, param, "empty_array"


def empty_string(param: str) -> tuple[str, str, str]:
    message = f"Invalid '{param}': empty string. Expected a string with minimum length 1, but got an empty string instead."
    return message, param, "empty_string"


def too_long(param: str, limit: int, length: int) -> tuple[str, str, str]:
    message = f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, but got an array with length {length} instead."
    return message, param, "array_above_max_length"


def below(param: str, limit: object, value: object, kind: str = "integer") -> tuple[str, str, str]:
    message = f"Invalid '{param}': {kind} below minimum value. Expected a value >= {limit}, but got {value} instead."
    return message, param, f"{kind}_below_min_value"


def above(param: str, limit: object, value: object, kind: str = "integer") -> tuple[str, str, str]:
    message = f"Invalid '{param}': {kind} above maximum value. Expected a value <= {limit}, but got {value} instead."
    return message, param, f"{kind}_above_max_value"


def refused(param: str, message: str) -> tuple[str, str, str]:
    return message, param, "invalid_value"


def case(validate: Validate, good: dict[str, Any], change: dict[str, Any], expected: tuple[str, str, str], id: str, *, drop: str = "") -> Any:
    body = {key: value for key, value in {**good, **change}.items() if key != drop}
    return pytest.param(validate, body, *expected, id=id)


def responses(change: dict[str, Any], expected: tuple[str, str, str], id: str, *, drop: str = "") -> Any:
    return case(validate_responses_body, RESPONSE, change, expected, f"responses-{id}", drop=drop)


def embeddings(change: dict[str, Any], expected: tuple[str, str, str], id: str, *, drop: str = "") -> Any:
    return case(validate_embeddings_body, EMBEDDING, change, expected, f"embeddings-{id}", drop=drop)


def completions(change: dict[str, Any], expected: tuple[str, str, str], id: str, *, drop: str = "") -> Any:
    return case(validate_completions_body, COMPLETION, change, expected, f"completions-{id}", drop=drop)


INVALID = [
    # --- responses
    responses({}, missing("model"), "no-model", drop="model"),
    responses({"model": ""}, empty_string("model"), "empty-model"),
    responses({"model": 4}, wrong_type("model", "a string"), "model-not-a-string"),
    responses({"input": 3}, wrong_type("input", "a string or an array"), "input-a-number"),
    responses({"input": {"role": "user", "content": "hi"}}, wrong_type("input", "a string or an array"), "input-an-object"),
    responses({"input": []}, empty_array("input"), "input-empty"),
    responses({"input": ["hi"]}, wrong_type("input[0]", "an object"), "input-item-a-string"),
    responses({"input": [{"content": "hi"}]}, missing("input[0].type"), "input-item-without-role-or-type"),
    responses({"input": [{"type": 7}]}, wrong_type("input[0].type", "a string"), "input-item-type-not-a-string"),
    responses({"input": [{"role": "user"}]}, missing("input[0].content"), "message-without-content"),
    responses({"input": [{"role": "user", "content": 5}]}, wrong_type("input[0].content", "a string or an array"), "message-content-a-number"),
    responses({"input": [{"role": "user", "content": [{"text": "hi"}]}]}, missing("input[0].content[0].type"), "content-part-without-type"),
    responses(
        {"input": [{"role": "robot", "content": "hi"}]},
        unsupported("input[0].role", "robot", "'user', 'assistant', 'system', and 'developer'"),
        "message-of-unknown-role",
    ),
    responses({"instructions": ["Be brief."]}, wrong_type("instructions", "a string"), "instructions-an-array"),
    responses({"stream": "yes"}, wrong_type("stream", "a boolean"), "stream-not-a-boolean"),
    responses({"max_output_tokens": 15}, below("max_output_tokens", 16, 15), "max-output-tokens-below-16"),
    responses({"max_output_tokens": "100"}, wrong_type("max_output_tokens", "an integer"), "max-output-tokens-a-string"),
    responses({"temperature": 2.5}, above("temperature", 2, 2.5, "decimal"), "temperature-above-2"),
    responses({"top_p": -0.1}, below("top_p", 0, -0.1, "decimal"), "top-p-below-0"),
    responses({"tools": FUNCTION}, wrong_type("tools", "an array"), "tools-not-an-array"),
    responses({"tools": ["get_weather"]}, wrong_type("tools[0]", "an object"), "tool-a-string"),
    responses({"tools": [{"name": "get_weather"}]}, missing("tools[0].type"), "tool-without-type"),
    responses({"tools": [{"type": "function"}]}, missing("tools[0].name"), "function-tool-without-name"),
    responses(
        {"tools": [{"type": "function", "name": "get weather"}]},
        (
            "Invalid 'tools[0].name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
            "tools[0].name",
            "invalid_value",
        ),
        "function-tool-name-bad",
    ),
    responses({"tools": [{**FUNCTION, "parameters": "{}"}]}, wrong_type("tools[0].parameters", "an object"), "function-parameters-a-string"),
    responses({"tools": [FUNCTION], "tool_choice": "always"}, unsupported("tool_choice", "always", "'none', 'auto', and 'required'"), "tool-choice-unknown-mode"),
    responses({"tools": [FUNCTION], "tool_choice": {"name": "get_weather"}}, missing("tool_choice.type"), "tool-choice-without-type"),
    responses({"tools": [FUNCTION], "parallel_tool_calls": "no"}, wrong_type("parallel_tool_calls", "a boolean"), "parallel-tool-calls-a-string"),
    responses({"text": "json"}, wrong_type("text", "an object"), "text-a-string"),
    responses({"text": {"format": {}}}, missing("text.format.type"), "text-format-without-type"),
    responses({"text": {"format": {"type": "xml"}}}, unsupported("text.format.type", "xml", "'text', 'json_object', and 'json_schema'"), "text-format-unknown"),
    responses({"text": {"format": {"type": "json_schema", "schema": {}}}}, missing("text.format.name"), "json-schema-without-name"),
    responses({"text": {"format": {"type": "json_schema", "name": "w"}}}, missing("text.format.schema"), "json-schema-without-schema"),
    responses({"previous_response_id": 1}, wrong_type("previous_response_id", "a string"), "previous-response-id-a-number"),
    responses({"store": "false"}, wrong_type("store", "a boolean"), "store-a-string"),
    responses({"metadata": ["a"]}, wrong_type("metadata", "an object"), "metadata-an-array"),
    responses({"reasoning": "high"}, wrong_type("reasoning", "an object"), "reasoning-a-string"),
    responses({"truncation": "middle"}, unsupported("truncation", "middle", "'auto' and 'disabled'"), "truncation-unknown"),
    responses({"user": 42}, wrong_type("user", "a string"), "user-a-number"),
    responses({"background": True}, refused("background", BACKGROUND_REFUSED), "background"),
    responses({"background": "yes"}, wrong_type("background", "a boolean"), "background-a-string"),
    # --- embeddings
    embeddings({}, missing("model"), "no-model", drop="model"),
    embeddings({}, missing("input"), "no-input", drop="input"),
    embeddings({"input": ""}, empty_string("input"), "input-empty-string"),
    embeddings({"input": []}, empty_array("input"), "input-empty-array"),
    embeddings({"input": 7}, wrong_type("input", "a string or an array"), "input-a-number"),
    embeddings({"input": {"text": "a"}}, wrong_type("input", "a string or an array"), "input-an-object"),
    embeddings({"input": ["a", ""]}, empty_string("input[1]"), "second-string-empty"),
    embeddings({"input": ["a", 1]}, wrong_type("input[1]", "a string"), "strings-then-a-number"),
    embeddings({"input": ["a"] * 2049}, too_long("input", 2048, 2049), "2049-strings"),
    embeddings({"input": [1, -1]}, below("input[1]", 0, -1), "negative-token-id"),
    embeddings({"input": [1, "a"]}, wrong_type("input[1]", "an integer"), "tokens-then-a-string"),
    embeddings({"input": [1, 2.5]}, wrong_type("input[1]", "an integer"), "token-id-a-decimal"),
    embeddings({"input": [True]}, wrong_type("input[0]", "a string"), "a-boolean-is-no-token-id"),
    embeddings({"input": [[1, 2], []]}, empty_array("input[1]"), "empty-token-list"),
    embeddings({"input": [[1, 2], [3, -4]]}, below("input[1][1]", 0, -4), "negative-token-id-in-a-list"),
    embeddings({"input": [[1, 2], "a"]}, wrong_type("input[1]", "an array"), "token-lists-then-a-string"),
    embeddings({"input": [[1]] * 2049}, too_long("input", 2048, 2049), "2049-token-lists"),
    embeddings({"encoding_format": "hex"}, unsupported("encoding_format", "hex", "'float' and 'base64'"), "encoding-format-unknown"),
    embeddings({"dimensions": 0}, below("dimensions", 1, 0), "dimensions-0"),
    embeddings({"dimensions": "256"}, wrong_type("dimensions", "an integer"), "dimensions-a-string"),
    embeddings({"user": ["u"]}, wrong_type("user", "a string"), "user-an-array"),
    # --- legacy completions
    completions({}, missing("model"), "no-model", drop="model"),
    completions({}, missing("prompt"), "no-prompt", drop="prompt"),
    completions({"prompt": {"text": "a"}}, wrong_type("prompt", "a string or an array"), "prompt-an-object"),
    completions({"prompt": []}, empty_array("prompt"), "prompt-empty-array"),
    completions({"prompt": ["a", 2]}, wrong_type("prompt[1]", "a string"), "strings-then-a-number"),
    completions({"prompt": [1, -2]}, below("prompt[1]", 0, -2), "negative-token-id"),
    completions({"prompt": [[1], []]}, empty_array("prompt[1]"), "empty-token-list"),
    completions({"stream": 1}, wrong_type("stream", "a boolean"), "stream-a-number"),
    completions(
        {"stream_options": {"include_usage": True}},
        refused("stream_options", f"Invalid value for 'stream_options': {STREAM_OPTIONS_WITHOUT_STREAM}"),
        "stream-options-without-stream",
    ),
    completions({"stream": True, "stream_options": {"include_usage": "yes"}}, wrong_type("stream_options.include_usage", "a boolean"), "include-usage-a-string"),
    completions({"max_tokens": -1}, below("max_tokens", 0, -1), "max-tokens-negative"),
    completions({"n": 0}, below("n", 1, 0), "n-0"),
    completions({"n": 129}, above("n", 128, 129), "n-129"),
    completions({"best_of": 21}, above("best_of", 20, 21), "best-of-21"),
    completions({"n": 3, "best_of": 2}, refused("best_of", f"Invalid value for 'best_of': {BEST_OF_BELOW_N}"), "best-of-below-n"),
    completions({"n": 2, "best_of": 1}, refused("best_of", f"Invalid value for 'best_of': {BEST_OF_BELOW_N}"), "best-of-1-below-n-2"),
    completions({"stream": True, "best_of": 3}, refused("best_of", f"Invalid value for 'best_of': {BEST_OF_STREAMED}"), "best-of-streamed"),
    completions({"echo": "true"}, wrong_type("echo", "a boolean"), "echo-a-string"),
    completions({"suffix": 1}, wrong_type("suffix", "a string"), "suffix-a-number"),
    completions({"logprobs": 6}, above("logprobs", 5, 6), "logprobs-6"),
    completions({"logprobs": True}, wrong_type("logprobs", "an integer"), "logprobs-a-boolean"),
    completions({"temperature": -1}, below("temperature", 0, -1, "decimal"), "temperature-negative"),
    completions({"top_p": 1.5}, above("top_p", 1, 1.5, "decimal"), "top-p-above-1"),
    completions({"stop": 3}, wrong_type("stop", "a string or an array"), "stop-a-number"),
    completions({"presence_penalty": 3}, above("presence_penalty", 2, 3, "decimal"), "presence-penalty-3"),
    completions({"frequency_penalty": -3}, below("frequency_penalty", -2, -3, "decimal"), "frequency-penalty-minus-3"),
    completions({"seed": "1"}, wrong_type("seed", "an integer"), "seed-a-string"),
    completions({"user": 1}, wrong_type("user", "a string"), "user-a-number"),
]


@pytest.mark.parametrize(("validate", "body", "message", "param", "code"), INVALID)
def test_a_wrong_body_is_refused_with_openais_error(validate: Validate, body: dict[str, Any], message: str, param: str, code: str) -> None:
    with pytest.raises(InvalidApiRequest) as refused_request:
        validate(body)
    assert (refused_request.value.message, refused_request.value.param, refused_request.value.code) == (message, param, code)


def params(endpoint: str, body: dict[str, Any], model: str, *, stream: bool = False, include_usage: bool = False, max_tokens: int | None, n: int = 1) -> CallParams:
    return CallParams(endpoint=endpoint, body=body, model=model, stream=stream, include_usage=include_usage, max_tokens=max_tokens, n=n)  # type: ignore[arg-type]


def good(validate: Validate, good_body: dict[str, Any], change: dict[str, Any], id: str, **expected: Any) -> Any:
    body = {**good_body, **change}
    endpoints: dict[Validate, str] = {validate_responses_body: "responses", validate_embeddings_body: "embeddings", validate_completions_body: "completions"}
    endpoint = endpoints[validate]
    return pytest.param(validate, body, params(endpoint, body, body["model"], **expected), id=f"{endpoint}-{id}")


MESSAGES = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "input_text", "text": "What is in this image?"}, {"type": "input_image", "image_url": "https://example.com/a.png"}]},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A cat."}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
    {"type": "reasoning", "id": "rs_1", "summary": []},
]

VALID = [
    good(validate_responses_body, RESPONSE, {}, "a-string", max_tokens=None),
    good(validate_responses_body, RESPONSE, {"input": MESSAGES}, "messages-and-items", max_tokens=None),
    good(validate_responses_body, {"model": MODEL}, {"previous_response_id": "resp_1"}, "no-input-continuing", max_tokens=None),
    good(validate_responses_body, RESPONSE, {"stream": True}, "stream", stream=True, max_tokens=None),
    # stream_options is no Responses parameter: it passes through, and asks for nothing (the
    # stream always ends with its usage)
    good(validate_responses_body, RESPONSE, {"stream": True, "stream_options": {"include_usage": True}}, "stream-options-pass", stream=True, max_tokens=None),
    good(validate_responses_body, RESPONSE, {"max_output_tokens": 16}, "max-output-tokens-16", max_tokens=16),
    good(
        validate_responses_body,
        RESPONSE,
        {
            "instructions": "Answer in French.",
            "tools": [FUNCTION, {"type": "web_search_preview"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
            "text": {"format": {"type": "json_schema", "name": "weather", "schema": {"type": "object"}, "strict": True}, "verbosity": "low"},
            "temperature": 0.2,
            "top_p": 1,
            "store": False,
            "metadata": {"team": "a"},
            "reasoning": {"effort": "low"},
            "truncation": "auto",
            "user": "u-1",
            "background": False,
            "include": ["reasoning.encrypted_content"],
        },
        "every-option",
        max_tokens=None,
    ),
    good(validate_responses_body, RESPONSE, {"tool_choice": "auto", "text": {"format": {"type": "text"}}}, "tool-choice-mode", max_tokens=None),
    good(validate_embeddings_body, EMBEDDING, {}, "a-string", max_tokens=None),
    good(validate_embeddings_body, EMBEDDING, {"input": ["a", "b"] * 1024}, "2048-strings", max_tokens=None),
    good(validate_embeddings_body, EMBEDDING, {"input": [0, 1, 100257]}, "token-ids", max_tokens=None),
    good(validate_embeddings_body, EMBEDDING, {"input": [[1, 2], [3]]}, "token-id-lists", max_tokens=None),
    good(validate_embeddings_body, EMBEDDING, {"input": [1] * 3000}, "one-long-token-input", max_tokens=None),
    good(validate_embeddings_body, EMBEDDING, {"encoding_format": "base64", "dimensions": 256, "user": "u-1"}, "options", max_tokens=None),
    good(validate_completions_body, COMPLETION, {}, "default-max-tokens-16", max_tokens=16),
    good(validate_completions_body, COMPLETION, {"prompt": ""}, "empty-prompt", max_tokens=16),
    good(validate_completions_body, COMPLETION, {"prompt": ["a", "b"], "max_tokens": 100, "n": 2}, "strings-n-2", max_tokens=100, n=2),
    good(validate_completions_body, COMPLETION, {"prompt": [1, 2, 3], "n": 2, "best_of": 5}, "best-of-is-billed", max_tokens=16, n=5),
    good(validate_completions_body, COMPLETION, {"prompt": [[1, 2], [3]], "best_of": 1, "stream": True}, "best-of-1-streams", stream=True, max_tokens=16),
    good(
        validate_completions_body,
        COMPLETION,
        {"stream": True, "stream_options": {"include_usage": True}},
        "stream-with-usage",
        stream=True,
        include_usage=True,
        max_tokens=16,
    ),
    # generates nothing; 1, not 0, which the call would read as "no limit" (the gateway's default)
    good(validate_completions_body, COMPLETION, {"max_tokens": 0, "echo": True, "logprobs": 0}, "max-tokens-0-echo", max_tokens=1),
    good(
        validate_completions_body,
        COMPLETION,
        {"suffix": "!", "temperature": 0, "top_p": 0.5, "stop": ["\n"], "presence_penalty": -2, "frequency_penalty": 2, "seed": 7, "user": "u", "logit_bias": {"50256": -100}},
        "every-option",
        max_tokens=16,
    ),
]


@pytest.mark.parametrize(("validate", "body", "expected"), VALID)
def test_a_good_body_gives_the_calls_parameters(validate: Validate, body: dict[str, Any], expected: CallParams) -> None:
    assert validate(body) == expected


def test_the_body_is_passed_on_unchanged() -> None:
    body = {**RESPONSE, "prompt_cache_key": "k", "stream_options": {"include_usage": True}}
    assert validate_responses_body(body).body is body
