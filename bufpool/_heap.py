"""Heap fallbacks of one pool: unpooled ``bytearray`` leases, served when no slot can be (policy
"heap" once the slot budget is spent, and requests above the largest class unless the policy is
"raise"), bounded by ``max_heap_bytes``.

A heap lease's bytes count from its acquire until its release *and* the death of its last view:
a released heap buffer that a transport still queues is memory the pool handed out, so the
count never undercounts what is alive.  Released buffers with live views wait in ``viewed``
and ``reclaim`` (O(viewed)) stops counting them once nothing else holds them.  Every method
runs under the pool lock.
"""

from __future__ import annotations

from ._tracking import holders

__all__ = ["HeapBudget"]


class HeapBudget:
    __slots__ = ("bytes", "fallbacks", "in_use", "limit", "oversize", "viewed")

    def __init__(self, limit: int) -> None:
        #: ``max_heap_bytes``: most bytes of heap leases (live or still viewed) at once.
        self.limit = limit
        #: Bytes of heap leases not yet released, plus released ones some view still holds.
        self.bytes = 0
        #: Live heap leases (not yet released).
        self.in_use = 0
        #: Heap leases served, cumulative.
        self.fallbacks = 0
        #: Requests above the largest class, cumulative (served or refused).
        self.oversize = 0
        #: Released heap buffers that some view still references (counted in ``bytes``).
        self.viewed: list[bytearray] = []

    def has_room(self, size: int) -> bool:
        """Whether a heap lease of ``size`` bytes fits under ``limit`` (reclaiming first)."""
        if self.bytes + size <= self.limit:
            return True
        return bool(self.viewed) and self.reclaim() > 0 and self.bytes + size <= self.limit

    def served(self, size: int) -> None:
        """Count a heap lease of ``size`` bytes that now exists."""
        self.fallbacks += 1
        self.in_use += 1
        self.bytes += size

    def returned(self, buf: bytearray) -> None:
        """A heap lease was released (or leaked): stop counting ``buf`` once no view holds it."""
        self.in_use -= 1
        if holders(buf) > 2:  # this frame's ``buf`` and the caller's: anything more is a view
            self.viewed.append(buf)
        else:
            self.bytes -= len(buf)

    def reclaim(self) -> int:
        """Stop counting released buffers whose views have all died; returns bytes freed."""
        viewed = self.viewed
        if not viewed:
            return 0
        keep: list[bytearray] = []
        freed = 0
        while viewed:
            buf = viewed.pop()
            if holders(buf) == 1:  # the local ``buf`` only
                freed += len(buf)
            else:
                keep.append(buf)
        viewed.extend(keep)
        self.bytes -= freed
        return freed
