"""The upstreams admin: staff add providers and models with their deployments, see each
deployment's circuit breaker, never see a key, and cannot save a catalog the gateway would refuse."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import cache
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from upstreams import catalog
from upstreams.admin import CATALOG_REFUSED, DELETE_REFUSED, NO_DEPLOYMENT, UNKNOWN_FALLBACKS
from upstreams.health import CACHE_KEY, health, shared_state
from upstreams.models import PublicModel, UpstreamDeployment, UpstreamProvider
from upstreams.services import upstreams_import

pytestmark = pytest.mark.django_db


def provider_form(name: str, **fields: str) -> dict[str, str]:
    """The provider add form as a browser posts it (blank JSON fields: staff left them empty)."""
    return {
        "name": name, "kind": "openai", "base_url": f"https://{name}.example.com/v1", "api_key_env": "",
        "enabled": "on", "extra_headers": "", "connect_timeout": "", "read_timeout": "", "max_connections": "",
        "options": "", **fields,
    }


def model_form(name: str, deployments: list[dict[str, Any]], *, initial: int = 0, **fields: str) -> dict[str, str]:
    """The model form with its deployments inline: the formset's management form, then one row each."""
    data = {
        "name": name, "owned_by": "", "routing": "priority", "fallbacks": "[]", "context_window": "128000", "enabled": "on",
        "deployments-TOTAL_FORMS": str(len(deployments)), "deployments-INITIAL_FORMS": str(initial),
        "deployments-MIN_NUM_FORMS": "0", "deployments-MAX_NUM_FORMS": "1000",
        **fields,
    }
    for index, deployment in enumerate(deployments):
        row = {"id": "", "model": "", "priority": "0", "weight": "1", "rpm": "", "tpm": "", "enabled": "on", **deployment}
        data.update({f"deployments-{index}-{field}": str(value) for field, value in row.items() if value is not None})
    return data


def existing_rows(model: PublicModel) -> list[dict[str, Any]]:
    """The model's deployments as its change form shows them."""
    return [
        {"id": d.pk, "model": model.pk, "provider": d.provider_id, "upstream_model": d.upstream_model, "priority": d.priority,
         "weight": d.weight, "rpm": d.rpm or "", "tpm": d.tpm or "", "enabled": "on" if d.enabled else None}
        for d in model.deployments.all()
    ]


def test_a_superuser_adds_providers_and_a_model_with_two_deployments(admin_client, monkeypatch) -> None:
    monkeypatch.setenv("GROQ_API_KEY", "gsk-test")
    add_provider = reverse("admin:upstreams_upstreamprovider_add")
    response = admin_client.post(add_provider, provider_form("groq", base_url="https://api.groq.com/openai/v1", api_key_env="GROQ_API_KEY", read_timeout="30"))
    assert response.status_code == 302, response.context["adminform"].form.errors
    response = admin_client.post(add_provider, provider_form("local-vllm", base_url="http://127.0.0.1:8000/v1", extra_headers='{"x-team": "ml"}'))
    assert response.status_code == 302
    groq, local = UpstreamProvider.objects.get(name="groq"), UpstreamProvider.objects.get(name="local-vllm")
    assert (groq.api_key_env, groq.read_timeout, groq.extra_headers, groq.options) == ("GROQ_API_KEY", 30.0, {}, {})
    assert local.extra_headers == {"x-team": "ml"}

    response = admin_client.post(
        reverse("admin:upstreams_publicmodel_add"),
        model_form(
            "team-chat",
            [
                {"provider": groq.pk, "upstream_model": "llama-3.1-8b-instant", "priority": 1, "rpm": 30, "tpm": 6000},
                {"provider": local.pk, "upstream_model": "meta-llama/Llama-3.1-8B-Instruct", "priority": 0},
            ],
            fallbacks='["sim-chat"]',
        ),
    )

    assert response.status_code == 302, response.context["inline_admin_formsets"][0].formset.errors
    model = PublicModel.objects.get(name="team-chat")
    assert model.fallbacks == ["sim-chat"]
    assert [(d.provider.name, d.upstream_model, d.priority, d.rpm, d.tpm) for d in model.deployments.all()] == [
        ("local-vllm", "meta-llama/Llama-3.1-8B-Instruct", 0, None, None),
        ("groq", "llama-3.1-8b-instant", 1, 30, 6000),
    ]
    route = catalog.route_for("team-chat")
    assert route is not None
    assert [d.name for d in route.deployments] == ["local-vllm/meta-llama/Llama-3.1-8B-Instruct", "groq/llama-3.1-8b-instant"]
    assert route.fallbacks == ("sim-chat",)


