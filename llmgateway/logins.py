"""Logins for end users: staff give one a password, or a one-time link to set it; users change it.

A user made by `createapikey` has no password and cannot log in. Staff give them a login:
- in the admin: the Users list's action "Make a set-password link" (a page with one link per
  user, to send them), or Django's own "Set password" form on the user's page;
- or with `manage.py createlogin USERNAME`, which prints a link or reads a password from stdin
  (never from the command line, where other users of the machine would see it in `ps`).

A link is Django's password-reset token (`default_token_generator`): it works once, because it
signs the user's password hash and last login, both of which setting a password changes, and it
expires after PASSWORD_RESET_TIMEOUT seconds (3 days by default). The views are Django's
(`PasswordResetConfirmView`, `PasswordChangeView`) with the project's templates; setting a
password through a link is rate limited per address as logging in is.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.models import User
from django.contrib.auth.tokens import default_token_generator
from django.urls import reverse, reverse_lazy
from django.utils.decorators import method_decorator
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from django_ratelimit.decorators import ratelimit


def password_set_path(*, user: User) -> str:
    """The path of a one-time link that lets `user` choose a password (then log in)."""
    uidb64 = urlsafe_base64_encode(force_bytes(user.pk))
    return reverse("password_set", kwargs={"uidb64": uidb64, "token": default_token_generator.make_token(user)})


@method_decorator(ratelimit(key="ip", rate=lambda group, request: settings.LOGIN_RATE, method="POST", block=True), name="post")
class PasswordSetView(auth_views.PasswordResetConfirmView):
    template_name = "registration/password_set.html"
    success_url = reverse_lazy("password_set_done")
    post_reset_login = False


class PasswordSetDoneView(auth_views.PasswordResetCompleteView):
    template_name = "registration/password_set_done.html"


class PasswordChangeView(auth_views.PasswordChangeView):
    template_name = "registration/password_change.html"
    success_url = reverse_lazy("password_change_done")


class PasswordChangeDoneView(auth_views.PasswordChangeDoneView):
    template_name = "registration/password_change_done.html"
