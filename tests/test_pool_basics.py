"""BufferPool: routing, lease views, retain/release, chains, errors on nonsense input."""

from __future__ import annotations

import sys

import pytest

import bufpool
from bufpool import BufferPool, LeaseReleasedError


@pytest.mark.parametrize(
    ("size", "cls"),
    [
        (0, 64), (1, 64), (64, 64), (65, 256), (256, 256), (1000, 1024), (1500, 4096),
        (4096, 4096), (4097, 16384), (16384, 16384), (18437, 16384), (18438, 65536),
        (65536, 65536),
    ],
)
def test_acquire_routes_to_smallest_class_that_fits(size: int, cls: int) -> None:
    pool = BufferPool()
    with pool.acquire(size) as lease:
        assert lease.pooled
        assert pool.class_for(size) == cls
        assert lease.capacity == pool.slot_sizes[pool.classes.index(cls)]
    tier = next(t for t in pool.stats().tiers if t.size == cls)
    assert tier.hits == 1


def test_view_is_writable_exact_size_bytes() -> None:
    pool = BufferPool()
    lease = pool.acquire(1500)
    view = lease.view
    assert len(lease) == len(view) == 1500
    assert view.format == "B" and view.itemsize == 1 and not view.readonly
    view[:] = b"a" * 1500
    assert lease.tobytes() == b"a" * 1500
    del view
    lease.release()


def test_default_classes_and_tls_headroom() -> None:
    pool = BufferPool()
    assert pool.classes == (64, 256, 1024, 4096, 16384, 65536)
    assert pool.slot_sizes[4] == bufpool.TLS12_MAX_RECORD == 18437


def test_context_manager_releases_on_exit_and_on_error() -> None:
    pool = BufferPool()
    with pool.acquire(10) as lease:
        assert pool.stats().in_use == 1
    assert lease.released and pool.stats().in_use == 0
    with pytest.raises(RuntimeError), pool.acquire(10) as lease2:
        raise RuntimeError("boom")
    assert lease2.released and pool.stats().in_use == 0


def test_retain_release_refcount() -> None:
    pool = BufferPool()
    lease = pool.acquire(100)
    assert lease.retain() is lease
    assert lease.refcount == 2
    lease.release()
    assert lease.refcount == 1 and pool.stats().in_use == 1
    lease.release()
    assert lease.refcount == 0 and pool.stats().in_use == 0


def test_double_release_names_the_lease_and_refcount() -> None:
    pool = BufferPool()
    lease = pool.acquire(100)
    lease.release()
    msg = r"100 B in 256-byte class, refcount 0.*refcount 0"
    with pytest.raises(LeaseReleasedError, match=msg):
        lease.release()
    with pytest.raises(LeaseReleasedError, match="retain"):
        lease.retain()


def test_view_after_release_raises() -> None:
    pool = BufferPool()
    lease = pool.acquire(100)
    lease.release()
    with pytest.raises(LeaseReleasedError, match=r"\.view used after the lease was released"):
        _ = lease.view
    assert lease.capacity == 0


def test_truncate_shrinks_visible_length() -> None:
    pool = BufferPool()
    with pool.acquire(1000) as lease:
        lease.view[:] = bytes(range(250)) * 4
        lease.truncate(10)
        assert len(lease) == 10 and lease.tobytes() == bytes(range(10))
        with pytest.raises(ValueError, match=r"0\.\.10"):
            lease.truncate(11)


