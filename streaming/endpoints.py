"""The OpenAI APIs the gateway serves, and what differs between them on the streaming path.

Every endpoint goes through the same call (`calls.call.ApiCall`): limits, budget hold, bounded
queue, one ledger row. What an endpoint decides is everything that depends on its wire format:

- `path` and `upstream_body()`: what is sent upstream. Chat, Responses and legacy completions are
  always streamed from the upstream (a non-stream client call is folded back together, so it is
  cancellable and billed like a stream); embeddings are one JSON answer.
- `chunk()`: one upstream event (a parsed JSON object) as a `ProviderChunk`: the text it
  generated (for the local tally and the completion-token cap), its usage, the upstream's id of
  the answer. An event that reports a failure raises `UpstreamError`.
- `framer()`: the client's SSE frames, the end of a stream and its error event.
- `aggregator()`: the non-stream answer, built from the chunks.
- `usage_object()`: the billed usage in the endpoint's own shape, for an upstream that sent none.

Providers produce the same events as the upstream would (the simulator builds them, the `openai`
provider parses them), and pass each through `chunk()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol

import orjson

from streaming import _sse, tokens
from streaming.aggregate import CompletionBuilder
from streaming.providers.base import ProviderChunk, UpstreamError, Usage, text_of_chunk

EndpointName = Literal["chat.completions", "responses", "completions", "embeddings"]
STREAM_ERROR = "The upstream reported an error mid-stream."

# Responses API events whose `delta` is generated text (counted against the completion cap).
_RESPONSES_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    }
)
# Terminal events that carry the whole response, its usage included.
_RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete"})


class ErrorEvent(Protocol):
    """What the client is told when a stream ends in a failure."""

    @property
    def message(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def code(self) -> str | None: ...


class Framer(Protocol):
    """One stream's SSE frames (stateful: a Responses stream numbers its events)."""

    def frame(self, chunk: ProviderChunk) -> bytes | None: ...

    def end(self, billed_usage: Mapping[str, int] | None) -> bytes:
        """The last frames of a complete stream, given the usage the call was billed."""
        ...

    def error(self, event: ErrorEvent) -> bytes: ...


class Aggregator(Protocol):
    def add(self, data: dict[str, Any]) -> None: ...

    def build(self, *, usage: Mapping[str, Any]) -> dict[str, Any]:
        """The non-stream answer; `usage` is the billed usage in this endpoint's shape."""
        ...


