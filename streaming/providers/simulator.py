"""The built-in simulator: a deterministic, paced, fault-injecting stand-in for an LLM upstream.

It is the embedded default, so the gateway runs and demos with no upstream account, and it is what
load tests and fault drills point at. It serves every endpoint (`streaming.endpoints`): it builds
the events a real OpenAI upstream sends, in OpenAI's order and shapes, and passes each through
`request.endpoint.chunk()`, so its answers are read exactly as a real upstream's are.

- Chat completions: `n` choices (their deltas interleaved); a tool call when the request offers
  function tools (`tool_choice` not "none") and its last message is not a tool result, with
  arguments filled from the tool's JSON schema; a JSON object for `response_format` json_object or
  json_schema.
- Responses: the full event sequence (`response.created` ... `response.completed`, or
  `response.incomplete` at `max_output_tokens`), a `function_call` item for function tools, and
  the final response kept in Django's cache (shared by every worker when it is Redis) for
  `GET`/`DELETE /responses/{id}` unless `store` is false.
- Legacy completions: `text_completion` chunks, `n` choices per prompt, `echo`, OpenAI's default
  of 16 tokens.
- Embeddings: one unit vector per input, deterministic per input (from its sha256), `dimensions`
  and `encoding_format: "base64"` honoured.

Pacing comes from the route's options, overridable per request with headers (the gateway passes
`x-simulator-*` headers only to this provider):

- `x-simulator-tokens`: completion length in tokens (capped by the request's max tokens)
- `x-simulator-tps`: tokens per second (0 = as fast as possible)
- `x-simulator-ttft-ms`: time to the first token (embeddings wait it once, and are not paced)
- `x-simulator-fault`: `429` | `500` | `stall` | `cut` | `error`, after `x-simulator-fault-after`
  tokens for the mid-stream ones (default 3). `429` honours `x-simulator-retry-after` (seconds).
  `error` sends the endpoint's own error event (which its `chunk()` raises as `UpstreamError`).
  Embeddings meet only `429` and `500`.
- `x-simulator-fault-attempts`: how many of the call's attempts meet the fault (default: all), so
  `x-simulator-fault: 429` with `x-simulator-fault-attempts: 1` shows the gateway's retry answering.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import orjson
from django.conf import settings
from django.core.cache import cache

from streaming.catalog import Deployment
from streaming.providers.base import ProviderChunk, ProviderRequest, UpstreamError
from streaming.tokens import count_text_tokens, encoding_name_for_model, get_encoding

_WORDS = (
    "The gateway streams each token as soon as it arrives, keeps memory bounded when a client "
    "reads slowly, bills exactly what was produced, and tells every caller when to come back. "
    "This answer comes from the built-in simulator, so no upstream account is needed to try it."
).split(" ")
FAULTS = frozenset({"429", "500", "stall", "cut", "error"})
_MID_STREAM_FAULTS = frozenset({"stall", "cut", "error"})
# Without pacing, hand the event loop back every this many tokens so one stream cannot starve others.
_YIELD_EVERY = 16
# Where each choice of a multi-choice answer starts in `_WORDS`, so the choices differ.
_CHOICE_WORD_OFFSET = 7

ERROR_EVENT_MESSAGE = "Simulated upstream error event mid-stream."
NOT_FOUND = "No response found with id '{response_id}'."
NOT_CANCELLABLE = "Only responses created with background=true can be cancelled."
STORE_KEY_PREFIX = "simulator:response:"
STORE_TIMEOUT = 24 * 60 * 60  # seconds
# OpenAI's defaults: legacy completions stop at 16 tokens; embeddings of text-embedding-3-small.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
EMBEDDING_DEFAULT_DIMENSIONS = 1536
# The most words of a json_object answer's text (it is built whole, unlike a text answer).
_JSON_ANSWER_MAX_WORDS = 4096
# Embedding more inputs than this in one request is done in a worker thread.
_EMBED_INLINE_INPUTS = 16


def _option(request: ProviderRequest, header: str, route_key: str, default: float) -> float:
    """The header's value if it is a finite number (at least 0), else the route's option, else *default*.

    `inf` and `nan` parse as floats but are no length or delay: `int(inf)` crashed the stream.
    """
    raw = request.simulator.get(header)
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value)
    return float(request.deployment.options.get(route_key, default))


def simulated_text(token_index: int, *, choice: int = 0) -> str:
    """The simulator's token `token_index` of choice `choice` (choice 0 starts at the first word)."""
    word = _WORDS[(token_index + choice * _CHOICE_WORD_OFFSET) % len(_WORDS)]
    return word if token_index == 0 else " " + word


