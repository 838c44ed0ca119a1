"""The limiter semantics, as one suite run against both backends (ids "redis", "inprocess").

Both run on a `ManualClock` (the Redis scripts take the test clock instead of TIME), so every
expectation here is exact. Real Redis TIME is covered in test_redis_realtime.py.
"""

from __future__ import annotations

import math

import pytest

from limits import LimitKind, LimitSpec, lease_spec

from .conftest import Backend

# -- token bucket ----------------------------------------------------------------------------


async def test_burst_up_to_capacity_then_reject(backend: Backend) -> None:
    spec = backend.spec("rpm", limit=5, period=50.0)  # 1 token / 10 s

    remaining = [(await backend.acquire(spec)).states[0].remaining for _ in range(5)]
    rejected = await backend.acquire(spec)

    assert remaining == [4, 3, 2, 1, 0]
    assert not rejected.allowed
    assert rejected.violated == spec
    assert rejected.retry_after == pytest.approx(10.0)
    assert rejected.states[0].remaining == 0
    assert rejected.states[0].reset_seconds == pytest.approx(50.0)


@pytest.mark.parametrize("kind", ["token_bucket", "sliding_window"])
async def test_retry_after_is_exactly_when_the_call_fits(backend: Backend, kind: LimitKind) -> None:
    spec = backend.spec("k", kind=kind, limit=3, period=30.0)
    for _ in range(3):
        assert (await backend.acquire(spec)).allowed
    backend.clock.advance(4.0)

    rejected = await backend.acquire(spec)
    # bucket: 10 s per token, 4 s already refilled; window: the t0 entries expire at t30
    expected = 6.0 if kind == "token_bucket" else 26.0
    backend.clock.advance(rejected.retry_after - 0.01)
    too_early = await backend.acquire(spec)
    backend.clock.advance(0.01)
    on_time = await backend.acquire(spec)

    assert rejected.retry_after == pytest.approx(expected)
    assert not too_early.allowed
    assert too_early.retry_after == pytest.approx(0.01, abs=1e-6)
    assert on_time.allowed


async def test_refills_at_the_sustained_rate_and_never_above_capacity(backend: Backend) -> None:
    spec = backend.spec("rpm", limit=10, period=10.0)  # 1 token / s
    for _ in range(10):
        assert (await backend.acquire(spec)).allowed

    backend.clock.advance(3.5)
    admitted = [(await backend.acquire(spec)).allowed for _ in range(5)]
    assert admitted == [True, True, True, False, False]
    assert await backend.remaining(spec) == 0

    backend.clock.advance(0.5)  # the half token left over completes one more
    assert (await backend.acquire(spec)).allowed

    backend.clock.advance(10_000.0)  # idle for hours: still only `limit` tokens
    admitted = [(await backend.acquire(spec)).allowed for _ in range(12)]
    assert admitted.count(True) == 10
    assert admitted[:10] == [True] * 10


async def test_cost_above_one_takes_that_many_tokens(backend: Backend) -> None:
    spec = backend.spec("tpm", limit=10, period=10.0, cost=4)

    first, second, third = [await backend.acquire(spec) for _ in range(3)]
    small = await backend.acquire(backend.spec("tpm", limit=10, period=10.0, cost=2))

    assert [first.allowed, second.allowed, third.allowed] == [True, True, False]
    assert first.states[0].remaining == 6
    assert second.states[0].remaining == 2
    assert third.retry_after == pytest.approx(2.0)  # 2 tokens missing at 1 token / s
    assert small.allowed
    assert small.states[0].remaining == 0


@pytest.mark.parametrize("kind", ["token_bucket", "sliding_window"])
async def test_cost_above_the_limit_is_never_admitted_and_charges_nothing(
    backend: Backend, kind: LimitKind
) -> None:
    spec = backend.spec("tpm", kind=kind, limit=10, period=10.0, cost=11)

    decision = await backend.acquire(spec)

    assert not decision.allowed
    assert decision.retry_after == math.inf
    assert decision.violated == spec
    assert await backend.remaining(spec) == 10


