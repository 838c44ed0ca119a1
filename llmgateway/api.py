"""The OpenAI-compatible `/v1` API. Views parse, authenticate and hand over to one service."""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from calls import stored as calls_stored
from calls.call import ApiCall
from calls.stored import StoredAction
from llmgateway import openapi
from llmgateway.auth import Principal, aauthenticate, aprincipal_for_api_call
from llmgateway.errors import (
    ApiError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    api_error_for,
    error_response,
)
from llmgateway.middleware import REQUEST_ID_HEADER, stamp_upstream_call
from streaming import validation
from streaming.validation import CallParams, parse_json_object
from upstreams.catalog import acatalog

logger = logging.getLogger(__name__)

BODY_TOO_LARGE = "The request body is larger than the gateway accepts ({limit} bytes)."
UNKNOWN_ENDPOINT = "Unknown request URL: {method} {path}."
INTERNAL_ERROR = "The gateway failed to process the request. It has been logged."
SIMULATOR_HEADER_PREFIX = "x-simulator-"


def _json(payload: object, status: int = 200) -> HttpResponse:
    return HttpResponse(orjson.dumps(payload), status=status, content_type="application/json")


def _error_answer(error: Exception) -> HttpResponse:
    """The OpenAI error response for any exception; one that maps to none is a logged 500."""
    api_error = api_error_for(error)
    if api_error is None:
        logger.exception("unhandled error in %s", type(error).__name__, exc_info=error)
        api_error = ApiError(INTERNAL_ERROR)
    return error_response(api_error)


