"""How the `openai` provider reads a streamed body: straight from the SDK's aiohttp response when
it is not encoded, through httpx's decoder when it is; a cut or silent body is named as such, and
a client that leaves has the upstream connection cut at once."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai as openai_sdk
import pytest
from aiohttp import web

from streaming import endpoints
from streaming.catalog import Deployment, ProviderSpec
from streaming.pipeline import StreamRelay, Timeouts
from streaming.providers import openai as provider_module
from streaming.providers.base import ProviderChunk, ProviderRequest, UpstreamError
from streaming.providers.openai import OpenAIProvider

TEXT = ["Hel", "lo", ", wor", "ld"]


def sse(text: list[str]) -> bytes:
    chunks = [{"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {"content": piece}}]} for piece in text]
    return b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


Handler = Callable[[web.Request], Any]


@pytest.fixture
async def upstream_serving() -> AsyncIterator[Callable[[Handler], Any]]:
    """Serve one handler at /v1/chat/completions on a free port; yields a starter (-> base URL)."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


def relay_over(provider: OpenAIProvider, base_url: str, timeouts: Timeouts) -> StreamRelay:
    return StreamRelay(
        provider=provider,
        request=ProviderRequest(
            deployment=Deployment(provider=ProviderSpec(name="test", kind="openai", base_url=base_url), upstream_model="m"),
            endpoint=endpoints.ENDPOINTS["chat.completions"],
            body={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ),
        queue_size=64,
        timeouts=timeouts,
        count_text=len,
        completion_token_cap=10_000,
    )


async def streamed_text(base_url: str, *, receive_buffer: int = 0) -> str:
    provider = OpenAIProvider(
        base_url=base_url, api_key="sk-test", connect_timeout=2.0, read_timeout=5.0, max_connections=4, receive_buffer=receive_buffer
    )
    deployment = Deployment(provider=ProviderSpec(name="test", kind="openai", base_url=base_url), upstream_model="m")
    request = ProviderRequest(
        deployment=deployment,
        endpoint=endpoints.ENDPOINTS["chat.completions"],
        body={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    try:
        return "".join([chunk.data["choices"][0]["delta"].get("content", "") async for chunk in provider.stream(request)])
    finally:
        await provider.aclose()


async def test_a_stream_read_to_its_end_leaves_its_connection_to_the_next_call(upstream_serving) -> None:
    client_ports: list[int] = []

    async def plain(request: web.Request) -> web.StreamResponse:
        client_ports.append(request.transport.get_extra_info("peername")[1])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for line in sse(TEXT).split(b"\n\n")[:-1]:
            await response.write(line + b"\n\n")
        return response

    base_url = await upstream_serving(plain)
    provider = OpenAIProvider(base_url=base_url, api_key="sk-test", connect_timeout=2.0, read_timeout=5.0, max_connections=4)
    request = ProviderRequest(
        deployment=Deployment(provider=ProviderSpec(name="test", kind="openai", base_url=base_url), upstream_model="m"),
        endpoint=endpoints.ENDPOINTS["chat.completions"],
        body={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    try:
        texts = ["".join([chunk.text async for chunk in provider.stream(request)]) for _ in range(3)]
    finally:
        await provider.aclose()
    assert texts == ["Hello, world"] * 3
    assert len(client_ports) == 3 and len(set(client_ports)) == 1  # one connection, kept alive


@pytest.mark.parametrize("receive_buffer", [32 * 1024, 0], ids=["set", "autotuned"])
async def test_the_upstream_connection_has_the_receive_buffer_it_was_given(
    upstream_serving, monkeypatch: pytest.MonkeyPatch, receive_buffer: int
) -> None:
    made: list[socket.socket] = []
    socket_factory = provider_module._socket_factory

    def recording(size: int) -> Any:
        make = socket_factory(size)

        def make_and_record(address: Any) -> socket.socket:
            made.append(make(address))
            return made[-1]

        return make_and_record

    monkeypatch.setattr(provider_module, "_socket_factory", recording)
    seen: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        # The connection this request came on, as the provider's side sees it.
        client_port = request.transport.get_extra_info("peername")[1]
        sockets = [made_socket for made_socket in made if made_socket.getsockname()[1] == client_port]
        seen.extend(made_socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for made_socket in sockets)
        return web.Response(body=sse(TEXT), headers={"Content-Type": "text/event-stream"})

    assert await streamed_text(await upstream_serving(answer), receive_buffer=receive_buffer) == "Hello, world"
    if receive_buffer:
        assert seen == [2 * receive_buffer]  # Linux doubles it for its bookkeeping
    else:
        assert not made and not seen  # the kernel's own sockets, autotuned


async def test_a_compressed_stream_is_decoded(upstream_serving) -> None:
    async def compressed(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(sse(TEXT)), headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"})

    assert await streamed_text(await upstream_serving(compressed)) == "Hello, world"


async def test_a_stream_cut_mid_way_is_a_connection_error(upstream_serving) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(TEXT[:2]).split(b"data: [DONE]")[0])
        assert request.transport is not None
        request.transport.close()  # mid-body, no [DONE], no chunked terminator
        return response

    with pytest.raises(UpstreamError) as raised:
        await streamed_text(await upstream_serving(cut))
    assert raised.value.kind == "connection"


async def test_a_stream_that_falls_silent_is_ended_by_the_relays_idle_deadline_with_the_connection_closed(upstream_serving) -> None:
    upstream_saw_the_end = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(TEXT[:1]).split(b"data: [DONE]")[0])
        for _ in range(100):  # silent for 5 s, unless the gateway hangs up first
            await asyncio.sleep(0.05)
            if request.transport is None or request.transport.is_closing():
                upstream_saw_the_end.set()
                break
        return response

    base_url = await upstream_serving(silent)
    provider = OpenAIProvider(base_url=base_url, api_key="sk-test", connect_timeout=2.0, read_timeout=5.0, max_connections=4)
    relay = relay_over(provider, base_url, Timeouts(first_token=5, idle=0.3, total=30, heartbeat=5))
    loop = asyncio.get_running_loop()
    started = loop.time()
    relay.start()
    try:
        assert isinstance(await asyncio.wait_for(relay.get(), 5), ProviderChunk)
        last = await asyncio.wait_for(relay.get(), 5)
        assert isinstance(last, UpstreamError) and last.kind == "timeout" and "idle" in last.message
        assert loop.time() - started < 2
        async with asyncio.timeout(2):
            await upstream_saw_the_end.wait()
        await relay.aclose()
        assert relay.outcome.status == "timeout"
    finally:
        await provider.aclose()


async def test_a_client_that_leaves_has_the_upstream_connection_cut_in_the_same_step(upstream_serving, monkeypatch: pytest.MonkeyPatch) -> None:
    upstream_saw_the_end = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(sse(TEXT[:1]).split(b"data: [DONE]")[0])
                await asyncio.sleep(0.01)
        except (ConnectionResetError, asyncio.CancelledError):
            upstream_saw_the_end.set()
            raise
        return response

    closed: list[object] = []
    sockets: list[socket.socket] = []
    close = aiohttp.ClientResponse.close

    def recorded_close(self: aiohttp.ClientResponse) -> None:
        closed.append(self)
        assert self.connection is not None and self.connection.transport is not None
        # The connection's own descriptor is closed at the loop's next pass: a duplicate of it
        # stays usable to look at the connection after `abort()`, in the same step.
        sockets.append(socket.socket(fileno=os.dup(self.connection.transport.get_extra_info("socket").fileno())))
        close(self)

    monkeypatch.setattr(aiohttp.ClientResponse, "close", recorded_close)
    base_url = await upstream_serving(endless)
    provider = OpenAIProvider(base_url=base_url, api_key="sk-test", connect_timeout=2.0, read_timeout=5.0, max_connections=4)
    relay = relay_over(provider, base_url, Timeouts(first_token=5, idle=5, total=30, heartbeat=5))
    relay.start()
    try:
        assert isinstance(await asyncio.wait_for(relay.get(), 5), ProviderChunk)
        relay.abort()
        assert len(closed) == 1  # cut here, not when the cancelled producer next runs
        with sockets[0] as connection:  # and already shut down: the upstream has its FIN
            with pytest.raises(BrokenPipeError):
                connection.send(b"x", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        async with asyncio.timeout(2):
            await upstream_saw_the_end.wait()
        await relay.aclose()
        assert relay.outcome.status == "cancelled"
    finally:
        await provider.aclose()


async def test_every_call_sends_the_sdks_request_with_its_own_body_and_request_id(upstream_serving) -> None:
    seen: list[tuple[dict[str, str], Any]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(({name.lower(): value for name, value in request.headers.items()}, await request.json()))
        # A load balancer's cookie: not to be sent back with every later call as it was.
        return web.Response(body=sse(["ok"]), content_type="text/event-stream", headers={"Set-Cookie": "lb=node-1"})

    base_url = await upstream_serving(record)
    provider = OpenAIProvider(
        base_url=base_url, api_key="sk-test", connect_timeout=2.0, read_timeout=5.0, max_connections=4, headers={"X-Team": "blue"}
    )
    deployment = Deployment(provider=ProviderSpec(name="test", kind="openai", base_url=base_url), upstream_model="upstream-m")
    try:
        for request_id, content in (("call-1", "first"), ("call-2", "second")):
            request = ProviderRequest(
                deployment=deployment,
                endpoint=endpoints.ENDPOINTS["chat.completions"],
                body={"model": "m", "messages": [{"role": "user", "content": content}], "stream": True},
                request_id=request_id,
            )
            assert [chunk.text async for chunk in provider.stream(request)] == ["ok"]
    finally:
        await provider.aclose()

    for (headers, body), request_id, content in zip(seen, ("call-1", "call-2"), ("first", "second"), strict=True):
        assert headers["authorization"] == "Bearer sk-test"
        assert headers["x-team"] == "blue"
        assert headers["user-agent"].startswith("AsyncOpenAI/Python")
        assert headers["x-client-request-id"] == request_id
        assert headers["content-type"] == "application/json"
        assert headers["x-stainless-async"] == "async:asyncio"  # as the SDK says from an event loop
        assert headers["accept-encoding"] == "gzip, deflate"  # what aiohttp decodes
        assert "cookie" not in headers
        assert body["model"] == "upstream-m" and body["messages"][0]["content"] == content
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzipped"])
async def test_an_error_answer_is_the_sdks_typed_error_with_its_message_and_limits(upstream_serving, compressed: bool) -> None:
    async def limited(request: web.Request) -> web.Response:
        body = json.dumps({"error": {"message": "Slow down.", "type": "tokens", "code": "rate_limit_exceeded"}}).encode()
        headers = {"Content-Type": "application/json", "retry-after-ms": "1500", "x-ratelimit-remaining-tokens": "0"}
        if compressed:  # as a CDN in front of an upstream may send it
            body, headers = gzip.compress(body), {**headers, "Content-Encoding": "gzip"}
        return web.Response(body=body, status=429, headers=headers)

    base_url = await upstream_serving(limited)

    with pytest.raises(UpstreamError) as raised:
        await streamed_text(base_url)

    error = raised.value
    assert (error.kind, error.status, error.message) == ("rate_limited", 429, "Slow down.")
    assert error.retry_after == 1.5 and error.limit_type == "tokens"
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    assert isinstance(error.__cause__, openai_sdk.RateLimitError)


async def test_an_upstream_that_refuses_the_connection_is_a_connection_error(upstream_serving) -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]

    with pytest.raises(UpstreamError) as raised:
        await streamed_text(f"http://127.0.0.1:{port}/v1")

    assert raised.value.kind == "connection"


async def test_an_error_answer_whose_body_is_cut_is_still_a_typed_upstream_error(upstream_serving) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=503, headers={"Content-Type": "application/json", "Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b'{"error": {"mess')
        assert request.transport is not None
        request.transport.close()
        return response

    base_url = await upstream_serving(cut)

    with pytest.raises(UpstreamError) as raised:
        await streamed_text(base_url)

    assert (raised.value.kind, raised.value.status) == ("server_error", 503)
    assert isinstance(raised.value.__cause__, openai_sdk.InternalServerError)


async def test_an_upstreams_configured_accept_encoding_is_sent_as_configured(upstream_serving) -> None:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers["Accept-Encoding"])
        return web.Response(body=sse(["ok"]), content_type="text/event-stream")

    base_url = await upstream_serving(record)
    provider = OpenAIProvider(
        base_url=base_url, api_key="sk-test", connect_timeout=2.0, read_timeout=5.0, max_connections=4, headers={"Accept-Encoding": "identity"}
    )
    request = ProviderRequest(
        deployment=Deployment(provider=ProviderSpec(name="test", kind="openai", base_url=base_url), upstream_model="m"),
        endpoint=endpoints.ENDPOINTS["chat.completions"],
        body={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    try:
        assert [chunk.text async for chunk in provider.stream(request)] == ["ok"]
    finally:
        await provider.aclose()
    assert seen == ["identity"]