@pytest.mark.parametrize("kind", ["token_bucket", "sliding_window"])
async def test_cost_zero_peeks_without_charging(backend: Backend, kind: LimitKind) -> None:
    spec = backend.spec("k", kind=kind, limit=3, period=30.0)
    await backend.acquire(spec)

    peeks = [
        await backend.acquire(backend.spec("k", kind=kind, limit=3, period=30.0, cost=0))
        for _ in range(5)
    ]

    assert all(p.allowed for p in peeks)
    assert [p.states[0].remaining for p in peeks] == [2] * 5


# -- all or nothing --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["token_bucket", "sliding_window"])
async def test_a_rejected_multi_spec_call_charges_nothing(
    backend: Backend, kind: LimitKind
) -> None:
    roomy = backend.spec("rpm", kind=kind, limit=5, period=50.0)
    tight = backend.spec("tpm", kind=kind, limit=100, period=50.0, cost=60)

    first = await backend.acquire(roomy, tight)
    second = await backend.acquire(roomy, tight)

    assert first.allowed
    assert [s.remaining for s in first.states] == [4, 40]
    assert not second.allowed
    assert second.violated == tight
    assert [s.remaining for s in second.states] == [4, 40]  # the state before, uncharged
    assert await backend.remaining(roomy) == 4
    assert await backend.remaining(tight) == 40


async def test_the_violated_spec_is_the_one_forcing_the_longest_wait(backend: Backend) -> None:
    short = backend.spec("a", limit=1, period=10.0)
    long = backend.spec("b", limit=1, period=100.0)
    assert (await backend.acquire(short, long)).allowed

    decision = await backend.acquire(short, long)

    assert decision.violated == long
    assert decision.retry_after == pytest.approx(100.0)


async def test_mixed_kinds_in_one_call(backend: Backend) -> None:
    bucket = backend.spec("rpm", limit=2, period=20.0)
    window = backend.spec("rpw", kind="sliding_window", limit=3, period=30.0)

    results = [(await backend.acquire(bucket, window)).allowed for _ in range(3)]

    assert results == [True, True, False]
    assert await backend.remaining(window) == 1  # the rejected call took nothing from it


async def test_duplicate_keys_in_one_call_are_refused(backend: Backend) -> None:
    spec = backend.spec("rpm")
    with pytest.raises(ValueError, match="duplicate limit key"):
        await backend.acquire(spec, spec)


# -- refunds ---------------------------------------------------------------------------------


async def test_refund_gives_tokens_back_but_never_above_capacity(backend: Backend) -> None:
    spec = backend.spec("tpm", limit=10, period=10.0, cost=6)
    await backend.acquire(spec)

    await backend.limiter.refund(spec, 2, group=backend.group)
    after_partial = await backend.remaining(spec)
    await backend.limiter.refund(spec, 1_000, group=backend.group)
    after_huge = await backend.remaining(spec)
    admitted = [
        (await backend.acquire(backend.spec("tpm", limit=10, period=10.0))).allowed
        for _ in range(11)
    ]

    assert after_partial == 6
    assert after_huge == 10
    assert admitted.count(True) == 10


async def test_refund_of_an_untouched_bucket_is_a_no_op(backend: Backend) -> None:
    spec = backend.spec("tpm", limit=10, period=10.0)
    await backend.limiter.refund(spec, 5, group=backend.group)
    assert await backend.remaining(spec) == 10


async def test_refund_on_a_window_removes_the_newest_charges(backend: Backend) -> None:
    spec = backend.spec("tpw", kind="sliding_window", limit=10, period=30.0, cost=4)
    await backend.acquire(spec)  # t0: 4
    backend.clock.advance(10.0)
    await backend.acquire(spec)  # t10: 4

    await backend.limiter.refund(spec, 3, group=backend.group)  # t10 entry shrinks to 1
    assert await backend.remaining(spec) == 5
    backend.clock.advance(20.0)  # t30: the t0 entry expires, only the shrunk one is left
    assert await backend.remaining(spec) == 9

    await backend.limiter.refund(spec, 50, group=backend.group)
    decision = await backend.acquire(
        backend.spec("tpw", kind="sliding_window", limit=10, period=30.0, cost=0)
    )
    assert decision.states[0].remaining == 10
    assert decision.states[0].reset_seconds == 0.0


