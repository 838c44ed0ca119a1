"""The API's request and response bodies, declared once (pydantic).

`ChatCompletionRequest` is what `streaming.validation` checks every `/v1/chat/completions` body
against, before any work (`ResponsesRequest`, `EmbeddingsRequest` and `CompletionRequest` the
bodies of `/v1/responses`, `/v1/embeddings` and `/v1/completions`), and what `/v1/openapi.json`
publishes (with the response shapes below, which the tests hold the gateway's answers to). Fields are strict (no coercion: `"10"` is not an
integer, `true` is not a number) and declared in the order they are checked, so the error a client
gets is about the first field that is wrong. Unknown fields are allowed and pass through to the
upstream unchanged, since it may be another OpenAI-compatible server with options of its own.

What a shape cannot say is checked after it, in `ChatCompletionRequest._references`: a
`tool_choice` names a tool of `tools`, `function_call` a function of `functions`, and the fields
that are only allowed with others. Where OpenAI is stricter than a harmless request needs, this
schema is lenient on purpose: `tool_choice: "none"` passes without `tools`, and JSON schemas
(`parameters`, `response_format.json_schema.schema`) are only checked to be objects. A Responses
`input` item or tool other than a message or a function tool is only checked to be an object with
a `type`: the upstream knows its many kinds better.

Unions of an object and something else choose their member by the input's JSON type with a
`Discriminator` whose tags start with `~`, so that an error names the field, not the union
member (`streaming.validation` drops such tags from error locations).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_TOOLS = 128  # OpenAI's limit on tool definitions, and on function, tool and schema names:
MAX_NAME_LENGTH = 64
NAME_PATTERN = r"^[a-zA-Z0-9_-]+$"

ONLY_WITH = "'{param}' is only allowed when '{needs}' are specified."
UNKNOWN_TOOL = "no {kind} named '{name}' in '{source}'."
STREAM_OPTIONS_WITHOUT_STREAM = "only allowed when 'stream' is true."


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _Closed(BaseModel):
    """A response shape: what the gateway sends (extra fields allowed, as OpenAI adds them)."""

    model_config = ConfigDict(extra="allow")


Name = Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)]


def _by_json_type(**tags: str) -> Any:
    """A Discriminator choosing a union member by the input's JSON type (`string=`, `object=`, ...)."""
    kinds = {"string": str, "object": dict, "array": list}

    def tag(value: Any) -> str | None:
        for kind, member in tags.items():
            if isinstance(value, kinds[kind]):
                return member
        return None

    # The message is what streaming.validation says was expected (a context dict would make the
    # annotation unhashable, and `X | None` hashes it).
    expected = " or ".join({"string": "a string", "object": "an object", "array": "an array"}[kind] for kind in tags)
    return Discriminator(tag, custom_error_type="invalid_type", custom_error_message=expected)


# --- messages ------------------------------------------------------------------------------------


class ContentPart(_Body):
    type: str


Content = Annotated[
    Annotated[str, Tag("~text")] | Annotated[list[ContentPart], Tag("~parts")],
    _by_json_type(string="~text", array="~parts"),
]


class FunctionCall(_Body):
    """A call the assistant made: `function_call`, or a `tool_calls[i].function`."""

    name: Name
    arguments: str


class CustomCall(_Body):
    name: Name
    input: str


class FunctionToolCall(_Body):
    type: Literal["function"]
    id: str
    function: FunctionCall


class CustomToolCall(_Body):
    type: Literal["custom"]
    id: str
    custom: CustomCall


ToolCall = Annotated[FunctionToolCall | CustomToolCall, Field(discriminator="type")]


class _Message(_Body):
    name: str | None = None


class SystemMessage(_Message):
    role: Literal["system"]
    content: Content


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None
    function_call: FunctionCall | None = None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


class FunctionMessage(_Message):
    role: Literal["function"]
    name: str  # required here
    content: Content | None = None


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


# --- tools -------------------------------------------------------------------------------------


class FunctionDefinition(_Body):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CustomDefinition(_Body):
    name: Name
    description: str | None = None
    format: dict[str, Any] | None = None


class FunctionTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class CustomTool(_Body):
    type: Literal["custom"]
    custom: CustomDefinition


Tool = Annotated[FunctionTool | CustomTool, Field(discriminator="type")]


class NamedFunction(_Body):
    name: str


class FunctionChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class CustomChoice(_Body):
    type: Literal["custom"]
    custom: NamedFunction


NamedTool = Annotated[FunctionChoice | CustomChoice, Field(discriminator="type")]


class AllowedTools(_Body):
    mode: Literal["auto", "required"]
    tools: Annotated[list[NamedTool], Field(min_length=1)]


