"""The pure-Python core's hit paths and the token they take instead of the pool lock
(``bufpool._lock``): sections wait for them, and code that runs inside them on their own
thread (a finalizer or tracer) neither deadlocks nor hands one slot to two owners."""

from __future__ import annotations

import re
import sys
import threading
from types import FrameType
from typing import Any

import pytest

import bufpool
from bufpool import BufferPool, Lease
from bufpool._lock import _HOT_CODES, PyPoolLock

needs_py = pytest.mark.skipif(
    bufpool.IMPLEMENTATION != "python", reason="the pure-Python hit paths only"
)


def in_stretch(frame: FrameType, pool: BufferPool) -> bool:
    """``frame`` is a hit path of ``pool`` holding the token right now."""
    return frame.f_code in _HOT_CODES and frame.f_locals.get("held") is pool._token


def slots_add_up(pool: BufferPool) -> None:
    st = pool.stats()
    for t in st.tiers:
        assert t.free + t.in_use + t.quarantined == t.slots, t


def test_pure_pool_lock_is_reentrant_and_validates_like_threading_rlock() -> None:
    lock = PyPoolLock()
    assert not lock._is_owned() and not lock.locked()
    with lock:
        assert not lock.token  # a section holds the token too
        assert lock.acquire() and lock._is_owned()  # the owner re-enters
        lock.release()
        assert lock.locked() and not lock.token
        seen: list[bool] = []
        t = threading.Thread(target=lambda: seen.append(lock.acquire(timeout=0.01)))
        t.start()
        t.join(30)
        assert seen == [False]  # another thread waits (and times out)
    assert not lock.locked() and lock.token == [None]
    rlock = threading.RLock()
    for call in (
        lambda lk: lk.release(),
        lambda lk: lk.acquire(False, 1.0),
        lambda lk: lk.acquire(timeout=-5),
        lambda lk: lk.acquire(timeout=1e300),
    ):
        with pytest.raises(Exception) as want:
            call(rlock)
        with pytest.raises(want.type, match=re.escape(str(want.value))):
            call(lock)
    assert not lock.locked() and lock.token == [None]


def test_pure_pool_lock_waits_for_a_taken_token_and_non_blocking_gives_up() -> None:
    lock = PyPoolLock()
    del lock.token[0]  # what a hit path of another thread does for a few bytecodes
    assert not lock.acquire(False)  # does not wait, and leaves the RLock free
    got = threading.Event()

    def section() -> None:
        with lock:
            got.set()

    t = threading.Thread(target=section)
    t.start()
    assert not got.wait(0.2)  # waits for the token
    lock.token.append(None)
    t.join(30)
    assert got.is_set() and lock.token == [None] and not lock.locked()


@needs_py
def test_sections_of_other_threads_wait_for_a_hit_path_holding_the_token() -> None:
    # A tracer stops thread A inside acquire's token stretch; thread B's acquire, release
    # and stats() must wait for it (neither race it nor fail), and finish once A goes on.
    pool = BufferPool(classes=(64,), initial_slots=4, max_bytes=4 * 64)
    spare = pool.acquire(10)
    inside, go, b_done = threading.Event(), threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and not inside.is_set() and in_stretch(frame, pool):
            inside.set()
            go.wait(30)
        return tracer

    def a() -> None:
        sys.settrace(tracer)
        try:
            results["a"] = pool.acquire(10)
        finally:
            sys.settrace(None)

    def b() -> None:
        lease = pool.acquire(20)
        spare.release()
        results["b_stats"] = pool.stats()
        results["b"] = lease
        b_done.set()

    ta = threading.Thread(target=a)
    ta.start()
    assert inside.wait(30)
    tb = threading.Thread(target=b)
    tb.start()
    assert not b_done.wait(0.3)  # blocked behind A's token
    go.set()
    ta.join(30)
    tb.join(30)
    assert b_done.is_set()
    a_lease, b_lease = results["a"], results["b"]
    assert a_lease.view.obj is not b_lease.view.obj
    assert results["b_stats"].in_use == 2
    a_lease.release()
    b_lease.release()
    slots_add_up(pool)
    st = pool.stats()
    assert st.in_use == 0 and st.tiers[0].free == 4 and st.tiers[0].hits == 3


