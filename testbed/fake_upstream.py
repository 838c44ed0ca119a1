"""A fast, local, fake OpenAI-compatible upstream for tests and benchmarks.

HTTP/1.1 (keep-alive, chunked responses, Content-Length or chunked request bodies) is h11's:
it parses every request and writes every response head and end of body, and decides whether
a connection may carry another request. Only the chunks of a streamed body are framed here
(``_chunk``, the same bytes h11 writes for a ``Data`` event), because that is the one
per-chunk cost a benchmark of a thousand 20 ms streams pays 50,000 times a second: h11's
``send(Data)`` costs ~10 us a chunk against ~1 us (``bench/README.md`` has the figures).

Endpoints, each in OpenAI's wire format; the ``/v1`` prefix is optional:

- ``POST /v1/chat/completions`` (streamed or not): ``n`` choices (each chunk carries one, in
  turn, as OpenAI interleaves them); with ``tools``, a function call (see ``auto_tool_calls``).
- ``POST /v1/completions`` (legacy, streamed or not): ``text_completion`` chunks, ``n`` choices
  per prompt, a usage chunk (``choices: []``) with ``stream_options.include_usage``.
- ``POST /v1/responses`` (streamed or not): typed events (``event: <type>`` lines, a
  ``sequence_number`` from 0, no ``[DONE]``): response.created, response.in_progress,
  response.output_item.added, response.content_part.added, one response.output_text.delta per
  token, response.output_text.done, response.content_part.done, response.output_item.done and
  response.completed (response.incomplete when ``max_output_tokens`` cut it), whose response
  carries the usage. A response is kept (unless ``store`` is false; the newest
  ``max_stored_responses``) for ``GET /v1/responses/{id}`` and ``DELETE /v1/responses/{id}``;
  ``POST /v1/responses/{id}/cancel`` answers 400, as OpenAI does for a response not created
  with ``background``; an unknown id is a 404.
- ``POST /v1/embeddings``: one deterministic unit vector per input (a string, a list of
  strings, a list of token ids or a list of such lists), of the request's ``dimensions`` or
  ``embedding_dimensions`` (8: light) floats, base64 (float32, little-endian) when
  ``encoding_format`` is "base64" (the SDK's default).
- ``GET /v1/models`` and ``GET /v1/models/{id}``.

Chat, legacy completions, responses and embeddings are the "model requests": each is admitted
by the limits, takes the next fault and is paced alike; their tokens are what usage reports.

Behaviour, all set by constructor keyword arguments that stay mutable attributes (a request
reads them once, when it starts, so a test may change them between requests):

- ``tokens`` content tokens per completion (per choice), each one delta of ``token_text``; a
  request's ``max_completion_tokens`` (or ``max_tokens``; ``max_output_tokens`` for a
  response) caps it and then ``finish_reason`` is "length" (a response is "incomplete").
- ``ttft`` seconds between the response headers and the first chunk; ``inter_token_delay``
  seconds between content chunks. The first content chunk travels with the role chunk, so a
  stream of C tokens lasts ``ttft + (C - 1) * inter_token_delay``; a non-streamed completion
  waits that long before it answers.
- Prompt tokens are ``prompt_tokens`` when set, else :func:`prompt_tokens_for`: the characters
  of all message contents // 4, plus 3 per message, plus 3 (:func:`input_tokens_for` counts a
  response's ``instructions`` and ``input`` items as messages; a legacy prompt or an embedding
  input is its characters // 4, at least 1, or its token ids). Completion tokens are the
  content chunks sent, times the choices.
- ``auto_tool_calls`` (off by default): a chat request with function ``tools`` answers a call
  of the named function when ``tool_choice`` names one, of the first when it is "required"
  (as OpenAI must, whatever the messages say), and never when it is "none". With "auto" (or
  none given) it answers text, unless ``auto_tool_calls`` is on and the last message is not a
  tool result. The call's arguments fill the schema's required properties with sample values
  and arrive in at most ``tokens`` pieces; ``finish_reason`` is "tool_calls".
- ``fault``: "429" (with ``retry_after``), "500", "401", "400" answer with that status and an
  OpenAI error body;
  "stall" sends ``fault_after_tokens`` content chunks and then nothing, holding the connection
  until the client closes it; "cut" sends them and then closes the connection mid-body (no
  last chunk, no ``[DONE]``); "error_frame" sends them, then an SSE ``{"error": ...}`` event, and
  ends the body cleanly (for a response: a typed ``error`` event, code "server_error");
  "endless" streams content as fast as the socket takes it, forever,
  and blocks on ``drain()`` when the reader is slow (the back-pressure probe). Without
  ``stream`` the faults are: stall holds without answering, cut closes without answering,
  error_frame answers 500, endless sends an endless JSON body (embeddings: holds, as stall).
- ``fault_schedule``: a list of faults (``None`` for a normal answer) used in turn, cyclically,
  one entry per model request the limits admit; while set it overrides ``fault`` (``["429",
  None]``: every second request is a 429; ``["500", "500", None]``). Setting it starts again at
  its first entry. Each record's ``fault`` is the fault that request got.
- ``rpm_limit`` and ``tpm_limit``: the server's own requests and tokens per minute, each over a
  sliding 60 s window, counted on model requests only (a request the limits refuse does not
  count). A request costs its prompt tokens plus the completion tokens it will produce (``tokens``
  capped by its ``max_completion_tokens``/``max_tokens``, times its choices), counted when it
  is admitted, as
  OpenAI counts a request's estimate; a fault after admission does not give them back. The excess
  is answered 429 (error type "requests" or "tokens", code "rate_limit_exceeded") with
  ``retry-after`` (whole seconds) and ``retry-after-ms``: the time until the window has room for
  it (60 s for a request larger than ``tpm_limit``, which never fits). Every 429, fault or
  limit, counts in ``rejected_429``.
- ``rate_limit_headers`` (on by default): every answer to a model request, success or error,
  carries OpenAI's ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests`` and
  ``x-ratelimit-reset-requests`` when ``rpm_limit`` is set, and the ``-tokens`` trio when
  ``tpm_limit`` is; remaining counts this request, reset (``250ms``, ``1.5s``, ``6m0s``) is when
  the oldest entry leaves the window. A "429" fault without limits advertises a nominal 60
  requests, 0 remaining. Off, none are sent (an upstream such as vLLM, which publishes nothing:
  a client can only learn its limits from the 429s, whose ``retry-after`` is still sent).

Observability: ``requests`` holds one :class:`UpstreamRequest` per request, appended when the
request has been read and updated in place by the server's loop. Reading the fields from
another thread is safe (each is one attribute store); poll them with :meth:`wait_until`
(blocking) or :meth:`await_until` (from an event loop, which must not be blocked).

Deliberate choices that may look wrong:

- A peer EOF is taken as "the client went away", and the server aborts the connection at once:
  HTTP clients do not half-close, and aborting is what makes a drain blocked on a vanished
  reader return promptly. Each connection is an ``asyncio.Protocol``, so the close is seen (and
  ``closed_at`` stamped) in ``eof_received``/``connection_lost`` themselves, even while a
  response is stalled or sleeping, not when some task next gets to run.
- Every socket has ``TCP_NODELAY`` (asyncio sets it too; it is set here because the benchmark
  depends on it): a paced chunk is one ``write`` and leaves at once as one segment, so the
  gateway reads one chunk per read, as it does from OpenAI.
- Writes are only awaited (``drain()``) when the transport has paused writing (its buffer is
  past the high-water mark). Long bursts yield to the
  loop every batch so one fast stream does not starve the others.
- Frames are pre-encoded once per request: every content chunk of a completion is the same
  bytes, so a burst of k chunks is one ``bytes * k`` and one HTTP chunk. A response's deltas
  differ only in their ``sequence_number``, so each is a prefix, a number and a suffix; a tool
  call's argument pieces are encoded once, up front.
- Paced chunks (``inter_token_delay`` > 0) are not sent by each stream sleeping: one shared
  pacer per delay value writes them from a timer callback, and a stream's coroutine only
  wakes when its run ends or its transport needs draining. With a thousand streams this
  cut the server's CPU per chunk by about two thirds.
- A record is updated before the bytes it counts are handed to the transport, so a client
  that has seen a chunk finds it counted; only ``finished_at`` lags and should be polled.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http
import itertools
import json
import math
import os
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Self, cast

import h11

Fault = Literal["429", "500", "401", "400", "stall", "cut", "error_frame", "endless"]
FAULTS: tuple[Fault, ...] = ("429", "500", "401", "400", "stall", "cut", "error_frame", "endless")
_STATUS_FAULTS = frozenset({"429", "500", "401", "400"})
_MID_STREAM_FAULTS = frozenset({"stall", "cut", "error_frame"})

WRITE_BLOCKED_AFTER = 0.05  # seconds a drain may wait before the record says write_blocked
RPM_WINDOW = 60.0  # seconds: the window of rpm_limit and tpm_limit
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1-nano")

_BATCH = 256  # content chunks per write when there is no inter-token delay
_READ_LIMIT = 1 << 20  # largest request head, bytes
_DONE = b"data: [DONE]\n\n"
_STREAM_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"transfer-encoding", b"chunked"),
    (b"cache-control", b"no-cache"),
)
_JSON_STREAM_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"application/json"),
    (b"transfer-encoding", b"chunked"),
)

ERROR_429 = "Rate limit reached for requests. Please try again later."
ERROR_429_TOKENS = (
    "Rate limit reached for tokens per min (TPM): Limit {limit}, Used {used}, Requested "
    "{requested}. Please try again in {retry}."
)
ERROR_500 = "The server had an error while processing your request. Sorry about that!"
ERROR_401 = "Incorrect API key provided. You can find your API key at the fake upstream."
ERROR_400 = "Invalid request: the fake upstream was told to reject it."
ERROR_STREAM = "The server had an error while generating the stream."
ERROR_MODEL = "you must provide a model parameter"
ERROR_JSON = "We could not parse the JSON body of your request."
ERROR_NOT_FOUND = "Unknown request URL: {method} {path}."
ERROR_MODEL_NOT_FOUND = "The model '{model}' does not exist."
ERROR_INPUT = (
    "'input' must be a string, an array of strings, an array of token ids or an array of "
    "arrays of token ids."
)
ERROR_RESPONSE_NOT_FOUND = "Response with id '{id}' not found."
ERROR_CANCEL = "Only responses created with background=true can be cancelled."

# The POST routes that generate, and their kind.
_GENERATIONS = {
    "/chat/completions": "chat",
    "/completions": "completion",
    "/responses": "response",
    "/embeddings": "embedding",
}


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


SYSTEM_FINGERPRINT = "fp_560af6e559"  # what a chat chunk's system_fingerprint looks like


def _obfuscation(seed: str) -> str:
    """Random-looking characters, as OpenAI pads a streamed chunk with (fixed per stream here)."""
    return base64.b64encode(seed.encode()[-9:]).decode().rstrip("=")[:12]


def _check_fault(fault: object) -> None:
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")


def _chunk(payload: bytes) -> bytes:
    """Frame one non-empty HTTP/1.1 chunk (an empty one would end the body)."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _error_body(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return _dumps({"error": error}).encode()


