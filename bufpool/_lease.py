"""Leases: the handle to one pool slot (``Lease``) or to several (``LeaseChain``).

Lifetime: a lease is live from ``acquire`` until its refcount drops to zero through
``release()`` (or the ``with`` block ends).  ``lease.view`` is valid only while the lease is
live; a view kept past that keeps its old bytes (the slot is quarantined until the view dies)
and never aliases the slot's next owner.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn, SupportsIndex

from ._errors import LeaseReleasedError
from ._impl import speedups
from ._leak import Site
from ._lock import GIVE, hot_section, own_section_holds
from ._tracking import OVERHEAD, getrefcount

if TYPE_CHECKING:
    from ._pool import BufferPool
    from ._tier import Tier

__all__ = ["Lease", "LeaseChain", "PyLease", "release_locked"]

#: ``getrefcount(buf)`` in ``Lease.release`` when only its local ``buf`` holds the slot.
ALONE = OVERHEAD + 1


class Lease:
    """One slot of pool memory (or a heap buffer when the pool fell back), ``len(lease)``
    bytes visible through ``lease.view``.

    Refcounted: ``retain()`` adds an owner, ``release()`` drops one; the slot goes back to the
    pool when the count reaches zero *and* no memoryview of it is alive any more.
    """

    __slots__ = ("__weakref__", "_buf", "_pool", "_refcount", "_site", "_size", "_tier", "_view")

    _pool: BufferPool
    _tier: Tier | None
    _buf: bytearray | None
    _view: memoryview | None
    _size: int
    _refcount: int
    _site: Site | None

    def __init__(
        self,
        pool: BufferPool,
        tier: Tier | None,
        buf: bytearray,
        view: memoryview | None,
        size: int,
        site: Site | None,
    ) -> None:
        # BufferPool.acquire builds leases inline (object.__new__ + these assignments) on its
        # hot path; keep the two in step.
        self._pool = pool
        self._tier = tier
        self._buf = buf
        self._view = view
        self._size = size
        self._refcount = 1
        self._site = site

    @property
    def view(self) -> memoryview:
        """Writable memoryview of exactly ``len(self)`` bytes, format "B".

        Valid until the last ``release()``; raises LeaseReleasedError after it.
        """
        view = self._view
        if view is not None:
            return view
        # Made on first use.  The local ``buf`` is a holder of the slot while the view is
        # made, so a release by another thread meanwhile quarantines it; stored before the
        # check, so a release after the check drops it and one before it is seen.
        buf = self._buf
        if buf is None:
            raise LeaseReleasedError(f"{self!r}: .view used after the lease was released")
        view = memoryview(buf)
        size = self._size
        if size != len(buf):
            view = view[:size]
        self._view = view
        if self._buf is not buf:
            self._view = None
            raise LeaseReleasedError(f"{self!r}: .view used after the lease was released")
        return view

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        """Bytes of the backing slot (>= len(self)); 0 once released."""
        buf = self._buf
        return 0 if buf is None else len(buf)

    @property
    def pooled(self) -> bool:
        """True when backed by a pool slot, False for a heap fallback."""
        return self._tier is not None

    @property
    def refcount(self) -> int:
        return self._refcount

    @property
    def released(self) -> bool:
        return self._refcount <= 0

    def retain(self) -> Lease:
        """Add an owner; each retain needs a matching release.  Returns self."""
        self._pool._retain(self)
        return self

    def release(self) -> None:
        """Drop one owner; at zero the slot returns to the pool (or to quarantine while any
        view of it is still alive).  Releasing past zero raises LeaseReleasedError.

        Called from a finalizer that the GC ran inside one of this thread's locked pool
        sections (a ``__del__`` or ``weakref.finalize`` that releases a lease), the release is
        queued and done by the pool's next miss, ``stats()``, ``reclaim()`` or ``trim()``.
        """
        # The pure-Python hit path; ``release_locked`` is the reference it hands the rest to.
        if self._refcount == 1:  # most likely the last release: our view dies first, outside
            self._view = None  # the token stretch (a weakref callback on it may run pool code)
        pool = self._pool
        token = pool._token
        try:
            del token[0]; held: list[None] | None = token  # noqa: E702
        except IndexError:  # a locked section runs (maybe this thread's), or another hit path
            _release_contended(self)
            return
        try:
            rc = self._refcount
            tier = self._tier
            if rc == 1 and tier is not None and not pool._slow_release:
                self._refcount = 0
                buf = self._buf
                self._buf = None
                self._view = None  # None already, unless another thread just made one
                tier.in_use -= 1
                # Exactly our ``buf`` (and the call's argument): no view of the slot is alive.
                if getrefcount(buf) == ALONE:
                    tier.free.append(buf)  # type: ignore[arg-type]
                else:
                    tier.quarantine.append(buf)  # type: ignore[arg-type]
                return
            if rc > 1:
                self._refcount = rc - 1
                return
        finally:
            held = None; token += GIVE  # noqa: E702, F841
        release_locked(self)  # a heap lease, scrub or waiters, or released already

    def truncate(self, size: int, /) -> None:
        """Shrink the visible length to ``size`` bytes (<= len(self)); views taken before keep
        their length."""
        view = self.view
        if not 0 <= size <= self._size:
            raise ValueError(f"truncate size must be within 0..{self._size}, got {size}")
        self._view = view[:size]
        self._size = size

    def tobytes(self) -> bytes:
        """Copy of the visible bytes, safe to keep after release."""
        return self.view.tobytes()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:  # any arguments, as the compiled Lease
        self.release()

    def __del__(self) -> None:
        if self._refcount > 0:  # queued; the pool decides later (see BufferPool._on_leak)
            try:
                self._pool._on_leak(self)
            except Exception:  # interpreter shutdown: nothing left to report to
                pass

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        # A copy would be a second owner of the slot that the pool never counted (its release
        # put the slot back twice).  The compiled Lease cannot be copied or pickled either;
        # these are its messages (protocols 0 and 1 go through copyreg, 2+ through object).
        name = "Lease" if int(protocol) < 2 else "bufpool.Lease"
        raise TypeError(f"cannot pickle {name!r} object")

    def __reduce__(self) -> NoReturn:
        self.__reduce_ex__(0)

    def __repr__(self) -> str:
        tier = self._tier
        where = f"{tier.size}-byte class" if tier is not None else "heap"
        return f"<Lease {self._size} B in {where}, refcount {self._refcount} at {id(self):#x}>"


hot_section(Lease.release.__code__)


def release_locked(lease: Lease) -> None:
    """The reference release, under the pool lock (both cores: the compiled ``release``
    calls it whenever the lock is held or the release is not a plain pooled one)."""
    pool = lease._pool
    lock = pool._lock
    if lock._is_owned() and not pool._draining:
        pool._defer_release(lease)
        return
    lock.acquire()
    try:
        rc = lease._refcount
        if rc != 1:
            if rc > 1:
                lease._refcount = rc - 1
                return
            raise LeaseReleasedError(
                f"{lease!r} released more times than retained (refcount {rc})"
            )
        lease._refcount = 0
        tier = lease._tier
        buf = lease._buf
        lease._buf = None
        lease._view = None  # the slot's last view dies here unless someone else holds one
        if tier is None:
            pool._heap.returned(buf)  # type: ignore[arg-type]
            return
        tier.in_use -= 1
        if getrefcount(buf) - OVERHEAD == 1 and not pool._slow_release:
            tier.free.append(buf)  # type: ignore[arg-type]
        else:
            pool._returned(tier, buf)  # type: ignore[arg-type]
    finally:
        lock.release()


def _release_contended(lease: Lease) -> None:
    """Pure-Python ``release`` that found the token taken.  Taken by a hit path of this very
    thread (a finalizer or tracer running inside it: see ``_lock``), the release is queued
    like one from this thread's locked sections; otherwise it waits for the lock."""
    pool = lease._pool
    if not pool._lock._is_owned() and own_section_holds(pool._token):
        pool._defer_release(lease)
    else:
        release_locked(lease)


