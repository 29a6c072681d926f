"""Choosing the implementation (compiled or pure Python) and proving the two behave alike.

The implementation is fixed at import, so comparisons run a script in two subprocesses, one
with ``BUFPOOL_NO_EXTENSIONS=1``, and compare what they print.  The rest of the suite runs
against whichever implementation is active (CI runs it once per implementation).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import pytest

import bufpool
from bufpool import BufferPool, LeakWarning

ROOT = Path(__file__).resolve().parent.parent
BUILT = importlib.util.find_spec("bufpool._speedups") is not None


def run_py(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter with ``env`` on top of ours (bufpool from ROOT)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("BUFPOOL_")}
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")])
    full.update(env)
    out = subprocess.run(
        [sys.executable, "-X", "dev", "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


REPORT = "import bufpool; print(bufpool.IMPLEMENTATION, type(bufpool.BufferPool().acquire(1)))"


def test_env_var_forces_pure_python() -> None:
    assert run_py(REPORT, BUFPOOL_NO_EXTENSIONS="1").split()[0] == "python"
    assert "bufpool._lease.Lease" in run_py(REPORT, BUFPOOL_NO_EXTENSIONS="1")


def test_default_uses_the_extension_when_built() -> None:
    impl = run_py(REPORT).split()[0]
    assert impl == ("c" if BUILT else "python")
    assert run_py(REPORT, BUFPOOL_NO_EXTENSIONS="0").split()[0] == impl  # "0" means unset


def test_require_extensions_fails_loudly_or_gets_c() -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith("BUFPOOL_")}
    full["PYTHONPATH"] = str(ROOT)
    full["BUFPOOL_REQUIRE_EXTENSIONS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", REPORT], env=full, capture_output=True, text=True, timeout=120
    )
    if BUILT:
        assert out.returncode == 0 and out.stdout.startswith("c ")
    else:
        assert out.returncode != 0 and "ImportError" in out.stderr


def test_implementation_is_reported_consistently() -> None:
    assert bufpool.IMPLEMENTATION in ("c", "python")
    lease = BufferPool().acquire(10)
    assert isinstance(lease, bufpool.Lease)
    compiled = type(lease).__module__ == "bufpool"  # the C type's name is "bufpool.Lease"
    assert compiled == (bufpool.IMPLEMENTATION == "c")
    lease.release()


# A script exercising every error and observable of the core; both implementations must print
# the same lines (object addresses masked).
BEHAVIOUR = r"""
import gc, re, warnings
import bufpool
from bufpool import BufferPool

def show(label, fn):
    try:
        r = fn()
    except BaseException as e:
        r = f"{type(e).__name__}: {e}"
    print(label, "->", re.sub(r"0x[0-9a-f]+", "0x?", str(r)))

class MyInt(int):
    pass

pool = BufferPool(leak_detection="paranoid", classes=(64, 1024), initial_slots={64: 2, 1024: 2},
                  max_bytes=2 * 64 + 2 * 1024, on_exhausted="raise")
for bad in (1.5, "10", None, True, -1, -(2**70), MyInt(5), MyInt(0), MyInt(-1)):
    show(f"acquire({type(bad).__name__}({bad!r}))", lambda: pool.acquire(bad))
    show(f"acquire_chain({type(bad).__name__}({bad!r}))", lambda: pool.acquire_chain(bad))
show("oversize raise", lambda: pool.acquire(5000))

def kind(fn):  # argument errors: the same calls fail on both (CPython words them differently)
    try:
        fn()
    except BaseException as e:
        return type(e).__name__
    return "ok"

k = pool.acquire(10)
for label, fn in [
    ("acquire(size=10)", lambda: pool.acquire(size=10).release()),
    ("acquire()", lambda: pool.acquire()),
    ("acquire(1, 2)", lambda: pool.acquire(1, 2)),
    ("truncate(size=3)", lambda: k.truncate(size=3)),
    ("truncate()", lambda: k.truncate()),
    ("truncate(1, 2)", lambda: k.truncate(1, 2)),
    ("release(1)", lambda: k.release(1)),
    ("release(x=1)", lambda: k.release(x=1)),
    ("retain(1)", lambda: k.retain(1)),
    ("tobytes(1)", lambda: k.tobytes(1)),
    ("copy_from()", lambda: k.copy_from()),
    ("copy_from(b'', 1)", lambda: k.copy_from(b"", 1)),
    ("copy_from(data=b'')", lambda: k.copy_from(data=b"")),
    ("copy_from(1)", lambda: k.copy_from(1)),
    ("__enter__(1)", lambda: k.__enter__(1)),
    ("retain for __exit__", lambda: k.retain().retain()),
    ("__exit__()", lambda: k.__exit__()),
    ("__exit__(1, 2, 3, 4)", lambda: k.__exit__(1, 2, 3, 4)),
]:
    show(label, lambda: (kind(fn), len(k), k.refcount))
