"""How often the live catalog goes to the database: at most once per UPSTREAMS_CACHE_SECONDS,
and once for all the calls that find it stale together, which do not wait for it once a catalog
was read."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from streaming.catalog import Catalog, environment_catalog
from upstreams import catalog


@pytest.fixture
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Reads of the database, each taking 50 ms, counted."""
    reads: list[int] = []

    async def slow_read() -> Catalog:
        reads.append(1)
        await asyncio.sleep(0.05)
        return environment_catalog()

    monkeypatch.setattr(catalog, "_read_in_thread", slow_read)
    return reads


async def test_a_hundred_calls_that_find_the_catalog_stale_together_wait_for_one_read(counted_reads: list[int]) -> None:
    catalogs = await asyncio.gather(*(catalog.acatalog() for _ in range(100)))
    assert len(counted_reads) == 1
    assert all(found is catalogs[0] for found in catalogs)


async def test_a_fresh_catalog_is_not_read_again_and_a_stale_one_is(counted_reads: list[int], settings) -> None:
    settings.UPSTREAMS_CACHE_SECONDS = 0.2
    await catalog.acatalog()
    await catalog.acatalog()
    assert len(counted_reads) == 1
    await asyncio.sleep(0.25)
    await catalog.acatalog()
    await asyncio.sleep(0.01)  # the read runs beside the call, which got the stale catalog
    assert len(counted_reads) == 2


async def test_calls_that_find_the_catalog_stale_get_it_at_once_and_one_read_replaces_it(
    monkeypatch: pytest.MonkeyPatch, settings
) -> None:
    settings.UPSTREAMS_CACHE_SECONDS = 0.1
    first = await catalog.acatalog()
    reading = asyncio.Event()
    replacement = dataclasses.replace(environment_catalog())
    assert replacement is not first

    async def gated_read() -> Catalog:
        await reading.wait()
        return replacement

    monkeypatch.setattr(catalog, "_read_in_thread", gated_read)
    await asyncio.sleep(0.15)
    assert await asyncio.gather(*(catalog.acatalog() for _ in range(10))) == [first] * 10  # while the read has not ended
    reading.set()
    await asyncio.sleep(0.01)
    assert await catalog.acatalog() is replacement


async def test_a_caller_that_leaves_does_not_cancel_the_read_the_others_wait_for(counted_reads: list[int]) -> None:
    leaving = asyncio.create_task(catalog.acatalog())
    staying = asyncio.create_task(catalog.acatalog())
    await asyncio.sleep(0.01)
    leaving.cancel()
    assert isinstance(await staying, Catalog)
    assert len(counted_reads) == 1


async def test_a_failed_read_keeps_the_last_catalog_and_is_tried_again_after_the_delay(
    monkeypatch: pytest.MonkeyPatch, settings
) -> None:
    settings.UPSTREAMS_CACHE_SECONDS = 0.1
    first = await catalog.acatalog()
    attempts: list[int] = []

    async def failing_read() -> Catalog:
        attempts.append(1)
        raise ConnectionError("the database is down")

    monkeypatch.setattr(catalog, "_read_in_thread", failing_read)
    await asyncio.sleep(0.15)
    assert await asyncio.gather(*(catalog.acatalog() for _ in range(10))) == [first] * 10
    assert len(attempts) == 1
