"""infra.refresh.RefreshAhead: one read per key at a time, and entries in use read again before
they expire, so that a busy process's calls do not wait for the database each time one would."""

from __future__ import annotations

import asyncio
import logging

import pytest

from infra.refresh import RefreshAhead


class Revoked(Exception):
    pass


class Source:
    """A look-up that the test releases: `gate` opens it, `answers` are what it returns."""

    def __init__(self, ttl: float = 10.0) -> None:
        self.calls: list[str] = []
        self.value = "v1"
        self.ttl = ttl
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: BaseException | None = None

    async def look_up(self, key: str) -> tuple[str, float]:
        self.calls.append(key)
        value, error = self.value, self.error  # as the database was when the read began
        await self.gate.wait()
        if error is not None:
            raise error
        return f"{key}:{value}", self.ttl


@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


async def test_callers_that_find_no_value_share_one_read() -> None:
    source = Source()
    source.gate.clear()
    cache = RefreshAhead(source.look_up, name="test", max_entries=10)
    callers = [asyncio.create_task(cache.get("k")) for _ in range(20)]
    await asyncio.sleep(0.01)
    source.gate.set()
    assert await asyncio.gather(*callers) == ["k:v1"] * 20
    assert source.calls == ["k"]
    assert await cache.get("k") == "k:v1" and source.calls == ["k"]


async def test_a_value_in_the_second_half_of_its_time_is_answered_at_once_and_read_again(clock: list[float]) -> None:
    source = Source(ttl=10.0)
    cache = RefreshAhead(source.look_up, name="test", max_entries=10, clock=lambda: clock[0])
    assert await cache.get("k") == "k:v1"
    source.value, source.gate = "v2", asyncio.Event()
    clock[0] += 4.9
    assert await cache.get("k") == "k:v1" and source.calls == ["k"]  # first half: no read
    clock[0] += 0.2
    # Second half: the cached value at once, whatever the read does; one read however many ask.
    assert [await cache.get("k") for _ in range(5)] == ["k:v1"] * 5
    await asyncio.sleep(0.01)
    assert source.calls == ["k", "k"]
    source.gate.set()
    await asyncio.sleep(0.01)
    assert await cache.get("k") == "k:v2"
    clock[0] += 9.0  # still within the new value's time, counted from its read
    assert cache.peek("k") == "k:v2"


async def test_an_expired_value_is_never_answered(clock: list[float]) -> None:
    source = Source(ttl=2.0)
    cache = RefreshAhead(source.look_up, name="test", max_entries=10, clock=lambda: clock[0])
    await cache.get("k")
    source.value = "v2"
    clock[0] += 2.0
    assert cache.peek("k") is None and cache.cached("k") is None
    assert await cache.get("k") == "k:v2"


async def test_a_refresh_refused_with_drop_on_drops_the_entry(clock: list[float]) -> None:
    source = Source(ttl=10.0)
    cache = RefreshAhead(source.look_up, name="test", max_entries=10, clock=lambda: clock[0], drop_on=(Revoked,))
    await cache.get("k")
    source.error = Revoked("revoked")
    clock[0] += 6.0
    assert await cache.get("k") == "k:v1"  # answered while the read runs
    await asyncio.sleep(0.01)
    with pytest.raises(Revoked):
        await cache.get("k")


async def test_a_refresh_that_fails_otherwise_keeps_the_entry_until_it_expires(
    clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    source = Source(ttl=10.0)
    cache = RefreshAhead(source.look_up, name="test cache", max_entries=10, clock=lambda: clock[0])
    await cache.get("k")
    source.error = ConnectionError("database down")
    clock[0] += 6.0
    with caplog.at_level(logging.WARNING, logger="infra.refresh"):
        assert await cache.get("k") == "k:v1"
        await asyncio.sleep(0.01)
    assert "test cache: reading an entry again failed (database down)" in caplog.text
    assert await cache.get("k") == "k:v1"
    clock[0] += 4.0
    with pytest.raises(ConnectionError):
        await cache.get("k")


async def test_a_read_that_began_before_clear_stores_nothing() -> None:
    source = Source()
    cache = RefreshAhead(source.look_up, name="test", max_entries=10)
    source.gate.clear()
    caller = asyncio.create_task(cache.get("k"))
    await asyncio.sleep(0.01)
    source.value = "v2"
    cache.clear()  # the key changed while the read (of v1) was on its way
    source.gate.set()
    assert await caller == "k:v1"  # its caller had asked before the change
    assert cache.peek("k") is None
    assert await cache.get("k") == "k:v2"


async def test_a_caller_that_leaves_does_not_cancel_the_shared_read() -> None:
    source = Source()
    source.gate.clear()
    cache = RefreshAhead(source.look_up, name="test", max_entries=10)
    leaving, staying = asyncio.create_task(cache.get("k")), asyncio.create_task(cache.get("k"))
    await asyncio.sleep(0.01)
    leaving.cancel()
    source.gate.set()
    assert await staying == "k:v1"
    assert leaving.cancelled() and source.calls == ["k"]
