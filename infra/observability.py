"""Metrics (Prometheus) and one structured log line per call.

With several Granian workers, set PROMETHEUS_MULTIPROC_DIR to an empty directory shared by the
workers so `/metrics` aggregates all of them (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

call_log = logging.getLogger("llmgateway.calls")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

ACTIVE_STREAMS = Gauge("llmgateway_active_streams", "Upstream calls in progress.", multiprocess_mode="livesum")
OUTBOX_DEPTH = Gauge(
    "llmgateway_ledger_outbox_depth", "Ledger rows waiting in the outbox for the database.", multiprocess_mode="livesum"
)
OUTBOX_DEFERRED = Counter("llmgateway_ledger_outbox_deferred_total", "Ledger rows the database did not take in time.")
TTFT = Histogram("llmgateway_ttft_seconds", "Upstream time to first chunk.", ["model"], buckets=_LATENCY_BUCKETS)
OVERHEAD = Histogram(
    "llmgateway_overhead_seconds", "Time the gateway added before the response started.", buckets=_LATENCY_BUCKETS
)
TOKENS = Counter("llmgateway_tokens_total", "Tokens billed.", ["model", "direction"])
COST = Counter("llmgateway_cost_usd_total", "Cost billed in USD (exact values are in the ledger).", ["model"])
CALLS = Counter("llmgateway_calls_total", "Upstream calls by final status.", ["model", "status"])
UPSTREAM_ERRORS = Counter("llmgateway_upstream_errors_total", "Upstream failures by kind.", ["kind"])
UPSTREAM_ATTEMPTS = Counter(
    "llmgateway_upstream_attempts_total",
    "Upstream attempts by deployment and result (answered, or the failure's kind).",
    ["deployment", "result"],
)
UPSTREAM_FALLBACKS = Counter("llmgateway_upstream_fallbacks_total", "Calls answered by a fallback model.", ["model", "fallback"])
UPSTREAM_BREAKER_STATE = Gauge(
    "llmgateway_upstream_breaker_state",
    "A deployment's circuit breaker: 0 closed, 1 probing, 2 open (the highest across processes).",
    ["deployment"],
    multiprocess_mode="livemax",
)
UPSTREAM_LEARNED_LIMIT = Gauge(
    "llmgateway_upstream_learned_limit",
    "The limit per minute the gateway keeps to for a deployment, learned from the upstream (shared in Redis).",
    ["deployment", "unit"],
    multiprocess_mode="mostrecent",
)
BATCH_ITEMS = Histogram(
    "llmgateway_batch_items",
    "Items in each group-committed batch, by writer (ledger rows, budget holds, limiter scripts).",
    ["writer"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_SECONDS = Histogram(
    "llmgateway_batch_seconds",
    "Time to write one group-committed batch, by writer: its round trips, locks waited for and work in a thread.",
    ["writer"],
    buckets=_LATENCY_BUCKETS,
)
REJECTIONS = Counter("llmgateway_rejections_total", "Requests refused before the upstream.", ["reason"])
BACKPRESSURE_WAITS = Counter(
    "llmgateway_backpressure_waits_total", "Times a producer found the stream queue full (slow client)."
)
REDIS_FALLBACKS = Counter("llmgateway_redis_fallbacks_total", "Limiter decisions taken without Redis.")
CACHE_FAILURES = Counter(
    "llmgateway_cache_failures_total",
    "Cache operations answered as a miss because Redis was unreachable (page rate limits fail open).",
    ["operation"],
)


def metrics_payload() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def call_log_enabled() -> bool:
    """Whether `log_call` writes anything: its caller need not build the fields otherwise."""
    return call_log.isEnabledFor(logging.INFO)


def log_call(fields: dict[str, Any]) -> None:
    """One JSON line per call; never the prompt, never a secret."""
    call_log.info(orjson.dumps(fields, default=str).decode())
