"""OpenAI's published counting rules, as a table of requests to every endpoint.

Each row names the rule it checks (`source`). Rows from the cookbook ("How to count tokens
with tiktoken") expect the prompt tokens the cookbook shows the API reporting; rows from
the vision guide ("Calculating costs") expect its worked examples. Those are exact. The
other rows apply a published rule to a shape OpenAI did not publish a count for (the
Responses API, remote images), so their figures are the gateway's documented estimate;
they are spelled out as sums: 3 per message, the tokens of each string, 3 to prime
the reply.
"""

from __future__ import annotations

import base64
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import pytest

from streaming import tokens
from tests.test_tokens import COOKBOOK_MESSAGES, COOKBOOK_TOOLS, COOKBOOK_TOOLS_MESSAGES

COOKBOOK_MESSAGES_RULE = "OpenAI cookbook, How to count tokens with tiktoken, section 6"
COOKBOOK_TOOLS_RULE = "OpenAI cookbook, How to count tokens with tiktoken, section 7"
TILE_RULE = "OpenAI vision guide, Calculating costs: tiles (GPT-4o, GPT-4.1, o-series, gpt-5)"
PATCH_RULE = "OpenAI vision guide, Calculating costs: 32px patches (gpt-4.1-mini, o4-mini, ...)"
UNKNOWN_SIZE = "vision guide rule for a 1024x1024 image: the size of a remote URL is unknown"
RESPONSES_AS_CHAT = "cookbook section 6 chat rule applied to the Responses API (no published rule)"
PLAIN_TEXT = "tiktoken encoding of the text; token ids count as themselves (no overhead)"


# --- Images made in the test (headers only: the counter never decodes pixels) ------------


