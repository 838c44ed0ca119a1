"""The `openai` provider: any OpenAI-compatible upstream, through the official SDK.

One `AsyncOpenAI` client per upstream is shared by every request (connection pooling), with the
SDK's retries off: the gateway decides about retries, and a retried stream would double-bill.
The request body is forwarded as sent (so new OpenAI parameters pass through) to the endpoint's
path (`streaming.endpoints`), and the events are relayed as the upstream sent them. The SDK builds
the request (URL, auth, headers, timeouts: once per path, `OpenAIProvider._template`) and makes
the typed errors; each call is sent on the aiohttp session under the SDK's own transport, and the
body is parsed here, which costs a fraction of the SDK's per-chunk decoding, and each event is
read by its endpoint.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, cast

import aiohttp
import httpx2
import openai
import orjson
from openai._models import FinalRequestOptions
from openai._vendor.httpx_aiohttp.transport import AiohttpTransport  # the SDK's aiohttp transport

from infra.sockets import shut_down_now
from streaming.catalog import Deployment
from streaming.providers.base import (
    ProviderChunk,
    ProviderRequest,
    UpstreamError,
    UpstreamErrorKind,
)

if TYPE_CHECKING:
    from streaming.endpoints import Endpoint

CLIENT_REQUEST_ID_HEADER = "x-client-request-id"  # lower case, as the template's names are
DRAIN_TIMEOUT = 0.5  # seconds
BODY_PIECE_BYTES = 4 * 1024
UPSTREAM_READ_BUFFER_BYTES = 16 * 1024
UNREACHABLE = "Could not reach the upstream, or it dropped the connection."
# What aiohttp decodes itself whatever else is installed (httpx2 may offer more).
ACCEPT_ENCODING = "gzip, deflate"
# Each call has its own body length, and sends no cookie (see `_aiohttp_transport`).
_PER_CALL_HEADERS = frozenset({"content-length", "cookie"})
_BODY_FRAMING_HEADERS = frozenset({b"content-encoding", b"content-length", b"transfer-encoding"})


@dataclass(frozen=True, slots=True)
class _Template:
    """What the SDK's request to one path is, whatever the call: see `OpenAIProvider._template`."""

    url: str
    headers: dict[str, str]
    timeout: aiohttp.ClientTimeout


# The headers an answer's failure keeps: when to come back, and the upstream's limits.
RATE_LIMIT_HEADERS = (
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: headers[name] for name in RATE_LIMIT_HEADERS if name in headers}


