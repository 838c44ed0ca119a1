"""Suspending a user from the accounts list: their keys stop authenticating at once; unsuspending
lets them back. Only staff who may change users may do it."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from billing.models import Account
from billing.services import account_quota_set
from llmgateway.auth import INACTIVE_USER, aauthenticate
from llmgateway.errors import AuthenticationFailed
from llmgateway.services import api_key_create, user_suspend, user_unsuspend


def authenticate(secret: str):
    return asyncio.run(aauthenticate(f"Bearer {secret}"))


def act(client: Client, action: str, *accounts: Account):
    return client.post(
        reverse("admin:billing_account_changelist"),
        {"action": action, "_selected_action": [str(account.pk) for account in accounts]},
    )


@pytest.mark.django_db(transaction=True)
def test_suspending_a_user_stops_their_keys_and_unsuspending_restores_them(admin_client) -> None:
    api_key, secret = api_key_create(username="mallory")
    _, bystander_secret = api_key_create(username="bob")
    account = account_quota_set(user_id=api_key.user_id, monthly_spend_limit_usd=Decimal("5"))
    account_quota_set(user_id=api_key.user_id)
    assert authenticate(secret).user_id == api_key.user_id  # verified, and trusted for a while unless the user changes

    assert act(admin_client, "suspend", account).status_code == 302
    api_key.user.refresh_from_db()
    assert not api_key.user.is_active
    with pytest.raises(AuthenticationFailed, match=INACTIVE_USER):
        authenticate(secret)
    assert authenticate(bystander_secret).user_id != api_key.user_id
    assert ">suspended</span>" in admin_client.get(reverse("admin:billing_account_changelist")).content.decode()

    assert act(admin_client, "unsuspend", account).status_code == 302
    assert authenticate(secret).user_id == api_key.user_id


@pytest.mark.django_db
def test_the_services_say_whether_anything_changed(django_user_model) -> None:
    user = django_user_model.objects.create(username="mallory")
    assert user_suspend(user_id=user.pk) is True
    assert user_suspend(user_id=user.pk) is False
    assert user_unsuspend(user_id=user.pk) is True
    assert user_unsuspend(user_id=user.pk) is False
    user.refresh_from_db()
    assert user.is_active


@pytest.mark.django_db
def test_suspending_takes_change_permission_on_users_as_well_as_accounts(django_user_model) -> None:
    account = account_quota_set(user_id=django_user_model.objects.create(username="mallory").pk)
    staff = django_user_model.objects.create_user(username="clerk", password="x", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=["view_account", "change_account"]))
    client = Client()
    client.force_login(staff)
    page = client.get(reverse("admin:billing_account_changelist")).content.decode()
    assert 'value="suspend"' not in page
    act(client, "suspend", account)
    account.user.refresh_from_db()
    assert account.user.is_active

    staff.user_permissions.add(Permission.objects.get(codename="change_user"))
    client.force_login(staff)  # a fresh request re-reads permissions
    assert 'value="suspend"' in client.get(reverse("admin:billing_account_changelist")).content.decode()
