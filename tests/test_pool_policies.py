"""Budget and on_exhausted policies, oversize requests, growth, trim, stats."""

from __future__ import annotations

import json
import sys

import pytest

import bufpool
from bufpool import BufferPool, PoolExhausted, RequestTooLarge


def small_pool(policy: str, **kw: object) -> BufferPool:
    # 2 slots of 1 KiB, 1 of 4 KiB; budget exactly that.
    return BufferPool(
        classes=(1024, 4096),
        initial_slots={1024: 2, 4096: 1},
        max_bytes=2 * 1024 + 4096,
        on_exhausted=policy,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def test_raise_policy_names_budget_and_class() -> None:
    pool = small_pool("raise")
    a, b = pool.acquire(1000), pool.acquire(1000)
    with pytest.raises(PoolExhausted, match=r"1000 bytes in the 1024-byte class.*max_bytes=6144"):
        pool.acquire(1000)
    # Nothing already leased is disturbed.
    a.view[:] = b"a" * 1000
    assert a.tobytes() == b"a" * 1000
    a.release()
    b.release()
    assert pool.stats().in_use == 0


def test_spill_policy_uses_next_larger_class_then_raises() -> None:
    pool = small_pool("spill")
    leases = [pool.acquire(1000), pool.acquire(1000)]
    spilled = pool.acquire(1000)
    assert spilled.capacity == 4096 and len(spilled) == 1000
    st = pool.stats()
    assert st.spills == 1 and st.tiers[0].spills == 1 and st.tiers[0].misses == 1
    with pytest.raises(PoolExhausted):
        pool.acquire(1000)
    for lease in [*leases, spilled]:
        lease.release()
    assert pool.stats().tiers[1].free == 1


def test_heap_policy_serves_unpooled_and_counts() -> None:
    pool = small_pool("heap")
    leases = [pool.acquire(1000) for _ in range(3)]
    assert [x.pooled for x in leases] == [True, True, False]
    st = pool.stats()
    assert st.heap_fallbacks == 1 and st.heap_in_use == 1 and st.in_use == 2
    for lease in leases:
        lease.release()
    assert pool.stats().heap_in_use == 0


def test_default_policy_serves_the_heap_within_max_heap_bytes_then_raises() -> None:
    # The default budget of heap fallbacks is max_bytes again: a loop of acquires past the
    # slot budget stops at twice max_bytes instead of growing without bound.
    pool = BufferPool(classes=(4096,), initial_slots=0, max_bytes=4 * 4096)
    assert pool.on_exhausted == "heap" and pool.max_heap_bytes == 4 * 4096
    leases = [pool.acquire(4096) for _ in range(8)]
    assert [x.pooled for x in leases] == [True] * 4 + [False] * 4
    with pytest.raises(PoolExhausted, match=r"max_bytes=16384.*max_heap_bytes=16384 \(16384"):
        pool.acquire(4096)
    st = pool.stats()
    assert (st.in_use, st.heap_in_use, st.heap_bytes, st.heap_fallbacks) == (4, 4, 16384, 4)
    # A released heap lease whose view lives on still counts: that memory is still alive.
    kept = leases[4].view
    for lease in leases:
        lease.release()
    assert pool.stats().heap_bytes == 4096
    with pytest.raises(PoolExhausted):
        BufferPool(classes=(64,), initial_slots=0, max_bytes=0).acquire(10)
    del kept
    st = pool.stats()
    assert st.heap_bytes == 0 and st.heap_in_use == 0 and st.in_use == 0


def test_heap_budget_bounds_oversize_requests_too() -> None:
    pool = BufferPool(classes=(64,), initial_slots=0, max_bytes=0, max_heap_bytes=1000)
    with pytest.raises(RequestTooLarge, match=r"1001 bytes exceeds .*max_heap_bytes=1000"):
        pool.acquire(1001)  # can never fit
    a = pool.acquire(600)
    with pytest.raises(PoolExhausted, match=r"600-byte heap lease .*max_heap_bytes=1000 \(600"):
        pool.acquire(600)  # fits once ``a`` is gone
    a.release()
    pool.acquire(600).release()
    st = pool.stats()
    assert st.oversize == 4 and st.heap_fallbacks == 2 and st.heap_bytes == 0


def test_unbounded_heap_on_request() -> None:
    pool = BufferPool(classes=(64,), initial_slots=0, max_bytes=0, max_heap_bytes=sys.maxsize)
    leases = [pool.acquire(100_000) for _ in range(3)]
    assert pool.stats().heap_bytes == 300_000
    for lease in leases:
        lease.release()


@pytest.mark.parametrize("bad", [-1, 1.5, "1"])
def test_max_heap_bytes_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="max_heap_bytes must be a non-negative int or None"):
        BufferPool(max_heap_bytes=bad)  # type: ignore[arg-type]


