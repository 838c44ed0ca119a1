"""The `langchain` provider: a model served by any LangChain chat model or runnable.

Optional: it needs `langchain-core` (the `[langchain]` extra) and whatever package the runnable
comes from (`langchain-openai`, `langchain-anthropic`, your own). Its options name what serves it:
`{"runnable": "package.module:attribute", "kwargs": {...}}` (`package.module.attribute` works too).
The attribute is a chat model class (`langchain_openai:ChatOpenAI`) or any callable returning a
Runnable, called once with `kwargs`, or a Runnable object itself (then `kwargs` must be empty). It is
built once per provider, on its first call and off the event loop, so every call reuses one model
and its HTTP client. The provider's `base_url` and the key its `api_key_env` names, when set, are
passed as `base_url=` and `api_key=` (the names LangChain's chat models take; `kwargs` win), so a
key is never written in the kwargs; its headers and timeouts are not used (the pipeline enforces
the timeouts). `load_runnable()` builds one alone (to check a configuration before use).

A call, step by step:

- The OpenAI messages become LangChain's: system and developer -> `SystemMessage` (developer
  marked so langchain-openai sends it as such), user -> `HumanMessage` (content parts passed as
  given: langchain-core reads OpenAI's part format), assistant -> `AIMessage` with its tool calls,
  tool -> `ToolMessage`, function -> `FunctionMessage`.
- A chat model (or one wrapped by `.bind()`) gets `temperature`, `top_p`, `max_tokens` (or
  `max_completion_tokens`, sent as `max_tokens`) and `stop` as call kwargs, which LangChain's chat
  models put in their request; `tools` (function tools) and `tool_choice` go through `bind_tools`
  (`"none"` binds no tools; `allowed_tools` binds only those, with its mode). Any other runnable
  (a chain, a lambda) gets the messages alone.
- The model's first piece tells the pipeline the upstream's `x-ratelimit-*` headers when the model
  passes them on (langchain-openai's `include_response_headers=True`).
- The answer streams from `runnable.astream()`, which every Runnable has (one that cannot stream
  yields its whole answer once). Each piece, an `AIMessageChunk`, a whole `AIMessage` or a string,
  becomes OpenAI `chat.completion.chunk`s: a role chunk when the first piece arrives (so the
  pipeline's first-token timeout and TTFT measure the model), content and tool-call deltas, a
  chunk with the finish reason, then a usage chunk if the model reported `usage_metadata`
  (summed over the pieces, as LangChain merges chunks). Without one there is no usage chunk and
  the gateway counts the streamed text itself, as for any upstream that sent no usage.

Not sent, on purpose (no LangChain-wide way to say them, or a model would refuse them):
`response_format`, `functions`/`function_call`, `parallel_tool_calls`, `presence_penalty`,
`frequency_penalty`, `seed`, `logprobs`, `user`, `stream_options` and unknown fields. `n` above 1
and custom (non-function) tools are refused as bad requests. Reasoning content blocks are not
streamed (Chat Completions has no field for them; their tokens are billed through usage). The
deployment's `upstream_model` names the deployment in the ledger and the chunks but is not sent:
a runnable need not take a model name, so the model is what `kwargs` configure (`"model": ...`).

No task of its own: `astream()` runs in the caller's task, so the pipeline's timeouts and
cancellation land in the model's own awaits, and closing this generator closes LangChain's in a
`finally` (a chat model's astream then closes its provider stream, e.g. langchain-openai's HTTP
response). One exception is LangChain's, not ours: closed while it is parked at a `yield` (a slow
client filled the queue), `BaseChatModel.astream` drops its inner `_astream` generator unclosed,
and Python closes that one in a task of its own on the next loop turn. A model that streams only
synchronously runs each step in a thread (LangChain's fallback): a cancel returns at once and the
thread finishes its one step. A callback handler feeding a queue would need a task to run the
call, so this provider streams instead.

Errors become `UpstreamError`s: the OpenAI SDK's (langchain-openai raises them) through the
`openai` provider's table, langchain-core's standard `Model*Error`s by kind, `TimeoutError` and
`ConnectionError` as such, anything else `server_error`. LangSmith tracing is left as LangChain
decides it (off unless `LANGSMITH_TRACING` is set); this module turns nothing on.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import openai
import orjson

from streaming.catalog import Deployment, ProviderSpec
from streaming.providers.base import (
    ProviderChunk,
    ProviderRequest,
    UpstreamError,
    UpstreamErrorKind,
    Usage,
    text_of_chunk,
)
from streaming.providers.openai import RATE_LIMIT_HEADERS, translate_error

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessage
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.runnables import Runnable
    from langchain_core.runnables.config import RunnableConfig

logger = logging.getLogger(__name__)

LANGCHAIN_MISSING = "langchain-core is not installed: install the gateway with its [langchain] extra (pip install 'llmgateway[langchain]')"
MISCONFIGURED = "The langchain provider {name!r} cannot serve calls: {reason}."
NOT_STREAMABLE = "The LangChain runnable streamed a {type}; the langchain provider takes message chunks or strings."
ONLY_CHAT = "The langchain provider serves chat completions only, not {endpoint}."
NOT_STORED = "The langchain provider stores no responses."
ONE_CHOICE = "The langchain provider makes one answer per call: 'n' must be 1."
NO_TOOLS = "This model's LangChain runnable does not take tools (it has no working bind_tools)."
FUNCTION_TOOLS_ONLY = "The langchain provider passes function tools only, not {type!r} tools or tool calls."

# Call parameters any LangChain chat model takes as kwargs of astream(), with their OpenAI names.
_CALL_PARAMETERS = (("temperature", "temperature"), ("top_p", "top_p"))

# Finish reasons as chat models report them (OpenAI's, Anthropic's stop_reason, Ollama's
# done_reason, Google's), in OpenAI's words.
_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "function_call",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "STOP": "stop",
    "MAX_TOKENS": "length",
}


class LangChainConfigError(ValueError):
    """The provider's options do not name a usable runnable; the message says which and why."""


