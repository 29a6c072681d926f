"""A coroutine waiting in ``BufferPool.acquire_async`` for a slot: FIFO per size class."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._leak import Site
    from ._lease import Lease

__all__ = ["Waiter", "deliver"]


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
