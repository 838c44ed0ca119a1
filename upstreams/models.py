"""Upstreams staff configure in the admin: providers, the public models, and their deployments.

These rows are added to the environment's catalog (`streaming.catalog.environment_catalog`): a
model or provider of the same name here replaces the environment's. Keys are never stored: a
provider names the environment variable that holds its key.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models

from streaming.catalog import (
    API_KEY_ENV_PATTERN,
    DEFAULT_CONTEXT_WINDOW,
    PROVIDER_NAME_PATTERN,
    CatalogError,
    check_api_key_env,
)

KEY_ENV_HELP = (
    "The environment variable that holds this upstream's key, e.g. AZURE_OPENAI_API_KEY (capitals, "
    "ending in _API_KEY, _KEY or _TOKEN). The key itself is never stored or shown. Leave blank for "
    "upstreams that take no key (a local vLLM, Ollama, llama.cpp server)."
)


class UpstreamProvider(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible API"
        LANGCHAIN = "langchain", "LangChain chat model or runnable"
        SIMULATOR = "simulator", "built-in simulator"

    name = models.CharField(
        max_length=40,
        unique=True,
        validators=[RegexValidator(PROVIDER_NAME_PATTERN, "Lower-case letters, digits, '.', '_' or '-'.")],
        help_text="Its name in deployments, the ledger and metrics, e.g. azure-east.",
    )
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.OPENAI)
    # Not a URLField: its validator refuses hosts without a dot (`http://vllm:8000/v1`, a
    # compose service); the catalog's validator (clean) checks the scheme.
    base_url = models.CharField(
        max_length=300,
        blank=True,
        help_text="For OpenAI-compatible APIs: e.g. https://api.groq.com/openai/v1 or http://vllm:8000/v1.",
    )
    api_key_env = models.CharField(
        "API key variable",
        max_length=100,
        blank=True,
        validators=[RegexValidator(API_KEY_ENV_PATTERN, "Not an allowed variable name.")],
        help_text=KEY_ENV_HELP,
    )
    extra_headers = models.JSONField(
        default=dict, blank=True, help_text='Sent with every call, e.g. {"api-version": "2024-10-21"}.'
    )
    # Seconds; blank: the gateway's defaults.
    connect_timeout = models.FloatField(null=True, blank=True, validators=[MinValueValidator(0.001)])
    read_timeout = models.FloatField(null=True, blank=True, validators=[MinValueValidator(0.001)])
    max_connections = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="Per gateway process; blank: the gateway's default."
    )
    options = models.JSONField(
        default=dict,
        blank=True,
        help_text='For LangChain: {"runnable": "package.module:ChatModel", "kwargs": {...}}.',
    )
    enabled = models.BooleanField(default=True, help_text="A disabled provider's deployments take no calls.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "provider"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from streaming.catalog import provider_from_document

        try:
            check_api_key_env(self.api_key_env)
            provider_from_document(self.as_document(), "provider")
        except CatalogError as error:
            raise ValidationError(str(error)) from None

    def as_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for field in ("base_url", "api_key_env", "connect_timeout", "read_timeout", "max_connections"):
            value = getattr(self, field)
            if value not in (None, ""):
                document[field] = value
        if self.extra_headers:
            document["headers"] = self.extra_headers
        if self.options:
            document["options"] = self.options
        return document


class PublicModel(models.Model):
    class Routing(models.TextChoices):
        PRIORITY = "priority", "priority order (lowest number first)"
        WEIGHTED = "weighted", "weighted share"
        LEAST_BUSY = "least_busy", "least busy (fewest calls running in this process)"

    name = models.CharField(max_length=100, unique=True, help_text="What clients send as `model`.")
    owned_by = models.CharField(max_length=100, blank=True, help_text="Shown by /v1/models; blank: the first provider.")
    routing = models.CharField(max_length=20, choices=Routing.choices, default=Routing.PRIORITY)
    fallbacks = models.JSONField(
        default=list,
        blank=True,
        help_text='Public models tried in order when every deployment failed, e.g. ["gpt-4o-mini"].',
    )
    context_window = models.PositiveIntegerField(default=DEFAULT_CONTEXT_WINDOW, validators=[MinValueValidator(1)])
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "model"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        fallbacks = self.fallbacks
        if not isinstance(fallbacks, list) or not all(isinstance(name, str) and name for name in fallbacks):
            raise ValidationError({"fallbacks": "A list of model names."})
        if self.name in fallbacks:
            raise ValidationError({"fallbacks": "A model cannot fall back to itself."})


class UpstreamDeployment(models.Model):
    model = models.ForeignKey(PublicModel, on_delete=models.CASCADE, related_name="deployments")
    provider = models.ForeignKey(UpstreamProvider, on_delete=models.PROTECT, related_name="deployments")
    upstream_model = models.CharField(max_length=100, help_text="The model name this provider knows it by.")
    priority = models.PositiveIntegerField(default=0, help_text="Lower is tried first (priority routing).")
    weight = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)], help_text="Share of calls (weighted routing).")
    # The provider's published limits for this model; the gateway starts under them and learns.
    rpm = models.PositiveIntegerField("published RPM", null=True, blank=True, validators=[MinValueValidator(1)])
    tpm = models.PositiveIntegerField("published TPM", null=True, blank=True, validators=[MinValueValidator(1)])
    options = models.JSONField(default=dict, blank=True, help_text="Provider-specific (the simulator's pacing, ...).")
    enabled = models.BooleanField(default=True)

    class Meta:
        ordering = ["model", "priority", "id"]
        verbose_name = "deployment"
        constraints = [
            models.UniqueConstraint(fields=["model", "provider", "upstream_model"], name="deployment_unique_target"),
        ]

    def __str__(self) -> str:
        return f"{self.provider.name}/{self.upstream_model}"
