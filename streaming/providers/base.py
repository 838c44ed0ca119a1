"""The provider interface: one small async surface every upstream implements.

A provider's `stream()` is an async generator of `ProviderChunk`s. Closing the generator
(`aclose()`, or cancelling the task iterating it) must close the upstream connection at once.
Failures are raised as `UpstreamError`, before or during the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from streaming.catalog import Deployment

if TYPE_CHECKING:
    from streaming.endpoints import Endpoint

UpstreamErrorKind = Literal[
    "rate_limited",  # upstream 429
    "bad_request",  # upstream 400/404/422: the request itself was refused
    "auth",  # upstream 401/403: the gateway's upstream credentials are wrong
    "server_error",  # upstream 5xx, or an error event in the stream
    "connection",  # could not connect, or the connection dropped mid-stream
    "timeout",  # connect, first-token, idle or total timeout
]


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    deployment: Deployment
    # Which API is called: where the request goes and how its answer reads.
    endpoint: Endpoint
    # The client's validated request body, forwarded to the upstream (model renamed).
    body: dict[str, Any]
    # Per-request simulator directives (from x-simulator-* headers); ignored by real upstreams.
    simulator: dict[str, str] = field(default_factory=dict)
    # The gateway's id of the call (its ledger row's request_id), sent to upstreams that take one.
    request_id: str = ""
    # Which attempt of the call this is (1 first; retries and fallbacks count on).
    attempt: int = 1
    # Told the headers of the upstream's answer as soon as it starts (its rate-limit headers
    # teach the gateway the upstream's real limits); a failure's headers are on `UpstreamError`.
    on_response_headers: Callable[[Mapping[str, str]], None] | None = None
    # Told, once the upstream's answer has started, how to cut its connection at once (a plain
    # call, no await): the relay cuts it the moment the client leaves, before the loop spends
    # anything on the call's ending. Providers without a connection of their own never call it.
    on_connection: Callable[[Callable[[], None]], None] | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: dict[str, Any]) -> Usage:
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        return cls(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(prompt_details.get("cached_tokens") or 0),
            reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
        )

    @classmethod
    def from_responses(cls, usage: dict[str, Any]) -> Usage:
        """The Responses API's usage (`input_tokens`, `output_tokens` and their details)."""
        input_details = usage.get("input_tokens_details") or {}
        output_details = usage.get("output_tokens_details") or {}
        return cls(
            prompt_tokens=int(usage.get("input_tokens") or 0),
            completion_tokens=int(usage.get("output_tokens") or 0),
            cached_tokens=int(input_details.get("cached_tokens") or 0),
            reasoning_tokens=int(output_details.get("reasoning_tokens") or 0),
        )


class ProviderChunk:
    """One event of the endpoint's stream (a `chat.completion.chunk`, a Responses API event, ...)
    or a whole non-streamed answer, as the client will receive it.

    A chunk read off the wire keeps the event's JSON as it came (`raw`), so that the relay passes
    it on without re-encoding it, and is parsed only when something needs its fields (`data`).
    """

    __slots__ = ("_data", "raw", "text", "upstream_id", "usage")

    def __init__(
        self,
        data: dict[str, Any] | None = None,
        text: str = "",
        usage: Usage | None = None,
        upstream_id: str = "",
        *,
        raw: bytes | None = None,
    ) -> None:
        if data is None and raw is None:
            raise ValueError("a chunk needs its data or its raw JSON")
        self._data = data
        self.raw = raw
        # The generated text in this chunk (content and tool-call arguments), for local counting.
        self.text = text
        self.usage = usage
        # The upstream's id of its answer (chatcmpl-..., resp_...), where the event carries it.
        self.upstream_id = upstream_id

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            assert self.raw is not None
            self._data = orjson.loads(self.raw)
        return self._data

    def forget_data(self) -> None:
        """Drop the parsed event, keeping its JSON (`raw`): `data` parses it again if asked."""
        if self.raw is None:
            raise ValueError("a chunk without its raw JSON cannot forget its data")
        self._data = None

    def __repr__(self) -> str:
        return f"ProviderChunk(text={self.text!r}, usage={self.usage!r}, upstream_id={self.upstream_id!r})"


class UpstreamError(Exception):
    def __init__(
        self,
        kind: UpstreamErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        limit_type: Literal["requests", "tokens"] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.headers = headers or {}
        # Which of its limits a 429 says was reached (OpenAI's error `type`), when it says.
        self.limit_type = limit_type


class Provider(Protocol):
    name: str

    def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderChunk]: ...

    async def stored(self, *, deployment: Deployment, method: Literal["GET", "DELETE", "POST"], path: str) -> dict[str, Any]:
        """A request about something the upstream stores (`GET /responses/{id}`, its cancel or
        deletion): its JSON answer, or `UpstreamError`."""
        ...

    async def aclose(self) -> None: ...


def text_of_chunk(data: dict[str, Any]) -> str:
    """The generated text carried by an OpenAI chunk: content, refusal and tool-call arguments."""
    choices = data.get("choices")
    if not choices:
        return ""
    if len(choices) == 1:  # the usual chunk: one choice whose delta is its content alone
        delta = choices[0].get("delta")
        if not delta:
            return ""
        if len(delta) == 1:
            content = delta.get("content")
            if content.__class__ is str:
                return content
    parts: list[str] = []
    for choice in choices:
        delta = choice.get("delta") or {}
        for key in ("content", "refusal"):
            value = delta.get(key)
            if value:
                parts.append(value)
        for tool_call in delta.get("tool_calls") or ():
            function = tool_call.get("function") or {}
            for key in ("name", "arguments"):
                value = function.get(key)
                if value:
                    parts.append(value)
    return "".join(parts)
