"""Chat chunks are relayed as the upstream sent them (bytes, not re-encoded objects): fields the
gateway does not know, their order and spacing all reach the client unchanged. Only what the
gateway must change is rebuilt: the usage a client did not ask for."""

from __future__ import annotations

import orjson

from streaming.endpoints import ENDPOINTS

CHAT = ENDPOINTS["chat.completions"]
CONTENT = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","service_tier":"default",'
    b'"system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"caf\\u00e9 \\"quoted\\""},'
    b'"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"x9"}'
)
USAGE = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}'


def test_a_text_chunk_is_relayed_byte_for_byte_to_a_client_that_asked_for_usage() -> None:
    chunk = CHAT.read(CONTENT)
    assert chunk is not None and chunk.text == 'café "quoted"' and chunk.upstream_id == "chatcmpl-1"
    assert CHAT.framer(include_usage=True).frame(chunk) == b"data: " + CONTENT + b"\n\n"


def test_a_client_that_did_not_ask_for_usage_gets_no_usage_field_and_no_usage_chunk() -> None:
    framer = CHAT.framer(include_usage=False)
    frame = framer.frame(CHAT.read(CONTENT))  # type: ignore[arg-type]
    assert frame == b"data: " + CONTENT.replace(b',"usage":null', b"") + b"\n\n"
    usage = CHAT.read(USAGE)
    assert usage is not None and usage.usage is not None and usage.usage.prompt_tokens == 5
    assert framer.frame(usage) is None


def test_the_billed_usage_chunk_takes_its_head_from_the_first_chunk() -> None:
    framer = CHAT.framer(include_usage=True)
    framer.frame(CHAT.read(CONTENT))  # type: ignore[arg-type]
    end = framer.end({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    usage_frame, done = end.split(b"\n\n", 1)
    data = orjson.loads(usage_frame.removeprefix(b"data: "))
    assert data == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    assert done == b"data: [DONE]\n\n"


def test_a_relayed_text_chunk_holds_its_bytes_and_parses_them_again_only_when_asked() -> None:
    chunk = CHAT.read(CONTENT)
    assert chunk is not None
    assert chunk._data is None  # what waits in a relay's queue is the event's bytes
    assert chunk.data == orjson.loads(CONTENT)  # a non-stream answer still folds every field
    usage = CHAT.read(USAGE)
    assert usage is not None and usage._data is not None  # the framer rebuilds a usage chunk
