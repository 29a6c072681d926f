"""Request bodies the zero-copy receive path wrote straight into pool slots.

Operations: ``ReceivedBody`` is the payload (``request.content``) of a fast-path request: the
kernel writes the body into slots leased one at a time as ``get_buffer`` needs room (never the
whole Content-Length up front); ``take()`` hands the slots to ``read_body`` without a copy;
any ``StreamReader`` read (``request.read()``, ``request.content.*``, multipart, streaming
handlers) first turns what is held into ``bytes`` chunks (one copy, as aiohttp's parser makes)
and from then on it behaves as aiohttp's own ``StreamReader``.

``SlotSource`` is the one question the receive path asks about memory ("lease the next slot
of this body"), kept small so an admission policy can answer it instead of the pool
(``PoolSlots`` answers it simply: the pool, and ``acquire_timeout``).

Lifetime: slots belong to the ReceivedBody until ``take()`` (then to the request, released when
it ends) or until the body fails, is abandoned (aiohttp calls ``set_exception`` after the
response) or the connection is lost: all release at once.  Bounds: O(body bytes) work; memory
held is what arrived plus at most one partly filled slot.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import hdrs, web
from aiohttp.streams import StreamReader

from .._errors import PoolExhausted
from .._lease import Lease, LeaseChain
from .._pool import BufferPool

if TYPE_CHECKING:
    from ._fastpath import ZeroCopyProtocol

__all__ = ["PoolSlots", "ReceivedBody", "SlotSource"]


class SlotSource(Protocol):
    """Where a body's slots come from: one slot at a time, as bytes arrive.

    ``lease_now`` answers at once (None: no room now, the caller pauses reading and asks
    ``lease_wait``); ``lease_wait`` raises ``web.HTTPException`` (503) when no room comes.
    """

    def lease_now(self, size: int, /) -> Lease | None: ...

    async def lease_wait(self, size: int, /) -> Lease: ...


class PoolSlots:
    """``SlotSource`` over a BufferPool: a "raise" pool is asked synchronously first; a wait
    lasts at most ``acquire_timeout`` seconds, then 503 with Retry-After."""

    __slots__ = ("_pool", "_retry_after", "_sync", "_timeout")

    def __init__(self, pool: BufferPool, acquire_timeout: float | None, retry_after: int) -> None:
        self._pool = pool
        self._timeout = acquire_timeout
        self._retry_after = retry_after
        self._sync = pool.on_exhausted == "raise"

    def lease_now(self, size: int, /) -> Lease | None:
        if not self._sync:
            return None
        try:
            return self._pool.acquire(size)
        except PoolExhausted:
            return None

    async def lease_wait(self, size: int, /) -> Lease:
        try:
            return await self._pool.acquire_async(size, timeout=self._timeout)
        except PoolExhausted as exc:
            raise web.HTTPServiceUnavailable(
                headers={hdrs.RETRY_AFTER: str(self._retry_after)},
                text=(
                    f"no buffer memory for the next {size} bytes of request body within "
                    f"acquire_timeout={self._timeout} s; retry later ({exc})"
                ),
            ) from None


# Modes of a ReceivedBody.
HELD = 0  # bytes in slots, nobody read them yet
TAKEN = 1  # read_body took the slots
STREAM = 2  # a StreamReader method was used: behaves as aiohttp's StreamReader
FAILED = 3  # failed, abandoned or disconnected: nothing held


class ReceivedBody(StreamReader):
    """A fast-path request's payload: Content-Length bytes received into pool slots.

    Valid as ``request.content`` for the request's lifetime.  ``length`` is the declared size
    in bytes, ``received`` how many have arrived.
    """

    __slots__ = (
        "_complete",
        "_conn",
        "_done",
        "_failure",
        "_fill",
        "_largest",
        "_leases",
        "_mode",
        "_overflow",
        "length",
        "received",
        "waiting",
    )

    def __init__(
        self, conn: ZeroCopyProtocol, length: int, largest: int, limit: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(conn, limit, loop=loop)  # type: ignore[arg-type]
        self._conn = conn
        self.length = length
        self.received = 0
        self._largest = largest
        self._leases: list[Lease] = []
        self._fill = 0  # bytes in the last lease
        self._overflow = bytearray()  # bytes that arrived while no slot could be leased
        self._mode = HELD
        self._complete = False
        self._done: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        #: True while the protocol waits for a slot for this body.
        self.waiting = False

    # ------------------------------------------------------------ receiving (the protocol)
    @property
    def remaining(self) -> int:
        return self.length - self.received

    def slot_view(self) -> memoryview | None:
        """Free room of the current slot, at most the bytes still to come; None when a new
        slot is needed and none is free right now (the protocol then waits for one)."""
        if self._mode != HELD or self._overflow:
            return None
        leases = self._leases
        if leases:
            last = leases[-1]
            if self._fill < len(last):
                return last.view[self._fill : self._fill + self.remaining]
        lease = self._conn.slots.lease_now(min(self.remaining, self._largest))
        if lease is None:
            return None
        leases.append(lease)
        self._fill = 0
        return lease.view

    def add_slot(self, lease: Lease) -> None:
        """A slot the protocol waited for; bytes that overflowed meanwhile move into it."""
        if self._mode != HELD:
            lease.release()
            return
        self._leases.append(lease)
        self._fill = 0
        over = self._overflow
        if over:
            k = min(len(over), len(lease))
            lease.view[:k] = over[:k]
            self._fill = k
            del over[:k]
        self._check_complete()

    def slot_filled(self, n: int) -> bool:
        """``n`` bytes were written into the view ``slot_view`` returned; True at the end."""
        self._fill += n
        self.received += n
        self.total_bytes += n
        if self.received >= self.length:
            self._check_complete()
            return True
        return False

    def bytes_arrived(self, data: bytes | bytearray | memoryview) -> bool:
        """Body bytes that arrived outside a slot (behind a head, into scratch): copied into
        slots (or the overflow while none is free), or fed as ``bytes`` in STREAM mode.
        ``data`` is at most ``remaining`` bytes.  True once all ``length`` bytes arrived."""
        n = len(data)
        mode = self._mode
        if mode == STREAM:
            self.received += n
            StreamReader.feed_data(self, bytes(data))
            if self.received >= self.length:
                self._finish()
                return True
            return False
        if mode != FAILED:
            p = 0
            view: memoryview | None = None
            src = memoryview(data)
            while p < n:
                view = self.slot_view()
                if view is None:
                    self._overflow += src[p:]
                    break
                k = min(len(view), n - p)
                view[:k] = src[p : p + k]
                self._fill += k
                p += k
            del view
            src.release()
        self.received += n
        self.total_bytes += n
        if self.received >= self.length:
            self._check_complete()
            return True
        return False

    @property
    def needs_slot(self) -> bool:
        """True when arrived bytes wait in the overflow for a slot (none was free)."""
        return bool(self._overflow) and self._mode == HELD

    def next_slot_size(self) -> int:
        """Size of the slot to wait for: what waits in the overflow plus what is still to
        come, at most the largest class."""
        return min(len(self._overflow) + self.remaining, self._largest)

    def _check_complete(self) -> None:
        if self.received >= self.length and not self._overflow and not self._complete:
            self._finish()

    def _finish(self) -> None:
        self._complete = True
        if self._mode == STREAM:
            StreamReader.feed_eof(self)
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """The body cannot complete (deadline, no memory, disconnect): release everything;
        readers and ``read_body`` get ``exc``."""
        if self._failure is None:
            self._failure = exc
        self._release_all()
        self._mode = FAILED
        done = self._done
        if done is not None and not done.done():
            done.set_exception(exc)
            done.exception()  # retrieved: nobody may be waiting
        StreamReader.set_exception(self, exc)

    def _release_all(self) -> None:
        leases, self._leases = self._leases, []
        self._overflow = bytearray()
        for lease in leases:
            if not lease.released:
                lease.release()

    # ------------------------------------------------------------ read_body
    async def take(self) -> Lease | LeaseChain | None:
        """Wait for the whole body; hand its slots over (no copy).  The caller owns them."""
        if self._mode == HELD and not self._complete:
            if self._done is None:
                self._done = self._loop.create_future()
            self._conn.body_wanted(self)
            await asyncio.shield(self._done)
        if self._mode == FAILED:
            assert self._failure is not None
            raise self._failure
        if self._mode != HELD:
            raise RuntimeError("the body was already read through request.content")
        leases, self._leases = self._leases, []
        self._mode = TAKEN
        StreamReader.feed_eof(self)
        if not leases:
            return None
        leases[-1].truncate(self._fill)
        if len(leases) == 1:
            return leases[0]
        return LeaseChain(leases)

    @property
    def holds(self) -> bool:
        """True while this body may still hold slots (nobody took or streamed it yet)."""
        return self._mode == HELD

    @property
    def taken(self) -> bool:
        return self._mode == TAKEN

    @property
    def streaming(self) -> bool:
        return self._mode == STREAM

    # ------------------------------------------------------------ StreamReader behaviour
    def _to_stream(self) -> None:
        """First StreamReader use: what the slots hold becomes ``bytes`` chunks (one copy)."""
        if self._mode != HELD:
            return
        self._mode = STREAM
        leases, self._leases = self._leases, []
        last = len(leases) - 1
        for i, lease in enumerate(leases):
            view = lease.view if i < last else lease.view[: self._fill]
            if len(view):
                StreamReader.feed_data(self, bytes(view))
            del view
            lease.release()
        if self._overflow:
            StreamReader.feed_data(self, bytes(self._overflow))
            self._overflow = bytearray()
        self._conn.body_streaming(self)
        if self.received >= self.length:
            self._finish()

    def is_eof(self) -> bool:
        return self._eof or self._complete or self._mode == FAILED

    async def _wait(self, func_name: str) -> None:
        if self._mode == HELD:
            self._conn.body_wanted(self)  # an Expect: 100-continue body's clock starts
            self._to_stream()
            if self._buffer or self._eof:
                return
        if self._exception is not None:
            raise self._exception
        await super()._wait(func_name)

    def read_nowait(self, n: int = -1) -> bytes:
        self._to_stream()
        return super().read_nowait(n)

    async def wait_eof(self) -> None:
        self._to_stream()
        await super().wait_eof()

    def set_exception(self, exc: BaseException, *args: Any) -> None:
        # aiohttp calls this when the request ends (PayloadAccessError) and on disconnect.
        if self._mode == STREAM:
            StreamReader.set_exception(self, exc)
            self._conn.body_abandoned(self)
            return
        if self._mode == TAKEN:
            StreamReader.set_exception(self, exc)
            return
        if not self._complete:
            self._conn.body_abandoned(self)
        self.fail(exc)

    def __repr__(self) -> str:
        mode = ("held", "taken", "stream", "failed")[self._mode]
        return f"<ReceivedBody {self.received}/{self.length} B {mode}>"
