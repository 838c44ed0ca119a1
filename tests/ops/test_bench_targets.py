"""The benchmark's targets table is drawn for any subset of its loads."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.common import ROOT, batch_figures, batch_totals, figures_of_turns
from bench.targets import CHUNKS_LONG, CHUNKS_SHORT, evaluate


def _run_of(*loads: str) -> dict[str, object]:
    rows = {key: {"load": {"key": key, "tokens": 110, "concurrency": 50}, "direct": {}, "gateway": {}} for key in loads}
    return {"meta": {}, "configs": {"embedded": {"serving": {"name": "embedded"}, "streaming": rows}}}


def test_cpu_per_chunk_is_not_available_from_one_of_its_two_loads() -> None:
    for load in (CHUNKS_LONG, CHUNKS_SHORT):
        (row,) = [row for row in evaluate(_run_of(load)) if row["id"] == "cpu-per-chunk-1w"]

        assert row["value"] is None
        assert row["status"] == "n/a"


def test_the_calls_row_shows_the_gateway_against_the_bare_io_floor_of_the_same_turns() -> None:
    turns = [
        {"calls_per_second": 300.0, "calls_in_window": 1500, "answered": 1700, "p99_ms": 90.0, "errors": {"HTTP 503": 1}, "steal_cpu_percent": None},
        {"calls_per_second": 200.0, "calls_in_window": 1000, "answered": 1200, "p99_ms": 120.0, "errors": {"HTTP 503": 2}, "steal_cpu_percent": None},
        {"calls_per_second": 250.0, "calls_in_window": 1250, "answered": 1400, "p99_ms": 100.0, "errors": {}, "steal_cpu_percent": None},
    ]
    gateway = figures_of_turns(turns, tuple(turns[0]))
    assert gateway == {
        "calls_per_second": 250.0,  # the median turn, not the mean of a drifting machine
        "calls_in_window": 3750,
        "answered": 4300,  # every answered call owes a ledger row, whichever turn it came in
        "p99_ms": 100.0,
        "errors": {"HTTP 503": 3},
        "steal_cpu_percent": None,
    }
    run = {
        "configs": {},
        "calls": {
            "status": "ok",
            "direct": {"calls_per_second": 3000.0},
            "bare_io": {"calls_per_second": 500.0, "server_cpu_ms_per_call": 2.0},
            "gateway": gateway,
            "gateway_vs_bare_io": 0.52,
            "ledger": {"ok": True},
        },
    }

    (row,) = [row for row in evaluate(run) if row["id"] == "ledger-calls"]

    assert (row["value"], row["status"]) == (250.0, "MISS")
    assert row["baseline"] == "direct 3,000/s, bare I/O 500/s at 2.00 ms/call (gateway 0.52x of it)"


def test_the_calls_figures_include_each_writers_batches_read_from_the_gateways_metrics(tmp_path) -> None:
    # A process with the gateway's multiprocess metrics writes a batch of one, then a batch of four
    # held open 50 ms: what `bench.calls_per_second` reads from the workers' metrics directory.
    script = """
import asyncio
from infra.group_commit import GroupCommit

async def main():
    gate = asyncio.Event()
    async def write(items):
        if len(items) > 1:
            await asyncio.sleep(0.05)
        await gate.wait()
        return list(items)
    writer = GroupCommit(write, name="llmgateway-ledger-writer", max_batch=10)
    first = writer.submit(0)
    await asyncio.sleep(0)
    later = [writer.submit(item) for item in range(1, 5)]
    gate.set()
    await asyncio.gather(first, *later)

asyncio.run(main())
"""
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    before = batch_totals(tmp_path)
    subprocess.run([sys.executable, "-c", script], env=environment, check=True, timeout=60)

    figures = batch_figures(before, batch_totals(tmp_path))

    assert before == {}
    assert figures["ledger_batch_items"] == 2.5  # (1 + 4) items in 2 batches
    assert figures["ledger_batch_ms"] is not None and figures["ledger_batch_ms"] >= 25  # (~0 + 50 ms) / 2
    assert "hold_batch_items" not in figures  # no such writer ran
