"""The upstreams staff configure: providers, public models with their deployments, and each
deployment's circuit breaker as the gateway last saw it.

A save is refused, with a form error, when the catalog it would leave is one the runtime would
refuse (`upstreams.services.upstreams_change_check`: the change is tried in a savepoint and the
catalog validated as `upstreams.catalog` reads it); so is a deletion, on its confirmation page.
Accepted, such a change would be logged by every process and the environment's catalog served
instead. The forms check what each row can check on its own first (the model's `clean()`, which
uses the catalog's validators), so a mistake is reported once, next to its field when it has one.

A provider's key is never stored or shown: the list says only whether its variable is set.
Permissions are Django's model permissions (only staff who may change providers edit them).
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet, construct_instance
from django.http import HttpRequest
from django.utils import timezone

from streaming.catalog import CatalogError, ProviderSpec, environment_catalog
from upstreams.catalog import configured_document
from upstreams.health import shared_state
from upstreams.models import PublicModel, UpstreamDeployment, UpstreamProvider
from upstreams.services import upstreams_change_check

CATALOG_REFUSED = "The gateway would refuse the catalog this leaves: {error}."
DELETE_REFUSED = "The gateway would refuse the catalog left without it: {error}."
UNKNOWN_FALLBACKS = "No model named {names}: a fallback names a model of the catalog (the environment's, or an enabled one here)."
NO_DEPLOYMENT = "An enabled model needs at least one enabled deployment on an enabled provider (or disable the model)."
UNSERVED = "Not served now (no enabled deployment on an enabled provider): {models}."
NO_VALUE = "—"


def deployment_name(deployment: UpstreamDeployment) -> str:
    """Its name in the breaker, metrics and the ledger (`streaming.catalog.Deployment.name`)."""
    return f"{deployment.provider.name}/{deployment.upstream_model}"


def breaker_text(name: str) -> str:
    """`closed`, `open since 14:03:07 (5 failures)` or `probing since ...`: the breaker's last change."""
    view = shared_state(name)
    if view is None or view.state == "closed":
        return "closed"
    since = timezone.localtime(datetime.fromtimestamp(view.since, tz=UTC)).strftime("%H:%M:%S")
    state = "open" if view.state == "open" else "probing"
    return f"{state} since {since} ({view.failures} failure{'s' if view.failures != 1 else ''})"


def known_model_names() -> set[str]:
    """Models a fallback may name: the environment's and the enabled ones here."""
    return set(environment_catalog().routes) | set(PublicModel.objects.filter(enabled=True).values_list("name", flat=True))


def unknown_fallbacks(fallbacks: Any) -> list[str]:
    if not isinstance(fallbacks, list):
        return []  # the model's clean() says what a fallback list is
    known = known_model_names()
    return [name for name in fallbacks if isinstance(name, str) and name not in known]


def catalog_refusal(change: Any) -> str | None:
    """Why the gateway would refuse the catalog `change` leaves, or None."""
    try:
        upstreams_change_check(change=change)
    except CatalogError as error:
        return CATALOG_REFUSED.format(error=error)
    return None


class CatalogCheckedForm(forms.ModelForm):
    """A row's form whose save is tried on the whole catalog before it is accepted."""

    def clean(self) -> dict[str, Any] | None:
        cleaned_data = super().clean()
        if self.errors:
            return cleaned_data
        trial = construct_instance(self, copy.copy(self.instance), self._meta.fields, self._meta.exclude)
        try:
            trial.full_clean()
        except ValidationError:
            return cleaned_data  # the row's own validation, next, says why
        refusal = catalog_refusal(trial.save)
        if refusal is not None:
            raise ValidationError(refusal)
        return cleaned_data


class CatalogCheckedAdmin(admin.ModelAdmin):
    """Deletions tried on the catalog first; a warning after a save that leaves a model unserved."""

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple[Any, Any, Any, Any]:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        if not protected and not perms_needed:
            pks = [obj.pk for obj in objs]
            try:
                upstreams_change_check(change=lambda: self.model._default_manager.filter(pk__in=pks).delete())
            except CatalogError as error:
                # Shown where the admin lists what blocks a deletion; nothing is deleted.
                protected = [DELETE_REFUSED.format(error=error)]
        return deleted, counts, perms_needed, protected

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        served = {model["name"] for model in configured_document()["models"]}
        unserved = PublicModel.objects.filter(enabled=True).exclude(name__in=served).values_list("name", flat=True)
        if unserved:
            self.message_user(request, UNSERVED.format(models=", ".join(unserved)), messages.WARNING)


# --- Providers ----------------------------------------------------------------------------------


class ProviderForm(CatalogCheckedForm):
    class Meta:
        model = UpstreamProvider
        fields = (
            "name", "kind", "base_url", "api_key_env", "enabled",
            "extra_headers", "connect_timeout", "read_timeout", "max_connections", "options",
        )

    def clean_extra_headers(self) -> Any:
        return self.cleaned_data["extra_headers"] or {}

    def clean_options(self) -> Any:
        return self.cleaned_data["options"] or {}


