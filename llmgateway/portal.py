"""An end user's own page (`/account/`): their usage, budgets and API keys.

Usage by day and by model over a chosen range of calendar days (`days=N` ending today, or
`first=YYYY-MM-DD&last=YYYY-MM-DD`, both days included, in BILLING_TIME_ZONE), read from the
daily rollups by `billing.portal.selectors`, never from the ledger. A bad parameter gives the
page with its default range and a 400, never a 500.

Keys are made, renamed and revoked by POST (CSRF-protected) through `llmgateway.services`, the
same services as the admin and `createapikey`: revoking stops the key's running calls in every
process. A new key's secret is shown once, in the answer to the POST that made it; every page
here is `no-store`, so no cache keeps it. A user only ever reaches their own keys: another's is a
404, as a key that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST, require_safe
from django_ratelimit.decorators import ratelimit

from billing.console.chart import spend_chart_svg
from billing.console.selectors import UsageSums
from billing.periods import DAYS, Period, billing_zone, days_ending, period_containing
from billing.portal.selectors import user_budgets, user_key_spend, user_usage
from llmgateway.models import ApiKey
from llmgateway.page_helpers import page_rate, user_id_of
from llmgateway.services import (
    ApiKeyLimitReached,
    api_key_create_own,
    api_key_rename,
    api_key_revoke,
)

now = timezone.now  # the page's clock, which tests replace

DEFAULT_DAYS = 30
MAX_DAYS = 366
DAY_CHOICES = (7, 30, 90)
MAX_ACTIVE_KEYS = 20
KEYS_SHOWN = 100  # newest first; older revoked keys are of no use on this page
BAD_RANGE = "The last day must not be before the first."
RANGE_TOO_LONG = f"A range is at most {MAX_DAYS} days."
BOTH_DAYS = "Give both the first and the last day."
EARLIEST_DAY, LATEST_DAY = date(2000, 1, 1), date(2999, 12, 31)  # far from date.min and date.max
OUT_OF_RANGE = f"Days are from {EARLIEST_DAY} to {LATEST_DAY}."
KEY_REVOKED = "Revoked {prefix}…: it is refused from now on, and calls running with it were stopped."
KEY_RENAMED = "Renamed {prefix}…."
# The page runs no script at all (every action is a form), and may show a key's secret: nothing
# drawn into it could run, load or send anything.
ACCOUNT_PAGE_CSP = (
    "default-src 'self'; script-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class PeriodQuery(forms.Form):
    days = forms.IntegerField(min_value=1, max_value=MAX_DAYS, required=False)
    first = forms.DateField(required=False, input_formats=["%Y-%m-%d"])
    last = forms.DateField(required=False, input_formats=["%Y-%m-%d"])

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        first, last = cleaned.get("first"), cleaned.get("last")
        if (first is None) != (last is None) and not self.errors:
            raise forms.ValidationError(BOTH_DAYS)
        if first is not None and last is not None:
            if not EARLIEST_DAY <= first <= LATEST_DAY or not EARLIEST_DAY <= last <= LATEST_DAY:
                raise forms.ValidationError(OUT_OF_RANGE)
            if last < first:
                raise forms.ValidationError(BAD_RANGE)
            if (last - first).days + 1 > MAX_DAYS:
                raise forms.ValidationError(RANGE_TOO_LONG)
        return cleaned

    def period(self, at: datetime) -> Period:
        """The range asked for, or the last DEFAULT_DAYS days when it is absent or bad."""
        cleaned = self.cleaned_data if self.is_valid() else {}
        first: date | None = cleaned.get("first")
        last: date | None = cleaned.get("last")
        if first is not None and last is not None:
            return Period(DAYS, first, last + timedelta(days=1), billing_zone())
        return days_ending(at, days=cleaned.get("days") or DEFAULT_DAYS)


class KeyNameForm(forms.Form):
    name = forms.CharField(max_length=100, required=False, strip=True, label="Name")


@dataclass(frozen=True, slots=True)
class KeyRow:
    key: ApiKey
    state: str  # "active", "revoked" or "expired"
    usage: UsageSums | None  # in the page's range; None: no call in it


def _key_state(api_key: ApiKey, at: datetime) -> str:
    if api_key.revoked_at is not None and api_key.revoked_at <= at:
        return "revoked"
    if api_key.expires_at is not None and api_key.expires_at <= at:
        return "expired"
    return "active"


def _range_links(at: datetime, current: Period) -> list[tuple[str, str, bool]]:
    links = []
    for n in DAY_CHOICES:
        period = days_ending(at, days=n)
        links.append((f"{n} days", f"?days={n}", (period.first_day, period.end_day) == (current.first_day, current.end_day)))
    month = period_containing("month", at)
    last = min(month.end_day, period_containing("day", at).end_day) - timedelta(days=1)
    links.append(("This month", f"?first={month.first_day:%Y-%m-%d}&last={last:%Y-%m-%d}",
                  (month.first_day, last + timedelta(days=1)) == (current.first_day, current.end_day)))
    return links


def _account_page(
    request: HttpRequest,
    *,
    query: PeriodQuery,
    key_form: KeyNameForm | None = None,
    created: tuple[ApiKey, str] | None = None,
    status: int = 200,
) -> HttpResponse:
    at = now()
    user_id = user_id_of(request)
    period = query.period(at)
    usage = user_usage(user_id=user_id, days=period)
    key_spend = user_key_spend(user_id=user_id, days=period)
    keys = [
        KeyRow(key=api_key, state=_key_state(api_key, at), usage=key_spend.get(api_key.pk))
        for api_key in ApiKey.objects.filter(user_id=user_id).order_by("-created_at", "-id")[:KEYS_SHOWN]
    ]
    context = {
        "at": at,
        "period": period,
        "last_day": period.end_day - timedelta(days=1),
        "range_links": _range_links(at, period),
        "query_errors": query.errors,
        "usage": usage,
        "chart": spend_chart_svg(usage.by_day),
        "budgets": user_budgets(user_id=user_id, at=at),
        "keys": keys,
        "active_keys": sum(1 for row in keys if row.state == "active"),
        "max_active_keys": MAX_ACTIVE_KEYS,
        "key_form": key_form or KeyNameForm(),
        "created": created,
        "billing_time_zone": billing_zone().key,
    }
    response = render(request, "portal/account.html", context, status=status)
    response["Content-Security-Policy"] = ACCOUNT_PAGE_CSP
    return response


@never_cache
@require_safe
@login_required
def account_page(request: HttpRequest) -> HttpResponse:
    """The user's usage, budgets and keys."""
    query = PeriodQuery(request.GET)
    return _account_page(request, query=query, status=200 if query.is_valid() else 400)