# --- Pacing and faults, shared by every endpoint ------------------------------------------


class _MidStreamError(Exception):
    """The `error` fault's moment: the stream sends its endpoint's error event."""


@dataclass(frozen=True, slots=True)
class _Options:
    tokens: int  # the answer's length when nothing caps it
    tokens_per_second: float
    ttft: float  # seconds
    fault: str | None
    fault_after: int

    @classmethod
    def of(cls, request: ProviderRequest) -> _Options:
        fault = request.simulator.get("fault")
        if fault is not None and request.attempt > _option(request, "fault-attempts", "fault_attempts", math.inf):
            fault = None
        return cls(
            tokens=int(_option(request, "tokens", "completion_tokens", settings.SIMULATOR_COMPLETION_TOKENS)),
            tokens_per_second=_option(request, "tps", "tokens_per_second", settings.SIMULATOR_TOKENS_PER_SECOND),
            ttft=_option(request, "ttft-ms", "ttft_ms", settings.SIMULATOR_TTFT_SECONDS * 1000) / 1000,
            fault=fault,
            fault_after=int(_option(request, "fault-after", "fault_after", 3)),
        )

    def raise_request_fault(self, request: ProviderRequest) -> None:
        """The faults that refuse the request before any answer (429, 500)."""
        if self.fault == "429":
            retry_after = _option(request, "retry-after", "retry_after", 1.0)
            raise UpstreamError(
                "rate_limited",
                "Simulated upstream rate limit.",
                status=429,
                retry_after=retry_after,
                headers={"retry-after": f"{retry_after:g}"},
            )
        if self.fault == "500":
            raise UpstreamError("server_error", "Simulated upstream server error.", status=500)


class _Pacer:
    """The first-token delay, then one token every 1/tps seconds on an absolute schedule (so
    sleep overshoot does not accumulate), and the mid-stream faults at token `fault_after`."""

    def __init__(self, options: _Options) -> None:
        self._options = options
        self._interval = 1.0 / options.tokens_per_second if options.tokens_per_second > 0 else 0.0
        self._start = 0.0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._start = loop.time()
        if self._options.ttft > 0:
            await asyncio.sleep(self._options.ttft)

    async def tick(self, index: int) -> None:
        """Wait for token `index`'s turn; meet the mid-stream fault if it is due."""
        options = self._options
        if options.fault in _MID_STREAM_FAULTS and index == options.fault_after:
            if options.fault == "stall":
                await asyncio.Event().wait()  # until the gateway's idle timeout cancels us
            if options.fault == "cut":
                raise UpstreamError("connection", "Simulated upstream connection lost mid-stream.")
            raise _MidStreamError
        if self._interval:
            loop = asyncio.get_running_loop()
            delay = self._start + options.ttft + index * self._interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        elif index % _YIELD_EVERY == 0:
            await asyncio.sleep(0)


# --- What is answered: text, a JSON object or a tool call ----------------------------------

ChatFinish = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class _ToolCall:
    name: str
    call_id: str


@dataclass(frozen=True, slots=True)
class _Answer:
    """One choice's generated text, as the pieces it is streamed in (one per token)."""

    pieces: Sequence[str]
    truncated: bool  # cut by the request's max tokens
    completion_tokens: int
    tool_call: _ToolCall | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def finish_reason(self) -> ChatFinish:
        if self.truncated:
            return "length"
        return "tool_calls" if self.tool_call is not None else "stop"


def _text_answer(options: _Options, limit: int | None, *, choice: int = 0) -> _Answer:
    tokens = options.tokens
    truncated = limit is not None and limit < tokens
    if limit is not None and truncated:
        tokens = limit
    return _Answer(pieces=_SimulatedPieces(tokens, choice=choice), truncated=truncated, completion_tokens=tokens)


class _SimulatedPieces(Sequence[str]):
    """The simulator's text, made token by token as it is read: `x-simulator-tokens` may ask for
    more tokens than fit in memory (the gateway's completion cap ends such a stream)."""

    def __init__(self, length: int, *, choice: int) -> None:
        self._length = length
        self._choice = choice

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(self._length))]
        if not -self._length <= index < self._length:
            raise IndexError(index)
        return simulated_text(index % self._length, choice=self._choice)


