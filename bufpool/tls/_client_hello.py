"""ClientHello parsing (RFC 8446 section 4.1.2, RFC 5246 section 7.4.1.2) for routing by SNI.

Supports: ``parse_client_hello(message)`` on the bytes of one ClientHello handshake message
(its 4-byte handshake header included), and :class:`ClientHelloCollector`, which takes the
handshake records of a stream one by one (the message may span several records, and records
may arrive split across reads through the splitter) until the message is complete.

Reads: legacy_version, random, session_id, cipher_suites, compression_methods, extensions
(raw, in order), and decodes server_name (RFC 6066), ALPN (RFC 7301) and supported_versions
(RFC 8446 section 4.2.1).  GREASE values (RFC 8701) are kept out of ``cipher_suites`` and
``supported_versions`` and listed in ``grease``.

Bounds: O(n) in message bytes, every length checked against what remains before use; the
collector holds at most ``max_size`` bytes (default 65536, the figure Go uses for handshake
messages).  Any malformed or truncated input raises :class:`ClientHelloError` (alert
decode_error; illegal_parameter for a duplicated extension).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from ._errors import AlertDescription, ClientHelloError, UnexpectedRecordError

if TYPE_CHECKING:
    from ._records import TLSRecord

__all__ = [
    "DEFAULT_MAX_CLIENT_HELLO",
    "ClientHello",
    "ClientHelloCollector",
    "is_grease",
    "parse_client_hello",
]

#: Largest ClientHello the collector accepts by default, bytes (handshake header included).
DEFAULT_MAX_CLIENT_HELLO: Final = 65536

EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
EXT_SUPPORTED_VERSIONS: Final = 43
HANDSHAKE_CLIENT_HELLO: Final = 1


def is_grease(value: int) -> bool:
    """True for the 16 reserved GREASE values 0x0A0A, 0x1A1A, ..., 0xFAFA (RFC 8701)."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A parsed ClientHello.  Versions and suites are 16-bit ints (0x0304 = TLS 1.3)."""

    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    compression_methods: bytes
    #: Every extension as (type, body bytes), in wire order, GREASE ones included.
    extensions: tuple[tuple[int, bytes], ...]
    server_name: str | None = None
    alpn_protocols: tuple[str, ...] = ()
    supported_versions: tuple[int, ...] = ()
    #: GREASE values seen anywhere (suites, extension types, versions).
    grease: tuple[int, ...] = field(default=())

    @property
    def max_version(self) -> int:
        """Highest version offered: from supported_versions if present, else legacy_version."""
        return max(self.supported_versions) if self.supported_versions else self.legacy_version

    def extension(self, ext_type: int) -> bytes | None:
        """Body of the extension of type ``ext_type``, or None."""
        for t, body in self.extensions:
            if t == ext_type:
                return body
        return None