def load_runnable(options: Mapping[str, Any], *, provided: Mapping[str, Any] | None = None) -> Runnable[Any, Any]:
    """The Runnable `options` name (`{"runnable": path, "kwargs": {...}}`), built with its kwargs,
    after `provided` ones (the provider's key and base URL; the options' kwargs win).

    Raises `LangChainConfigError` naming the path (and the `[langchain]` extra when langchain-core
    is missing). Never puts the kwargs in a message: they may hold a key.
    """
    path = options.get("runnable")
    configured = options.get("kwargs") or {}
    if not isinstance(path, str) or not path.strip():
        raise LangChainConfigError("options.runnable must name a chat model or runnable, as 'package.module:attribute'")
    if not isinstance(configured, Mapping) or not all(isinstance(key, str) for key in configured):
        raise LangChainConfigError(f"options.kwargs of runnable {path!r} must be a mapping of names to values")
    kwargs = {**(provided or {}), **configured}
    try:
        from langchain_core.runnables import Runnable
    except ImportError as error:
        raise LangChainConfigError(f"runnable {path!r}: {LANGCHAIN_MISSING}") from error
    module_name, _, attribute = path.strip().partition(":")
    if not attribute:
        module_name, _, attribute = module_name.rpartition(".")
    if not module_name or not attribute:
        raise LangChainConfigError(f"runnable {path!r} is not a dotted path: write 'package.module:attribute'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise LangChainConfigError(
            f"runnable {path!r}: cannot import {module_name!r} ({error}); is the package that provides it installed?"
        ) from error
    except Exception as error:  # the module itself failed while being imported
        raise LangChainConfigError(f"runnable {path!r}: importing {module_name!r} failed ({type(error).__name__})") from error
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise LangChainConfigError(f"runnable {path!r}: {module_name!r} has no attribute {attribute!r}") from None
    if isinstance(target, Runnable):
        if kwargs:
            raise LangChainConfigError(
                f"runnable {path!r} is a Runnable object already: it takes no kwargs (nor the provider's base_url or api_key_env)"
            )
        return target
    if not callable(target):
        raise LangChainConfigError(f"runnable {path!r} is neither a Runnable nor a class or factory that makes one")
    try:
        built = target(**kwargs)
    except Exception as error:
        # The error's text may quote a kwarg's value (a key): the log has the traceback.
        raise LangChainConfigError(f"building runnable {path!r} with its kwargs failed ({type(error).__name__})") from error
    if not isinstance(built, Runnable):
        raise LangChainConfigError(f"runnable {path!r} returned a {type(built).__name__}, not a LangChain Runnable")
    return built