def test_a_provider_the_catalog_would_refuse_is_refused_by_the_form(admin_client) -> None:
    add_provider = reverse("admin:upstreams_upstreamprovider_add")
    response = admin_client.post(add_provider, provider_form("leaky", api_key_env="DJANGO_SECRET_KEY"))
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["api_key_env"] == ["Not an allowed variable name."]
    response = admin_client.post(add_provider, provider_form("nowhere", base_url=""))
    assert response.status_code == 200
    assert response.context["adminform"].form.non_field_errors() == ["provider.base_url: an openai provider needs an http(s) URL"]
    assert not UpstreamProvider.objects.exists()


@pytest.fixture
def configured(document) -> Iterator[dict[str, Any]]:
    """DOCUMENT imported, with one deployment named afresh for each test: its breaker is new."""
    unique = f"breaker-{uuid.uuid4().hex[:8]}"
    document["models"][0]["deployments"][0]["upstream_model"] = unique
    upstreams_import(document=document)
    yield {"document": document, "deployment": UpstreamDeployment.objects.get(upstream_model=unique), "name": f"groq/{unique}"}
    cache.delete(CACHE_KEY.format(name=f"groq/{unique}"))


def at(since: float) -> str:
    return timezone.localtime(datetime.fromtimestamp(since, tz=UTC)).strftime("%H:%M:%S")


def test_the_lists_show_each_deployments_breaker(admin_client, settings, configured) -> None:
    settings.UPSTREAM_BREAKER_FAILURES = 2
    settings.UPSTREAM_BREAKER_COOLDOWN = 0.05
    name, deployment = configured["name"], configured["deployment"]
    deployments = reverse("admin:upstreams_upstreamdeployment_changelist")
    model_page = reverse("admin:upstreams_publicmodel_change", args=[deployment.model_id])

    def breaker_cell(page: str) -> str:
        row = re.search(rf"<tr>(?:(?!</tr>).)*{re.escape(name)}(?:(?!</tr>).)*</tr>", page, re.S)
        assert row is not None, f"no row for {name}"
        cell = re.search(r'<td class="field-breaker">(.*?)</td>', row.group(0), re.S)
        assert cell is not None
        return cell.group(1).strip()

    assert breaker_cell(admin_client.get(deployments).content.decode()) == "closed"

    for _ in range(2):
        permit = health.allow(name)
        assert permit is not None
        health.failed(name, permit)

    view = shared_state(name)
    assert view is not None and view.state == "open"
    opened = f"open since {at(view.since)} (2 failures)"
    assert breaker_cell(admin_client.get(deployments).content.decode()) == opened
    assert opened in admin_client.get(model_page).content.decode()

    # After the cool-down one call probes the deployment.
    deadline = time.monotonic() + 5
    while (probe := health.allow(name)) is None:
        assert time.monotonic() < deadline, "the breaker never let a probe through"
    try:
        view = shared_state(name)
        assert view is not None
        assert breaker_cell(admin_client.get(deployments).content.decode()) == f"probing since {at(view.since)} (2 failures)"
    finally:
        health.succeeded(name, probe)
    assert breaker_cell(admin_client.get(deployments).content.decode()) == "closed"


def test_the_deployments_list_filters_by_provider_model_and_enabled(admin_client, configured) -> None:
    deployments = reverse("admin:upstreams_upstreamdeployment_changelist")
    groq = UpstreamProvider.objects.get(name="groq")
    team_fast = PublicModel.objects.get(name="team-fast")
    UpstreamDeployment.objects.filter(upstream_model="qwen2.5-0.5b").update(enabled=False)

    def listed(query: dict[str, Any]) -> set[str]:
        return {str(d) for d in admin_client.get(deployments, query).context["cl"].result_list}

    assert listed({"provider__id__exact": groq.pk}) == {configured["name"], "groq/llama-3.2-1b-preview"}
    assert listed({"model__id__exact": team_fast.pk}) == {"local-vllm/qwen2.5-0.5b", "groq/llama-3.2-1b-preview"}
    assert listed({"enabled__exact": 0}) == {"local-vllm/qwen2.5-0.5b"}


