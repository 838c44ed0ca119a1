"""API keys: only a hash of the secret is stored, with a short prefix to recognise it by."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from django.conf import settings
from django.db import models
from django.utils import timezone

KEY_PREFIX = "sk-gw-"
DISPLAY_PREFIX_LENGTH = len(KEY_PREFIX) + 6


def hash_api_key(raw_key: str) -> str:
    """Return the stored form of a key: SHA-256 hex. Keys are 256-bit random, so no salt is needed."""
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKey(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=DISPLAY_PREFIX_LENGTH, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    # Per-key limits; null means "use the user's plan, else the global default".
    rpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute.")
    tpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens per minute.")
    max_concurrent = models.PositiveIntegerField(null=True, blank=True, help_text="Concurrent streams.")

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'unnamed'})"

    def is_active(self, at: datetime | None = None) -> bool:
        at = at or timezone.now()
        if self.revoked_at is not None and self.revoked_at <= at:
            return False
        return self.expires_at is None or self.expires_at > at