def _generated_answer(text: str, limit: int | None, *, model: str, tool_call: _ToolCall | None = None) -> _Answer:
    """A generated string (JSON) streamed token by token, counted with the model's tokenizer."""
    pieces = _token_pieces(text, model=model)
    truncated = limit is not None and limit < len(pieces)
    if limit is not None and truncated:
        pieces = pieces[:limit]
    return _Answer(
        pieces=pieces,
        truncated=truncated,
        completion_tokens=count_text_tokens("".join(pieces), model=model),
        tool_call=tool_call,
    )


def _token_pieces(text: str, *, model: str) -> list[str]:
    """*text* split where the model's tokenizer splits it (a multi-byte character split across
    tokens stays whole, in the piece that completes it)."""
    encoding = get_encoding(encoding_name_for_model(model))
    pieces: list[str] = []
    pending = b""
    for token in encoding.encode_ordinary(text):
        pending += encoding.decode_single_token_bytes(token)
        try:
            pieces.append(pending.decode())
        except UnicodeDecodeError:
            continue
        pending = b""
    if pending:
        pieces.append(pending.decode(errors="replace"))
    return pieces


def sample_value(schema: object, *, root: object = None, depth: int = 0) -> Any:
    """A deterministic value of a JSON schema: strings "sample", numbers 1, booleans true, enums
    their first value, objects with every property, arrays of one item."""
    root = schema if root is None else root
    if not isinstance(schema, Mapping) or depth > 8:
        return "sample"
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: object = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, Mapping) else None
        return sample_value(target, root=root, depth=depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            chosen = next((option for option in options if not (isinstance(option, Mapping) and option.get("type") == "null")), options[0])
            return sample_value(chosen, root=root, depth=depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((item for item in kind if item != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        properties = schema.get("properties")
        required = schema.get("required")
        names = list(properties) if isinstance(properties, Mapping) else []
        if isinstance(required, list):
            names += [name for name in required if isinstance(name, str) and name not in names]
        props = properties if isinstance(properties, Mapping) else {}
        return {name: sample_value(props.get(name, {}), root=root, depth=depth + 1) for name in names}
    if kind == "array":
        return [sample_value(schema.get("items", {}), root=root, depth=depth + 1)]
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "sample"


def _json_dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def _function_tools(tools: object, *, nested: bool) -> list[tuple[str, object]]:
    """The (name, parameters) of the function tools offered: chat nests them under `function`
    (`nested`), the Responses API does not."""
    found: list[tuple[str, object]] = []
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            continue
        function = tool.get("function") if nested else tool
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            found.append((function["name"], function.get("parameters")))
    return found


def _chosen_tool(tools: list[tuple[str, object]], tool_choice: object, *, nested: bool) -> tuple[str, object] | None:
    """The tool the simulator calls: the one `tool_choice` names, else the first; none when
    `tool_choice` is "none" or no function tool is offered."""
    if not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        named = tool_choice.get("function") if nested else tool_choice
        name = named.get("name") if isinstance(named, Mapping) else None
        for tool in tools:
            if tool[0] == name:
                return tool
    return tools[0]


def _json_format_text(format_type: object, schema: object, options: _Options) -> str | None:
    """The JSON object answered for a structured-output request (None: answer plain text)."""
    if format_type == "json_schema" and isinstance(schema, Mapping):
        return _json_dumps(sample_value(schema))
    if format_type in ("json_schema", "json_object"):
        words = min(options.tokens, _JSON_ANSWER_MAX_WORDS)  # the object is built whole
        return _json_dumps({"answer": "".join(simulated_text(index) for index in range(words))})
    return None


def _planned_answers(
    *,
    options: _Options,
    limit: int | None,
    model: str,
    choices: int,
    tool: tuple[str, object] | None,
    json_text: str | None,
) -> list[_Answer]:
    """Each choice's answer: a tool call, a JSON object, or the simulator's text."""
    if tool is not None:
        name, parameters = tool
        arguments = _json_dumps(sample_value(parameters if isinstance(parameters, Mapping) else {"type": "object"}))
        return [
            _generated_answer(arguments, limit, model=model, tool_call=_ToolCall(name=name, call_id=f"call_sim_{uuid.uuid4().hex[:24]}"))
            for _ in range(choices)
        ]
    if json_text is not None:
        answer = _generated_answer(json_text, limit, model=model)
        return [answer] * choices
    return [_text_answer(options, limit, choice=choice) for choice in range(choices)]


def _positive_int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _inputs(value: object) -> list[str | list[int]]:
    """A prompt or embeddings input as its items: a string, strings, a token array, token arrays."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if not value:
            return [""]
        if all(isinstance(item, int) for item in value):
            return [[int(item) for item in value]]
        return [item if isinstance(item, str) else [int(token) for token in item] for item in value]
    return [""]


# --- One stream per endpoint ---------------------------------------------------------------


class _Stream:
    """The events of one answer; `stream()` sends each through the endpoint's `chunk()`."""

    def __init__(self, request: ProviderRequest, *, options: _Options, pacer: _Pacer, prompt_tokens: int) -> None:
        self.request = request
        self.body = request.body
        self.options = options
        self.pacer = pacer
        self.prompt_tokens = prompt_tokens
        self.model = request.deployment.upstream_model
        self.created = int(time.time())

    def events(self) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError

    def error_event(self) -> dict[str, Any]:
        """The `error` fault as the upstream sends it (chat and legacy completions)."""
        return {"error": {"message": ERROR_EVENT_MESSAGE, "type": "server_error", "param": None, "code": "server_error"}}

    async def interleaved(self, answers: Sequence[_Answer]) -> AsyncIterator[tuple[int, str]]:
        """(choice, piece) for every token of every answer, paced per token: token i of every
        choice, then token i + 1, as OpenAI interleaves the choices of one stream."""
        for index in range(max((len(answer.pieces) for answer in answers), default=0)):
            await self.pacer.tick(index)
            for choice, answer in enumerate(answers):
                if index < len(answer.pieces):
                    yield choice, answer.pieces[index]

    def usage(self, completion_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


class _ChatStream(_Stream):
    def __init__(self, request: ProviderRequest, **kwargs: Any) -> None:
        super().__init__(request, **kwargs)
        self.id = f"chatcmpl-sim-{uuid.uuid4().hex[:24]}"

    def chunk(self, choice: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def answers(self) -> list[_Answer]:
        body = self.body
        messages = body.get("messages") or []
        last = messages[-1] if messages and isinstance(messages[-1], Mapping) else {}
        tool = None
        if last.get("role") not in ("tool", "function"):
            tool = _chosen_tool(_function_tools(body.get("tools"), nested=True), body.get("tool_choice"), nested=True)
        response_format = body.get("response_format")
        json_text = None
        if isinstance(response_format, Mapping):
            json_schema = response_format.get("json_schema")
            schema = json_schema.get("schema") if isinstance(json_schema, Mapping) else None
            json_text = _json_format_text(response_format.get("type"), schema, self.options)
        return _planned_answers(
            options=self.options,
            limit=body.get("max_completion_tokens") or body.get("max_tokens"),
            model=self.model,
            choices=_positive_int(body.get("n"), 1),
            tool=tool,
            json_text=json_text,
        )

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        answers = self.answers()
        for choice, answer in enumerate(answers):
            if answer.tool_call is None:
                yield self.chunk(choice, {"role": "assistant", "content": ""})
            else:
                call = {"index": 0, "id": answer.tool_call.call_id, "type": "function", "function": {"name": answer.tool_call.name, "arguments": ""}}
                yield self.chunk(choice, {"role": "assistant", "content": None, "tool_calls": [call]})
        async for choice, piece in self.interleaved(answers):
            if answers[choice].tool_call is None:
                yield self.chunk(choice, {"content": piece})
            else:
                yield self.chunk(choice, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        for choice, answer in enumerate(answers):
            yield self.chunk(choice, {}, answer.finish_reason)
        usage_chunk = self.chunk(0, {})
        usage_chunk["choices"] = []
        usage_chunk["usage"] = {
            **self.usage(sum(answer.completion_tokens for answer in answers)),
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        yield usage_chunk


class _CompletionsStream(_Stream):
    """Legacy text completions: `n` choices for each prompt (choice `prompt * n + j`)."""

    def __init__(self, request: ProviderRequest, **kwargs: Any) -> None:
        super().__init__(request, **kwargs)
        self.id = f"cmpl-sim-{uuid.uuid4().hex[:24]}"

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices}

    def choice(self, index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    def echoed(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        try:
            return get_encoding(encoding_name_for_model(self.model)).decode(prompt)
        except (KeyError, ValueError):
            return ""

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        body = self.body
        prompts = _inputs(body.get("prompt"))
        n = _positive_int(body.get("n"), 1)
        limit = body.get("max_tokens")
        limit = COMPLETIONS_DEFAULT_MAX_TOKENS if limit is None else limit
        answers = [_text_answer(self.options, limit, choice=index) for index in range(len(prompts) * n)]
        if body.get("echo"):
            for index in range(len(answers)):
                yield self.chunk([self.choice(index, self.echoed(prompts[index // n]))])
        async for index, piece in self.interleaved(answers):
            yield self.chunk([self.choice(index, piece)])
        for index, answer in enumerate(answers):
            yield self.chunk([self.choice(index, "", "length" if answer.truncated else "stop")])
        yield {**self.chunk([]), "usage": self.usage(sum(answer.completion_tokens for answer in answers))}


class _ResponsesStream(_Stream):
    """The Responses API's typed events, numbered by `sequence_number` from 0."""

    def __init__(self, request: ProviderRequest, **kwargs: Any) -> None:
        super().__init__(request, **kwargs)
        self.id = f"resp_sim_{uuid.uuid4().hex}"
        self._sequence = itertools.count()

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, **fields, "sequence_number": next(self._sequence)}

    def error_event(self) -> dict[str, Any]:
        return self.event("error", code="server_error", message=ERROR_EVENT_MESSAGE, param=None)

    def response(self, *, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None, incomplete: bool = False) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": bool(body.get("background", False)),
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store") is not False,
            "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": [
                {"strict": True, **tool} if isinstance(tool, Mapping) and tool.get("type") == "function" else tool
                for tool in body.get("tools") or ()
            ],
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": usage,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }

    def answer(self) -> _Answer:
        body = self.body
        items = body.get("input")
        last = items[-1] if isinstance(items, list) and items and isinstance(items[-1], Mapping) else {}
        tool = None
        if last.get("type") != "function_call_output":
            tool = _chosen_tool(_function_tools(body.get("tools"), nested=False), body.get("tool_choice"), nested=False)
        text = body.get("text")
        text_format = text.get("format") if isinstance(text, Mapping) else None
        json_text = None
        if isinstance(text_format, Mapping):
            json_text = _json_format_text(text_format.get("type"), text_format.get("schema"), self.options)
        limit = body.get("max_output_tokens")
        return _planned_answers(options=self.options, limit=limit, model=self.model, choices=1, tool=tool, json_text=json_text)[0]

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        answer = self.answer()
        yield self.event("response.created", response=self.response(status="in_progress", output=[], usage=None))
        yield self.event("response.in_progress", response=self.response(status="in_progress", output=[], usage=None))
        item_status = "incomplete" if answer.truncated else "completed"
        if answer.tool_call is None:
            item_id = f"msg_sim_{uuid.uuid4().hex}"
            place = {"item_id": item_id, "output_index": 0, "content_index": 0}
            message = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            yield self.event("response.output_item.added", output_index=0, item=message)
            yield self.event("response.content_part.added", **place, part={"type": "output_text", "text": "", "annotations": []})
            async for _, piece in self.interleaved([answer]):
                yield self.event("response.output_text.delta", **place, delta=piece, logprobs=[])
            yield self.event("response.output_text.done", **place, text=answer.text, logprobs=[])
            part = {"type": "output_text", "text": answer.text, "annotations": [], "logprobs": []}
            yield self.event("response.content_part.done", **place, part=part)
            item = {**message, "status": item_status, "content": [part]}
        else:
            item_id = f"fc_sim_{uuid.uuid4().hex}"
            call = {
                "type": "function_call",
                "id": item_id,
                "call_id": answer.tool_call.call_id,
                "name": answer.tool_call.name,
                "arguments": "",
                "status": "in_progress",
            }
            yield self.event("response.output_item.added", output_index=0, item=call)
            async for _, piece in self.interleaved([answer]):
                yield self.event("response.function_call_arguments.delta", item_id=item_id, output_index=0, delta=piece)
            yield self.event("response.function_call_arguments.done", item_id=item_id, output_index=0, name=answer.tool_call.name, arguments=answer.text)
            item = {**call, "arguments": answer.text, "status": item_status}
        yield self.event("response.output_item.done", output_index=0, item=item)
        usage = {
            "input_tokens": self.prompt_tokens,
            # cache_write_tokens: the current OpenAI SDK's ResponseUsage requires it.
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": answer.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + answer.completion_tokens,
        }
        final = self.response(status="incomplete" if answer.truncated else "completed", output=[item], usage=usage, incomplete=answer.truncated)
        if final["store"]:
            # Stored before the last event is sent, so a client that reads it can fetch it.
            await cache.aset(STORE_KEY_PREFIX + self.id, final, timeout=STORE_TIMEOUT)
        yield self.event("response.incomplete" if answer.truncated else "response.completed", response=final)


class _EmbeddingsAnswer(_Stream):
    """One JSON answer (embeddings are not streamed)."""

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        body = self.body
        inputs = _inputs(body.get("input"))
        dimensions = _positive_int(body.get("dimensions"), EMBEDDING_DEFAULT_DIMENSIONS)
        as_base64 = body.get("encoding_format") == "base64"
        if len(inputs) > _EMBED_INLINE_INPUTS:
            vectors = await asyncio.to_thread(_embeddings, inputs, dimensions)
        else:
            vectors = _embeddings(inputs, dimensions)
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": base64.b64encode(vector).decode() if as_base64 else list(struct.unpack(f"<{dimensions}f", vector)),
            }
            for index, vector in enumerate(vectors)
        ]
        yield {
            "object": "list",
            "data": data,
            "model": self.model,
            "usage": {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens},
        }


def _embeddings(inputs: Sequence[str | list[int]], dimensions: int) -> list[bytes]:
    """Each input's unit vector as little-endian float32 bytes, drawn from its sha256."""
    vectors = []
    for item in inputs:
        key = item.encode() if isinstance(item, str) else b"tokens:" + ",".join(map(str, item)).encode()
        seed = hashlib.sha256(key).digest()
        raw = struct.unpack(f"<{dimensions}I", hashlib.shake_256(seed).digest(4 * dimensions))
        values = [value / 2147483647.5 - 1.0 for value in raw]
        norm = math.sqrt(math.fsum(value * value for value in values)) or 1.0
        vectors.append(struct.pack(f"<{dimensions}f", *(value / norm for value in values)))
    return vectors


_STREAMS: dict[str, type[_Stream]] = {
    "chat.completions": _ChatStream,
    "completions": _CompletionsStream,
    "responses": _ResponsesStream,
    "embeddings": _EmbeddingsAnswer,
}


class SimulatorProvider:
    name = "simulator"

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderChunk]:
        endpoint = request.endpoint
        options = _Options.of(request)
        options.raise_request_fault(request)
        prompt_tokens = await endpoint.count_prompt_tokens(request.body, model=request.deployment.upstream_model)
        pacer = _Pacer(options)
        answer = _STREAMS[endpoint.name](request, options=options, pacer=pacer, prompt_tokens=prompt_tokens)
        await pacer.start()
        try:
            async for event in answer.events():
                yield endpoint.chunk(event)
        except _MidStreamError:
            yield endpoint.chunk(answer.error_event())  # raises UpstreamError, as a real error event does
            raise UpstreamError("server_error", ERROR_EVENT_MESSAGE) from None

    async def stored(self, *, deployment: Deployment, method: Literal["GET", "DELETE", "POST"], path: str) -> dict[str, Any]:
        """`GET`/`DELETE /responses/{id}` and `POST /responses/{id}/cancel` for the responses
        this simulator stored (in Django's cache, so every worker sharing it sees them)."""
        parts = path.strip("/").split("/")
        response_id = parts[1] if len(parts) >= 2 and parts[0] == "responses" else ""
        not_found = UpstreamError("bad_request", NOT_FOUND.format(response_id=response_id), status=404)
        if not response_id or len(parts) > 3:
            raise not_found
        key = STORE_KEY_PREFIX + response_id
        response = await cache.aget(key)
        if not isinstance(response, dict):
            raise not_found
        if len(parts) == 2 and method == "GET":
            return response
        if len(parts) == 2 and method == "DELETE":
            await cache.adelete(key)
            return {"id": response_id, "object": "response.deleted", "deleted": True}
        if len(parts) == 3 and parts[2] == "cancel" and method == "POST":
            raise UpstreamError("bad_request", NOT_CANCELLABLE, status=400)
        raise not_found