k.release()
show("huge", lambda: pool.acquire(2**70))
a = pool.acquire(10)
show("repr", lambda: repr(a))
show("attrs", lambda: (len(a), a.capacity, a.pooled, a.refcount, a.released, bool(a)))
show("view", lambda: (len(a.view), a.view.format, a.view.readonly, type(a.view.obj).__name__,
                      len(a.view.obj), a.view is a.view))
show("retain", lambda: (a.retain() is a, a.refcount))
a.release()
show("after one release", lambda: (a.refcount, a.released))
a.view[:] = b"0123456789"
a.truncate(4)
show("truncate", lambda: (len(a), a.tobytes(), bytes(a.view)))
show("truncate too far", lambda: a.truncate(5))
show("truncate negative", lambda: a.truncate(-1))
show("truncate float", lambda: a.truncate(1.5))
show("truncate str", lambda: a.truncate("1"))
show("truncate huge", lambda: a.truncate(2**70))
show("truncate subclass", lambda: (a.truncate(MyInt(4)), len(a)))
show("copy_from", lambda: (a.copy_from(b"abc"), a.tobytes()))
show("copy_from words", lambda: (a.copy_from(memoryview(b"wxyz").cast("H")), a.tobytes()))
show("copy_from too long", lambda: a.copy_from(b"abcde"))
show("copy_from strided", lambda: a.copy_from(memoryview(b"abcdef")[::2]))
show("copy_from then", lambda: a.tobytes())
a.release()
show("after release", lambda: (a.refcount, a.released, a.capacity, len(a), repr(a)))
show("release again", lambda: a.release())
show("retain after", lambda: a.retain())
show("view after", lambda: a.view)
show("tobytes after", lambda: a.tobytes())
show("truncate after", lambda: a.truncate(1))
show("copy_from after", lambda: a.copy_from(b"x"))
b = pool.acquire(64)
import copy, pickle
for how in ("copy.copy", "copy.deepcopy", "pickle.dumps", "lambda x: pickle.dumps(x, 0)",
            "lambda x: pickle.dumps(x, 1)", "lambda x: x.__reduce__()",
            "lambda x: x.__reduce_ex__(4)"):
    show(how, lambda: eval(how)(b))
for name in ("_pool", "_tier", "_buf", "_view", "_site", "_size", "_refcount"):
    show(f"write {name}", lambda: setattr(b, name, -1))
    show(f"del {name}", lambda: delattr(b, name))
show("internals", lambda: (b._size, b._refcount, b._view, type(b._buf).__name__, b._site is None))
show("hand-built", lambda: bufpool.Lease(pool, None, bytearray(10), None, 10, None))
show("new", lambda: bufpool.Lease.__new__(bufpool.Lease))
from bufpool._lease import detach, set_refcount
show("detach unlocked", lambda: detach(b))
show("set_refcount unlocked", lambda: set_refcount(b, 3))
z = pool.acquire(0)
show("bool(zero)", lambda: (bool(z), len(z.view)))
z.release()
c = pool.acquire(1000)
d = pool.acquire(1000)
show("exhausted", lambda: pool.acquire(1000))
held = c.view[:3]
c.release()
show("quarantined", lambda: pool.stats().quarantined)
del held
show("reclaim", lambda: pool.reclaim())
with pool.acquire(500) as e:
    show("with", lambda: (e.refcount, e.pooled, len(e)))
show("with after", lambda: e.released)
heap_pool = BufferPool(classes=(64,), initial_slots=0, max_bytes=0, max_heap_bytes=100)
h = heap_pool.acquire(10)
show("heap", lambda: (repr(h), h.pooled, h.capacity, len(h.view)))
show("heap budget", lambda: heap_pool.acquire(91))
show("heap oversize", lambda: heap_pool.acquire(101))
hv = h.view
h.release()
show("heap release again", lambda: h.release())
show("heap viewed", lambda: (heap_pool.stats().heap_bytes, heap_pool.stats().heap_in_use))
del hv
show("heap view gone", lambda: heap_pool.stats().heap_bytes)
show("chain too large", lambda: pool.acquire_chain(5000))
show("heap chain too large", lambda: heap_pool.acquire_chain(201))

def leak():
    pool.acquire(7)

d.release()
b.release()
leak()
gc.collect()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    show("report_leaks", lambda: bufpool.report_leaks())
for x in w:
    show("leak warning", lambda: (x.category.__name__, str(x.message)))