class AllowedToolsChoice(_Body):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("~mode")]
    | Annotated[Annotated[FunctionChoice | CustomChoice | AllowedToolsChoice, Field(discriminator="type")], Tag("~object")],
    _by_json_type(string="~mode", object="~object"),
]
FunctionCallChoice = Annotated[
    Annotated[Literal["none", "auto"], Tag("~mode")] | Annotated[NamedFunction, Tag("~object")],
    _by_json_type(string="~mode", object="~object"),
]


class JsonSchemaFormat(_Body):
    name: Name
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Body):
    type: Literal["text"]


class JsonObjectFormat(_Body):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class StreamOptions(_Body):
    include_usage: bool = False


Stop = Annotated[Annotated[str, Tag("~one")] | Annotated[list[Any], Tag("~many")], _by_json_type(string="~one", array="~many")]


# --- the request ---------------------------------------------------------------------------------


def _refused(param: str, message: str) -> PydanticCustomError:
    """An error about `param` (its whole path) that only the request as a whole can tell."""
    return PydanticCustomError("invalid_value", "{message}", {"param": param, "message": message})


class ChatCompletionRequest(_Body):
    """`POST /v1/chat/completions`: OpenAI's Chat Completions request."""

    model: Annotated[str, StringConstraints(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stop: Stop | None = None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDefinition], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    function_call: FunctionCallChoice | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _references(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise _refused("stream_options", f"Invalid value for 'stream_options': {STREAM_OPTIONS_WITHOUT_STREAM}")
        defined = None if self.tools is None else {(tool.type, _tool_name(tool)) for tool in self.tools}
        choice = self.tool_choice
        # OpenAI refuses even "none" without tools; it asks for nothing, so it passes here.
        if choice is not None and choice != "none" and defined is None:
            raise _refused("tool_choice", _only_with("tool_choice", "tools"))
        if isinstance(choice, FunctionChoice | CustomChoice):
            _check_named("tool_choice", choice, defined or set())
        elif isinstance(choice, AllowedToolsChoice):
            for index, named in enumerate(choice.allowed_tools.tools):
                _check_named(f"tool_choice.allowed_tools.tools[{index}]", named, defined or set())
        if self.parallel_tool_calls is not None and defined is None:
            raise _refused("parallel_tool_calls", _only_with("parallel_tool_calls", "tools"))
        functions = None if self.functions is None else {function.name for function in self.functions}
        function_call = self.function_call
        if function_call is not None and function_call != "none" and functions is None:
            raise _refused("function_call", _only_with("function_call", "functions"))
        if isinstance(function_call, NamedFunction) and function_call.name not in (functions or set()):
            message = UNKNOWN_TOOL.format(kind="function", name=function_call.name, source="functions")
            raise _refused("function_call.name", f"Invalid value for 'function_call.name': {message}")
        return self


def _tool_name(tool: FunctionTool | CustomTool) -> str:
    return tool.function.name if isinstance(tool, FunctionTool) else tool.custom.name


def _only_with(param: str, needs: str) -> str:
    return f"Invalid value for '{param}': {ONLY_WITH.format(param=param, needs=needs)}"


def _check_named(param: str, named: FunctionChoice | CustomChoice, defined: set[tuple[Any, str]]) -> None:
    name = named.function.name if isinstance(named, FunctionChoice) else named.custom.name
    if (named.type, name) not in defined:
        message = UNKNOWN_TOOL.format(kind=f"{named.type} tool", name=name, source="tools")
        raise _refused(f"{param}.{named.type}.name", f"Invalid value for '{param}.{named.type}.name': {message}")


# --- the Responses API (`POST /v1/responses`) ----------------------------------------------------

CONVERSATION_REFUSED = (
    "Invalid value for 'conversation': the gateway does not pass conversations through (it could not "
    "check whose they are); continue a conversation with 'previous_response_id'."
)
ITEM_REFERENCE_REFUSED = (
    "Invalid value for '{param}': the gateway does not pass item references through (it could not "
    "check whose they are); send the item itself, or use 'previous_response_id'."
)
BACKGROUND_REFUSED = (
    "Invalid value for 'background': this gateway does not run background responses, since it "
    "could not bill a response it does not see finish. Use 'stream' instead."
)
MIN_OUTPUT_TOKENS = 16  # OpenAI's minimum for max_output_tokens


def _by_object_key(key: str, *, present: str, absent: str) -> Any:
    """A Discriminator among objects: `present` when the object has `key`, else `absent`; a
    non-object is an `invalid_type` error expecting an object."""

    def tag(value: Any) -> str | None:
        if isinstance(value, dict):
            return present if key in value else absent
        if isinstance(value, BaseModel):  # validating a model instance (model_validate of models)
            return present if hasattr(value, key) else absent
        return None

    return Discriminator(tag, custom_error_type="invalid_type", custom_error_message="an object")


class InputMessage(_Body):
    """A message of a Responses `input`: the item with a `role` (its `type`, if any, is "message")."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class InputItem(_Body):
    """Any other item of a Responses `input` (a function call, its output, a reasoning item...):
    only its `type` is checked, the upstream knows the rest."""

    type: str


ResponsesInput = Annotated[
    Annotated[str, Tag("~text")]
    | Annotated[
        Annotated[
            list[
                Annotated[
                    Annotated[InputMessage, Tag("~message")] | Annotated[InputItem, Tag("~item")],
                    _by_object_key("role", present="~message", absent="~item"),
                ]
            ],
            Field(min_length=1),
        ],
        Tag("~items"),
    ],
    _by_json_type(string="~text", array="~items"),
]


class ResponsesFunctionTool(_Body):
    """A function tool of the Responses API: flat, unlike chat's (`name` beside `type`)."""

    type: Literal["function"]
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesTool(_Body):
    """A built-in or other tool (`web_search`, `file_search`, `mcp`, ...): only its `type` is checked."""

    type: str


def _function_or_other(value: Any) -> str | None:
    if isinstance(value, dict):
        return "~function" if value.get("type") == "function" else "~other"
    if isinstance(value, BaseModel):
        return "~function" if getattr(value, "type", None) == "function" else "~other"
    return None


ResponsesToolDefinition = Annotated[
    Annotated[ResponsesFunctionTool, Tag("~function")] | Annotated[ResponsesTool, Tag("~other")],
    Discriminator(_function_or_other, custom_error_type="invalid_type", custom_error_message="an object"),
]


class ResponsesToolChoiceObject(_Body):
    """A tool the model must use (`{"type": "function", "name": ...}`, a built-in tool's type,
    `allowed_tools`...): only its `type` is checked."""

    type: str
    name: str | None = None


ResponsesToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("~mode")] | Annotated[ResponsesToolChoiceObject, Tag("~object")],
    _by_json_type(string="~mode", object="~object"),
]