def _read_body(request: HttpRequest) -> bytes:
    limit = settings.GATEWAY_MAX_BODY_BYTES
    try:
        declared = int(request.headers.get("Content-Length") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise PayloadTooLarge(BODY_TOO_LARGE.format(limit=limit))
    try:
        body = request.body
    except RequestDataTooBig:
        raise PayloadTooLarge(BODY_TOO_LARGE.format(limit=limit)) from None
    if len(body) > limit:
        raise PayloadTooLarge(BODY_TOO_LARGE.format(limit=limit))
    return body


type Validator = Callable[[dict[str, Any]], CallParams]


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    """`POST /v1/chat/completions`, authenticated by API key."""
    return await serve_call(request, lambda: aprincipal_for_api_call(request), validation.validate_chat_body)


@csrf_exempt
async def responses(request: HttpRequest) -> HttpResponseBase:
    """`POST /v1/responses`: the Responses API, streamed (typed events) or not."""
    return await serve_call(request, lambda: aprincipal_for_api_call(request), validation.validate_responses_body)


@csrf_exempt
async def completions(request: HttpRequest) -> HttpResponseBase:
    """`POST /v1/completions`: legacy text completions, for older clients."""
    return await serve_call(request, lambda: aprincipal_for_api_call(request), validation.validate_completions_body)


@csrf_exempt
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    """`POST /v1/embeddings`."""
    return await serve_call(request, lambda: aprincipal_for_api_call(request), validation.validate_embeddings_body)


@csrf_exempt
async def stored_response(request: HttpRequest, response_id: str) -> HttpResponse:
    """`GET` or `DELETE /v1/responses/{response_id}`: one of the caller's stored responses."""
    actions: dict[str, StoredAction] = {"GET": "retrieve", "DELETE": "delete"}
    return await _serve_stored(request, response_id, actions)


@csrf_exempt
async def stored_response_cancel(request: HttpRequest, response_id: str) -> HttpResponse:
    """`POST /v1/responses/{response_id}/cancel`."""
    return await _serve_stored(request, response_id, {"POST": "cancel"})


async def _serve_stored(request: HttpRequest, response_id: str, actions: dict[str, StoredAction]) -> HttpResponse:
    try:
        action = actions.get(str(request.method))
        if action is None:
            raise MethodNotAllowed(str(request.method), allowed=", ".join(actions))
        principal = await aprincipal_for_api_call(request)
        return _json(await calls_stored.stored_response(principal=principal, response_id=response_id, action=action))
    except Exception as error:
        return _error_answer(error)


class CallStreamingResponse(StreamingHttpResponse):
    """A call's SSE stream. It ends its call even if the server never iterates the body, and
    its `frames` (bytes, one write each) are what `llmgateway.asgi` sends, without Django's
    per-part wrapping."""

    def __init__(self, call: ApiCall, frames: AsyncGenerator[bytes]) -> None:
        super().__init__(frames, content_type="text/event-stream; charset=utf-8")
        self.call = call
        self.frames = frames

    def close(self) -> None:
        self.call.finish_threadsafe()
        super().close()


def _simulator_headers(request: HttpRequest) -> dict[str, str]:
    # Django gives Title-Case header names (`X-Simulator-Fault`); the simulator reads lower-case.
    return {
        name.lower()[len(SIMULATOR_HEADER_PREFIX) :]: value
        for name, value in request.headers.items()
        if name.lower().startswith(SIMULATOR_HEADER_PREFIX)
    }


async def serve_call(request: HttpRequest, authenticate: Callable[[], Awaitable[Principal]], validate: Validator) -> HttpResponseBase:
    """Authenticate, validate and run one call to any endpoint (shared with the web chat page).

    Every response, error or not, carries the call's `x-request-id`: the ledger row's
    `request_id` when the call reached an upstream.
    """
    request_id = uuid.uuid4()
    headers: dict[str, str] = {}
    try:
        response = await _call(request, authenticate, validate, request_id, headers)
    except Exception as error:
        response = _error_answer(error)
    for name, value in headers.items():
        if name not in response:
            response[name] = value
    response[REQUEST_ID_HEADER] = str(request_id)
    return response


async def _call(
    request: HttpRequest,
    authenticate: Callable[[], Awaitable[Principal]],
    validate: Validator,
    request_id: uuid.UUID,
    headers: dict[str, str],
) -> HttpResponseBase:
    if request.method != "POST":
        raise MethodNotAllowed(str(request.method), allowed="POST")
    principal = await authenticate()
    params = validate(parse_json_object(_read_body(request)))
    call = ApiCall(principal=principal, params=params, request_id=request_id, simulator=_simulator_headers(request))
    async with call:
        headers.update(call.response_headers())
        try:
            first = await call.start()
        finally:  # which model and deployment answered (or failed last)
            headers.update(call.response_headers())
        if params.stream:
            response: HttpResponseBase = CallStreamingResponse(call, call.stream_frames(first))
            # A server that drops the response without iterating or closing it still ends the call.
            weakref.finalize(response, call.finish_threadsafe)
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
        else:
            response = _json(await call.complete(first))
    stamp_upstream_call(request, response, upstream_seconds=call.upstream_wait_seconds())
    return response


@csrf_exempt
async def models_list(request: HttpRequest) -> HttpResponse:
    try:
        if request.method != "GET":
            raise MethodNotAllowed(str(request.method), allowed="GET")
        await aauthenticate(request.headers.get("Authorization"))
    except Exception as error:
        return _error_answer(error)
    data = [
        {"id": route.id, "object": "model", "created": route.created, "owned_by": route.owned_by}
        for route in (await acatalog()).available()
    ]
    return _json({"object": "list", "data": data})


@csrf_exempt
async def model_detail(request: HttpRequest, model: str) -> HttpResponse:
    try:
        if request.method != "GET":
            raise MethodNotAllowed(str(request.method), allowed="GET")
        await aauthenticate(request.headers.get("Authorization"))
        for route in (await acatalog()).available():
            if route.id == model:
                return _json({"id": route.id, "object": "model", "created": route.created, "owned_by": route.owned_by})
        raise NotFound(f"The model `{model}` does not exist or you do not have access to it.", param="model", code="model_not_found")
    except Exception as error:
        return _error_answer(error)


@csrf_exempt
async def openapi_document(request: HttpRequest) -> HttpResponse:
    """`GET /v1/openapi.json`: the API's OpenAPI document (no key needed)."""
    if request.method != "GET":
        return error_response(MethodNotAllowed(str(request.method), allowed="GET"))
    return HttpResponse(openapi.document_bytes(), content_type="application/json")


@csrf_exempt
async def unknown_endpoint(request: HttpRequest, path: str = "") -> HttpResponse:
    return error_response(NotFound(UNKNOWN_ENDPOINT.format(method=request.method, path=request.path), code="unknown_url"))
