"""Reading the ledger rows a served gateway wrote (it writes them from its own process)."""

from __future__ import annotations

import time

from billing.models import UsageRecord


def the_only_record() -> UsageRecord:
    records = list(UsageRecord.objects.all())
    assert len(records) == 1, records
    return records[0]


def wait_for_record(timeout: float = 5.0) -> UsageRecord:
    """The only row, once it is written (a stream's row may land just after its last byte)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if UsageRecord.objects.exists():
            return the_only_record()
        time.sleep(0.01)
    raise AssertionError("no usage record was written")