def test_oversize_heap_is_counted() -> None:
    pool = BufferPool()
    with pool.acquire(100_000) as lease:
        assert not lease.pooled and len(lease) == 100_000
    st = pool.stats()
    assert st.oversize == 1 and st.heap_fallbacks == 1


def test_oversize_raise_points_to_acquire_chain() -> None:
    pool = BufferPool(on_exhausted="raise")
    msg = r"100000 bytes exceeds the largest size class \(65536"
    with pytest.raises(RequestTooLarge, match=msg):
        pool.acquire(100_000)
    assert isinstance(RequestTooLarge("x"), ValueError)
    with pool.acquire_chain(100_000) as chain:
        assert chain.pooled


def test_grows_in_chunks_within_budget() -> None:
    pool = BufferPool(classes=(1024,), initial_slots=0, max_bytes=10 * 1024)
    leases = [pool.acquire(1024) for _ in range(10)]
    st = pool.stats()
    assert st.reserved_bytes == 10 * 1024 and st.tiers[0].slots == 10
    assert all(x.pooled for x in leases)
    extra = pool.acquire(1024)  # budget spent: heap (default policy)
    assert not extra.pooled
    for x in [*leases, extra]:
        x.release()


def test_trim_gives_back_idle_slots_above_initial() -> None:
    pool = BufferPool(classes=(4096,), initial_slots=2, max_bytes=1 << 20)
    leases = [pool.acquire(4096) for _ in range(40)]
    held = leases.pop()
    for x in leases:
        x.release()
    before = pool.stats()
    freed = pool.trim()
    after = pool.stats()
    assert freed == (before.tiers[0].slots - 2) * 4096
    assert after.reserved_bytes == before.reserved_bytes - freed
    assert after.tiers[0].slots == 2 and after.trimmed_bytes == freed
    # The held lease is untouched.
    held.view[:4] = b"keep"
    assert held.tobytes()[:4] == b"keep"
    held.release()
    assert pool.trim(keep_initial=False) == 2 * 4096
    assert pool.stats().reserved_bytes == 0
    with pool.acquire(10) as again:  # grows again after a full trim
        assert again.pooled


def test_stats_counts_hits_misses_high_water_and_waste() -> None:
    pool = BufferPool(classes=(100, 1000), initial_slots=1, max_bytes=10_000)
    a = pool.acquire(50)  # hit in class 100
    b = pool.acquire(50)  # miss: grows
    c = pool.acquire(500)  # hit in class 1000
    st = pool.stats()
    assert (st.hits, st.misses) == (2, 1)
    assert st.hit_rate == pytest.approx(2 / 3)
    assert st.tiers[0].high_water == 2 and st.tiers[0].in_use == 2
    # leased capacity: 100 + 100 + 1000; requested: 50 + 50 + 500
    assert st.waste_ratio == pytest.approx((1200 - 600) / 1200)
    for x in (a, b, c):
        x.release()
    st = pool.stats()
    assert st.in_use == 0 and st.tiers[0].high_water == 2


def test_stats_export_as_dict_json_and_prometheus() -> None:
    pool = BufferPool()
    with pool.acquire(200):
        st = pool.stats()
    d = st.as_dict()
    assert json.loads(json.dumps(d))["in_use"] == 1
    assert d["tiers"][1]["size"] == 256 and d["tiers"][1]["in_use"] == 1
    text = st.prometheus()
    assert "# TYPE bufpool_in_use gauge\nbufpool_in_use 1\n" in text
    assert 'bufpool_tier_in_use{size="256",slot_size="256"} 1' in text
    assert "bufpool_hits_total 1" in text


def test_tls_record_mix_waste_at_most_15_percent() -> None:
    # Full records of TLS 1.2 and 1.3 (header included) plus small handshake/alert records:
    # alerts (2-byte body), ChangeCipherSpec (1 byte) and 100-290-byte handshake messages.
    # (The application-data mix with many 1-4 KiB records is tests/test_tls_waste.py's: the
    # six default classes do not meet 15% there; the TLS layer's record classes do.)
    pool = BufferPool()
    full = [bufpool.TLS12_MAX_RECORD] * 40 + [bufpool.TLS13_MAX_RECORD] * 40 + [16384 + 5] * 20
    small = [5 + 2] * 20 + [5 + 1] * 20 + [5 + n for n in range(100, 300, 10)]
    sizes = full + small
    leases = [pool.acquire(n) for n in sizes]
    assert all(x.capacity == 18437 for x in leases[: len(full)])
    assert all(x.capacity <= 1024 for x in leases[len(full) :])  # small classes, no spill
    assert pool.stats().waste_ratio <= 0.15
    for x in leases:
        x.release()
    plain16k = BufferPool(headroom={})
    leases = [plain16k.acquire(n) for n in sizes]
    assert plain16k.stats().waste_ratio > 0.70  # what a plain 16 KiB class would waste
    for x in leases:
        x.release()
