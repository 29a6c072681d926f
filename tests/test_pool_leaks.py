"""Leak detection: a lease dropped without release is reported and its slot comes back."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import bufpool
from bufpool import BufferPool, LeakWarning

ROOT = Path(__file__).resolve().parent.parent


def leak_one(pool: BufferPool, size: int = 100) -> None:
    pool.acquire(size)  # dropped on the floor


def test_paranoid_leak_warns_with_acquisition_site() -> None:
    pool = BufferPool(leak_detection="paranoid", classes=(256,), initial_slots=1, max_bytes=256)
    leak_one(pool)
    gc.collect()
    with pytest.warns(LeakWarning, match=r"a 100-byte lease was garbage-collected") as rec:
        bufpool.report_leaks()
    text = str(rec[0].message)
    assert "test_pool_leaks.py" in text and "leak_one" in text
    st = pool.stats()
    assert st.leaked == 1 and st.in_use == 0
    with pool.acquire(100) as lease:  # the slot came back
        assert lease.pooled


def test_sample_level_warns_and_records_site_for_about_1_in_128() -> None:
    pool = BufferPool(leak_detection="sample")
    for _ in range(256):
        leak_one(pool, 10)
    gc.collect()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert bufpool.report_leaks() == 256
    texts = [str(w.message) for w in rec if issubclass(w.category, LeakWarning)]
    assert len(texts) == 256
    with_site = [t for t in texts if "acquired at:" in t]
    assert len(with_site) == 2  # exactly every 128th lease is sampled
    assert "leak_one" in with_site[0]


def test_off_level_reclaims_silently_but_counts() -> None:
    pool = BufferPool(leak_detection="off", classes=(64,), initial_slots=1, max_bytes=64)
    leak_one(pool, 64)
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = pool.stats()
    assert st.leaked == 1 and st.in_use == 0
    with pool.acquire(64) as lease:
        assert lease.pooled


def test_leaked_slot_with_live_view_waits_for_the_view() -> None:
    pool = BufferPool(leak_detection="off", classes=(64,), initial_slots=1, max_bytes=64)
    lease = pool.acquire(64)
    view = lease.view
    view[:] = b"L" * 64
    del lease
    gc.collect()
    st = pool.stats()
    assert st.leaked == 1 and st.quarantined == 1
    other = pool.acquire(64)
    assert not other.pooled
    other.release()
    assert bytes(view) == b"L" * 64
    del view
    with pool.acquire(64) as lease2:
        assert lease2.pooled


def test_leak_from_miss_path_is_reported_by_next_stats() -> None:
    pool = BufferPool(leak_detection="paranoid", classes=(64,), initial_slots=1, max_bytes=64)
    leak_one(pool, 64)
    gc.collect()
    lease = pool.acquire(64)  # miss: drains the leak queue, reuses the slot
    assert lease.pooled
    lease.release()
    with pytest.warns(LeakWarning):
        pool.stats()
    assert pool.stats().leaked == 1


def test_released_lease_is_not_a_leak() -> None:
    pool = BufferPool(leak_detection="paranoid")
    pool.acquire(10).release()
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bufpool.report_leaks() == 0


class _Owner:
    """Releases its lease in ``__del__`` and sits in a reference cycle (collected by the GC)."""

    def __init__(self, lease: bufpool.Lease) -> None:
        self.lease = lease
        self.me = self

    def __del__(self) -> None:
        self.lease.release()


def test_lease_released_by_a_finalizer_of_the_same_collection_is_not_a_leak() -> None:
    # The GC finalizes a garbage cycle in no fixed order: here the lease's own finalizer runs
    # before the owner's __del__ releases it.  The slot must come back once, not twice (it
    # used to be both on the free list and in quarantine: two owners of one slot later).
    pool = BufferPool(leak_detection="paranoid", classes=(64,), initial_slots=8, max_bytes=512)
    gc.disable()
    try:
        for _ in range(8):
            _Owner(pool.acquire(10))
    finally:
        gc.enable()
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = pool.stats()
    assert st.in_use == 0 and st.leaked == 0 and st.quarantined == 0
    assert st.tiers[0].free == st.tiers[0].slots == 8
    leases = [pool.acquire(10) for _ in range(8)]
    assert len({id(lease.view.obj) for lease in leases}) == 8  # eight distinct slots
    assert all(lease.pooled for lease in leases)
    for lease in leases:
        lease.release()


async def leak_after_waiting(pool: BufferPool, task_started: asyncio.Event) -> None:
    task_started.set()
    await pool.acquire_async(10, timeout=5)  # waits for the slot, then drops the lease


@pytest.mark.asyncio
async def test_paranoid_leak_of_a_lease_that_waited_names_its_acquisition_site() -> None:
    pool = BufferPool(
        leak_detection="paranoid",
        classes=(1024,),
        initial_slots=1,
        max_bytes=1024,
        on_exhausted="raise",
    )
    held = pool.acquire(10)
    started = asyncio.Event()
    task = asyncio.create_task(leak_after_waiting(pool, started))
    await started.wait()
    await asyncio.sleep(0.01)
    assert pool.stats().waiting == 1
    held.release()  # handed to the waiter, which drops it
    await asyncio.wait_for(task, 5)
    del task
    gc.collect()
    with pytest.warns(LeakWarning, match=r"a 10-byte lease was garbage-collected") as rec:
        assert bufpool.report_leaks() == 1
    text = str(rec[0].message)
    assert "leak_after_waiting" in text and "test_pool_leaks.py" in text, text


# An application (not a test suite) that leaks a lease and then asks for stats.
_LEAKY_APP = """
import gc, bufpool
pool = bufpool.BufferPool()
def leak():
    pool.acquire(100)
leak()
gc.collect()
pool.stats()
print("finished")
"""


def run_app(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # The core of this run (BUFPOOL_NO_EXTENSIONS) passes on; no warning settings of ours do.
    full = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "BUFPOOL_LEAKS")}
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")])
    full.update(env)
    return subprocess.run(
        [sys.executable, *args, "-c", _LEAKY_APP],
        env=full, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ((), {"BUFPOOL_LEAKS": "error"}),
        (("-W", "error::bufpool.LeakWarning"), {}),  # applied by bufpool when imported
        ((), {"PYTHONWARNINGS": "error::bufpool.LeakWarning"}),
        (("-W", "error:bufpool:ResourceWarning"), {}),  # CPython's own form, no help needed
    ],
)
def test_leaks_are_errors_in_an_application_when_switched_on(
    args: tuple[str, ...], env: dict[str, str]
) -> None:
    out = run_app(*args, **env)
    assert out.returncode == 1, out.stderr
    assert "bufpool._errors.LeakWarning: bufpool: a 100-byte lease was garbage-collected" in (
        out.stderr
    )
    assert "finished" not in out.stdout


def test_leaks_are_not_errors_by_default_and_a_bad_switch_says_so() -> None:
    out = run_app()
    assert out.returncode == 0 and "finished" in out.stdout, out.stderr
    out = run_app(BUFPOOL_LEAKS="loud")
    assert out.returncode == 0 and "finished" in out.stdout, out.stderr
    assert "BUFPOOL_LEAKS='loud' ignored: unknown action 'loud'" in out.stderr
    out = run_app(BUFPOOL_LEAKS="ignore", PYTHONWARNINGS="error::ResourceWarning")
    assert out.returncode == 0 and "finished" in out.stdout, out.stderr  # the env var wins