def test_copy_from_fills_the_start_without_a_view() -> None:
    """``copy_from`` copies any contiguous bytes-like object to the lease's start and makes
    no view (nothing keeps the slot exported); too much data or a released lease raise,
    leaving the bytes as they were."""
    pool = BufferPool()
    lease = pool.acquire(1000)
    data = bytes(range(256)) * 3
    assert lease.copy_from(data) == 768
    assert lease._view is None  # no view was made
    assert lease.copy_from(memoryview(bytearray(b"xyz"))[1:]) == 2  # a slice of another buffer
    assert lease.copy_from(memoryview(data).cast("H")[:4]) == 8  # any format, counted in bytes
    assert lease.tobytes()[:768] == data[:8] + data[8:768]
    assert lease.copy_from(lease.view[100:110]) == 10  # its own bytes, overlapping
    assert lease.tobytes()[:10] == data[100:110]
    with pytest.raises(ValueError, match="1001 bytes do not fit the lease's 1000 bytes"):
        lease.copy_from(bytes(1001))
    assert lease.tobytes()[:10] == data[100:110] and lease.tobytes()[10:768] == data[10:768]
    lease.release()
    with pytest.raises(LeaseReleasedError, match=r"copy_from\(\) after the lease was released"):
        lease.copy_from(b"x")
    assert pool.stats().in_use == 0


@pytest.mark.parametrize("bad", [-1, -100])
def test_negative_size_is_value_error(bad: int) -> None:
    pool = BufferPool()
    with pytest.raises(ValueError, match=f"size must be >= 0 bytes, got {bad}"):
        pool.acquire(bad)
    with pytest.raises(ValueError, match="size must be >= 0"):
        pool.acquire_chain(bad)


@pytest.mark.parametrize("bad", [1.5, "10", None, True])
def test_non_int_size_is_type_error(bad: object) -> None:
    pool = BufferPool()
    with pytest.raises(TypeError, match="size must be an int number of bytes"):
        pool.acquire(bad)  # type: ignore[arg-type]


class MyInt(int):
    pass


@pytest.mark.parametrize("bad", [MyInt(5), MyInt(0), MyInt(-1)])
def test_int_subclass_size_is_type_error_naming_the_type(bad: int) -> None:
    # Only a plain int is a size (the compiled core takes that fast); the message said
    # "size must be >= 0 bytes, got 5" for MyInt(5).
    pool = BufferPool()
    msg = r"size must be a plain int number of bytes, got MyInt \(an int subclass: pass int"
    with pytest.raises(TypeError, match=msg):
        pool.acquire(bad)
    with pytest.raises(TypeError, match=msg):
        pool.acquire_chain(bad)


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        ({"classes": (64, 64)}, ValueError, "strictly increasing, got 64 then 64"),
        ({"classes": (256, 64)}, ValueError, "strictly increasing"),
        ({"classes": ()}, ValueError, "at least one"),
        ({"classes": (0, 64)}, ValueError, "positive"),
        ({"classes": (64.0,)}, TypeError, "must be int"),
        ({"on_exhausted": "wait"}, ValueError, "on_exhausted must be one of"),
        ({"leak_detection": "loud"}, ValueError, "leak_detection must be one of"),
        ({"max_bytes": -1}, ValueError, "max_bytes"),
        ({"initial_slots": -1}, ValueError, "initial_slots"),
        ({"classes": (64, 128), "headroom": {64: 100}}, ValueError, "headroom makes class 64"),
    ],
)
def test_nonsense_configuration_is_rejected(kwargs: dict[str, object], exc: type, msg: str) -> None:
    with pytest.raises(exc, match=msg):
        BufferPool(**kwargs)  # type: ignore[arg-type]


def test_chain_covers_any_size_with_largest_class_slots() -> None:
    pool = BufferPool()
    chain = pool.acquire_chain(300_000)
    sizes = [len(v) for v in chain.views()]
    assert sizes == [65536] * 4 + [300_000 - 4 * 65536]
    assert len(chain) == 300_000 and chain.pooled
    assert all(lease.capacity == 65536 for lease in chain.leases)
    for i, v in enumerate(chain.views()):
        v[:] = bytes([i]) * len(v)
    assert chain.tobytes() == b"".join(bytes([i]) * n for i, n in enumerate(sizes))
    chain.release()
    assert pool.stats().in_use == 0
    with pytest.raises(LeaseReleasedError, match="released twice"):
        chain.release()