class LangChainProvider:
    """Serves a deployment with the Runnable its `ProviderSpec.options` name, built once.

    Built on the first call, in a thread: importing a LangChain integration costs a second or two
    of CPU (langchain-openai took 1.5 s here), which on the event loop would stall every stream of
    the process. Calls that arrive meanwhile wait for the same build; a caller cancelled meanwhile
    does not cancel it. A runnable that cannot be built fails every call with an upstream error
    naming why (and is logged once), rather than as a bug of the call that built the provider.
    """

    def __init__(self, spec: ProviderSpec) -> None:
        self.name = spec.name
        self._spec = spec
        self._building: asyncio.Future[Runnable[Any, Any]] | None = None

    async def aclose(self) -> None:
        # Nothing of ours to close. LangChain's models keep their HTTP clients for the process
        # (langchain-openai shares one per base URL between models), so closing one here could
        # break another provider's model.
        return None

    def _build(self) -> Runnable[Any, Any]:
        spec = self._spec
        # The provider's own fields, under the names LangChain's chat models take: so a key stays
        # in the environment (api_key_env names it) instead of in the stored kwargs.
        provided: dict[str, Any] = {}
        if spec.base_url:
            provided["base_url"] = spec.base_url
        if spec.api_key_env:
            provided["api_key"] = spec.api_key()
        try:
            return load_runnable(spec.options, provided=provided)
        except LangChainConfigError as error:
            logger.error("langchain provider %s: %s", self.name, error, exc_info=error.__cause__ is not None)
            raise

    async def runnable(self) -> Runnable[Any, Any]:
        """The built Runnable; `UpstreamError("server_error")` if it cannot be built."""
        loop = asyncio.get_running_loop()
        building = self._building
        if building is None or (not building.done() and building.get_loop() is not loop):
            # (A build pending on another loop: only tests run several loops in one process.)
            building = self._building = loop.run_in_executor(None, self._build)
        try:
            return building.result() if building.done() else await asyncio.shield(building)
        except LangChainConfigError as error:
            raise UpstreamError("server_error", MISCONFIGURED.format(name=self.name, reason=error)) from error

    async def stored(self, *, deployment: Deployment, method: Literal["GET", "DELETE", "POST"], path: str) -> dict[str, Any]:
        raise UpstreamError("bad_request", NOT_STORED, status=404)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderChunk]:
        if request.endpoint.name != "chat.completions":
            raise UpstreamError("bad_request", ONLY_CHAT.format(endpoint=request.endpoint.path), status=400)
        runnable, messages, kwargs = _prepare_call(await self.runnable(), request.body)
        config: RunnableConfig = {"metadata": {"llmgateway_request_id": request.request_id}}
        writer = _ChunkWriter(model=request.deployment.upstream_model)
        pieces = runnable.astream(messages, config, **kwargs)
        try:
            async for piece in pieces:
                if not writer.started:
                    writer.started = True
                    yield writer.role_chunk()
                    _report_headers(request, piece)
                chunk = writer.piece_chunk(piece)
                if chunk is not None:
                    yield chunk
        except UpstreamError:
            raise
        except Exception as error:
            raise upstream_error_from(error) from error
        finally:
            # Stops the model's stream when we stop early (closed, cancelled, failed); a no-op
            # once it ended by itself.
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()
        if not writer.started:
            yield writer.role_chunk()
        yield writer.finish_chunk()
        usage = writer.usage_chunk()
        if usage is not None:
            yield usage


