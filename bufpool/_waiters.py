"""Coroutines waiting in a pool: for a slot in ``BufferPool.acquire_async`` (``Waiter``, FIFO
per size class), and for the turn to take a chain of several slots in
``BufferPool.acquire_chain_async`` (``ChainTurn``, FIFO per pool)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._impl import PoolLock
    from ._leak import Site
    from ._lease import Lease

__all__ = ["ChainTurn", "Waiter", "deliver"]


class Waiter:
    __slots__ = ("fut", "loop", "site", "size", "thread")

    def __init__(
        self,
        fut: asyncio.Future[Lease],
        size: int,
        loop: asyncio.AbstractEventLoop,
        site: Site | None = None,
    ) -> None:
        self.fut = fut
        self.size = size
        self.loop = loop
        #: Where ``acquire_async`` was called, when this lease is sampled for leak reports.
        self.site = site
        self.thread = threading.get_ident()

    def hand(self, lease: Lease) -> None:
        """Give ``lease`` to the waiter from any thread; released again if it gave up."""
        if threading.get_ident() == self.thread:
            deliver(self.fut, lease)
        else:
            try:
                self.loop.call_soon_threadsafe(deliver, self.fut, lease)
            except RuntimeError:  # its loop is closed
                lease.release()


def deliver(fut: asyncio.Future[Lease], lease: Lease) -> None:
    if fut.done():
        lease.release()
    else:
        fut.set_result(lease)


class ChainTurn:
    """One chain acquisition at a time may wait for slots while holding some, per pool.

    Two chains that each take their slots one by one and wait for the rest deadlock as soon
    as each holds part of what the other needs (FIFO hands freed slots to them alternately).
    A chain of several slots therefore first takes the pool's turn: free, that costs one
    locked check and arms no timer; otherwise it waits FIFO, on any loop and thread, and the
    holder passes the turn on once it has all its slots or gives up.  Waiters for single
    slots hold nothing while they wait, so they do not need the turn.
    """

    __slots__ = ("_busy", "_lock", "_queue")

    def __init__(self, lock: PoolLock) -> None:
        self._lock = lock
        self._busy = False
        self._queue: deque[_TurnWaiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def take(self, deadline: float | None) -> None:
        """Wait for the turn until ``deadline`` (loop time; None: no limit).  Raises
        TimeoutError at the deadline; on any exception the caller does not hold the turn."""
        with self._lock:
            if not self._busy:
                self._busy = True
                return
            loop = asyncio.get_running_loop()
            waiter = _TurnWaiter(loop.create_future(), loop)
            self._queue.append(waiter)
        try:
            if deadline is None:
                await waiter.fut
            else:
                async with asyncio.timeout_at(deadline):
                    await waiter.fut
        except BaseException:
            self._give_up(waiter)
            raise

    def _give_up(self, waiter: _TurnWaiter) -> None:
        with self._lock:
            try:
                self._queue.remove(waiter)
                return  # never had it
            except ValueError:
                pass
        # Handed to us meanwhile, or the handover is scheduled on our loop: pass it on.
        fut = waiter.fut
        if not fut.done():
            fut.cancel()  # the scheduled delivery finds it cancelled and passes the turn on
        elif not fut.cancelled():
            self.give()

    def give(self) -> None:
        """Pass the turn to the oldest coroutine still waiting for it (any thread)."""
        with self._lock:
            queue = self._queue
            while queue:
                waiter = queue.popleft()
                if not waiter.fut.done() and waiter.hand(self):
                    return
            self._busy = False


class _TurnWaiter:
    __slots__ = ("fut", "loop", "thread")

    def __init__(self, fut: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        self.fut = fut
        self.loop = loop
        self.thread = threading.get_ident()

    def hand(self, turn: ChainTurn) -> bool:
        """Give the turn to this waiter; False when its loop is closed."""
        if threading.get_ident() == self.thread:
            _deliver_turn(self.fut, turn)
            return True
        try:
            self.loop.call_soon_threadsafe(_deliver_turn, self.fut, turn)
        except RuntimeError:  # its loop is closed
            return False
        return True


def _deliver_turn(fut: asyncio.Future[None], turn: ChainTurn) -> None:
    if fut.done():  # gave up meanwhile: the next one's turn
        turn.give()
    else:
        fut.set_result(None)
