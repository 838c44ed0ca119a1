"""The API's request and response bodies, declared once (pydantic).

`ChatCompletionRequest` is what `streaming.validation` checks every `/v1/chat/completions` body
against, before any work, and what `/v1/openapi.json` publishes (with the response shapes below,
which the tests hold the gateway's answers to). Fields are strict (no coercion: `"10"` is not an
integer, `true` is not a number) and declared in the order they are checked, so the error a client
gets is about the first field that is wrong. Unknown fields are allowed and pass through to the
upstream unchanged, since it may be another OpenAI-compatible server with options of its own.

What a shape cannot say is checked after it, in `ChatCompletionRequest._references`: a
`tool_choice` names a tool of `tools`, `function_call` a function of `functions`, and the fields
that are only allowed with others. Where OpenAI is stricter than a harmless request needs, this
schema is lenient on purpose: `tool_choice: "none"` passes without `tools`, and JSON schemas
(`parameters`, `response_format.json_schema.schema`) are only checked to be objects.

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