def _prepare_call(
    runnable: Runnable[Any, Any], body: Mapping[str, Any]
) -> tuple[Runnable[Any, Any], list[BaseMessage], dict[str, Any]]:
    """What to call, with which messages and kwargs; `UpstreamError("bad_request")` if it cannot be."""
    if (body.get("n") or 1) != 1:
        raise UpstreamError("bad_request", ONE_CHOICE)
    messages = [_message(entry) for entry in body.get("messages") or ()]
    if not _is_chat_model(runnable):
        return runnable, messages, {}
    kwargs: dict[str, Any] = {name: body[key] for key, name in _CALL_PARAMETERS if body.get(key) is not None}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop:
        kwargs["stop"] = [stop] if isinstance(stop, str) else [str(item) for item in stop]
    tools = body.get("tools")
    if tools and body.get("tool_choice") != "none":
        runnable = _with_tools(runnable, tools, body.get("tool_choice"))
    return runnable, messages, kwargs


def _is_chat_model(runnable: Runnable[Any, Any]) -> bool:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.runnables import RunnableBinding

    while isinstance(runnable, RunnableBinding):
        runnable = runnable.bound
    return isinstance(runnable, BaseChatModel)


def _with_tools(runnable: Runnable[Any, Any], tools: list[dict[str, Any]], choice: Any) -> Runnable[Any, Any]:
    for tool in tools:
        if tool.get("type") != "function":
            raise UpstreamError("bad_request", FUNCTION_TOOLS_ONLY.format(type=tool.get("type")))
    tool_choice: str | None = None
    if isinstance(choice, str):
        tool_choice = choice  # "auto" or "required" ("none" binds no tools)
    elif isinstance(choice, dict) and choice.get("type") == "function":
        tool_choice = choice["function"]["name"]  # chat models take a tool's name to force it
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        # Only the allowed tools are bound, with the mode: the same constraint, said portably.
        allowed = choice["allowed_tools"]
        names = {named["function"]["name"] for named in allowed["tools"] if named.get("type") == "function"}
        tools = [tool for tool in tools if tool["function"]["name"] in names]
        tool_choice = allowed["mode"]
    elif isinstance(choice, dict):
        raise UpstreamError("bad_request", FUNCTION_TOOLS_ONLY.format(type=choice.get("type")))
    bind_tools = getattr(runnable, "bind_tools", None)
    if bind_tools is None:
        raise UpstreamError("bad_request", NO_TOOLS)
    try:
        if tool_choice is None:
            bound: Runnable[Any, Any] = bind_tools(tools)
        else:
            bound = bind_tools(tools, tool_choice=tool_choice)
    except NotImplementedError as error:
        raise UpstreamError("bad_request", NO_TOOLS) from error
    except (TypeError, ValueError) as error:
        raise UpstreamError("bad_request", f"The model refused the tools: {error}") from error
    return bound


def _message(entry: Mapping[str, Any]) -> BaseMessage:
    """One OpenAI chat message as LangChain's (the body was validated: roles and shapes are known)."""
    from langchain_core.messages import (
        AIMessage,
        FunctionMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
    )

    role = entry["role"]
    content = _content(entry.get("content"))
    named: dict[str, Any] = {"name": entry["name"]} if entry.get("name") else {}
    if role == "system":
        return SystemMessage(content=content, **named)
    if role == "developer":
        # langchain-openai sends a SystemMessage with this marker as a developer message.
        return SystemMessage(content=content, additional_kwargs={"__openai_role__": "developer"}, **named)
    if role == "user":
        return HumanMessage(content=content, **named)
    if role == "tool":
        return ToolMessage(content=content, tool_call_id=entry["tool_call_id"], **named)
    if role == "function":
        return FunctionMessage(content=content, name=entry["name"])
    tool_calls: list[Any] = []
    invalid_tool_calls: list[Any] = []
    for call in entry.get("tool_calls") or ():
        if call.get("type") != "function":
            raise UpstreamError("bad_request", FUNCTION_TOOLS_ONLY.format(type=call.get("type")))
        function = call["function"]
        try:
            args = orjson.loads(function["arguments"] or "{}")
        except orjson.JSONDecodeError:
            args = None
        if isinstance(args, dict):
            tool_calls.append({"type": "tool_call", "id": call["id"], "name": function["name"], "args": args})
        else:  # kept as sent: langchain-openai sends its arguments back verbatim
            invalid_tool_calls.append(
                {"type": "invalid_tool_call", "id": call["id"], "name": function["name"], "args": function["arguments"], "error": None}
            )
    extra: dict[str, Any] = {}
    if entry.get("function_call"):
        extra["additional_kwargs"] = {"function_call": dict(entry["function_call"])}
    return AIMessage(content=content, tool_calls=tool_calls, invalid_tool_calls=invalid_tool_calls, **named, **extra)


