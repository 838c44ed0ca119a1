"""The project's admin site: branded "llmgateway", with the cost console as its landing page.

Installed the way Django documents for replacing the default site:
`llmgateway.admin_config.GatewayAdminConfig` (in `INSTALLED_APPS` in place of
`django.contrib.admin`) names `GatewayAdminSite` as `default_site`, so `admin.site`, every
`@admin.register` and `admin.site.urls` are this site, unchanged.

A site, rather than `get_urls` on one `ModelAdmin`, because the console is no model's page: it
sits at `/admin/console/` (`admin:console`), its link is in the header of every admin page and on
the index, and staff who may read it land there after logging in. The page itself, and what it
reads, is billing's (`billing.console`); here is only where the admin shows it.
"""

from __future__ import annotations

from typing import Any

from django.contrib.admin import AdminSite
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, path, reverse

from billing.console.views import console_permitted, console_view


class GatewayAdminSite(AdminSite):
    site_header = "llmgateway"
    site_title = "llmgateway"
    index_title = "Administration"

    def get_urls(self) -> list[URLResolver | URLPattern]:
        console = path("console/", self.admin_view(self.console), name="console")
        return [console, *super().get_urls()]

    def console(self, request: HttpRequest) -> TemplateResponse:
        return console_view(request, admin_site=self)

    def each_context(self, request: HttpRequest) -> dict[str, Any]:
        """Every admin page's context, plus `console_url` for staff who may read the console."""
        context = super().each_context(request)
        if context["has_permission"] and console_permitted(request, self):
            context["console_url"] = reverse("admin:console", current_app=self.name)
        return context

    def login(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        """Log in; land on the console instead of the index when the console is readable.

        Only a redirect to the index itself is changed (the default destination, and where a
        visit to `/admin/` before logging in returns): any other `next` is kept.
        """
        response = super().login(request, extra_context)
        index = reverse("admin:index", current_app=self.name)
        if response.status_code == 302 and response["Location"] == index and console_permitted(request, self):
            response["Location"] = reverse("admin:console", current_app=self.name)
        return response
