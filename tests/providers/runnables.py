"""Runnables the langchain provider's tests name by dotted path (`tests.providers.runnables:...`).

langchain-core's own fakes serve where they can: `GenericFakeChatModel` streams an answer word by
word, or tool calls given in OpenAI's shape (each whole, in one chunk); `FakeMessagesListChatModel`
cannot stream and answers a whole `AIMessage` (with usage and tool calls). None of them streams
`usage_metadata` or a tool call split over chunks, as real models do, nor tells whether its stream
was cancelled: `ScriptedChatModel` (a real `BaseChatModel`) streams the chunks it is given, at a
pace, and keeps a `Probe` of what it was called with and how its streams ended.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core import exceptions
from langchain_core.callbacks import (
    AsyncCallbackHandler,
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import (
    FakeMessagesListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolCall
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda


def fake_chat_model(*, answers: Sequence[str]) -> GenericFakeChatModel:
    """langchain-core's generic fake, answering `answers` in turn, forever (a provider builds its
    model once, and the fake takes an iterator)."""
    return GenericFakeChatModel(messages=itertools.cycle([AIMessage(content=answer) for answer in answers]))


# Per key, the name of the thread each build of `counted_fake_chat_model` ran in.
BUILDS: dict[str, list[str]] = {}


def counted_fake_chat_model(*, key: str, answers: Sequence[str]) -> GenericFakeChatModel:
    """`fake_chat_model`, noting each build in `BUILDS[key]`."""
    BUILDS.setdefault(key, []).append(threading.current_thread().name)
    return fake_chat_model(answers=answers)


def fake_tool_calling_model(*, tool_calls: list[dict[str, Any]]) -> GenericFakeChatModel:
    """The generic fake answering tool calls (OpenAI's shape, which it streams as chunks)."""
    return GenericFakeChatModel(messages=itertools.repeat(AIMessage(content="", additional_kwargs={"tool_calls": tool_calls})))


def whole_answer_model(*, content: str, tool_calls: list[ToolCall], usage: UsageMetadata) -> FakeMessagesListChatModel:
    """langchain-core's fake that cannot stream: `astream` yields its whole `AIMessage` once."""
    message = AIMessage(content=content, tool_calls=tool_calls, usage_metadata=usage)
    return FakeMessagesListChatModel(responses=[message])


def fake_chat_model_as_text(*, answers: Sequence[str]) -> Runnable[Any, str]:
    """The same fake piped into `StrOutputParser`: a chain that streams strings, not messages."""
    return fake_chat_model(answers=answers) | StrOutputParser()


def _not_a_message_stream(messages: list[BaseMessage]) -> dict[str, int]:
    return {"messages": len(messages)}


# A Runnable object (not a factory): named by path with no kwargs. It answers a dict, which is
# neither text nor a message.
answers_a_dict = RunnableLambda(_not_a_message_stream)
not_a_runnable = 42


def makes_no_runnable() -> dict[str, str]:
    return {"not": "a runnable"}


@dataclass
class Probe:
    """What a `ScriptedChatModel` was asked and how its streams ended."""

    calls: list[tuple[list[BaseMessage], dict[str, Any]]] = field(default_factory=list)
    chunks_sent: int = 0
    cancelled: int = 0  # streams that were cancelled mid-await (a timeout, the relay closed)
    closed: int = 0  # streams closed at a yield (their consumer stopped)
    finished: int = 0  # streams that sent all their chunks
    # How LangChain's runs of the model ended, as its callbacks hear it: "ok" or the error's type.
    runs: list[str] = field(default_factory=list)


PROBES: dict[str, Probe] = {}


class _RunRecorder(AsyncCallbackHandler):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.probe.runs.append("ok")

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.probe.runs.append(type(error).__name__)


class ScriptedChatModel(BaseChatModel):
    """Streams `chunks` (`AIMessageChunk` fields: content, usage_metadata, tool_call_chunks,
    response_metadata) after `first_delay` seconds, `delay` seconds apart; `forever` repeats the
    last one without end. Raises `error` (a name from `ERRORS`) after `fail_after` chunks."""

    chunks: list[dict[str, Any]]
    first_delay: float = 0.0
    delay: float = 0.0
    forever: bool = False
    probe: str = "default"
    error: str | None = None
    fail_after: int = 0

    def model_post_init(self, context: Any) -> None:
        self.callbacks = [_RunRecorder(PROBES.setdefault(self.probe, Probe()))]

    @property
    def _llm_type(self) -> str:
        return "scripted-test-chat-model"

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> Runnable[Any, AIMessage]:
        return self.bind(tools=list(tools), tool_choice=tool_choice, **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        raise NotImplementedError("streamed only")

    def _script(self) -> Iterator[dict[str, Any]]:
        yield from self.chunks
        if self.forever:
            yield from itertools.repeat(self.chunks[-1])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        probe = PROBES.setdefault(self.probe, Probe())
        probe.calls.append((messages, {"stop": stop, **kwargs}))
        try:
            for sent, fields in enumerate(self._script()):
                if self.error is not None and sent == self.fail_after:
                    raise ERRORS[self.error]()
                await asyncio.sleep(self.first_delay if sent == 0 else self.delay)
                probe.chunks_sent += 1
                yield ChatGenerationChunk(message=AIMessageChunk(**fields))
            probe.finished += 1
        except asyncio.CancelledError:
            probe.cancelled += 1
            raise
        except GeneratorExit:
            probe.closed += 1
            raise


ERRORS: dict[str, Callable[[], Exception]] = {
    "rate_limit": lambda: exceptions.ModelRateLimitError("Too many requests to the model."),
    "model_timeout": lambda: exceptions.ModelTimeoutError("The model took too long."),
    "model_connection": lambda: exceptions.ModelConnectionError("The model is unreachable."),
    "invalid_request": lambda: exceptions.ModelInvalidRequestError("The model refused the request."),
    "timeout": lambda: TimeoutError("timed out"),
    "connection": lambda: ConnectionResetError("reset by peer"),
    "value": lambda: ValueError("a bug in a chain"),
}
