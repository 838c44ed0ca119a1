"""Writes to the configured upstreams: import a document, export them, try a change first.

Every write leaves a catalog the runtime accepts. The result is validated as `upstreams.catalog`
will read it (`catalog_with_document(environment_catalog(), configured_document())`) inside the
write's transaction, so a change that would break it (a fallback to a model deleted, disabled or
left without deployments) is refused and nothing is written; accepted, it would be logged by
every process and the environment's catalog used instead until someone noticed.

`upstreams_change_check` asks the same question of a change before it is made (the admin's forms
and delete pages): the change is made in a savepoint, the catalog read back and validated, and
the savepoint rolled back. Writing in order to find out looks roundabout; it is deliberate: the
document is built by the code the runtime uses (`configured_document`), so what is checked is
what will run, without a second copy of its rules (which rows it leaves out) to drift.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from streaming.catalog import (
    Catalog,
    CatalogError,
    ProviderSpec,
    catalog_with_document,
    environment_catalog,
)
from upstreams.catalog import configured_document, forget
from upstreams.models import PublicModel, UpstreamDeployment, UpstreamProvider

EMPTY_DOCUMENT = "document: empty (expected providers and models)"
LISTED_TWICE = "{where}.name: {name!r} is listed twice"
PROVIDER_NOT_HERE = (
    "models[{index}] ({model}): deployment {deployment}: {provider!r} is the environment's provider, "
    "not one configured here; list it under providers"
)
PROVIDER_IN_USE = (
    "provider {provider!r} is not in the document but is still used by model(s) {models}; "
    "list it under providers, or move those deployments first"
)
ROW_INVALID = "{where}: {errors}"


@dataclass(slots=True)
class ImportResult:
    """What an import changed, each entry a label: `provider groq`, `model team-chat`,
    `deployment team-chat: groq/llama-3.1-8b-instant`. Deployments of a removed model are
    removed with it and not listed."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


def upstreams_catalog_check() -> Catalog:
    """The catalog the runtime would build from the rows now; `CatalogError` if it would refuse them."""
    return catalog_with_document(environment_catalog(), configured_document())


def upstreams_change_check(*, change: Callable[[], object]) -> None:
    """Make `change` in a savepoint, validate the catalog it leaves, and undo it.

    Raises `CatalogError` naming the problem. A database error of the change itself (a unique
    constraint) propagates: the change would fail the same way when made.
    """
    with transaction.atomic():
        change()
        try:
            upstreams_catalog_check()
        finally:
            transaction.set_rollback(True)


def upstreams_export() -> dict[str, Any]:
    """The configured providers and models as an upstreams document (the disabled ones left out)."""
    return configured_document()


def _row_save(row: UpstreamProvider | PublicModel | UpstreamDeployment, where: str) -> None:
    """Save a row as the admin would: only if its own validation (field validators, clean()) passes."""
    try:
        row.full_clean()
    except ValidationError as error:
        errors = "; ".join(f"{name}: {' '.join(messages)}" for name, messages in error.message_dict.items())
        raise CatalogError(ROW_INVALID.format(where=where, errors=errors)) from None
    row.save()


def _differs(row: Any, values: Mapping[str, Any]) -> bool:
    return any(getattr(row, name) != value for name, value in values.items())


def _upsert[R: UpstreamProvider | PublicModel | UpstreamDeployment](
    result: ImportResult, row: R | None, *, create: Callable[[], R], values: Mapping[str, Any], where: str, label: str
) -> R:
    """Save `create()` if there is no row, else the row with `values` if they differ; tell `result`."""
    if row is None:
        row = create()
        _row_save(row, where)
        result.added.append(label)
    elif _differs(row, values):
        for attribute, value in values.items():
            setattr(row, attribute, value)
        _row_save(row, where)
        result.updated.append(label)
    else:
        result.unchanged += 1
    return row


def _provider_values(spec: ProviderSpec) -> dict[str, Any]:
    return {
        "kind": spec.kind,
        "base_url": spec.base_url,
        "api_key_env": spec.api_key_env,
        "extra_headers": dict(spec.headers),
        "connect_timeout": spec.connect_timeout,
        "read_timeout": spec.read_timeout,
        "max_connections": spec.max_connections,
        "options": dict(spec.options),
        "enabled": True,
    }


def _names(entries: list[Any], where: str) -> list[str]:
    """The entries' names in document order; a name listed twice is refused (the second would win
    silently)."""
    names: list[str] = []
    for index, entry in enumerate(entries):
        name = entry["name"].strip()
        if name in names:
            raise CatalogError(LISTED_TWICE.format(where=f"{where}[{index}]", name=name))
        names.append(name)
    return names