@admin.register(UpstreamProvider)
class ProviderAdmin(CatalogCheckedAdmin):
    form = ProviderForm
    list_display = ("name", "kind", "base_url", "api_key_env", "key_set", "enabled")
    list_filter = ("kind", "enabled")
    search_fields = ("name", "base_url")
    readonly_fields = ("key_set", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "kind", "base_url", "api_key_env", "key_set", "enabled")}),
        ("Calls", {"fields": ("extra_headers", "connect_timeout", "read_timeout", "max_connections", "options")}),
        (None, {"fields": ("updated_at",)}),
    )

    @admin.display(boolean=True, description="key set?")
    def key_set(self, obj: UpstreamProvider) -> bool | None:
        """Whether its key variable is set in this process (None: it names none). Never the value."""
        if not obj.api_key_env:
            return None
        # Read as the gateway reads it; the kind plays no part in reading a key.
        return ProviderSpec(name=obj.name, kind="openai", api_key_env=obj.api_key_env).is_configured


# --- Models and their deployments ---------------------------------------------------------------


class PublicModelForm(forms.ModelForm):
    class Meta:
        model = PublicModel
        fields = ("name", "owned_by", "routing", "fallbacks", "context_window", "enabled")

    def clean_fallbacks(self) -> Any:
        fallbacks = self.cleaned_data["fallbacks"] or []
        unknown = unknown_fallbacks(fallbacks)
        if unknown:
            raise ValidationError(UNKNOWN_FALLBACKS.format(names=", ".join(map(repr, unknown))))
        return fallbacks


class DeploymentFormSet(BaseInlineFormSet):
    """A model's deployments, validated with the model as one change to the catalog."""

    instance: PublicModel

    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        kept = [form for form in self.forms if not form.cleaned_data.get("DELETE") and form.cleaned_data and (form.instance.pk or form.has_changed())]
        removed = [form.instance.pk for form in self.forms if form.cleaned_data.get("DELETE") and form.instance.pk]
        model = copy.copy(self.instance)
        try:
            model.full_clean()
        except ValidationError:
            return  # the model's form says why
        if unknown_fallbacks(model.fallbacks):
            return  # likewise
        if model.enabled and not any(form.cleaned_data["enabled"] and form.cleaned_data["provider"].enabled for form in kept):
            raise ValidationError(NO_DEPLOYMENT)

        def change() -> None:
            # Copies: the forms' own instances are saved after, by the admin, if this passes.
            model.save()
            UpstreamDeployment.objects.filter(pk__in=removed).delete()
            for form in kept:
                deployment = copy.copy(form.instance)
                deployment.model = model
                deployment.save()

        refusal = catalog_refusal(change)
        if refusal is not None:
            raise ValidationError(refusal)


class DeploymentInline(admin.TabularInline):
    model = UpstreamDeployment
    formset = DeploymentFormSet
    extra = 1
    fields = ("provider", "upstream_model", "priority", "weight", "rpm", "tpm", "enabled", "breaker")
    readonly_fields = ("breaker",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[UpstreamDeployment]:
        return super().get_queryset(request).select_related("provider")

    @admin.display(description="breaker")
    def breaker(self, obj: UpstreamDeployment) -> str:
        return breaker_text(deployment_name(obj)) if obj.pk else NO_VALUE


@admin.register(PublicModel)
class PublicModelAdmin(CatalogCheckedAdmin):
    form = PublicModelForm
    inlines = [DeploymentInline]
    list_display = ("name", "routing", "deployment_list", "fallback_list", "context_window", "enabled")
    list_filter = ("routing", "enabled")
    search_fields = ("name", "deployments__upstream_model")
    readonly_fields = ("updated_at",)
    fieldsets = (
        (None, {"fields": ("name", "owned_by", "routing", "fallbacks", "context_window", "enabled", "updated_at")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[PublicModel]:
        return super().get_queryset(request).prefetch_related("deployments__provider")

    @admin.display(description="deployments (in priority order)")
    def deployment_list(self, obj: PublicModel) -> str:
        names = [deployment_name(deployment) for deployment in obj.deployments.all() if deployment.enabled]
        return ", ".join(names) or NO_VALUE

    @admin.display(description="fallbacks")
    def fallback_list(self, obj: PublicModel) -> str:
        return ", ".join(obj.fallbacks) or NO_VALUE


class DeploymentForm(CatalogCheckedForm):
    class Meta:
        model = UpstreamDeployment
        fields = ("model", "provider", "upstream_model", "priority", "weight", "rpm", "tpm", "options", "enabled")

    def clean_options(self) -> Any:
        return self.cleaned_data["options"] or {}


@admin.register(UpstreamDeployment)
class DeploymentAdmin(CatalogCheckedAdmin):
    form = DeploymentForm
    list_display = ("model", "provider", "upstream_model", "priority", "weight", "rpm", "tpm", "enabled", "breaker")
    list_display_links = ("upstream_model",)
    list_filter = ("provider", "model", "enabled")
    list_select_related = ("model", "provider")
    search_fields = ("upstream_model", "model__name", "provider__name")
    readonly_fields = ("breaker",)
    fields = ("model", "provider", "upstream_model", "priority", "weight", "rpm", "tpm", "options", "enabled", "breaker")

    @admin.display(description="breaker")
    def breaker(self, obj: UpstreamDeployment) -> str:
        return breaker_text(deployment_name(obj)) if obj.pk else NO_VALUE
