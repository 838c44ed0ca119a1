"""The benchmark's targets table is drawn for any subset of its loads."""

from __future__ import annotations

from bench.targets import CHUNKS_LONG, CHUNKS_SHORT, evaluate


def _run_of(*loads: str) -> dict[str, object]:
    rows = {key: {"load": {"key": key, "tokens": 110, "concurrency": 50}, "direct": {}, "gateway": {}} for key in loads}
    return {"meta": {}, "configs": {"embedded": {"serving": {"name": "embedded"}, "streaming": rows}}}


def test_cpu_per_chunk_is_not_available_from_one_of_its_two_loads() -> None:
    for load in (CHUNKS_LONG, CHUNKS_SHORT):
        (row,) = [row for row in evaluate(_run_of(load)) if row["id"] == "cpu-per-chunk-1w"]

        assert row["value"] is None
        assert row["status"] == "n/a"
