"""RingBuffer: a growable circular byte buffer that sockets receive into directly.

Supports: receiving in place (``get_buffer``/``buffer_updated``, the shape of
``asyncio.BufferedProtocol``), copying in (``write``), zero-copy inspection (``peek``,
``peek_frame`` for length-prefixed frames, ``readable_views``), searching (``find``, across
the wrap point), and taking bytes out (``consume``, ``read``, ``readinto``).  Vectored I/O
gets up to two segments from ``writable_views``/``readable_views``.

Goals: no allocation and no copy on the receive path; a copy only where a caller asks for
contiguous bytes that straddle the end of the storage (a *linearization*, counted in
``copies``/``bytes_copied``); memory bounded by ``max_capacity`` with a specific error
(:class:`~bufpool.BufferFull`) at the bound that loses nothing already buffered; optional
backing by a :class:`~bufpool.BufferPool` so ring memory counts in the pool's budget and stats.

Worst-case bounds (n = bytes buffered): every operation is O(1) plus the bytes it copies.
``peek(k)`` copies k bytes at most (only when the k bytes wrap); ``find`` is O(n) (two
``bytearray.find`` scans and a window of at most ``2 * len(sub) - 2`` bytes across the wrap);
growth copies n bytes and happens at most log2(max_capacity / capacity) times per ring.

Lifetimes: a view returned by ``peek``/``peek_frame`` is valid until the next ``peek``, ``consume``,
``read``, ``readinto``, ``clear``, growth or ``close``; the ring releases it then, so using it
afterwards raises ``ValueError`` (unless something else holds a buffer export of it, in which
case it keeps the storage alive but its bytes may change).  A view from ``get_buffer`` or
``writable_views`` is valid until the matching ``buffer_updated``; committing after any other
mutating call raises ``RuntimeError``.  Never hand a ring view to ``transport.write``: the ring
reuses that memory as soon as it is consumed — copy into a pool lease instead.

Not thread-safe: one ring belongs to one connection.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Final

from ._errors import BufferFull

if TYPE_CHECKING:
    from ._lease import Lease
    from ._pool import BufferPool

__all__ = ["DEFAULT_MAX_CAPACITY", "RingBuffer"]

#: Default growth bound, in bytes.
DEFAULT_MAX_CAPACITY: Final = 2 * 1024 * 1024
_MIN_SCRATCH: Final = 64

BytesLike = bytes | bytearray | memoryview


def _as_bytes_view(data: BytesLike) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class RingBuffer:
    """Circular buffer of ``capacity`` bytes that grows by doubling up to ``max_capacity``.

    ``pool``: when given, storage (and the scratch area used by linearizing peeks) is leased
    from it; a capacity above the pool's largest class is served by the pool's policy (a
    counted heap lease by default).  Release it with ``close()`` or a ``with`` block.
    """

    __slots__ = (
        "_bytes_copied",
        "_cap",
        "_closed",
        "_copies",
        "_grows",
        "_head",
        "_lease",
        "_len",
        "_max",
        "_mv",
        "_peeked",
        "_pool",
        "_scratch",
        "_scratch_lease",
        "_wlen",
    )

    _mv: memoryview
    _lease: Lease | None
    _scratch: memoryview | None
    _scratch_lease: Lease | None
    _peeked: memoryview | None

    def __init__(
        self,
        capacity: int = 65536,
        *,
        max_capacity: int | None = None,
        pool: BufferPool | None = None,
    ) -> None:
        if capacity.__class__ is not int or capacity < 1:
            raise ValueError(f"capacity must be a positive int number of bytes, got {capacity!r}")
        if max_capacity is None:
            max_capacity = max(capacity, DEFAULT_MAX_CAPACITY)
        if max_capacity.__class__ is not int or max_capacity < capacity:
            raise ValueError(
                f"max_capacity must be an int >= capacity ({capacity} bytes), got {max_capacity!r}"
            )
        self._pool = pool
        self._max = max_capacity
        self._lease = None
        self._scratch = None
        self._scratch_lease = None
        self._peeked = None
        self._head = 0  # index of the first readable byte
        self._len = 0  # readable bytes
        self._wlen = -1  # length of the outstanding get_buffer region; -1 when none
        self._copies = 0
        self._bytes_copied = 0
        self._grows = 0
        self._closed = False
        self._mv, self._lease = self._allocate(capacity)
        self._cap = capacity

    # ------------------------------------------------------------------ storage
    def _allocate(self, size: int) -> tuple[memoryview, Lease | None]:
        pool = self._pool
        if pool is None:
            return memoryview(bytearray(size)), None
        lease = pool.acquire(size)
        return lease.view, lease

    def _grow(self, need: int) -> None:
        """Make capacity >= ``need`` bytes (doubling), keeping the data; BufferFull past max."""
        if self._closed:
            raise ValueError("ring buffer is closed")
        if need > self._max:
            raise BufferFull(
                f"ring buffer full: {self._len} bytes buffered, room for {need} bytes needed, "
                f"max_capacity={self._max} bytes"
            )
        cap = self._cap
        new = cap
        while new < need:
            new *= 2
        self._move_to(min(new, self._max))
        self._grows += 1

    def _move_to(self, new: int) -> None:
        """Copy the data to fresh storage of ``new`` >= len bytes at offset 0; release the old."""
        cap = self._cap
        mv, lease = self._allocate(new)  # may raise (pool policy): nothing changed yet
        ln = self._len
        h = self._head
        first = min(ln, cap - h)
        old = self._mv
        mv[:first] = old[h : h + first]
        if ln > first:
            mv[first:ln] = old[: ln - first]
        self._drop_peeked()
        old_lease = self._lease
        self._mv = mv
        self._lease = lease
        del old
        if old_lease is not None:
            old_lease.release()
        self._cap = new
        self._head = 0
        self._wlen = -1

    def _drop_peeked(self) -> None:
        old = self._peeked
        if old is not None:
            self._peeked = None
            try:
                old.release()
            except BufferError:  # someone holds an export of it: it keeps the storage alive
                pass

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        """Readable bytes."""
        return self._len

    @property
    def capacity(self) -> int:
        """Bytes of storage now (grows up to ``max_capacity``); 0 once closed."""
        return self._cap

    @property
    def max_capacity(self) -> int:
        """Growth bound in bytes."""
        return self._max

    @property
    def free(self) -> int:
        """Bytes that can be added without growing."""
        return self._cap - self._len

    @property
    def pool(self) -> BufferPool | None:
        return self._pool

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def copies(self) -> int:
        """Linearizations so far: peeks whose bytes straddled the end of the storage."""
        return self._copies

    @property
    def bytes_copied(self) -> int:
        """Bytes copied by linearizations so far."""
        return self._bytes_copied

    @property
    def grows(self) -> int:
        """Times the storage was reallocated to a larger capacity."""
        return self._grows

    # ------------------------------------------------------------------ receiving
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Writable view of the contiguous free space after the readable bytes.

        ``sizehint`` is advisory (asyncio passes -1 or 65536) and never causes growth; the ring
        grows only when it is completely full, and raises BufferFull when that happens at
        ``max_capacity``.  Valid until the matching ``buffer_updated``.
        """
        ln = self._len
        if ln == self._cap:
            self._grow(ln + 1)
        cap = self._cap
        h = self._head
        t = h + ln
        if t >= cap:  # the data wraps: free space is between its end and its start
            t -= cap
            end = h
        else:
            end = cap
        self._wlen = end - t
        return self._mv[t:end]

    def buffer_updated(self, nbytes: int) -> None:
        """Commit ``nbytes`` bytes written at the start of the last ``get_buffer`` view (or
        across the ``writable_views`` segments, in order)."""
        if not 0 <= nbytes <= self._wlen:
            self._bad_commit(nbytes)
        self._wlen = -1
        self._len += nbytes

    def _bad_commit(self, nbytes: int) -> None:
        if self._wlen < 0:
            raise RuntimeError(
                "buffer_updated() without a current get_buffer()/writable_views() view: "
                "the ring changed since that view was handed out, or it was already committed"
            )
        raise ValueError(f"buffer_updated({nbytes}): the view handed out had {self._wlen} bytes")

    def reserve(self, nbytes: int) -> None:
        """Grow now (doubling, keeping the data) until at least ``nbytes`` bytes are free.

        Raises BufferFull (nothing changed) when that would exceed ``max_capacity``.  Like any
        growth it ends the validity of outstanding ``peek``/``get_buffer`` views.
        """
        if nbytes > self._cap - self._len:
            self._grow(self._len + nbytes)

    def shrink(self, capacity: int) -> bool:
        """Move the buffered bytes into smaller storage of ``capacity`` bytes and give the
        old storage back (e.g. when a connection goes quiet after a burst).  Does nothing and
        returns False unless ``len(self) <= capacity < self.capacity``.  Like growth, it ends
        the validity of outstanding ``peek``/``get_buffer`` views; a later write grows the
        ring again up to ``max_capacity``."""
        if self._closed or capacity.__class__ is not int or not (
            0 < capacity < self._cap and self._len <= capacity
        ):
            return False
        self._move_to(capacity)
        return True

    def writable_views(self) -> tuple[memoryview, ...]:
        """Up to two writable views of all free space, in order (for ``recvmsg_into``).

        Commit with ``buffer_updated(total_written)``.  Grows like ``get_buffer`` when full.
        """
        ln = self._len
        if ln == self._cap:
            self._grow(ln + 1)
        cap = self._cap
        h = self._head
        t = h + ln
        mv = self._mv
        self._wlen = cap - ln
        if t >= cap:
            return (mv[t - cap : h],)
        if h:
            return (mv[t:cap], mv[:h])
        return (mv[t:cap],)

    def write(self, data: BytesLike) -> None:
        """Copy ``data`` in after the readable bytes, wrapping and growing as needed.

        Raises BufferFull (nothing changed) when it would exceed ``max_capacity``.
        """
        src = _as_bytes_view(data)
        n = src.nbytes
        ln = self._len
        if n > self._cap - ln:
            self._grow(ln + n)
        cap = self._cap
        t = self._head + ln
        if t >= cap:
            t -= cap
        first = min(n, cap - t)
        mv = self._mv
        mv[t : t + first] = src[:first]
        if n > first:
            mv[: n - first] = src[first:]
        self._len = ln + n
        self._wlen = -1

    # ------------------------------------------------------------------ inspecting
    def peek(self, n: int) -> memoryview:
        """Read-only-by-convention view of the next ``n`` readable bytes, contiguous.

        Zero-copy unless the bytes straddle the end of the storage; then they are copied into
        a scratch area (counted in ``copies``/``bytes_copied``).  Valid until the next peek,
        consume/read/readinto/clear, growth or close (then released: using it raises
        ValueError).  Raises ValueError if fewer than ``n`` bytes are buffered.
        """
        if not 0 <= n <= self._len:
            self._bad_count("peek", n)
        old = self._peeked
        if old is not None:
            try:
                old.release()
            except BufferError:
                pass
        h = self._head
        e = h + n
        view = self._mv[h:e] if e <= self._cap else self._linearize(h, n)
        self._peeked = view
        return view

    def peek_frame(
        self, header: int, length_at: int, length_size: int, adjust: int = 0
    ) -> memoryview | None:
        """View of the next complete length-prefixed frame, or None while it is incomplete.

        The frame is ``header`` bytes whose big-endian unsigned field of ``length_size``
        bytes at offset ``length_at`` holds a length ``L``; the whole frame is
        ``header + L + adjust`` bytes (TLS records: ``peek_frame(5, 3, 2)``; HTTP/2 frames:
        ``peek_frame(9, 0, 3)``; a length that counts itself: a negative ``adjust``).
        Consume ``len(view)`` bytes when done.  Same lifetime and copy rules as ``peek``.

        Raises BufferFull (nothing consumed) when the frame could never fit in
        ``max_capacity``, and ValueError when it would be shorter than its header or when the
        length field does not lie inside the header.
        """
        if not 0 <= length_at <= header - length_size or length_size < 1:
            raise ValueError(
                f"length field of {length_size} bytes at offset {length_at} must lie inside "
                f"the {header}-byte header"
            )
        ln = self._len
        if ln < header:
            return None
        mv = self._mv
        a = self._head + length_at
        b = a + length_size
        if b <= self._cap:
            n = mv[a] << 8 | mv[a + 1] if length_size == 2 else int.from_bytes(mv[a:b], "big")
        else:
            n = int.from_bytes(self._gather(length_at, length_size), "big")
        total = header + n + adjust
        if total > ln:
            if total > self._max:
                raise BufferFull(
                    f"frame of {total} bytes (length field {n}) exceeds "
                    f"max_capacity={self._max} bytes"
                )
            return None
        if total < header:
            raise ValueError(
                f"frame length field {n} gives {total} bytes, under the {header}-byte header"
            )
        old = self._peeked  # from here on: peek(total), inlined for the per-record path
        if old is not None:
            try:
                old.release()
            except BufferError:
                pass
        h = self._head
        e = h + total
        view = mv[h:e] if e <= self._cap else self._linearize(h, total)
        self._peeked = view
        return view

    def _gather(self, offset: int, n: int) -> bytes:
        """Copy of readable bytes [offset, offset + n), wherever they sit (small reads)."""
        cap = self._cap
        start = self._head + offset
        if start >= cap:
            start -= cap
        mv = self._mv
        if start + n <= cap:
            return mv[start : start + n].tobytes()
        return mv[start:].tobytes() + mv[: start + n - cap].tobytes()

    def _linearize(self, h: int, n: int) -> memoryview:
        s = self._scratch
        if s is None or len(s) < n:
            s = self._new_scratch(n)
        mv = self._mv
        first = self._cap - h
        s[:first] = mv[h:]
        s[first:n] = mv[: n - first]
        self._copies += 1
        self._bytes_copied += n
        return s[:n]

    def _new_scratch(self, n: int) -> memoryview:
        size = _MIN_SCRATCH
        while size < n:
            size *= 2
        old_lease = self._scratch_lease
        self._scratch = None
        view, lease = self._allocate(size)
        self._scratch = view
        self._scratch_lease = lease
        if old_lease is not None:
            old_lease.release()
        return view

    def readable_views(self) -> tuple[memoryview, ...]:
        """Up to two views of all readable bytes, in order, with no copy.

        Valid until the next mutating call (not tracked: stale use is not detected).
        """
        ln = self._len
        if not ln:
            return ()
        h = self._head
        mv = self._mv
        first = self._cap - h
        if ln <= first:
            return (mv[h : h + ln],)
        return (mv[h:], mv[: ln - first])

    def find(self, sub: BytesLike | int, start: int = 0, end: int | None = None) -> int:
        """Offset (from the first readable byte) of the first ``sub`` within readable bytes
        ``[start, end)``, or -1.  Same argument rules as ``bytes.find``; works across the
        wrap point.  O(n) in the bytes searched."""
        if isinstance(sub, int):
            sub = bytes((sub,))
        m = memoryview(sub).nbytes
        ln = self._len
        if start < 0:
            start = max(start + ln, 0)
        if end is None or end > ln:
            end = ln
        elif end < 0:
            end = max(end + ln, 0)
        if start > ln or end - start < m:
            return -1
        if not m:
            return start
        cap = self._cap
        h = self._head
        buf = self._mv.obj
        assert isinstance(buf, bytearray)
        a = min(ln, cap - h)  # readable bytes before the wrap point
        if start < a:
            r = buf.find(sub, h + start, h + min(end, a))
            if r >= 0:
                return r - h
        if end <= a:
            return -1
        if m > 1 and start < a:
            w0 = max(start, a - m + 1)
            w1 = min(end, a + m - 1)
            mv = self._mv
            window = bytes(mv[h + w0 : cap]) + bytes(mv[: w1 - a])
            r = window.find(sub)
            if r >= 0:
                return w0 + r
        r = buf.find(sub, max(start - a, 0), end - a)
        return -1 if r < 0 else r + a

    # ------------------------------------------------------------------ taking out
    def consume(self, n: int) -> None:
        """Drop the next ``n`` readable bytes.  ValueError if fewer are buffered."""
        ln = self._len
        if not 0 <= n <= ln:
            self._bad_count("consume", n)
        old = self._peeked
        if old is not None:
            self._peeked = None
            try:
                old.release()
            except BufferError:
                pass
        ln -= n
        self._len = ln
        if ln:
            h = self._head + n
            if h >= self._cap:
                h -= self._cap
            self._head = h
        else:  # empty: start over at 0 so the next get_buffer hands out the whole storage
            self._head = 0
            self._wlen = -1

    def read(self, n: int | None = None) -> bytes:
        """Copy out and consume the next ``n`` bytes (all when None)."""
        if n is None:
            n = self._len
        elif not 0 <= n <= self._len:
            self._bad_count("read", n)
        h = self._head
        first = self._cap - h
        mv = self._mv
        data = (
            mv[h : h + n].tobytes() if n <= first else mv[h:].tobytes() + mv[: n - first].tobytes()
        )
        self.consume(n)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Copy up to ``len(buf)`` bytes into ``buf`` and consume them; returns the count."""
        dst = _as_bytes_view(buf)
        n = min(dst.nbytes, self._len)
        h = self._head
        first = min(n, self._cap - h)
        mv = self._mv
        dst[:first] = mv[h : h + first]
        if n > first:
            dst[first:n] = mv[: n - first]
        self.consume(n)
        return n

    def clear(self) -> None:
        """Drop every readable byte."""
        self.consume(self._len)

    def _bad_count(self, what: str, n: int) -> None:
        if self._closed:
            raise ValueError(f"{what}() on a closed ring buffer")
        if n.__class__ is not int:
            raise TypeError(f"{what}() needs an int number of bytes, got {type(n).__name__}")
        raise ValueError(f"{what}({n}): {self._len} bytes buffered")

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Drop the data and give the storage back (to the pool, if any).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._drop_peeked()
        lease, scratch = self._lease, self._scratch_lease
        self._mv = memoryview(bytearray(0))
        self._scratch = None
        self._lease = self._scratch_lease = None
        self._cap = self._max = self._len = self._head = 0
        self._wlen = -1
        if lease is not None:
            lease.release()
        if scratch is not None:
            scratch.release()

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._len}/{self._cap} B (max {self._max})"
        backing = "pooled" if self._pool is not None else "heap"
        return f"<RingBuffer {state}, {backing}, {self._copies} copies at {id(self):#x}>"
