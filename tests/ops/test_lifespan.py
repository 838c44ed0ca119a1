"""The ASGI lifespan: startup leaves what it built out of later garbage collections; shutdown
answers what the process's writers were handed first."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from billing import ledger_writer
from billing.services import budget_holds
from llmgateway.lifespan import lifespan

pytestmark = [pytest.mark.django_db]


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    """The lifespan freezes the objects of the process it starts in: here, the test session's."""
    yield
    gc.unfreeze()


async def test_holds_and_ledger_rows_handed_in_are_written_before_shutdown_completes(monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []

    def slow_writer(name: str, seconds: float) -> Any:
        async def write(items: Sequence[object]) -> list[object]:
            await asyncio.sleep(seconds)
            written.append(name)
            return [f"{name} written"] * len(items)

        return write

    monkeypatch.setattr(budget_holds, "_write", slow_writer("holds", 0.5))
    monkeypatch.setattr(ledger_writer, "_writer", ledger_writer.LedgerWriter(slow_writer("ledger", 0.1)))
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    sent: list[str] = []
    started = asyncio.Event()

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            started.set()
        if message["type"] == "lifespan.shutdown.complete":
            assert sorted(written) == ["holds", "ledger"]  # both answered before the process says it is done

    await inbox.put({"type": "lifespan.startup"})
    running = asyncio.create_task(lifespan({"type": "lifespan"}, inbox.get, send))
    async with asyncio.timeout(30):
        await started.wait()

    hold = budget_holds.submit(object())  # type: ignore[arg-type]
    row = ledger_writer.get_ledger_writer().submit({})
    await inbox.put({"type": "lifespan.shutdown"})
    async with asyncio.timeout(10):
        await running

    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert gc.get_freeze_count() > 10_000  # startup's objects: no full collection walks them again
    assert sorted(written) == ["holds", "ledger"]
    assert (hold.result(), row.result()) == ("holds written", "ledger written")
