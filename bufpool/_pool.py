"""BufferPool: size-classed slots under a byte budget, handed out as leases.

Operations and costs: ``acquire``/``release`` are O(1) on a hit (a list pop/append under the
pool lock's token, one Lease object; the memoryview is made on the first ``lease.view``); a
miss scans the class's quarantine (O(quarantined)), then grows by one chunk, then applies
``on_exhausted``.  Memory is bounded: at most ``max_bytes`` in pooled slots plus at most
``max_heap_bytes`` (by default as much again) in heap fallbacks, both counted until the last
view of the memory dies.

The central promise: a released slot is handed to a new owner only when no memoryview of its
previous contents is alive anywhere (user code, a slice, a transport's write queue).  Until
then it sits in quarantine.  See ``_tracking`` for how that is detected.
"""

from __future__ import annotations

import asyncio
import warnings
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final, Literal

from ._classes import DEFAULT_CLASSES, build_classes
from ._errors import (
    ChainTooLarge,
    LeakWarning,
    LeaseReleasedError,
    PoolExhausted,
    RequestTooLarge,
)
from ._heap import HeapBudget
from ._impl import new_lock, speedups
from ._leak import _PKG_DIR, LEVELS, SAMPLE_INTERVAL, SITE_DEPTH, Site, capture_site, format_site
from ._lease import Lease, LeaseChain, detach, new_lease, release_locked, set_refcount
from ._lock import GIVE, hot_section
from ._stats import PoolStats, TierStats
from ._tier import Tier
from ._tracking import holders
from ._waiters import ChainTurn, Waiter

__all__ = ["BufferPool", "report_leaks"]

Policy = Literal["spill", "heap", "raise"]
LeakLevel = Literal["off", "sample", "paranoid"]
POLICIES: Final = ("spill", "heap", "raise")

#: Default budget over all arenas: generous for a server, still a bound.
DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024
#: Default preallocation per class in bytes (about 0.8 MiB over the six default classes).
DEFAULT_INITIAL_BYTES_PER_CLASS: Final = 128 * 1024
#: While coroutines wait and a slot sits in quarantine (it comes back when its last view dies,
#: which no call reports), quarantine is rechecked this often (seconds).  Nothing is polled
#: while nothing is quarantined: releases, trims and leaks wake the waiters themselves.
WAITER_POLL_INTERVAL: Final = 0.002

_new_lease = object.__new__
#: Distinct request sizes ``acquire`` remembers the tier of (others take ``bisect``).
SIZE_CACHE_MAX: Final = 4096
_pools: weakref.WeakSet[BufferPool] = weakref.WeakSet()



def report_leaks() -> int:
    """Report pending leaks of every live pool now (as LeakWarning); returns how many."""
    return sum(pool._collect_leaks() for pool in list(_pools))


if TYPE_CHECKING:
    _PoolBase = object
else:
    # The compiled base (``_speedups.PoolCore``) holds acquire's hit path and the fields it reads.
    _PoolBase = object if speedups is None else speedups.PoolCore


