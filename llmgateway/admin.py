"""API keys in the admin: read-mostly. A key is created with `manage.py createapikey`, which shows
its secret once; here staff label, limit, expire or revoke keys."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from llmgateway.models import ApiKey
from llmgateway.services import api_key_revoke


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "name", "user", "created_at", "last_used_at", "expires_at", "revoked_at", "rpm_limit", "tpm_limit", "max_concurrent")
    list_filter = ("revoked_at",)
    list_select_related = ("user",)
    search_fields = ("prefix", "name", "user__username")
    readonly_fields = ("user", "prefix", "created_at", "last_used_at")
    fields = ("user", "prefix", "name", "created_at", "last_used_at", "expires_at", "revoked_at", "rpm_limit", "tpm_limit", "max_concurrent")
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the secret must be shown once: use `manage.py createapikey`

    @admin.action(description="Revoke selected keys now", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for api_key in queryset:
            api_key_revoke(api_key=api_key)
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)