def _retry_after(headers: httpx2.Headers) -> float | None:
    retry_ms = headers.get("retry-after-ms")
    if retry_ms:
        try:
            return max(0.0, float(retry_ms) / 1000)
        except ValueError:
            pass
    for name in ("retry-after", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        value = headers.get(name)
        if value:
            seconds = parse_duration(value)
            if seconds is not None:
                return seconds
    return None


def parse_duration(value: str) -> float | None:
    """Parse `retry-after` seconds or OpenAI reset durations such as `1s`, `6m0s`, `250ms`."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    total, number = 0.0, ""
    index = 0
    while index < len(value):
        char = value[index]
        if char.isdigit() or char == ".":
            number += char
            index += 1
            continue
        unit = "ms" if value.startswith("ms", index) else char
        index += len(unit)
        if not number:
            return None
        factor = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}.get(unit)
        if factor is None:
            return None
        total += float(number) * factor
        number = ""
    return total if not number else None


def _status_kind(status: int) -> UpstreamErrorKind:
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if 400 <= status < 500:
        return "bad_request"
    return "server_error"


def _error_message(body: Any, default: str) -> str:
    """The `message` of an OpenAI error body (`{"error": {...}}` or the inner object)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return default


def _limit_type(body: Any) -> Literal["requests", "tokens"] | None:
    """Which limit an OpenAI 429 says was reached: its error `type` is `requests` or `tokens`."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("type") in ("requests", "tokens"):
            return cast(Literal["requests", "tokens"], inner["type"])
    return None


def _aiohttp_transport(max_connections: int, receive_buffer: int) -> AiohttpTransport:
    """The transport `openai.DefaultAioHttpClient` builds, on a session whose read buffer is
    `UPSTREAM_READ_BUFFER_BYTES` rather than aiohttp's 256 KB, and whose sockets have a kernel
    receive buffer of `receive_buffer` bytes (0: the kernel's autotuning).

    A connection's reader takes up to twice its read buffer before it stops reading the socket,
    plus what one read of the socket brings (up to the event loop's 256 KB), and a stream whose
    client does not read keeps that much in the process. One read brings at most what the kernel
    holds for the socket, so its receive buffer bounds both that read and what the upstream can
    send ahead of a stalled client; past it the upstream sees the pressure.
    """
    limits = httpx2.Limits(max_connections=max_connections)

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=max_connections,
            keepalive_timeout=limits.keepalive_expiry,
            ssl=httpx2.create_ssl_context(),
            socket_factory=_socket_factory(receive_buffer) if receive_buffer else None,
        )
        # No cookie jar: a cookie an upstream set (a load balancer's) would go with every later call.
        return aiohttp.ClientSession(
            connector=connector, read_bufsize=UPSTREAM_READ_BUFFER_BYTES, cookie_jar=aiohttp.DummyCookieJar()
        )

    return AiohttpTransport(limits=limits, client=session)


def _is_failed_connection(error: BaseException) -> bool:
    """Whether an error, or one it was raised from, is a refused or dropped connection rather
    than a timeout: aiohttp's own errors (the provider's sends), and the SDK's, whose aiohttp
    transport reports every aiohttp connection error as `httpx2.ConnectTimeout` (the SDK then
    raises `APITimeoutError` from it)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, TimeoutError):
            return True
        cause = cause.__cause__
    return False


def _socket_factory(receive_buffer: int) -> aiohttp.SocketFactoryType:
    """Sockets whose receive buffer is set before they connect: the window the connection
    offers the upstream is then sized to it from the first packet (and not autotuned)."""

    def make_socket(address: aiohttp.AddrInfoType) -> socket.socket:
        family, kind, proto, _, _ = address
        made = socket.socket(family=family, type=kind, proto=proto)
        try:
            made.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        except OSError:
            made.close()
            raise
        return made

    return make_socket


def _no_answer(error: BaseException) -> UpstreamError:
    """A request that got no answer: timed out, or (a failed connection, even one reported as a
    timeout) never reached the upstream or lost it."""
    timed_out = isinstance(error, openai.APITimeoutError | httpx2.TimeoutException | TimeoutError)
    if timed_out and not _is_failed_connection(error):
        return UpstreamError("timeout", "The upstream timed out.")
    return UpstreamError("connection", UNREACHABLE)


def translate_error(error: Exception) -> UpstreamError:
    """Map the SDK's request exceptions onto the gateway's UpstreamError kinds."""
    if isinstance(error, openai.APIConnectionError):  # APITimeoutError is one
        return _no_answer(error)
    if isinstance(error, openai.APIStatusError):
        headers = rate_limit_headers(error.response.headers)
        return UpstreamError(
            _status_kind(error.status_code),
            _error_message(error.body, error.message),
            status=error.status_code,
            retry_after=_retry_after(error.response.headers),
            headers=headers,
            limit_type=_limit_type(error.body) if error.status_code == 429 else None,
        )
    return UpstreamError("server_error", f"Unexpected upstream failure: {type(error).__name__}")


class OpenAIProvider:
    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
        receive_buffer: int = 0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        timeout = httpx2.Timeout(read_timeout, connect=connect_timeout)
        self._transport = _aiohttp_transport(max_connections, receive_buffer)
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            # Upstreams without keys (a local vLLM, Ollama) take any; the SDK refuses an empty one.
            api_key=api_key or "unused",
            max_retries=0,
            timeout=timeout,
            default_headers=dict(headers or {}),
            # The SDK's aiohttp transport (`openai[aiohttp]`): measured here it cut the gateway's
            # CPU per 50-token stream paced at 20 ms from 8.9 to 6.5 ms against the default
            # httpx2 one. Its pool holds at most `max_connections`, idle ones included (unset,
            # aiohttp caps it at 100: 100 concurrent calls).
            http_client=openai.DefaultAioHttpClient(
                timeout=timeout,
                limits=httpx2.Limits(max_connections=max_connections),
                transport=self._transport,
            ),
        )
        self._templates: dict[str, _Template] = {}
        # An upstream's configured Accept-Encoding (`identity`, say) is sent as configured.
        configured = {name.lower(): value for name, value in (headers or {}).items()}
        self._accept_encoding = configured.get("accept-encoding", ACCEPT_ENCODING)

    async def aclose(self) -> None:
        await self._client.close()

    def _session(self) -> aiohttp.ClientSession:
        """The aiohttp session under the SDK's transport (made on first use, as the transport
        itself does): the SDK's own calls and the gateway's share one pool of connections."""
        if not isinstance(self._transport.client, aiohttp.ClientSession):
            self._transport.client = self._transport.get_client()
        return self._transport.client

    async def _template(self, path: str) -> _Template:
        """The SDK's request to `path` with no body: its URL, auth, headers and timeouts, which
        are the same for every call (the SDK builds them once per path, not once per call).

        Built in a thread: the SDK's first request reads the platform (blocking).
        """
        template = self._templates.get(path)
        if template is None:
            options = FinalRequestOptions.construct(method="post", url=path)
            built = await asyncio.to_thread(self._client._build_request, options)
            headers = {name: value for name, value in built.headers.items() if name not in _PER_CALL_HEADERS}
            headers["accept-encoding"] = self._accept_encoding
            if "x-stainless-async" in headers:  # built in a thread, the SDK saw no event loop
                headers["x-stainless-async"] = "async:asyncio"
            timeouts = built.extensions.get("timeout", {})
            template = self._templates[path] = _Template(
                url=str(built.url),
                headers=headers,
                # As the SDK's transport maps httpx's timeouts onto aiohttp's, but no read timeout:
                # every body `stream` reads is under the relay's first-token and idle deadlines
                # (`streaming.pipeline`, which the provider's `read_timeout` tightens), whereas
                # aiohttp's would cancel and set a timer on every read.
                timeout=aiohttp.ClientTimeout(sock_connect=timeouts.get("connect"), sock_read=None, connect=timeouts.get("pool")),
            )
        return template

    async def _send(self, path: str, body: Mapping[str, Any], *, request_id: str) -> aiohttp.ClientResponse:
        """POST `body` as the SDK would, on the session under its transport, and raise its typed
        error (`translate_error`d) for an answer that is not a success; the body of a success
        is unread.

        The SDK's own `post()` builds the same request anew for every call (options, URL, headers,
        retries) and httpx wraps the transport's answer in its own models: together most of a
        short call's cost here. This takes the SDK's request once per path (`_template`) and
        sends it with the call's body straight through aiohttp, as the SDK's transport does. It
        holds for a client with a fixed API key, as `__init__` builds it (no key provider, no
        custom auth).
        """
        template = await self._template(path)
        headers = template.headers
        if request_id:
            # OpenAI's header for the caller's own id, so the upstream's logs name the gateway's
            # ledger row (and a reconciliation can match them).
            headers = {**headers, CLIENT_REQUEST_ID_HEADER: request_id}
        try:
            response = await self._session().post(
                template.url,
                headers=headers,
                data=orjson.dumps(body),
                allow_redirects=False,
                compress=False,
                timeout=template.timeout,
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise _no_answer(error) from error
        if not 200 <= response.status < 300:
            refusal = await self._status_error(response, template)
            raise translate_error(refusal) from refusal
        return response

    async def _status_error(self, response: aiohttp.ClientResponse, template: _Template) -> openai.APIStatusError:
        """The SDK's typed error for an answer that is not a success (its status alone when the
        body was cut), made from the answer as the SDK's transport would hand it over."""
        async with response:  # released when done, as aiohttp's own `async with` does
            try:
                content: bytes | None = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                content = None
        # aiohttp has decoded the body already: httpx must not decode it again.
        headers = [(name, value) for name, value in response.raw_headers if name.lower() not in _BODY_FRAMING_HEADERS]
        answer = httpx2.Response(
            response.status,
            headers=headers,
            content=content or b"",
            request=httpx2.Request("POST", template.url),
        )
        if content is None:
            return self._client._make_status_error(f"Error code: {response.status}", body=None, response=answer)
        return self._client._make_status_error_from_response(answer)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderChunk]:
        endpoint = request.endpoint
        body = endpoint.upstream_body(request.body, upstream_model=request.deployment.upstream_model)
        # The body is read here as it arrives, not by the SDK: far cheaper per chunk than its
        # own SSE decoding and model building.
        response = await self._send(endpoint.path, body, request_id=request.request_id)
        if request.on_response_headers is not None:
            request.on_response_headers(rate_limit_headers(response.headers))
        if request.on_connection is not None:
            request.on_connection(partial(_cut, response))
        # Leaving it puts the connection back in the pool when the body was read to its end, and
        # closes it at once when we stop early.
        async with response:
            try:
                if not endpoint.streams_upstream(request.body):
                    yield endpoint.chunk(_json_object(await response.read()))
                    return
                # Bounded pieces: `iter_any()` joins all that is buffered into one, and a stream
                # whose client does not read would then hold far more.
                async for chunk in _sse_events(response.content.iter_chunked(BODY_PIECE_BYTES), endpoint):
                    yield chunk
            except aiohttp.ClientError as error:
                raise UpstreamError("connection", "The upstream dropped the connection mid-stream.") from error

    async def stored(self, *, deployment: Deployment, method: Literal["GET", "DELETE", "POST"], path: str) -> dict[str, Any]:
        try:
            if method == "GET":
                response = await self._client.get(path, cast_to=httpx2.Response)
            elif method == "DELETE":
                response = await self._client.delete(path, cast_to=httpx2.Response)
            else:
                response = await self._client.post(path, cast_to=httpx2.Response)
            return _json_object(await response.aread())
        except openai.APIError as error:
            raise translate_error(error) from error
        except httpx2.HTTPError as error:
            raise UpstreamError("connection", UNREACHABLE) from error


