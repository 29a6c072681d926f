"""TLSRecordSplitter: a byte stream in, complete validated TLS records out.  Sans-IO.

Operations:

* ``feed(data)`` -- bytes you read; returns the complete records they finish.  Records that lie
  wholly inside ``data`` are views of ``data`` itself (zero-copy); only the bytes of a record
  still incomplete at the end are copied into the splitter's ring.
* ``get_buffer(sizehint)`` / ``buffer_updated(nbytes)`` -- the ``asyncio.BufferedProtocol``
  path: the socket reads straight into the ring and records are views of ring memory.
* ``feed_eof()`` -- the stream ended; raises if it ended inside a record.

Goals: zero-copy whenever a record does not cross a boundary (the ring's wrap point, or the
seam between bytes buffered earlier and new input); otherwise one counted copy of that record
into a pooled lease (``joined``, ``joined_bytes``).  Every header is validated before its
length is trusted (see ``_records``); after an error the splitter refuses all further input.

Bounds: work is O(n) in bytes fed plus O(1) per record; pending bytes (``buffered``) never
exceed one maximal record plus its header (5 + 18432 bytes, or 5 + 16640 in TLS-1.3-only mode)
whatever the input.  Memory held between calls: the ring (``ring_capacity`` bytes, from the
pool) plus, until the next call, the records handed out by the last one.

Lifetimes: records returned by a call are valid until the next ``feed``/``get_buffer``/
``close``; their views are then released (stale use raises ValueError).  With the compiled
record type a record makes its views when first read, and expiry marks every record stale and
releases only the views that were made: one pass per call, no per-record view otherwise.
On the ring paths a view still exported, or derived from a record (a slice,
``memoryview(rec.raw)``) and still alive, at that point raises :class:`RecordViewHeldError`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from pickle import PickleBuffer
from typing import TYPE_CHECKING, Final, Literal, cast

from bufpool import RingBuffer

from . import _records
from ._errors import SplitterFailedError, TLSRecordError, TruncatedRecordError
from ._records import (
    CONTENT_TYPES,
    HEADER,
    MAX_CIPHERTEXT,
    MAX_CIPHERTEXT_TLS13,
    PyTLSRecord,
    TLSRecord,
    diagnose_header,
)

try:
    import ctypes as _ctypes
except ImportError:  # pragma: no cover - CPython builds without ctypes
    _ctypes = None  # type: ignore[assignment]


if TYPE_CHECKING:
    from bufpool import BufferPool, Lease

__all__ = [
    "DEFAULT_RING_CAPACITY",
    "MIN_RING_CAPACITY",
    "RECORD_POOL_CLASSES",
    "RecordViewHeldError",
    "TLSRecordSplitter",
    "default_pool",
]

#: Ring size in bytes: room for a pending maximal record plus large socket reads.
DEFAULT_RING_CAPACITY: Final = 65536
#: Smallest ring in bytes: a maximal record always fits twice.
MIN_RING_CAPACITY: Final = 2 * (5 + MAX_CIPHERTEXT)

_new = object.__new__

#: The compiled scanner and record type (bufpool/tls/_cscan.c, loaded by ``_records``), or None.
_cscan = _records._cscan
#: "c" when the record scan and expiry loops run compiled, "python" otherwise.
SCANNER: Final[Literal["c", "python"]] = "python" if _cscan is None else "c"
if _cscan is not None:
    _c_scan = cast(
        "Callable[[memoryview, int, int, int, list[TLSRecord], int, BufferPool], int]",
        _cscan.scan,
    )
_MakeRecord = Callable[[int, int, int, memoryview, int, int, "BufferPool", "Lease | None"],
                       TLSRecord]
#: Builds one compiled record (for the Python paths), or None without the extension.
_c_make: _MakeRecord | None = None if _cscan is None else _cscan.make
#: Size classes of :func:`default_pool`: the six defaults plus 512/2048/8192-byte steps, so
#: detached records of a realistic mix (40% 100-300 B, 30% 1-4 KiB, 30% full records) waste
#: about 14% of slot bytes instead of about 18% with the six default classes
#: (``bench/bench_tls.py`` prints both).
RECORD_POOL_CLASSES: Final = (64, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
_default: BufferPool | None = None
_default_lock = threading.Lock()


def default_pool() -> BufferPool:
    """The pool used by splitters and framers made without ``pool=`` (created on first use,
    classes :data:`RECORD_POOL_CLASSES`; the 16 KiB class holds a full TLS 1.2 record)."""
    global _default
    with _default_lock:
        if _default is None:
            from bufpool import BufferPool

            _default = BufferPool(classes=RECORD_POOL_CLASSES)
        return _default


class RecordViewHeldError(BufferError):
    """A record view of ring memory (``get_buffer``/``buffer_updated``/``pull`` path) from the
    previous call, or a view derived from one (a slice, ``memoryview(rec.raw)``), is still
    exported or alive (for example queued by a transport): that memory is about to be reused.
    Forward records with ``detach()``.  Views of ``feed()`` input and of joined records are not
    checked: the splitter never reuses that memory."""


def _release_py(records: list[TLSRecord], check: bool) -> int:
    """Release the views of ``records``; return how many releases were refused (still
    exported) among records without a lease, if ``check`` (else 0).  C twin: _cscan.release."""
    held = 0
    for rec in records:
        try:
            rec.raw.release()
        except BufferError:
            held += check and rec._lease is None
        p = rec._payload
        if p is not None:
            try:
                p.release()
            except BufferError:
                held += check and rec._lease is None
    return held


class TLSRecordSplitter:
    """Split a TLS byte stream into validated records.

    Keyword options: ``pool`` (BufferPool for the ring and joined records; default
    :func:`default_pool`), ``tls13_only`` (payload limit 16640 instead of 18432 bytes),
    ``mid_stream`` (skip the first-record rule when attaching to a stream already under way),
    ``ring_capacity`` (bytes, at least 36,874 so a maximal record always fits twice);
    ``ring``: parse from a RingBuffer someone else fills and owns (e.g.
    :class:`bufpool.aio.PooledProtocol`'s) with :meth:`pull` instead of owning one.
    """

    def __init__(
        self,
        *,
        pool: BufferPool | None = None,
        tls13_only: bool = False,
        mid_stream: bool = False,
        ring_capacity: int = DEFAULT_RING_CAPACITY,
        ring: RingBuffer | None = None,
    ) -> None:
        if ring is not None:
            ring_capacity = ring.max_capacity
        if ring_capacity < MIN_RING_CAPACITY:
            raise ValueError(
                f"ring_capacity must be at least {MIN_RING_CAPACITY} bytes (two maximal records), "
                f"got {ring_capacity}"
            )
        self._pool = pool if pool is not None else default_pool()
        self._max = MAX_CIPHERTEXT_TLS13 if tls13_only else MAX_CIPHERTEXT
        self._first = not mid_stream
        self._own_ring = ring is None
        self._ring = ring if ring is not None else RingBuffer(
            ring_capacity, max_capacity=ring_capacity, pool=self._pool
        )
        self._seen = 0  # ring bytes already accounted in _fed
        self._fed = 0  # stream offset just past the last byte received
        self._deferred = 0  # ring bytes of handed-out records, consumed at the next call
        self._handed: list[TLSRecord] = []
        self._handed_ring = False  # _handed are views of ring memory (pull), not of feed() input
        # pull(): per readable ring view, a wrapper view of the same bytes that the records are
        # sliced from, with its own managed buffer, which every view derived from a record
        # shares.  Its exporter is a ctypes array over the ring's storage bytearray: once the
        # records and the wrappers are released, that array is still alive (checked through a
        # weak reference) exactly when something derived from a record is.  No memoryview is
        # the exporter: a memoryview with exports that the cyclic GC clears (e.g. a failed
        # splitter dropped in a cycle with its error's traceback) crashes CPython 3.11 and 3.12
        # once those exports end.  (Without ctypes: memoryview(PickleBuffer(view)), which has
        # that hazard.)
        self._wraps: list[memoryview] = []
        self._wrap_refs: list[weakref.ref[object]] = []
        self._leases: list[Lease] = []  # joins handed out, released at the next call
        self._error: TLSRecordError | None = None
        self._closed = False
        #: Records handed out, ever.
        self.records = 0
        #: Records that crossed a boundary and were copied into a lease (and their bytes).
        self.joined = 0
        self.joined_bytes = 0
        #: Bytes copied into the ring by ``feed`` (incomplete tails).
        self.tail_bytes = 0

    # ------------------------------------------------------------------ properties
    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete record (< 5 + max payload)."""
        return len(self._ring) - self._deferred

    @property
    def offset(self) -> int:
        """Stream offset (bytes) of the first byte not yet handed out in a record."""
        return self._fed - self.buffered

    @property
    def max_payload(self) -> int:
        """Largest accepted payload in bytes (18432, or 16640 in TLS-1.3-only mode)."""
        return self._max

    @property
    def pool(self) -> BufferPool:
        return self._pool

    @property
    def failed(self) -> TLSRecordError | None:
        """The error that stopped the splitter, or None."""
        return self._error

    # ------------------------------------------------------------------ input
    def feed(self, data: bytes | bytearray | memoryview) -> list[TLSRecord]:
        """Take ``data`` (any bytes-like object); return the records it completes, in order.

        Records wholly inside ``data`` are views of it: do not modify ``data`` before the next
        call.  Raises a :class:`TLSRecordError` subclass on bad input (its ``records`` attribute
        holds the good records that preceded the fault in this call).
        """
        self._check_open()
        if self._handed or self._deferred or self._leases:
            self._expire()
        self._handed_ring = False
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        base = self._fed
        self._fed = base + n
        out: list[TLSRecord] = []
        pos = self._complete_pending(mv, base, out) if len(self._ring) else 0
        if pos < n:
            pos = self._scan(mv, pos, n, base, out)
            if pos < n:
                self._ring.write(mv[pos:])
                self.tail_bytes += n - pos
        self._seen = len(self._ring)
        self._handed = out.copy()
        self.records += len(out)
        return out

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Writable view of free ring space to receive into (BufferedProtocol.get_buffer).

        Also ends the lifetime of the records handed out by the previous call.
        """
        self._check_open()
        if self._handed or self._deferred or self._leases:
            self._expire()
        return self._ring.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> list[TLSRecord]:
        """Commit ``nbytes`` written into the last ``get_buffer`` view; return the records
        completed, as views of ring memory (valid until the next call)."""
        self._check_open()
        self._ring.buffer_updated(nbytes)
        return self.pull()

    def pull(self) -> list[TLSRecord]:
        """Hand out the complete records among the bytes now readable in the ring (the path
        for a ring filled by someone else).  Records are views of ring memory, valid until
        the next call or :meth:`expire`; a record that wraps the ring's end is joined into a
        pooled lease (counted in ``joined``)."""
        self._check_open()
        if self._handed or self._deferred or self._leases:
            self._expire()
        self._handed_ring = True
        ring = self._ring
        total = len(ring)
        self._fed += total - self._seen
        self._seen = total
        base = self._fed - total
        out: list[TLSRecord] = []
        views = ring.readable_views()
        if not views:
            return out
        first = views[0]
        end = len(first)
        wrap = self._wrap(first, ring._head)  # first is storage[head:head + end]
        pos = self._scan(wrap, 0, end, base, out)
        if len(views) > 1:
            second = views[1]
            pos2 = self._join(wrap, pos, second, base + pos, out)
            if pos2 >= 0:
                wrap = self._wrap(second, 0)  # the wrapped part starts the storage
                pos = end + self._scan(wrap, pos2, len(second), base + end, out)
        if not out:
            self._release_wraps()
        self._deferred = pos
        self._handed = out.copy()
        self.records += len(out)
        return out

    def expire(self) -> None:
        """End the lifetime of the records handed out by the last call now rather than at
        the next one: their views are released and their ring bytes consumed."""
        if self._handed or self._deferred or self._leases:
            self._expire()

    def feed_eof(self) -> None:
        """The peer closed: raise TruncatedRecordError if the stream ended inside a record."""
        self._check_open()
        pending = self.buffered
        if pending:
            self._fail(TruncatedRecordError(
                f"stream ended with {pending} bytes of an incomplete record",
                offset=self._fed - pending, header=self._pending_head(),
            ))

    def close(self) -> None:
        """End the lifetime of handed-out records and give the ring memory back.  Idempotent.

        Also drops the traceback of a stored failure (its frames would keep views of ring
        memory alive)."""
        if self._closed:
            return
        if self._error is not None:
            self._error.__traceback__ = None
        try:
            self._expire(strict=False)
        finally:
            self._closed = True
            if self._own_ring:
                self._ring.close()

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._error is not None:
            raise SplitterFailedError(self._error)
        if self._closed:
            raise ValueError("TLSRecordSplitter used after close()")

    def _fail(self, err: TLSRecordError, out: list[TLSRecord] | None = None) -> None:
        err.records = out if out is not None else []  # type: ignore[attr-defined]
        self._error = err
        if out:
            self._handed = out.copy()
        raise err

    def _expire(self, strict: bool = True) -> None:
        # Only views of ring memory are a hazard when still exported: feed() records view the
        # caller's input, and joined records a lease that the pool quarantines while exported.
        check = strict and self._handed_ring
        held = self._release(self._handed, check)
        self._handed = []
        derived = self._release_wraps() and check
        if self._deferred:
            self._ring.consume(self._deferred)
            self._seen -= self._deferred
            self._deferred = 0
        leases, self._leases = self._leases, []
        for lease in leases:
            lease.release()
        if held:
            raise RecordViewHeldError(
                f"{held} record view(s) of ring memory from the previous call are still "
                "exported (a transport or buffer consumer holds them); that memory is reused "
                "now. Keep records with detach() instead"
            )
        if derived:
            raise RecordViewHeldError(
                "a view derived from a record view of ring memory from the previous call (a "
                "slice or memoryview() of raw/payload, e.g. queued by a transport) is still "
                "alive; that memory is reused now. Keep records with detach() instead"
            )

    def _wrap(self, view: memoryview, start: int) -> memoryview:
        """The wrapper of ``view``, which is ``storage[start:start + len(view)]`` (ring views
        are slices of a view at offset 0 of the ring's storage bytearray)."""
        if _ctypes is None:
            wrap = memoryview(PickleBuffer(view))
            self._wraps += (wrap, view)
            return wrap
        storage = view.obj
        array = (_ctypes.c_char * len(storage)).from_buffer(storage)  # type: ignore[arg-type]
        whole = memoryview(array).cast("B")
        self._wrap_refs.append(weakref.ref(array))
        wrap = whole[start:start + len(view)]
        self._wraps += (wrap, whole)
        return wrap

    def _release_wraps(self) -> bool:
        """Release the pull() wrappers; True if a view derived from a record still pins the
        ring memory (the records themselves must be released first)."""
        wraps = self._wraps
        if not wraps:
            return False
        self._wraps = []
        pinned = False
        for v in wraps:  # wrapper first, then what it was made from
            try:
                v.release()
            except BufferError:  # a consumer holds that buffer itself
                pinned = True
        wraps.clear()
        refs, self._wrap_refs = self._wrap_refs, []
        return pinned or any(ref() is not None for ref in refs)

    def _pending_head(self) -> bytes:
        """Up to 5 header bytes of the pending record: the readable ring bytes after the
        ``_deferred`` bytes of records already handed out."""
        skip = self._deferred
        head = b""
        for v in self._ring.readable_views():
            n = len(v)
            if skip >= n:
                skip -= n
                continue
            head += bytes(v[skip:skip + 5 - len(head)])
            skip = 0
            if len(head) == 5:
                break
        return head

    def _check_partial(self, head: bytes, offset: int, out: list[TLSRecord]) -> None:
        if len(head) == 5 and not self._first:  # the common case, without diagnose_header's walk
            ct = head[0]
            ln = head[3] << 8 | head[4]
            if 20 <= ct <= 24 and head[1] == 3 and ln <= self._max and (ln or ct == 23):
                return
        err = diagnose_header(head, offset=offset, first=self._first, max_length=self._max)
        if err is not None:
            self._fail(err, out)

    def _scan_py(
        self, mv: memoryview, pos: int, end: int, base: int, out: list[TLSRecord]
    ) -> int:
        """Hand out every complete record in ``mv[pos:end]``; return where the rest starts.

        ``base`` is the stream offset of ``mv[0]``.  O(1) per record plus nothing per byte.
        The reference implementation; :meth:`_scan_c` is its compiled twin.
        """
        if self._first and pos < end:
            self._check_partial(bytes(mv[pos:pos + 5]), base + pos, out)
            if end - pos >= 5:
                self._first = False
        unpack = HEADER.unpack_from
        limit = self._max
        cts = CONTENT_TYPES
        pool = self._pool
        append = out.append
        new = _new
        make = self._make
        while end - pos >= 5:
            ct, ver, ln = unpack(mv, pos)
            if ln > limit or ver >> 8 != 3 or not 20 <= ct <= 24 or (not ln and ct != 23):
                self._check_partial(bytes(mv[pos:pos + 5]), base + pos, out)
            stop = pos + 5 + ln
            if stop > end:
                return pos
            if make is None:
                rec = new(PyTLSRecord)
                rec.content_type = cts[ct]  # 20..24 checked above
                rec.version = ver
                rec.offset = base + pos
                rec.raw = mv[pos:stop]
                rec._payload = None
                rec._pool = pool
                rec._lease = None
                append(rec)
            else:  # the compiled record type
                append(make(ct, ver, base + pos, mv, pos, stop, pool, None))
            pos = stop
        if pos < end:
            self._check_partial(bytes(mv[pos:end]), base + pos, out)
        return pos

    def _scan_c(
        self, mv: memoryview, pos: int, end: int, base: int, out: list[TLSRecord]
    ) -> int:
        """:meth:`_scan_py` with its loop over good complete records in C: the C scanner
        hands out records while headers pass the fast check and are complete.  Where it
        stops at the end of the input or at an incomplete record whose header passed, that is
        the answer; otherwise (a tail under 5 bytes, a bad header) :meth:`_scan_py` continues
        from there, so errors and partial-header judgements are made by the same code."""
        if self._first and pos < end:
            if end - pos < 5:
                return self._scan_py(mv, pos, end, base, out)
            self._check_partial(bytes(mv[pos:pos + 5]), base + pos, out)
            self._first = False
        pos = _c_scan(mv, pos, end, base, out, self._max, self._pool)
        if pos >= 0:  # all consumed, or an incomplete record whose header passed the check
            return pos
        return self._scan_py(mv, ~pos, end, base, out)

    _scan = _scan_py if _cscan is None else _scan_c
    # The record type: compiled (made by _make, expired in C) or pure Python (_make None).
    _make: _MakeRecord | None = None if _c_make is None else staticmethod(_c_make)
    _release: Callable[[list[TLSRecord], bool], int] = staticmethod(
        _release_py if _cscan is None else _cscan.release
    )

    def _join(
        self, first: memoryview, pos: int, second: memoryview, offset: int,
        out: list[TLSRecord],
    ) -> int:
        """The record starting at ``first[pos:]`` continues in ``second`` (the ring wrapped).

        If it is complete, copy it into a lease and hand it out; return where scanning of
        ``second`` resumes, or -1 when the record is still incomplete.
        """
        a = len(first) - pos
        if a == 0:
            return 0
        head = bytes(first[pos:pos + 5])
        if a < 5:
            head += bytes(second[:5 - a])
        self._check_partial(head, offset, out)
        if self._first and len(head) >= 5:
            self._first = False
        if len(head) < 5:
            return -1
        total = 5 + ((head[3] << 8) | head[4])
        b = total - a
        if b > len(second):
            return -1
        lease = self._pool.acquire(total)
        view = lease.view
        view[:a] = first[pos:]
        view[a:] = second[:b]
        self._hand_joined(lease, head, offset, out)
        return b

    def _complete_pending(
        self, mv: memoryview, base: int, out: list[TLSRecord]
    ) -> int:
        """Bytes are pending in the ring: top them up from ``mv``.  Returns how much of ``mv``
        was used (``len(mv)`` when the record is still incomplete)."""
        ring = self._ring
        n = len(mv)
        k = len(ring)
        offset = base - k
        views = ring.readable_views()
        first = views[0]
        head = bytes(first[:5]) if len(first) >= 5 else b"".join(bytes(v[:5]) for v in views)[:5]
        used = 0
        if len(head) < 5:
            used = min(5 - len(head), n)
            head += bytes(mv[:used])
            self._check_partial(head, offset, out)
            if len(head) < 5:
                ring.write(mv[:used])
                self.tail_bytes += used
                return n
        else:
            self._check_partial(head, offset, out)
        if self._first:
            self._first = False
        total = 5 + ((head[3] << 8) | head[4])
        need = total - k
        if need > n:
            ring.write(mv)
            self.tail_bytes += n
            return n
        lease = self._pool.acquire(total)
        view = lease.view
        at = 0
        for v in views:
            view[at:at + len(v)] = v
            at += len(v)
        view[at:] = mv[:need]
        ring.consume(k)
        self._hand_joined(lease, head, offset, out)
        return need

    def _hand_joined(
        self, lease: Lease, head: bytes, offset: int, out: list[TLSRecord]
    ) -> None:
        self._leases.append(lease)
        self.joined += 1
        self.joined_bytes += len(lease)
        make = self._make
        if make is not None:
            view = lease.view
            out.append(make(head[0], (head[1] << 8) | head[2], offset, view, 0, len(view),
                            self._pool, lease))
            return
        rec = _new(PyTLSRecord)
        rec.content_type = CONTENT_TYPES[head[0]]  # type: ignore[assignment]
        rec.version = (head[1] << 8) | head[2]
        rec.offset = offset
        rec.raw = lease.view[:]
        rec._payload = None
        rec._pool = self._pool
        rec._lease = lease
        out.append(rec)

    def __repr__(self) -> str:
        state = "failed" if self._error else "closed" if self._closed else "open"
        return (
            f"<TLSRecordSplitter {state} offset={self.offset} buffered={self.buffered} "
            f"records={self.records} joined={self.joined}>"
        )


class _ReferenceSplitter(TLSRecordSplitter):
    """The pure-Python splitter, whichever implementation is active: the Python scan loop,
    the pure-Python :class:`TLSRecord` class and its expiry loop (for the tests that compare
    both and for bench/bench_tls_scan.py)."""

    _scan = TLSRecordSplitter._scan_py
    _make = None
    _release = staticmethod(_release_py)
