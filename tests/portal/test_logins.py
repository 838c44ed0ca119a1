"""Staff give an end user a login (a one-time set-password link, or a password from stdin); users change it."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.test import Client

from llmgateway.admin import PRIVILEGED_PASSWORD
from llmgateway.services import api_key_create
from tests.portal.conftest import PASSWORD

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "a much longer new passphrase"


def createlogin(*args: str, stdin: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> str:
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out = io.StringIO()
    call_command("createlogin", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue().strip()


def set_password_through(link: str, password: str) -> Client:
    """Follow the link as a browser does (Django swaps the token for a session-held one) and set a password."""
    client = Client()
    form_page = client.get(link, follow=True)
    assert form_page.status_code == 200 and b'id="password-set"' in form_page.content
    done = client.post(form_page.redirect_chain[-1][0], {"new_password1": password, "new_password2": password})
    assert done.status_code == 302 and done["Location"] == "/accounts/set-password/done/"
    return client


def test_a_user_made_by_createapikey_cannot_log_in_until_given_a_login(monkeypatch) -> None:
    api_key_create(username="nadia")
    assert not Client().login(username="nadia", password="")

    link = createlogin("nadia", "--base-url", "https://gateway.example.com/")

    assert re.fullmatch(r"https://gateway\.example\.com/accounts/set-password/[\w-]+/[\w-]+/", link)
    set_password_through(link.removeprefix("https://gateway.example.com"), NEW_PASSWORD)
    assert Client().login(username="nadia", password=NEW_PASSWORD)


def test_a_set_password_link_works_once() -> None:
    api_key_create(username="nadia")
    link = createlogin("nadia").removeprefix("http://127.0.0.1:8000")
    browser = Client()
    form_page = browser.get(link, follow=True)
    form_url = form_page.redirect_chain[-1][0]
    done = browser.post(form_url, {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD})
    assert done.status_code == 302 and Client().login(username="nadia", password=NEW_PASSWORD)

    replayed = browser.post(form_url, {"new_password1": "someone else's choice", "new_password2": "someone else's choice"})
    again = Client().get(link, follow=True)

    assert replayed.status_code == 200 and b'id="invalid-link"' in replayed.content
    assert Client().login(username="nadia", password=NEW_PASSWORD)
    assert b'id="invalid-link"' in again.content and b'id="password-set"' not in again.content


@pytest.mark.parametrize(
    "link", ["/accounts/set-password/MQ/not-a-token/", "/accounts/set-password/%FF%FE/x-y/", "/accounts/set-password/zzzz/1-2/"],
    ids=["bad-token", "bad-uid", "no-such-user"],
)
def test_a_forged_link_is_refused_plainly(link) -> None:
    response = Client().get(link, follow=True)
    assert response.status_code == 200 and b'id="invalid-link"' in response.content


def test_createlogin_sets_a_password_from_stdin(monkeypatch) -> None:
    api_key_create(username="nadia")
    out = createlogin("nadia", "--password-stdin", stdin=NEW_PASSWORD + "\n", monkeypatch=monkeypatch)
    assert "nadia can now log in" in out
    assert Client().login(username="nadia", password=NEW_PASSWORD)


def test_createlogin_refuses_what_it_cannot_use(monkeypatch) -> None:
    with pytest.raises(CommandError, match="No user 'ghost'"):
        createlogin("ghost")
    api_key_create(username="nadia")
    with pytest.raises(CommandError, match="too short"):
        createlogin("nadia", "--password-stdin", stdin="short\n", monkeypatch=monkeypatch)
    with pytest.raises(CommandError, match="No password was given"):
        createlogin("nadia", "--password-stdin", stdin="", monkeypatch=monkeypatch)
    # --create makes a user with no usable password, then a link for them.
    assert "/accounts/set-password/" in createlogin("newcomer", "--create")
    assert not get_user_model().objects.get(username="newcomer").has_usable_password()


def test_staff_make_set_password_links_in_the_admin(admin_client) -> None:
    api_key_create(username="nadia")
    api_key_create(username="omar")
    ids = list(get_user_model().objects.filter(username__in=["nadia", "omar"]).values_list("pk", flat=True))

    response = admin_client.post("/admin/auth/user/", {"action": "password_set_links", "_selected_action": ids})

    assert response.status_code == 200
    links = dict(re.findall(rb'data-user="(\w+)" type="text" readonly value="([^"]+)"', response.content))
    assert set(links) == {b"nadia", b"omar"}
    set_password_through(links[b"omar"].decode().removeprefix("http://testserver"), NEW_PASSWORD)
    assert Client().login(username="omar", password=NEW_PASSWORD)


@pytest.fixture
def helpdesk(django_user_model: Any) -> Client:
    """A staff member who may change users, and is not a superuser."""
    staff = django_user_model.objects.create_user(username="helpdesk", password=PASSWORD, is_staff=True)
    staff.user_permissions.set(Permission.objects.filter(content_type__app_label="auth", codename__in=["view_user", "change_user"]))
    client = Client()
    client.force_login(staff)
    return client


def test_staff_who_are_not_superusers_get_no_link_or_password_form_for_staff_or_superusers(helpdesk, django_user_model) -> None:
    api_key_create(username="nadia")
    django_user_model.objects.create_superuser(username="root", password=PASSWORD)
    django_user_model.objects.create_user(username="colleague", password=PASSWORD, is_staff=True)
    users = {user.username: user.pk for user in django_user_model.objects.filter(username__in=["nadia", "root", "colleague"])}

    response = helpdesk.post("/admin/auth/user/", {"action": "password_set_links", "_selected_action": list(users.values())}, follow=True)

    links = dict(re.findall(rb'data-user="(\w+)" type="text" readonly value="([^"]+)"', response.content))
    assert set(links) == {b"nadia"}
    assert [str(message) for message in response.context["messages"]] == [f"{PRIVILEGED_PASSWORD} No link for: colleague, root."]
    only_privileged = helpdesk.post(
        "/admin/auth/user/", {"action": "password_set_links", "_selected_action": [users["root"]]}, follow=True
    )
    assert only_privileged.redirect_chain and b"data-user=" not in only_privileged.content
    assert helpdesk.get(f"/admin/auth/user/{users['root']}/password/").status_code == 403
    assert helpdesk.get(f"/admin/auth/user/{users['colleague']}/password/").status_code == 403
    assert helpdesk.get(f"/admin/auth/user/{users['nadia']}/password/").status_code == 200


def test_a_superuser_makes_a_link_for_a_staff_member(admin_client, django_user_model) -> None:
    colleague = django_user_model.objects.create_user(username="colleague", password=PASSWORD, is_staff=True)
    response = admin_client.post("/admin/auth/user/", {"action": "password_set_links", "_selected_action": [colleague.pk]})
    assert re.findall(rb'data-user="(\w+)"', response.content) == [b"colleague"]


def test_a_user_changes_their_password(user_factory, client_for) -> None:
    client = client_for(user_factory("alice"))
    page = client.get("/accounts/password/")
    assert page.status_code == 200 and b'id="password-change"' in page.content

    wrong = client.post("/accounts/password/", {"old_password": "nope", "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD})
    assert wrong.status_code == 200 and b"errorlist" in wrong.content

    done = client.post("/accounts/password/", {"old_password": PASSWORD, "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD})
    assert done.status_code == 302 and done["Location"] == "/accounts/password/done/"
    assert Client().login(username="alice", password=NEW_PASSWORD)
    assert client.get("/account/").status_code == 200  # still logged in here


def test_changing_a_password_needs_a_login() -> None:
    response = Client().get("/accounts/password/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_staff_set_a_password_on_the_users_admin_page(admin_client) -> None:
    api_key_create(username="nadia")
    nadia = get_user_model().objects.get(username="nadia")
    form = admin_client.get(f"/admin/auth/user/{nadia.pk}/password/")
    assert form.status_code == 200

    response = admin_client.post(
        f"/admin/auth/user/{nadia.pk}/password/", {"usable_password": "true", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD}
    )

    assert response.status_code == 302
    assert Client().login(username="nadia", password=NEW_PASSWORD)