def _json_event(raw: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise UpstreamError("server_error", "The upstream sent an unreadable event.") from error
    return data if isinstance(data, dict) else None


def _error_message(data: Mapping[str, Any], default: str) -> str:
    inner = data.get("error", data)
    if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
        return str(inner["message"])
    return default


class Endpoint:
    name: ClassVar[EndpointName]
    path: ClassVar[str]  # relative to the upstream's base URL (which ends in /v1)
    streamed: ClassVar[bool] = True  # whether the upstream is asked for a stream
    produces_text: ClassVar[bool] = True  # whether the answer is generated tokens (not embeddings)
    # The `type`s of the events that end a stream with no `[DONE]` (the Responses API's).
    last_events: ClassVar[frozenset[str]] = frozenset()

    def upstream_body(self, body: Mapping[str, Any], *, upstream_model: str) -> dict[str, Any]:
        return {**body, "model": upstream_model, "stream": True}

    def streams_upstream(self, body: Mapping[str, Any]) -> bool:
        """Whether this request is streamed from the upstream (else it is one JSON answer)."""
        return self.streamed

    def continued_response(self, body: Mapping[str, Any]) -> str | None:
        """The id of the stored response this request continues (`previous_response_id`)."""
        return None

    async def count_prompt_tokens(self, body: Mapping[str, Any], *, model: str) -> int:
        """The request's prompt tokens, counted offline (`streaming.tokens`)."""
        raise NotImplementedError

    def completion_token_cap(self, body: Mapping[str, Any], *, max_tokens: int, n: int, prompt_tokens: int) -> int:
        """The most generated text (in tokens) the call may stream: every choice to its limit."""
        return max_tokens * n if self.produces_text else 0

    def chunk(self, data: dict[str, Any]) -> ProviderChunk:
        raise NotImplementedError

    def read(self, raw: bytes) -> ProviderChunk | None:
        """One event as it came off the wire (its JSON); None for JSON that is not an object."""
        data = _json_event(raw)
        return None if data is None else self.chunk(data)

    def framer(self, *, include_usage: bool) -> Framer:
        raise NotImplementedError

    def aggregator(self) -> Aggregator:
        raise NotImplementedError

    def usage_object(self, billed: Mapping[str, int]) -> dict[str, Any]:
        """OpenAI's usage object for billed `{prompt_tokens, completion_tokens, total_tokens}`."""
        return dict(billed)


class _ChatStyleFramer:
    """`data:` frames ending in `[DONE]`; usage as OpenAI sends it when the client asked for it
    (the upstream's, or what the call was billed when the upstream sent none)."""

    def __init__(self, *, include_usage: bool) -> None:
        self._include_usage = include_usage
        self._first: ProviderChunk | None = None
        self._usage_sent = False

    def frame(self, chunk: ProviderChunk) -> bytes | None:
        if self._first is None:
            self._first = chunk
        raw = chunk.raw
        if chunk.usage is None and raw is not None:
            if not self._include_usage:
                # The upstream is always asked for usage, so it sends `"usage":null` in every
                # chunk; OpenAI leaves the field out for a client that did not ask for it.
                raw = raw.replace(b',"usage":null', b"")
            if self._include_usage or b'"usage"' not in raw:
                return b"data: " + raw + b"\n\n"  # as the upstream sent it
        data = chunk.data
        if chunk.usage is not None:
            self._usage_sent = self._include_usage
            if not data.get("choices"):
                return _sse.data_frame(data) if self._include_usage else None
        if not self._include_usage:
            data.pop("usage", None)
        return _sse.data_frame(data)

    def end(self, billed_usage: Mapping[str, int] | None) -> bytes:
        if self._include_usage and not self._usage_sent and billed_usage is not None:
            first = self._first.data if self._first is not None else {}
            head = {key: first.get(key) for key in ("id", "object", "created", "model")}
            return _sse.data_frame({**head, "choices": [], "usage": dict(billed_usage)}) + _sse.DONE
        return _sse.DONE

    def error(self, event: ErrorEvent) -> bytes:
        return _sse.error_frame(message=event.message, type=event.type, code=event.code)


class ChatCompletions(Endpoint):
    name = "chat.completions"
    path = "/chat/completions"

    def upstream_body(self, body: Mapping[str, Any], *, upstream_model: str) -> dict[str, Any]:
        # Usage is always asked for, so every call is billed from the upstream's counts.
        options = {**(body.get("stream_options") or {}), "include_usage": True}
        return {**body, "model": upstream_model, "stream": True, "stream_options": options}

    async def count_prompt_tokens(self, body: Mapping[str, Any], *, model: str) -> int:
        return await tokens.acount_chat_prompt_tokens(body["messages"], model=model, tools=body.get("tools"))

    def chunk(self, data: dict[str, Any]) -> ProviderChunk:
        if data.get("error"):
            raise UpstreamError("server_error", _error_message(data, STREAM_ERROR))
        usage = data.get("usage")
        return ProviderChunk(
            data=data,
            text=text_of_chunk(data),
            usage=Usage.from_openai(usage) if usage else None,
            upstream_id=data.get("id") or "",
        )

    def read(self, raw: bytes) -> ProviderChunk | None:
        chunk = super().read(raw)
        if chunk is not None:
            chunk.raw = raw  # relayed as it came unless the framer must change it
            if chunk.usage is None:
                # A queued chunk holds its bytes, not the parsed event (a dozen objects that the
                # garbage collector would walk while the chunk waits for a slow client).
                chunk.forget_data()
        return chunk

    def framer(self, *, include_usage: bool) -> Framer:
        return _ChatStyleFramer(include_usage=include_usage)

    def aggregator(self) -> Aggregator:
        return CompletionBuilder()


class _TextChoice:
    __slots__ = ("finish_reason", "logprobs", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.logprobs: Any = None


class TextCompletionBuilder:
    """Legacy `text_completion` chunks folded into one answer, choice by choice."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _TextChoice] = {}
        self._usage: dict[str, Any] | None = None

    def add(self, data: dict[str, Any]) -> None:
        if not self._head:
            self._head = {key: data.get(key) for key in ("id", "created", "model", "system_fingerprint")}
        for choice in data.get("choices") or ():
            merged = self._choices.setdefault(choice.get("index", 0), _TextChoice())
            if choice.get("text"):
                merged.text.append(choice["text"])
            if choice.get("finish_reason"):
                merged.finish_reason = choice["finish_reason"]
            if choice.get("logprobs") is not None:
                merged.logprobs = _merge_logprobs(merged.logprobs, choice["logprobs"])
        if data.get("usage"):
            self._usage = data["usage"]

    def build(self, *, usage: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": self._head.get("id"),
            "object": "text_completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
            "system_fingerprint": self._head.get("system_fingerprint"),
            "choices": [
                {"index": index, "text": "".join(choice.text), "logprobs": choice.logprobs, "finish_reason": choice.finish_reason}
                for index, choice in sorted(self._choices.items())
            ],
            "usage": self._usage or dict(usage),
        }


def _merge_logprobs(merged: Any, piece: Any) -> Any:
    """Legacy logprobs are parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""
    if not isinstance(piece, dict):
        return merged
    if not isinstance(merged, dict):
        return {key: list(value) if isinstance(value, list) else value for key, value in piece.items()}
    for key, value in piece.items():
        if isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key].extend(value)
    return merged


class Completions(Endpoint):
    """Legacy text completions (`/v1/completions`), for older clients."""

    name = "completions"
    path = "/completions"

    def streams_upstream(self, body: Mapping[str, Any]) -> bool:
        # OpenAI refuses to stream `best_of` candidates: such a call is one JSON answer.
        return not _best_of_many(body)

    def upstream_body(self, body: Mapping[str, Any], *, upstream_model: str) -> dict[str, Any]:
        if _best_of_many(body):
            whole = {**body, "model": upstream_model, "stream": False}
            whole.pop("stream_options", None)
            return whole
        options = {**(body.get("stream_options") or {}), "include_usage": True}
        return {**body, "model": upstream_model, "stream": True, "stream_options": options}

    async def count_prompt_tokens(self, body: Mapping[str, Any], *, model: str) -> int:
        return await tokens.acount_completion_prompt_tokens(body["prompt"], model=model)

    def completion_token_cap(self, body: Mapping[str, Any], *, max_tokens: int, n: int, prompt_tokens: int) -> int:
        # Every prompt of a batch gets its n choices; with `echo`, each starts with its prompt.
        prompts = _prompt_count(body["prompt"])
        return (max_tokens * prompts + (prompt_tokens if body.get("echo") else 0)) * n

    def chunk(self, data: dict[str, Any]) -> ProviderChunk:
        if data.get("error"):
            raise UpstreamError("server_error", _error_message(data, STREAM_ERROR))
        usage = data.get("usage")
        text = "".join(choice.get("text") or "" for choice in data.get("choices") or ())
        return ProviderChunk(data=data, text=text, usage=Usage.from_openai(usage) if usage else None, upstream_id=data.get("id") or "")

    def framer(self, *, include_usage: bool) -> Framer:
        return _ChatStyleFramer(include_usage=include_usage)

    def aggregator(self) -> Aggregator:
        return TextCompletionBuilder()


def _best_of_many(body: Mapping[str, Any]) -> bool:
    best_of = body.get("best_of")
    return isinstance(best_of, int) and best_of > 1


def _prompt_count(prompt: Any) -> int:
    """A string or one token array is one prompt; a list of strings or token arrays is a batch."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


class _ResponsesFramer:
    """Typed events (`event: <type>` then its JSON), numbered by `sequence_number`; the stream
    ends with the upstream's `response.completed` (no `[DONE]`), or with an `error` event.

    The terminal event (`response.completed` / `response.incomplete`) is held until `end()`, so
    a client that sees it finds the call in the ledger, and so the billed usage fills it in when
    the upstream sent none.
    """

    def __init__(self) -> None:
        self._sequence = -1
        self._final: dict[str, Any] | None = None

    def frame(self, chunk: ProviderChunk) -> bytes | None:
        data = chunk.data
        sequence = data.get("sequence_number")
        if isinstance(sequence, int):
            self._sequence = sequence
        if data.get("type") in _RESPONSES_FINAL:
            self._final = data
            return None
        return _typed_event(data)

    def end(self, billed_usage: Mapping[str, int] | None) -> bytes:
        final = self._final
        if final is None:
            return b""
        response = final.get("response")
        if isinstance(response, dict) and not response.get("usage") and billed_usage is not None:
            final = {**final, "response": {**response, "usage": _responses_usage(billed_usage)}}
        return _typed_event(final)

    def error(self, event: ErrorEvent) -> bytes:
        self._sequence += 1
        payload = {"type": "error", "code": event.code, "message": event.message, "param": None, "sequence_number": self._sequence}
        return _typed_event(payload)


def _typed_event(data: Mapping[str, Any]) -> bytes:
    return b"event: " + str(data.get("type", "message")).encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _responses_usage(billed: Mapping[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": billed["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": billed["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": billed["total_tokens"],
    }


class ResponseBuilder:
    """The non-stream answer of the Responses API: the response that `response.completed` (or
    `response.incomplete`) carries whole."""

    def __init__(self) -> None:
        self._response: dict[str, Any] | None = None
        self._created: dict[str, Any] | None = None

    def add(self, data: dict[str, Any]) -> None:
        response = data.get("response")
        if not isinstance(response, dict):
            return
        if data.get("type") in _RESPONSES_FINAL:
            self._response = response
        elif self._created is None:
            self._created = response

    def build(self, *, usage: Mapping[str, Any]) -> dict[str, Any]:
        response = dict(self._response or self._created or {"object": "response", "output": []})
        if not response.get("usage"):
            response["usage"] = dict(usage)
        return response


class Responses(Endpoint):
    name = "responses"
    path = "/responses"
    last_events = _RESPONSES_FINAL | {"response.failed", "error"}

    def continued_response(self, body: Mapping[str, Any]) -> str | None:
        previous = body.get("previous_response_id")
        return previous if isinstance(previous, str) else None

    async def count_prompt_tokens(self, body: Mapping[str, Any], *, model: str) -> int:
        return await tokens.acount_responses_input_tokens(body, model=model)

    def chunk(self, data: dict[str, Any]) -> ProviderChunk:
        kind = data.get("type")
        if kind == "error":
            raise UpstreamError("server_error", _error_message(data, STREAM_ERROR))
        response = data.get("response")
        if kind == "response.failed":
            error = response.get("error") if isinstance(response, dict) else None
            raise UpstreamError("server_error", _error_message(error or {}, STREAM_ERROR))
        usage = None
        upstream_id = ""
        if isinstance(response, dict):
            upstream_id = response.get("id") or ""
            if kind in _RESPONSES_FINAL and response.get("usage"):
                usage = Usage.from_responses(response["usage"])
        delta = data.get("delta")
        text = delta if kind in _RESPONSES_TEXT_DELTAS and isinstance(delta, str) else ""
        return ProviderChunk(data=data, text=text, usage=usage, upstream_id=upstream_id)

    def framer(self, *, include_usage: bool) -> Framer:
        return _ResponsesFramer()

    def aggregator(self) -> Aggregator:
        return ResponseBuilder()

    def usage_object(self, billed: Mapping[str, int]) -> dict[str, Any]:
        return _responses_usage(billed)


class EmbeddingsAnswer:
    def __init__(self) -> None:
        self._answer: dict[str, Any] = {}

    def add(self, data: dict[str, Any]) -> None:
        self._answer = data

    def build(self, *, usage: Mapping[str, Any]) -> dict[str, Any]:
        answer = dict(self._answer)
        if not answer.get("usage"):
            answer["usage"] = dict(usage)
        return answer


class Embeddings(Endpoint):
    name = "embeddings"
    path = "/embeddings"
    streamed = False
    produces_text = False

    def upstream_body(self, body: Mapping[str, Any], *, upstream_model: str) -> dict[str, Any]:
        return {**body, "model": upstream_model}

    async def count_prompt_tokens(self, body: Mapping[str, Any], *, model: str) -> int:
        return await tokens.acount_embedding_input_tokens(body["input"], model=model)

    def chunk(self, data: dict[str, Any]) -> ProviderChunk:
        if data.get("error"):
            raise UpstreamError("server_error", _error_message(data, STREAM_ERROR))
        usage = data.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        return ProviderChunk(data=data, text="", usage=Usage(prompt_tokens=prompt, completion_tokens=0) if usage else None)

    def framer(self, *, include_usage: bool) -> Framer:
        raise TypeError("embeddings are not streamed")

    def aggregator(self) -> Aggregator:
        return EmbeddingsAnswer()

    def usage_object(self, billed: Mapping[str, int]) -> dict[str, Any]:
        return {"prompt_tokens": billed["prompt_tokens"], "total_tokens": billed["prompt_tokens"]}


ENDPOINTS: dict[EndpointName, Endpoint] = {
    endpoint.name: endpoint for endpoint in (ChatCompletions(), Responses(), Completions(), Embeddings())
}
