"""The console's download and the admin's export action: staff only, streamed, and byte for byte
what `manage.py export_costs` writes for the same filters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connections
from django.http import StreamingHttpResponse
from django.urls import reverse

from billing.models import UsageRecord

from .conftest import Ledger, export, export_file

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]
EXPORT_URL = "admin:billing_usagerecord_export"


def body(response: Any) -> bytes:
    assert isinstance(response, StreamingHttpResponse), "exports are streamed, never built in memory"
    return b"".join(response.streaming_content)


@pytest.mark.parametrize(
    ("query", "args"),
    [
        ("format=csv", []),
        ("format=json&totals=1&group_by=user&group_by=day", ["--format", "json", "--totals", "--group-by", "user", "--group-by", "day"]),
        (
            "format=jsonl&group_by=key&since=2025-06-03T10:30&until=2025-06-20&user=alice&user=bob&model=gpt-4o",
            ["--format", "jsonl", "--group-by", "key", "--since", "2025-06-03T10:30", "--until", "2025-06-20", "--user", "alice", "--user", "bob", "--model", "gpt-4o"],
        ),
        ("since=&until=&user=&model=&format=csv&totals=on&group_by=month", ["--totals", "--group-by", "month"]),
        ("format=csv&group_by=model&from_ledger=1", ["--group-by", "model", "--from-ledger"]),
    ],
    ids=["raw-csv", "user+day-json-totals", "key-jsonl-filtered", "form-with-empty-fields", "from-ledger"],
)
def test_the_download_streams_the_commands_bytes(admin_client, ledger: Ledger, tmp_path: Path, query: str, args: list[str]) -> None:
    response = admin_client.get(reverse(EXPORT_URL) + "?" + query)

    assert response.status_code == 200
    fmt = args[args.index("--format") + 1] if "--format" in args else "csv"
    assert response["Content-Disposition"] == f'attachment; filename="costs.{fmt}"'
    assert response["Content-Type"] == {"csv": "text/csv; charset=utf-8", "jsonl": "application/jsonl; charset=utf-8", "json": "application/json"}[fmt]
    assert body(response) == export_file(tmp_path, *args)


def test_the_export_action_streams_the_selected_rows_as_the_command_would(admin_client, ledger: Ledger) -> None:
    alice = UsageRecord.objects.filter(user__username="alice").values_list("pk", flat=True)
    response = admin_client.post(
        reverse("admin:billing_usagerecord_changelist"),
        {"action": "export_csv", "_selected_action": [str(pk) for pk in alice]},
    )
    assert response.status_code == 200
    assert response["Content-Disposition"] == 'attachment; filename="costs.csv"'
    assert body(response) == export("--user", "alice")


def test_the_export_action_across_a_filtered_changelist_exports_all_its_rows(admin_client, ledger: Ledger) -> None:
    one = UsageRecord.objects.filter(user__username="bob").values_list("pk", flat=True).first()
    response = admin_client.post(
        reverse("admin:billing_usagerecord_changelist") + "?user=bob",  # the list's username filter
        {"action": "export_csv", "select_across": "1", "_selected_action": [str(one)]},
    )
    assert body(response) == export("--user", "bob")


@pytest.mark.parametrize(
    ("who", "status"),
    [("anonymous", 302), ("not-staff", 302), ("staff-without-permission", 403), ("staff-with-view-permission", 200)],
    ids=["anonymous", "not-staff", "staff-without-permission", "staff-with-view-permission"],
)
def test_only_staff_who_may_view_usage_records_can_download(client, ledger: Ledger, who: str, status: int) -> None:
    if who != "anonymous":
        user = get_user_model().objects.create(username=who, is_staff=who.startswith("staff"))
        if who == "staff-with-view-permission":
            user.user_permissions.add(Permission.objects.get(codename="view_usagerecord"))
        client.force_login(user)

    response = client.get(reverse(EXPORT_URL) + "?format=csv&totals=1")

    assert response.status_code == status
    if status == 302:
        assert response["Location"].startswith(reverse("admin:login"))
    if status == 200:
        assert body(response) == export("--totals")


def test_the_action_is_refused_to_staff_without_view_permission(client, ledger: Ledger) -> None:
    client.force_login(get_user_model().objects.create(username="intern", is_staff=True))
    response = client.post(
        reverse("admin:billing_usagerecord_changelist"),
        {"action": "export_csv", "_selected_action": [str(UsageRecord.objects.values_list("pk", flat=True).first())]},
    )
    assert response.status_code == 403


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("since=yesterday", "since: expected a date (YYYY-MM-DD) or an ISO 8601 datetime, got &#x27;yesterday&#x27;."),
        ("since=2025-07-01&until=2025-06-01", "since: must be before until (2025-06-01T00:00:00+00:00), got 2025-07-01T00:00:00+00:00."),
        ("user=mallory", "user: no user named &#x27;mallory&#x27;."),
        ("model=gpt-9", "model: no usage or price for a model named &#x27;gpt-9&#x27;."),
        ("group_by=week", "group_by: unknown grouping &#x27;week&#x27;"),
        ("format=xml", "format: unknown format &#x27;xml&#x27; (expected csv, jsonl or json)."),
        ("totals=maybe", "totals: expected 1 or 0, got &#x27;maybe&#x27;."),
        ("format=csv&grouping=day", "grouping: unknown parameter"),
    ],
    ids=["since", "since-after-until", "user", "model", "group", "format", "totals-flag", "unknown-parameter"],
)
def test_a_bad_parameter_shows_the_form_again_naming_it(admin_client, ledger: Ledger, query: str, message: str) -> None:
    response = admin_client.get(reverse(EXPORT_URL) + "?" + query)
    assert response.status_code == 400
    assert not response.streaming
    assert f'<p class="errornote">{message}' in response.content.decode()


def test_the_changelist_links_to_the_export_form(admin_client, ledger: Ledger) -> None:
    changelist = admin_client.get(reverse("admin:billing_usagerecord_changelist")).content.decode()
    assert f'href="{reverse(EXPORT_URL)}"' in changelist
    form = admin_client.get(reverse(EXPORT_URL))
    assert form.status_code == 200 and not form.streaming
    page = form.content.decode()
    for name in ("since", "until", "user", "model", "group_by", "format", "totals"):
        assert f'name="{name}"' in page


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_download_is_streamed_asynchronously(async_client, ledger: Ledger) -> None:
    from asgiref.sync import sync_to_async

    admin = await get_user_model().objects.acreate(username="root", is_staff=True, is_superuser=True)
    await async_client.aforce_login(admin)

    response = await async_client.get(reverse(EXPORT_URL) + "?format=jsonl&totals=1&group_by=user")

    assert response.status_code == 200 and response.is_async  # Django would buffer a sync iterator whole
    data = b"".join([chunk async for chunk in response.streaming_content])
    assert data == await sync_to_async(export)("--format", "jsonl", "--totals", "--group-by", "user")
    # The test client skips the request_finished cleanup a server does: hand back the connection
    # the view's thread (the shared thread-sensitive one) opened, so the test database can be dropped.
    await sync_to_async(connections.close_all)()