async def test_a_call_gives_back_its_unused_units_and_its_lease_at_once(backend: Backend) -> None:
    lim, g = backend.limiter, backend.group
    bucket = backend.spec("tpm", limit=10, period=10.0, cost=6)
    window = backend.spec("tpw", kind="sliding_window", limit=10, period=30.0, cost=4)
    await backend.acquire(bucket, window)
    await lim.acquire_lease("streams", limit=1, lease_id="a", ttl_seconds=30, group=g)

    await lim.give_back([(bucket, 5), (window, 3)], lease=("streams", "a"), group=g)

    assert await backend.remaining(bucket) == 9
    assert await backend.remaining(window) == 9
    assert (await lim.acquire_lease("streams", limit=1, lease_id="b", ttl_seconds=30, group=g)).allowed


async def test_giving_back_to_untouched_limits_or_an_unknown_lease_changes_nothing(backend: Backend) -> None:
    lim, g = backend.limiter, backend.group
    bucket = backend.spec("tpm", limit=10, period=10.0)
    await lim.acquire_lease("streams", limit=1, lease_id="held", ttl_seconds=30, group=g)

    await lim.give_back([], group=g)
    await lim.give_back([(bucket, 5)], lease=("streams", "never-held"), group=g)

    assert await backend.remaining(bucket) == 10
    assert not (await lim.acquire_lease("streams", limit=1, lease_id="b", ttl_seconds=30, group=g)).allowed


# -- sliding window --------------------------------------------------------------------------


async def test_sliding_window_entries_expire_exactly_one_period_later(backend: Backend) -> None:
    spec = backend.spec("rpw", kind="sliding_window", limit=3, period=30.0)
    assert (await backend.acquire(spec)).allowed  # t0
    backend.clock.advance(10.0)
    assert (await backend.acquire(spec)).allowed  # t10
    assert (await backend.acquire(spec)).allowed  # t10

    backend.clock.advance(19.9)  # t29.9: all three still count
    just_before = await backend.acquire(spec)
    backend.clock.advance(0.1)  # t30: the t0 entry has just expired
    at_boundary = await backend.acquire(spec)
    after = await backend.acquire(spec)

    assert not just_before.allowed
    assert just_before.retry_after == pytest.approx(0.1)
    assert at_boundary.allowed
    assert not after.allowed
    assert after.retry_after == pytest.approx(10.0)  # the t10 entries expire at t40
    assert after.states[0].reset_seconds == pytest.approx(30.0)  # newest entry is at t30


async def test_sliding_window_admits_at_most_limit_in_any_period(backend: Backend) -> None:
    spec = backend.spec("rpw", kind="sliding_window", limit=4, period=10.0)
    admitted_at: list[float] = []
    for step in range(60):  # one attempt every 0.5 s for 30 s
        if (await backend.acquire(spec)).allowed:
            admitted_at.append(step * 0.5)
        backend.clock.advance(0.5)

    # no 10 s span holds more than 4 admissions, unlike a fixed window at its boundary
    for start in admitted_at:
        assert sum(1 for t in admitted_at if start <= t < start + 10.0) <= 4
    # and capacity is reused as soon as it frees: 4 per 10 s exactly, every period
    assert admitted_at == [0.0, 0.5, 1.0, 1.5, 10.0, 10.5, 11.0, 11.5, 20.0, 20.5, 21.0, 21.5]


# -- leases ----------------------------------------------------------------------------------


