"""Where an API call's time goes: the gateway served with a mark at the start and end of each stage.

    STAGE_MARKS_DIR=/tmp/marks python -m bench.run --phases streaming --loads 0ms-1 \\
        --app bench.stage_marks:application
    python -m bench.stages /tmp/marks            # per stage: median, and the slowest calls'

`application` is the gateway's own (`llmgateway.asgi.application`) with the functions of
`STAGES` wrapped. For every `POST /v1/...` a worker serves, it keeps the time of each mark since
the request reached the application, in milliseconds, and once the request has ended (outside
what it measures) appends them as one JSON line to `$STAGE_MARKS_DIR/marks.<pid>.jsonl`, with
the name of the benchmark's load the call belongs to (its `x-bench-load` header, if any). A mark
is taken the first time its stage is reached in a request (a retried upstream attempt keeps the
first attempt's). Besides the stages: `response start` (http.response.start sent), `first body`,
`first token` (the first body with a content delta) and `ended`.

`first token` is the first body with `"delta":{"content":"`, the pattern the benchmark's load
generator counts as a token (a chat completion's content; not the Responses API's events).

A task that a request starts and that outlives it (a shared writer's, a cache's refresh) copies
the request's context: its marks stop at `ended`, so such work is never put on a later call, and
whatever it does for other calls is theirs as "between stages". The wrappers cost a few
microseconds each, and the line is written on the event loop once the call has ended: compare
the stages of one marked run with each other, and a marked run with another marked run, never
with an unmarked one.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from bench._loadgen import CONTENT
from bench.stages import LOAD_HEADER
from llmgateway import asgi

Marks = dict[str, float]

LOAD_HEADER_BYTES = LOAD_HEADER.encode()

# (module, class or None, function, stage): in the order a call reaches them.
STAGES: tuple[tuple[str, str | None, str, str], ...] = (
    ("llmgateway.asgi", None, "aauthenticate", "authenticate"),
    ("llmgateway.asgi", "LeanASGIHandler", "read_body", "read body"),
    ("llmgateway.api", None, "_call", "view"),
    ("streaming.validation", None, "validate_chat_body", "validate"),
    ("streaming.validation", None, "validate_responses_body", "validate"),
    ("streaming.validation", None, "validate_completions_body", "validate"),
    ("streaming.validation", None, "validate_embeddings_body", "validate"),
    ("calls.call", None, "acatalog", "catalog"),
    ("calls.limits", None, "admit", "rate limits"),
    ("calls.call", None, "abudget_reserve", "budget hold"),
    ("calls.limits", None, "await_upstream_capacity", "upstream capacity"),
    ("billing.outbox", "LedgerOutbox", "call_opened", "journal"),
    ("streaming.providers.openai", "OpenAIProvider", "_send", "upstream request"),
    ("streaming.pipeline", "StreamRelay", "_put", "queue"),
    ("calls.call", "ApiCall", "_end_upstream", "record"),
    ("calls.limits", None, "release", "limits give-back"),
)

_marks: contextvars.ContextVar[Marks | None] = contextvars.ContextVar("stage_marks", default=None)


def mark(name: str) -> None:
    """Note `name` now in the current request's marks (the first time only)."""
    marks = _marks.get()
    if marks is not None and name not in marks and "ended" not in marks:
        marks[name] = time.perf_counter()


def _timed(function: Callable[..., Any], stage: str) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
            mark(f"{stage} >")
            try:
                return await function(*args, **kwargs)
            finally:
                mark(f"{stage} <")

        return timed_coroutine

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        mark(f"{stage} >")
        try:
            return function(*args, **kwargs)
        finally:
            mark(f"{stage} <")

    return timed


def _wrap_stages() -> None:
    """Wrap every function of STAGES where it is looked up when called; a stage that is not
    there any more is an error, so the marks cannot silently go missing."""
    for module_name, class_name, function_name, stage in STAGES:
        owner: Any = importlib.import_module(module_name)
        if class_name is not None:
            owner = getattr(owner, class_name)
        setattr(owner, function_name, _timed(getattr(owner, function_name), stage))


class _Output:
    """This worker's file of marks (one JSON line per request), opened on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fd: int | None = None

    def write(self, load: str | None, marks: Mapping[str, float], started: float) -> None:
        if self.fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"marks.{os.getpid()}.jsonl"
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        line = {"load": load, "marks": {name: round((at - started) * 1000, 4) for name, at in marks.items()}}
        os.write(self.fd, json.dumps(line).encode() + b"\n")


def _marked_send(send: Callable[[Mapping[str, Any]], Awaitable[None]]) -> Callable[[Mapping[str, Any]], Awaitable[None]]:
    async def marked(message: Mapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            mark("response start")
        elif message["type"] == "http.response.body" and message.get("body"):
            mark("first body")
            if CONTENT in message["body"]:  # what the load generator counts as a token
                mark("first token")
        await send(message)

    return marked


def install(directory: Path) -> Any:
    """Wrap the stages and the lean handler (the API's), and return the gateway's application."""
    _wrap_stages()
    output = _Output(directory)
    handle = asgi.LeanASGIHandler.handle

    @functools.wraps(handle)
    async def marked_handle(self: asgi.LeanASGIHandler, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["method"] != "POST" or not scope["path"].startswith(asgi.API_PATH_PREFIX):
            await handle(self, scope, receive, send)
            return
        started = time.perf_counter()
        load = asgi._header(scope, LOAD_HEADER_BYTES)
        marks: Marks = {}
        token = _marks.set(marks)
        try:
            await handle(self, scope, receive, _marked_send(send))
        finally:
            marks["ended"] = time.perf_counter()
            _marks.reset(token)
            output.write(load, marks, started)

    asgi.LeanASGIHandler.handle = marked_handle  # type: ignore[method-assign]
    return asgi.application


application = install(Path(os.environ.get("STAGE_MARKS_DIR", "stage-marks")))
