"""bufpool.tls: the TLS record layer without decrypting anything.

Floor 2 (sans-IO, no sockets, no asyncio): :class:`TLSRecordSplitter` (bytes in, validated
records out), :func:`parse_client_hello` / :class:`ClientHelloCollector` (SNI, ALPN, versions),
:class:`RecordFramer` (plaintext into records in pooled buffers), and the error hierarchy under
:class:`TLSRecordError`.  Floor 3: :class:`TLSRecordProtocol`, an asyncio protocol that hands
out one record at a time, and :class:`SNIProxy` (with :class:`ProxyLimits`,
:class:`RouteTable`, :class:`ConnectionSummary`), a passthrough proxy routing by SNI, imported
on first use so sans-IO users never load asyncio code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._client_hello import (
    DEFAULT_MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloCollector,
    is_grease,
    parse_client_hello,
)
from ._errors import (
    AlertDescription,
    ClientHelloError,
    NotTLSError,
    RecordOverflowError,
    SplitterFailedError,
    SSLv2HelloError,
    TLSRecordError,
    TruncatedRecordError,
    UnexpectedRecordError,
    UnsupportedVersionError,
    alert_record,
)
from ._framing import RecordFramer
from ._records import (
    HEADER_SIZE,
    MAX_CIPHERTEXT,
    MAX_CIPHERTEXT_TLS13,
    MAX_PLAINTEXT,
    ContentType,
    DetachedRecord,
    TLSRecord,
)
from ._splitter import (
    MIN_RING_CAPACITY,
    RECORD_POOL_CLASSES,
    RecordViewHeldError,
    TLSRecordSplitter,
    default_pool,
)

if TYPE_CHECKING:
    from ._protocol import TLSRecordProtocol
    from ._proxy import ConnectionSummary, ProxyLimits, RouteTable, SNIProxy

__all__ = [
    "DEFAULT_MAX_CLIENT_HELLO",
    "HEADER_SIZE",
    "MAX_CIPHERTEXT",
    "MAX_CIPHERTEXT_TLS13",
    "MAX_PLAINTEXT",
    "MIN_RING_CAPACITY",
    "AlertDescription",
    "ClientHello",
    "ClientHelloCollector",
    "ClientHelloError",
    "ContentType",
    "DetachedRecord",
    "NotTLSError",
    "RecordFramer",
    "RecordOverflowError",
    "RecordViewHeldError",
    "SSLv2HelloError",
    "SplitterFailedError",
    "TLSRecord",
    "TLSRecordError",
    "TLSRecordProtocol",
    "TLSRecordSplitter",
    "TruncatedRecordError",
    "UnexpectedRecordError",
    "UnsupportedVersionError",
    "alert_record",
    "default_pool",
    "ConnectionSummary",
    "ProxyLimits",
    "RouteTable",
    "SNIProxy",
    "RECORD_POOL_CLASSES",
    "is_grease",
    "parse_client_hello",
]


_PROXY_NAMES = frozenset({"ConnectionSummary", "ProxyLimits", "RouteTable", "SNIProxy"})


def __getattr__(name: str) -> Any:
    if name == "TLSRecordProtocol":
        from ._protocol import TLSRecordProtocol

        return TLSRecordProtocol
    if name in _PROXY_NAMES:
        from . import _proxy

        return getattr(_proxy, name)
    raise AttributeError(f"module 'bufpool.tls' has no attribute {name!r}")
