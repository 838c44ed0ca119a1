"""Providers by name, one shared instance per process (so upstream connections are pooled)."""

from __future__ import annotations

from django.conf import settings

from streaming.providers.base import ChatRequest, Provider, ProviderChunk, UpstreamError, Usage

__all__ = ["ChatRequest", "Provider", "ProviderChunk", "UpstreamError", "Usage", "aclose_providers", "get_provider"]

_providers: dict[str, Provider] = {}


def _build(name: str) -> Provider:
    if name == "simulator":
        from streaming.providers.simulator import SimulatorProvider

        return SimulatorProvider()
    if name == "openai":
        from streaming.providers.openai import OpenAIProvider

        return OpenAIProvider(
            base_url=settings.OPENAI_BASE_URL,
            api_key=settings.OPENAI_API_KEY,
            connect_timeout=settings.GATEWAY_CONNECT_TIMEOUT,
            max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
            # The SDK's read timeout is a backstop; the pipeline enforces first-token/idle/total.
            read_timeout=max(settings.GATEWAY_FIRST_TOKEN_TIMEOUT, settings.GATEWAY_IDLE_TIMEOUT) + 5,
        )
    raise KeyError(f"unknown provider {name!r}")


def get_provider(name: str) -> Provider:
    provider = _providers.get(name)
    if provider is None:
        provider = _providers[name] = _build(name)
    return provider


async def aclose_providers() -> None:
    while _providers:
        _, provider = _providers.popitem()
        await provider.aclose()