_STREAM_ERROR_EVENT = b"data: %s\n\n" % _error_body(ERROR_STREAM, "server_error", None, None)


def _reset_text(seconds: float) -> str:
    """Format a duration as OpenAI's x-ratelimit-reset-* headers do: 120ms, 7.66s, 6m0s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"


def prompt_tokens_for(body: dict[str, Any], fixed: int | None = None) -> int:
    """Return the prompt tokens charged for ``body``: ``fixed``, else chars // 4 + 3/message + 3."""
    if fixed is not None:
        return fixed
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 3
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    chars += len(text)
    return chars // 4 + 3 * len(messages) + 3


def input_tokens_for(body: dict[str, Any], fixed: int | None = None) -> int:
    """Return the input tokens of a Responses API request, counted as :func:`prompt_tokens_for`.

    ``instructions`` is one system message; a string ``input`` one user message; each item of
    a list ``input`` one message (its ``content``, or a tool result's ``output``).
    """
    if fixed is not None:
        return fixed
    messages: list[Any] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        messages.append({"content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"content": given})
    elif isinstance(given, list):
        for item in given:
            if (
                isinstance(item, dict)
                and "content" not in item
                and isinstance(item.get("output"), str)
            ):
                item = {"content": item["output"]}
            messages.append(item)
    return prompt_tokens_for({"messages": messages})


def _prompts_of(prompt: object) -> list[str | list[int]]:
    """A legacy completion's (or an embedding's) inputs: strings or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        if prompt and all(isinstance(x, int) for x in prompt):
            return [cast(list[int], prompt)]
        return [x for x in prompt if isinstance(x, str | list)]
    return []


def _prompt_count(prompt: object) -> int:
    return max(1, len(_prompts_of(prompt)))


def completion_prompt_tokens_for(body: dict[str, Any], fixed: int | None = None) -> int:
    """Return a legacy completion's prompt tokens: chars // 4 (at least 1) per prompt string,
    the ids per token-id list."""
    if fixed is not None:
        return fixed
    return sum(
        len(prompt) if isinstance(prompt, list) else max(1, len(prompt) // 4)
        for prompt in _prompts_of(body.get("prompt"))
    )


def _embedding_inputs(given: object) -> list[str | list[int]] | None:
    """Split an embeddings ``input`` into its items, or None when it is not a valid one."""
    if isinstance(given, str):
        return [given]
    if not isinstance(given, list) or not given:
        return None
    if all(isinstance(x, int) for x in given):
        return [cast(list[int], given)]
    if all(isinstance(x, str) for x in given):
        return cast(list[str | list[int]], given)
    if all(isinstance(x, list) and all(isinstance(i, int) for i in x) for x in given):
        return cast(list[str | list[int]], given)
    return None


def _embedding_of(item: str | list[int], dimensions: int) -> list[float]:
    """A deterministic unit vector for ``item`` (equal inputs, equal vectors)."""
    if isinstance(item, str):
        seed = zlib.crc32(item.encode())
    else:
        seed = zlib.crc32(struct.pack(f"<{len(item)}q", *item))
    values = [
        ((seed ^ (i * 0x9E3779B1)) * 2654435761 % 4294967296) / 2147483648.0 - 1.0
        for i in range(1, dimensions + 1)
    ]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _arguments_for(schema: object) -> Any:
    """Sample arguments that satisfy a JSON schema's types: every required property."""
    if not isinstance(schema, dict):
        return {}
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    type_ = schema.get("type")
    if isinstance(type_, list):
        type_ = next((t for t in type_ if t != "null"), "null")
    if type_ == "object" or (type_ is None and "properties" in schema):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = required if isinstance(required, list) else list(properties)
        return {name: _arguments_for(properties.get(name)) for name in names}
    samples = {"string": "tok", "integer": 1, "number": 1.5, "boolean": True, "array": []}
    return samples.get(type_) if isinstance(type_, str) else {}


def wait_until(
    predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.005
) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; return whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


async def await_until(
    predicate: Callable[[], object],
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline that returns False rather than raises
    interval: float = 0.005,
) -> bool:
    """Poll ``predicate`` without blocking the running loop; return whether it held in time."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


@dataclass(slots=True, eq=False)
class UpstreamRequest:
    """One request as the fake upstream saw and answered it (times are ``time.monotonic()``).

    ``first_byte_at`` is the first response byte (the status line); ``first_chunk_at`` the
    first SSE event. ``closed_at`` is when the connection carrying this request closed, by
    either side, if that happened while this was its current or last request; it stays None
    while the connection is kept alive. ``client_disconnected`` means the peer closed before
    the response finished. ``completed`` means the stream's last event (``data: [DONE]``, or
    response.completed) or the whole non-streamed body went out. ``bytes_written`` counts bytes handed to the transport, headers included.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    started_at: float
    stream: bool = False
    status: int | None = None
    fault: str | None = None
    first_byte_at: float | None = None
    first_chunk_at: float | None = None
    finished_at: float | None = None
    closed_at: float | None = None
    completed: bool = False
    client_disconnected: bool = False
    bytes_written: int = 0
    content_chunks_sent: int = 0
    write_blocked: bool = False
    max_drain_wait: float = 0.0


@dataclass(slots=True)
class _Parsed:
    method: str
    path: str
    headers: dict[str, str]
    raw_body: bytes
    keep_alive: bool


@dataclass(slots=True)
class _BadRequest:
    status: int
    message: str


Header = tuple[bytes, bytes]


def _header_list(blob: bytes) -> list[Header]:
    """``name: value\\r\\n`` lines (how the limit headers are built) as h11's header pairs."""
    pairs: list[Header] = []
    for line in blob.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            pairs.append((name, value.strip()))
    return pairs


class _Connection(asyncio.Protocol):
    """One client connection: h11 parses what arrives into ``queue``, which the server's handler
    task answers in turn; the peer leaving is seen here, in the transport's callbacks."""

    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=_READ_LIMIT)
        self.queue: asyncio.Queue[_Parsed | _BadRequest | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.record: UpstreamRequest | None = None
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.high_water = 0
        self.paused = False  # the transport asked us to stop writing (pause_writing)
        self._writable: asyncio.Future[None] | None = None
        self._request: h11.Request | None = None  # the head of the request being read
        self._body: list[bytes] = []
        self._broken = False  # a malformed request was queued: read nothing more
        self.task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.high_water = self.transport.get_write_buffer_limits()[1]
        self.task = asyncio.get_running_loop().create_task(self.server._serve(self))
        self.server._connection_tasks.add(self.task)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        self.h11.receive_data(data)
        self._parse()

    def eof_received(self) -> bool:
        self.mark_peer_closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.mark_peer_closed()
        self._wake_writer()
        self.queue.put_nowait(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writer()

    # -- reading ----------------------------------------------------------------------------

    def _parse(self) -> None:
        """Queue every complete request h11 has; stop at NEED_DATA, or PAUSED while answering."""
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as error:
                self._broken = True
                self.queue.put_nowait(_BadRequest(error.error_status_hint, str(error)))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request, self._body = event, []
            elif isinstance(event, h11.Data):
                self._body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.queue.put_nowait(self._parsed())
            elif isinstance(event, h11.ConnectionClosed):
                self.mark_peer_closed()
                return

    def _parsed(self) -> _Parsed:
        request = self._request
        assert request is not None
        headers: dict[str, str] = {}
        for name, value in request.headers:  # h11 gives lower-cased names
            key, text = name.decode("latin-1"), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        # h11's own rule: HTTP/1.1 without "Connection: close" (it keeps no HTTP/1.0 alive).
        keep_alive = (
            request.http_version == b"1.1" and "close" not in headers.get("connection", "").lower()
        )
        path = request.target.decode("latin-1").split("?", 1)[0]
        self._request = None
        body, self._body = b"".join(self._body), []
        return _Parsed(request.method.decode("latin-1"), path, headers, body, keep_alive)

    def next_cycle(self) -> bool:
        """After a complete answer: whether the connection may carry another request.

        h11 decides (both sides done, nobody asked to close); then any request that arrived
        meanwhile (pipelined) is parsed.
        """
        conn = self.h11
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        self._parse()
        return True

    # -- writing ----------------------------------------------------------------------------

    def _wake_writer(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def writable(self) -> None:
        """Return once the transport takes writes again, or the connection is gone."""
        while self.paused and not self.closed.is_set():
            waiter = self._writable
            if waiter is None:
                waiter = self._writable = asyncio.get_running_loop().create_future()
            await waiter

    def mark_peer_closed(self) -> None:
        """Record that the peer went away and drop our side too, so pending drains return."""
        if self.closed.is_set():
            return
        self.closed.set()
        record = self.record
        if record is not None and record.closed_at is None:
            record.closed_at = time.monotonic()
            if record.finished_at is None:
                record.client_disconnected = True
        self.transport.abort()
        self._wake_writer()

    def close_by_server(self) -> None:
        """Close our side after the buffered bytes are sent (a FIN mid-body for "cut")."""
        if self.closed.is_set():
            return
        self.closed.set()
        if self.record is not None and self.record.closed_at is None:
            self.record.closed_at = time.monotonic()
        self.transport.close()
        self._wake_writer()


class _Out:
    """Write one response, keeping its record's byte count, timings and back-pressure.

    ``head``, ``data`` and ``end`` return h11's bytes for the response head, a body piece and
    the end of the body, for the caller to join into one ``write``: a response's first chunk
    travels with its head, its last with the end of the body.
    """

    __slots__ = ("conn", "record", "_write", "transport", "high_water")

    def __init__(self, conn: _Connection, record: UpstreamRequest) -> None:
        self.conn = conn
        self.record = record
        self._write = conn.transport.write
        self.transport = conn.transport
        self.high_water = conn.high_water

    def head(self, status: int, headers: list[Header], keep_alive: bool) -> bytes:
        self.record.status = status
        headers.append((b"connection", b"keep-alive" if keep_alive else b"close"))
        reason = http.HTTPStatus(status).phrase.encode()
        return (
            self.conn.h11.send(h11.Response(status_code=status, headers=headers, reason=reason))
            or b""
        )

    def data(self, payload: bytes) -> bytes:
        return self.conn.h11.send(h11.Data(data=payload)) or b""

    def end(self) -> bytes:
        return self.conn.h11.send(h11.EndOfMessage()) or b""

    # The record is updated before the bytes go to the transport, so a client (in another
    # thread) that has seen them can rely on the record already counting them.

    def write(self, data: bytes) -> None:
        record = self.record
        if record.first_byte_at is None:
            record.first_byte_at = time.monotonic()
        record.bytes_written += len(data)
        self._write(data)

    def write_events(self, head: bytes, events: bytes, end: bool = False) -> None:
        """Write ``head`` (may be empty), the SSE ``events`` as one HTTP chunk (if any), and the
        end of the body if ``end``, in one write."""
        if events:
            if self.record.first_chunk_at is None:
                self.record.first_chunk_at = time.monotonic()
            head += _chunk(events)
        if end:
            head += self.end()
        if head:
            self.write(head)

    async def drain(self) -> None:
        """Wait for the transport only when it has paused writing."""
        conn = self.conn
        if not conn.paused:
            return
        record = self.record
        loop = asyncio.get_running_loop()
        started = loop.time()
        timer = loop.call_later(WRITE_BLOCKED_AFTER, setattr, record, "write_blocked", True)
        try:
            await conn.writable()
        finally:
            timer.cancel()
            record.write_blocked = False
            record.max_drain_wait = max(record.max_drain_wait, loop.time() - started)

    async def drain_or_yield(self) -> None:
        """Drain if needed, else still give other connections a turn."""
        if self.conn.paused:
            await self.drain()
        else:
            await asyncio.sleep(0)


@dataclass(slots=True)
class _ToolCall:
    """The function call a chat completion answers with: its id, name and argument pieces."""

    id: str
    name: str
    arguments: str
    pieces: tuple[str, ...]


@dataclass(slots=True)
class _Plan:
    """Everything a completion needs, fixed when the request starts.

    ``kind`` is the API: "chat" (chat.completion), "completion" (legacy text_completion) or
    "response" (the Responses API). ``choices`` is how many choices each chunk carries in turn
    (``n``, times the prompts of a legacy completion); ``completion_tokens`` counts one choice.
    """

    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    obfuscation: bool
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_text: str
    ttft: float
    delay: float
    fault: str | None
    fault_after: int
    keep_alive: bool
    extra_headers: bytes = b""
    kind: str = "chat"
    choices: int = 1
    tool: _ToolCall | None = None
    request: dict[str, Any] | None = None  # the Responses API request, echoed in its response
    store: bool = False  # keep the response for GET /v1/responses/{id}

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens * self.choices

    def usage(self) -> dict[str, Any]:
        c = self.output_tokens
        if self.kind == "completion":
            return {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": c,
                "total_tokens": self.prompt_tokens + c,
            }
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": c,
            "total_tokens": self.prompt_tokens + c,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    def frames(self) -> _Frames:
        """Pre-encode the SSE events of this stream (string templates: no per-frame dumps)."""
        if self.kind == "response":
            return self._response_frames()
        if self.kind == "completion":
            return self._completion_frames()
        return self._chat_frames()

    def payload(self) -> dict[str, Any]:
        """The non-streamed answer."""
        if self.kind == "response":
            return self.response_object()
        text = self.token_text * self.completion_tokens
        if self.kind == "completion":
            return {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "text": text,
                        "index": i,
                        "logprobs": None,
                        "finish_reason": self.finish_reason,
                    }
                    for i in range(self.choices)
                ],
                "usage": self.usage(),
                "system_fingerprint": None,
            }
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": [],
        }
        tool = self.tool
        if tool is not None:
            message["content"] = None
            message["tool_calls"] = [
                {
                    "id": tool.id,
                    "type": "function",
                    "function": {"name": tool.name, "arguments": tool.arguments},
                }
            ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": i,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
                for i in range(self.choices)
            ],
            "usage": self.usage(),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def endless_prefix(self) -> bytes:
        """The start of a non-streamed answer whose text never ends, up to the opening quote."""
        common = f'{{"id":{_dumps(self.id)},'
        if self.kind == "response":
            return (
                f'{common}"object":"response","created_at":{self.created},"status":"completed",'
                f'"model":{_dumps(self.model)},"output":[{{"type":"message","id":'
                f'{_dumps(self._message_id)},"status":"completed","role":"assistant",'
                f'"content":[{{"type":"output_text","annotations":[],"logprobs":[],"text":"'
            ).encode()
        if self.kind == "completion":
            return (
                f'{common}"object":"text_completion","created":{self.created},'
                f'"model":{_dumps(self.model)},"choices":[{{"index":0,"text":"'
            ).encode()
        return (
            f'{common}"object":"chat.completion","created":{self.created},'
            f'"model":{_dumps(self.model)},"choices":[{{"index":0,"message":'
            f'{{"role":"assistant","content":"'
        ).encode()

    # -- chat.completion.chunk -------------------------------------------------------------------

    def _chat_frames(self) -> _Frames:
        # As OpenAI sends them (2025): service_tier and system_fingerprint in every chunk,
        # "usage":null until the usage chunk when it was asked for, and an "obfuscation" field
        # of random characters (unless stream_options.include_obfuscation is false).
        base = (
            f'data: {{"id":{_dumps(self.id)},"object":"chat.completion.chunk",'
            f'"created":{self.created},"model":{_dumps(self.model)},'
            f'"service_tier":"default","system_fingerprint":"{SYSTEM_FINGERPRINT}","choices":'
        )
        end = f',"obfuscation":"{_obfuscation(self.id)}"}}\n\n' if self.obfuscation else "}\n\n"
        tail = ',"usage":null' + end if self.include_usage else end
        indexes = range(self.choices)

        def each(delta: str, finish: str = "null") -> bytes:
            # One chunk per choice, as OpenAI interleaves the choices of n > 1.
            return "".join(
                f'{base}[{{"index":{i},"delta":{delta},"logprobs":null,'
                f'"finish_reason":{finish}}}]{tail}'
                for i in indexes
            ).encode()

        p, c = self.prompt_tokens, self.output_tokens
        usage = (
            f'{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{p + c},'
            f'"prompt_tokens_details":{{"cached_tokens":0}},'
            f'"completion_tokens_details":{{"reasoning_tokens":0}}}}'
        )
        finish = each("{}", _dumps(self.finish_reason))
        usage_frame = f'{base}[],"usage":{usage}{end}'.encode()
        tool = self.tool
        if tool is None:
            return _Frames(
                role=each('{"role":"assistant","content":"","refusal":null}'),
                content=each(f'{{"content":{_dumps(self.token_text)}}}'),
                finish=finish,
                usage=usage_frame,
            )
        role = each(
            f'{{"role":"assistant","content":null,"tool_calls":[{{"index":0,'
            f'"id":{_dumps(tool.id)},"type":"function","function":{{"name":{_dumps(tool.name)},'
            f'"arguments":""}}}}],"refusal":null}}'
        )
        pieces = [
            each(f'{{"tool_calls":[{{"index":0,"function":{{"arguments":{_dumps(piece)}}}}}]}}')
            for piece in tool.pieces
        ]

        def run(start: int, count: int) -> bytes:
            return b"".join(pieces[start : start + count])

        return _Frames(role=role, content=b"", finish=finish, usage=usage_frame, runner=run)

    # -- text_completion ----------------------------------------------------------------------

    def _completion_frames(self) -> _Frames:
        head = f'data: {{"id":{_dumps(self.id)},"object":"text_completion","created":{self.created},"choices":'
        tail = f',"model":{_dumps(self.model)},"system_fingerprint":null'
        tail += ',"usage":null}\n\n' if self.include_usage else "}\n\n"
        indexes = range(self.choices)

        def each(text: str, finish: str = "null") -> bytes:
            return "".join(
                f'{head}[{{"text":{text},"index":{i},"logprobs":null,"finish_reason":{finish}}}]{tail}'
                for i in indexes
            ).encode()

        usage = _dumps(self.usage())
        return _Frames(
            role=b"",
            content=each(_dumps(self.token_text)),
            finish=each('""', _dumps(self.finish_reason)),
            usage=(
                f'{head}[],"model":{_dumps(self.model)},"system_fingerprint":null,'
                f'"usage":{usage}}}\n\n'
            ).encode(),
        )

    # -- the Responses API --------------------------------------------------------------------

    @property
    def _message_id(self) -> str:
        return "msg_" + self.id.removeprefix("resp_")

    @property
    def _incomplete(self) -> bool:
        return self.finish_reason == "length"

    def response_object(self, *, final: bool = True) -> dict[str, Any]:
        """The response object: in progress (no output) or final, as OpenAI returns it."""
        request = self.request or {}
        status = "in_progress"
        output: list[dict[str, Any]] = []
        usage: dict[str, Any] | None = None
        incomplete_details = None
        if final:
            status = "incomplete" if self._incomplete else "completed"
            if self._incomplete:
                incomplete_details = {"reason": "max_output_tokens"}
            output = [self._message_item(status, self.token_text * self.completion_tokens)]
            p, c = self.prompt_tokens, self.completion_tokens
            usage = {
                "input_tokens": p,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": c,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": p + c,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": incomplete_details,
            "instructions": request.get("instructions"),
            "max_output_tokens": request.get("max_output_tokens"),
            "max_tool_calls": request.get("max_tool_calls"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": request.get("parallel_tool_calls", True),
            "previous_response_id": request.get("previous_response_id"),
            "prompt_cache_key": request.get("prompt_cache_key"),
            "reasoning": request.get("reasoning") or {"effort": None, "summary": None},
            "safety_identifier": request.get("safety_identifier"),
            "service_tier": "default",
            "store": request.get("store", True) is not False,
            "temperature": request.get("temperature", 1.0),
            "text": request.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": request.get("tool_choice", "auto"),
            "tools": request.get("tools") or [],
            "top_logprobs": request.get("top_logprobs", 0),
            "top_p": request.get("top_p", 1.0),
            "truncation": request.get("truncation", "disabled"),
            "usage": usage,
            "user": request.get("user"),
            "metadata": request.get("metadata") or {},
        }

    def _message_item(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [self._text_part(text)]
        return {
            "id": self._message_id,
            "type": "message",
            "status": status,
            "content": content,
            "role": "assistant",
        }

    @staticmethod
    def _text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def _response_frames(self) -> _Frames:
        """Typed events (``event:`` lines, a ``sequence_number`` from 0); no ``[DONE]``."""

        def event(type_: str, number: int, **fields: Any) -> bytes:
            data = _dumps({"type": type_, **fields, "sequence_number": number})
            return f"event: {type_}\ndata: {data}\n\n".encode()

        item_id = self._message_id
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        started = self.response_object(final=False)
        role = b"".join(
            (
                event("response.created", 0, response=started),
                event("response.in_progress", 1, response=started),
                event(
                    "response.output_item.added",
                    2,
                    output_index=0,
                    item=self._message_item("in_progress", None),
                ),
                event("response.content_part.added", 3, **where, part=self._text_part("")),
            )
        )
        delta_type = "response.output_text.delta"
        delta_head = (
            f'event: {delta_type}\ndata: {{"type":"{delta_type}","item_id":{_dumps(item_id)},'
            f'"output_index":0,"content_index":0,"delta":{_dumps(self.token_text)},'
            f'"logprobs":[],"sequence_number":'
        ).encode()
        delta_tail = b"}\n\n"

        def run(start: int, count: int) -> bytes:
            # Each delta differs only in its sequence number, which follows the 4 opening events.
            first = 4 + start
            return b"".join(
                [b"%b%d%b" % (delta_head, n, delta_tail) for n in range(first, first + count)]
            )

        def error(sent: int) -> bytes:
            return event("error", 4 + sent, code="server_error", message=ERROR_STREAM, param=None)

        final = self.response_object()
        text = self.token_text * self.completion_tokens
        number = 4 + self.completion_tokens
        item_status = final["status"]
        finish = b"".join(
            (
                event("response.output_text.done", number, **where, text=text, logprobs=[]),
                event(
                    "response.content_part.done", number + 1, **where, part=self._text_part(text)
                ),
                event(
                    "response.output_item.done",
                    number + 2,
                    output_index=0,
                    item=self._message_item(item_status, text),
                ),
                event(f"response.{item_status}", number + 3, response=final),
            )
        )
        return _Frames(
            role=role,
            content=b"",
            finish=finish,
            done=b"",
            runner=run,
            error=error,
            final=_dumps(final).encode(),
        )


@dataclass(slots=True, frozen=True)
class _Frames:
    """The pre-encoded events of one stream.

    Chat and legacy completions repeat one ``content`` frame; a stream whose content frames
    differ (Responses API sequence numbers, tool-call argument pieces) has a ``runner`` that
    encodes frames ``start`` to ``start + count``.
    """

    role: bytes
    content: bytes
    finish: bytes
    usage: bytes = b""
    done: bytes = _DONE
    runner: Callable[[int, int], bytes] | None = None
    error: Callable[[int], bytes] | None = None
    final: bytes | None = None  # the finished response object, to store

    def run(self, start: int, count: int) -> bytes:
        """The content frames ``start`` to ``start + count`` (0-based), concatenated."""
        runner = self.runner
        if runner is None:
            return self.content * count
        return runner(start, count)

    def error_at(self, sent: int) -> bytes:
        """The mid-stream error event after ``sent`` content frames."""
        return _STREAM_ERROR_EVENT if self.error is None else self.error(sent)


class _Paced:
    """One stream's run of paced content chunks, stepped by a :class:`_Pacer`."""

    __slots__ = ("out", "frame", "remaining", "sent", "active", "done", "frames", "start")

    def __init__(
        self,
        out: _Out,
        frame: bytes,
        remaining: int,
        done: asyncio.Future[None],
        frames: _Frames | None = None,
        start: int = 0,
    ) -> None:
        self.out = out
        self.frame = frame  # the framed chunk, when every chunk is the same
        self.remaining = remaining
        self.sent = 0
        self.active = True
        self.done = done
        self.frames = frames  # else: frames.run(start + sent, 1), framed, chunk by chunk
        self.start = start

    def step(self) -> bool:
        """Send one chunk; return False (and wake the stream) when it must stop being paced."""
        out = self.out
        if not self.active:
            return False
        transport = out.transport
        if out.conn.closed.is_set() or out.conn.paused or transport.is_closing():
            self._finish()
            return False
        out.record.content_chunks_sent += 1
        frames = self.frames
        out.write(self.frame if frames is None else _chunk(frames.run(self.start + self.sent, 1)))
        self.sent += 1
        self.remaining -= 1
        if self.remaining <= 0:
            self._finish()
            return False
        return True

    def _finish(self) -> None:
        self.active = False
        if not self.done.done():
            self.done.set_result(None)


class _Pacer:
    """Send the paced content chunks of every stream that shares one inter-token delay.

    A stream is always re-queued at now + delay, so the queue stays sorted by due time and
    one FIFO with one timer serves every stream: a chunk costs a deque pop, a write and a
    push, not a task wake-up, a future and a timer handle of its own (a third of the CPU).
    """

    _SLACK = 0.0005  # seconds; chunks due this close together go out in one tick

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self._delay = delay
        self._queue: deque[tuple[float, _Paced]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def pace(
        self, out: _Out, frame: bytes, count: int, frames: _Frames | None = None, start: int = 0
    ) -> int:
        """Write ``frame`` up to ``count`` times, one per delay; return how many went out.

        With ``frames``, write its content frames from ``start`` instead, one per delay.
        Returns early when the peer leaves or the transport needs draining.
        """
        paced = _Paced(out, frame, count, self._loop.create_future(), frames, start)
        due = self._loop.time() + self._delay
        self._queue.append((due, paced))
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._tick)
        try:
            await paced.done
        finally:
            paced.active = False  # a cancelled stream must not be written to by later ticks
        return paced.sent

    def _tick(self) -> None:
        self._timer = None
        now = self._loop.time()
        horizon = now + self._SLACK
        next_due = now + self._delay
        queue = self._queue
        while queue and queue[0][0] <= horizon:
            _, paced = queue.popleft()
            if paced.step():
                queue.append((next_due, paced))
        if queue:
            self._timer = self._loop.call_at(queue[0][0], self._tick)


class FakeUpstream:
    """A fake OpenAI server; see the module docstring for its behaviour."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: int = 16,
        token_text: str = "tok ",
        inter_token_delay: float = 0.0,
        ttft: float = 0.0,
        prompt_tokens: int | None = None,
        fault: Fault | None = None,
        fault_after_tokens: int = 3,
        retry_after: float = 1.0,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        rate_limit_headers: bool = True,
        fault_schedule: list[Fault | None] | None = None,
        models: tuple[str, ...] = DEFAULT_MODELS,
        max_records: int | None = 100_000,
        auto_tool_calls: bool = False,
        embedding_dimensions: int = 8,
        max_stored_responses: int = 10_000,
    ) -> None:
        _check_fault(fault)
        self.host = host
        self.port = port
        self.tokens = tokens
        self.token_text = token_text
        self.inter_token_delay = inter_token_delay
        self.ttft = ttft
        self.prompt_tokens = prompt_tokens
        self.fault: Fault | None = fault
        self.fault_after_tokens = fault_after_tokens
        self.retry_after = retry_after
        self.rpm_limit = rpm_limit
        self.tpm_limit = tpm_limit
        self.rate_limit_headers = rate_limit_headers
        self.fault_schedule = fault_schedule
        self.models = models
        self.auto_tool_calls = auto_tool_calls
        self.embedding_dimensions = embedding_dimensions
        self.max_stored_responses = max_stored_responses
        # Keep at most this many records (the oldest half is dropped past it); 0 keeps none.
        self.max_records = max_records

        self.requests: list[UpstreamRequest] = []
        self.open_connections = 0
        self.total_connections = 0
        self.rejected_429 = 0

        self._records_lock = threading.Lock()
        self._rpm_window: deque[float] = deque()  # admission times
        self._tpm_window: deque[tuple[float, int]] = deque()  # (admission time, tokens)
        self._tpm_used = 0  # the tokens in _tpm_window
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._connection_tasks: set[asyncio.Task[None]] = set()
        self._pacers: dict[float, _Pacer] = {}
        self._responses: dict[str, bytes] = {}  # stored responses by id, oldest first

    @property
    def fault_schedule(self) -> list[Fault | None] | None:
        return self._fault_schedule

    @fault_schedule.setter
    def fault_schedule(self, schedule: list[Fault | None] | None) -> None:
        """Use ``schedule`` from its first entry on (None: ``fault`` again)."""
        if schedule is not None:
            if not schedule:
                raise ValueError("an empty fault_schedule; use None for no schedule")
            for fault in schedule:
                _check_fault(fault)
            schedule = list(schedule)
        self._fault_schedule = schedule
        self._schedule_index = 0

    def _next_fault(self) -> Fault | None:
        """The fault of the next admitted model request: the schedule's next entry, else ``fault``."""
        schedule = self._fault_schedule
        if schedule is None:
            return self.fault
        index = self._schedule_index
        self._schedule_index = index + 1
        return schedule[index % len(schedule)]

    # -- running -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        """Listen on ``host:port`` (port 0 picks a free one and updates ``port``)."""
        self._pacers = {}
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=4096
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, drop every connection and wait for their handlers to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._connections):
            conn.transport.abort()
        # An aborted connection ends its handler by itself (connection_lost ends its queue and
        # wakes its writes); cancelling is only the fallback.
        tasks = list(self._connection_tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[Self]:
        """Run the server on its own event loop in a daemon thread for the ``with`` block."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fake-upstream", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout=10)
            yield self
        finally:
            try:
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
                if not thread.is_alive():
                    loop.close()

    # -- observing -----------------------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], object], timeout: float = 5.0) -> bool:
        """Block polling ``predicate``; for tests whose own thread is not the server's loop."""
        return wait_until(predicate, timeout)

    async def await_until(
        self,
        predicate: Callable[[], object],
        timeout: float = 5.0,  # noqa: ASYNC109 - mirrors wait_until
    ) -> bool:
        """Poll ``predicate`` from an event loop without blocking it."""
        return await await_until(predicate, timeout)

    @property
    def last_request(self) -> UpstreamRequest:
        return self.requests[-1]

    def clear_requests(self) -> None:
        """Forget the records so far (counters are kept)."""
        with self._records_lock:
            self.requests = []

    def reset_rate_limit(self) -> None:
        """Start the windows of `rpm_limit` and `tpm_limit` afresh and zero `rejected_429`."""
        with self._records_lock:
            self._rpm_window.clear()
            self._tpm_window.clear()
            self._tpm_used = 0
            self.rejected_429 = 0

    def _remember(self, record: UpstreamRequest) -> None:
        limit = self.max_records
        if limit == 0:
            return
        with self._records_lock:
            if limit is not None and len(self.requests) >= limit:
                self.requests = self.requests[len(self.requests) // 2 :]
            self.requests.append(record)

    # -- connections ---------------------------------------------------------------------------

    async def _serve(self, conn: _Connection) -> None:
        """Answer the requests of one connection in turn until either side closes it."""
        self._connections.add(conn)
        self.open_connections += 1
        self.total_connections += 1
        try:
            while True:
                item = await conn.queue.get()
                if item is None:
                    break
                if isinstance(item, _BadRequest):
                    self._write_bad_request(conn, item)
                    break
                await self._respond(conn, item)
                if conn.closed.is_set() or not conn.next_cycle():
                    break
        except ConnectionError:
            conn.mark_peer_closed()
        finally:
            self.open_connections -= 1
            self._connections.discard(conn)
            if conn.task is not None:
                self._connection_tasks.discard(conn.task)
            if not conn.closed.is_set():
                conn.closed.set()
                record = conn.record
                if record is not None and record.closed_at is None:
                    record.closed_at = time.monotonic()
                conn.transport.close()

    # -- responses -----------------------------------------------------------------------------

    async def _respond(self, conn: _Connection, request: _Parsed) -> bool:
        """Answer one request; return whether the connection may carry another."""
        body: Any = None
        body_error = False
        if request.raw_body:
            try:
                body = json.loads(request.raw_body)
            except ValueError:
                body_error = True
        record = UpstreamRequest(
            method=request.method,
            path=request.path,
            headers=request.headers,
            body=body,
            started_at=time.monotonic(),
        )
        conn.record = record
        self._remember(record)
        out = _Out(conn, record)
        keep_alive = request.keep_alive
        try:
            route = request.path.removeprefix("/v1")
            kind = _GENERATIONS.get(route)
            if kind is not None:
                if request.method != "POST":
                    return self._write_error(out, 405, "Method not allowed.", keep_alive)
                if body_error or not isinstance(body, dict):
                    return self._write_error(out, 400, ERROR_JSON, keep_alive)
                if kind == "embedding":
                    return await self._embeddings(out, body, keep_alive)
                return await self._generate(out, body, keep_alive, kind)
            if route.startswith("/responses/"):
                rest = route.removeprefix("/responses/")
                return self._stored_response(out, request.method, rest, keep_alive)
            if route == "/models" or route.startswith("/models/"):
                if request.method != "GET":
                    return self._write_error(out, 405, "Method not allowed.", keep_alive)
                return self._write_models(out, route.removeprefix("/models").strip("/"), keep_alive)
            message = ERROR_NOT_FOUND.format(method=request.method, path=request.path)
            return self._write_error(out, 404, message, keep_alive)
        finally:
            record.finished_at = time.monotonic()

    def _write_json(
        self,
        out: _Out,
        status: int,
        payload: bytes,
        keep_alive: bool,
        extra_headers: bytes = b"",
    ) -> bool:
        out.record.completed = True
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
            *_header_list(extra_headers),
        ]
        out.write(out.head(status, headers, keep_alive) + out.data(payload) + out.end())
        return keep_alive

    def _write_error(
        self,
        out: _Out,
        status: int,
        message: str,
        keep_alive: bool,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        extra_headers: bytes = b"",
    ) -> bool:
        body = _error_body(message, type_, param, code)
        return self._write_json(out, status, body, keep_alive, extra_headers)

    def _write_bad_request(self, conn: _Connection, bad: _BadRequest) -> None:
        record = UpstreamRequest(
            method="", path="", headers={}, body=None, started_at=time.monotonic()
        )
        conn.record = record
        self._remember(record)
        if conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # h11 lets a server answer
            self._write_error(_Out(conn, record), bad.status, bad.message, False)
        record.finished_at = time.monotonic()

    def _write_models(self, out: _Out, model_id: str, keep_alive: bool) -> bool:
        def entry(name: str) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": 1_700_000_000,
                "owned_by": "fake-upstream",
            }

        if not model_id:
            payload = {"object": "list", "data": [entry(name) for name in self.models]}
            return self._write_json(out, 200, _dumps(payload).encode(), keep_alive)
        if model_id in self.models:
            return self._write_json(out, 200, _dumps(entry(model_id)).encode(), keep_alive)
        message = ERROR_MODEL_NOT_FOUND.format(model=model_id)
        return self._write_error(
            out, 404, message, keep_alive, param="model", code="model_not_found"
        )

    def _admit(self, tokens: int) -> tuple[str | None, float, bytes]:
        """Count one model request costing ``tokens`` against ``rpm_limit`` and ``tpm_limit``.

        Return the limit that refused it ("requests", "tokens") or None, the seconds until it
        would fit, and the ``x-ratelimit-*`` headers of its answer.
        """
        rpm, tpm = self.rpm_limit, self.tpm_limit
        if rpm is None and tpm is None:
            return None, 0.0, b""
        now = time.monotonic()
        horizon = now - RPM_WINDOW
        requests = self._rpm_window
        while requests and requests[0] <= horizon:
            requests.popleft()
        spent = self._tpm_window
        while spent and spent[0][0] <= horizon:
            self._tpm_used -= spent.popleft()[1]
        refused: str | None = None
        retry = 0.0
        if rpm is not None and len(requests) >= rpm:
            refused = "requests"
            retry = requests[0] + RPM_WINDOW - now if requests else RPM_WINDOW
        elif tpm is not None and self._tpm_used + tokens > tpm:
            refused = "tokens"
            retry = self._tokens_fit_in(tokens, tpm, now)
        else:
            if rpm is not None:
                requests.append(now)
            if tpm is not None:
                spent.append((now, tokens))
                self._tpm_used += tokens
        headers = self._limit_headers(now) if self.rate_limit_headers else b""
        return refused, retry, headers

    def _tokens_fit_in(self, tokens: int, limit: int, now: float) -> float:
        """Seconds until ``tokens`` more fit in the token window (a full window if never)."""
        if tokens > limit:
            return RPM_WINDOW
        excess = self._tpm_used + tokens - limit
        for admitted_at, cost in self._tpm_window:
            excess -= cost
            if excess <= 0:
                return admitted_at + RPM_WINDOW - now
        return RPM_WINDOW  # unreachable: the window holds the tokens counted in _tpm_used

    def _limit_headers(self, now: float) -> bytes:
        """OpenAI's ``x-ratelimit-*`` headers for the limits set, as the windows stand."""
        headers = b""
        rpm, tpm = self.rpm_limit, self.tpm_limit
        if rpm is not None:
            requests = self._rpm_window
            reset = requests[0] + RPM_WINDOW - now if requests else 0.0
            headers += self._requests_headers(rpm, max(0, rpm - len(requests)), reset)
        if tpm is not None:
            spent = self._tpm_window
            reset = spent[0][0] + RPM_WINDOW - now if spent else 0.0
            headers += (
                f"x-ratelimit-limit-tokens: {tpm}\r\n"
                f"x-ratelimit-remaining-tokens: {max(0, tpm - self._tpm_used)}\r\n"
                f"x-ratelimit-reset-tokens: {_reset_text(reset)}\r\n"
            ).encode()
        return headers

    @staticmethod
    def _requests_headers(limit: int, remaining: int, reset: float) -> bytes:
        return (
            f"x-ratelimit-limit-requests: {limit}\r\n"
            f"x-ratelimit-remaining-requests: {remaining}\r\n"
            f"x-ratelimit-reset-requests: {_reset_text(reset)}\r\n"
        ).encode()

    @staticmethod
    def _retry_headers(retry_after: float) -> bytes:
        retry_after = max(retry_after, 0.001)
        return (
            f"retry-after: {math.ceil(retry_after)}\r\n"
            f"retry-after-ms: {round(retry_after * 1000)}\r\n"
        ).encode()

    def _refuse(
        self,
        out: _Out,
        refused: str,
        retry: float,
        tokens: int,
        limit_headers: bytes,
        keep_alive: bool,
    ) -> bool:
        """Answer 429 for a request past ``rpm_limit`` or ``tpm_limit``."""
        self.rejected_429 += 1
        if refused == "tokens":
            message = ERROR_429_TOKENS.format(
                limit=self.tpm_limit,
                used=self._tpm_used,
                requested=tokens,
                retry=_reset_text(retry),
            )
        else:
            message = ERROR_429
        return self._write_error(
            out,
            429,
            message,
            keep_alive,
            type_=refused,
            code="rate_limit_exceeded",
            extra_headers=self._retry_headers(retry) + limit_headers,
        )

    async def _generate(self, out: _Out, body: dict[str, Any], keep_alive: bool, kind: str) -> bool:
        """Answer a chat completion, a legacy completion or a response (``kind``)."""
        record = out.record
        record.stream = body.get("stream") is True
        tokens = max(self.tokens, 0)
        if kind == "response":
            cap = body.get("max_output_tokens")
        else:
            cap = body.get("max_completion_tokens") if kind == "chat" else None
            if cap is None:
                cap = body.get("max_tokens")
        capped = isinstance(cap, int) and 0 <= cap < tokens
        completion_tokens = cast(int, cap) if capped else tokens
        n = body.get("n") if kind != "response" else 1
        choices = n if isinstance(n, int) and n > 0 else 1
        if kind == "completion":
            choices *= _prompt_count(body.get("prompt"))
            prompt_tokens = completion_prompt_tokens_for(body, self.prompt_tokens)
        elif kind == "response":
            prompt_tokens = input_tokens_for(body, self.prompt_tokens)
        else:
            prompt_tokens = prompt_tokens_for(body, self.prompt_tokens)
        cost = prompt_tokens + completion_tokens * choices
        refused, retry, limit_headers = self._admit(cost)
        if refused is not None:
            return self._refuse(out, refused, retry, cost, limit_headers, keep_alive)
        fault = self._next_fault()
        record.fault = fault
        if fault in _STATUS_FAULTS:
            return self._write_status_fault(out, fault, keep_alive, limit_headers)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._write_error(
                out, 400, ERROR_MODEL, keep_alive, param="model", extra_headers=limit_headers
            )

        serial = f"{self._id_prefix}{next(self._ids):08d}"
        finish_reason = "length" if capped else "stop"
        tool = None
        if kind == "chat" and fault != "endless":
            tool = self._tool_call_for(body, completion_tokens, serial)
            if tool is not None:
                completion_tokens = len(tool.pieces)
                finish_reason = "tool_calls"
        stream_options = body.get("stream_options")
        prefix = {"chat": "chatcmpl-", "completion": "cmpl-", "response": "resp_"}[kind]
        plan = _Plan(
            id=prefix + serial,
            created=int(time.time()),
            model=model,
            stream=record.stream,
            include_usage=kind != "response"
            and isinstance(stream_options, dict)
            and stream_options.get("include_usage") is True,
            obfuscation=not (
                isinstance(stream_options, dict)
                and stream_options.get("include_obfuscation") is False
            ),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
            token_text=self.token_text,
            ttft=self.ttft,
            delay=self.inter_token_delay,
            fault=fault,
            fault_after=max(self.fault_after_tokens, 0),
            keep_alive=keep_alive,
            extra_headers=limit_headers,
            kind=kind,
            choices=choices,
            tool=tool,
            request=body if kind == "response" else None,
            store=kind == "response" and body.get("store") is not False,
        )
        if plan.stream:
            await self._stream(out, plan)
        else:
            await self._complete(out, plan)
        return plan.keep_alive and not out.conn.closed.is_set()

    def _tool_call_for(self, body: dict[str, Any], tokens: int, serial: str) -> _ToolCall | None:
        """The function a chat request with ``tools`` calls, or None when it answers text.

        A named ``tool_choice`` calls that function and "required" the first one, always, as
        OpenAI must; "auto" (or none given) calls the first one only when ``auto_tool_calls``
        is on and the last message is not a tool result; "none" never calls.
        """
        functions = [
            tool["function"]
            for tool in body.get("tools") or ()
            if isinstance(tool, dict)
            and tool.get("type") == "function"
            and isinstance(tool.get("function"), dict)
            and isinstance(tool["function"].get("name"), str)
        ]
        if not functions:
            return None
        choice = body.get("tool_choice")
        function: dict[str, Any] | None = None
        if isinstance(choice, dict):
            named = choice.get("function")
            name = named.get("name") if isinstance(named, dict) else None
            function = next((f for f in functions if f["name"] == name), None)
        elif choice == "required":
            function = functions[0]
        elif choice in (None, "auto") and self.auto_tool_calls:
            messages = body.get("messages")
            last = messages[-1] if isinstance(messages, list) and messages else None
            if not (isinstance(last, dict) and last.get("role") in ("tool", "function")):
                function = functions[0]
        if function is None:
            return None
        arguments = _dumps(_arguments_for(function.get("parameters")))
        # The arguments arrive in at most ``tokens`` pieces, at least one.
        count = max(1, min(tokens, len(arguments)))
        size = -(-len(arguments) // count)
        pieces = tuple(arguments[i : i + size] for i in range(0, len(arguments), size))
        return _ToolCall(
            id=f"call_{serial}", name=function["name"], arguments=arguments, pieces=pieces
        )

    async def _embeddings(self, out: _Out, body: dict[str, Any], keep_alive: bool) -> bool:
        """Answer one embedding per input: deterministic unit vectors of ``dimensions`` floats."""
        items = _embedding_inputs(body.get("input"))
        if items is None:
            return self._write_error(out, 400, ERROR_INPUT, keep_alive, param="input")
        prompt_tokens = self.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = sum(
                len(item) if isinstance(item, list) else max(1, len(item) // 4) for item in items
            )
        refused, retry, limit_headers = self._admit(prompt_tokens)
        if refused is not None:
            return self._refuse(out, refused, retry, prompt_tokens, limit_headers, keep_alive)
        fault = self._next_fault()
        out.record.fault = fault
        if fault in _STATUS_FAULTS:
            return self._write_status_fault(out, fault, keep_alive, limit_headers)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._write_error(
                out, 400, ERROR_MODEL, keep_alive, param="model", extra_headers=limit_headers
            )
        dimensions = body.get("dimensions")
        if not isinstance(dimensions, int) or dimensions <= 0:
            dimensions = self.embedding_dimensions
        conn = out.conn
        if fault in ("stall", "endless"):
            await conn.closed.wait()
            return False
        if fault == "cut":
            conn.close_by_server()
            return False
        if fault == "error_frame":
            return self._write_error(
                out,
                500,
                ERROR_STREAM,
                keep_alive,
                type_="server_error",
                extra_headers=limit_headers,
            )
        if await self._closed_within(conn, self.ttft):
            return False
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(items):
            vector = _embedding_of(item, dimensions)
            embedding: Any = vector
            if as_base64:
                embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        payload = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        headers = b"x-request-id: req_%s%08d\r\nopenai-processing-ms: 1\r\n%s" % (
            self._id_prefix.encode(),
            next(self._ids),
            limit_headers,
        )
        return self._write_json(out, 200, _dumps(payload).encode(), keep_alive, headers)

    # -- stored responses ----------------------------------------------------------------------

    def _store_response(self, response_id: str, payload: bytes) -> None:
        stored = self._responses
        stored[response_id] = payload
        if len(stored) > self.max_stored_responses:
            del stored[next(iter(stored))]

    @property
    def stored_responses(self) -> dict[str, Any]:
        """The responses kept for ``GET /v1/responses/{id}``, by id, decoded."""
        return {key: json.loads(value) for key, value in list(self._responses.items())}

    def _stored_response(self, out: _Out, method: str, rest: str, keep_alive: bool) -> bool:
        """GET, DELETE ``/responses/{id}`` or POST ``/responses/{id}/cancel``."""
        response_id, _, action = rest.partition("/")
        allowed = {"": ("GET", "DELETE"), "cancel": ("POST",)}.get(action)
        if allowed is None:
            message = ERROR_NOT_FOUND.format(method=method, path=out.record.path)
            return self._write_error(out, 404, message, keep_alive)
        if method not in allowed:
            return self._write_error(out, 405, "Method not allowed.", keep_alive)
        payload = self._responses.get(response_id)
        if payload is None:
            message = ERROR_RESPONSE_NOT_FOUND.format(id=response_id)
            return self._write_error(out, 404, message, keep_alive)
        if action == "cancel":
            return self._write_error(out, 400, ERROR_CANCEL, keep_alive)
        if method == "DELETE":
            del self._responses[response_id]
            deleted = {"id": response_id, "object": "response.deleted", "deleted": True}
            return self._write_json(out, 200, _dumps(deleted).encode(), keep_alive)
        return self._write_json(out, 200, payload, keep_alive)

    def _write_status_fault(
        self, out: _Out, fault: str, keep_alive: bool, limit_headers: bytes
    ) -> bool:
        if fault == "429":
            self.rejected_429 += 1
            if not limit_headers and self.rate_limit_headers:
                # No limit is set: advertise a nominal one, spent until the retry-after.
                limit_headers = self._requests_headers(60, 0, self.retry_after)
            return self._write_error(
                out,
                429,
                ERROR_429,
                keep_alive,
                type_="requests",
                code="rate_limit_exceeded",
                extra_headers=self._retry_headers(self.retry_after) + limit_headers,
            )
        if fault == "500":
            return self._write_error(
                out, 500, ERROR_500, keep_alive, type_="server_error", extra_headers=limit_headers
            )
        if fault == "401":
            return self._write_error(
                out, 401, ERROR_401, keep_alive, code="invalid_api_key", extra_headers=limit_headers
            )
        return self._write_error(
            out, 400, ERROR_400, keep_alive, param="messages", extra_headers=limit_headers
        )

    @staticmethod
    def _response_headers(plan: _Plan) -> bytes:
        """Return the headers every completion carries, bar framing and ``connection``."""
        return b"x-request-id: req_%s\r\nopenai-processing-ms: 1\r\n%s" % (
            plan.id.encode(),
            plan.extra_headers,
        )

    def _stream_head(
        self, out: _Out, plan: _Plan, framing: tuple[Header, ...] = _STREAM_HEADERS
    ) -> bytes:
        headers = [*framing, *_header_list(self._response_headers(plan))]
        return out.head(200, headers, plan.keep_alive)

    def _pacer(self, delay: float) -> _Pacer:
        pacer = self._pacers.get(delay)
        if pacer is None:
            pacer = self._pacers[delay] = _Pacer(asyncio.get_running_loop(), delay)
        return pacer

    @staticmethod
    async def _closed_within(conn: _Connection, seconds: float) -> bool:
        """Wait ``seconds``; return early, True, if the peer leaves first."""
        if seconds <= 0:
            return conn.closed.is_set()
        try:
            async with asyncio.timeout(seconds):
                await conn.closed.wait()
        except TimeoutError:
            return False
        return True

    async def _stream(self, out: _Out, plan: _Plan) -> None:
        conn, record = out.conn, out.record
        closed = conn.closed
        record.status = 200
        frames = plan.frames()
        content = frames.content
        head = self._stream_head(out, plan)
        if plan.ttft > 0:
            out.write(head)
            head = b""
            if await self._closed_within(conn, plan.ttft):
                return

        if plan.fault == "endless":
            out.write_events(head, frames.role)
            constant = frames.runner is None
            burst = _chunk(content * _BATCH)
            while not closed.is_set():
                if not constant:
                    burst = _chunk(frames.run(record.content_chunks_sent, _BATCH))
                record.content_chunks_sent += _BATCH
                out.write(burst)
                await out.drain_or_yield()
            return

        wanted = plan.completion_tokens
        if plan.fault in _MID_STREAM_FAULTS:
            wanted = min(wanted, plan.fault_after)
        events = frames.role
        varied = None if frames.runner is None else frames
        if plan.delay > 0:
            # The pacer writes this framed chunk, or (varied) frames it from ``frames``.
            framed_content = _chunk(content) if varied is None else b""
            sent = 1 if wanted > 0 else 0
            record.content_chunks_sent = sent
            out.write_events(head, events + frames.run(0, sent))
            head = events = b""
            pacer = self._pacer(plan.delay)
            while sent < wanted:
                sent += await pacer.pace(out, framed_content, wanted - sent, varied, sent)
                if closed.is_set():
                    return
                await out.drain()
        else:
            sent = 0
            while wanted - sent > _BATCH:
                batch = frames.run(sent, _BATCH)
                sent += _BATCH
                record.content_chunks_sent = sent
                out.write_events(head, events + batch)
                head = events = b""
                await out.drain_or_yield()
                if closed.is_set():
                    return
            events += frames.run(sent, wanted - sent)
            record.content_chunks_sent = wanted

        if plan.fault == "stall":
            out.write_events(head, events)
            await closed.wait()
        elif plan.fault == "cut":
            out.write_events(head, events)
            conn.close_by_server()
        elif plan.fault == "error_frame":
            out.write_events(head, events + frames.error_at(wanted), end=True)
        else:
            events += frames.finish
            if plan.include_usage:
                events += frames.usage
            record.completed = True
            if plan.store and frames.final is not None:
                self._store_response(plan.id, frames.final)
            out.write_events(head, events + frames.done, end=True)

    async def _complete(self, out: _Out, plan: _Plan) -> None:
        conn, record = out.conn, out.record
        fault = plan.fault
        if fault == "stall":
            await conn.closed.wait()
            return
        if fault == "cut":
            conn.close_by_server()
            return
        if fault == "error_frame":
            self._write_error(
                out,
                500,
                ERROR_STREAM,
                plan.keep_alive,
                type_="server_error",
                extra_headers=plan.extra_headers,
            )
            return
        if fault == "endless":
            await self._complete_endlessly(out, plan)
            return
        thinking = plan.ttft + plan.delay * max(plan.completion_tokens - 1, 0)
        if await self._closed_within(conn, thinking):
            return
        payload = _dumps(plan.payload()).encode()
        record.content_chunks_sent = plan.completion_tokens
        if plan.store:
            self._store_response(plan.id, payload)
        headers = self._response_headers(plan)
        self._write_json(out, 200, payload, plan.keep_alive, headers)

    async def _complete_endlessly(self, out: _Out, plan: _Plan) -> None:
        """Send an answer whose content never ends (back-pressure without SSE)."""
        record = out.record
        record.status = 200
        prefix = plan.endless_prefix()
        head = self._stream_head(out, plan, _JSON_STREAM_HEADERS)
        out.write(head + _chunk(prefix))
        burst = _chunk(json.dumps(plan.token_text)[1:-1].encode() * _BATCH)
        while not out.conn.closed.is_set():
            record.content_chunks_sent += _BATCH
            out.write(burst)
            await out.drain_or_yield()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.fake_upstream",
        description="Serve a fake OpenAI-compatible upstream until SIGINT or SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9100, help="port to bind; 0 picks a free one")
    parser.add_argument("--tokens", type=int, default=16, help="content tokens per completion")
    parser.add_argument("--token-text", default="tok ", help="text of each content delta")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="milliseconds between tokens")
    parser.add_argument(
        "--ttft-ms", type=float, default=0.0, help="milliseconds before the first chunk"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=None, help="fixed prompt tokens to report"
    )
    parser.add_argument(
        "--fault", choices=FAULTS, default=None, help="misbehave this way on every request"
    )
    parser.add_argument(
        "--fault-after-tokens",
        type=int,
        default=3,
        help="content chunks before stall/cut/error_frame",
    )
    parser.add_argument(
        "--retry-after", type=float, default=1.0, help="seconds advertised by fault 429"
    )
    parser.add_argument(
        "--rpm-limit", type=int, default=None, help="requests per minute before answering 429"
    )
    parser.add_argument(
        "--tpm-limit", type=int, default=None, help="tokens per minute before answering 429"
    )
    parser.add_argument(
        "--no-rate-limit-headers",
        dest="rate_limit_headers",
        action="store_false",
        help="send no x-ratelimit-* headers (as vLLM): limits show only as 429s",
    )
    parser.add_argument(
        "--fault-schedule",
        type=_fault_schedule,
        default=None,
        metavar="F1,F2,...",
        help="faults used in turn, one per admitted request, 'none' for a normal answer "
        "(e.g. 429,none); overrides --fault",
    )
    parser.add_argument(
        "--record", action="store_true", help="keep per-request records (off: saves memory)"
    )
    parser.add_argument(
        "--auto-tool-calls",
        action="store_true",
        help="answer a chat request with tools and tool_choice auto with a tool call",
    )
    parser.add_argument(
        "--embedding-dimensions",
        type=int,
        default=8,
        help="floats per embedding when the request gives no dimensions (default 8)",
    )
    return parser


def _fault_schedule(text: str) -> list[Fault | None]:
    schedule: list[Fault | None] = []
    for item in text.split(","):
        item = item.strip()
        if item.lower() == "none":
            schedule.append(None)
        elif item in FAULTS:
            schedule.append(item)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown fault {item!r}; expected 'none' or one of {FAULTS}"
            )
    return schedule


async def _serve(args: argparse.Namespace) -> None:
    upstream = FakeUpstream(
        host=args.host,
        port=args.port,
        tokens=args.tokens,
        token_text=args.token_text,
        inter_token_delay=args.delay_ms / 1000,
        ttft=args.ttft_ms / 1000,
        prompt_tokens=args.prompt_tokens,
        fault=args.fault,
        fault_after_tokens=args.fault_after_tokens,
        retry_after=args.retry_after,
        rpm_limit=args.rpm_limit,
        tpm_limit=args.tpm_limit,
        rate_limit_headers=args.rate_limit_headers,
        fault_schedule=args.fault_schedule,
        max_records=None if args.record else 0,
        auto_tool_calls=args.auto_tool_calls,
        embedding_dimensions=args.embedding_dimensions,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await upstream.start()
    try:
        print(upstream.base_url, flush=True)
        await stop.wait()
    finally:
        await upstream.stop()


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