def _cut(response: aiohttp.ClientResponse) -> None:
    """End the upstream call now: its connection is shut down in this step and closed, not put
    back in the pool."""
    connection = response.connection
    transport = connection.transport if connection is not None else None
    if transport is not None:
        shut_down_now(transport)
    response.close()


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise UpstreamError("server_error", "The upstream sent an unreadable answer.") from error
    if not isinstance(data, dict):
        raise UpstreamError("server_error", "The upstream sent an unreadable answer.")
    return data


async def _drain(pieces: AsyncIterator[bytes]) -> None:
    """Read what follows `[DONE]` (the body's end) so the connection goes back to the pool.

    Closing a response with unread bytes closes its connection, and the next call would pay a
    new TCP and TLS handshake. Bounded: an upstream that keeps sending after [DONE] is cut.
    """
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            async for _ in pieces:
                pass
    except (TimeoutError, aiohttp.ClientError):
        pass


async def _sse_events(pieces: AsyncIterator[bytes], endpoint: Endpoint) -> AsyncIterator[ProviderChunk]:
    """The events of an SSE stream, read by the endpoint, until `data: [DONE]` (chat, legacy
    completions) or an event of one of its `last_events` types (the Responses API's
    `response.completed`, ...).

    What an event means (an error, usage) is the endpoint's to read; a chat stream that ends
    without `[DONE]` was cut.
    """
    last_events = endpoint.last_events
    buffer = b""
    async for piece in pieces:
        buffer = buffer + piece if buffer else piece
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            payload = _event_data(buffer[start:end])
            start = end + 2
            if payload is None:
                continue
            if payload.startswith(b"[DONE]"):
                await _drain(pieces)
                return
            chunk = endpoint.read(payload)
            if chunk is None:
                continue
            yield chunk
            if last_events and chunk.data.get("type") in last_events:
                await _drain(pieces)
                return
        buffer = buffer[start:]
    raise UpstreamError("connection", "The upstream ended the stream before its end ([DONE] or the response's last event).")


def _event_data(event: bytes) -> bytes | None:
    """The `data:` field of one SSE event (joined if multi-line); None for comments and others."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
