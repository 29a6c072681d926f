"""One size class's arena: its slots, free list, quarantine, waiters and counters.

Each slot is its own preallocated ``bytearray`` of ``slot_size`` bytes, allocated in chunks of
``chunk_slots``.  Per-slot objects are what makes view tracking exact (see ``_tracking``) and
let ``trim`` give back any idle slot, with no fragmentation pinning a whole chunk.

Free list: LIFO (the most recently used slot is the warmest in cache).  Quarantine: released
slots that some view still references, rescanned on a miss: O(quarantined) per scan.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from ._impl import speedups
from ._tracking import holders

if TYPE_CHECKING:
    from ._waiters import Waiter

    _TierBase = object
else:
    # With the compiled core the fields live in C (``_speedups.TierCore``) so its hot paths
    # read the counters as C integers; the methods below are the same either way.
    _TierBase = object if speedups is None else speedups.TierCore

__all__ = ["Tier"]

#: Target bytes per growth chunk; a chunk holds 1..CHUNK_MAX_SLOTS slots.
CHUNK_BYTES = 128 * 1024
CHUNK_MAX_SLOTS = 64


class Tier(_TierBase):
    __slots__ = () if speedups is not None else (
        "chunk_slots",
        "extra_served",
        "free",
        "high_water",
        "hits",
        "in_use",
        "index",
        "min_slots",
        "misses",
        "quarantine",
        "requested_bytes",
        "size",
        "slot_size",
        "slots",
        "spills",
        "waiters",
        "zeros",
    )

    def __init__(self, index: int, size: int, slot_size: int, min_slots: int) -> None:
        self.index = index
        self.size = size
        self.slot_size = slot_size
        self.min_slots = min_slots
        self.chunk_slots = max(1, min(CHUNK_MAX_SLOTS, CHUNK_BYTES // slot_size))
        self.free: list[bytearray] = []
        self.quarantine: list[bytearray] = []
        self.waiters: deque[Waiter] = deque()
        self.slots = 0
        self.in_use = 0
        self.high_water = 0
        self.hits = 0
        self.misses = 0
        self.spills = 0
        self.extra_served = 0  # leases served by growth or as a spill target
        self.requested_bytes = 0
        self.zeros = b""

    def add_slots(self, n: int) -> None:
        """Allocate ``n`` zeroed slots onto the free list."""
        size = self.slot_size
        self.free.extend([bytearray(size) for _ in range(n)])
        self.slots += n

    def reclaim(self, scrub: bool) -> int:
        """Move quarantined slots that no view references any more to the free list."""
        q = self.quarantine
        if not q:
            return 0
        keep: list[bytearray] = []
        free = self.free
        moved = 0
        while q:
            buf = q.pop()
            # References now: the local ``buf`` only, unless a view is still alive.
            if holders(buf) == 1:
                if scrub:
                    buf[:] = self.zeros
                free.append(buf)
                moved += 1
            else:
                keep.append(buf)
        q.extend(keep)
        return moved

    def drop_free(self, n: int) -> int:
        """Drop up to ``n`` free slots (coldest first); returns how many were dropped."""
        n = min(n, len(self.free))
        if n > 0:
            del self.free[:n]
            self.slots -= n
        return max(n, 0)
