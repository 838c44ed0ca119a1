"""A change to the configured upstreams applies at once in this process (others: within
UPSTREAMS_CACHE_SECONDS)."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from upstreams.catalog import forget
from upstreams.models import PublicModel, UpstreamDeployment, UpstreamProvider


@receiver([post_save, post_delete], sender=UpstreamProvider)
@receiver([post_save, post_delete], sender=PublicModel)
@receiver([post_save, post_delete], sender=UpstreamDeployment)
def _catalog_changed(**kwargs: Any) -> None:
    forget()
