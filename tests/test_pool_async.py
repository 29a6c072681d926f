"""acquire_async: FIFO waiters, wake-ups as slots free, timeouts and cancellation (both loops)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

import bufpool
import bufpool._pool
from bufpool import BufferPool, Lease, PoolExhausted


def tight_pool(n: int = 1) -> BufferPool:
    return BufferPool(classes=(1024,), initial_slots=n, max_bytes=n * 1024, on_exhausted="raise")


@pytest.mark.asyncio
async def test_returns_immediately_when_a_slot_is_free() -> None:
    pool = tight_pool()
    lease = await pool.acquire_async(100, timeout=1)
    assert lease.pooled and len(lease) == 100
    lease.release()


@pytest.mark.asyncio
async def test_timeout_raises_pool_exhausted_naming_the_wait() -> None:
    pool = tight_pool()
    held = pool.acquire(100)
    msg = r"no 1024-byte slot for 100 bytes became free within 0\.05 s"
    with pytest.raises(PoolExhausted, match=msg):
        await pool.acquire_async(100, timeout=0.05)
    st = pool.stats()
    assert st.timeouts == 1 and st.waiting == 0
    held.release()
    again = await pool.acquire_async(100, timeout=1)  # nothing was lost by the timeout
    again.release()


@pytest.mark.asyncio
async def test_waiters_are_served_fifo_as_slots_free() -> None:
    pool = tight_pool()
    held = pool.acquire(1)
    order: list[int] = []

    async def waiter(i: int) -> None:
        lease = await pool.acquire_async(10, timeout=5)
        order.append(i)
        await asyncio.sleep(0)
        lease.release()

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0)  # enqueue in a known order
    assert pool.stats().waiting == 5
    held.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2, 3, 4]
    assert pool.stats().in_use == 0


@pytest.mark.asyncio
async def test_one_release_wakes_exactly_one_waiter() -> None:
    pool = tight_pool(2)
    a, b = pool.acquire(1), pool.acquire(1)
    got: list[object] = []
    tasks = [
        asyncio.create_task(pool.acquire_async(1, timeout=5)) for _ in range(2)
    ]
    await asyncio.sleep(0.01)
    a.release()
    done, pending = await asyncio.wait(tasks, timeout=0.2)
    assert len(done) == 1 and len(pending) == 1
    got.append(done.pop().result())
    b.release()
    got.append(await asyncio.wait_for(pending.pop(), 5))
    for lease in got:
        lease.release()  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_cancelled_waiter_never_loses_or_double_hands_a_slot() -> None:
    pool = tight_pool()
    held = pool.acquire(1)
    first = asyncio.create_task(pool.acquire_async(1, timeout=5))
    second = asyncio.create_task(pool.acquire_async(1, timeout=5))
    await asyncio.sleep(0.01)
    held.release()  # hands the slot to `first`...
    first.cancel()  # ...which is cancelled before it runs: the slot must pass on
    with pytest.raises(asyncio.CancelledError):
        await first
    lease = await asyncio.wait_for(second, 5)
    assert lease.pooled
    st = pool.stats()
    assert st.in_use == 1 and st.waiting == 0
    lease.release()
    assert pool.stats().tiers[0].free == 1


@pytest.mark.asyncio
async def test_cancel_while_waiting_removes_the_waiter() -> None:
    pool = tight_pool()
    held = pool.acquire(1)
    task = asyncio.create_task(pool.acquire_async(1))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.stats().waiting == 0
    held.release()
    assert pool.stats().tiers[0].free == 1


@pytest.mark.asyncio
async def test_waiter_woken_when_quarantined_slot_frees() -> None:
    pool = tight_pool()
    lease = pool.acquire(100)
    view = lease.view
    lease.release()  # quarantined: `view` is alive
    task = asyncio.create_task(pool.acquire_async(100, timeout=5))
    await asyncio.sleep(0.02)
    assert not task.done()
    del view  # no release() call will come: the pool's poll must notice
    got = await asyncio.wait_for(task, 5)
    assert got.pooled
    got.release()


@pytest.fixture
def no_poller(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stretch the waiter poller to a minute: only a handover can wake a waiter in time."""
    monkeypatch.setattr(bufpool._pool, "WAITER_POLL_INTERVAL", 60.0)


