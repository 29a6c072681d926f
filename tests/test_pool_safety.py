"""The central promise: a slot never reaches a new owner while any view of it is alive."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import random
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import bufpool
from bufpool import BufferPool, Lease

ROOT = Path(__file__).resolve().parent.parent


def one_slot_pool(**kw: object) -> BufferPool:
    """One 1 KiB slot and no room to grow, so reuse is immediate if allowed."""
    return BufferPool(classes=(1024,), initial_slots=1, max_bytes=1024, **kw)  # type: ignore[arg-type]


def test_released_slot_is_reused_when_no_view_survives() -> None:
    pool = one_slot_pool()
    first = pool.acquire(100)
    first.release()
    second = pool.acquire(100)
    assert second.pooled  # same single slot came back
    second.release()
    assert pool.stats().quarantined == 0


@pytest.mark.parametrize("keep", ["view", "slice", "slice_of_slice", "obj", "cast", "exported"])
def test_live_view_keeps_slot_quarantined_with_old_bytes(keep: str) -> None:
    pool = one_slot_pool()
    lease = pool.acquire(100)
    lease.view[:] = b"A" * 100
    held: object
    if keep == "view":
        held = lease.view
    elif keep == "slice":
        held = lease.view[10:20]
    elif keep == "slice_of_slice":
        tmp = lease.view[10:90]
        held = tmp[5:10]
        del tmp
    elif keep == "obj":
        held = lease.view.obj  # the slot's bytearray itself
    elif keep == "cast":
        held = lease.view.cast("c")
    else:  # a buffer export taken by another object, as a transport or C library would
        held = memoryview(lease.view).toreadonly()
    lease.release()
    assert pool.stats().quarantined == 1
    other = pool.acquire(100)
    assert not other.pooled  # the only slot is quarantined: the heap served instead
    other.view[:] = b"Z" * 100
    # The old view still shows the old owner's bytes, never the new owner's.
    data = bytes(held)  # type: ignore[call-overload]
    assert set(data) <= {ord("A"), 0} and data
    other.release()
    del held
    assert pool.reclaim() == 1
    st = pool.stats()
    assert st.quarantined == 0 and st.tiers[0].free == 1


@pytest.mark.parametrize("keep", ["view", "slice", "exported", "leaked"])
def test_stats_see_the_slot_free_as_soon_as_its_last_view_dies_without_reclaim(
    keep: str,
) -> None:
    # The echo example printed "quarantined": 15 at shutdown with no connection left: stats
    # counted slots whose views had died until someone called reclaim().
    pool = one_slot_pool()
    lease = pool.acquire(100)
    held: memoryview
    if keep in ("view", "leaked"):
        held = lease.view
    elif keep == "slice":
        held = lease.view[3:9]
    else:
        held = memoryview(lease.view).toreadonly()
    if keep == "leaked":
        del lease
        gc.collect()
        with pytest.warns(bufpool.LeakWarning, match="100-byte lease"):
            st = pool.stats()
    else:
        lease.release()
        del lease
        st = pool.stats()
    assert (st.quarantined, st.tiers[0].free, st.in_use) == (1, 0, 0)
    del held  # no reclaim(), no release(), no miss: only the next snapshot
    st = pool.stats()
    assert (st.quarantined, st.tiers[0].quarantined, st.tiers[0].free) == (0, 0, 1)
    assert st.tiers[0].slots == 1 and st.leaked == (1 if keep == "leaked" else 0)


def test_quarantined_slot_is_reclaimed_on_miss_without_explicit_call() -> None:
    pool = one_slot_pool(on_exhausted="raise")
    lease = pool.acquire(100)
    v = lease.view
    lease.release()
    del v
    again = pool.acquire(100)  # miss path rescans quarantine
    assert again.pooled
    again.release()


def test_view_used_after_release_is_not_aliased_by_next_owner() -> None:
    pool = one_slot_pool()
    lease = pool.acquire(64)
    stale = lease.view
    lease.release()
    new = pool.acquire(64)
    new.view[:] = b"N" * 64
    stale[:] = b"S" * 64  # writing through the stale view must not reach the new owner
    assert new.tobytes() == b"N" * 64
    new.release()
    del stale
    pool.reclaim()


def test_scrub_zeroes_bytes_before_next_owner() -> None:
    pool = one_slot_pool(scrub=True)
    with pool.acquire(1024) as lease:
        lease.view[:] = b"\xff" * 1024
    with pool.acquire(1024) as lease:
        assert lease.tobytes() == bytes(1024)
    # Also after quarantine.
    lease = pool.acquire(1024)
    lease.view[:] = b"\xee" * 1024
    held = lease.view[:1]
    lease.release()
    del held
    with pool.acquire(1024) as lease:
        assert lease.pooled and lease.tobytes() == bytes(1024)


def test_without_scrub_old_bytes_remain_visible() -> None:
    # The contrast that makes the scrub test meaningful.
    pool = one_slot_pool()
    with pool.acquire(16) as lease:
        lease.view[:] = b"\xff" * 16
    with pool.acquire(16) as lease:
        assert lease.tobytes() == b"\xff" * 16


def test_threads_never_share_a_slot() -> None:
    pool = BufferPool(classes=(64, 1024), initial_slots=4, max_bytes=64 * 1024)
    errors: list[str] = []
    owners: dict[int, int] = {}
    owners_lock = threading.Lock()
    start = threading.Barrier(4)

    def worker(tid: int) -> None:
        rnd = random.Random(tid)
        start.wait()
        for i in range(3000):
            lease = pool.acquire(rnd.choice((10, 64, 500, 1024)))
            if not lease.pooled:
                lease.release()
                continue
            slot = id(lease.view.obj)
            with owners_lock:
                if slot in owners:
                    errors.append(f"slot {slot:#x} owned by {owners[slot]} and {tid}")
                owners[slot] = tid
            stamp = bytes([tid]) * len(lease)
            lease.view[:] = stamp
            if i % 3 == 0:
                lease.retain()
                lease.release()
            if lease.tobytes() != stamp:
                errors.append(f"thread {tid}: bytes changed under its lease")
            with owners_lock:
                del owners[slot]
            lease.release()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    st = pool.stats()
    assert st.in_use == 0 and st.heap_in_use == 0 and st.quarantined == 0


def test_concurrent_release_of_shared_lease_returns_slot_once() -> None:
    pool = BufferPool(classes=(64,), initial_slots=1, max_bytes=64)
    for _ in range(200):
        lease = pool.acquire(64)
        for _ in range(7):
            lease.retain()
        go = threading.Barrier(8)

        def rel(lease: Lease = lease, go: threading.Barrier = go) -> None:
            go.wait()
            lease.release()

        ts = [threading.Thread(target=rel) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert lease.refcount == 0
        st = pool.stats()
        assert st.tiers[0].free == 1 and st.in_use == 0
    gc.collect()



def run_isolated(code: str) -> str:
    """Run ``code`` in a fresh interpreter on the active implementation; a deadlock there
    fails this test after a timeout instead of hanging the whole run on a stuck pool lock."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUFPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if bufpool.IMPLEMENTATION == "python":
        env["BUFPOOL_NO_EXTENSIONS"] = "1"
    try:
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: a release waited for the pool lock its own thread holds")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_release_inside_a_locked_section_of_the_same_thread_is_deferred_not_deadlocked() -> None:
    # What a __del__ or weakref.finalize that releases a lease does when the GC runs it in the
    # middle of one of the pool's own locked sections (any allocation there can start the GC).
    out = run_isolated(
        """
        import bufpool
        pool = bufpool.BufferPool(classes=(64,), initial_slots=2, max_bytes=128)
        lease = pool.acquire(10)
        with pool._lock:
            lease.release()  # must not wait for the lock this thread holds
            print("in section", pool._tiers[0].in_use)  # deferred: state not touched yet
        st = pool.stats()  # does the deferred release
        print("after", st.in_use, st.tiers[0].free)
        try:
            lease.release()
        except bufpool.LeaseReleasedError:
            print("released once")
        """
    )
    assert out.split("\n")[:3] == ["in section 1", "after 0 2", "released once"]