def _content(content: Any) -> str | list[str | dict[str, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return [dict(part) for part in content]


class _ChunkWriter:
    """OpenAI chunks for one answer, from LangChain's pieces; keeps the usage and finish reason."""

    def __init__(self, *, model: str) -> None:
        self.id = f"chatcmpl-lc-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.started = False  # the role chunk went out
        self.usage: UsageMetadata | None = None
        self.finish_reason: str | None = None
        self._tool_calls: dict[tuple[str, Any], int] = {}  # LangChain's key of a call -> OpenAI index
        self._last_tool_call: int | None = None

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def role_chunk(self) -> ProviderChunk:
        return ProviderChunk(data=self._chunk({"role": "assistant", "content": ""}), text="")

    def piece_chunk(self, piece: Any) -> ProviderChunk | None:
        """The chunk carrying what `piece` adds to the answer; None if it adds no text."""
        from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
        from langchain_core.messages.ai import add_usage

        tool_calls: list[dict[str, Any]] = []
        if isinstance(piece, str):
            content = piece
        elif isinstance(piece, BaseMessage):
            content = str(piece.text)
            if isinstance(piece, AIMessageChunk):
                tool_calls = [self._tool_call_delta(call) for call in piece.tool_call_chunks]
            elif isinstance(piece, AIMessage):
                tool_calls = [self._whole_tool_call(call["id"], call["name"], orjson.dumps(call["args"]).decode()) for call in piece.tool_calls]
                tool_calls += [self._whole_tool_call(call["id"], call["name"], call["args"] or "") for call in piece.invalid_tool_calls]
            if isinstance(piece, AIMessage) and piece.usage_metadata:
                self.usage = add_usage(self.usage, piece.usage_metadata)
            metadata = piece.response_metadata or {}
            reported = metadata.get("finish_reason") or metadata.get("stop_reason") or metadata.get("done_reason")
            if isinstance(reported, str) and reported in _FINISH_REASONS:
                self.finish_reason = _FINISH_REASONS[reported]
        else:
            raise UpstreamError("server_error", NOT_STREAMABLE.format(type=type(piece).__name__))
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = content
        if tool_calls:
            delta["tool_calls"] = tool_calls
        if not delta:
            return None
        data = self._chunk(delta)
        return ProviderChunk(data=data, text=text_of_chunk(data))

    def _tool_call_index(self, key: tuple[str, Any] | None) -> tuple[int, bool]:
        """The OpenAI index of the call LangChain keys so, and whether it starts here. A chunk
        with neither index nor id continues the last call."""
        if key is None and self._last_tool_call is not None:
            return self._last_tool_call, False
        if key is not None and key in self._tool_calls:
            index = self._last_tool_call = self._tool_calls[key]
            return index, False
        index = self._last_tool_call = len(self._tool_calls)
        self._tool_calls[key or ("new", index)] = index
        return index, True

    def _tool_call_delta(self, call: Any) -> dict[str, Any]:
        lc_index, call_id = call.get("index"), call.get("id")
        key = ("index", lc_index) if lc_index is not None else ("id", call_id) if call_id else None
        index, starts = self._tool_call_index(key)
        delta: dict[str, Any] = {"index": index}
        if call_id:
            delta["id"] = call_id
        if starts or call_id:
            delta["type"] = "function"
        function: dict[str, str] = {}
        if call.get("name"):
            function["name"] = call["name"]
        if call.get("args") or starts:
            function["arguments"] = call.get("args") or ""
        delta["function"] = function
        return delta

    def _whole_tool_call(self, call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
        """A whole call (from a model that cannot stream, so answered once): one delta says it all."""
        index, _ = self._tool_call_index(("whole", len(self._tool_calls)))
        return {
            "index": index,
            "id": call_id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name or "", "arguments": arguments},
        }

    def finish_chunk(self) -> ProviderChunk:
        reason = self.finish_reason or ("tool_calls" if self._tool_calls else "stop")
        return ProviderChunk(data=self._chunk({}, reason), text="")

    def usage_chunk(self) -> ProviderChunk | None:
        """OpenAI's usage chunk (`choices: []`) from the summed usage_metadata; None without one."""
        if self.usage is None:
            return None
        reported = self.usage
        usage = Usage(
            prompt_tokens=int(reported.get("input_tokens") or 0),
            completion_tokens=int(reported.get("output_tokens") or 0),
            cached_tokens=int((reported.get("input_token_details") or {}).get("cache_read") or 0),
            reasoning_tokens=int((reported.get("output_token_details") or {}).get("reasoning") or 0),
        )
        data = self._chunk({})
        data["choices"] = []
        data["usage"] = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        }
        return ProviderChunk(data=data, text="", usage=usage)


def _report_headers(request: ProviderRequest, piece: Any) -> None:
    """Tell the pipeline the upstream's rate-limit headers, when the model passes them on
    (langchain-openai does with `include_response_headers=True`, in the first chunk)."""
    if request.on_response_headers is None:
        return
    metadata = getattr(piece, "response_metadata", None) or {}
    headers = metadata.get("headers")
    if isinstance(headers, Mapping):
        lowered = {str(name).lower(): str(value) for name, value in headers.items()}
        request.on_response_headers({name: lowered[name] for name in RATE_LIMIT_HEADERS if name in lowered})


def _status_kind(status: int) -> UpstreamErrorKind:
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if status in (408, 504):
        return "timeout"
    return "bad_request" if status < 500 else "server_error"


# langchain-core's standard model errors (1.x), by the kind they are.
_MODEL_ERROR_KINDS: tuple[tuple[str, UpstreamErrorKind], ...] = (
    ("ModelRateLimitError", "rate_limited"),
    ("ModelTimeoutError", "timeout"),
    ("ModelConnectionError", "connection"),
    ("ModelAuthenticationError", "auth"),
    ("ModelPermissionDeniedError", "auth"),
    ("ModelInvalidRequestError", "bad_request"),
    ("ModelNotFoundError", "bad_request"),
    ("ContextOverflowError", "bad_request"),
    ("ModelAPIError", "server_error"),
)


def upstream_error_from(error: Exception) -> UpstreamError:
    """The `UpstreamError` a LangChain model's exception is."""
    cause: BaseException | None = error
    while cause is not None:  # langchain-openai raises the SDK's errors, or from them
        if isinstance(cause, openai.APIError):
            return translate_error(cause)
        cause = cause.__cause__
    from langchain_core import exceptions

    for name, kind in _MODEL_ERROR_KINDS:
        error_type = getattr(exceptions, name, None)  # not all in every langchain-core 1.x
        if isinstance(error_type, type) and isinstance(error, error_type):
            return UpstreamError(kind, str(error) or f"The model failed: {type(error).__name__}")
    status = getattr(error, "status_code", None)  # other providers' SDK errors (anthropic, ...)
    if isinstance(status, int) and 400 <= status < 600:
        return UpstreamError(_status_kind(status), f"The model's upstream answered {status}: {error}", status=status)
    if isinstance(error, TimeoutError):
        return UpstreamError("timeout", "The model timed out.")
    if isinstance(error, ConnectionError):
        return UpstreamError("connection", "Could not reach the model, or it dropped the connection.")
    return UpstreamError("server_error", f"The LangChain model failed: {type(error).__name__}")
