"""PooledProtocol: an ``asyncio.BufferedProtocol`` that receives straight into a RingBuffer.

Supports: zero-copy receive (the event loop's ``recv_into`` writes into the ring's free
space), a hook called whenever data arrived (``data_available(ring)``), read flow control
(reading pauses when the ring is full at ``max_capacity`` and resumes once the application
has consumed down to ``resume_below`` bytes), an application-level pause
(``pause_reading``/``resume_reading``, e.g. for write backpressure), pooled writes
(``write_lease``) and deterministic release of all ring memory in ``connection_lost`` — which
the loop calls for orderly closes, aborts, resets and fatal errors alike.

Goals: no per-read allocation and no copy on the receive path; identical behaviour on the
default loop and on uvloop (the selector loop asks ``get_buffer(-1)``, uvloop
``get_buffer(65536)``; the hint is advisory and never makes the ring grow).

TLS: behind ``create_server(..., ssl=ctx)`` both loops' SSL transports decrypt straight into
the ``get_buffer`` view (hints: asyncio the ciphertext bytes pending, possibly 0; uvloop that
plus 256), so plaintext lands in the ring's pool memory.  ``connection_made`` runs after the
handshake (a failed one allocates nothing); the peer's close_notify calls ``eof_received``,
after which the transport closes whatever it returns (TLS has no half-close on either loop);
``pause_reading`` stops decryption into the ring while ciphertext buffers in the SSL layer up
to its high-water mark (256 KiB).

Bounds: memory per connection is at most ``max_capacity`` bytes of ring plus the scratch area
of linearizing peeks (at most the largest peek); the work per read is O(1) plus the hook's.

Lifetime: the ring exists from ``connection_made`` to ``connection_lost``; views taken from it
follow the RingBuffer rules (valid until the next consume/peek).  Under uvloop the view handed
out by ``get_buffer`` is still exported while ``buffer_updated`` runs, so nothing here
releases it: references are just dropped.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from .._ring import DEFAULT_MAX_CAPACITY, RingBuffer
from ._writes import drain_complete, write_lease

if TYPE_CHECKING:
    from .._lease import Lease, LeaseChain
    from .._pool import BufferPool

__all__ = ["PooledProtocol"]


class PooledProtocol(asyncio.BufferedProtocol):
    """Base class: override ``data_available(ring)`` and consume what you can there.

    ``pool``: where ring memory comes from (None: plain bytearrays).  ``capacity`` and
    ``max_capacity`` (bytes) size the ring; ``resume_below`` (bytes, default half of
    ``max_capacity``) is how far the buffered data must fall before reading resumes after a
    full-ring pause.

    Subclasses overriding ``connection_made``/``connection_lost`` must call ``super()``.
    """

    transport: asyncio.Transport | None

    def __init__(
        self,
        pool: BufferPool | None = None,
        *,
        capacity: int = 65536,
        max_capacity: int = DEFAULT_MAX_CAPACITY,
        resume_below: int | None = None,
    ) -> None:
        if max_capacity < capacity:
            raise ValueError(
                f"max_capacity ({max_capacity} bytes) must be >= capacity ({capacity} bytes)"
            )
        if resume_below is None:
            resume_below = max_capacity // 2
        if not 0 <= resume_below < max_capacity:
            raise ValueError(
                f"resume_below must be within 0..max_capacity-1 ({max_capacity - 1} bytes), "
                f"got {resume_below}"
            )
        self.pool = pool
        self.transport = None
        self._capacity = capacity
        self._max_capacity = max_capacity
        self._resume_below = resume_below
        self._ring: RingBuffer | None = None
        self._ring_paused = False  # paused because the ring is full at max_capacity
        self._app_paused = False  # paused by pause_reading()

    # ------------------------------------------------------------------ state
    @property
    def ring(self) -> RingBuffer:
        """The receive ring; RuntimeError before ``connection_made``/after ``connection_lost``."""
        ring = self._ring
        if ring is None:
            raise RuntimeError(f"{type(self).__name__} is not connected: it has no ring")
        return ring

    @property
    def reading_paused(self) -> bool:
        """True while reading is paused (full ring or ``pause_reading()``)."""
        return self._ring_paused or self._app_paused

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._ring = RingBuffer(self._capacity, max_capacity=self._max_capacity, pool=self.pool)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._ring.get_buffer(sizehint)  # type: ignore[union-attr]

    def buffer_updated(self, nbytes: int) -> None:
        ring = self._ring
        ring.buffer_updated(nbytes)  # type: ignore[union-attr]
        self.data_available(ring)  # type: ignore[arg-type]
        if not ring.free and not self._ring_paused:  # type: ignore[union-attr]
            self._check_full()

    def eof_received(self) -> bool | None:
        """The peer will send no more.  Return True to keep the write side open (the
        default, None, lets the transport close; over TLS the transport closes anyway and
        logs a warning for True).  Buffered data is still in ``self.ring``."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Releases the ring's memory (unprocessed bytes are dropped).  Called for every kind
        of close: orderly, abort, reset, fatal error."""
        ring = self._ring
        self._ring = None
        self.transport = None
        if ring is not None:
            ring.close()

    # ------------------------------------------------------------------ the hook
    def data_available(self, ring: RingBuffer) -> None:
        """Called after new bytes arrived.  Consume what you can (``ring.peek``/``consume``/
        ``read``); leave incomplete data in the ring.  The default consumes nothing: data
        accumulates until the application takes it with ``consume``/``read``/``readinto``.

        A full ring at ``max_capacity`` pauses reading until something is consumed, so a hook
        that waits for a unit larger than ``max_capacity`` would wait forever: check lengths
        with ``ring.peek_frame`` (it raises BufferFull for a frame that can never fit) or
        close the connection yourself."""

    # ------------------------------------------------------------------ consuming outside the hook
    def consume(self, n: int) -> None:
        """``ring.consume(n)``, then resume reading if the ring drained enough."""
        self.ring.consume(n)
        if self._ring_paused:
            self.maybe_resume_reading()

    def read(self, n: int | None = None) -> bytes:
        """``ring.read(n)``, then resume reading if the ring drained enough."""
        data = self.ring.read(n)
        if self._ring_paused:
            self.maybe_resume_reading()
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        """``ring.readinto(buf)``, then resume reading if the ring drained enough."""
        n = self.ring.readinto(buf)
        if self._ring_paused:
            self.maybe_resume_reading()
        return n

    def maybe_resume_reading(self) -> None:
        """Resume a full-ring pause if at most ``resume_below`` bytes are buffered.  Call it
        after consuming from ``self.ring`` directly outside ``data_available``."""
        ring = self._ring
        if self._ring_paused and ring is not None and len(ring) <= self._resume_below:
            self._ring_paused = False
            if not self._app_paused and self.transport is not None:
                self.transport.resume_reading()

    # ------------------------------------------------------------------ flow control
    def _check_full(self) -> None:
        ring = self._ring
        if ring is None or ring.free or ring.capacity < ring.max_capacity:
            return  # the next get_buffer can still grow the ring
        self._ring_paused = True
        if not self._app_paused and self.transport is not None:
            self.transport.pause_reading()

    def pause_reading(self) -> None:
        """Application-level pause (e.g. while the peer does not read our writes)."""
        if not self._app_paused:
            self._app_paused = True
            if not self._ring_paused and self.transport is not None:
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Undo ``pause_reading``; reading restarts unless the ring is still full."""
        if self._app_paused:
            self._app_paused = False
            if not self._ring_paused and self.transport is not None:
                self.transport.resume_reading()

    # ------------------------------------------------------------------ writing
    def write_lease(self, data: Lease | LeaseChain) -> None:
        """Send a lease or chain and release it at once (see ``bufpool.aio.write_lease``)."""
        transport = self.transport
        if transport is None:
            data.release()
            raise ConnectionError("write_lease() on a closed connection")
        write_lease(transport, data)

    async def drain_complete(self, *, timeout: float | None = None) -> None:
        """Wait until everything written so far left the transport's queue."""
        transport = self.transport
        if transport is not None:
            await drain_complete(transport, timeout=timeout)
