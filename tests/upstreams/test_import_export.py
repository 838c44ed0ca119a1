"""`manage.py import_upstreams` and `export_upstreams`: a document becomes the admin's rows and the
live catalog, a bad one changes nothing and names its field, and an export imports back unchanged."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
import yaml
from django.core.management import CommandError, call_command

from upstreams import catalog
from upstreams.models import PublicModel, UpstreamDeployment, UpstreamProvider
from upstreams.routing import attempt_order
from upstreams.services import upstreams_export, upstreams_import

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def rows() -> dict[str, list[dict[str, Any]]]:
    """Every configured row, every column (ids and update times included)."""
    return {
        "providers": list(UpstreamProvider.objects.order_by("pk").values()),
        "models": list(PublicModel.objects.order_by("pk").values()),
        "deployments": list(UpstreamDeployment.objects.order_by("pk").values()),
    }


def test_an_import_adds_the_rows_and_the_live_catalog_routes_the_model_to_them_in_priority_order(write_document, document, monkeypatch) -> None:
    monkeypatch.setenv("GROQ_API_KEY", "gsk-test")

    out = run("import_upstreams", str(write_document(document)))

    assert out.splitlines() == [
        "added provider groq",
        "added provider local-vllm",
        "added model team-chat",
        "added deployment team-chat: local-vllm/meta-llama/Llama-3.1-8B-Instruct",
        "added deployment team-chat: groq/llama-3.1-8b-instant",
        "added model team-fast",
        "added deployment team-fast: local-vllm/qwen2.5-0.5b",
        "added deployment team-fast: groq/llama-3.2-1b-preview",
        "upstreams.yaml: 8 added, 0 updated, 0 removed, 0 unchanged.",
    ]
    groq = UpstreamProvider.objects.get(name="groq")
    assert (groq.kind, groq.base_url, groq.api_key_env, groq.read_timeout, groq.enabled) == (
        "openai", "https://api.groq.com/openai/v1", "GROQ_API_KEY", 30.0, True,
    )
    local = UpstreamProvider.objects.get(name="local-vllm")
    assert (local.api_key_env, local.extra_headers, local.max_connections) == ("", {"x-team": "ml"}, 64)
    deployment = UpstreamDeployment.objects.get(provider=groq, upstream_model="llama-3.1-8b-instant")
    assert (deployment.model.name, deployment.priority, deployment.rpm, deployment.tpm) == ("team-chat", 1, 30, 6000)
    assert PublicModel.objects.get(name="team-fast").owned_by == "ml-team"

    catalog.forget()
    route = catalog.route_for("team-chat")
    assert route is not None
    expected = ["local-vllm/meta-llama/Llama-3.1-8B-Instruct", "groq/llama-3.1-8b-instant"]
    assert [deployment.name for deployment in route.deployments] == expected
    assert [deployment.name for deployment in attempt_order(route)] == expected
    assert (route.routing, route.fallbacks, route.context_window) == ("priority", ("sim-chat",), 131072)
    groq_deployment = route.deployments[1]
    assert (groq_deployment.rpm, groq_deployment.tpm) == (30, 6000)
    assert (groq_deployment.provider.base_url, groq_deployment.provider.api_key()) == ("https://api.groq.com/openai/v1", "gsk-test")
    assert route.deployments[0].provider.headers == {"x-team": "ml"}
    fast = catalog.route_for("team-fast")
    assert fast is not None and (fast.routing, fast.owned_by) == ("weighted", "ml-team")
    assert [deployment.weight for deployment in fast.deployments] == [3, 1]


def test_a_json_document_imports_as_yaml_does(write_document, document) -> None:
    run("import_upstreams", str(write_document(document, "upstreams.json")))
    assert sorted(UpstreamProvider.objects.values_list("name", flat=True)) == ["groq", "local-vllm"]
    assert UpstreamDeployment.objects.count() == 4


def test_importing_the_same_document_again_changes_nothing(write_document, document) -> None:
    path = write_document(document)
    run("import_upstreams", str(path))
    before = rows()
    assert run("import_upstreams", str(path)) == "upstreams.yaml: 0 added, 0 updated, 0 removed, 8 unchanged.\n"
    assert rows() == before


def test_an_import_updates_by_name_and_makes_each_models_deployments_the_documents(write_document, document) -> None:
    run("import_upstreams", str(write_document(document)))
    document["providers"][0]["read_timeout"] = 45.0
    team_chat = document["models"][0]
    team_chat["context_window"] = 8192
    team_chat["deployments"] = [
        {"provider": "groq", "upstream_model": "llama-3.1-8b-instant", "priority": 0, "rpm": 60},
        {"provider": "groq", "upstream_model": "llama-3.3-70b-versatile", "priority": 1},
    ]

    out = run("import_upstreams", str(write_document(document)))

    assert out.splitlines() == [
        "added deployment team-chat: groq/llama-3.3-70b-versatile",
        "updated provider groq",
        "updated model team-chat",
        "updated deployment team-chat: groq/llama-3.1-8b-instant",
        "removed deployment team-chat: local-vllm/meta-llama/Llama-3.1-8B-Instruct",
        "upstreams.yaml: 1 added, 3 updated, 1 removed, 4 unchanged.",
    ]
    assert UpstreamProvider.objects.get(name="groq").read_timeout == 45.0
    model = PublicModel.objects.get(name="team-chat")
    assert model.context_window == 8192
    assert [(d.provider.name, d.upstream_model, d.priority, d.rpm) for d in model.deployments.select_related("provider")] == [
        ("groq", "llama-3.1-8b-instant", 0, 60),
        ("groq", "llama-3.3-70b-versatile", 1, None),
    ]


def test_a_disabled_deployment_the_document_does_not_list_is_kept_unless_replacing(write_document, document) -> None:
    """The catalog (and so an export) leaves disabled rows out; an import leaves them as staff left them."""
    run("import_upstreams", str(write_document(document)))
    UpstreamDeployment.objects.filter(upstream_model="llama-3.2-1b-preview").update(enabled=False)
    document["models"][1]["deployments"].pop()
    path = write_document(document)

    assert run("import_upstreams", str(path)) == "upstreams.yaml: 0 added, 0 updated, 0 removed, 7 unchanged.\n"
    assert UpstreamDeployment.objects.filter(upstream_model="llama-3.2-1b-preview", enabled=False).exists()

    assert "removed deployment team-fast: groq/llama-3.2-1b-preview" in run("import_upstreams", str(path), "--replace")
    assert not UpstreamDeployment.objects.filter(upstream_model="llama-3.2-1b-preview").exists()


def bad(document: dict[str, Any], change: Any) -> dict[str, Any]:
    change(document)
    return document


BAD_DOCUMENTS = [
    pytest.param(
        lambda d: d["providers"][0].update(base_uri="https://example.test/v1"),
        "providers[0]: unknown field(s) base_uri",
        id="unknown-field",
    ),
    pytest.param(
        lambda d: d["models"][0]["deployments"][0].update(provider="grok"),
        "models[0].deployments[0].provider: no provider named 'grok'",
        id="unknown-provider",
    ),
    pytest.param(
        lambda d: d["models"][0].update(fallbacks=["nowhere"]),
        "model team-chat: fallback 'nowhere' is not a known model",
        id="fallback-to-nowhere",
    ),
    pytest.param(
        lambda d: d["providers"][0].update(api_key_env="DJANGO_SECRET_KEY"),
        "providers[0].api_key_env 'DJANGO_SECRET_KEY' is not allowed: name an environment variable in capitals "
        "that ends with _API_KEY, _KEY or _TOKEN (not DJANGO_*, DATABASE_* or REDIS_*).",
        id="secret-key-variable",
    ),
    pytest.param(
        lambda d: d["models"][1]["deployments"][0].update(weight=0),
        "models[1].deployments[0].weight: must be at least 1, got 0",
        id="zero-weight",
    ),
    pytest.param(
        lambda d: d["providers"].append(dict(d["providers"][0])),
        "providers[2].name: 'groq' is listed twice",
        id="provider-twice",
    ),
    pytest.param(
        lambda d: d["models"][1]["deployments"].append({"provider": "simulator", "upstream_model": "sim-fast"}),
        "models[1] (team-fast): deployment simulator/sim-fast: 'simulator' is the environment's provider, "
        "not one configured here; list it under providers",
        id="environment-provider",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD_DOCUMENTS)
@pytest.mark.parametrize("replace", [False, True], ids=["merge", "replace"])
def test_a_bad_document_changes_nothing_and_names_the_field(write_document, document, change, message, replace) -> None:
    run("import_upstreams", str(write_document(document)))
    before = rows()
    # Valid changes besides the bad one: none of them may be written either.
    document["providers"][1]["max_connections"] = 8
    document["models"].append({"name": "team-new", "deployments": [{"provider": "groq", "upstream_model": "gemma2-9b-it"}]})
    path = write_document(bad(document, change), "bad.yaml")

    with pytest.raises(CommandError) as raised:
        run("import_upstreams", str(path), *(["--replace"] if replace else []))

    assert str(raised.value) == f"bad.yaml: {message}"
    assert rows() == before


def test_a_file_that_is_not_yaml_is_refused_with_its_parser_message(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("providers: [\n  {name: groq\n")
    with pytest.raises(CommandError, match=r"broken\.yaml: while parsing a flow mapping"):
        run("import_upstreams", str(path))
    with pytest.raises(CommandError, match=r"nothing\.yaml: no such file\."):
        run("import_upstreams", str(tmp_path / "nothing.yaml"))
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(CommandError, match=r"empty\.yaml: document: empty"):
        run("import_upstreams", str(tmp_path / "empty.yaml"))


def test_replace_deletes_the_providers_and_models_the_document_does_not_list(write_document, document) -> None:
    run("import_upstreams", str(write_document(document)))
    smaller = {
        "providers": [document["providers"][1]],
        "models": [{"name": "team-fast", "deployments": [{"provider": "local-vllm", "upstream_model": "qwen2.5-0.5b", "weight": 3}]}],
    }
    path = write_document(smaller, "smaller.yaml")

    # Without --replace, what the document does not list stays.
    run("import_upstreams", str(path))
    assert set(UpstreamProvider.objects.values_list("name", flat=True)) == {"groq", "local-vllm"}
    assert set(PublicModel.objects.values_list("name", flat=True)) == {"team-chat", "team-fast"}

    out = run("import_upstreams", str(path), "--replace")

    assert out.splitlines() == [
        "removed model team-chat",
        "removed provider groq",
        "smaller.yaml: 0 added, 0 updated, 2 removed, 3 unchanged.",
    ]
    assert list(UpstreamProvider.objects.values_list("name", flat=True)) == ["local-vllm"]
    assert list(PublicModel.objects.values_list("name", flat=True)) == ["team-fast"]
    assert list(UpstreamDeployment.objects.values_list("upstream_model", flat=True)) == ["qwen2.5-0.5b"]
    catalog.forget()
    assert catalog.route_for("team-chat") is None
    assert catalog.route_for("sim-chat") is not None  # the environment's models stay


def test_replace_refuses_to_delete_a_provider_still_used_and_writes_nothing(write_document, document) -> None:
    """A document's deployment may name a provider of the environment (`simulator`) that is also a
    row here; --replace would delete the row under it."""
    document["providers"].append({"name": "simulator", "kind": "simulator"})
    document["models"][1]["deployments"].append({"provider": "simulator", "upstream_model": "sim-fast"})
    run("import_upstreams", str(write_document(document)))
    before = rows()
    document["providers"].pop()
    document["models"].pop(0)

    with pytest.raises(CommandError) as raised:
        run("import_upstreams", str(write_document(document, "without.yaml")), "--replace")

    assert str(raised.value) == (
        "without.yaml: provider 'simulator' is not in the document but is still used by model(s) team-fast; "
        "list it under providers, or move those deployments first"
    )
    assert rows() == before  # team-chat, deleted before the refusal, is back


def test_a_dry_run_reports_the_changes_and_writes_nothing(write_document, document) -> None:
    out = run("import_upstreams", str(write_document(document)), "--dry-run")
    assert out.splitlines()[-1] == "upstreams.yaml: 8 added, 0 updated, 0 removed, 0 unchanged (dry run: nothing written)."
    assert rows() == {"providers": [], "models": [], "deployments": []}


def test_an_imported_model_serves_even_if_the_catalog_was_read_before(write_document, document) -> None:
    """The live catalog is forgotten when rows change: no stale read after an import."""
    assert catalog.route_for("team-chat") is None
    upstreams_import(document=document)
    assert catalog.route_for("team-chat") is not None


@pytest.mark.parametrize("format", ["yaml", "json"])
def test_an_export_imports_back_unchanged(write_document, document, tmp_path, format) -> None:
    run("import_upstreams", str(write_document(document)))
    # Rows the catalog leaves out are not exported, and the import leaves them alone.
    off = UpstreamProvider.objects.create(name="off", base_url="https://off.example.com/v1", enabled=False)
    parked = PublicModel.objects.create(name="parked", enabled=False)
    UpstreamDeployment.objects.create(model=parked, provider=off, upstream_model="x")
    before = rows()
    exported = tmp_path / f"exported.{format}"

    assert run("export_upstreams", "--output", str(exported)) == ""
    text = exported.read_text()
    assert (json.loads(text) if format == "json" else yaml.safe_load(text)) == upstreams_export()
    assert [entry["name"] for entry in upstreams_export()["providers"]] == ["groq", "local-vllm"]
    assert [entry["name"] for entry in upstreams_export()["models"]] == ["team-chat", "team-fast"]

    assert run("import_upstreams", str(exported)) == f"exported.{format}: 0 added, 0 updated, 0 removed, 8 unchanged.\n"
    assert rows() == before
    assert run("export_upstreams", "--format", format) == text


def test_the_export_is_the_configured_document_and_holds_no_key(document, monkeypatch) -> None:
    monkeypatch.setenv("GROQ_API_KEY", "gsk-canary-export-7d1e")
    upstreams_import(document=document)
    out = run("export_upstreams")
    assert "gsk-canary-export-7d1e" not in out
    exported = yaml.safe_load(out)
    assert exported == catalog.configured_document()
    assert exported["providers"][0] == document["providers"][0]
    assert exported["models"][0]["deployments"][0] == {
        "provider": "local-vllm", "upstream_model": "meta-llama/Llama-3.1-8B-Instruct", "priority": 0, "weight": 1,
    }


def test_an_export_to_a_missing_directory_is_refused(tmp_path) -> None:
    with pytest.raises(CommandError, match=r"^--output: "):
        run("export_upstreams", "--output", str(tmp_path / "nowhere" / "upstreams.yaml"))