class ResponsesJsonSchemaFormat(_Body):
    """Structured outputs of the Responses API: flat, unlike chat's `json_schema` wrapper."""

    type: Literal["json_schema"]
    name: Name
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


ResponsesFormat = Annotated[TextFormat | JsonObjectFormat | ResponsesJsonSchemaFormat, Field(discriminator="type")]


class ResponsesText(_Body):
    format: ResponsesFormat | None = None


class ResponsesRequest(_Body):
    """`POST /v1/responses`: OpenAI's Responses request. `stream_options` is not one of its
    parameters; like any unknown field it passes through."""

    model: Annotated[str, StringConstraints(min_length=1)]
    input: ResponsesInput | None = None
    instructions: str | None = None
    stream: bool | None = None
    max_output_tokens: Annotated[int, Field(ge=MIN_OUTPUT_TOKENS)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    tools: list[ResponsesToolDefinition] | None = None
    tool_choice: ResponsesToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: ResponsesText | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    background: bool | None = None

    @model_validator(mode="after")
    def _references(self) -> ResponsesRequest:
        # A background response runs on after the request ends, where the gateway cannot see it
        # finish: it could neither bill it nor give back its hold. A stream gives the same
        # answer in a call the gateway sees through.
        if self.background:
            raise _refused("background", BACKGROUND_REFUSED)
        # A conversation or an item reference names something stored upstream under the
        # gateway's own key: the gateway could not tell whose it is. (`previous_response_id` is
        # checked against the caller's own calls, `calls.stored`.)
        if getattr(self, "conversation", None) is not None:
            raise _refused("conversation", CONVERSATION_REFUSED)
        if isinstance(self.input, list):
            for index, item in enumerate(self.input):
                kind = item.get("type") if isinstance(item, dict) else getattr(item, "type", None)
                if kind == "item_reference":
                    raise _refused(f"input[{index}]", ITEM_REFERENCE_REFUSED.format(param=f"input[{index}]"))
        return self


# --- embeddings (`POST /v1/embeddings`) ----------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the inputs of one request
MAX_EMBEDDING_DIMENSIONS = 3072  # the largest OpenAI embedding model's (text-embedding-3-large)

TokenId = Annotated[int, Field(ge=0)]
NonEmptyText = Annotated[str, StringConstraints(min_length=1)]


def _by_first_item(*, strings: str, tokens: str, token_lists: str) -> Any:
    """A Discriminator among arrays by their first item's JSON type: strings, token ids (integers)
    or token-id arrays. An empty array, or one whose first item is none of these, is taken as
    strings (the common case), so that its error reads as OpenAI's."""

    def tag(value: Any) -> str:
        first = value[0] if isinstance(value, list) and value else None
        if isinstance(first, int) and not isinstance(first, bool):
            return tokens
        if isinstance(first, list):
            return token_lists
        return strings

    return Discriminator(tag)


EmbeddingsInput = Annotated[
    Annotated[NonEmptyText, Tag("~text")]
    | Annotated[
        Annotated[
            Annotated[Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)], Tag("~strings")]
            | Annotated[Annotated[list[TokenId], Field(min_length=1)], Tag("~tokens")]
            | Annotated[
                Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)],
                Tag("~token_lists"),
            ],
            _by_first_item(strings="~strings", tokens="~tokens", token_lists="~token_lists"),
        ],
        Tag("~array"),
    ],
    _by_json_type(string="~text", array="~array"),
]


