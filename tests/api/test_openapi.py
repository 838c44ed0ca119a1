"""The published OpenAPI document is valid OpenAPI 3.1, is served without a key, and declares the
very schema the gateway validates request bodies with."""

from __future__ import annotations

import orjson
import pytest
from django.test import AsyncClient
from openapi_spec_validator import validate
from pydantic import BaseModel

from streaming.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    ResponsesRequest,
)

pytestmark = [pytest.mark.django_db]


async def fetched() -> dict:
    response = await AsyncClient().get("/v1/openapi.json")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    return orjson.loads(response.content)


async def test_the_document_is_valid_openapi_and_needs_no_key() -> None:
    document = await fetched()
    validate(document)  # raises on any violation of the OpenAPI 3.1 specification
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == {
        "/chat/completions",
        "/responses",
        "/responses/{response_id}",
        "/responses/{response_id}/cancel",
        "/completions",
        "/embeddings",
        "/models",
        "/models/{model}",
        "/openapi.json",
    }
    assert set(document["paths"]["/responses/{response_id}"]) == {"get", "delete"}
    assert set(document["paths"]["/responses/{response_id}/cancel"]) == {"post"}


@pytest.mark.parametrize(
    ("path", "request_schema"),
    [
        ("/chat/completions", ChatCompletionRequest),
        ("/responses", ResponsesRequest),
        ("/completions", CompletionRequest),
        ("/embeddings", EmbeddingsRequest),
    ],
    ids=["chat", "responses", "completions", "embeddings"],
)
async def test_the_request_schema_is_the_one_bodies_are_validated_with(path: str, request_schema: type[BaseModel]) -> None:
    document = await fetched()
    declared = request_schema.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    defined = declared.pop("$defs", {})
    schemas = document["components"]["schemas"]
    assert schemas[request_schema.__name__] == declared
    for name, definition in defined.items():  # shared definitions are the same for every request
        assert schemas[name] == definition
    body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{request_schema.__name__}"}


@pytest.mark.parametrize(
    ("path", "answer", "event"),
    [
        ("/chat/completions", "ChatCompletion", "ChatCompletionChunk"),
        ("/responses", "Response", "ResponseStreamEvent"),
        ("/completions", "Completion", "Completion"),
        ("/embeddings", "CreateEmbeddingResponse", None),
    ],
    ids=["chat", "responses", "completions", "embeddings"],
)
async def test_each_call_publishes_its_answer_and_the_events_of_its_stream(path: str, answer: str, event: str | None) -> None:
    document = await fetched()
    content = document["paths"][path]["post"]["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{answer}"}
    if event is None:
        assert "text/event-stream" not in content  # embeddings are never streamed
    else:
        assert content["text/event-stream"]["x-event-schema"] == {"$ref": f"#/components/schemas/{event}"}


async def test_every_reference_resolves_and_every_error_is_the_error_shape() -> None:
    document = await fetched()
    schemas = document["components"]["schemas"]

    def references(node: object) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [ref for value in node.values() for ref in references(value)]
        if isinstance(node, list):
            return [ref for value in node for ref in references(value)]
        return []

    for reference in references(document):
        assert reference.startswith("#/components/schemas/") and reference.rsplit("/", 1)[1] in schemas
    for path in document["paths"].values():
        for operation in path.values():
            for status, answer in operation["responses"].items():
                if int(status) >= 400:
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
                    assert "x-request-id" in answer["headers"]


async def test_other_methods_are_refused_with_allow() -> None:
    response = await AsyncClient().post("/v1/openapi.json")
    assert response.status_code == 405
    assert response["Allow"] == "GET"
