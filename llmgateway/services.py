"""Writes for API keys."""

from __future__ import annotations

from datetime import datetime

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from calls.control import StopOrder, stop_calls_sync
from llmgateway.auth import forget_verified_keys
from llmgateway.models import DISPLAY_PREFIX_LENGTH, ApiKey, generate_api_key, hash_api_key


@transaction.atomic
def api_key_create(
    *,
    username: str,
    name: str = "",
    expires_at: datetime | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    max_concurrent: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key for `username` (creating the user if needed); return it with the raw secret.

    The raw secret is returned once and never stored.
    """
    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(defaults=None, **{user_model.USERNAME_FIELD: username})
    raw_key = generate_api_key()
    api_key = ApiKey.objects.create(
        user=user,
        name=name,
        prefix=raw_key[:DISPLAY_PREFIX_LENGTH],
        key_hash=hash_api_key(raw_key),
        expires_at=expires_at,
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
        max_concurrent=max_concurrent,
    )
    return api_key, raw_key


def api_key_revoke(*, api_key: ApiKey) -> None:
    """Revoke a key: refused from now on, and its running calls stopped in every process."""
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    forget_verified_keys()  # update() sends no post_save
    stop_calls_sync(StopOrder(reason="api_key_revoked", api_key_id=api_key.pk))