def upstreams_import(*, document: Any, replace: bool = False, dry_run: bool = False) -> ImportResult:
    """Make the configured upstreams those of `document` (a parsed YAML or JSON upstreams document).

    The document is validated first, on its own against the environment's catalog (its models'
    deployments name its own providers, or the environment's); then, in one transaction:
    providers are added or updated by name, and so are models; each imported model's deployments
    become the document's (matched by provider and upstream model; one the catalog left out, that
    is disabled or on a disabled provider, is kept, unless `replace`). Imported rows are enabled.
    With `replace`, providers and models the document does not list are deleted. The resulting
    catalog is validated as the runtime reads it. Any error (`CatalogError`) writes nothing;
    `dry_run` reports the changes and writes nothing either.
    """
    if not document:
        raise CatalogError(EMPTY_DOCUMENT)
    catalog = catalog_with_document(environment_catalog(), document)
    provider_names = _names(document.get("providers") or [], "providers")
    model_entries: list[dict[str, Any]] = document.get("models") or []
    model_names = _names(model_entries, "models")
    result = ImportResult(dry_run=dry_run)

    with transaction.atomic():
        providers = {provider.name: provider for provider in UpstreamProvider.objects.select_for_update()}
        # Which deployments the catalog serves before the import (what an export would list).
        served = {provider.name for provider in providers.values() if provider.enabled}

        for index, name in enumerate(provider_names):
            values = _provider_values(catalog.providers[name])
            providers[name] = _upsert(
                result,
                providers.get(name),
                create=partial(UpstreamProvider, name=name, **values),
                values=values,
                where=f"providers[{index}]",
                label=f"provider {name}",
            )

        models = {model.name: model for model in PublicModel.objects.select_for_update()}
        for index, (name, entry) in enumerate(zip(model_names, model_entries, strict=True)):
            route = catalog.routes[name]
            values = {
                "owned_by": (entry.get("owned_by") or "").strip(),
                "routing": route.routing,
                "fallbacks": list(route.fallbacks),
                "context_window": route.context_window,
                "enabled": True,
            }
            model = models[name] = _upsert(
                result,
                models.get(name),
                create=partial(PublicModel, name=name, **values),
                values=values,
                where=f"models[{index}]",
                label=f"model {name}",
            )

            existing = {
                (deployment.provider.name, deployment.upstream_model): deployment
                for deployment in model.deployments.select_related("provider")
            }
            for spec in route.deployments:
                provider = providers.get(spec.provider.name)
                if provider is None:
                    raise CatalogError(
                        PROVIDER_NOT_HERE.format(index=index, model=name, deployment=spec.name, provider=spec.provider.name)
                    )
                deployment_values = {
                    "priority": spec.priority,
                    "weight": spec.weight,
                    "rpm": spec.rpm,
                    "tpm": spec.tpm,
                    "options": dict(spec.options),
                    "enabled": True,
                }
                _upsert(
                    result,
                    existing.pop((spec.provider.name, spec.upstream_model), None),
                    create=partial(
                        UpstreamDeployment, model=model, provider=provider, upstream_model=spec.upstream_model, **deployment_values
                    ),
                    values=deployment_values,
                    where=f"models[{index}].deployments ({spec.name})",
                    label=f"deployment {name}: {spec.name}",
                )
            for (provider_name, upstream_model), deployment in existing.items():
                if replace or (deployment.enabled and provider_name in served):
                    deployment.delete()
                    result.removed.append(f"deployment {name}: {provider_name}/{upstream_model}")

        if replace:
            for name, model in models.items():
                if name not in model_names:
                    model.delete()
                    result.removed.append(f"model {name}")
            absent = [name for name in providers if name not in provider_names]
            users = (
                UpstreamDeployment.objects.filter(provider__name__in=absent)
                .values_list("provider__name", "model__name")
                .order_by("provider__name", "model__name")
            )
            in_use: dict[str, list[str]] = {}
            for provider_name, model_name in users:
                in_use.setdefault(provider_name, []).append(model_name)
            if in_use:
                raise CatalogError(
                    "; ".join(PROVIDER_IN_USE.format(provider=name, models=", ".join(used_by)) for name, used_by in in_use.items())
                )
            for name in absent:
                providers[name].delete()
                result.removed.append(f"provider {name}")

        upstreams_catalog_check()
        if dry_run:
            transaction.set_rollback(True)
        else:
            # The signals forgot the catalog as each row was saved; a read between then and the
            # commit would have cached the old rows.
            transaction.on_commit(forget)
    return result
