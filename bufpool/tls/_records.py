"""TLS record headers: content types, limits, validation, and the record event.

Supports: decoding the 5-byte record header (content type, legacy version, length) and checking
it the way TLS stacks do before they trust a length (Go crypto/tls ``readRecordOrCCS``, Netty
``SslUtils``): content type 20..24, legacy version major 3, length at most 16384 + 2048 bytes
(16384 + 256 in TLS-1.3-only mode), no zero-length handshake/alert/change_cipher_spec records, a
first record that is handshake or alert.  Garbage is diagnosed from as little as one byte:
plaintext (an HTTP request on a TLS port) gets :class:`NotTLSError`, an SSLv2-compatible hello
gets :class:`SSLv2HelloError`.

Costs: O(1) per header.  ``diagnose_header`` is the slow path, run only on bad or partial headers.
"""

from __future__ import annotations

from enum import IntEnum
from struct import Struct
from typing import TYPE_CHECKING, Final

from bufpool._impl import load_extension

from ._errors import (
    NotTLSError,
    RecordOverflowError,
    SSLv2HelloError,
    TLSRecordError,
    UnexpectedRecordError,
    UnsupportedVersionError,
)

if TYPE_CHECKING:
    from bufpool import BufferPool, Lease

__all__ = [
    "HEADER_SIZE",
    "MAX_CIPHERTEXT",
    "MAX_CIPHERTEXT_TLS13",
    "MAX_PLAINTEXT",
    "ContentType",
    "DetachedRecord",
    "TLSRecord",
    "diagnose_header",
]

#: Bytes in a record header: type (1), legacy version (2), length (2).
HEADER_SIZE: Final = 5
#: Largest plaintext fragment (RFC 8446 section 5.1), bytes.
MAX_PLAINTEXT: Final = 16384
#: Largest TLS 1.2 ciphertext fragment (RFC 5246 section 6.2.3), bytes.
MAX_CIPHERTEXT: Final = 16384 + 2048
#: Largest TLS 1.3 ciphertext fragment (RFC 8446 section 5.2), bytes.
MAX_CIPHERTEXT_TLS13: Final = 16384 + 256

HEADER: Final = Struct(">BHH")


class ContentType(IntEnum):
    """Record content types (IANA TLS ContentType registry)."""

    change_cipher_spec = 20
    alert = 21
    handshake = 22
    application_data = 23
    heartbeat = 24


#: int -> ContentType without an enum call on the hot path (index = type byte).
CONTENT_TYPES: Final[tuple[ContentType | None, ...]] = tuple(
    ContentType(i) if 20 <= i <= 24 else None for i in range(256)
)

_HTTP_METHODS: Final = (
    b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"PRI ",
)
_PREFIXES: Final = ((b"SSH-", "an SSH banner"), (b"HTTP/", "an HTTP response"))


def _looks_like(head: bytes) -> str | None:
    """What plaintext ``head`` resembles, or None when it does not look like text."""
    if not head:
        return None
    for method in _HTTP_METHODS:
        n = min(len(head), len(method))
        if n >= 3 and head[:n] == method[:n]:
            word = head.split(b" ", 1)[0].decode("ascii", "replace")
            return f"an HTTP request ({word})"
    for prefix, what in _PREFIXES:
        n = min(len(head), len(prefix))
        if n >= 3 and head[:n] == prefix[:n]:
            return what
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "plaintext (printable ASCII)"
    return None


def diagnose_header(
    head: bytes, *, offset: int, first: bool, max_length: int
) -> TLSRecordError | None:
    """The error for header bytes ``head`` (1 to 5 bytes, possibly partial), or None if fine.

    ``offset`` is the stream offset of the header's first byte; ``first`` says it is the
    stream's first record; ``max_length`` is the payload limit in bytes.  A partial header is
    judged on the bytes present, so garbage is refused without waiting for more input.
    """
    n = len(head)
    if n == 0:
        return None
    ct = head[0]
    if not 20 <= ct <= 24:
        if first:
            if ct & 0x80 and (n < 3 or head[2] == 1):
                return SSLv2HelloError(
                    "SSLv2-compatible ClientHello (2-byte header with the high bit set) is not "
                    "supported; TLS 1.0+ records start with a content type 20..24",
                    offset=offset, header=head,
                )
            what = _looks_like(head)
            if what is not None:
                return NotTLSError(
                    f"expected a TLS record, got what looks like {what}",
                    looks_like=what, offset=offset, header=head,
                )
        return UnexpectedRecordError(
            f"record content type {ct} is not a TLS content type (20..24)",
            offset=offset, header=head,
        )
    if first and ct not in (21, 22):
        return UnexpectedRecordError(
            f"first record must be handshake (22) or alert (21), got "
            f"{ContentType(ct).name} ({ct})",
            offset=offset, header=head,
        )
    if n >= 2 and head[1] != 3:
        return UnsupportedVersionError(
            f"record version major byte is {head[1]}, TLS records carry 3 (SSL 3.0 .. TLS 1.3)",
            offset=offset, header=head,
        )
    if n < 5:
        return None
    length = (head[3] << 8) | head[4]
    if length > max_length:
        return RecordOverflowError(
            f"record length {length} bytes exceeds the limit of {max_length} bytes",
            offset=offset, header=head,
        )
    if length == 0 and ct != 23:
        return UnexpectedRecordError(
            f"zero-length {ContentType(ct).name} record (only application_data may be empty)",
            offset=offset, header=head,
        )
    return None


