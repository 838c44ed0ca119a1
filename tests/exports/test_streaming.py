"""Raw exports stream: memory stays flat as the ledger grows (`bench/export_costs.py` measures it
at a million rows)."""

from __future__ import annotations

import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model

from billing.exports import ExportSpec, usage_export
from billing.models import UsageRecord

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]


def add_rows(user_id: int, count: int, start: int) -> None:
    """Ledger rows written in bulk (only raw exports read them here, so no rollups are needed)."""
    at = datetime(2025, 6, 1, tzinfo=UTC)
    UsageRecord.objects.bulk_create(
        [
            UsageRecord(
                request_id=uuid.uuid4(), user_id=user_id, model="gpt-4o-mini", upstream_model="gpt-4o-mini",
                provider="openai", stream=True, status="completed", prompt_tokens=1000 + index, completion_tokens=500,
                token_source="upstream", duration_us=1000, created_at=at + timedelta(seconds=index),
                cost_usd=Decimal("0.0004500000") + index * Decimal("0.0000000001"),
                input_usd_per_1m=Decimal("0.15"), cached_input_usd_per_1m=Decimal("0.075"),
                output_usd_per_1m=Decimal("0.6"), price_multiplier=Decimal(1), price_source="catalog",
            )
            for index in range(start, start + count)
        ],
        batch_size=2000,
    )


def export_peak(spec: ExportSpec) -> tuple[int, int]:
    """(characters written, peak bytes allocated by Python while exporting, in batches of 250)."""
    written = 0
    tracemalloc.start()
    try:
        for chunk in usage_export(spec, chunk_size=250):
            written += len(chunk)
        return written, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_rows() -> None:
    user = get_user_model().objects.create(username="volume")
    spec = ExportSpec(totals=True)
    add_rows(user.pk, 2_000, 0)
    small_size, small_peak = export_peak(spec)
    add_rows(user.pk, 18_000, 2_000)
    large_size, large_peak = export_peak(spec)

    assert large_size > 9 * small_size
    # Ten times the rows, the same peak: one batch of rows and one chunk of text at a time.
    assert large_peak < 1.25 * small_peak, (small_peak, large_peak)