CANARY = "gsk-canary-5b3f0e9a-never-shown"


def test_a_key_is_never_shown_only_whether_its_variable_is_set(admin_client, monkeypatch, configured) -> None:
    monkeypatch.setenv("GROQ_API_KEY", CANARY)
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    together = UpstreamProvider.objects.create(name="together", base_url="https://api.together.xyz/v1", api_key_env="TOGETHER_API_KEY")
    groq = UpstreamProvider.objects.get(name="groq")
    model = PublicModel.objects.get(name="team-chat")
    pages = [
        reverse("admin:upstreams_upstreamprovider_changelist"),
        reverse("admin:upstreams_upstreamprovider_add"),
        reverse("admin:upstreams_upstreamprovider_change", args=[groq.pk]),
        reverse("admin:upstreams_upstreamprovider_history", args=[groq.pk]),
        reverse("admin:upstreams_upstreamprovider_delete", args=[together.pk]),
        reverse("admin:upstreams_publicmodel_changelist"),
        reverse("admin:upstreams_publicmodel_add"),
        reverse("admin:upstreams_publicmodel_change", args=[model.pk]),
        reverse("admin:upstreams_upstreamdeployment_changelist"),
        reverse("admin:upstreams_upstreamdeployment_change", args=[configured["deployment"].pk]),
        reverse("admin:index"),
    ]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
        assert CANARY not in response.content.decode(), page

    changelist = admin_client.get(pages[0]).content.decode()
    key_set = {
        name: re.search(rf'<tr>(?:(?!</tr>).)*>{name}</a>(?:(?!</tr>).)*<td class="field-key_set"><img [^>]*alt="(\w+)"', changelist, re.S)
        for name in ("groq", "local-vllm", "together")
    }
    assert {name: match.group(1) if match else None for name, match in key_set.items()} == {
        "groq": "True", "local-vllm": "None", "together": "False",
    }