async def test_leases_hold_at_most_limit_slots_until_released(backend: Backend) -> None:
    lim, g = backend.limiter, backend.group
    a = await lim.acquire_lease("streams", limit=2, lease_id="a", ttl_seconds=30, group=g)
    backend.clock.advance(5.0)
    b = await lim.acquire_lease("streams", limit=2, lease_id="b", ttl_seconds=30, group=g)
    c = await lim.acquire_lease("streams", limit=2, lease_id="c", ttl_seconds=30, group=g)
    await lim.release_lease("streams", "a", group=g)
    c_again = await lim.acquire_lease("streams", limit=2, lease_id="c", ttl_seconds=30, group=g)

    assert (a.allowed, b.allowed, c.allowed, c_again.allowed) == (True, True, False, True)
    assert b.states[0].remaining == 0
    assert b.states[0].spec.kind == "concurrency"
    assert c.violated is not None and c.violated.key == "streams"
    assert c.retry_after == pytest.approx(25.0)  # a expires 30 s after t0; now is t5


async def test_reacquiring_a_held_lease_renews_it_even_when_full(backend: Backend) -> None:
    lim, g = backend.limiter, backend.group
    await lim.acquire_lease("streams", limit=1, lease_id="a", ttl_seconds=10, group=g)
    backend.clock.advance(8.0)

    again = await lim.acquire_lease("streams", limit=1, lease_id="a", ttl_seconds=10, group=g)
    backend.clock.advance(8.0)  # past the first expiry, inside the renewed one
    other = await lim.acquire_lease("streams", limit=1, lease_id="b", ttl_seconds=10, group=g)

    assert again.allowed
    assert not other.allowed
    assert other.retry_after == pytest.approx(2.0)


async def test_an_expired_lease_frees_its_slot(backend: Backend) -> None:
    """A crashed holder never releases; its slot comes back at the lease's expiry."""
    lim, g = backend.limiter, backend.group
    await lim.acquire_lease("streams", limit=1, lease_id="crashed", ttl_seconds=15, group=g)
    backend.clock.advance(14.9)
    blocked = await lim.acquire_lease("streams", limit=1, lease_id="b", ttl_seconds=15, group=g)
    backend.clock.advance(0.1)
    freed = await lim.acquire_lease("streams", limit=1, lease_id="b", ttl_seconds=15, group=g)

    assert not blocked.allowed
    assert freed.allowed
    assert not await lim.renew_lease("streams", "crashed", ttl_seconds=15, group=g)


async def test_renew_extends_a_lease_and_reports_a_lost_one(backend: Backend) -> None:
    lim, g = backend.limiter, backend.group
    await lim.acquire_lease("streams", limit=1, lease_id="a", ttl_seconds=10, group=g)
    backend.clock.advance(9.0)
    assert await lim.renew_lease("streams", "a", ttl_seconds=10, group=g)
    backend.clock.advance(9.0)  # t18: alive only thanks to the renewal
    assert not (
        await lim.acquire_lease("streams", limit=1, lease_id="b", ttl_seconds=10, group=g)
    ).allowed
    await lim.release_lease("streams", "a", group=g)
    assert not await lim.renew_lease("streams", "a", ttl_seconds=10, group=g)
    await lim.release_lease("streams", "never-held", group=g)  # a no-op, not an error


async def test_a_call_takes_its_rates_and_its_lease_together_or_none_of_them(backend: Backend) -> None:
    lim, g = backend.limiter, backend.group
    rpm = backend.spec("rpm", limit=5)
    streams = lease_spec("streams", limit=1, ttl_seconds=30)
    first = await lim.acquire([rpm, streams], group=g, lease_id="a")
    full = await lim.acquire([rpm, streams], group=g, lease_id="b")

    assert first.allowed and first.states[1].remaining == 0
    assert not full.allowed
    assert full.violated == streams
    assert await backend.remaining(rpm) == 4  # the refused call took no request
    await lim.release_lease("streams", "a", group=g)
    assert (await lim.acquire([rpm, streams], group=g, lease_id="b")).allowed


