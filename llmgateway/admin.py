"""The edge's admin: API keys, and the accounts list's actions on users.

API keys are created here or with `manage.py createapikey`, both through `api_key_create`. The
secret is shown once, on the page that answers the add form (never stored, never put in a message
or a cookie); after that only its prefix. Revocation goes through `api_key_revoke` (the "Revoke"
action) and is final: `revoked_at` is not editable. The list shows each key's state at a glance
and what it spent this month (from the key rollups), in the list's one query.

Suspending a user stops their running calls, which only the edge may do (billing is below the
call's life), so the accounts list registered by `billing.admin` is registered again here with
the suspend and unsuspend actions (`llmgateway.services.user_suspend`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from weakref import WeakKeyDictionary

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_permission_codename, get_user_model
from django.contrib.auth.admin import UserAdmin
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce, Now
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from billing import admin as billing_admin
from billing import display
from billing.fields import ExactDecimalField
from billing.models import TOTAL_DIGITS, Account, DailyKeyUsage
from billing.periods import period_containing
from llmgateway.logins import password_set_path
from llmgateway.models import ApiKey
from llmgateway.services import api_key_create, api_key_revoke, user_suspend, user_unsuspend

EXPIRY_IN_PAST = "The expiry must be in the future."
LIMIT_FIELDS = ("rpm_limit", "tpm_limit", "max_concurrent")
LIMITS_DESCRIPTION = "Empty: the user's plan, else the gateway's default (LIMITS_KEY_RPM, LIMITS_KEY_TPM, LIMITS_KEY_MAX_CONCURRENT)."


class ApiKeyCreateForm(forms.ModelForm):
    """What `api_key_create` takes; the secret, prefix and hash are the service's."""

    class Meta:
        model = ApiKey
        fields = ("user", "name", "expires_at", *LIMIT_FIELDS)
        help_texts = {
            "name": "A label for people, e.g. the service that uses the key.",
            "expires_at": "Empty: never expires.",
        }

    def clean_expires_at(self) -> datetime | None:
        expires_at = self.cleaned_data["expires_at"]
        if expires_at is not None and expires_at <= timezone.now():
            raise forms.ValidationError(EXPIRY_IN_PAST)
        return expires_at


class KeyState:
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"
    SUSPENDED = "owner suspended"


def key_state(api_key: ApiKey) -> str:
    """Why a key would be refused now, or that it works: as `llmgateway.auth` decides."""
    now = timezone.now()
    if api_key.revoked_at is not None and api_key.revoked_at <= now:
        return KeyState.REVOKED
    if api_key.expires_at is not None and api_key.expires_at <= now:
        return KeyState.EXPIRED
    if not api_key.user.is_active:
        return KeyState.SUSPENDED
    return KeyState.ACTIVE


class KeyStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "active"), ("revoked", "revoked"), ("expired", "expired"), ("suspended", "owner suspended")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        revoked = Q(revoked_at__lte=Now())
        expired = Q(expires_at__lte=Now())
        match self.value():
            case "active":
                return queryset.exclude(revoked).exclude(expired).filter(user__is_active=True)
            case "revoked":
                return queryset.filter(revoked)
            case "expired":
                return queryset.exclude(revoked).filter(expired)
            case "suspended":
                return queryset.exclude(revoked).exclude(expired).filter(user__is_active=False)
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "name", "user", "state", "spent", "last_used", "expires", "limits")
    list_filter = (KeyStateFilter,)
    list_select_related = ("user",)
    list_per_page = 100
    search_fields = ("prefix", "name", "user__username")
    raw_id_fields = ("user",)
    actions = ["revoke"]
    add_form = ApiKeyCreateForm
    add_fieldsets = (
        (None, {"fields": ("user", "name", "expires_at")}),
        ("Limits", {"fields": LIMIT_FIELDS, "description": LIMITS_DESCRIPTION}),
    )
    fieldsets = (
        (None, {"fields": ("user", "prefix", "name", "state", "spent_exact", "created_at", "last_used_at", "revoked_at", "expires_at")}),
        ("Limits", {"fields": LIMIT_FIELDS, "description": LIMITS_DESCRIPTION}),
    )
    readonly_fields = ("user", "prefix", "state", "spent_exact", "created_at", "last_used_at", "revoked_at")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The secret between `save_model` and `response_add` of one request, then gone.
        self._secrets: WeakKeyDictionary[HttpRequest, str] = WeakKeyDictionary()

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        # From the key rollups (one row per key and billing day, equal to the ledger's sums): a
        # month of a key's calls is a month of its days, whatever its traffic; summing its ledger
        # rows instead took 0.2 s for the list sorted by spend on a million rows.
        month = period_containing("month", timezone.now())
        spend = (
            DailyKeyUsage.objects.filter(api_key_id=OuterRef("pk"), day__gte=month.first_day, day__lt=month.end_day)
            .order_by()
            .values("api_key_id")
            .annotate(total=Sum("cost_usd"))
            .values("total")
        )
        money = ExactDecimalField(**TOTAL_DIGITS)  # read back as the column is stored (billing.fields)
        return super().get_queryset(request).annotate(_month_spend=Coalesce(Subquery(spend), Value(0), output_field=money))

    # --- Adding a key: the service makes it, the answer shows its secret once ---------------

    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return self.add_fieldsets if obj is None else super().get_fieldsets(request, obj)

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return () if obj is None else super().get_readonly_fields(request, obj)

    def get_form(self, request: HttpRequest, obj: ApiKey | None = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = self.add_form
        return super().get_form(request, obj, change=change, **kwargs)

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None) -> HttpResponse:
        # One way out of the form: the page with the secret.
        extra_context = {**(extra_context or {}), "show_save_and_add_another": False, "show_save_and_continue": False}
        return super().add_view(request, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created, secret = api_key_create(
            username=obj.user.get_username(),
            name=obj.name,
            expires_at=obj.expires_at,
            rpm_limit=obj.rpm_limit,
            tpm_limit=obj.tpm_limit,
            max_concurrent=obj.max_concurrent,
        )
        # The admin goes on with the form's instance (log entry, answer): make it the saved key.
        for field in ApiKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(created, field.attname))
        obj._state.adding, obj._state.db = False, created._state.db
        self._secrets[request] = secret

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> HttpResponse:
        secret = self._secrets.pop(request, None)
        if secret is None:  # a popup, or a subclass that saved otherwise
            return super().response_add(request, obj, post_url_continue)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "API key created",
            "api_key": obj,
            "secret": secret,
        }
        # The admin's views are never cached (admin_view adds Cache-Control: no-store).
        return TemplateResponse(request, "admin/llmgateway/apikey/created.html", context)

    # --- The list ---------------------------------------------------------------------------

    @admin.display(description="state", ordering="revoked_at")
    def state(self, obj: ApiKey) -> SafeString:
        state = key_state(obj)
        kind = {KeyState.ACTIVE: "ok", KeyState.SUSPENDED: "warn"}.get(state, "bad")
        return format_html('<span class="badge {}">{}</span>', kind, state)

    @admin.display(description="spent this month", ordering="_month_spend")
    def spent(self, obj: ApiKey) -> str:
        return display.usd_brief(obj._month_spend)  # type: ignore[attr-defined]

    @admin.display(description="spent this month (exact)")
    def spent_exact(self, obj: ApiKey) -> str:
        return display.usd_exact(obj._month_spend)  # type: ignore[attr-defined]

    @admin.display(description="last used", ordering="last_used_at")
    def last_used(self, obj: ApiKey) -> str:
        return "never" if obj.last_used_at is None else display.when(obj.last_used_at)

    @admin.display(description="expires", ordering="expires_at")
    def expires(self, obj: ApiKey) -> str:
        return "never" if obj.expires_at is None else display.when(obj.expires_at)

    @admin.display(description="limits")
    def limits(self, obj: ApiKey) -> str:
        parts = [
            f"{display.count(value)} {unit}"
            for value, unit in ((obj.rpm_limit, "rpm"), (obj.tpm_limit, "tpm"), (obj.max_concurrent, "streams"))
            if value is not None
        ]
        return " · ".join(parts) or "defaults"

    @admin.action(description="Revoke selected keys now", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        live = [api_key for api_key in queryset if api_key.revoked_at is None]
        for api_key in live:
            api_key_revoke(api_key=api_key)
        self.message_user(request, f"Revoked {len(live)} key(s).", messages.SUCCESS)


admin.site.unregister(Account)


@admin.register(Account)
class AccountAdmin(billing_admin.AccountAdmin):
    """`billing.admin.AccountAdmin`, with actions on the account's user."""

    actions = ["suspend", "unsuspend"]

    def has_suspend_permission(self, request: HttpRequest) -> bool:
        """Suspending changes the user: it takes change permission on accounts and on users."""
        user_opts = get_user_model()._meta
        return self.has_change_permission(request) and request.user.has_perm(
            f"{user_opts.app_label}.{get_permission_codename('change', user_opts)}"
        )

    @admin.action(description="Suspend the selected users (keys, chat and running calls stop)", permissions=["suspend"])
    def suspend(self, request: HttpRequest, queryset: QuerySet[Account]) -> None:
        changed = sum(user_suspend(user_id=user_id) for user_id in queryset.values_list("user_id", flat=True))
        self.message_user(request, f"Suspended {changed} user(s).", messages.SUCCESS)

    @admin.action(description="Unsuspend the selected users", permissions=["suspend"])
    def unsuspend(self, request: HttpRequest, queryset: QuerySet[Account]) -> None:
        changed = sum(user_unsuspend(user_id=user_id) for user_id in queryset.values_list("user_id", flat=True))
        self.message_user(request, f"Unsuspended {changed} user(s).", messages.SUCCESS)


User = get_user_model()
admin.site.unregister(User)

PRIVILEGED_PASSWORD = "Only a superuser may set the password of a staff member or a superuser."


def _may_take_over(request: HttpRequest, user: Any) -> bool:
    """Whether the acting user may set `user`'s password: anyone's for a superuser, else only
    an end user's (not staff, not a superuser)."""
    return bool(request.user.is_superuser) or not (user.is_staff or user.is_superuser)


@admin.register(User)
class GatewayUserAdmin(UserAdmin):
    """Django's users, with a way to give end users a login (`llmgateway.logins`).

    A user made by `createapikey` has no password. Staff either set one on the user's page
    (Django's "Set password" form) or make a one-time link with the action below and send it.
    Either takes the account over, so for a staff member or a superuser only a superuser may:
    otherwise any staff with `change_user` could become a superuser.
    """

    actions = ["password_set_links"]

    def user_change_password(self, request: HttpRequest, id: str, form_url: str = "") -> HttpResponse:
        user = self.get_object(request, unquote(id))
        if user is not None and not _may_take_over(request, user):
            raise PermissionDenied(PRIVILEGED_PASSWORD)
        return super().user_change_password(request, id, form_url)

    @admin.action(description="Make one-time set-password links for the selected users", permissions=["change"])
    def password_set_links(self, request: HttpRequest, queryset: QuerySet[Any]) -> TemplateResponse | None:
        users = list(queryset.order_by(User.USERNAME_FIELD))
        refused = [user for user in users if not _may_take_over(request, user)]
        if refused:
            names = ", ".join(user.get_username() for user in refused)
            self.message_user(request, f"{PRIVILEGED_PASSWORD} No link for: {names}.", messages.ERROR)
            users = [user for user in users if user not in refused]
            if not users:
                return None  # back to the list, with the message
        links = [(user, request.build_absolute_uri(password_set_path(user=user))) for user in users]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Set-password links",
            "links": links,
            "timeout_days": settings.PASSWORD_RESET_TIMEOUT // 86_400,
        }
        # The admin's views are never cached (admin_view adds Cache-Control: no-store).
        return TemplateResponse(request, "admin/llmgateway/password_links.html", context)