st = pool.stats()
show("stats", lambda: st.as_dict())
sampled = BufferPool(leak_detection="sample")
for i in range(300):
    sampled.acquire(20 + i % 2000)
gc.collect()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    show("sampled leaks", lambda: bufpool.report_leaks())
show("sites", lambda: [i for i, x in enumerate(w) if "acquired at" in str(x.message)])
show("sampled stats", lambda: sampled.stats().as_dict())
"""


def test_behaviour_errors_and_messages_identical_on_both() -> None:
    pure = run_py(BEHAVIOUR, BUFPOOL_NO_EXTENSIONS="1")
    active = run_py(BEHAVIOUR)
    assert "LeaseReleasedError" in pure and "acquired at" in pure  # the script did its job
    subclass = "TypeError: size must be a plain int number of bytes, got MyInt (an int subclass"
    assert f"acquire(MyInt(5)) -> {subclass}" in pure
    assert active.splitlines() == pure.splitlines()


def test_many_cycles_leave_refcounts_and_objects_unchanged() -> None:
    pool = BufferPool(leak_detection="sample", classes=(64, 1024), initial_slots=2)

    def cycle(n: int) -> None:
        for i in range(n):
            lease = pool.acquire(10 if i % 2 else 1000)
            if i % 3 == 0:
                lease.view[0] = 1
            if i % 5 == 0:
                lease.retain()
                lease.release()
            if i % 7 == 0:
                lease.truncate(3)
                lease.tobytes()
            if i % 11 == 0:
                v = lease.view[:2]
                lease.release()
                del v
            else:
                lease.release()

    cycle(2000)
    gc.collect()
    pool.reclaim()
    tier_refs = [sys.getrefcount(t) for t in pool._tiers]  # the size cache's included
    before = (sys.getrefcount(pool), len(gc.get_objects()))
    cycle(20000)
    gc.collect()
    pool.reclaim()
    assert (sys.getrefcount(pool), len(gc.get_objects())) == before
    assert [sys.getrefcount(t) for t in pool._tiers] == tier_refs
    st = pool.stats()
    assert st.in_use == 0 and st.quarantined == 0
    assert all(t.free == t.slots for t in st.tiers)


def test_gc_collects_a_leaked_lease_in_a_cycle_and_reports_it() -> None:
    pool = BufferPool(leak_detection="paranoid", classes=(64,), initial_slots=1, max_bytes=64)

    class Holder:
        lease: object
        me: object

    holder = Holder()
    lease = pool.acquire(60)
    holder.lease, holder.me = lease, holder
    pool.cycle = holder  # type: ignore[attr-defined]  # lease -> pool -> holder -> lease
    ref = weakref.ref(lease)
    del lease, holder
    del pool.cycle  # type: ignore[attr-defined]
    gc.collect()
    assert ref() is None
    with pytest.warns(LeakWarning, match=r"(?s)a 60-byte lease.*test_speedups\.py"):
        assert bufpool.report_leaks() == 1
    with pool.acquire(60) as again:
        assert again.pooled


def test_hot_paths_wait_for_a_held_pool_lock() -> None:
    pool = BufferPool(classes=(64,), initial_slots=2, max_bytes=128)
    first = pool.acquire(10)
    done = threading.Event()

    def other() -> None:
        lease = pool.acquire(10)  # a hit, but the lock is held: must wait for it
        first.release()
        lease.release()
        done.set()

    with pool._lock:
        t = threading.Thread(target=other)
        t.start()
        t.join(0.2)
        assert not done.is_set()  # blocked on the lock, not racing the locked section
        assert pool._tiers[0].in_use == 1
    t.join(30)
    assert done.is_set()
    st = pool.stats()
    assert st.in_use == 0 and st.tiers[0].free == 2 and st.tiers[0].hits == 2


def test_view_is_a_slot_view_made_on_first_use() -> None:
    pool = BufferPool()
    lease = pool.acquire(100)
    view = lease.view
    assert view is lease.view
    assert type(view.obj) is bytearray and len(view.obj) == lease.capacity == 256
    assert view.nbytes == 100 and view.contiguous and not view.readonly
    view[:] = bytes(range(100))
    assert lease.tobytes() == bytes(range(100)) == bytes(view.obj[:100])
    del view
    lease.release()
    assert pool.stats().quarantined == 0


needs_c = pytest.mark.skipif(bufpool.IMPLEMENTATION != "c", reason="compiled types only")


INTERNALS = ("_pool", "_tier", "_buf", "_view", "_site", "_size", "_refcount")


@pytest.mark.parametrize("name", INTERNALS)
@pytest.mark.parametrize("value", [-1, -(2**40), 10**6, None, "x", bytearray(10**5)])
def test_writes_to_lease_internals_are_refused(name: str, value: object) -> None:
    # Writes used to reach state the cores trust: ``_size = -1`` made len() raise SystemError
    # and tobytes() SystemError (compiled); the pure core's tobytes() returned bytes past the
    # lease's length; ``_tier = obj`` once segfaulted the compiled release.
    pool = BufferPool(classes=(64,), initial_slots=1, max_bytes=64, on_exhausted="raise")
    lease = pool.acquire(10)
    lease.view[:] = b"0123456789"
    before = getattr(lease, name)
    with pytest.raises(AttributeError, match=f"Lease.{name} is internal state of the pool and "):
        setattr(lease, name, value)
    with pytest.raises(AttributeError, match="read-only"):
        delattr(lease, name)
    assert getattr(lease, name) is before or getattr(lease, name) == before
    del before  # ``_buf`` and ``_view`` are the slot and its view: they keep it quarantined
    assert len(lease) == 10 and lease.tobytes() == b"0123456789" and len(lease.view) == 10
    assert "10 B in 64-byte class" in repr(lease)
    lease.release()
    st = pool.stats()
    assert st.in_use == 0 and st.heap_in_use == 0 and st.tiers[0].free == 1


def test_a_hand_built_lease_is_refused() -> None:
    # ``bufpool.Lease(...)`` released used to drive heap_in_use to -1 on both cores.
    pool = BufferPool()
    msg = r"bufpool\.Lease cannot be created directly: leases come from BufferPool\.acquire\(\)"
    with pytest.raises(TypeError, match=msg):
        bufpool.Lease(pool, None, bytearray(10), None, 10, None)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=msg):
        bufpool.Lease()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=msg):
        bufpool.Lease.__new__(bufpool.Lease)
    st = pool.stats()
    assert st.heap_in_use == 0 and st.in_use == 0 and st.heap_fallbacks == 0


def test_lease_state_changes_only_under_the_pool_lock() -> None:
    # The functions the locked sections use are the only ways to change a lease's state; each
    # refuses to run for a caller that does not hold the pool lock.
    from bufpool._lease import detach, new_lease, set_refcount

    pool = BufferPool(classes=(64,), initial_slots=1, max_bytes=64)
    lease = pool.acquire(10)
    tier = pool._tiers[0]
    for call in (
        lambda: detach(lease),
        lambda: set_refcount(lease, 5),
        lambda: new_lease(pool, None, bytearray(10), 10, None),
        lambda: new_lease(pool, tier, bytearray(64), 10, None),
    ):
        with pytest.raises(RuntimeError, match="only inside its pool's locked sections"):
            call()
    assert lease.refcount == 1 and len(lease) == 10
    lease.release()
    st = pool.stats()
    assert st.in_use == 0 and st.heap_in_use == 0 and st.tiers[0].free == 1


def test_weakref_callback_on_the_view_runs_pool_code_during_release() -> None:
    # Dropping the lease's view in release() can run Python code (a weakref callback); the
    # callback's own acquire/release must not corrupt the release in progress.
    pool = BufferPool(classes=(64,), initial_slots=2, max_bytes=128)
    lease = pool.acquire(10)
    seen: list[int] = []

    def callback(_: object) -> None:
        other = pool.acquire(20)
        seen.append(len(other))
        other.release()

    ref = weakref.ref(lease.view, callback)
    lease.release()
    assert seen == [20] and ref() is None
    st = pool.stats()
    assert st.in_use == 0 and st.quarantined == 0 and st.tiers[0].free == 2
    a, b = pool.acquire(10), pool.acquire(10)
    assert a.view.obj is not b.view.obj
    a.release()
    b.release()


@needs_c
def test_fastlock_is_reentrant_and_validates_like_threading_rlock() -> None:
    lock = BufferPool()._lock
    assert not lock._is_owned() and not lock.locked()
    with lock:
        assert lock.acquire() and lock._is_owned()  # the owner re-enters
        lock.release()
        assert lock.locked()
        seen: list[bool] = []
        t = threading.Thread(target=lambda: seen.append(lock.acquire(timeout=0.01)))
        t.start()
        t.join(30)
        assert seen == [False]  # another thread waits (and times out)
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="un-acquired"):
        lock.release()
    with pytest.raises(ValueError, match="non-blocking"):
        lock.acquire(False, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        lock.acquire(timeout=-5)
    with pytest.raises(OverflowError):
        lock.acquire(timeout=1e300)
    assert not lock.locked()