async def test_a_call_refused_by_a_rate_takes_no_slot_and_the_rate_is_named(backend: Backend) -> None:
    lim, g = backend.limiter, backend.group
    rpm = backend.spec("rpm", limit=1, period=10.0)
    streams = lease_spec("streams", limit=1, ttl_seconds=30)
    await lim.acquire([rpm, streams], group=g, lease_id="a")
    both_refuse = await lim.acquire([rpm, streams], group=g, lease_id="b")
    await lim.release_lease("streams", "a", group=g)
    rate_refuses = await lim.acquire([rpm, streams], group=g, lease_id="c")

    assert both_refuse.violated == rpm  # the slot may free any moment; the rate says when
    assert both_refuse.retry_after == pytest.approx(10.0)
    assert not rate_refuses.allowed and rate_refuses.violated == rpm
    assert rate_refuses.states[1].remaining == 1  # no slot taken for "c"
    assert (await lim.acquire_lease("streams", limit=1, lease_id="d", ttl_seconds=30, group=g)).allowed


async def test_a_lease_taken_with_rates_renews_like_acquire_lease(backend: Backend) -> None:
    lim, g = backend.limiter, backend.group
    streams = lease_spec("streams", limit=1, ttl_seconds=10)
    await lim.acquire([backend.spec("rpm"), streams], group=g, lease_id="a")
    backend.clock.advance(8.0)
    again = await lim.acquire([backend.spec("rpm"), streams], group=g, lease_id="a")
    backend.clock.advance(8.0)  # past the first expiry, inside the renewed one

    assert again.allowed
    assert await lim.renew_lease("streams", "a", ttl_seconds=10, group=g)


# -- blocks ----------------------------------------------------------------------------------


async def test_block_rejects_the_key_for_its_duration(backend: Backend) -> None:
    spec = backend.spec("upstream", limit=100, period=60.0)
    other = backend.spec("other", limit=100, period=60.0)
    await backend.limiter.block("upstream", 5.0, group=backend.group)

    blocked = await backend.acquire(spec)
    both = await backend.acquire(other, spec)
    other_alone = await backend.acquire(other)
    backend.clock.advance(4.5)
    still = await backend.acquire(spec)
    backend.clock.advance(0.5)
    after = await backend.acquire(spec)

    assert not blocked.allowed
    assert blocked.retry_after == pytest.approx(5.0)
    assert blocked.violated == spec
    assert blocked.states[0].remaining == 0
    assert not both.allowed and both.violated == spec
    assert other_alone.allowed
    assert other_alone.states[0].remaining == 99  # the blocked combined call charged nothing
    assert still.retry_after == pytest.approx(0.5)
    assert after.allowed
    assert after.states[0].remaining == 99


async def test_a_shorter_block_never_shortens_a_longer_one(backend: Backend) -> None:
    spec = backend.spec("upstream", limit=100, period=60.0)
    await backend.limiter.block("upstream", 10.0, group=backend.group)
    await backend.limiter.block("upstream", 1.0, group=backend.group)

    decision = await backend.acquire(spec)

    assert decision.retry_after == pytest.approx(10.0)


async def test_block_applies_to_leases_on_that_key(backend: Backend) -> None:
    await backend.limiter.block("streams", 3.0, group=backend.group)
    decision = await backend.limiter.acquire_lease(
        "streams", limit=5, lease_id="a", ttl_seconds=30, group=backend.group
    )
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(3.0)


# -- isolation -------------------------------------------------------------------------------


async def test_a_noisy_key_does_not_change_another_keys_decisions(backend: Backend) -> None:
    noisy = backend.spec("noisy", limit=5, period=50.0)
    quiet = backend.spec("quiet", limit=5, period=50.0)
    for _ in range(50):
        await backend.acquire(noisy)

    decisions = [await backend.acquire(quiet) for _ in range(6)]
    elsewhere = await backend.acquire(noisy, group=backend.group + "x")

    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.states[0].remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    assert elsewhere.allowed  # the same key name in another group is another limit
    assert not (await backend.acquire(noisy)).allowed


@pytest.mark.parametrize("group", ["", "{tag}", "a}b"], ids=["empty", "braces", "closing-brace"])
async def test_groups_that_would_break_the_hash_tag_are_refused(
    backend: Backend, group: str
) -> None:
    with pytest.raises(ValueError, match="hash tag"):
        await backend.limiter.acquire([LimitSpec("k", "token_bucket", 1, 1.0)], group=group)
