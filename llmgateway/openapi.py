"""The OpenAPI 3.1 document of the gateway's API, served at `GET /v1/openapi.json`.

Built from the schemas the gateway validates with and answers in (`streaming.schema`), so what
is published is what is enforced. A streamed answer is described by its media type
(`text/event-stream`) and the schema of each event (`ChatCompletionChunk`, `ResponseStreamEvent`,
`Completion`, as `x-event-schema`), since OpenAPI has no way to type server-sent events.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from pydantic import BaseModel

from streaming import schema

ERRORS = {
    "400": "The body is not valid JSON, or does not match the schema: `param` names the first wrong field.",
    "401": "No API key, or one that is unknown, revoked or expired (`invalid_api_key`).",
    "403": "The key may not use this model, or the call was stopped (staff, a revoked key, a suspended user).",
    "404": "An unknown model (`model_not_found`) or path (`unknown_url`).",
    "405": "A method the path does not take; `Allow` says which it does.",
    "408": "The body did not arrive within the gateway's body timeout.",
    "413": "The body is larger than the gateway accepts.",
    "429": "A rate limit (`rate_limit_exceeded`, with `Retry-After` and `x-ratelimit-*`), or the budget (`insufficient_quota`).",
    "502": "The upstream failed before the first token.",
    "503": "The database, the ledger journal or the rate limiter is unavailable; retry after `Retry-After`.",
    "504": "The upstream sent no first token in time.",
}
REQUEST_ID = {
    "x-request-id": {
        "description": "The call's id: its last attempt's ledger row's `request_id` (and every attempt's `call_id`) when it reached an upstream.",
        "schema": {"type": "string"},
    }
}
# On calls (chat, responses, completions, embeddings) that reached an upstream, answered or not.
UPSTREAM_ANSWER = {
    "x-gateway-model": {
        "description": "The model that answered: the one asked for, or its fallback.",
        "schema": {"type": "string"},
    },
    "x-gateway-deployment": {
        "description": "The deployment that answered (or failed last): `provider/upstream_model`.",
        "schema": {"type": "string"},
    },
    "x-gateway-attempts": {
        "description": "Upstream attempts the call made (retries and fallbacks before the first token).",
        "schema": {"type": "integer"},
    },
}


def _package_version() -> str:
    try:
        return version("llmgateway")
    except PackageNotFoundError:
        return "0"


class _Components:
    """The document's `components.schemas`, filled from pydantic models as they are referenced."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        if model.__name__ not in self.schemas:
            generated = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
            self.schemas.update(generated.pop("$defs", {}))
            self.schemas[model.__name__] = generated
        return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(components: _Components, statuses: list[str]) -> dict[str, Any]:
    error = {"application/json": {"schema": components.ref(schema.ErrorResponse)}}
    return {status: {"description": ERRORS[status], "headers": REQUEST_ID, "content": error} for status in statuses}


CALL_ERRORS = ["400", "401", "403", "404", "405", "408", "413", "429", "502", "503", "504"]
# Reading, deleting or cancelling a stored response goes to the upstream that made it.
STORED_ERRORS = ["401", "404", "405", "502", "503", "504"]


def _call(
    components: _Components,
    *,
    operation_id: str,
    summary: str,
    request: type[BaseModel],
    answer: type[BaseModel],
    description: str,
    event: type[BaseModel] | None = None,
) -> dict[str, Any]:
    """A `POST` that makes one call: its body, its answer (and, streamed, its events), its errors."""
    content: dict[str, Any] = {"application/json": {"schema": components.ref(answer)}}
    if event is not None:
        content["text/event-stream"] = {"schema": {"type": "string"}, "x-event-schema": components.ref(event)}
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": components.ref(request)}}},
            "responses": {
                "200": {"description": description, "headers": {**REQUEST_ID, **UPSTREAM_ANSWER}, "content": content},
                **_errors(components, CALL_ERRORS),
            },
        }
    }