class BufferPool(_PoolBase):
    """A pool of byte buffers in six size classes (64 B .. 64 KiB by default).

    Keyword-only options:

    classes
        Nominal class sizes in bytes, strictly increasing.
    headroom
        Extra bytes per slot by class size; default ``{16384: 2053}`` so the 16 KiB class holds
        a maximal TLS 1.2 record with its header (18,437 bytes).
    initial_slots
        Slots preallocated per class: an int for every class or a mapping size -> count.
        Default: about 128 KiB per class.
    max_bytes
        Budget over all slots, in bytes (default 256 MiB).
    max_heap_bytes
        Budget of heap fallbacks, in bytes: unpooled leases alive (or still viewed) at once.
        Default None: the same as ``max_bytes``, so a pool never holds more than twice
        ``max_bytes`` in all.  Pass ``sys.maxsize`` for no bound (the behaviour before it).
    on_exhausted
        What ``acquire`` does when the class has no free slot and the budget is spent:
        "spill" (try larger classes, then raise), "heap" (unpooled bytearray within
        ``max_heap_bytes``, then raise; the default) or "raise" (PoolExhausted).
    leak_detection
        "off", "sample" (default) or "paranoid"; see ``bufpool._leak``.
    scrub
        Zero a slot's bytes before it is handed to a new owner.
    """

    def __init__(
        self,
        *,
        classes: Iterable[int] = DEFAULT_CLASSES,
        headroom: Mapping[int, int] | None = None,
        initial_slots: int | Mapping[int, int] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_heap_bytes: int | None = None,
        on_exhausted: Policy = "heap",
        leak_detection: LeakLevel = "sample",
        scrub: bool = False,
    ) -> None:
        size_classes = build_classes(classes, headroom)
        if on_exhausted not in POLICIES:
            raise ValueError(f"on_exhausted must be one of {POLICIES}, got {on_exhausted!r}")
        if leak_detection not in LEVELS:
            raise ValueError(f"leak_detection must be one of {LEVELS}, got {leak_detection!r}")
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        if max_heap_bytes is None:
            max_heap_bytes = max_bytes
        elif not isinstance(max_heap_bytes, int) or max_heap_bytes < 0:
            raise ValueError(
                f"max_heap_bytes must be a non-negative int or None, got {max_heap_bytes!r}"
            )
        # At most 30 instance attributes (CPython's limit for key-sharing instance dicts):
        # past it every attribute read of the pure-Python hot paths gets slower.
        self._policy: Policy = on_exhausted
        self._leak_level: LeakLevel = leak_detection
        self._scrub = bool(scrub)
        self._max_bytes = max_bytes
        self._lock = new_lock()
        self._tiers = tuple(
            Tier(i, c.size, c.slot_size, 0) for i, c in enumerate(size_classes)
        )
        self._slot_sizes = tuple(t.slot_size for t in self._tiers)
        self._classes = tuple(t.size for t in self._tiers)
        self._reserved = 0
        #: Heap fallbacks: counters, bytes and their budget (``_heap``).
        self._heap = HeapBudget(max_heap_bytes)
        self._leaked = 0
        self._timeouts = 0
        self._trimmed = 0
        self._waiting = 0
        #: Release must take the slow path (scrub, or hand slots to waiters).
        self._slow_release = self._scrub
        #: Leases the GC finalized unreleased (False) and releases deferred from finalizers
        #: that ran inside this thread's locked sections (True); see ``_drain_leaks``.
        self._pending_leaks: deque[tuple[Lease, bool]] = deque()
        self._leak_reports: list[tuple[int, Site | None]] = []
        self._deferred_errors: list[str] = []
        #: True while ``_drain_leaks`` does deferred releases (the lock is ours: re-entered).
        self._draining = False
        #: Loops with a poll armed, and how many coroutines wait on each loop.
        self._pollers: set[asyncio.AbstractEventLoop] = set()
        self._loop_waiters: dict[asyncio.AbstractEventLoop, int] = {}
        #: ``_serve_waiters`` is running (on the lock's owner) / a nested call asked for more.
        self._serving = False
        self._serve_again = False
        #: Chains of several slots wait for their slots one chain at a time.
        self._chain_turn = ChainTurn(self._lock)
        self._sampling = leak_detection != "off"
        self._interval = 1 if leak_detection == "paranoid" else SAMPLE_INTERVAL
        self._countdown = self._interval
        #: Request size -> its tier, filled by ``acquire`` (the pure-Python hit path's route).
        self._tier_by_size: dict[int, Tier] = {}
        #: The pure-Python hit paths' share of the lock (see ``_lock``); the compiled core
        #: has no token and never reads it.
        token: list[None] | None = getattr(self._lock, "token", None)
        self._token = [None] if token is None else token
        for tier in self._tiers:
            if scrub:
                tier.zeros = bytes(tier.slot_size)
            want = self._initial_count(tier, initial_slots)
            if want < 0:
                raise ValueError(f"initial_slots must be >= 0, got {want} for class {tier.size}")
            want = min(want, (max_bytes - self._reserved) // tier.slot_size)
            tier.add_slots(want)
            tier.min_slots = want
            self._reserved += want * tier.slot_size
        _pools.add(self)

    @staticmethod
    def _initial_count(tier: Tier, spec: int | Mapping[int, int] | None) -> int:
        if spec is None:
            return max(1, DEFAULT_INITIAL_BYTES_PER_CLASS // tier.slot_size)
        if isinstance(spec, int):
            return spec
        return int(spec.get(tier.size, 0))

    # ------------------------------------------------------------------ properties
    @property
    def classes(self) -> tuple[int, ...]:
        """Nominal class sizes in bytes."""
        return self._classes

    @property
    def slot_sizes(self) -> tuple[int, ...]:
        """Bytes reserved per slot of each class (size + headroom)."""
        return self._slot_sizes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def max_heap_bytes(self) -> int:
        return self._heap.limit

    @property
    def on_exhausted(self) -> Policy:
        return self._policy

    @property
    def leak_detection(self) -> LeakLevel:
        return self._leak_level

    @property
    def scrub(self) -> bool:
        return self._scrub

    # ------------------------------------------------------------------ acquire
    def acquire(self, size: int, /) -> Lease:
        """Lease ``size`` bytes from the smallest class whose slot fits.

        When that class has no free slot: reclaim quarantine, grow within the budget, then
        follow ``on_exhausted``.  Requests above the largest class are served from the heap
        (counted as ``oversize``) unless the policy is "raise" (RequestTooLarge).
        """
        # The pure-Python hit path (the compiled core replaces this method).  Pool state is
        # touched only while this frame holds the token (see ``_lock``; ``held`` says so),
        # and every statement of that stretch leaves it consistent: a finalizer or tracer
        # that runs between two of them on this thread re-enters (or queues its release).
        if size.__class__ is not int:
            _bad_size(size)
        tier = self._tier_by_size.get(size)
        if tier is None:  # not seen yet, negative, or above the largest class
            tier = self._route(size)
            if tier is None:
                return self._oversize_lease(size, self._sample_site())
        left = self._countdown - 1
        if left:
            self._countdown = left
            site = None
        else:
            site = self._sampled()
        token = self._token
        try:
            del token[0]; held: list[None] | None = token  # noqa: E702
        except IndexError:  # a locked section runs (or another thread's hit path)
            return self._acquire_slow(tier.index, size, site)
        try:
            try:
                buf = tier.free.pop()
                tier.hits += 1
                tier.in_use = n = tier.in_use + 1
                if n > tier.high_water:
                    tier.high_water = n
                tier.requested_bytes += size
            finally:
                held = None; token += GIVE  # noqa: E702, F841
        except IndexError:  # no free slot (from pop): the miss path, under the lock
            return self._acquire_slow(tier.index, size, site)
        lease = _new_lease(Lease)  # as ``new_lease``, inline
        lease._Lease__pool = self
        lease._Lease__tier = tier
        lease._Lease__buf = buf
        lease._Lease__view = None  # made on first use of .view
        lease._Lease__size = size
        lease._Lease__refcount = 1
        lease._Lease__site = site
        return lease

    def _route(self, size: int) -> Tier | None:
        """The tier for ``size`` bytes (remembered in ``_tier_by_size``), None above the
        largest class; raises for a negative size (``acquire`` checked the type)."""
        if size < 0:
            _bad_size(size)
        i = bisect_left(self._slot_sizes, size)
        if i == len(self._tiers):
            return None
        tier = self._tiers[i]
        cache = self._tier_by_size
        if len(cache) < SIZE_CACHE_MAX:
            cache[size] = tier
        return tier

    def _acquire_slow(self, i: int, size: int, site: Site | None) -> Lease:
        """Both ``acquire``s call this when the lock (or its token) is taken or class ``i``
        has no free slot (``size`` and ``site`` already checked and sampled): the locked
        version of the hit path, then the miss path."""
        tier = self._tiers[i]
        with self._lock:
            if tier.free:
                buf = tier.free.pop()
                tier.hits += 1
            else:
                served = self._take_slot(i, size)
                if served is None:
                    return self._heap_lease(size, site, tier)
                buf, tier = served
            return self._pooled_lease(buf, tier, size, site)

    def _sample_site(self) -> Site | None:
        """The caller's acquisition site when this lease is sampled (as ``acquire`` inlines).

        The countdown runs at every level; only "sample" and "paranoid" record a site."""
        left = self._countdown - 1
        if left:
            self._countdown = left
            return None
        return self._sampled()

    def _sampled(self) -> Site | None:
        """The countdown reached zero: restart it; the site unless leak detection is off."""
        self._countdown = self._interval
        return capture_site() if self._sampling else None

    def _take_slot(self, i: int, size: int) -> tuple[bytearray, Tier] | None:
        """Miss path (lock held): a slot for class ``i`` or a larger one under "spill", or
        None when the heap should serve.  Raises PoolExhausted under "raise"."""
        tier = self._tiers[i]
        if self._pending_leaks:
            self._drain_leaks()  # deferred releases may put slots on the free list
        if tier.free or (tier.quarantine and tier.reclaim(self._scrub)):
            tier.hits += 1
            return tier.free.pop(), tier
        tier.misses += 1
        if self._grow(tier):
            tier.extra_served += 1
            return tier.free.pop(), tier
        if self._policy == "spill":
            for bigger in self._tiers[i + 1 :]:
                buf = self._slot_from(bigger)
                if buf is not None:
                    tier.spills += 1
                    bigger.extra_served += 1
                    return buf, bigger
        if self._policy == "heap":
            return None
        raise PoolExhausted(self._exhausted_message(tier, size))

    def _slot_from(self, tier: Tier) -> bytearray | None:
        """A free slot of ``tier`` after reclaiming quarantine and growing; None if none.
        Counts nothing: callers decide whether it was a hit."""
        if tier.free:
            return tier.free.pop()
        if tier.quarantine and tier.reclaim(self._scrub):
            return tier.free.pop()
        if self._grow(tier):
            return tier.free.pop()
        return None

    def _grow(self, tier: Tier) -> bool:
        n = min(tier.chunk_slots, (self._max_bytes - self._reserved) // tier.slot_size)
        if n <= 0:
            return False
        tier.add_slots(n)
        self._reserved += n * tier.slot_size
        return True

    def _exhausted_message(self, tier: Tier, size: int) -> str:
        quarantined = sum(len(t.quarantine) for t in self._tiers)
        return (
            f"pool exhausted: no free slot for {size} bytes in the {tier.size}-byte class and "
            f"the budget max_bytes={self._max_bytes} is spent ({self._reserved} bytes "
            f"reserved, {tier.in_use} of {tier.slots} slots of this class in use, "
            f"{quarantined} quarantined); on_exhausted={self._policy!r}"
        )

    def _heap_lease(self, size: int, site: Site | None, tier: Tier | None) -> Lease:
        """An unpooled lease within ``max_heap_bytes`` (lock held), for a request of class
        ``tier`` whose budget is spent, or above the largest class (``tier`` None).  Counted
        only once the memory exists."""
        heap = self._heap
        if not heap.has_room(size):
            if tier is not None:
                raise PoolExhausted(
                    self._exhausted_message(tier, size)
                    + f"; heap fallbacks are at max_heap_bytes={heap.limit} "
                    f"({heap.bytes} bytes in heap leases)"
                )
            raise PoolExhausted(
                f"no room for a {size}-byte heap lease (above the largest size class, "
                f"{self._tiers[-1].size} bytes): heap fallbacks are at "
                f"max_heap_bytes={heap.limit} ({heap.bytes} bytes in heap leases)"
            )
        buf = bytearray(size)
        lease = new_lease(self, None, buf, size, site)
        heap.served(size)
        return lease

    def _oversize_lease(self, size: int, site: Site | None) -> Lease:
        largest = self._tiers[-1]
        with self._lock:
            self._heap.oversize += 1
            if self._policy != "raise":
                if size <= self._heap.limit:
                    return self._heap_lease(size, site, None)
                raise RequestTooLarge(
                    f"{size} bytes exceeds the largest size class ({largest.size} bytes, "
                    f"{largest.slot_size}-byte slots) and max_heap_bytes={self._heap.limit} "
                    f"for heap fallbacks; use acquire_chain() for data that may be larger"
                )
        raise RequestTooLarge(
            f"{size} bytes exceeds the largest size class ({largest.size} bytes, "
            f"{largest.slot_size}-byte slots) and on_exhausted='raise'; use "
            f"acquire_chain() for data that may be larger"
        )

    def _check_chain(self, size: int, *, heap: bool) -> None:
        """Raise ChainTooLarge when a ``size``-byte chain can never be served: its pieces
        need more slot bytes than ``max_bytes`` (``heap`` False: only slots may serve it), or
        it is larger than ``max_bytes`` and ``max_heap_bytes`` together (``heap`` True: heap
        fallbacks may serve pieces too; each piece costs at least its size either way)."""
        slot_sizes = self._slot_sizes
        chunk = self._tiers[-1].size
        full, rest = divmod(size, chunk)
        need = full * slot_sizes[bisect_left(slot_sizes, chunk)]
        if rest:
            need += slot_sizes[bisect_left(slot_sizes, rest)]
        if need <= self._max_bytes:
            return
        pieces = full + (1 if rest else 0)
        if not heap:
            raise ChainTooLarge(
                f"a {size}-byte chain needs {need} bytes of slots ({pieces} pieces), more than "
                f"the whole budget max_bytes={self._max_bytes}: it can never be served"
            )
        if size > self._max_bytes + self._heap.limit:
            raise ChainTooLarge(
                f"a {size}-byte chain is larger than the whole budget max_bytes="
                f"{self._max_bytes} plus max_heap_bytes={self._heap.limit}: it can never be "
                f"served"
            )

    def acquire_chain(self, size: int, /) -> LeaseChain:
        """Lease ``size`` bytes (any size) as slots of the largest class, in order.

        Every lease but the last holds the largest class's nominal size.  Never makes one
        giant allocation.  On failure nothing stays acquired; a chain larger than the whole
        budget raises ChainTooLarge at once, taking nothing.
        """
        if size.__class__ is not int or size < 0:
            _bad_size(size)
        self._check_chain(size, heap=self._policy == "heap")
        chunk = self._tiers[-1].size
        leases: list[Lease] = []
        try:
            left = size
            while left > 0:
                n = min(chunk, left)
                leases.append(self.acquire(n))
                left -= n
        except BaseException:
            for lease in leases:
                lease.release()
            raise
        return LeaseChain(leases)

    async def acquire_async(self, size: int, /, *, timeout: float | None = None) -> Lease:
        """Lease ``size`` bytes, waiting (FIFO per class) for a slot when the budget is spent.

        Raises PoolExhausted after ``timeout`` seconds.  A cancelled or timed-out waiter never
        loses a slot: one handed to it in the meantime goes to the next waiter.  Requests above
        the largest class do not wait; they follow ``acquire``.
        """
        if size.__class__ is not int or size < 0:
            _bad_size(size)
        i = bisect_left(self._slot_sizes, size)
        if i >= len(self._tiers):
            return self.acquire(size)
        site = self._sample_site()
        loop = asyncio.get_running_loop()
        with self._lock:
            tier = self._tiers[i]
            if not tier.waiters:
                got = self._take_pooled(i)
                if got is not None:
                    return self._pooled_lease(got[0], got[1], size, site)
            fut: asyncio.Future[Lease] = loop.create_future()
            waiter = Waiter(fut, size, loop, site)
            tier.waiters.append(waiter)
            self._waiting += 1
            self._loop_waiters[loop] = self._loop_waiters.get(loop, 0) + 1
            self._slow_release = True
            if self._silent_returns():
                self._want_poll(loop)
        got_it = False
        try:
            async with asyncio.timeout(timeout):
                lease = await fut
            got_it = True
            return lease
        except TimeoutError:
            with self._lock:
                self._timeouts += 1
            raise PoolExhausted(
                f"no {tier.size}-byte slot for {size} bytes became free within {timeout} s "
                f"(budget max_bytes={self._max_bytes}, {self._reserved} bytes reserved)"
            ) from None
        finally:
            with self._lock:
                self._waiting -= 1
                left = self._loop_waiters[loop] - 1
                if left:
                    self._loop_waiters[loop] = left
                else:
                    del self._loop_waiters[loop]
                if not self._waiting:
                    self._slow_release = self._scrub
                try:
                    tier.waiters.remove(waiter)
                except ValueError:
                    pass
            if not got_it:
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.result().release()  # handed over as we gave up: pass it on

    async def acquire_chain_async(
        self, size: int, /, *, timeout: float | None = None
    ) -> LeaseChain:
        """``acquire_chain`` that waits for slots; ``timeout`` (seconds) bounds the whole call,
        one deadline across all pieces.  Raises PoolExhausted when it passes; on any failure
        nothing stays acquired.

        Chains of several slots take them one at a time while holding the ones they have, so
        such chains wait one after another (FIFO, see ``ChainTurn``): two of them each holding
        part of what the other needs would otherwise wait for each other forever.  When the
        slots are free this arms no timer and waits for nothing.  A chain whose pieces need
        more slot bytes than ``max_bytes`` raises ChainTooLarge at once, waiting for nothing.
        """
        if size.__class__ is not int or size < 0:
            _bad_size(size)
        self._check_chain(size, heap=False)
        chunk = self._tiers[-1].size
        several = size > chunk
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        leases: list[Lease] = []
        try:
            if several:
                try:
                    await self._chain_turn.take(deadline)
                except TimeoutError:
                    with self._lock:
                        self._timeouts += 1
                    raise PoolExhausted("") from None
            try:
                left = size
                while left > 0:
                    n = min(chunk, left)
                    wait = None if deadline is None else max(0.0, deadline - loop.time())
                    leases.append(await self.acquire_async(n, timeout=wait))
                    left -= n
            finally:
                if several:
                    self._chain_turn.give()
        except PoolExhausted:  # the deadline passed (counted once, in ``timeouts``)
            for lease in leases:
                lease.release()
            raise PoolExhausted(
                f"no room for a {size}-byte chain within {timeout} s "
                f"(budget max_bytes={self._max_bytes})"
            ) from None
        except BaseException:
            for lease in leases:
                lease.release()
            raise
        return LeaseChain(leases)

    def _take_pooled(self, i: int) -> tuple[bytearray, Tier] | None:
        """A pooled slot for class ``i`` (spilling under "spill"), or None.  Lock held."""
        if self._pending_leaks:
            self._drain_leaks()
        own = self._tiers[i]
        if own.free or (own.quarantine and own.reclaim(self._scrub)):
            own.hits += 1
            return own.free.pop(), own
        if self._grow(own):
            own.misses += 1
            own.extra_served += 1
            return own.free.pop(), own
        if self._policy == "spill":
            for bigger in self._tiers[i + 1 :]:
                buf = self._slot_from(bigger)
                if buf is not None:
                    own.misses += 1
                    own.spills += 1
                    bigger.extra_served += 1
                    return buf, bigger
        return None

    def _pooled_lease(self, buf: bytearray, tier: Tier, size: int, site: Site | None) -> Lease:
        tier.in_use += 1
        if tier.in_use > tier.high_water:
            tier.high_water = tier.in_use
        tier.requested_bytes += size
        return new_lease(self, tier, buf, size, site)  # the view is made on first use

    def _serve_waiters(self) -> None:
        """Hand free slots to waiting coroutines, oldest first per class.  Lock held.

        Not re-entered: taking a slot can drain deferred releases (``_drain_leaks``), whose
        ``_returned`` asks to serve waiters again.  A nested call only marks that another
        round is due, and the running one does it; otherwise the nested round would serve
        the waiter this round had picked, and this round would hand its slot to nobody."""
        if self._serving:
            self._serve_again = True
            return
        self._serving = True
        try:
            again = True
            while again:
                self._serve_again = False
                self._serve_round()
                again = self._serve_again
        finally:
            self._serving = False

    def _serve_round(self) -> None:
        for tier in self._tiers:
            waiters = tier.waiters
            while waiters:
                w = waiters[0]
                if w.fut.done():
                    waiters.popleft()
                    continue
                got = self._take_pooled(tier.index)
                if got is None:
                    break
                if not waiters or waiters[0] is not w:  # the queue changed meanwhile
                    got[1].free.append(got[0])
                    continue
                waiters.popleft()
                w.hand(self._pooled_lease(got[0], got[1], w.size, w.site))

    def _silent_returns(self) -> bool:
        """Whether a slot may come back with no call to report it (lock held): a quarantined
        one (its last view dies) or a leaked lease queued by a finalizer.  O(classes)."""
        return bool(self._pending_leaks) or any(t.quarantine for t in self._tiers)

    def _want_poll(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm ``loop``'s poll unless armed (lock held; any thread)."""
        if loop in self._pollers:
            return
        self._pollers.add(loop)
        try:
            loop.call_soon_threadsafe(self._arm_poll, loop)
        except RuntimeError:  # its loop is closed
            self._pollers.discard(loop)

    def _want_polls(self) -> None:
        """A slot went to quarantine while coroutines wait (lock held): poll on their loops."""
        for loop in self._loop_waiters:
            self._want_poll(loop)

    def _arm_poll(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_later(WAITER_POLL_INTERVAL, self._poll, loop)

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        """Periodic recheck while coroutines wait on ``loop`` and a slot may come back with no
        call to report it (``_silent_returns``); stops when either ends.  O(classes +
        quarantined) per round, whatever the number of waiters.  A round that raises
        (reported by the loop's exception handler) does not stop the polling."""
        try:
            with self._lock:
                self._serve_waiters()
        finally:
            with self._lock:
                if (
                    self._loop_waiters.get(loop)
                    and self._silent_returns()
                    and not loop.is_closed()
                ):
                    loop.call_later(WAITER_POLL_INTERVAL, self._poll, loop)
                else:
                    self._pollers.discard(loop)

    def _serve_now(self, loop: asyncio.AbstractEventLoop) -> None:
        """A leak was queued while coroutines wait on ``loop`` (scheduled by ``_on_leak``):
        serve them now, and poll if what came back is still viewed."""
        with self._lock:
            self._serve_waiters()
            if self._loop_waiters.get(loop) and self._silent_returns():
                self._want_poll(loop)

    # ------------------------------------------------------------------ release
    def _retain(self, lease: Lease) -> None:
        with self._lock:
            rc = lease.refcount
            if rc <= 0:
                raise LeaseReleasedError(f"{lease!r}: retain() after the lease was released")
            set_refcount(lease, rc + 1)

    def _release(self, lease: Lease) -> None:
        lease.release()

    def _returned(self, tier: Tier, buf: bytearray) -> None:
        """A slot whose last owner released it while some view is alive, or waiters exist
        (lock held): park or hand over."""
        if holders(buf) > 2:  # this frame's ``buf`` and the caller's: anything more is a view
            tier.quarantine.append(buf)
            if self._waiting:
                self._want_polls()  # its last view's death is reported by nobody
            return
        if self._scrub:
            buf[:] = tier.zeros
        tier.free.append(buf)
        if self._waiting:
            self._serve_waiters()

    # ------------------------------------------------------------------ leaks
    def _on_leak(self, lease: Lease) -> None:
        """Called from Lease.__del__ (any thread, maybe with our lock held): queue only.

        The queue keeps the lease alive (resurrects it) instead of taking its slot now: in a
        garbage cycle the GC finalizes objects in no particular order, so another finalizer
        of the same collection may still release this lease; ``_drain_leaks`` decides.
        Coroutines waiting for a slot are woken to drain it (no pool state is touched here:
        ``call_soon_threadsafe`` on their loops)."""
        self._pending_leaks.append((lease, False))
        if self._waiting:
            for loop in tuple(self._loop_waiters):
                try:
                    loop.call_soon_threadsafe(self._serve_now, loop)
                except RuntimeError:  # its loop is closed
                    pass

    def _defer_release(self, lease: Lease) -> None:
        """``lease.release()`` called while this thread holds our lock (from a finalizer the
        GC ran inside a locked section): queue it for ``_drain_leaks``."""
        self._pending_leaks.append((lease, True))

    def _drain_leaks(self) -> list[tuple[int, Site | None]]:
        """Do deferred releases and account leaked leases (lock held): a leaked slot goes to
        quarantine, then back to the free list once no view of it is alive."""
        reports: list[tuple[int, Site | None]] = []
        pending = self._pending_leaks
        leaked: list[Lease] = []
        while pending:  # releases first: a finalizer may release a lease finalized before it
            lease, deferred = pending.popleft()
            if not deferred:
                leaked.append(lease)
                continue
            self._draining = True
            try:
                release_locked(lease)  # re-enters our lock (re-entrant) and releases now
            except LeaseReleasedError as exc:  # no caller left: warned by _collect_leaks
                self._deferred_errors.append(str(exc))
            finally:
                self._draining = False
        for lease in leaked:
            if lease.refcount <= 0:
                continue  # released by a finalizer of the same collection after all
            tier: Tier | None = lease._tier
            buf = detach(lease)
            self._leaked += 1
            if tier is None:
                self._heap.returned(buf)  # type: ignore[arg-type]
            else:
                tier.in_use -= 1
                tier.quarantine.append(buf)  # type: ignore[arg-type]
            reports.append((len(lease), lease._site))
        self._leak_reports.extend(reports)
        if leaked and self._waiting and self._silent_returns():
            self._want_polls()  # leaked slots wait in quarantine for their views
        return reports

    def _collect_leaks(self) -> int:
        """Drain queued leaks and emit one LeakWarning per leaked lease; returns the count."""
        with self._lock:
            self._drain_leaks()
            reports, self._leak_reports = self._leak_reports, []
            errors, self._deferred_errors = self._deferred_errors, []
        for error in errors:
            warnings.warn(f"bufpool: deferred release failed: {error}", RuntimeWarning, 2)
        if self._leak_level != "off":
            for size, site in reports:
                warnings.warn(
                    f"bufpool: a {size}-byte lease was garbage-collected without release(); "
                    f"its slot was returned to the pool. {format_site(site)}",
                    LeakWarning,
                    stacklevel=2,
                )
        return len(reports)

    # ------------------------------------------------------------------ maintenance
    def reclaim(self) -> int:
        """Move quarantined slots whose views have all died back to the free lists now (and
        stop counting released heap buffers whose views have died); returns slots moved."""
        self._collect_leaks()
        with self._lock:
            return self._reclaim_locked()

    def _reclaim_locked(self) -> int:
        """``reclaim`` under the lock: O(quarantined); serves waiters when slots came back."""
        moved = 0
        for t in self._tiers:
            if t.quarantine:
                moved += t.reclaim(self._scrub)
        if self._heap.viewed:
            self._heap.reclaim()
        if moved and self._waiting:
            self._serve_waiters()
        return moved

    def trim(self, *, keep_initial: bool = True) -> int:
        """Give idle slots back to the allocator; returns bytes freed.

        Free slots beyond each class's initial preallocation are dropped (all free slots
        with ``keep_initial=False``).  Slots in use or quarantined are never touched.
        """
        self.reclaim()
        freed = 0
        with self._lock:
            for tier in self._tiers:
                floor = tier.min_slots if keep_initial else 0
                n = tier.drop_free(tier.slots - floor)
                freed += n * tier.slot_size
            self._reserved -= freed
            self._trimmed += freed
            if self._waiting:
                self._serve_waiters()
        return freed

    def stats(self) -> PoolStats:
        """Snapshot of counters; also reports pending leaks (LeakWarning).

        Exact at the moment of the call: quarantined slots whose last view has died are
        reclaimed first (O(quarantined)), so ``quarantined`` counts only slots some view
        still holds, and ``free`` every slot ready to hand out."""
        self._collect_leaks()
        with self._lock:
            self._reclaim_locked()
            heap = self._heap
            tiers = tuple(
                TierStats(
                    size=t.size,
                    slot_size=t.slot_size,
                    slots=t.slots,
                    free=len(t.free),
                    in_use=t.in_use,
                    quarantined=len(t.quarantine),
                    high_water=t.high_water,
                    hits=t.hits,
                    misses=t.misses,
                    spills=t.spills,
                    leased_bytes=(t.hits + t.extra_served) * t.slot_size,
                    requested_bytes=t.requested_bytes,
                )
                for t in self._tiers
            )
            hits = sum(t.hits for t in tiers)
            misses = sum(t.misses for t in tiers) + heap.oversize
            leased = sum(t.leased_bytes for t in tiers)
            requested = sum(t.requested_bytes for t in tiers)
            return PoolStats(
                in_use=sum(t.in_use for t in tiers),
                reserved_bytes=self._reserved,
                max_bytes=self._max_bytes,
                hits=hits,
                misses=misses,
                spills=sum(t.spills for t in tiers),
                heap_fallbacks=heap.fallbacks,
                heap_in_use=heap.in_use,
                heap_bytes=heap.bytes,
                max_heap_bytes=heap.limit,
                oversize=heap.oversize,
                quarantined=sum(t.quarantined for t in tiers),
                leaked=self._leaked,
                waiting=self._waiting + self._chain_turn.waiting,
                timeouts=self._timeouts,
                trimmed_bytes=self._trimmed,
                hit_rate=hits / (hits + misses) if hits + misses else 1.0,
                waste_ratio=(leased - requested) / leased if leased else 0.0,
                tiers=tiers,
            )

    def class_for(self, size: int) -> int | None:
        """Nominal size of the class that serves ``size`` bytes, None above the largest."""
        i = bisect_left(self._slot_sizes, size)
        return self._tiers[i].size if i < len(self._tiers) else None

    def __repr__(self) -> str:
        return (
            f"<BufferPool classes={self.classes} reserved={self._reserved}/{self._max_bytes} B "
            f"policy={self._policy!r}>"
        )


def _bad_size(size: object) -> None:
    """Raise the error for a size that is not a plain non-negative int (both cores call it)."""
    if size.__class__ is int:
        raise ValueError(f"size must be >= 0 bytes, got {size}")
    if isinstance(size, int) and not isinstance(size, bool):
        raise TypeError(
            f"size must be a plain int number of bytes, got {type(size).__name__} "
            f"(an int subclass: pass int(size))"
        )
    raise TypeError(f"size must be an int number of bytes, got {type(size).__name__}")


hot_section(BufferPool.acquire.__code__)

if speedups is not None:
    speedups.setup(
        released_error=LeaseReleasedError,
        py_release=release_locked,
        bad_size=_bad_size,
        pkg_dir=_PKG_DIR,
        site_depth=SITE_DEPTH,
    )
    if not TYPE_CHECKING:
        BufferPool.acquire = speedups.PoolCore.acquire