class _Reader:
    """Bounds-checked big-endian reader over bytes; raises ClientHelloError naming the field."""

    __slots__ = ("data", "end", "pos", "where")

    def __init__(self, data: bytes, pos: int, end: int, where: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end
        self.where = where  # offset of data[0] within the handshake message

    def _need(self, n: int, what: str) -> None:
        if self.end - self.pos < n:
            raise ClientHelloError(
                f"truncated ClientHello: {what} needs {n} bytes, {self.end - self.pos} left",
                offset=self.where + self.pos, header=self.data[:4],
            )

    def uint(self, size: int, what: str) -> int:
        self._need(size, what)
        p = self.pos
        self.pos = p + size
        return int.from_bytes(self.data[p:p + size], "big")

    def take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        p = self.pos
        self.pos = p + n
        return self.data[p:p + n]

    def vector(self, len_size: int, what: str) -> _Reader:
        n = self.uint(len_size, f"{what} length")
        self._need(n, what)
        sub = _Reader(self.data, self.pos, self.pos + n, self.where)
        self.pos += n
        return sub

    def done(self) -> bool:
        return self.pos >= self.end

    def expect_end(self, what: str) -> None:
        if self.pos != self.end:
            raise ClientHelloError(
                f"{self.end - self.pos} stray bytes after {what}",
                offset=self.where + self.pos, header=self.data[:4],
            )


def parse_client_hello(data: bytes | bytearray | memoryview) -> ClientHello:
    """Parse one ClientHello handshake message (4-byte handshake header included).

    Raises ClientHelloError (alert decode_error) on any malformed or truncated input and
    UnexpectedRecordError if the message is not a ClientHello.
    """
    msg = bytes(data)
    if len(msg) < 4:
        raise ClientHelloError(
            f"truncated handshake header: {len(msg)} of 4 bytes", offset=0, header=msg
        )
    if msg[0] != HANDSHAKE_CLIENT_HELLO:
        raise UnexpectedRecordError(
            f"handshake message type {msg[0]} is not ClientHello (1)", offset=0, header=msg[:4]
        )
    length = int.from_bytes(msg[1:4], "big")
    if length != len(msg) - 4:
        raise ClientHelloError(
            f"ClientHello length field says {length} bytes, got {len(msg) - 4}",
            offset=1, header=msg[:4],
        )
    r = _Reader(msg, 4, len(msg), 0)
    legacy_version = r.uint(2, "legacy_version")
    random = r.take(32, "random")
    sid = r.vector(1, "session_id")
    if sid.end - sid.pos > 32:
        raise ClientHelloError(
            f"session_id of {sid.end - sid.pos} bytes exceeds 32", offset=39, header=msg[:4]
        )
    session_id = sid.take(sid.end - sid.pos, "session_id")
    grease: list[int] = []
    cs = r.vector(2, "cipher_suites")
    if (cs.end - cs.pos) % 2 or cs.end == cs.pos:
        raise ClientHelloError(
            f"cipher_suites length {cs.end - cs.pos} is not a positive even number",
            offset=cs.pos - 2, header=msg[:4],
        )
    suites: list[int] = []
    while not cs.done():
        s = cs.uint(2, "cipher suite")
        (grease if is_grease(s) else suites).append(s)
    cm = r.vector(1, "compression_methods")
    if cm.end == cm.pos:
        raise ClientHelloError("compression_methods is empty", offset=cm.pos - 1,
                               header=msg[:4])
    compression = cm.take(cm.end - cm.pos, "compression_methods")
    extensions: list[tuple[int, bytes]] = []
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    if not r.done():
        exts = r.vector(2, "extensions")
        r.expect_end("extensions")
        seen: set[int] = set()
        while not exts.done():
            at = exts.pos
            etype = exts.uint(2, "extension type")
            body = exts.vector(2, f"extension {etype}")
            if etype in seen:
                raise ClientHelloError(
                    f"extension {etype} appears twice", offset=at, header=msg[:4],
                    alert=AlertDescription.illegal_parameter,
                )
            seen.add(etype)
            if is_grease(etype):
                grease.append(etype)
            start = body.pos
            if etype == EXT_SERVER_NAME:
                server_name = _server_name(body)
            elif etype == EXT_ALPN:
                alpn = _alpn(body)
            elif etype == EXT_SUPPORTED_VERSIONS:
                versions = _versions(body, grease)
            extensions.append((etype, msg[start:body.end]))
    return ClientHello(
        legacy_version=legacy_version,
        random=random,
        session_id=session_id,
        cipher_suites=tuple(suites),
        compression_methods=compression,
        extensions=tuple(extensions),
        server_name=server_name,
        alpn_protocols=alpn,
        supported_versions=versions,
        grease=tuple(grease),
    )


def _server_name(body: _Reader) -> str | None:
    names = body.vector(2, "server_name_list")
    body.expect_end("server_name_list")
    if names.done():
        raise ClientHelloError("server_name_list is empty", offset=names.pos,
                               header=names.data[:4])
    host: str | None = None
    while not names.done():
        kind = names.uint(1, "server name type")
        name = names.vector(2, "server name")
        raw = name.take(name.end - name.pos, "server name")
        if kind != 0:
            continue  # unknown name types are skipped (RFC 6066 section 3)
        if host is not None:
            raise ClientHelloError("two host_name entries in server_name", offset=name.pos,
                                   header=names.data[:4])
        if not raw or not all(33 <= b < 127 for b in raw):
            raise ClientHelloError(
                f"host_name {raw[:64]!r} is empty or not printable ASCII",
                offset=name.pos - len(raw), header=names.data[:4],
            )
        host = raw.decode("ascii")
    return host


def _alpn(body: _Reader) -> tuple[str, ...]:
    protos = body.vector(2, "ALPN protocol_name_list")
    body.expect_end("ALPN protocol_name_list")
    out: list[str] = []
    while not protos.done():
        p = protos.vector(1, "ALPN protocol name")
        if p.end == p.pos:
            raise ClientHelloError("empty ALPN protocol name", offset=p.pos - 1,
                                   header=protos.data[:4])
        out.append(p.take(p.end - p.pos, "ALPN protocol name").decode("latin-1"))
    if not out:
        raise ClientHelloError("ALPN protocol_name_list is empty", offset=protos.pos,
                               header=protos.data[:4])
    return tuple(out)


def _versions(body: _Reader, grease: list[int]) -> tuple[int, ...]:
    vs = body.vector(1, "supported_versions")
    body.expect_end("supported_versions")
    if (vs.end - vs.pos) % 2 or vs.end == vs.pos:
        raise ClientHelloError(
            f"supported_versions length {vs.end - vs.pos} is not a positive even number",
            offset=vs.pos - 1, header=vs.data[:4],
        )
    out: list[int] = []
    while not vs.done():
        v = vs.uint(2, "version")
        (grease if is_grease(v) else out).append(v)
    return tuple(out)


class ClientHelloCollector:
    """Collect the ClientHello from the first handshake records of a client's stream.

    ``add(record)`` takes each record the splitter hands out, in order, and returns None until
    the message is complete, then the parsed :class:`ClientHello` (also kept in ``hello``).
    Handshake bytes are copied out of the record (at most ``max_size`` bytes in total), so
    the records may be released or forwarded right after ``add``.
    """

    def __init__(self, *, max_size: int = DEFAULT_MAX_CLIENT_HELLO) -> None:
        self._buf = bytearray()
        self._max = max_size
        self._want: int | None = None
        self.hello: ClientHello | None = None
        #: Records consumed so far.
        self.records = 0

    @property
    def complete(self) -> bool:
        return self.hello is not None

    def add(self, record: TLSRecord) -> ClientHello | None:
        """Take one record; the parsed ClientHello once complete, else None."""
        if self.hello is not None:
            raise ValueError("ClientHelloCollector already complete")
        return self.add_payload(int(record.content_type), record.payload, record.offset,
                                header=bytes(record.raw[:5]))

    def add_payload(
        self, content_type: int, payload: bytes | bytearray | memoryview, offset: int = 0,
        *, header: bytes | None = None,
    ) -> ClientHello | None:
        """Like :meth:`add` for a record given as content type and payload bytes.

        ``header``: the record's 5 header bytes, reported in errors about the record itself
        (default: the content type byte alone)."""
        self.records += 1
        if content_type != 22:
            if header is None:
                header = bytes((content_type,)) if 0 <= content_type <= 255 else b""
            raise UnexpectedRecordError(
                f"expected a handshake record carrying the ClientHello, got content type "
                f"{content_type}", offset=offset, header=header,
            )
        buf = self._buf
        buf += payload
        if self._want is None and len(buf) >= 4:
            if buf[0] != HANDSHAKE_CLIENT_HELLO:
                raise UnexpectedRecordError(
                    f"first handshake message has type {buf[0]}, expected ClientHello (1)",
                    offset=offset, header=bytes(buf[:4]),
                )
            self._want = 4 + int.from_bytes(buf[1:4], "big")
            if self._want > self._max:
                raise ClientHelloError(
                    f"ClientHello of {self._want} bytes exceeds the limit of {self._max} bytes",
                    offset=offset, header=bytes(buf[:4]),
                )
        if len(buf) > self._max:
            raise ClientHelloError(
                f"handshake data exceeds the limit of {self._max} bytes", offset=offset,
                header=bytes(buf[:4]),
            )
        want = self._want
        if want is None or len(buf) < want:
            return None
        if len(buf) > want:
            raise UnexpectedRecordError(
                f"{len(buf) - want} bytes of another handshake message follow the ClientHello "
                "in its records", offset=offset, header=bytes(buf[want:want + 4]),
            )
        self.hello = parse_client_hello(buf)
        self._buf = bytearray()
        return self.hello
