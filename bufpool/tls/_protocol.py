"""TLSRecordProtocol: an asyncio protocol that hands out one validated TLS record at a time.

Supports: zero-copy receive into a pooled RingBuffer (through
:class:`bufpool.aio.PooledProtocol`), ``record_received(record)`` per complete record in
stream order, the splitter's validation on every header, read flow control
(``pause_reading``/``resume_reading`` from the application, e.g. while a peer it writes to is
slow), pooled writes (``write_lease``), and a clean close on bad input: the error is kept in
``error``, ``record_error(exc)`` is called (by default it closes the transport), no further
byte is parsed.

Lifetime: a record is valid during ``record_received``; its views are released when the read
that delivered it has been dispatched.  Keep one longer with ``record.detach()`` (a pooled
lease you release).  All ring memory goes back to the pool in ``connection_lost``.

Bounds: per connection the ring (``initial_capacity`` bytes at first, doubled whenever a read
finds it full, up to ``capacity`` bytes, default 64 KiB from the start) plus joined records
(a pooled lease per record that wrapped the ring, released after dispatch).  Work per read is
O(1) plus O(1) per record.  After ``pause_reading()`` the records of the read already
received are still delivered (at most ``capacity`` bytes).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from bufpool import RingBuffer
from bufpool.aio import PooledProtocol

from ._errors import TLSRecordError
from ._splitter import MIN_RING_CAPACITY, TLSRecordSplitter, default_pool

if TYPE_CHECKING:
    from bufpool import BufferPool

    from ._records import TLSRecord

__all__ = ["TLSRecordProtocol"]


class TLSRecordProtocol(PooledProtocol):
    """Subclass and override :meth:`record_received` (and optionally :meth:`record_error`,
    :meth:`eof_received`, :meth:`connection_lost` -- call ``super()`` in the last one).

    ``pool`` (default :func:`bufpool.tls.default_pool`), ``tls13_only`` and ``mid_stream``
    configure the splitter (see :class:`TLSRecordSplitter`); ``capacity`` is the ring size in
    bytes (at least 36,874); ``initial_capacity`` (bytes, default ``capacity``) starts the
    ring smaller, so an idle connection holds only that much: it doubles (copying the pending
    bytes once) when a record no longer fits, or when a read filled all the space offered
    (at least a quarter of the ring: the socket had more), up to ``capacity``.
    """

    def __init__(
        self,
        pool: BufferPool | None = None,
        *,
        tls13_only: bool = False,
        mid_stream: bool = False,
        capacity: int = 65536,
        initial_capacity: int | None = None,
    ) -> None:
        if capacity < MIN_RING_CAPACITY:
            raise ValueError(
                f"capacity must be at least {MIN_RING_CAPACITY} bytes (two maximal records), "
                f"got {capacity}"
            )
        if initial_capacity is None:
            initial_capacity = capacity
        elif not 0 < initial_capacity <= capacity:
            raise ValueError(
                f"initial_capacity must be within 1..capacity ({capacity} bytes), "
                f"got {initial_capacity}"
            )
        pool = pool if pool is not None else default_pool()
        super().__init__(pool, capacity=initial_capacity, max_capacity=capacity,
                         resume_below=capacity - 1)
        self._initial = initial_capacity
        self._offered = 0  # bytes of the last get_buffer view
        self._grow_next = False
        if initial_capacity < capacity:  # only rings that may grow pay for the checks
            self.get_buffer = self._get_buffer_growing  # type: ignore[method-assign]
            self.buffer_updated = self._buffer_updated_growing  # type: ignore[method-assign]
        self._tls13_only = tls13_only
        self._mid_stream = mid_stream
        self.splitter: TLSRecordSplitter | None = None
        #: The bad-input error that closed the connection, if any.
        self.error: TLSRecordError | None = None

    # ------------------------------------------------------------------ hooks for subclasses
    def record_received(self, record: TLSRecord) -> None:
        """One complete record; valid only during this call (``detach()`` to keep it)."""

    def record_error(self, exc: TLSRecordError) -> None:
        """Bad input: the splitter stopped.  Default: close the transport (queued writes are
        flushed first).  ``exc.alert`` says which TLS alert fits, ``exc.records`` holds the
        good records that preceded the fault in the same read (already delivered)."""
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ asyncio callbacks
    def _get_buffer_growing(self, sizehint: int) -> memoryview:
        """``get_buffer`` of a ring that started small: first double it if the last read
        filled everything offered and that was at least a quarter of the ring (a bulk sender
        would otherwise be read in initial_capacity-sized pieces)."""
        ring: RingBuffer = self._ring  # type: ignore[assignment]
        if self._grow_next:
            self._grow_next = False
            cap = ring.capacity
            if cap < ring.max_capacity:
                ring.reserve(cap + 1 - len(ring))
        view = ring.get_buffer(sizehint)
        self._offered = len(view)
        return view

    def _buffer_updated_growing(self, nbytes: int) -> None:
        ring = self._ring
        self._grow_next = (
            nbytes == self._offered and ring is not None and nbytes * 4 >= ring.capacity
        )
        PooledProtocol.buffer_updated(self, nbytes)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.splitter = TLSRecordSplitter(
            pool=self.pool, tls13_only=self._tls13_only, mid_stream=self._mid_stream,
            ring=self.ring,
        )

    def data_available(self, ring: RingBuffer) -> None:
        splitter = self.splitter
        if splitter is None or self.error is not None:
            ring.clear()  # after an error nothing more is parsed
            return
        try:
            records = splitter.pull()
        except TLSRecordError as exc:
            self._fail(exc)
            return
        try:
            for record in records:
                self.record_received(record)
        finally:
            splitter.expire()

    def eof_received(self) -> bool | None:
        splitter = self.splitter
        if splitter is not None and self.error is None:
            try:
                splitter.feed_eof()
            except TLSRecordError as exc:
                self._fail(exc)
        return None

    def shrink_ring(self) -> bool:
        """Give a ring that grew back down to ``initial_capacity`` bytes if what it buffers
        fits; True if it shrank.  For a connection gone quiet after a burst: the next burst
        grows it again.  Call it outside ``record_received`` (e.g. from a timer)."""
        ring = self._ring
        self._grow_next = False
        return ring is not None and ring.shrink(self._initial)

    def release_buffers(self) -> None:
        """Give the ring (and the splitter's joined records) back to the pool now, e.g. after
        ``eof_received`` when nothing more will arrive but the write side stays open.  No
        record is parsed afterwards; ``connection_lost`` later finds nothing to release."""
        splitter, self.splitter = self.splitter, None
        if splitter is not None:
            splitter.close()
        ring = self._ring
        if ring is not None:
            ring.close()

    def connection_lost(self, exc: Exception | None) -> None:
        splitter, self.splitter = self.splitter, None
        if splitter is not None:
            splitter.close()
        super().connection_lost(exc)

    def _fail(self, exc: TLSRecordError) -> None:
        # The traceback's frames reach the event loop's receive frame and its get_buffer view:
        # kept, it would pin the ring's slot in quarantine for as long as the error is kept.
        exc.__traceback__ = None
        self.error = exc
        records = getattr(exc, "records", None)
        splitter = self.splitter
        try:
            if records:
                for record in records:
                    self.record_received(record)
        finally:
            if splitter is not None:
                splitter.close()
            self.record_error(exc)
