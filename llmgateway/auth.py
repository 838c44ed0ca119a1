"""API key authentication for the `/v1` API (`Authorization: Bearer <key>`)."""

from __future__ import annotations

import hmac
from datetime import timedelta
from importlib import import_module

from django.conf import settings
from django.contrib.auth import get_user
from django.http import HttpRequest
from django.utils import timezone

from calls.principal import Principal
from infra.db import db_task
from infra.refresh import RefreshAhead
from llmgateway.errors import AuthenticationFailed
from llmgateway.models import KEY_PREFIX, ApiKey, hash_api_key

MISSING_KEY = "You didn't provide an API key. Provide it in the Authorization header as 'Bearer <key>'."
INVALID_KEY = "Incorrect API key provided."
INACTIVE_KEY = "This API key has been revoked or has expired."
SESSION_REQUIRED = "Log in to use the chat page."
INACTIVE_USER = "The account that owns this API key is disabled."
# last_used_at is refreshed at most this often, so authentication stays a read.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# Where the lean ASGI handler leaves the Principal of an API call it authenticated before
# reading the body (`llmgateway.asgi`). Only the server sets ASGI scope keys, never a client.
PRINCIPAL_SCOPE_KEY = "llmgateway.principal"


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(MISSING_KEY)
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed(MISSING_KEY)
    return token


async def aprincipal_for_api_call(request: HttpRequest) -> Principal:
    """The caller of an API request: authenticated by the handler already, or now."""
    scope = getattr(request, "scope", None) or {}
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    if isinstance(principal, Principal):
        return principal
    return await aauthenticate(request.headers.get("Authorization"))


async def aauthenticate(authorization: str | None) -> Principal:
    """Resolve an Authorization header to a Principal or raise AuthenticationFailed (401)."""
    raw_key = _bearer_token(authorization)
    if not raw_key.startswith(KEY_PREFIX) or len(raw_key) > 200:
        raise AuthenticationFailed(INVALID_KEY)
    return await _verified.get(hash_api_key(raw_key))


def forget_verified_keys(**_: object) -> None:
    """Drop every cached verification (on any key or user change in this process)."""
    _verified.clear()


def _principal_for(presented_hash: str) -> tuple[Principal, float]:
    """The key's Principal and how many seconds it may be trusted without asking again."""
    api_key = ApiKey.objects.select_related("user").filter(key_hash=presented_hash).first()
    # The lookup is by hash; comparing again in constant time keeps timing independent of the
    # stored value whatever the database's index does.
    if api_key is None or not hmac.compare_digest(api_key.key_hash, presented_hash):
        raise AuthenticationFailed(INVALID_KEY)
    now = timezone.now()
    if not api_key.is_active(now):
        raise AuthenticationFailed(INACTIVE_KEY)
    if not api_key.user.is_active:
        raise AuthenticationFailed(INACTIVE_USER)
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
    principal = Principal(
        api_key_id=api_key.pk,
        user_id=api_key.user_id,
        username=api_key.user.get_username(),
        key_prefix=api_key.prefix,
        rpm_limit=api_key.rpm_limit,
        tpm_limit=api_key.tpm_limit,
        max_concurrent=api_key.max_concurrent,
    )
    valid_for = (api_key.expires_at - now).total_seconds() if api_key.expires_at else float("inf")
    return principal, valid_for


def _session_principal(session_key: str | None) -> Principal:
    """The logged-in user of a session, checked as Django's auth middleware checks it."""
    engine = import_module(settings.SESSION_ENGINE)
    session_request = HttpRequest()
    session_request.session = engine.SessionStore(session_key)
    user = get_user(session_request)
    if not user.is_authenticated or not user.is_active:
        raise AuthenticationFailed(SESSION_REQUIRED, code="session_required")
    return Principal(
        api_key_id=None,
        user_id=user.pk,
        username=user.get_username(),
        key_prefix="session",
        rpm_limit=None,
        tpm_limit=None,
        max_concurrent=None,
    )


async def aprincipal_for_session(request: HttpRequest) -> Principal:
    """The web chat page's caller: its logged-in user, with no API key.

    The session is read here, in a shared database thread that hands its connection straight
    back, rather than by the session and auth middleware: the chat page's stream is served by the
    lean handler, so it holds no database connection while it streams.
    """
    return await _asession_principal(request.COOKIES.get(settings.SESSION_COOKIE_NAME))


_aprincipal_for = db_task(_principal_for)
_asession_principal = db_task(_session_principal)


async def _verify(presented_hash: str) -> tuple[Principal, float]:
    principal, valid_for = await _aprincipal_for(presented_hash)
    return principal, min(settings.AUTH_CACHE_SECONDS, valid_for)


# Verified keys by hash, trusted for AUTH_CACHE_SECONDS (never past the key's expiry) and read
# again ahead of that while in use. Revoking a key in this process forgets them at once; other
# processes within AUTH_CACHE_SECONDS.
_verified: RefreshAhead[str, Principal] = RefreshAhead(
    _verify, name="verified API keys", max_entries=100_000, drop_on=(AuthenticationFailed,)
)