@never_cache
@ratelimit(key="user_or_ip", rate=page_rate, method="POST", block=True)
@require_POST
@login_required
def key_create(request: HttpRequest) -> HttpResponse:
    """Make a key and answer with the page showing its secret, this once."""
    form = KeyNameForm(request.POST)
    query = PeriodQuery(request.GET)
    if not form.is_valid():
        return _account_page(request, query=query, key_form=form, status=400)
    try:
        created = api_key_create_own(user_id=user_id_of(request), name=form.cleaned_data["name"], max_active=MAX_ACTIVE_KEYS)
    except ApiKeyLimitReached as error:
        form.add_error(None, str(error))
        return _account_page(request, query=query, key_form=form, status=400)
    return _account_page(request, query=query, created=created, status=201)


def _own_key(request: HttpRequest, key_id: int) -> ApiKey:
    return get_object_or_404(ApiKey, pk=key_id, user_id=user_id_of(request))


def _back(request: HttpRequest) -> HttpResponseRedirect:
    return HttpResponseRedirect(reverse("account") + "#keys", status=303)


@never_cache
@ratelimit(key="user_or_ip", rate=page_rate, method="POST", block=True)
@require_POST
@login_required
def key_revoke(request: HttpRequest, key_id: int) -> HttpResponse:
    api_key = _own_key(request, key_id)
    api_key_revoke(api_key=api_key)
    messages.success(request, KEY_REVOKED.format(prefix=api_key.prefix))
    return _back(request)


@never_cache
@ratelimit(key="user_or_ip", rate=page_rate, method="POST", block=True)
@require_POST
@login_required
def key_rename(request: HttpRequest, key_id: int) -> HttpResponse:
    api_key = _own_key(request, key_id)
    form = KeyNameForm(request.POST)
    if not form.is_valid():
        messages.error(request, " ".join(str(error) for error in form.errors.get("name", [])))
        return _account_page(request, query=PeriodQuery(request.GET), status=400)
    api_key_rename(api_key=api_key, name=form.cleaned_data["name"])
    messages.success(request, KEY_RENAMED.format(prefix=api_key.prefix))
    return _back(request)
