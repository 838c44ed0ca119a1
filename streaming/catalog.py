"""The catalog's shapes: upstream providers, the deployments that serve a model, the public models.

A public model (what clients name) is served by one or more deployments, each a model name at one
provider (an OpenAI-compatible upstream, the simulator, or a LangChain runnable). Which one a call
tries first is the model's routing policy; when they all fail, its fallbacks (other public models)
are tried in order. `environment_catalog()` is the embedded default built from the environment;
`upstreams.catalog` adds what staff configure in the admin and serves the live catalog.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from django.conf import settings

logger = logging.getLogger(__name__)

SIMULATOR_OWNER = "llmgateway-simulator"
# Tokens, for a route that names none (GATEWAY_MODELS_JSON may give `context_window`).
DEFAULT_CONTEXT_WINDOW = 128_000

ProviderKind = Literal["openai", "simulator", "langchain"]
RoutingPolicy = Literal["priority", "weighted", "least_busy"]
PROVIDER_KINDS: tuple[ProviderKind, ...] = ("openai", "simulator", "langchain")
ROUTING_POLICIES: tuple[RoutingPolicy, ...] = ("priority", "weighted", "least_busy")


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """One upstream: where it is and how to call it. Its key is never stored: `api_key_env` names
    the environment variable that holds it."""

    name: str
    kind: ProviderKind
    base_url: str = ""
    api_key_env: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    # Seconds; None: the gateway's defaults (GATEWAY_CONNECT_TIMEOUT, and the pipeline's timeouts).
    connect_timeout: float | None = None
    read_timeout: float | None = None
    max_connections: int | None = None
    # Kind-specific: for `langchain`, {"runnable": "package.module:factory_or_class", "kwargs": {...}}.
    options: Mapping[str, Any] = field(default_factory=dict)

    def api_key(self) -> str:
        if not self.api_key_env:
            return ""
        if self.api_key_env == "OPENAI_API_KEY":
            return str(settings.OPENAI_API_KEY)  # the settings' copy, which tests may override
        return os.environ.get(self.api_key_env, "")

    @property
    def is_configured(self) -> bool:
        """Whether calls can go to it: an upstream that names a key variable needs it set."""
        return not self.api_key_env or bool(self.api_key())


@dataclass(frozen=True, slots=True)
class Deployment:
    """A public model as one provider serves it."""

    provider: ProviderSpec
    upstream_model: str  # the name sent to the provider
    priority: int = 0  # lower first (the `priority` policy); ties share by weight
    weight: int = 1  # share of calls (the `weighted` policy)
    # The provider's published limits for this model (None: none published); the gateway keeps
    # under them (minus UPSTREAM_LIMIT_HEADROOM) and learns the real ones from the upstream.
    rpm: int | None = None
    tpm: int | None = None
    # Provider-specific pacing and behaviour (the simulator's `tokens_per_second`, ...).
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Its name in the ledger, headers and metrics: `provider/upstream_model`."""
        return f"{self.provider.name}/{self.upstream_model}"


@dataclass(frozen=True, slots=True)
class ModelRoute:
    id: str  # the public model name clients send
    owned_by: str
    deployments: tuple[Deployment, ...]
    routing: RoutingPolicy = "priority"
    fallbacks: tuple[str, ...] = ()  # public models tried in order when every deployment failed
    created: int = 1700000000
    # Tokens the model reads and writes in one call (prompt + completion), as its provider
    # publishes it; the chat page trims a conversation's history to fit.
    context_window: int = DEFAULT_CONTEXT_WINDOW

    @property
    def primary(self) -> Deployment:
        return self.deployments[0]

    # The primary deployment's, for code that prices or counts before a deployment is chosen.
    @property
    def provider(self) -> str:
        return self.primary.provider.name

    @property
    def upstream_model(self) -> str:
        return self.primary.upstream_model

    @property
    def is_configured(self) -> bool:
        return any(deployment.provider.is_configured for deployment in self.deployments)


