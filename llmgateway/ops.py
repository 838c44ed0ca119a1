"""Operations endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
import os

import orjson
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse

from billing.outbox import get_outbox, orphan_journals
from calls.limits import get_limiter
from infra.db import db_task
from infra.observability import metrics_payload
from infra.redis import astate, async_client

READY_CHECK_TIMEOUT = 2.0
REDIS_CHECK_TIMEOUT = 0.5  # seconds, per socket operation


def _json(payload: dict, status: int = 200) -> HttpResponse:
    return HttpResponse(orjson.dumps(payload), status=status, content_type="application/json")


async def healthz(request: HttpRequest) -> HttpResponse:
    """Liveness: the process serves requests. Reports degraded dependencies without failing."""
    limiter = await get_limiter().health()
    degraded = limiter.get("state") not in (None, "ok")
    return _json({"status": "degraded" if degraded else "ok", "limiter": limiter})


@db_task
def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _redis_state() -> str:
    """``ok`` when Redis answers within REDIS_CHECK_TIMEOUT: on a cluster (REDIS_CLUSTER), every
    primary answers PING and the cluster says ``cluster_state:ok``."""
    if not settings.REDIS_URL:
        return "not configured"
    client = None
    try:
        # in the try: a cluster client refuses some URLs at once (a database number)
        client = async_client(settings.REDIS_URL, cluster=settings.REDIS_CLUSTER, timeout=REDIS_CHECK_TIMEOUT)
        async with asyncio.timeout(READY_CHECK_TIMEOUT):
            return await astate(client)
    except Exception:
        return "unavailable"
    finally:
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # a cluster client that never connected has nothing to close
                pass


async def readyz(request: HttpRequest) -> HttpResponse:
    """Readiness: the database answers (required); Redis answers (else degraded, still ready)."""
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT):
            await _check_database()
        checks["database"] = "ok"
    except Exception:
        checks["database"] = "unavailable"
    checks["redis"] = await _redis_state()
    ready = checks["database"] == "ok"
    status = "ok" if ready and checks["redis"] != "unavailable" else ("degraded" if ready else "unavailable")
    outbox = get_outbox()
    # Rows this process keeps for the database, and journals of stopped processes not replayed yet.
    orphans = orphan_journals(outbox.root)  # a directory listing: not worth a thread
    return _json({"status": status, **checks, "outbox": outbox.depth, "outbox_orphans": orphans}, status=200 if ready else 503)


async def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics, for staff sessions or `Authorization: Bearer $METRICS_TOKEN`."""
    token = os.environ.get("METRICS_TOKEN", "")
    authorization = request.headers.get("Authorization", "")
    allowed = bool(token) and hmac.compare_digest(authorization, f"Bearer {token}")
    if not allowed:
        user = await request.auser()
        allowed = user.is_active and user.is_staff
    if not allowed:
        return _json({"error": {"message": "Metrics need a staff session or the metrics token.", "type": "invalid_request_error", "param": None, "code": "forbidden"}}, status=403)
    return HttpResponse(metrics_payload(), content_type="text/plain; version=0.0.4; charset=utf-8")
