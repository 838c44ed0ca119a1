"""What the end user's pages (`chat_views`, `portal`) share: their rate and the logged-in user's id."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest

LOGIN_REQUIRED = "Your session has ended. Log in again to continue."


def page_rate(group: str, request: HttpRequest) -> str:
    """django-ratelimit's rate for the pages' requests, read per request so tests can change it."""
    return str(settings.CHAT_PAGE_RATE)


def user_id_of(request: HttpRequest) -> int:
    """The logged-in user's id. The views check the login first; should one not, this is a 403,
    never a query for user None."""
    user_id = request.user.pk
    if user_id is None:
        raise PermissionDenied(LOGIN_REQUIRED)
    return int(user_id)
