"""The "Cost viewers" group: staff who are not superusers see every cost page, and change nothing."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.urls import reverse

from billing.models import Account, Price, UsageRecord
from llmgateway.staff import COST_MODELS, COST_VIEWERS

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]

LISTS = ["billing_price", "billing_pricingplan", "billing_account", "billing_usagerecord", "billing_dailyusage", "billing_reservation", "llmgateway_apikey"]


def test_the_group_holds_the_view_permission_of_each_cost_model_and_nothing_else() -> None:
    group = Group.objects.get(name=COST_VIEWERS)
    held = {(permission.content_type.app_label, permission.codename) for permission in group.permissions.select_related("content_type")}
    assert held == {(app_label, f"view_{model}") for app_label, model in COST_MODELS}


@pytest.mark.parametrize("model", LISTS)
def test_a_cost_viewer_sees_every_list(viewer_client, ledger_factory, model) -> None:
    ledger_factory(5)
    assert viewer_client.get(reverse(f"admin:{model}_changelist")).status_code == 200


def test_a_cost_viewer_sees_the_ledger_and_its_rows_but_cannot_change_them(viewer_client, ledger_factory) -> None:
    record = ledger_factory(5).records[0]
    page = viewer_client.get(reverse("admin:billing_usagerecord_changelist"))
    assert page.status_code == 200 and record.model in page.content.decode()
    assert 'value="export_csv"' in page.content.decode()  # exporting is reading
    assert viewer_client.get(reverse("admin:billing_usagerecord_change", args=[record.pk])).status_code == 200
    assert viewer_client.get(reverse("admin:billing_usagerecord_export")).status_code == 200
    assert viewer_client.post(reverse("admin:billing_usagerecord_change", args=[record.pk]), {"completion_tokens": 0}).status_code == 403


def test_a_cost_viewer_cannot_add_change_or_delete_anything(viewer_client, ledger_factory) -> None:
    ledger = ledger_factory(5)
    account = Account.objects.get(user=ledger.users[0])
    api_key = ledger.keys[0]
    price = Price.objects.filter(model="gpt-4o").first()
    for model in ("billing_price", "billing_pricingplan", "billing_account", "llmgateway_apikey"):
        assert viewer_client.get(reverse(f"admin:{model}_add")).status_code == 403
    for model, obj in (("billing_account", account), ("llmgateway_apikey", api_key), ("billing_price", price)):
        view = viewer_client.get(reverse(f"admin:{model}_change", args=[obj.pk]))
        assert view.status_code == 200 and 'name="_save"' not in view.content.decode()
        assert viewer_client.post(reverse(f"admin:{model}_change", args=[obj.pk]), {"name": "changed"}).status_code == 403
        assert viewer_client.post(reverse(f"admin:{model}_delete", args=[obj.pk]), {"post": "yes"}).status_code == 403
    # No writing action is offered, and posting one does nothing.
    accounts_page = viewer_client.get(reverse("admin:billing_account_changelist")).content.decode()
    keys_page = viewer_client.get(reverse("admin:llmgateway_apikey_changelist")).content.decode()
    assert 'value="suspend"' not in accounts_page and 'value="revoke"' not in keys_page
    viewer_client.post(reverse("admin:billing_account_changelist"), {"action": "suspend", "_selected_action": [str(account.pk)]})
    viewer_client.post(reverse("admin:llmgateway_apikey_changelist"), {"action": "revoke", "_selected_action": [str(api_key.pk)]})
    account.user.refresh_from_db()
    api_key.refresh_from_db()
    assert account.user.is_active and api_key.revoked_at is None
    assert UsageRecord.objects.count() == 5


def test_staff_outside_the_group_see_no_costs(django_user_model) -> None:
    staff = django_user_model.objects.create_user(username="intern", password="x", is_staff=True)
    client = Client()
    client.force_login(staff)
    assert client.get(reverse("admin:billing_usagerecord_changelist")).status_code == 403
    assert client.get(reverse("admin:llmgateway_apikey_changelist")).status_code == 403
