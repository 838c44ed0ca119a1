"""Fold a stream of `chat.completion.chunk`s into one `chat.completion` (non-stream responses).

The gateway always streams from the upstream, so a non-stream call is cancellable, times out and
is billed exactly like a stream; this turns the chunks back into the object OpenAI would return.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class _Choice:
    __slots__ = ("content", "finish_reason", "logprobs", "refusal", "role", "tool_calls")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.logprobs: list[Any] | None = None

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        if delta.get("role"):
            self.role = delta["role"]
        if delta.get("content"):
            self.content.append(delta["content"])
        if delta.get("refusal"):
            self.refusal.append(delta["refusal"])
        for call in delta.get("tool_calls") or ():
            merged = self.tool_calls.setdefault(
                call.get("index", len(self.tool_calls)),
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if call.get("id"):
                merged["id"] = call["id"]
            if call.get("type"):
                merged["type"] = call["type"]
            function = call.get("function") or {}
            merged["function"]["name"] += function.get("name") or ""
            merged["function"]["arguments"] += function.get("arguments") or ""
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        logprobs = choice.get("logprobs")
        if logprobs and logprobs.get("content"):
            self.logprobs = (self.logprobs or []) + list(logprobs["content"])

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": self.role,
            "content": "".join(self.content) if self.content or not self.tool_calls else None,
            "refusal": "".join(self.refusal) if self.refusal else None,
        }
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[index] for index in sorted(self.tool_calls)]
        return message


class CompletionBuilder:
    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if not self._head:
            self._head = {key: chunk.get(key) for key in ("id", "created", "model", "system_fingerprint")}
        for choice in chunk.get("choices") or ():
            self._choices.setdefault(choice.get("index", 0), _Choice()).add(choice)
        if chunk.get("usage"):
            self.usage = chunk["usage"]

    def build(self, *, usage: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": self._head.get("id"),
            "object": "chat.completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
            "system_fingerprint": self._head.get("system_fingerprint"),
            "choices": [
                {
                    "index": index,
                    "message": choice.message(),
                    "logprobs": {"content": choice.logprobs} if choice.logprobs is not None else None,
                    "finish_reason": choice.finish_reason,
                }
                for index, choice in sorted(self._choices.items())
            ],
            "usage": self.usage or dict(usage),
        }