def single_route(
    *,
    id: str,
    provider: ProviderSpec,
    upstream_model: str | None = None,
    owned_by: str | None = None,
    context_window: int = DEFAULT_CONTEXT_WINDOW,
    options: Mapping[str, Any] | None = None,
) -> ModelRoute:
    """A public model served by one deployment."""
    return ModelRoute(
        id=id,
        owned_by=owned_by or provider.name,
        deployments=(Deployment(provider=provider, upstream_model=upstream_model or id, options=options or {}),),
        context_window=context_window,
    )


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
    "text-embedding-3-small": 8_191,
    "text-embedding-3-large": 8_191,
    "text-embedding-ada-002": 8_191,
}
# The simulator reads no prompt; a small window lets the chat page's trimming be seen.
SIMULATOR_CONTEXT_WINDOW = 16_384
SIMULATOR = ProviderSpec(name="simulator", kind="simulator")
_SIMULATED_MODELS: dict[str, dict[str, Any]] = {
    "sim-chat": {},
    "sim-fast": {"tokens_per_second": 0, "ttft_ms": 0},
    "sim-long": {"completion_tokens": 1024, "tokens_per_second": 200},
    "sim-embed": {"ttft_ms": 20},  # embeddings (any model of the simulator serves every endpoint)
}


@dataclass(frozen=True, slots=True)
class Catalog:
    providers: Mapping[str, ProviderSpec]
    routes: Mapping[str, ModelRoute]  # every route by public id, configured or not

    def available(self) -> list[ModelRoute]:
        """Routes with a configured provider, in a stable order (as listed by /v1/models)."""
        return [route for route in self.routes.values() if route.is_configured]

    def route_for(self, model: str) -> ModelRoute | None:
        route = self.routes.get(model)
        return route if route is not None and route.is_configured else None


def environment_provider() -> ProviderSpec:
    """The `openai` provider of the environment (OPENAI_BASE_URL, OPENAI_API_KEY)."""
    return ProviderSpec(name="openai", kind="openai", base_url=settings.OPENAI_BASE_URL, api_key_env="OPENAI_API_KEY")


def _published(model_id: str, upstream_model: str) -> dict[str, int]:
    limits = settings.UPSTREAM_LIMITS.get(model_id) or settings.UPSTREAM_LIMITS.get(upstream_model) or {}
    return {unit: int(limits[unit]) for unit in ("rpm", "tpm") if limits.get(unit)}


def _deployment(provider: ProviderSpec, model_id: str, upstream_model: str, options: Mapping[str, Any]) -> Deployment:
    return Deployment(provider=provider, upstream_model=upstream_model, options=options, **_published(model_id, upstream_model))


def environment_catalog() -> Catalog:
    """The embedded default: OpenAI's models (when OPENAI_API_KEY is set), the simulator's,
    GATEWAY_MODELS_JSON's entries (`{"model-id": {"provider": "openai" | "simulator",
    "upstream_model": ..., "context_window": ..., "options": {...}}}`), with published limits
    from UPSTREAM_LIMITS_JSON; then the upstreams document UPSTREAMS_FILE names, if any."""
    openai = environment_provider()
    providers = {openai.name: openai, SIMULATOR.name: SIMULATOR}
    routes: dict[str, ModelRoute] = {}
    for name, window in _OPENAI_MODELS.items():
        routes[name] = ModelRoute(
            id=name, owned_by="openai", deployments=(_deployment(openai, name, name, {}),), context_window=window
        )
    for name, options in _SIMULATED_MODELS.items():
        routes[name] = ModelRoute(
            id=name,
            owned_by=SIMULATOR_OWNER,
            deployments=(_deployment(SIMULATOR, name, name, options),),
            context_window=SIMULATOR_CONTEXT_WINDOW,
        )
    if settings.GATEWAY_MODELS_JSON:
        for model_id, spec in json.loads(settings.GATEWAY_MODELS_JSON).items():
            provider = providers.get(spec["provider"])
            if provider is None:
                logger.warning("GATEWAY_MODELS_JSON: model %s names an unknown provider %r; skipped", model_id, spec["provider"])
                continue
            upstream_model = spec.get("upstream_model", model_id)
            routes[model_id] = ModelRoute(
                id=model_id,
                owned_by=spec.get("owned_by", provider.name),
                deployments=(_deployment(provider, model_id, upstream_model, spec.get("options", {})),),
                context_window=int(spec.get("context_window", DEFAULT_CONTEXT_WINDOW)),
            )
    catalog = Catalog(providers=providers, routes=routes)
    if settings.UPSTREAMS_FILE:
        catalog = catalog_with_document(catalog, read_document(Path(settings.UPSTREAMS_FILE)))
    return catalog