class EmbeddingsRequest(_Body):
    """`POST /v1/embeddings`: OpenAI's embeddings request."""

    model: Annotated[str, StringConstraints(min_length=1)]
    input: EmbeddingsInput
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1, le=MAX_EMBEDDING_DIMENSIONS)] | None = None
    user: str | None = None


# --- legacy completions (`POST /v1/completions`) -------------------------------------------------

MAX_COMPLETION_N = 128
MAX_BEST_OF = 20
MAX_LOGPROBS = 5
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for this endpoint (not chat's "no limit")
BEST_OF_BELOW_N = "'best_of' must be greater than or equal to 'n'."
BEST_OF_STREAMED = "'best_of' greater than 1 cannot be streamed."

CompletionPrompt = Annotated[
    Annotated[str, Tag("~text")]
    | Annotated[
        Annotated[
            Annotated[Annotated[list[str], Field(min_length=1)], Tag("~strings")]
            | Annotated[Annotated[list[TokenId], Field(min_length=1)], Tag("~tokens")]
            | Annotated[Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)], Tag("~token_lists")],
            _by_first_item(strings="~strings", tokens="~tokens", token_lists="~token_lists"),
        ],
        Tag("~array"),
    ],
    _by_json_type(string="~text", array="~array"),
]


class CompletionRequest(_Body):
    """`POST /v1/completions`: OpenAI's legacy (text) completions request."""

    model: Annotated[str, StringConstraints(min_length=1)]
    prompt: CompletionPrompt
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_COMPLETION_N)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_BEST_OF)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: Stop | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: int | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _references(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise _refused("stream_options", f"Invalid value for 'stream_options': {STREAM_OPTIONS_WITHOUT_STREAM}")
        if self.best_of is not None and self.best_of < (self.n if self.n is not None else 1):
            raise _refused("best_of", f"Invalid value for 'best_of': {BEST_OF_BELOW_N}")
        # The client would see n of best_of candidates stream by, and the gateway could not tell
        # which were dropped: OpenAI refuses it too ("Results cannot be streamed").
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise _refused("best_of", f"Invalid value for 'best_of': {BEST_OF_STREAMED}")
        return self


# --- responses (published, and what the tests hold the gateway's answers to) --------------------


class ErrorDetail(_Closed):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Closed):
    """Every error the API answers, whatever its status."""

    error: ErrorDetail


class Usage(_Closed):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantReply(_Closed):
    role: Literal["assistant"]
    content: str | None = None


class Choice(_Closed):
    index: int
    message: AssistantReply
    finish_reason: str | None


class ChatCompletion(_Closed):
    """A non-streamed answer (`stream` false)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class Delta(_Closed):
    role: str | None = None
    content: str | None = None


class ChunkChoice(_Closed):
    index: int
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(_Closed):
    """One `data:` event of a streamed answer; the stream ends with `data: [DONE]`, or with an
    `ErrorResponse` event when the upstream failed or the call was stopped."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class Model(_Closed):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Closed):
    object: Literal["list"]
    data: list[Model]


class ResponseUsage(_Closed):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class Response(_Closed):
    """A Responses API answer (`stream` false), and the `response` its stream's `response.created`
    and `response.completed` events carry. `output` items are the upstream's, passed on as sent."""

    id: str
    object: Literal["response"]
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]]
    usage: ResponseUsage | None = None


class ResponseStreamEvent(_Closed):
    """One event of a streamed response (`event: <type>` then this as `data:`); the stream ends
    with `response.completed` (or `response.incomplete`), or with an `error` event."""

    type: str
    sequence_number: int


class ResponseDeleted(_Closed):
    id: str
    object: Literal["response"]
    deleted: bool


class Embedding(_Closed):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # a string with `encoding_format: "base64"`


class EmbeddingsUsage(_Closed):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(_Closed):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


class CompletionChoice(_Closed):
    text: str
    index: int
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class Completion(_Closed):
    """A legacy completion; streamed, each `data:` event is one of these (then `data: [DONE]`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