def test_finalizer_releases_during_gc_inside_pool_sections() -> None:
    # The real thing: owners in cycles, collected by a GC that runs inside stats()'s section.
    out = run_isolated(
        """
        import gc, warnings
        import bufpool
        warnings.simplefilter("error")
        pool = bufpool.BufferPool(classes=(64,), initial_slots=64, max_bytes=64 * 64)

        class Owner:
            def __init__(self, lease):
                self.lease, self.me = lease, self

            def __del__(self):
                self.lease.release()

        gc.disable()
        for _ in range(64):
            Owner(pool.acquire(10))
        gc.set_threshold(1)
        gc.enable()
        for _ in range(20):
            pool.stats()
        gc.set_threshold(700)
        gc.collect()
        st = pool.stats()
        print(st.in_use, st.leaked, st.tiers[0].free)
        """
    )
    assert out.split() == ["0", "0", "64"]


@pytest.mark.parametrize("policy", ["raise", "heap", "spill"])
def test_miss_uses_the_slot_its_drain_of_deferred_releases_just_freed(policy: str) -> None:
    pool = BufferPool(classes=(1024,), initial_slots=1, max_bytes=1024, on_exhausted=policy)
    first = pool.acquire(10)
    with pool._lock:
        first.release()  # deferred, as from a finalizer run inside a locked section
    again = pool.acquire(10)  # a miss: drains the deferred release, then takes its slot
    assert again.pooled  # was PoolExhausted ("raise"/"spill") or a heap lease ("heap")
    st = pool.stats()
    assert st.heap_fallbacks == 0 and st.in_use == 1 and st.tiers[0].hits == 2
    again.release()


@pytest.mark.parametrize(
    "how",
    [
        copy.copy,
        copy.deepcopy,
        pickle.dumps,
        lambda x: pickle.dumps(x, 0),
        lambda x: x.__reduce__(),
    ],
    ids=["copy", "deepcopy", "pickle", "pickle-protocol-0", "reduce"],
)
def test_a_lease_cannot_be_copied_or_pickled(how: Callable[[Lease], object]) -> None:
    # A copy was a second owner the pool never counted: releasing both put one slot on the
    # free list twice (in_use -1, later two owners of one slot).
    pool = BufferPool(classes=(64,), initial_slots=2, max_bytes=128, on_exhausted="raise")
    lease = pool.acquire(10)
    with pytest.raises(TypeError, match=r"cannot pickle '(bufpool\.)?Lease' object"):
        how(lease)
    lease.release()
    st = pool.stats()
    assert st.in_use == 0 and st.tiers[0].free == 2
    a, b = pool.acquire(10), pool.acquire(10)
    assert a.view.obj is not b.view.obj
    a.release()
    b.release()