# --- The upstreams document: a YAML or JSON file staff write or export ----------------------------


class CatalogError(ValueError):
    """An upstreams document that cannot be used; the message says where and why."""


# An environment variable name that may hold an upstream key. Others (DJANGO_SECRET_KEY,
# DATABASE_URL, ...) are refused: a provider sends its key to its base URL, so naming any
# variable would let whoever configures providers send the gateway's secrets anywhere.
API_KEY_ENV_PATTERN = re.compile(r"^(?!DJANGO_|DATABASE_|REDIS_)[A-Z][A-Z0-9_]*(_API_KEY|_KEY|_TOKEN)$")
PROVIDER_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")


def check_api_key_env(name: str) -> None:
    if name and not API_KEY_ENV_PATTERN.match(name):
        raise CatalogError(
            f"api_key_env {name!r} is not allowed: name an environment variable in capitals that ends with "
            "_API_KEY, _KEY or _TOKEN (not DJANGO_*, DATABASE_* or REDIS_*)."
        )


def _number(where: str, value: Any, kind: type[int] | type[float], *, minimum: float) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise CatalogError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < minimum:
        raise CatalogError(f"{where}: must be at least {minimum:g}, got {value!r}")
    return kind(value)


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise CatalogError(f"{where}: expected a mapping")
    return value