@pytest.mark.asyncio
async def test_release_from_another_thread_wakes_waiter(no_poller: None) -> None:
    # With the poller at 2 ms this passed even if the cross-thread handover were broken (a
    # set_result from the wrong thread, or no wake-up of the loop): the poll served it anyway.
    pool = tight_pool()
    held = pool.acquire(1)
    task = asyncio.create_task(pool.acquire_async(1, timeout=30))
    await asyncio.sleep(0.01)

    def later() -> None:
        time.sleep(0.05)  # the loop is asleep in its selector by now
        held.release()

    t = threading.Thread(target=later)
    t.start()
    # Within 10 s: before the 30 s timeout and the 60 s poll, so woken by the handover (no
    # clock reading to compare: a busy machine may take seconds to run the thread).
    lease = await asyncio.wait_for(task, 10)
    t.join(5)
    assert lease.pooled
    lease.release()


@pytest.mark.asyncio
async def test_waiters_arm_no_poll_while_nothing_is_quarantined() -> None:
    # Every slot that can come back then comes back through a call (release, trim) that
    # serves the waiters itself: no 2 ms poll per loop while thousands wait.
    pool = tight_pool()
    held = pool.acquire(100)
    tasks = [asyncio.create_task(pool.acquire_async(100, timeout=30)) for _ in range(200)]
    await asyncio.sleep(0)
    assert pool.stats().waiting == 200
    loop = asyncio.get_running_loop()
    assert loop not in pool._pollers
    view = held.view
    held.release()  # quarantined: its view's death is reported by nobody, so now we poll
    assert loop in pool._pollers
    del view
    first = await asyncio.wait_for(tasks[0], 10)  # the poll found it free
    first.release()  # a plain release: handed to the next waiter at once
    for task in tasks[1:]:
        (await asyncio.wait_for(task, 10)).release()
    assert pool.stats().waiting == 0 and pool.stats().in_use == 0


@pytest.mark.asyncio
async def test_a_leaked_lease_wakes_a_waiter_without_the_poller(no_poller: None) -> None:
    pool = tight_pool()
    holder = [pool.acquire(100)]
    task = asyncio.create_task(pool.acquire_async(100, timeout=30))
    await asyncio.sleep(0)
    assert asyncio.get_running_loop() not in pool._pollers  # nothing quarantined
    holder.clear()  # the lease is collected unreleased: its finalizer schedules a round
    lease = await asyncio.wait_for(task, 10)
    assert lease.pooled
    lease.release()
    with pytest.warns(bufpool.LeakWarning, match="100-byte lease"):
        st = pool.stats()
    assert st.leaked == 1 and st.in_use == 0 and st.tiers[0].free == 1


def release_in_thread(lease: Lease) -> None:
    """Release ``lease`` from another thread and wait for it, blocking this loop meanwhile:
    the handover to a waiter of this loop is scheduled but has not run yet."""
    t = threading.Thread(target=lease.release)
    t.start()
    t.join(5)


async def _second_gets_the_slot(pool: BufferPool, second: asyncio.Task[Lease]) -> None:
    """The waiter behind one that gave up gets the handed-over slot, well before any poll."""
    lease = await asyncio.wait_for(second, 5)
    assert lease.pooled
    st = pool.stats()
    assert st.in_use == 1 and st.waiting == 0
    lease.release()
    slot_accounting_adds_up(pool)
    assert pool.stats().tiers[0].free == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("when", ["before delivery", "after delivery"])
async def test_cancel_after_a_cross_thread_handover_passes_the_slot_on(
    when: str, no_poller: None
) -> None:
    pool = tight_pool()
    held = pool.acquire(1)
    first = asyncio.create_task(pool.acquire_async(1, timeout=30))
    second = asyncio.create_task(pool.acquire_async(1, timeout=30))
    await asyncio.sleep(0.01)
    release_in_thread(held)  # hands the slot to `first` through call_soon_threadsafe
    assert pool.stats().in_use == 1  # it is first's lease now, in flight
    if when == "after delivery":
        await asyncio.sleep(0)  # the delivery runs: first's future has the lease
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await _second_gets_the_slot(pool, second)


@pytest.mark.asyncio
async def test_timeout_after_a_cross_thread_handover_passes_the_slot_on(no_poller: None) -> None:
    pool = tight_pool()
    held = pool.acquire(1)
    first = asyncio.create_task(pool.acquire_async(1, timeout=0.05))
    second = asyncio.create_task(pool.acquire_async(1, timeout=30))
    await asyncio.sleep(0.01)
    time.sleep(0.1)  # first's deadline passes while the loop is blocked...
    release_in_thread(held)  # ...and the slot is handed to it: delivery and timeout both due
    # Both loops run the delivery, then the timeout: first times out with the lease in its
    # future, and must pass it on.
    with pytest.raises(PoolExhausted, match=r"became free within 0\.05 s"):
        await first
    assert pool.stats().timeouts == 1
    await _second_gets_the_slot(pool, second)


