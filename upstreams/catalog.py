"""The live catalog: the environment's (`streaming.catalog.environment_catalog`) plus what staff
configured in the admin, re-read at most every UPSTREAMS_CACHE_SECONDS.

Edits in this process apply at once (`forget`, from the models' signals); other processes see
them within the delay. Failure policy: when the database cannot be read, the last catalog read
stays in use (or the environment's, before any read succeeded), and it is tried again after the
delay; a document in the database that no longer makes a valid catalog (a fallback to a model
since deleted, say) is logged and the environment's catalog is used until it is fixed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from django.conf import settings

from infra.db import db_task
from streaming.catalog import (
    Catalog,
    CatalogError,
    ModelRoute,
    catalog_with_document,
    environment_catalog,
)

logger = logging.getLogger(__name__)

_catalog: Catalog | None = None
_read_at = 0.0  # time.monotonic() of the last read, successful or not


def configured_document() -> dict[str, Any]:
    """The admin's providers and models as an upstreams document (disabled ones left out)."""
    from upstreams.models import PublicModel, UpstreamProvider

    providers = [provider.as_document() for provider in UpstreamProvider.objects.filter(enabled=True)]
    models = []
    for model in PublicModel.objects.filter(enabled=True).prefetch_related("deployments__provider"):
        deployments = [
            {
                "provider": deployment.provider.name,
                "upstream_model": deployment.upstream_model,
                "priority": deployment.priority,
                "weight": deployment.weight,
                **{unit: value for unit in ("rpm", "tpm") if (value := getattr(deployment, unit)) is not None},
                **({"options": deployment.options} if deployment.options else {}),
            }
            for deployment in model.deployments.all()
            if deployment.enabled and deployment.provider.enabled
        ]
        if not deployments:
            continue
        entry: dict[str, Any] = {
            "name": model.name,
            "routing": model.routing,
            "fallbacks": list(model.fallbacks),
            "context_window": model.context_window,
            "deployments": deployments,
        }
        if model.owned_by:
            entry["owned_by"] = model.owned_by
        models.append(entry)
    return {"providers": providers, "models": models}


def _read() -> Catalog:
    base = environment_catalog()
    try:
        document = configured_document()
    except Exception as error:  # the database is down, or not migrated yet
        logger.warning("reading the configured upstreams failed (%s: %s); keeping the last catalog", type(error).__name__, error)
        raise
    try:
        return catalog_with_document(base, document)
    except CatalogError as error:
        logger.error("the configured upstreams do not make a valid catalog (%s); using the environment's", error)
        return base


_read_in_thread = db_task(_read)


def _fresh() -> bool:
    return _catalog is not None and time.monotonic() - _read_at < settings.UPSTREAMS_CACHE_SECONDS


def _store(read: Catalog | None) -> Catalog:
    global _catalog, _read_at
    _read_at = time.monotonic()
    if read is not None:
        _catalog = read
    elif _catalog is None:
        _catalog = environment_catalog()
    return _catalog


def catalog() -> Catalog:
    """The live catalog, from sync code (it may read the database)."""
    if _fresh():
        assert _catalog is not None
        return _catalog
    try:
        read: Catalog | None = _read()
    except Exception:
        read = None
    return _store(read)


_reading: asyncio.Task[Catalog] | None = None  # the read in flight, shared by every caller
_generation = 0  # moved on by forget(): a read begun before it stores nothing


async def _read_and_store() -> Catalog:
    generation = _generation
    try:
        read: Catalog | None = await _read_in_thread()
    except Exception:
        read = None
    if generation != _generation:  # forgotten meanwhile: this read may predate the change
        return read or _catalog or environment_catalog()
    return _store(read)


async def acatalog() -> Catalog:
    """The live catalog, from async code. A read runs in a thread, one at a time, and is shared
    by every caller that finds the catalog stale. Once a catalog was read, those callers get it
    at once and the read replaces it when it ends (refresh ahead: the calls of a busy process
    never wait for the database); only with none yet (at start, or forgotten) do they wait."""
    global _reading
    if _fresh():
        assert _catalog is not None
        return _catalog
    reading = _reading
    if reading is None or reading.done() or reading.get_loop() is not asyncio.get_running_loop():
        reading = _reading = asyncio.ensure_future(_read_and_store())
    if _catalog is not None:
        return _catalog
    return await asyncio.shield(reading)  # a caller that leaves does not cancel the others' read


def forget() -> None:
    """Read the catalog again on next use (staff changed it, or a test changed the settings)."""
    global _catalog, _read_at, _reading, _generation
    _catalog, _read_at, _reading = None, 0.0, None
    _generation += 1


def route_for(model: str) -> ModelRoute | None:
    return catalog().route_for(model)


def available_routes() -> list[ModelRoute]:
    return catalog().available()