def png(width: int, height: int) -> bytes:
    """A PNG signature, its IHDR chunk (8-bit RGB) and IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def jpeg(width: int, height: int, *, frame_marker: int = 0xC0, exif_bytes: int = 0) -> bytes:
    """SOI, a JFIF APP0, an optional APP1 of *exif_bytes*, a start-of-frame and EOI."""

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload

    jfif = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    exif = segment(0xE1, b"Exif\x00\x00" + bytes(exif_bytes)) if exif_bytes else b""
    components = b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    frame = segment(frame_marker, struct.pack(">BHHB", 8, height, width, 3) + components)
    return b"\xff\xd8" + jfif + exif + b"\xff\xff" + frame + b"\xff\xd9"  # with a fill byte


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b";"


def webp(kind: bytes, payload: bytes) -> bytes:
    chunk = kind + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_lossy(width: int, height: int) -> bytes:
    return webp(b"VP8 ", b"\x10\x02\x00\x9d\x01\x2a" + struct.pack("<HH", width, height))


def webp_lossless(width: int, height: int) -> bytes:
    bits = (width - 1) | (height - 1) << 14
    return webp(b"VP8L", b"\x2f" + struct.pack("<I", bits))


def webp_extended(width: int, height: int) -> bytes:
    sizes = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return webp(b"VP8X", b"\x00\x00\x00\x00" + sizes)


def data_url(image: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(image).decode()}"


REMOTE_URL = "https://example.com/cat.png"


def chat_image(url: str, detail: str | None = None) -> list[dict[str, Any]]:
    """A chat request with one user message holding only an image part."""
    image_url = {"url": url} if detail is None else {"url": url, "detail": detail}
    return [{"role": "user", "content": [{"type": "image_url", "image_url": image_url}]}]


# 3 for the message, 1 for "user", 3 to prime the reply (o200k_base).
ONE_IMAGE_MESSAGE = 3 + 1 + 3

# The cookbook's weather tool in the Responses API's flat shape.
RESPONSES_WEATHER_TOOL = {"type": "function", **COOKBOOK_TOOLS[0]["function"]}
WEATHER_ARGUMENTS = '{"location":"San Francisco, CA"}'


# --- The table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    endpoint: str  # "chat", "responses", "completions" or "embeddings"
    model: str
    request: Any  # chat: (messages, tools); responses: body; otherwise: prompt or input
    expected: int
    source: str


CASES = [
    # Chat: the cookbook's API-verified counts (a multi-turn prompt with names; a tool).
    pytest.param(Case("chat", "gpt-3.5-turbo", (COOKBOOK_MESSAGES, None), 129, COOKBOOK_MESSAGES_RULE), id="chat-names-gpt-3.5-turbo"),
    pytest.param(Case("chat", "gpt-4", (COOKBOOK_MESSAGES, None), 129, COOKBOOK_MESSAGES_RULE), id="chat-names-gpt-4"),
    pytest.param(Case("chat", "gpt-4o", (COOKBOOK_MESSAGES, None), 124, COOKBOOK_MESSAGES_RULE), id="chat-names-gpt-4o"),
    pytest.param(Case("chat", "gpt-4o-mini", (COOKBOOK_MESSAGES, None), 124, COOKBOOK_MESSAGES_RULE), id="chat-names-gpt-4o-mini"),
    pytest.param(Case("chat", "gpt-3.5-turbo", (COOKBOOK_TOOLS_MESSAGES, COOKBOOK_TOOLS), 105, COOKBOOK_TOOLS_RULE), id="chat-tools-gpt-3.5-turbo"),
    pytest.param(Case("chat", "gpt-4", (COOKBOOK_TOOLS_MESSAGES, COOKBOOK_TOOLS), 105, COOKBOOK_TOOLS_RULE), id="chat-tools-gpt-4"),
    pytest.param(Case("chat", "gpt-4o", (COOKBOOK_TOOLS_MESSAGES, COOKBOOK_TOOLS), 101, COOKBOOK_TOOLS_RULE), id="chat-tools-gpt-4o"),
    pytest.param(Case("chat", "gpt-4o-mini", (COOKBOOK_TOOLS_MESSAGES, COOKBOOK_TOOLS), 101, COOKBOOK_TOOLS_RULE), id="chat-tools-gpt-4o-mini"),
    # Chat images: the vision guide's worked examples, sizes read from data: URLs.
    pytest.param(Case("chat", "gpt-4o", (chat_image(data_url(png(1024, 1024)), "high"), None), ONE_IMAGE_MESSAGE + 765, TILE_RULE), id="image-png-1024x1024-high"),
    pytest.param(Case("chat", "gpt-4o", (chat_image(data_url(png(2048, 4096)), "high"), None), ONE_IMAGE_MESSAGE + 1105, TILE_RULE), id="image-png-2048x4096-high"),
    pytest.param(Case("chat", "gpt-4o", (chat_image(data_url(jpeg(4096, 8192), "image/jpeg"), "low"), None), ONE_IMAGE_MESSAGE + 85, TILE_RULE), id="image-jpeg-4096x8192-low"),
    pytest.param(Case("chat", "gpt-4o", (chat_image(data_url(jpeg(2048, 4096, exif_bytes=4000), "image/jpeg"), "auto"), None), ONE_IMAGE_MESSAGE + 1105, TILE_RULE), id="image-jpeg-2048x4096-auto"),
    pytest.param(Case("chat", "gpt-4o", (chat_image(data_url(png(512, 512))), None), ONE_IMAGE_MESSAGE + 85 + 170, TILE_RULE), id="image-png-512x512-no-detail"),
    pytest.param(Case("chat", "gpt-4.1", (chat_image(data_url(png(1024, 1024)), "high"), None), ONE_IMAGE_MESSAGE + 765, TILE_RULE), id="image-gpt-4.1-tiles"),
    pytest.param(Case("chat", "gpt-4o-mini", (chat_image(data_url(png(1024, 1024)), "high"), None), ONE_IMAGE_MESSAGE + 2833 + 4 * 5667, TILE_RULE), id="image-gpt-4o-mini-high"),
    pytest.param(Case("chat", "gpt-4o-mini", (chat_image(data_url(png(1024, 1024)), "low"), None), ONE_IMAGE_MESSAGE + 2833, TILE_RULE), id="image-gpt-4o-mini-low"),
    pytest.param(Case("chat", "o1", (chat_image(data_url(png(1024, 1024)), "high"), None), ONE_IMAGE_MESSAGE + 75 + 4 * 150, TILE_RULE), id="image-o1-high"),
    pytest.param(Case("chat", "o3", (chat_image(data_url(png(1024, 1024)), "low"), None), ONE_IMAGE_MESSAGE + 75, TILE_RULE), id="image-o3-low"),
    pytest.param(Case("chat", "gpt-5", (chat_image(data_url(png(1024, 1024)), "high"), None), ONE_IMAGE_MESSAGE + 70 + 4 * 140, TILE_RULE), id="image-gpt-5-high"),
    pytest.param(Case("chat", "computer-use-preview", (chat_image(data_url(png(1024, 1024)), "high"), None), ONE_IMAGE_MESSAGE + 65 + 4 * 129, TILE_RULE), id="image-computer-use-high"),
    pytest.param(Case("chat", "sim-fast", (chat_image(data_url(png(2048, 4096)), "high"), None), ONE_IMAGE_MESSAGE + 1105, TILE_RULE + "; gpt-4o figures for unknown models"), id="image-unknown-model"),
    # 1024 patches (the guide's first example) and 1452 (its 1800x2400 example), times the factor.
    pytest.param(Case("chat", "gpt-4.1-mini", (chat_image(data_url(png(1024, 1024)), "high"), None), ONE_IMAGE_MESSAGE + 1659, PATCH_RULE), id="image-gpt-4.1-mini-1024x1024"),
    pytest.param(Case("chat", "gpt-4.1-mini", (chat_image(data_url(jpeg(1800, 2400), "image/jpeg"), "low"), None), ONE_IMAGE_MESSAGE + 2353, PATCH_RULE), id="image-gpt-4.1-mini-1800x2400"),
    pytest.param(Case("chat", "gpt-4.1-nano", (chat_image(data_url(jpeg(1800, 2400), "image/jpeg")), None), ONE_IMAGE_MESSAGE + 3572, PATCH_RULE), id="image-gpt-4.1-nano-1800x2400"),
    pytest.param(Case("chat", "o4-mini", (chat_image(data_url(png(1024, 1024))), None), ONE_IMAGE_MESSAGE + 1762, PATCH_RULE), id="image-o4-mini-1024x1024"),
    pytest.param(Case("chat", "gpt-5-mini", (chat_image(data_url(png(1800, 2400))), None), ONE_IMAGE_MESSAGE + 2353, PATCH_RULE), id="image-gpt-5-mini-1800x2400"),
    pytest.param(Case("chat", "gpt-5-nano", (chat_image(data_url(png(1024, 1024))), None), ONE_IMAGE_MESSAGE + 2520, PATCH_RULE), id="image-gpt-5-nano-1024x1024"),
    # Remote (never fetched) and unreadable images: a 1024x1024 image at the given detail.
    pytest.param(Case("chat", "gpt-4o", (chat_image(REMOTE_URL, "low"), None), ONE_IMAGE_MESSAGE + 85, UNKNOWN_SIZE), id="image-http-low"),
    pytest.param(Case("chat", "gpt-4o", (chat_image(REMOTE_URL, "high"), None), ONE_IMAGE_MESSAGE + 765, UNKNOWN_SIZE), id="image-http-high"),
    pytest.param(Case("chat", "gpt-4o", (chat_image(REMOTE_URL, "auto"), None), ONE_IMAGE_MESSAGE + 765, UNKNOWN_SIZE), id="image-http-auto"),
    pytest.param(Case("chat", "gpt-4.1-mini", (chat_image(REMOTE_URL, "high"), None), ONE_IMAGE_MESSAGE + 1659, UNKNOWN_SIZE), id="image-http-patches"),
    pytest.param(Case("chat", "gpt-4o", (chat_image("data:image/png;base64,AAAA", "high"), None), ONE_IMAGE_MESSAGE + 765, UNKNOWN_SIZE), id="image-unreadable-data-url"),
    # Responses API: instructions and a string input are a system and a user message.
    pytest.param(Case("responses", "gpt-4o", {"input": "hello world"}, 3 + 1 + 2 + 3, RESPONSES_AS_CHAT), id="responses-string"),
    pytest.param(
        Case(
            "responses",
            "gpt-4o",
            {
                "instructions": COOKBOOK_TOOLS_MESSAGES[0]["content"],
                "input": COOKBOOK_TOOLS_MESSAGES[1]["content"],
                "tools": [RESPONSES_WEATHER_TOOL],
            },
            101,  # as the chat request it maps to
            RESPONSES_AS_CHAT + "; tools by " + COOKBOOK_TOOLS_RULE,
        ),
        id="responses-cookbook-tools",
    ),
    pytest.param(
        Case(
            "responses",
            "gpt-4o",
            {
                "input": [
                    {
                        "type": "message",
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "What's in this image?"},
                            {"type": "input_image", "image_url": REMOTE_URL, "detail": "low"},
                            {"type": "input_image", "image_url": data_url(png(2048, 4096)), "detail": "high"},
                            {"type": "input_image", "file_id": "file-abc", "detail": "auto"},
                            {"type": "input_file", "file_id": "file-pdf"},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "output_text", "text": "hello world", "annotations": []}]},
                ]
            },
            # user (3 + 1 + 5 + 85 + 1105 + 765); assistant (3 + 1 + 2); reply primer
            3 + 1 + 5 + 85 + 1105 + 765 + 3 + 1 + 2 + 3,
            RESPONSES_AS_CHAT + "; images by " + TILE_RULE,
        ),
        id="responses-items-input-image",
    ),
    pytest.param(
        Case(
            "responses",
            "gpt-4o",
            {
                "input": [
                    {"role": "user", "content": COOKBOOK_TOOLS_MESSAGES[1]["content"]},
                    {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_current_weather", "arguments": WEATHER_ARGUMENTS, "status": "completed"},
                    {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees"},
                    {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hello world"}], "encrypted_content": "gAAAA"},
                    {"type": "item_reference", "id": "msg_1"},
                ],
                "tools": [RESPONSES_WEATHER_TOOL],
            },
            (3 + 1 + 8)  # user, the question
            + (3 + 1 + 3 + 8)  # assistant, the function's name, its arguments
            + (3 + 1 + 3 + 2)  # tool, "call_1", "18 degrees"
            + 2  # the reasoning summary, without message overhead
            + 3  # reply primer
            + 101 - 33,  # the tool definition: the cookbook's 101 less its two messages (33)
            RESPONSES_AS_CHAT,
        ),
        id="responses-function-call-and-output",
    ),
    # Legacy completions and embeddings: the text's tokens, token ids as themselves.
    pytest.param(Case("completions", "gpt-3.5-turbo-instruct", "Say this is a test", 5, PLAIN_TEXT), id="completions-string"),
    pytest.param(Case("completions", "gpt-3.5-turbo-instruct", ["Say this is a test", "hello world"], 5 + 2, PLAIN_TEXT), id="completions-strings"),
    pytest.param(Case("completions", "gpt-3.5-turbo-instruct", [1, 2, 3, 4, 5], 5, PLAIN_TEXT), id="completions-token-ids"),
    pytest.param(Case("completions", "gpt-3.5-turbo-instruct", [[1, 2], [3, 4, 5], []], 5, PLAIN_TEXT), id="completions-token-id-lists"),
    pytest.param(Case("completions", "gpt-3.5-turbo-instruct", "", 0, PLAIN_TEXT), id="completions-empty"),
    pytest.param(Case("embeddings", "text-embedding-3-small", "The food was delicious and the waiter...", 8, PLAIN_TEXT), id="embeddings-string"),
    pytest.param(Case("embeddings", "text-embedding-3-small", ["hello world", "hello world"], 4, PLAIN_TEXT), id="embeddings-strings"),
    pytest.param(Case("embeddings", "text-embedding-3-small", [15339, 1917], 2, PLAIN_TEXT), id="embeddings-token-ids"),
    pytest.param(Case("embeddings", "text-embedding-3-large", [[15339, 1917], [15339]], 3, PLAIN_TEXT), id="embeddings-token-id-lists"),
]  # fmt: skip


async def count(case: Case) -> int:
    if case.endpoint == "chat":
        messages, tools = case.request
        return await tokens.acount_chat_prompt_tokens(messages, model=case.model, tools=tools)
    if case.endpoint == "responses":
        return await tokens.acount_responses_input_tokens(case.request, model=case.model)
    if case.endpoint == "completions":
        return await tokens.acount_completion_prompt_tokens(case.request, model=case.model)
    assert case.endpoint == "embeddings"
    return await tokens.acount_embedding_input_tokens(case.request, model=case.model)


@pytest.mark.parametrize("case", CASES)
async def test_prompt_tokens_follow_published_rule(case: Case) -> None:
    assert case.source  # every row says where its rule comes from
    assert await count(case) == case.expected


# --- The vision guide's rules on their own ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "detail", "size", "expected"),
    [
        pytest.param("gpt-4o", "high", (1024, 1024), 765, id="guide-1024x1024-high"),
        pytest.param("gpt-4o", "high", (2048, 4096), 1105, id="guide-2048x4096-high"),
        pytest.param("gpt-4o", "low", (4096, 8192), 85, id="guide-4096x8192-low"),
        pytest.param("gpt-4o", "auto", (4096, 8192), 1105, id="auto-is-high"),
        pytest.param("gpt-4o", "high", (100, 100), 85 + 170, id="small-image-not-scaled-up"),
        pytest.param("gpt-4o", "high", (768, 1537), 85 + 2 * 4 * 170, id="tall-over-three-tiles"),
        pytest.param("gpt-4o", "high", None, 765, id="unknown-size-high"),
        pytest.param("gpt-4o", None, None, 765, id="unknown-size-no-detail"),
        pytest.param("gpt-4.1-mini", "high", (1024, 1024), 1659, id="patches-1024"),
        pytest.param("gpt-4.1-mini", "low", (1800, 2400), 2353, id="patches-ignore-detail"),
        pytest.param("gpt-4.1-mini", "high", (100, 100), 26, id="patches-small-16x1.62"),
        pytest.param("openai/o4-mini-2025-04-16", "high", (1024, 1024), 1762, id="provider-prefix"),
    ],
)
def test_count_image_tokens(
    model: str, detail: str | None, size: tuple[int, int] | None, expected: int
) -> None:
    assert tokens.count_image_tokens(model=model, detail=detail, size=size) == expected


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        pytest.param(1024, 1024, 1024, id="guide-1024x1024"),
        pytest.param(1800, 2400, 1452, id="guide-1800x2400"),
        pytest.param(2400, 1800, 1452, id="guide-example-rotated"),
        pytest.param(1248, 1248, 1521, id="just-under-cap"),
        pytest.param(8000, 8000, 1521, id="square-scaled-to-39x39"),
        pytest.param(100000, 1, 1, id="degenerate-strip"),
    ],
)
def test_patch_count(width: int, height: int, expected: int) -> None:
    assert tokens._patch_count(width, height) == expected


def test_image_estimates_keep_their_gpt_4o_values() -> None:
    assert tokens.IMAGE_LOW_DETAIL_TOKEN_ESTIMATE == 85
    assert tokens.IMAGE_HIGH_DETAIL_TOKEN_ESTIMATE == 765


def test_count_image_tokens_rejects_empty_size() -> None:
    with pytest.raises(ValueError) as excinfo:
        tokens.count_image_tokens(model="gpt-4o", size=(0, 10))

    assert str(excinfo.value) == tokens.INVALID_IMAGE_SIZE_MESSAGE.format(width=0, height=10)


# --- Image headers -----------------------------------------------------------------------


def read_bytes(image: bytes) -> Any:
    return lambda offset, size: image[offset : offset + size]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        pytest.param(png(1800, 2400), (1800, 2400), id="png"),
        pytest.param(jpeg(4096, 8192), (4096, 8192), id="jpeg-baseline"),
        pytest.param(jpeg(640, 480, frame_marker=0xC2), (640, 480), id="jpeg-progressive"),
        pytest.param(jpeg(640, 480, exif_bytes=60000), (640, 480), id="jpeg-after-large-exif"),
        pytest.param(gif(320, 200), (320, 200), id="gif"),
        pytest.param(webp_lossy(1000, 700), (1000, 700), id="webp-lossy"),
        pytest.param(webp_lossless(16383, 1), (16383, 1), id="webp-lossless"),
        pytest.param(webp_extended(5000, 3000), (5000, 3000), id="webp-extended"),
        pytest.param(png(0, 10), None, id="png-zero-width"),
        pytest.param(png(100, 100)[:20], None, id="png-truncated"),
        pytest.param(jpeg(640, 480)[:27], None, id="jpeg-truncated-in-frame"),
        pytest.param(b"\xff\xd8\xff\xda\x00\x02", None, id="jpeg-scan-before-frame"),
        pytest.param(b"<svg xmlns='http://www.w3.org/2000/svg'/>", None, id="svg"),
        pytest.param(b"", None, id="empty"),
    ],
)
def test_image_size_from_header(image: bytes, expected: tuple[int, int] | None) -> None:
    assert tokens._image_size(read_bytes(image)) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(data_url(png(1800, 2400)), (1800, 2400), id="base64-png"),
        pytest.param(
            data_url(jpeg(640, 480, exif_bytes=3000), "image/jpeg"), (640, 480), id="base64-jpeg"
        ),
        pytest.param(data_url(gif(3, 2)).rstrip("="), (3, 2), id="padding-dropped"),
        pytest.param(
            "DATA:image/png;BASE64," + data_url(png(8, 9)).split(",")[1], (8, 9), id="upper-case"
        ),
        pytest.param("data:image/svg+xml,%3Csvg%2F%3E", None, id="percent-encoded"),
        pytest.param("data:image/png;base64,iVBO Rw0K", None, id="whitespace-in-header"),
        pytest.param(REMOTE_URL, None, id="remote-url"),
    ],
)
def test_data_url_image_size(url: str, expected: tuple[int, int] | None) -> None:
    assert tokens._data_url_image_size(url) == expected


def test_data_url_decodes_only_the_header() -> None:
    # A tail that is not base64 at all proves the rest of the payload is never decoded.
    url = data_url(png(2048, 4096)) + "!!!!not base64!!!!" * 100_000

    assert tokens._data_url_image_size(url) == (2048, 4096)


# --- Not blocking the event loop ----------------------------------------------------------


def record_count_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    threads: list[int] = []
    real_count = tokens._PromptPlan.count

    def recording_count(plan: Any) -> int:
        threads.append(threading.get_ident())
        return real_count(plan)

    monkeypatch.setattr(tokens._PromptPlan, "count", recording_count)
    return threads


LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 500  # over the offload threshold


@pytest.mark.parametrize(
    ("counter", "request_"),
    [
        pytest.param(tokens.acount_responses_input_tokens, {"input": LONG_TEXT}, id="responses"),
        pytest.param(tokens.acount_completion_prompt_tokens, [LONG_TEXT], id="completions"),
        pytest.param(tokens.acount_embedding_input_tokens, LONG_TEXT, id="embeddings"),
    ],
)
async def test_long_inputs_are_encoded_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch, counter: Any, request_: Any
) -> None:
    tokens.get_encoding("o200k_base")
    tokens.get_encoding("cl100k_base")
    threads = record_count_threads(monkeypatch)

    await counter(request_, model="gpt-4o")

    assert len(threads) == 1 and threads[0] != threading.get_ident()


@pytest.mark.parametrize(
    ("counter", "request_"),
    [
        pytest.param(
            tokens.acount_responses_input_tokens, {"input": "hello world"}, id="responses"
        ),
        pytest.param(tokens.acount_completion_prompt_tokens, "hello world", id="completions"),
        pytest.param(tokens.acount_embedding_input_tokens, ["hello world"], id="embeddings"),
    ],
)
async def test_short_inputs_are_encoded_inline(
    monkeypatch: pytest.MonkeyPatch, counter: Any, request_: Any
) -> None:
    tokens.get_encoding("o200k_base")
    threads = record_count_threads(monkeypatch)

    await counter(request_, model="gpt-4o")

    assert threads == [threading.get_ident()]


async def test_token_ids_need_no_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> Any:
        raise AssertionError("an encoding was loaded to count token ids")

    monkeypatch.setattr(tokens, "get_encoding", refuse)

    assert await tokens.acount_embedding_input_tokens([[1, 2, 3], [4]], model="sim-fast") == 4


@pytest.mark.parametrize(
    ("counter", "request_", "expected"),
    [
        pytest.param(
            tokens.acount_responses_input_tokens,
            {"input": 42, "tools": "x"},
            3,
            id="responses-odd-input",
        ),
        pytest.param(
            tokens.acount_responses_input_tokens,
            {"input": [None, "hi"]},
            3,
            id="responses-odd-items",
        ),
        pytest.param(tokens.acount_completion_prompt_tokens, None, 0, id="completions-none"),
        pytest.param(
            tokens.acount_embedding_input_tokens, [None, {"a": 1}], 0, id="embeddings-odd-items"
        ),
    ],
)
async def test_odd_values_count_nothing(counter: Any, request_: Any, expected: int) -> None:
    assert await counter(request_, model="gpt-4o") == expected