class TLSRecord:
    """One complete record, as handed out by :class:`TLSRecordSplitter`.

    ``content_type`` (:class:`ContentType`), ``version`` (legacy record version, e.g. 0x0303),
    ``offset`` (stream offset of the header, bytes), ``raw`` (header + payload, memoryview) and
    ``payload`` (memoryview, ``len(raw) - 5`` bytes).

    Lifetime: the views are valid until the next ``feed()``/``get_buffer()`` of the splitter
    that produced the record.  Then they are released: using them raises ValueError ("operation
    forbidden on released memoryview object").  Keep a record longer with :meth:`detach`.

    This is the pure-Python class (also :data:`PyTLSRecord`).  When the compiled extension is
    built, ``TLSRecord`` is its type instead: the same attributes, behaviour and errors, with
    ``raw`` and ``payload`` made on first read rather than by the scan, so a record whose
    views nobody reads costs no memoryview.
    """

    __slots__ = ("_lease", "_payload", "_pool", "content_type", "offset", "raw", "version")

    content_type: ContentType
    version: int
    offset: int
    raw: memoryview
    _payload: memoryview | None
    _pool: BufferPool | None
    _lease: Lease | None

    @property
    def payload(self) -> memoryview:
        """The record body (bytes after the header); same lifetime as ``raw``."""
        p = self._payload
        if p is None:
            p = self._payload = self.raw[5:]
        return p

    @property
    def length(self) -> int:
        """Payload length in bytes (from the header)."""
        return len(self.raw) - 5

    def detach(self, pool: BufferPool | None = None) -> DetachedRecord:
        """Copy the record into a pooled lease (``pool``, default the splitter's pool) that
        stays valid until you release it.  One copy of ``len(raw)`` bytes; a record that had
        to be joined across a wrap is handed over without a second copy."""
        return _detach(self, pool)

    def __repr__(self) -> str:
        return _record_repr(self)


def _detach(rec: TLSRecord, pool: BufferPool | None) -> DetachedRecord:
    """``TLSRecord.detach`` of both record types (this class and the compiled one)."""
    raw = rec.raw  # raises ValueError when stale
    lease = rec._lease
    if lease is not None and (pool is None or pool is rec._pool):
        lease.retain()
        return DetachedRecord(rec.content_type, rec.version, lease)
    target = pool if pool is not None else rec._pool
    if target is None:
        from ._splitter import default_pool  # only reached without any pool configured

        target = default_pool()
    lease = target.acquire(len(raw))
    lease.view[:] = raw
    return DetachedRecord(rec.content_type, rec.version, lease)


def _record_repr(rec: TLSRecord) -> str:
    """``repr`` of both record types."""
    try:
        size = f"{len(rec.raw) - 5} B"
    except ValueError:
        size = "stale"
    ct = rec.content_type.name
    return f"<TLSRecord {ct} v{rec.version:#06x} {size} at offset {rec.offset}>"


class DetachedRecord:
    """A record copied out of the splitter into a :class:`bufpool.Lease`; yours until
    :meth:`release` (or the end of a ``with`` block).  ``raw``/``payload`` are valid until then."""

    __slots__ = ("content_type", "lease", "version")

    def __init__(self, content_type: ContentType, version: int, lease: Lease) -> None:
        self.content_type = content_type
        self.version = version
        self.lease = lease

    @property
    def raw(self) -> memoryview:
        """Header + payload, valid until release()."""
        return self.lease.view

    @property
    def payload(self) -> memoryview:
        return self.lease.view[5:]

    def release(self) -> None:
        """Give the memory back to the pool (exactly once)."""
        self.lease.release()

    def __enter__(self) -> DetachedRecord:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lease.release()

    def __repr__(self) -> str:
        return f"<DetachedRecord {self.content_type.name} {len(self.lease) - 5} B>"


#: The compiled record type and scanner (bufpool/tls/_cscan.c), chosen by the rules of
#: ``bufpool._impl`` (``BUFPOOL_NO_EXTENSIONS=1`` forces pure Python), or None.  When it is
#: built, :class:`TLSRecord` is its compiled type (same attributes, views made on first read).
_cscan = load_extension("bufpool.tls._cscan")
#: The pure-Python record class, whichever type :class:`TLSRecord` is.
PyTLSRecord: Final = TLSRecord
if _cscan is not None:
    _cscan.init(CONTENT_TYPES, _detach, _record_repr)
    TLSRecord = _cscan.TLSRecord  # type: ignore[misc]