def _stored(components: _Components, *, operation_id: str, summary: str, answer: type[BaseModel], description: str, errors: list[str]) -> dict[str, Any]:
    """An operation on a stored response (`/responses/{response_id}`)."""
    return {
        "operationId": operation_id,
        "summary": summary,
        "parameters": [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {
            "200": {"description": description, "headers": REQUEST_ID, "content": {"application/json": {"schema": components.ref(answer)}}},
            **_errors(components, errors),
        },
    }


def build_document() -> dict[str, Any]:
    components = _Components()
    model_parameter = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llmgateway",
            "version": _package_version(),
            "description": "An OpenAI-compatible gateway: point any OpenAI SDK's base URL at `/v1`.",
        },
        "servers": [{"url": "/v1"}],
        "security": [{"apiKey": []}],
        "paths": {
            "/chat/completions": _call(
                components,
                operation_id="createChatCompletion",
                summary="Create a chat completion, streamed or not.",
                request=schema.ChatCompletionRequest,
                answer=schema.ChatCompletion,
                event=schema.ChatCompletionChunk,
                description="The completion; with `stream: true`, server-sent events, one chunk per `data:` line, then `data: [DONE]`.",
            ),
            "/responses": _call(
                components,
                operation_id="createResponse",
                summary="Create a model response (the Responses API), streamed or not; `background: true` is refused.",
                request=schema.ResponsesRequest,
                answer=schema.Response,
                event=schema.ResponseStreamEvent,
                description=(
                    "The response; with `stream: true`, server-sent events (`event: <type>`, then the event as `data:`), "
                    "ending with `response.completed` (or `response.incomplete`), or an `error` event."
                ),
            ),
            "/responses/{response_id}": {
                "get": _stored(
                    components,
                    operation_id="getResponse",
                    summary="A stored response made by one of the caller's calls.",
                    answer=schema.Response,
                    description="The response, as its upstream stored it.",
                    errors=STORED_ERRORS,
                ),
                "delete": _stored(
                    components,
                    operation_id="deleteResponse",
                    summary="Delete a stored response made by one of the caller's calls.",
                    answer=schema.ResponseDeleted,
                    description="The response was deleted.",
                    errors=STORED_ERRORS,
                ),
            },
            "/responses/{response_id}/cancel": {
                "post": _stored(
                    components,
                    operation_id="cancelResponse",
                    summary="Cancel a response made by one of the caller's calls (upstream, only background responses can be).",
                    answer=schema.Response,
                    description="The response, cancelled.",
                    errors=["400", *STORED_ERRORS],
                ),
            },
            "/completions": _call(
                components,
                operation_id="createCompletion",
                summary="Create a (legacy) text completion, streamed or not.",
                request=schema.CompletionRequest,
                answer=schema.Completion,
                event=schema.Completion,
                description="The completion; with `stream: true`, server-sent events, one `data:` line per chunk, then `data: [DONE]`.",
            ),
            "/embeddings": _call(
                components,
                operation_id="createEmbedding",
                summary="Create embeddings of one or more inputs (strings or token ids).",
                request=schema.EmbeddingsRequest,
                answer=schema.CreateEmbeddingResponse,
                description="The embeddings, one per input, in the order of the inputs.",
            ),
            "/models": {
                "get": {
                    "operationId": "listModels",
                    "summary": "The models this gateway serves.",
                    "responses": {
                        "200": {"description": "The models.", "headers": REQUEST_ID, "content": {"application/json": {"schema": components.ref(schema.ModelList)}}},
                        **_errors(components, ["401", "405"]),
                    },
                }
            },
            "/models/{model}": {
                "get": {
                    "operationId": "retrieveModel",
                    "summary": "One model.",
                    "parameters": [model_parameter],
                    "responses": {
                        "200": {"description": "The model.", "headers": REQUEST_ID, "content": {"application/json": {"schema": components.ref(schema.Model)}}},
                        **_errors(components, ["401", "404", "405"]),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenApiDocument",
                    "summary": "This document.",
                    "security": [],
                    "responses": {"200": {"description": "The OpenAPI document.", "content": {"application/json": {"schema": {"type": "object"}}}}},
                }
            },
        },
        "components": {
            "schemas": components.schemas,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "An API key of this gateway (`manage.py createapikey`)."}},
        },
    }


@cache
def document_bytes() -> bytes:
    return orjson.dumps(build_document())
