"""acquire_async: FIFO waiters, wake-ups as slots free, timeouts and cancellation (both loops)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bufpool import BufferPool, PoolExhausted


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


@pytest.mark.asyncio
async def test_release_from_another_thread_wakes_waiter() -> None:
    pool = tight_pool()
    held = pool.acquire(1)
    task = asyncio.create_task(pool.acquire_async(1, timeout=5))
    await asyncio.sleep(0.01)
    t = threading.Thread(target=held.release)
    t.start()
    lease = await asyncio.wait_for(task, 5)
    t.join(5)
    assert lease.pooled
    lease.release()


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