@needs_py
def test_code_run_inside_a_hit_path_of_its_own_thread_reenters_or_defers() -> None:
    # What a finalizer the GC runs inside a hit path (possible once a tracer runs Python
    # code between its bytecodes) may do: stats(), acquire, release.  It must not wait for
    # the token its own thread holds, and no slot may reach two owners.
    # The tracer's frame snapshots keep many released slots quarantined, so most requests
    # go to the heap (about 2,500 of them): no bound on it here.
    pool = BufferPool(
        classes=(64, 256), initial_slots=8, max_bytes=64 * 64 + 8 * 256, max_heap_bytes=sys.maxsize
    )
    spares = [pool.acquire(100) for _ in range(4)]
    held: list[Lease] = []
    calls = {"n": 0}

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and in_stretch(frame, pool):
            sys.settrace(None)  # not inside what we run here
            try:
                calls["n"] += 1
                k = calls["n"] % 4
                if k == 0:
                    pool.stats()
                elif k == 1 and spares:
                    spares.pop().release()  # queued: done by a later miss or stats()
                elif k == 2:
                    held.append(pool.acquire(30))  # re-enters the stretch in progress
                else:
                    pool.acquire(40).release()
            finally:
                sys.settrace(tracer)
        return tracer

    sys.settrace(tracer)
    try:
        for i in range(200):
            lease = pool.acquire(10 + i % 50)
            if i % 3:
                lease.release()
            else:
                held.append(lease)
            if len(held) > 20:
                held.pop(0).release()
    finally:
        sys.settrace(None)
    assert calls["n"] > 100  # the tracer did run inside the stretches
    slots = [lease.view.obj for lease in held]
    assert len({id(s) for s in slots}) == len(slots)  # one owner per slot
    del slots
    for lease in held:
        lease.release()
    for lease in spares:
        lease.release()
    pool.reclaim()  # the tracer's f_locals snapshots held slots for a while: quarantined
    slots_add_up(pool)
    st = pool.stats()
    assert st.in_use == 0 and st.quarantined == 0 and st.leaked == 0
    assert st.tiers[0].free == st.tiers[0].slots and st.tiers[1].free == st.tiers[1].slots


@needs_py
def test_hit_paths_of_many_threads_add_up() -> None:
    pool = BufferPool(classes=(64, 1024), initial_slots=4)
    errors: list[BaseException] = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def work(seed: int) -> None:
        try:
            for i in range(3000):
                lease = pool.acquire(10 if (i + seed) % 2 else 1000)
                lease.view[0] = seed
                assert lease.view[0] == seed
                if i % 7 == 0:
                    pool.stats()
                lease.release()
        except BaseException as exc:  # reported below
            errors.append(exc)

    try:
        ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    finally:
        sys.setswitchinterval(switch)
    assert not errors
    slots_add_up(pool)
    st = pool.stats()
    assert st.in_use == 0 and st.quarantined == 0
    assert sum(t.hits + t.misses for t in st.tiers) == 4 * 3000
    assert pool._token == [None]


def test_pool_keeps_at_most_30_instance_attributes() -> None:
    # CPython shares instance-dict keys for at most 30 attributes; past that every attribute
    # read of the pure-Python hot paths is slower (about 30 ns per acquire+release here).
    assert len(vars(BufferPool())) <= 30


# Both scripts hang for good when the defect is back, so each runs in a subprocess that the
# test kills after a bound: a regression fails instead of stopping the suite.
_TRACER_VS_SECTION = """
import sys, threading, time
from bufpool import BufferPool
from bufpool._lock import _HOT_CODES
pool = BufferPool(classes=(64,), initial_slots=8)
fired = []
def tracer(frame, event, arg):
    if (event == "line" and not fired and frame.f_code in _HOT_CODES
            and frame.f_locals.get("held") is pool._token):
        fired.append(1)
        sys.settrace(None)
        threading.Thread(target=pool.stats, daemon=True).start()
        while "locked" not in repr(pool._lock._rlock):  # B holds the RLock, waits for the token
            time.sleep(0.001)
        pool.acquire(10).release()  # A, inside its own stretch, calls the pool
    return tracer
sys.settrace(tracer)
lease = pool.acquire(10)
sys.settrace(None)
lease.release()
assert fired, "the tracer never ran inside the stretch"
st = pool.stats()
assert st.in_use == 0 and st.tiers[0].free == st.tiers[0].slots, st
print("done")
"""

_PROFILER_AT_GIVE_BACK = """
import sys
from bufpool import BufferPool
pool = BufferPool(classes=(64,), initial_slots=8)
other = pool.acquire(10)
seen = []
def prof(frame, event, arg):
    # A call on the token itself (token.append, as the hit paths once gave it back) runs
    # this hook after ``held`` was cleared and before the token is back.  The hit paths now
    # give it back with an in-place +=, which is no call: the hook must find nothing.
    if event == "c_call" and not seen and getattr(arg, "__self__", None) is pool._token:
        seen.append(1)
        other.release()
sys.setprofile(prof)
lease = pool.acquire(10)
lease.release()
sys.setprofile(None)
pool.stats()  # runs the deferred release, if the hook made one inside a stretch
other.release() if not seen else None
st = pool.stats()
assert st.in_use == 0, st
print("done")
"""


def _run_bounded(script: str) -> None:
    import os
    import subprocess

    env = dict(os.environ, BUFPOOL_NO_EXTENSIONS="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("deadlocked: still blocked after 30 s")
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr


def test_pool_call_inside_a_stretch_while_another_thread_waits_in_a_section() -> None:
    """Thread B's section holds the RLock and waits for the token that A's hit path holds; code
    run inside A's stretch (a tracer here; a finalizer or weakref callback alike) calls the
    pool.  It must re-enter A's stretch, not wait for B's RLock (that was a deadlock)."""
    _run_bounded(_TRACER_VS_SECTION)


def test_profiler_hook_while_the_token_goes_back_does_not_deadlock() -> None:
    """A profiler's c_call event ran Python code after ``held`` was cleared but before the token
    was back; a release there waited for the token forever on its own thread."""
    _run_bounded(_PROFILER_AT_GIVE_BACK)
