"""The model catalog: which public model names the gateway serves, and where each one goes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from django.conf import settings

SIMULATOR_OWNER = "llmgateway-simulator"
# Tokens, for a route that names none (GATEWAY_MODELS_JSON may give `context_window`).
DEFAULT_CONTEXT_WINDOW = 128_000


@dataclass(frozen=True, slots=True)
class ModelRoute:
    id: str  # the public model name clients send
    provider: str  # "openai" | "simulator"
    upstream_model: str  # the name sent to the provider
    owned_by: str
    created: int = 1700000000
    # Tokens the model reads and writes in one call (prompt + completion), as its provider
    # publishes it; the chat page trims a conversation's history to fit.
    context_window: int = DEFAULT_CONTEXT_WINDOW
    # Simulator pacing; None means the simulator's configured default.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_simulated(self) -> bool:
        return self.provider == "simulator"


# Each with its context window in tokens, as OpenAI publishes it.
_OPENAI_MODELS = {
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4.1-nano": 1_047_576,
    "o4-mini": 200_000,
    "o3": 200_000,
    "o3-mini": 200_000,
    "gpt-4-turbo": 128_000,
    "gpt-3.5-turbo": 16_385,
}
# The simulator reads no prompt; a small window lets the chat page's trimming be seen.
SIMULATOR_CONTEXT_WINDOW = 16_384

DEFAULT_ROUTES: tuple[ModelRoute, ...] = (
    *(
        ModelRoute(id=name, provider="openai", upstream_model=name, owned_by="openai", context_window=window)
        for name, window in _OPENAI_MODELS.items()
    ),
    ModelRoute(
        id="sim-chat",
        provider="simulator",
        upstream_model="sim-chat",
        owned_by=SIMULATOR_OWNER,
        context_window=SIMULATOR_CONTEXT_WINDOW,
    ),
    ModelRoute(
        id="sim-fast",
        provider="simulator",
        upstream_model="sim-fast",
        owned_by=SIMULATOR_OWNER,
        context_window=SIMULATOR_CONTEXT_WINDOW,
        options={"tokens_per_second": 0, "ttft_ms": 0},
    ),
    ModelRoute(
        id="sim-long",
        provider="simulator",
        upstream_model="sim-long",
        owned_by=SIMULATOR_OWNER,
        context_window=SIMULATOR_CONTEXT_WINDOW,
        options={"completion_tokens": 1024, "tokens_per_second": 200},
    ),
)


def _routes_from_json(raw: str) -> list[ModelRoute]:
    routes = []
    for model_id, spec in json.loads(raw).items():
        routes.append(
            ModelRoute(
                id=model_id,
                provider=spec["provider"],
                upstream_model=spec.get("upstream_model", model_id),
                owned_by=spec.get("owned_by", spec["provider"]),
                context_window=int(spec.get("context_window", DEFAULT_CONTEXT_WINDOW)),
                options=spec.get("options", {}),
            )
        )
    return routes


@cache
def all_routes() -> dict[str, ModelRoute]:
    """Every configured route by public id: the defaults, overridden by GATEWAY_MODELS_JSON."""
    routes = {route.id: route for route in DEFAULT_ROUTES}
    if settings.GATEWAY_MODELS_JSON:
        routes.update({route.id: route for route in _routes_from_json(settings.GATEWAY_MODELS_JSON)})
    return routes


def provider_is_configured(provider: str) -> bool:
    if provider == "simulator":
        return True
    if provider == "openai":
        return bool(settings.OPENAI_API_KEY)
    return False


def available_routes() -> list[ModelRoute]:
    """Routes whose provider is configured, in a stable order (as listed by /v1/models)."""
    return [route for route in all_routes().values() if provider_is_configured(route.provider)]


def route_for(model_id: str) -> ModelRoute | None:
    route = all_routes().get(model_id)
    if route is None or not provider_is_configured(route.provider):
        return None
    return route


