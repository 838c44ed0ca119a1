"""Writes for API keys and for the users who own them (suspend, unsuspend)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from calls.control import StopOrder, stop_calls_sync
from llmgateway.auth import forget_verified_keys
from llmgateway.models import DISPLAY_PREFIX_LENGTH, ApiKey, generate_api_key, hash_api_key

if TYPE_CHECKING:
    from django.contrib.auth.base_user import AbstractBaseUser


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


class ApiKeyLimitReached(Exception):
    """A user asked for a key past the most active keys they may have."""


TOO_MANY_KEYS = "You have {limit} active keys, the most you may have. Revoke one to create another."


@transaction.atomic
def api_key_create_own(*, user_id: int, name: str, max_active: int) -> tuple[ApiKey, str]:
    """A key an end user makes for themselves (their own page), at most `max_active` live at once.

    The user's row is locked while counting, so two requests at once cannot both take the last place.
    """
    user = get_user_model().objects.select_for_update().get(pk=user_id)
    now = timezone.now()
    active = ApiKey.objects.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now), user_id=user_id, revoked_at__isnull=True)
    if active.count() >= max_active:
        raise ApiKeyLimitReached(TOO_MANY_KEYS.format(limit=max_active))
    return api_key_create(username=user.get_username(), name=name)


def api_key_rename(*, api_key: ApiKey, name: str) -> None:
    """Give a key another label (what it is for); the key itself is unchanged."""
    ApiKey.objects.filter(pk=api_key.pk).update(name=name)
    api_key.name = name


def api_key_revoke(*, api_key: ApiKey) -> None:
    """Revoke a key: refused from now on, and its running calls stopped in every process."""
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    forget_verified_keys()  # update() sends no post_save
    stop_calls_sync(StopOrder(reason="api_key_revoked", api_key_id=api_key.pk))


def _user_active_set(*, user_id: int, active: bool) -> bool:
    user = get_user_model().objects.select_for_update().get(pk=user_id)
    if user.is_active == active:
        return False
    user.is_active = active
    user.save(update_fields=["is_active"])  # post_save: this process forgets the user's verified keys
    return True


def user_suspend(*, user_id: int) -> bool:
    """Stop a user: their keys and chat sessions are refused, their running calls stopped in every
    process. Keys, limits and history stay as they are. Return whether they were active.

    A suspended user is an inactive Django user: `llmgateway.auth` refuses an inactive owner's
    key (other processes within AUTH_CACHE_SECONDS) and Django refuses their session.
    """
    with transaction.atomic():
        changed = _user_active_set(user_id=user_id, active=False)
    stop_calls_sync(StopOrder(reason="user_suspended", user_id=user_id))
    return changed


def stop_calls_of_deactivated_user(sender: type, instance: AbstractBaseUser, raw: bool = False, **kwargs: object) -> None:
    """post_save of a user: one made inactive anywhere (Django's own Users page included) has
    their running calls stopped, as `user_suspend` does."""
    if not raw and not instance.is_active and instance.pk is not None:
        stop_calls_sync(StopOrder(reason="user_suspended", user_id=instance.pk))


@transaction.atomic
def user_unsuspend(*, user_id: int) -> bool:
    """Let a suspended user call again; return whether they were suspended."""
    return _user_active_set(user_id=user_id, active=True)