@pytest.mark.asyncio
async def test_oversize_async_follows_policy_without_waiting() -> None:
    pool = BufferPool()
    lease = await pool.acquire_async(100_000, timeout=0.01)
    assert not lease.pooled
    lease.release()


@pytest.mark.asyncio
async def test_chain_async_waits_and_times_out_cleanly() -> None:
    pool = BufferPool(classes=(65536,), initial_slots=2, max_bytes=2 * 65536, on_exhausted="raise")
    chain = await pool.acquire_chain_async(100_000, timeout=1)
    assert [len(v) for v in chain.views()] == [65536, 100_000 - 65536]
    with pytest.raises(PoolExhausted, match="chain"):
        await pool.acquire_chain_async(65537, timeout=0.05)
    assert pool.stats().in_use == 2  # the failed chain took nothing
    chain.release()
    assert pool.stats().in_use == 0


@pytest.mark.asyncio
async def test_chain_larger_than_the_whole_budget_fails_at_once_holding_nothing() -> None:
    pool = BufferPool(classes=(65536,), initial_slots=2, max_bytes=2 * 65536, on_exhausted="heap")
    held = pool.acquire(10)  # whatever is held, the chain could never fit
    # No timeout at all: before, this waited forever holding the one slot it could take.
    task = asyncio.create_task(pool.acquire_chain_async(2 * 65536 + 1))
    with pytest.raises(bufpool.ChainTooLarge, match=r"131073-byte chain .*max_bytes=131072"):
        await asyncio.wait_for(task, 10)
    st = pool.stats()
    assert st.in_use == 1 and st.waiting == 0 and st.timeouts == 0 and st.heap_in_use == 0
    held.release()
    chain = await pool.acquire_chain_async(2 * 65536, timeout=1)  # what fits is served
    chain.release()


def slot_accounting_adds_up(pool: BufferPool) -> None:
    pool.reclaim()
    for t in pool.stats().tiers:
        assert t.slots == t.free + t.in_use + t.quarantined, t


@pytest.mark.asyncio
async def test_deferred_release_drained_while_serving_waiters_hands_each_slot_once() -> None:
    # A release deferred from a finalizer (here: a release inside a locked section, as the GC
    # produces) is pending while a coroutine waits; the next release serves the waiter, and
    # serving drains the deferred release, which frees a slot and serves waiters again.
    pool = tight_pool(2)
    a, b = pool.acquire(10), pool.acquire(10)
    task = asyncio.create_task(pool.acquire_async(10, timeout=5))
    await asyncio.sleep(0.001)
    assert pool.stats().waiting == 1
    with pool._lock:
        a.release()  # deferred
    b.release()  # was IndexError (pop from an empty deque), and a slot lost for good
    got = await asyncio.wait_for(task, 5)
    assert got.pooled
    got.release()
    slot_accounting_adds_up(pool)
    st = pool.stats()
    assert st.in_use == 0 and st.tiers[0].free == 2 and st.waiting == 0


@pytest.mark.asyncio
async def test_poller_keeps_polling_after_a_failed_round() -> None:
    pool = tight_pool()
    lease = pool.acquire(100)
    view = lease.view
    lease.release()  # quarantined: only the poller can notice it free up
    real = pool._serve_waiters
    calls = 0

    def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("one bad round")
        real()

    pool._serve_waiters = flaky  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
    try:
        task = asyncio.create_task(pool.acquire_async(100, timeout=5))
        await asyncio.sleep(0.02)
        assert calls >= 1 and not task.done()
        del view
        got = await asyncio.wait_for(task, 5)
    finally:
        loop.set_exception_handler(None)
        del pool._serve_waiters
    assert [type(e) for e in errors] == [RuntimeError]
    got.release()
    await asyncio.sleep(0.01)
    assert loop not in pool._pollers  # and it stopped once nobody waits


