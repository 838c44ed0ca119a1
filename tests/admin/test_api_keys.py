"""API keys in the admin: created through `api_key_create` with the secret shown once, their state
and spend at a glance, revoked through `api_key_revoke`."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse
from django.utils import timezone

from billing import display
from llmgateway.auth import INACTIVE_KEY, aauthenticate
from llmgateway.errors import AuthenticationFailed
from llmgateway.models import ApiKey, hash_api_key
from llmgateway.services import api_key_create, api_key_revoke

from .conftest import ledger_row

SECRET = re.compile(r"sk-gw-[A-Za-z0-9_-]{40,}")


def authenticate(secret: str):
    return asyncio.run(aauthenticate(f"Bearer {secret}"))


def add_form(user, **fields) -> dict[str, str]:
    return {
        "user": str(user.pk),
        "name": "billing service",
        "expires_at_0": "",
        "expires_at_1": "",
        "rpm_limit": "",
        "tpm_limit": "",
        "max_concurrent": "",
        **fields,
    }


@pytest.mark.django_db(transaction=True)
def test_a_key_created_in_the_admin_shows_its_secret_once_and_stores_only_its_hash(admin_client, django_user_model) -> None:
    owner = django_user_model.objects.create(username="carol")
    expires = timezone.now() + timedelta(days=30)
    response = admin_client.post(
        reverse("admin:llmgateway_apikey_add"),
        add_form(owner, rpm_limit="120", expires_at_0=f"{expires:%Y-%m-%d}", expires_at_1=f"{expires:%H:%M:%S}"),
    )

    assert response.status_code == 200
    page = response.content.decode()
    [secret] = SECRET.findall(page)
    assert page.count(secret) == 1
    assert "no-store" in response["Cache-Control"]
    api_key = ApiKey.objects.get()
    assert api_key.user == owner and api_key.name == "billing service" and api_key.rpm_limit == 120
    assert api_key.key_hash == hash_api_key(secret) and api_key.prefix == secret[:12]
    assert secret not in str(ApiKey.objects.values().get())
    assert secret not in str(list(LogEntry.objects.values()))
    assert LogEntry.objects.get().object_id == str(api_key.pk)  # logged as an addition, by the admin

    # Never again: the list and the key's page show the prefix only.
    for url in (reverse("admin:llmgateway_apikey_changelist"), reverse("admin:llmgateway_apikey_change", args=[api_key.pk])):
        again = admin_client.get(url).content.decode()
        assert api_key.prefix in again and secret not in again

    principal = authenticate(secret)
    assert (principal.user_id, principal.api_key_id, principal.rpm_limit) == (owner.pk, api_key.pk, 120)


@pytest.mark.django_db
def test_the_add_form_refuses_an_expiry_in_the_past(admin_client, django_user_model) -> None:
    owner = django_user_model.objects.create(username="carol")
    response = admin_client.post(
        reverse("admin:llmgateway_apikey_add"), add_form(owner, expires_at_0="2020-01-01", expires_at_1="00:00:00")
    )
    assert response.status_code == 200
    assert "The expiry must be in the future." in response.content.decode()
    assert not SECRET.search(response.content.decode())
    assert not ApiKey.objects.exists()


@pytest.mark.django_db
@pytest.mark.ledger
def test_the_key_list_shows_each_keys_state_spend_this_month_and_last_use(admin_client, django_user_model) -> None:
    now = timezone.now()
    active, _ = api_key_create(username="active-owner", name="active")
    revoked, _ = api_key_create(username="revoked-owner", name="revoked")
    api_key_revoke(api_key=revoked)
    expired, _ = api_key_create(username="expired-owner", name="expired", expires_at=now - timedelta(minutes=1))
    suspended, _ = api_key_create(username="suspended-owner", name="suspended")
    django_user_model.objects.filter(username="suspended-owner").update(is_active=False)
    ApiKey.objects.filter(pk=active.pk).update(last_used_at=now)
    this_month = [ledger_row(active.user, api_key=active, model="gpt-4o", status="completed", at=now, prompt=1000, completion=n) for n in (100, 2000)]
    ledger_row(active.user, api_key=active, model="gpt-4o", status="completed", at=now - timedelta(days=62), prompt=1000, completion=500)

    response = admin_client.get(reverse("admin:llmgateway_apikey_changelist"))
    page = response.content.decode()
    rows = {api_key.name: api_key for api_key in response.context["cl"].result_list}
    assert rows["active"]._month_spend == sum(record.cost_usd for record in this_month)
    assert rows["revoked"]._month_spend == 0
    assert display.usd_brief(rows["active"]._month_spend) in page
    for state in ("active", "revoked", "expired", "owner suspended"):
        assert f">{state}</span>" in page
    assert display.when(now) in page and "never" in page

    for state, name in (("active", "active"), ("revoked", "revoked"), ("expired", "expired"), ("suspended", "suspended")):
        listed = admin_client.get(reverse("admin:llmgateway_apikey_changelist"), {"state": state}).context["cl"].result_list
        assert [api_key.name for api_key in listed] == [name]


@pytest.mark.django_db(transaction=True)
def test_the_revoke_action_revokes_through_the_service_and_the_key_stops_working(admin_client) -> None:
    api_key, secret = api_key_create(username="dave")
    kept, kept_secret = api_key_create(username="erin")
    authenticate(secret)  # verified, and trusted for AUTH_CACHE_SECONDS unless revoked here
    response = admin_client.post(
        reverse("admin:llmgateway_apikey_changelist"), {"action": "revoke", "_selected_action": [str(api_key.pk)]}
    )
    assert response.status_code == 302
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None
    with pytest.raises(AuthenticationFailed, match=INACTIVE_KEY):
        authenticate(secret)
    assert authenticate(kept_secret).api_key_id == kept.pk


@pytest.mark.django_db
def test_revocation_is_final_the_change_form_cannot_undo_it(admin_client) -> None:
    api_key, _ = api_key_create(username="dave")
    api_key_revoke(api_key=api_key)
    page = admin_client.get(reverse("admin:llmgateway_apikey_change", args=[api_key.pk])).content.decode()
    assert 'name="revoked_at' not in page
    assert 'name="name"' in page  # the label and limits stay editable