def test_a_fallback_to_an_unknown_model_is_refused_with_a_form_error(admin_client, configured) -> None:
    groq = UpstreamProvider.objects.get(name="groq")
    response = admin_client.post(
        reverse("admin:upstreams_publicmodel_add"),
        model_form("team-main", [{"provider": groq.pk, "upstream_model": "gemma2-9b-it"}], fallbacks='["team-chat", "nowhere"]'),
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["fallbacks"] == [UNKNOWN_FALLBACKS.format(names="'nowhere'")]
    assert not PublicModel.objects.filter(name="team-main").exists()


def test_an_enabled_model_without_deployments_is_refused(admin_client, configured) -> None:
    response = admin_client.post(reverse("admin:upstreams_publicmodel_add"), model_form("empty", []))
    assert response.status_code == 200
    assert response.context["inline_admin_formsets"][0].formset.non_form_errors() == [NO_DEPLOYMENT]
    assert not PublicModel.objects.filter(name="empty").exists()


@pytest.fixture
def fallen_back_to(configured) -> PublicModel:
    """`team-main` falls back to `team-fast`: team-fast may not leave the catalog."""
    main = PublicModel.objects.create(name="team-main", fallbacks=["team-fast"])
    UpstreamDeployment.objects.create(model=main, provider=UpstreamProvider.objects.get(name="groq"), upstream_model="gemma2-9b-it")
    return PublicModel.objects.get(name="team-fast")


REFUSED = CATALOG_REFUSED.format(error="model team-main: fallback 'team-fast' is not a known model")


def test_disabling_a_model_another_falls_back_to_is_refused(admin_client, fallen_back_to) -> None:
    response = admin_client.post(
        reverse("admin:upstreams_publicmodel_change", args=[fallen_back_to.pk]),
        model_form("team-fast", existing_rows(fallen_back_to), initial=2, routing="weighted", enabled=""),
    )
    assert response.status_code == 200
    assert response.context["inline_admin_formsets"][0].formset.non_form_errors() == [REFUSED]
    assert PublicModel.objects.get(name="team-fast").enabled


def test_disabling_the_last_deployment_of_a_model_another_falls_back_to_is_refused(admin_client, fallen_back_to) -> None:
    first, last = fallen_back_to.deployments.all()
    UpstreamDeployment.objects.filter(pk=first.pk).update(enabled=False)
    response = admin_client.post(
        reverse("admin:upstreams_upstreamdeployment_change", args=[last.pk]),
        {"model": last.model_id, "provider": last.provider_id, "upstream_model": last.upstream_model, "priority": "0", "weight": "1", "options": ""},
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.non_field_errors() == [REFUSED]
    assert UpstreamDeployment.objects.get(pk=last.pk).enabled


def test_deleting_a_model_another_falls_back_to_is_refused_on_the_confirmation_page(admin_client, fallen_back_to) -> None:
    delete = reverse("admin:upstreams_publicmodel_delete", args=[fallen_back_to.pk])
    page = admin_client.get(delete)
    assert page.context["protected"] == [DELETE_REFUSED.format(error="model team-main: fallback 'team-fast' is not a known model")]
    assert admin_client.post(delete, {"post": "yes"}).status_code == 200
    assert PublicModel.objects.filter(name="team-fast").exists()

    selected = admin_client.post(
        reverse("admin:upstreams_publicmodel_changelist"),
        {"action": "delete_selected", "_selected_action": [fallen_back_to.pk], "post": "yes"},
    )
    assert selected.status_code == 200 and PublicModel.objects.filter(name="team-fast").exists()

    # Once nothing falls back to it, it goes.
    PublicModel.objects.filter(name="team-main").update(fallbacks=[])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 302
    assert not PublicModel.objects.filter(name="team-fast").exists()


def test_disabling_a_provider_warns_of_the_models_it_leaves_unserved(admin_client, configured) -> None:
    local = UpstreamProvider.objects.get(name="local-vllm")
    solo = PublicModel.objects.create(name="solo")
    UpstreamDeployment.objects.create(model=solo, provider=local, upstream_model="phi-3-mini")
    response = admin_client.post(
        reverse("admin:upstreams_upstreamprovider_change", args=[local.pk]),
        provider_form("local-vllm", base_url=local.base_url, enabled="", extra_headers='{"x-team": "ml"}', max_connections="64"),
        follow=True,
    )
    assert ("warning", "Not served now (no enabled deployment on an enabled provider): solo.") in [
        (message.level_tag, str(message)) for message in response.context["messages"]
    ]
    assert not UpstreamProvider.objects.get(name="local-vllm").enabled
    routes = catalog.catalog().routes
    assert "solo" not in routes and [d.name for d in routes["team-chat"].deployments] == [configured["name"]]


def test_staff_who_may_only_view_providers_cannot_change_them(django_user_model, configured) -> None:
    user = django_user_model.objects.create_user(username="watcher", password="x", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_upstreamprovider"))
    client = Client()
    client.force_login(user)
    groq = UpstreamProvider.objects.get(name="groq")
    change = reverse("admin:upstreams_upstreamprovider_change", args=[groq.pk])

    page = client.get(change)
    assert page.status_code == 200 and 'name="base_url"' not in page.content.decode()  # read-only
    assert client.post(change, provider_form("groq", base_url="https://evil.example.com/v1")).status_code == 403
    assert client.get(reverse("admin:upstreams_upstreamprovider_add")).status_code == 403
    assert client.get(reverse("admin:upstreams_publicmodel_changelist")).status_code == 403
    assert UpstreamProvider.objects.get(name="groq").base_url == "https://api.groq.com/openai/v1"


@pytest.mark.parametrize("page", ["upstreamprovider", "publicmodel", "upstreamdeployment"])
def test_each_list_renders_in_queries_that_do_not_grow_with_its_rows(admin_client, configured, django_assert_max_num_queries, page) -> None:
    counts = []
    for more in range(2):
        provider = UpstreamProvider.objects.create(name=f"extra-{more}", base_url="https://extra.example.com/v1")
        model = PublicModel.objects.create(name=f"extra-{more}")
        UpstreamDeployment.objects.create(model=model, provider=provider, upstream_model="m")
        with django_assert_max_num_queries(8) as captured:
            assert admin_client.get(reverse(f"admin:upstreams_{page}_changelist")).status_code == 200
        counts.append(len(captured.captured_queries))
    assert counts[0] == counts[1]