def _text(where: str, value: Any, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise CatalogError(f"{where}: expected {'a non-empty ' if required else 'a '}string")
    return value.strip()


def provider_from_document(entry: Any, where: str) -> ProviderSpec:
    item = _mapping(where, entry)
    unknown = set(item) - {"name", "kind", "base_url", "api_key_env", "headers", "connect_timeout", "read_timeout", "max_connections", "options"}
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    name = _text(f"{where}.name", item.get("name"), required=True)
    if not PROVIDER_NAME_PATTERN.match(name):
        raise CatalogError(f"{where}.name: {name!r} must be lower-case letters, digits, '.', '_' or '-' (at most 40)")
    kind = item.get("kind", "openai")
    if kind not in PROVIDER_KINDS:
        raise CatalogError(f"{where}.kind: expected one of {', '.join(PROVIDER_KINDS)}, got {kind!r}")
    base_url = _text(f"{where}.base_url", item.get("base_url"))
    if kind == "openai" and not base_url.startswith(("http://", "https://")):
        raise CatalogError(f"{where}.base_url: an openai provider needs an http(s) URL")
    api_key_env = _text(f"{where}.api_key_env", item.get("api_key_env"))
    try:
        check_api_key_env(api_key_env)
    except CatalogError as error:
        raise CatalogError(f"{where}.{error}") from None
    headers = _mapping(f"{where}.headers", item.get("headers"))
    if any(not isinstance(value, str) for value in headers.values()):
        raise CatalogError(f"{where}.headers: every value must be a string")
    options = _mapping(f"{where}.options", item.get("options"))
    if kind == "langchain" and not isinstance(options.get("runnable"), str):
        raise CatalogError(f"{where}.options.runnable: a langchain provider names its chat model or runnable by dotted path")
    return ProviderSpec(
        name=name,
        kind=kind,
        base_url=base_url,
        api_key_env=api_key_env,
        headers=headers,
        connect_timeout=_number(f"{where}.connect_timeout", item.get("connect_timeout"), float, minimum=0.001),
        read_timeout=_number(f"{where}.read_timeout", item.get("read_timeout"), float, minimum=0.001),
        max_connections=_number(f"{where}.max_connections", item.get("max_connections"), int, minimum=1),
        options=options,
    )


def route_from_document(entry: Any, where: str, providers: Mapping[str, ProviderSpec]) -> ModelRoute:
    item = _mapping(where, entry)
    unknown = set(item) - {"name", "owned_by", "routing", "fallbacks", "context_window", "deployments"}
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    name = _text(f"{where}.name", item.get("name"), required=True)
    routing = item.get("routing", "priority")
    if routing not in ROUTING_POLICIES:
        raise CatalogError(f"{where}.routing: expected one of {', '.join(ROUTING_POLICIES)}, got {routing!r}")
    fallbacks = item.get("fallbacks") or []
    if not isinstance(fallbacks, list) or not all(isinstance(model, str) and model for model in fallbacks):
        raise CatalogError(f"{where}.fallbacks: expected a list of model names")
    if name in fallbacks:
        raise CatalogError(f"{where}.fallbacks: a model cannot fall back to itself")
    entries = item.get("deployments")
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f"{where}.deployments: a model needs at least one deployment")
    deployments = []
    for index, raw in enumerate(entries):
        at = f"{where}.deployments[{index}]"
        deployment = _mapping(at, raw)
        unknown = set(deployment) - {"provider", "upstream_model", "priority", "weight", "rpm", "tpm", "options"}
        if unknown:
            raise CatalogError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
        provider_name = _text(f"{at}.provider", deployment.get("provider"), required=True)
        provider = providers.get(provider_name)
        if provider is None:
            raise CatalogError(f"{at}.provider: no provider named {provider_name!r}")
        deployments.append(
            Deployment(
                provider=provider,
                upstream_model=_text(f"{at}.upstream_model", deployment.get("upstream_model")) or name,
                priority=_number(f"{at}.priority", deployment.get("priority", 0), int, minimum=0),
                weight=_number(f"{at}.weight", deployment.get("weight", 1), int, minimum=1),
                rpm=_number(f"{at}.rpm", deployment.get("rpm"), int, minimum=1),
                tpm=_number(f"{at}.tpm", deployment.get("tpm"), int, minimum=1),
                options=_mapping(f"{at}.options", deployment.get("options")),
            )
        )
    if len({deployment.name for deployment in deployments}) != len(deployments):
        raise CatalogError(f"{where}.deployments: the same provider and upstream model twice")
    return ModelRoute(
        id=name,
        owned_by=_text(f"{where}.owned_by", item.get("owned_by")) or deployments[0].provider.name,
        deployments=tuple(sorted(deployments, key=lambda deployment: deployment.priority)),
        routing=routing,
        fallbacks=tuple(fallbacks),
        context_window=_number(f"{where}.context_window", item.get("context_window", DEFAULT_CONTEXT_WINDOW), int, minimum=1),
    )


def catalog_with_document(base: Catalog, document: Any) -> Catalog:
    """`base` with the document's providers and models added (a name already there is replaced).

    `{"providers": [{name, kind, base_url, api_key_env, headers, connect_timeout, read_timeout,
    max_connections, options}], "models": [{name, owned_by, routing, fallbacks, context_window,
    deployments: [{provider, upstream_model, priority, weight, rpm, tpm, options}]}]}`.
    Raises `CatalogError` naming the first bad field; fallbacks must name known models.
    """
    root = _mapping("document", document)
    unknown = set(root) - {"providers", "models"}
    if unknown:
        raise CatalogError(f"document: unknown field(s) {', '.join(sorted(unknown))}")
    providers = dict(base.providers)
    for index, entry in enumerate(root.get("providers") or []):
        provider = provider_from_document(entry, f"providers[{index}]")
        providers[provider.name] = provider
    routes = dict(base.routes)
    for index, entry in enumerate(root.get("models") or []):
        route = route_from_document(entry, f"models[{index}]", providers)
        routes[route.id] = route
    for route in routes.values():
        for fallback in route.fallbacks:
            if fallback not in routes:
                raise CatalogError(f"model {route.id}: fallback {fallback!r} is not a known model")
    return Catalog(providers=providers, routes=routes)


def read_document(path: Path) -> Any:
    """A YAML or JSON upstreams document (JSON is YAML, so one parser reads both)."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CatalogError(f"{path}: {error}") from error
