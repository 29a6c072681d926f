"""Outbound record framing: plaintext in, TLS records in pooled buffers out.  Sans-IO.

Supports: splitting a payload into records of at most 16384 payload bytes, or fewer when a
peer negotiated ``record_size_limit`` (RFC 8449), each record (5-byte header + fragment)
written into its own pooled lease; and optional dynamic record sizing in the manner of Go's
crypto/tls: while a connection is young, records carry about one TCP segment (1208 bytes on
the wire, less header and ``record_overhead``), growing by that much per record, and go to
full size once 128 KiB have been sent or after 1000 records, so the first bytes of a
response can be decrypted by the peer before a whole 16 KiB record has arrived.

Bounds: O(n) in payload bytes (one copy into pool memory); one lease per record, each at most
16389 bytes, which the pool's 16 KiB class serves (18,437-byte slots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from bufpool import LeaseChain

from ._records import HEADER, MAX_PLAINTEXT, ContentType

if TYPE_CHECKING:
    from bufpool import BufferPool, Lease

__all__ = [
    "BOOST_AFTER_BYTES",
    "BOOST_AFTER_RECORDS",
    "MIN_RECORD_SIZE_LIMIT",
    "TCP_MSS_ESTIMATE",
    "RecordFramer",
]

#: Bytes per TCP segment assumed by dynamic sizing (Go's conservative estimate).
TCP_MSS_ESTIMATE: Final = 1208
#: Dynamic sizing switches to full records after this many bytes sent...
BOOST_AFTER_BYTES: Final = 128 * 1024
#: ...or after this many records.
BOOST_AFTER_RECORDS: Final = 1000
#: Smallest record_size_limit a peer may announce (RFC 8449 section 4).
MIN_RECORD_SIZE_LIMIT: Final = 64


class RecordFramer:
    """Frame payloads into records.

    ``record_size_limit``: largest fragment in bytes (at least 64; a larger value than the
    protocol allows means the protocol maximum, 16384, as RFC 8449 says; for a TLS 1.3 limit
    from the peer's extension pass ``tls13=True``, which keeps one byte for the inner content
    type).
    ``dynamic``: Go-style dynamic record sizing for application data.  ``record_overhead``:
    bytes a cipher adds per record (e.g. 17 for TLS 1.3 AEAD), only used to size the small
    early records.  ``version``: legacy record version written in headers (0x0303).
    """

    def __init__(
        self,
        *,
        pool: BufferPool | None = None,
        record_size_limit: int = MAX_PLAINTEXT,
        tls13: bool = False,
        dynamic: bool = False,
        record_overhead: int = 0,
        version: int = 0x0303,
    ) -> None:
        if record_size_limit < MIN_RECORD_SIZE_LIMIT:
            raise ValueError(
                f"record_size_limit must be at least {MIN_RECORD_SIZE_LIMIT} bytes "
                f"(RFC 8449), got {record_size_limit}"
            )
        if not 0 <= record_overhead < TCP_MSS_ESTIMATE - 5:
            raise ValueError(f"record_overhead must be within 0..1202 bytes, got {record_overhead}")
        if version >> 8 != 3:
            raise ValueError(f"record version must have major byte 3, got {version:#06x}")
        if pool is None:
            from ._splitter import default_pool

            pool = default_pool()
        self._pool = pool
        self._limit = min(MAX_PLAINTEXT, record_size_limit - (1 if tls13 else 0))
        self._dynamic = dynamic
        self._segment = TCP_MSS_ESTIMATE - 5 - record_overhead
        self._version = version
        #: Application-data bytes and records framed so far (drive dynamic sizing).
        self.bytes_sent = 0
        self.records_sent = 0

    @property
    def max_fragment(self) -> int:
        """Largest fragment this framer writes, bytes."""
        return self._limit

    def next_fragment_size(self) -> int:
        """Payload bytes the next application-data record may carry."""
        if not self._dynamic or self.bytes_sent >= BOOST_AFTER_BYTES:
            return self._limit
        if self.records_sent >= BOOST_AFTER_RECORDS:
            return self._limit
        return min(self._limit, self._segment * (self.records_sent + 1))

    def plan(self, size: int, content_type: ContentType = ContentType.application_data
             ) -> list[int]:
        """Fragment sizes :meth:`frame` would use for ``size`` bytes now (no state change)."""
        saved = self.bytes_sent, self.records_sent
        try:
            out = []
            while size > 0:
                n = min(size, self._fragment(content_type))
                out.append(n)
                self._account(n, content_type)
                size -= n
            return out
        finally:
            self.bytes_sent, self.records_sent = saved

    def frame(
        self,
        payload: bytes | bytearray | memoryview,
        content_type: ContentType = ContentType.application_data,
    ) -> LeaseChain:
        """Records carrying ``payload``, one pooled lease each, as a LeaseChain you release
        (e.g. ``transport.writelines(chain.views()); chain.release()``).  An empty payload
        gives an empty chain.  Valid until released."""
        src = memoryview(payload)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        leases: list[Lease] = []
        pos = 0
        total = len(src)
        pack = HEADER.pack_into
        ct = int(content_type)
        version = self._version
        try:
            while pos < total:
                n = min(total - pos, self._fragment(content_type))
                lease = self._pool.acquire(5 + n)
                view = lease.view
                pack(view, 0, ct, version, n)
                view[5:] = src[pos:pos + n]
                leases.append(lease)
                self._account(n, content_type)
                pos += n
        except BaseException:
            for lease in leases:
                lease.release()
            raise
        return LeaseChain(leases)

    def _fragment(self, content_type: ContentType) -> int:
        if content_type != ContentType.application_data:
            return self._limit
        return self.next_fragment_size()

    def _account(self, n: int, content_type: ContentType) -> None:
        if content_type == ContentType.application_data:
            self.bytes_sent += n
            self.records_sent += 1
