"""Request ids, overhead headers, health, readiness and metrics."""

from __future__ import annotations

import json
import logging
import signal
import threading

import httpx
import pytest
from django.test import AsyncClient

pytestmark = pytest.mark.django_db(transaction=True)


async def test_healthz_is_ok_and_readyz_checks_the_database() -> None:
    client = AsyncClient()
    health = await client.get("/healthz")
    assert health.status_code == 200 and json.loads(health.content)["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert json.loads(ready.content)["database"] == "ok"


async def test_readyz_reports_redis_unavailable_as_degraded(settings) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    body = json.loads((await AsyncClient().get("/readyz")).content)
    assert body == {"status": "degraded", "database": "ok", "redis": "unavailable", "outbox": 0, "outbox_orphans": 0}


async def test_every_response_has_a_request_id_and_overhead() -> None:
    response = await AsyncClient().get("/v1/models")
    assert response.status_code == 401
    assert len(response["x-request-id"]) == 36
    assert float(response["x-gateway-overhead-ms"]) >= 0


async def test_metrics_need_staff_or_token(monkeypatch, admin_user) -> None:
    client = AsyncClient()
    assert (await client.get("/metrics")).status_code == 403
    monkeypatch.setenv("METRICS_TOKEN", "s3cret")
    assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 403
    response = await client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 200
    assert b"llmgateway_active_streams" in response.content


def test_metrics_of_several_workers_add_up_whichever_worker_answers(gateway_factory, api_key_factory, fake_upstream, tmp_path) -> None:
    """Served as recommended in production (a worker per core, PROMETHEUS_MULTIPROC_DIR set),
    every worker's /metrics reports the calls of all of them."""
    gateway = gateway_factory(workers=2, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), METRICS_TOKEN="s3cret")
    key = api_key_factory("metrics", rpm_limit=1000)
    fake_upstream.tokens = 3
    calls = 12
    for _ in range(calls):  # a new connection each: the kernel spreads them over the workers
        response = httpx.post(
            f"{gateway.api_url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
            timeout=10,
        )
        assert response.status_code == 200
    completed = 'llmgateway_calls_total{model="gpt-4o-mini",status="completed"} ' + f"{float(calls)}"
    for _ in range(6):
        metrics = httpx.get(f"{gateway.base_url}/metrics", headers={"Authorization": "Bearer s3cret"}, timeout=10)
        assert metrics.status_code == 200
        assert completed in metrics.text.splitlines()


@pytest.mark.ledger
def test_a_call_is_counted_logged_and_timed(gateway, api_key, fake_upstream) -> None:
    fake_upstream.tokens = 3
    response = httpx.post(
        f"{gateway.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "secret prompt"}], "stream": True},
        timeout=10,
    )
    assert response.status_code == 200
    assert 0 <= float(response.headers["x-gateway-overhead-ms"]) < 1000
    request_id = response.headers["x-request-id"]
    from billing.models import UsageRecord

    assert str(UsageRecord.objects.get().request_id) == request_id


@pytest.mark.ledger
async def test_each_call_logs_one_json_line_without_prompt_or_key(api_key, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="llmgateway.calls"):
        response = await AsyncClient().post(
            "/v1/chat/completions",
            data=json.dumps({"model": "sim-fast", "messages": [{"role": "user", "content": "my secret prompt"}]}),
            content_type="application/json",
            headers={"Authorization": f"Bearer {api_key}"},
        )
    assert response.status_code == 200
    lines = [record.getMessage() for record in caplog.records if record.name == "llmgateway.calls"]
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["request_id"] == response["x-request-id"]
    assert (line["user"], line["model"], line["status"]) == ("alice", "sim-fast", "completed")
    assert line["key_prefix"] == api_key[:12]
    assert line["completion_tokens"] == json.loads(response.content)["usage"]["completion_tokens"]
    assert "secret" not in lines[0] and api_key not in lines[0]


@pytest.mark.ledger
async def test_the_call_log_turned_down_to_warning_writes_no_line(api_key, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="llmgateway.calls"):
        response = await AsyncClient().post(
            "/v1/chat/completions",
            data=json.dumps({"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]}),
            content_type="application/json",
            headers={"Authorization": f"Bearer {api_key}"},
        )
    assert response.status_code == 200
    assert [record for record in caplog.records if record.name == "llmgateway.calls"] == []


def _stream_in_background(gateway, api_key: str, tokens: int, result: dict) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream(
                "POST",
                f"{gateway.api_url}/chat/completions",
                headers={"Authorization": f"Bearer {api_key}", "x-simulator-tps": "20", "x-simulator-tokens": str(tokens), "x-simulator-ttft-ms": "0"},
                json={"model": "sim-chat", "stream": True, "messages": [{"role": "user", "content": "x"}]},
                timeout=30,
            ) as response:
                result["started"].set()
                result["body"] = b"".join(response.iter_bytes())
        except httpx.HTTPError as error:
            result["error"] = error
        finally:
            result["started"].set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("tokens", "kill_timeout", "finishes"),
    [(30, "10", True), (400, "1", False)],
    ids=["stream-finishes-within-deadline", "stream-cut-at-deadline"],
)
def test_graceful_shutdown_lets_running_streams_finish_up_to_a_deadline(gateway_factory, api_key, tokens, kill_timeout, finishes) -> None:
    gateway = gateway_factory(granian_args=("--workers-kill-timeout", kill_timeout))
    result: dict = {"started": threading.Event()}
    thread = _stream_in_background(gateway, api_key, tokens, result)
    assert result["started"].wait(10)
    gateway.process.send_signal(signal.SIGTERM)
    thread.join(30)
    assert gateway.process.wait(30) is not None
    completed = result.get("body", b"").endswith(b"data: [DONE]\n\n")
    assert completed is finishes
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gateway.base_url}/healthz")
