"""Providers by name, one shared instance per process (so upstream connections are pooled).

A provider is built from its `ProviderSpec` on first use. When staff change a provider's
settings, the next call builds a new client; the old one keeps serving the calls it has running
and is closed at shutdown.
"""

from __future__ import annotations

import logging

from django.conf import settings

from streaming.catalog import ProviderSpec
from streaming.providers.base import Provider, ProviderChunk, ProviderRequest, UpstreamError, Usage

__all__ = ["ProviderRequest", "Provider", "ProviderChunk", "UpstreamError", "Usage", "aclose_providers", "get_provider"]

logger = logging.getLogger(__name__)

_providers: dict[str, tuple[ProviderSpec, Provider]] = {}
_retired: list[Provider] = []


def _build(spec: ProviderSpec) -> Provider:
    if spec.kind == "simulator":
        from streaming.providers.simulator import SimulatorProvider

        return SimulatorProvider()
    if spec.kind == "langchain":
        from streaming.providers.langchain import LangChainProvider

        return LangChainProvider(spec)
    from streaming.providers.openai import OpenAIProvider

    return OpenAIProvider(
        base_url=spec.base_url,
        api_key=spec.api_key(),
        connect_timeout=spec.connect_timeout or settings.GATEWAY_CONNECT_TIMEOUT,
        max_connections=spec.max_connections or settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
        receive_buffer=settings.GATEWAY_UPSTREAM_RECEIVE_BUFFER,
        # The SDK's read timeout is a backstop; the pipeline enforces first-token/idle/total.
        read_timeout=spec.read_timeout or max(settings.GATEWAY_FIRST_TOKEN_TIMEOUT, settings.GATEWAY_IDLE_TIMEOUT) + 5,
        headers=spec.headers,
    )


def get_provider(spec: ProviderSpec) -> Provider:
    built = _providers.get(spec.name)
    if built is not None and built[0] == spec:
        return built[1]
    if built is not None:
        _retired.append(built[1])
    provider = _build(spec)
    _providers[spec.name] = (spec, provider)
    return provider


async def aclose_providers() -> None:
    providers = [provider for _, provider in _providers.values()] + _retired
    _providers.clear()
    _retired.clear()
    for provider in providers:
        try:
            await provider.aclose()
        except Exception:
            logger.exception("closing a provider's client failed")