def chain_pool(slots: int = 4) -> BufferPool:
    return BufferPool(
        classes=(65536,), initial_slots=slots, max_bytes=slots * 65536, on_exhausted="raise"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("timeout", [None, 5.0])
async def test_two_waiting_chains_do_not_deadlock_each_other(timeout: float | None) -> None:
    # Each chain alone needs 3 of the 4 slots.  Taking them piece by piece, FIFO handed the
    # freed slots out alternately: each chain held half and waited for the other's half
    # (PoolExhausted for both after the timeout; forever with timeout=None).
    pool = chain_pool()
    held = [pool.acquire(65536) for _ in range(4)]
    got: list[int] = []

    async def chain(i: int) -> None:
        c = await pool.acquire_chain_async(3 * 65536, timeout=timeout)
        got.append(i)
        await asyncio.sleep(0.01)
        c.release()

    tasks = [asyncio.create_task(chain(i)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert pool.stats().waiting == 2  # one for a slot, one for its turn
    for lease in held:  # the previous owner finishes, one slot at a time
        lease.release()
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert got == [0, 1]  # FIFO
    st = pool.stats()
    assert st.in_use == 0 and st.waiting == 0 and st.timeouts == 0
    slot_accounting_adds_up(pool)


@pytest.mark.asyncio
async def test_chain_waiting_for_its_turn_times_out_once_holding_nothing() -> None:
    pool = chain_pool()
    held = pool.acquire(65536)
    first = asyncio.create_task(pool.acquire_chain_async(4 * 65536, timeout=5))
    await asyncio.sleep(0.01)
    assert pool.stats().in_use == 4  # `first` holds 3 and waits for the 4th
    with pytest.raises(PoolExhausted, match=r"no room for a 131072-byte chain within 0\.05 s"):
        await pool.acquire_chain_async(2 * 65536, timeout=0.05)
    st = pool.stats()
    assert st.timeouts == 1 and st.in_use == 4 and st.waiting == 1
    held.release()
    chain = await asyncio.wait_for(first, 5)
    assert len(chain) == 4 * 65536
    chain.release()
    again = await pool.acquire_chain_async(2 * 65536, timeout=1)  # the turn was passed on
    again.release()
    assert pool.stats().in_use == 0


@pytest.mark.asyncio
async def test_cancelled_chains_pass_the_turn_and_give_back_their_slots() -> None:
    pool = chain_pool()
    held = [pool.acquire(65536) for _ in range(2)]
    holder = asyncio.create_task(pool.acquire_chain_async(3 * 65536))  # takes 2, waits
    queued = asyncio.create_task(pool.acquire_chain_async(2 * 65536))  # waits for the turn
    last = asyncio.create_task(pool.acquire_chain_async(2 * 65536))
    await asyncio.sleep(0.01)
    assert pool.stats().in_use == 4 and pool.stats().waiting == 3
    queued.cancel()  # leaves the queue
    holder.cancel()  # gives back its 2 slots and passes the turn on, to `last`
    for t in (queued, holder):
        with pytest.raises(asyncio.CancelledError):
            await t
    chain = await asyncio.wait_for(last, 5)
    st = pool.stats()
    assert st.in_use == 4 and st.waiting == 0
    chain.release()
    for lease in held:
        lease.release()
    slot_accounting_adds_up(pool)
    assert pool.stats().tiers[0].free == 4


@pytest.mark.asyncio
async def test_chain_with_free_slots_arms_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    armed: list[str] = []
    for name in ("timeout", "timeout_at"):
        real = getattr(asyncio, name)
        monkeypatch.setattr(
            asyncio, name, lambda *a, _real=real, _n=name: armed.append(_n) or _real(*a)
        )
    pool = chain_pool()
    chain = await pool.acquire_chain_async(3 * 65536 + 10, timeout=1)
    assert armed == [] and len(chain) == 3 * 65536 + 10
    chain.release()


def test_chains_on_loops_in_two_threads_do_not_deadlock(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    pool = chain_pool(3)
    errors: list[BaseException] = []

    async def churn() -> None:
        for _ in range(50):
            chain = await pool.acquire_chain_async(2 * 65536, timeout=10)
            await asyncio.sleep(0)
            chain.release()

    async def two() -> None:
        await asyncio.gather(churn(), churn())

    def run() -> None:
        loop = loop_factory()
        try:
            loop.run_until_complete(two())
        except BaseException as exc:
            errors.append(exc)
        finally:
            loop.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and errors == []
    st = pool.stats()
    assert st.in_use == 0 and st.waiting == 0
    slot_accounting_adds_up(pool)
