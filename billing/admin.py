"""Staff edit prices, plans and accounts here; the ledger, rollups and holds are read-only."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Count, OuterRef, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponseBase
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone

from billing.exports import FORMATS, GROUPS, ExportError, ExportSpec
from billing.fields import ExactDecimalField
from billing.models import (
    TOTAL_DIGITS,
    Account,
    AccountPrice,
    DailyUsage,
    PlanPrice,
    Price,
    PricingPlan,
    Reservation,
    UsageRecord,
)
from billing.periods import billing_zone, period_containing
from billing.views import export_spec_from_query, usage_export_response

RATE_FIELDS = ("input_usd_per_1m", "cached_input_usd_per_1m", "output_usd_per_1m")


class ReadOnlyAdmin(admin.ModelAdmin):
    """Viewable by staff with the view permission; written only by the gateway."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    """Catalog prices. One already in effect is history: change a price by adding a later row."""

    list_display = ("model", *RATE_FIELDS, "effective_from", "in_effect_now", "note")
    list_filter = ("model",)
    search_fields = ("model", "note")
    date_hierarchy = "effective_from"
    readonly_fields = ("created_at",)
    actions = None  # "delete selected" would bypass the per-row delete guard below

    @admin.display(boolean=True, description="in effect")
    def in_effect_now(self, obj: Price) -> bool:
        return obj.in_effect()

    def get_readonly_fields(self, request: HttpRequest, obj: Price | None = None) -> tuple[str, ...]:
        if obj is not None and obj.in_effect():
            return ("model", *RATE_FIELDS, "effective_from", "created_at")
        return ("created_at",)

    def has_delete_permission(self, request: HttpRequest, obj: Price | None = None) -> bool:
        if obj is not None and obj.in_effect():
            return False
        return super().has_delete_permission(request, obj)


class PlanPriceInline(admin.TabularInline):
    model = PlanPrice
    extra = 0
    fields = ("model", *RATE_FIELDS)


@admin.register(PricingPlan)
class PricingPlanAdmin(admin.ModelAdmin):
    list_display = ("name", "multiplier", "override_count", "description")
    search_fields = ("name",)
    inlines = [PlanPriceInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[PricingPlan]:
        return super().get_queryset(request).annotate(_overrides=Count("prices"))

    @admin.display(description="model overrides", ordering="_overrides")
    def override_count(self, obj: PricingPlan) -> int:
        return obj._overrides  # type: ignore[attr-defined]


class AccountPriceInline(admin.TabularInline):
    model = AccountPrice
    extra = 0
    fields = ("model", *RATE_FIELDS)


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    list_display = (
        "user",
        "plan",
        "spent_this_month",
        "monthly_spend_limit_usd",
        "daily_spend_limit_usd",
        "monthly_token_limit",
        "daily_token_limit",
        "soft_threshold",
    )
    list_filter = ("plan",)
    list_select_related = ("user", "plan")
    search_fields = ("user__username", "user__email")
    raw_id_fields = ("user",)
    readonly_fields = ("created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("user", "plan")}),
        (
            "Budgets (empty = no limit; calendar periods in BILLING_TIME_ZONE)",
            {"fields": ("monthly_spend_limit_usd", "daily_spend_limit_usd", "monthly_token_limit", "daily_token_limit", "soft_threshold")},
        ),
        (None, {"fields": ("created_at", "updated_at")}),
    )
    inlines = [AccountPriceInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Account]:
        month = period_containing("month", timezone.now())
        spend = (
            DailyUsage.objects.filter(user_id=OuterRef("user_id"), day__gte=month.first_day, day__lt=month.end_day)
            .order_by()
            .values("user_id")
            .annotate(total=Sum("cost_usd"))
            .values("total")
        )
        money = ExactDecimalField(**TOTAL_DIGITS)  # read back as the column is stored (billing.fields)
        return super().get_queryset(request).annotate(_month_spend=Coalesce(Subquery(spend), Value(0), output_field=money))

    @admin.display(description="spent this month (USD)", ordering="_month_spend")
    def spent_this_month(self, obj: Account) -> Decimal:
        return obj._month_spend  # type: ignore[attr-defined]


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "user",
        "model",
        "status",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost_usd",
        "price_source",
        "stream",
    )
    list_filter = ("status", "price_source", "token_source", "stream", "provider", "model")
    list_select_related = ("user",)
    search_fields = ("=request_id", "user__username", "model")
    date_hierarchy = "created_at"
    show_full_result_count = False
    actions = ["export_csv"]

    @admin.action(description="Export selected usage records as CSV", permissions=["view"])
    def export_csv(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> HttpResponseBase:
        """The selected ledger rows, streamed by the exporter `manage.py export_costs` uses."""
        return usage_export_response(request, ExportSpec(), records=queryset)

    def get_urls(self) -> list[URLPattern]:
        export = path(
            "export/",
            self.admin_site.admin_view(self.export_view),
            name=f"{self.opts.app_label}_{self.opts.model_name}_export",
        )
        return [export, *super().get_urls()]

    def export_view(self, request: HttpRequest) -> HttpResponseBase:
        """Without a query, a form; with one, the export it describes, streamed (`billing.views`).

        Staff only (`admin_view` redirects others to the login), with view permission on usage
        records. A bad parameter shows the form again with the error, status 400.
        """
        if not self.has_view_permission(request):
            raise PermissionDenied
        error = ""
        if request.GET:
            try:
                spec = export_spec_from_query(request.GET)
            except ExportError as exc:
                error = str(exc)
            else:
                return usage_export_response(request, spec)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Export costs",
            "error": error,
            "query": request.GET,
            "groups": GROUPS,
            "formats": FORMATS,
            "chosen_groups": request.GET.getlist("group_by"),
            "billing_time_zone": billing_zone().key,
        }
        return TemplateResponse(request, "admin/billing/usagerecord/export.html", context, status=400 if error else 200)


@admin.register(DailyUsage)
class DailyUsageAdmin(ReadOnlyAdmin):
    list_display = ("day", "user", "model", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd")
    list_filter = ("model",)
    list_select_related = ("user",)
    search_fields = ("user__username", "model")
    date_hierarchy = "day"


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdmin):
    """Budget held by calls in flight. Deleting one frees its budget early (it expires anyway)."""

    list_display = ("created_at", "account", "model", "cost_usd", "tokens", "expires_at")
    list_select_related = ("account__user",)
    search_fields = ("=request_id", "account__user__username")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return admin.ModelAdmin.has_delete_permission(self, request, obj)