def test_chain_zero_and_context_manager() -> None:
    pool = BufferPool()
    with pool.acquire_chain(0) as chain:
        assert len(chain) == 0 and chain.views() == []
    with pool.acquire_chain(65537) as chain2:
        assert [len(v) for v in chain2] == [65536, 1]
    assert pool.stats().in_use == 0


def test_chain_failure_releases_what_it_took() -> None:
    pool = BufferPool(initial_slots=0, max_bytes=3 * 65536, on_exhausted="raise")
    held = pool.acquire(65536)
    with pytest.raises(bufpool.PoolExhausted) as info:
        pool.acquire_chain(3 * 65536)  # possible in the budget, not while ``held`` lives
    assert not isinstance(info.value, bufpool.ChainTooLarge)
    assert pool.stats().in_use == 1
    held.release()
    pool.acquire_chain(3 * 65536).release()


@pytest.mark.parametrize("policy", ["raise", "spill", "heap"])
def test_chain_larger_than_the_whole_budget_fails_at_once_holding_nothing(policy: str) -> None:
    pool = BufferPool(
        initial_slots=0, max_bytes=2 * 65536, max_heap_bytes=65536, on_exhausted=policy  # type: ignore[arg-type]
    )
    # 2 x 64 KiB + 1 byte: the last piece needs a 64-byte slot beyond the budget.
    size = 2 * 65536 + 1 if policy != "heap" else 3 * 65536 + 1
    with pytest.raises(bufpool.ChainTooLarge, match=f"a {size}-byte chain .*max_bytes=131072"):
        pool.acquire_chain(size)
    st = pool.stats()
    assert st.in_use == 0 and st.heap_in_use == 0 and st.misses == 0  # nothing was tried
    assert issubclass(bufpool.ChainTooLarge, bufpool.RequestTooLarge)
    assert issubclass(bufpool.ChainTooLarge, bufpool.PoolExhausted)  # as it failed before
    # The largest chain that fits is still served.
    pool.acquire_chain(size - 1 if policy != "heap" else 2 * 65536).release()


def test_public_names_exported() -> None:
    for name in bufpool.__all__:
        assert hasattr(bufpool, name), name
    assert issubclass(bufpool.PoolExhausted, bufpool.BufPoolError)
    assert issubclass(bufpool.LeaseReleasedError, bufpool.BufPoolError)
    assert issubclass(bufpool.RequestTooLarge, bufpool.BufPoolError)
    assert issubclass(bufpool.BufferFull, bufpool.BufPoolError)
    assert issubclass(bufpool.LeakWarning, ResourceWarning)


def test_failed_heap_fallback_counts_no_phantom_lease() -> None:
    # Every request goes to the heap, which has no bound here.
    pool = BufferPool(classes=(64,), initial_slots=0, max_bytes=0, max_heap_bytes=sys.maxsize)
    with pytest.raises(MemoryError):
        pool.acquire(2**62)  # oversize, served from the heap: the allocation fails
    st = pool.stats()
    assert st.heap_in_use == 0 and st.heap_fallbacks == 0 and st.in_use == 0
    assert st.oversize == 1  # the request is still counted


def test_size_is_positional_only_on_both_cores() -> None:
    # The compiled acquire/truncate take exactly one positional argument (METH_O): keywords
    # worked only in pure Python.
    pool = BufferPool(classes=(64,), initial_slots=1, max_bytes=64, on_exhausted="raise")
    with pytest.raises(TypeError):
        pool.acquire(size=10)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        pool.acquire_chain(size=10)  # type: ignore[call-arg]
    lease = pool.acquire(10)
    with pytest.raises(TypeError):
        lease.truncate(size=3)  # type: ignore[call-arg]
    assert len(lease) == 10 and pool.stats().in_use == 1
    lease.truncate(3)
    assert len(lease) == 3
    lease.release()
    assert pool.stats().in_use == 0
