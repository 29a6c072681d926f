"""Leases: the handle to one pool slot (``Lease``) or to several (``LeaseChain``).

Lifetime: a lease is live from ``acquire`` until its refcount drops to zero through
``release()`` (or the ``with`` block ends).  ``lease.view`` is valid only while the lease is
live; a view kept past that keeps its old bytes (the slot is quarantined until the view dies)
and never aliases the slot's next owner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from operator import index
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, SupportsIndex

from ._errors import LeaseReleasedError
from ._impl import speedups
from ._leak import Site
from ._lock import GIVE, hot_section, own_section_holds
from ._tracking import OVERHEAD, getrefcount

if TYPE_CHECKING:
    from ._pool import BufferPool
    from ._tier import Tier

__all__ = [
    "Lease",
    "LeaseChain",
    "PyLease",
    "detach",
    "new_lease",
    "release_locked",
    "set_refcount",
]

#: ``getrefcount(buf)`` in ``Lease.release`` when only its local ``buf`` holds the slot.
ALONE = OVERHEAD + 1


NEW_MESSAGE = (
    "bufpool.Lease cannot be created directly: leases come from BufferPool.acquire(), "
    "acquire_async(), acquire_chain() and acquire_chain_async()"
)


def _read_only(name: str) -> property:
    """A read-only view of an internal field (the same on the compiled lease): writes used to
    reach state the pool trusts (a view past the lease's length, a negative heap count)."""
    slot = f"_Lease__{name.lstrip('_')}"

    def get(self: Lease) -> Any:
        return getattr(self, slot, None)

    def refuse(self: Lease, *value: object) -> NoReturn:
        raise AttributeError(f"Lease.{name} is internal state of the pool and read-only")

    return property(get, refuse, refuse)


class Lease:
    """One slot of pool memory (or a heap buffer when the pool fell back), ``len(lease)``
    bytes visible through ``lease.view``.

    Refcounted: ``retain()`` adds an owner, ``release()`` drops one; the slot goes back to the
    pool when the count reaches zero *and* no memoryview of it is alive any more.

    Made only by the pool (``BufferPool.acquire`` and friends); its state lives in private
    slots and changes only through its methods or the pool's locked sections (``new_lease``,
    ``set_refcount``, ``detach``); ``_pool``, ``_size`` and the other internal names read it
    and refuse writes.
    """

    # Private (mangled) names, spelled out so that code outside the class can too.
    __slots__ = ("_Lease__buf", "_Lease__pool", "_Lease__refcount", "_Lease__site",
                 "_Lease__size", "_Lease__tier", "_Lease__view", "__weakref__")

    _Lease__pool: BufferPool
    _Lease__tier: Tier | None
    _Lease__buf: bytearray | None
    _Lease__view: memoryview | None
    _Lease__size: int
    _Lease__refcount: int
    _Lease__site: Site | None

    _pool = _read_only("_pool")
    _tier = _read_only("_tier")
    _buf = _read_only("_buf")
    _view = _read_only("_view")
    _site = _read_only("_site")
    _size = _read_only("_size")
    _refcount = _read_only("_refcount")

    def __new__(cls, *args: object, **kwargs: object) -> Lease:
        raise TypeError(NEW_MESSAGE)

    @property
    def view(self) -> memoryview:
        """Writable memoryview of exactly ``len(self)`` bytes, format "B".

        Valid until the last ``release()``; raises LeaseReleasedError after it.
        """
        view = self._Lease__view
        if view is not None:
            return view
        # Made on first use.  The local ``buf`` is a holder of the slot while the view is
        # made, so a release by another thread meanwhile quarantines it; stored before the
        # check, so a release after the check drops it and one before it is seen.
        buf = self._Lease__buf
        if buf is None:
            raise LeaseReleasedError(f"{self!r}: .view used after the lease was released")
        view = memoryview(buf)
        size = self._Lease__size
        if size != len(buf):
            view = view[:size]
        self._Lease__view = view
        if self._Lease__buf is not buf:
            self._Lease__view = None
            raise LeaseReleasedError(f"{self!r}: .view used after the lease was released")
        return view

    def __len__(self) -> int:
        return self._Lease__size

    @property
    def capacity(self) -> int:
        """Bytes of the backing slot (>= len(self)); 0 once released."""
        buf = self._Lease__buf
        return 0 if buf is None else len(buf)

    @property
    def pooled(self) -> bool:
        """True when backed by a pool slot, False for a heap fallback."""
        return self._Lease__tier is not None

    @property
    def refcount(self) -> int:
        return self._Lease__refcount

    @property
    def released(self) -> bool:
        return self._Lease__refcount <= 0

    def retain(self) -> Lease:
        """Add an owner; each retain needs a matching release.  Returns self."""
        self._Lease__pool._retain(self)
        return self

    def release(self) -> None:
        """Drop one owner; at zero the slot returns to the pool (or to quarantine while any
        view of it is still alive).  Releasing past zero raises LeaseReleasedError.

        Called from a finalizer that the GC ran inside one of this thread's locked pool
        sections (a ``__del__`` or ``weakref.finalize`` that releases a lease), the release is
        queued and done by the pool's next miss, ``stats()``, ``reclaim()`` or ``trim()``.
        """
        # The pure-Python hit path; ``release_locked`` is the reference it hands the rest to.
        # Most likely the last release: our view dies first, outside the token stretch (a
        # weakref callback on it may run pool code).
        if self._Lease__refcount == 1:
            self._Lease__view = None
        pool = self._Lease__pool
        token = pool._token
        try:
            del token[0]; held: list[None] | None = token  # noqa: E702
        except IndexError:  # a locked section runs (maybe this thread's), or another hit path
            _release_contended(self)
            return
        try:
            rc = self._Lease__refcount
            tier = self._Lease__tier
            if rc == 1 and tier is not None and not pool._slow_release:
                self._Lease__refcount = 0
                buf = self._Lease__buf
                self._Lease__buf = None
                self._Lease__view = None  # None already, unless another thread just made one
                tier.in_use -= 1
                # Exactly our ``buf`` (and the call's argument): no view of the slot is alive.
                if getrefcount(buf) == ALONE:
                    tier.free.append(buf)  # type: ignore[arg-type]
                else:
                    tier.quarantine.append(buf)  # type: ignore[arg-type]
                return
            if rc > 1:
                self._Lease__refcount = rc - 1
                return
        finally:
            held = None; token += GIVE  # noqa: E702, F841
        release_locked(self)  # a heap lease, scrub or waiters, or released already

    def truncate(self, size: int, /) -> None:
        """Shrink the visible length to ``size`` bytes (<= len(self)); views taken before keep
        their length."""
        if size.__class__ is not int:
            size = index(size)  # TypeError for what is not an integer
        view = self.view
        if not 0 <= size <= self._Lease__size:
            raise ValueError(f"truncate size must be within 0..{self._Lease__size}, got {size}")
        self._Lease__view = view[:size]
        self._Lease__size = size

    def tobytes(self) -> bytes:
        """Copy of the visible bytes, safe to keep after release."""
        return self.view.tobytes()

    def copy_from(self, data: bytes | bytearray | memoryview, /) -> int:
        """Copy ``data`` (a contiguous bytes-like object of at most ``len(self)`` bytes) to
        the start of the lease's memory without making a view; returns the byte count."""
        buf = self._Lease__buf
        if buf is None:
            raise LeaseReleasedError(f"{self!r}: copy_from() after the lease was released")
        with memoryview(data) as src:
            if not src.c_contiguous:
                raise BufferError("copy_from: data must be C-contiguous")
            flat = src if src.format == "B" and src.ndim == 1 else src.cast("B")
            n = len(flat)
            if n > self._Lease__size:
                raise ValueError(
                    f"copy_from: {n} bytes do not fit the lease's {self._Lease__size} bytes"
                )
            # Through a view of the slot, as ``view`` does: a release by another thread
            # meanwhile sees it and quarantines the slot instead of handing it on.
            with memoryview(buf) as dst:
                if self._Lease__buf is not buf:
                    raise LeaseReleasedError(
                        f"{self!r}: copy_from() after the lease was released"
                    )
                dst[:n] = flat
        return n

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:  # any arguments, as the compiled Lease
        self.release()

    def __del__(self) -> None:
        if self._Lease__refcount > 0:  # queued; the pool decides later (see BufferPool._on_leak)
            try:
                self._Lease__pool._on_leak(self)
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
        tier = self._Lease__tier
        where = f"{tier.size}-byte class" if tier is not None else "heap"
        return (
            f"<Lease {self._Lease__size} B in {where}, refcount {self._Lease__refcount} "
            f"at {id(self):#x}>"
        )


hot_section(Lease.release.__code__)


def release_locked(lease: Lease) -> None:
    """The reference release, under the pool lock (both cores: the compiled ``release``
    calls it whenever the lock is held or the release is not a plain pooled one)."""
    pool: BufferPool = lease._pool
    lock = pool._lock
    if lock._is_owned() and not pool._draining:
        pool._defer_release(lease)
        return
    lock.acquire()
    try:
        rc = lease.refcount
        if rc != 1:
            if rc > 1:
                set_refcount(lease, rc - 1)
                return
            raise LeaseReleasedError(
                f"{lease!r} released more times than retained (refcount {rc})"
            )
        tier: Tier | None = lease._tier
        # The slot's last view dies here unless someone else holds one.
        buf = detach(lease)
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


def _need_lock(pool: BufferPool, what: str) -> None:
    if not pool._lock._is_owned():
        raise RuntimeError(
            f"bufpool internal: {what} changes lease state only inside its pool's locked "
            f"sections"
        )


def _py_new_lease(
    pool: BufferPool, tier: Tier | None, buf: bytearray, size: int, site: Site | None
) -> Lease:
    """A lease of ``buf`` showing ``size`` bytes (pool lock held); its view is made on first
    use.  ``BufferPool.acquire`` builds leases the same way inline on its hot path."""
    _need_lock(pool, "new_lease")
    lease = object.__new__(Lease)
    lease._Lease__pool = pool
    lease._Lease__tier = tier
    lease._Lease__buf = buf
    lease._Lease__view = None
    lease._Lease__size = size
    lease._Lease__refcount = 1
    lease._Lease__site = site
    return lease


def _py_set_refcount(lease: Lease, n: int) -> None:
    """A live lease's owner count (retain, or a release that leaves owners); pool lock held."""
    _need_lock(lease._Lease__pool, "set_refcount")
    if n < 1 or lease._Lease__refcount < 1:
        raise ValueError("set_refcount: a live lease's count stays >= 1")
    lease._Lease__refcount = n


def _py_detach(lease: Lease) -> bytearray | None:
    """The lease's last release (pool lock held): count 0, its view dropped, its slot handed
    to the caller (None if it had none)."""
    _need_lock(lease._Lease__pool, "detach")
    lease._Lease__refcount = 0
    buf = lease._Lease__buf
    lease._Lease__buf = None
    lease._Lease__view = None
    return buf


#: The pure-Python lease: the reference implementation.  The compiled ``Lease`` falls back to
#: ``release_locked`` whenever the pool lock is held or the release needs the slow path.
PyLease = Lease
#: The only ways the pool's locked sections change a lease's state (both cores; each refuses
#: to run unless the caller holds the pool lock).
new_lease: Callable[[BufferPool, Tier | None, bytearray, int, Site | None], Lease]
set_refcount: Callable[[Lease, int], None]
detach: Callable[[Lease], bytearray | None]
if speedups is None:
    new_lease, set_refcount, detach = _py_new_lease, _py_set_refcount, _py_detach
else:
    new_lease, set_refcount, detach = speedups.new_lease, speedups.set_refcount, speedups.detach
    if not TYPE_CHECKING:
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