#: The pure-Python lease: the reference implementation.  The compiled ``Lease`` falls back to
#: ``release_locked`` and ``PyLease.truncate`` whenever the pool lock is held or the call
#: needs the slow path.
PyLease = Lease
if not TYPE_CHECKING and speedups is not None:
    Lease = speedups.Lease  # same API; see bufpool._impl


class LeaseChain:
    """Several leases holding one logical buffer of ``len(chain)`` bytes, in order.

    Used for data larger than the largest size class: no single giant allocation is made.
    """

    __slots__ = ("_leases", "_size")

    def __init__(self, leases: list[Lease]) -> None:
        self._leases = leases
        self._size = sum(len(lease) for lease in leases)

    def views(self) -> list[memoryview]:
        """The leases' views, in order; valid until release()."""
        return [lease.view for lease in self._leases]

    def __iter__(self) -> Iterator[memoryview]:
        return iter(self.views())

    @property
    def leases(self) -> tuple[Lease, ...]:
        return tuple(self._leases)

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return sum(lease.capacity for lease in self._leases)

    @property
    def pooled(self) -> bool:
        return all(lease.pooled for lease in self._leases)

    @property
    def released(self) -> bool:
        return any(lease.released for lease in self._leases)

    def tobytes(self) -> bytes:
        """Copy of all bytes joined, safe to keep after release."""
        return b"".join(self.views())

    def release(self) -> None:
        """Release every lease once; a second call raises LeaseReleasedError."""
        if self.released:
            raise LeaseReleasedError(f"{self!r} released twice")
        first: BaseException | None = None
        for lease in self._leases:
            try:
                lease.release()
            except BaseException as exc:  # keep releasing the rest
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> LeaseChain:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<LeaseChain {self._size} B in {len(self._leases)} leases at {id(self):#x}>"
