"""ClientHello parsing: fields, GREASE, messages split across records and reads, and every
kind of truncation or malformation answered with decode_error."""

from __future__ import annotations

import struct

import pytest

import bufpool
from bufpool.tls import (
    AlertDescription,
    ClientHelloCollector,
    ClientHelloError,
    TLSRecordError,
    TLSRecordSplitter,
    UnexpectedRecordError,
    is_grease,
    parse_client_hello,
)


def vec(n: int, data: bytes) -> bytes:
    return len(data).to_bytes(n, "big") + data


def ext(t: int, body: bytes) -> bytes:
    return struct.pack(">HH", t, len(body)) + body


def sni(name: bytes) -> bytes:
    return ext(0, vec(2, b"\x00" + vec(2, name)))


def alpn(*protos: bytes) -> bytes:
    return ext(16, vec(2, b"".join(vec(1, p) for p in protos)))


def versions(*vs: int) -> bytes:
    return ext(43, vec(1, b"".join(struct.pack(">H", v) for v in vs)))


def hello(exts: bytes | None = None, suites: tuple[int, ...] = (0x1301, 0x1302),
          session_id: bytes = b"s" * 32) -> bytes:
    body = (
        b"\x03\x03" + bytes(range(32)) + vec(1, session_id)
        + vec(2, b"".join(struct.pack(">H", s) for s in suites)) + vec(1, b"\x00")
    )
    if exts is not None:
        body += vec(2, exts)
    return b"\x01" + len(body).to_bytes(3, "big") + body


DEFAULT_EXTS = sni(b"example.com") + alpn(b"h2", b"http/1.1") + versions(0x0304, 0x0303)


def records(message: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(message), size):
        part = message[i:i + size]
        out += struct.pack(">BHH", 22, 0x0301, len(part)) + part
    return out


def test_fields_are_decoded() -> None:
    h = parse_client_hello(hello(DEFAULT_EXTS))
    assert h.server_name == "example.com"
    assert h.alpn_protocols == ("h2", "http/1.1")
    assert h.supported_versions == (0x0304, 0x0303) and h.max_version == 0x0304
    assert h.cipher_suites == (0x1301, 0x1302) and h.legacy_version == 0x0303
    assert h.session_id == b"s" * 32 and h.random == bytes(range(32))
    assert [t for t, _ in h.extensions] == [0, 16, 43]
    assert h.extension(16) == vec(2, vec(1, b"h2") + vec(1, b"http/1.1"))
    assert h.extension(99) is None


def test_grease_values_are_set_aside() -> None:
    grease = [0x0A0A, 0x1A1A, 0xFAFA]
    assert all(is_grease(g) for g in grease) and not is_grease(0x0A0B)
    exts = ext(0x2A2A, b"") + DEFAULT_EXTS[:0] + sni(b"a.test") + versions(0x3A3A, 0x0304)
    h = parse_client_hello(hello(exts, suites=(0x0A0A, 0x1301)))
    assert h.cipher_suites == (0x1301,)
    assert h.supported_versions == (0x0304,)
    assert set(h.grease) == {0x0A0A, 0x2A2A, 0x3A3A}
    assert h.server_name == "a.test"
    assert 0x2A2A in [t for t, _ in h.extensions]  # raw extensions keep everything


def test_no_extensions_at_all_is_an_old_but_valid_hello() -> None:
    h = parse_client_hello(hello(None))
    assert h.server_name is None and h.extensions == () and h.max_version == 0x0303


@pytest.mark.parametrize("size", [1, 7, 50, 16384])
@pytest.mark.parametrize("read", [1, 3, 1000])
def test_collector_across_records_and_reads(size: int, read: int) -> None:
    msg = hello(DEFAULT_EXTS + ext(21, bytes(300)))
    stream = records(msg, size)
    pool = bufpool.BufferPool()
    s = TLSRecordSplitter(pool=pool)
    c = ClientHelloCollector()
    got = None
    for i in range(0, len(stream), read):
        for r in s.feed(stream[i:i + read]):
            assert got is None
            got = c.add(r)
    s.close()
    assert got is not None and got == c.hello and c.complete
    assert got.server_name == "example.com"
    assert c.records == -(-len(msg) // size)


def test_collector_refuses_non_handshake_and_other_messages() -> None:
    c = ClientHelloCollector()
    with pytest.raises(UnexpectedRecordError):
        c.add_payload(23, b"x")
    c2 = ClientHelloCollector()
    with pytest.raises(UnexpectedRecordError, match="ClientHello"):
        c2.add_payload(22, b"\x02\x00\x00\x01\x00")  # a ServerHello
    c3 = ClientHelloCollector(max_size=1000)
    with pytest.raises(ClientHelloError, match="limit of 1000 bytes"):
        c3.add_payload(22, b"\x01\x00\x10\x00")
    c4 = ClientHelloCollector()
    with pytest.raises(UnexpectedRecordError, match="another handshake message"):
        c4.add_payload(22, hello(DEFAULT_EXTS) + b"\x02\x00")


def test_collector_errors_carry_the_offending_header() -> None:
    pool = bufpool.BufferPool()
    s = TLSRecordSplitter(pool=pool, mid_stream=True)
    (app,) = s.feed(struct.pack(">BHH", 23, 0x0303, 1) + b"x")
    with pytest.raises(UnexpectedRecordError) as info:
        ClientHelloCollector().add(app)
    assert info.value.header == b"\x17\x03\x03\x00\x01"
    s.close()
    with pytest.raises(UnexpectedRecordError) as info:
        ClientHelloCollector().add_payload(23, b"x")
    assert info.value.header == b"\x17"
    with pytest.raises(ClientHelloError, match="limit of 6 bytes") as too_big:
        ClientHelloCollector(max_size=6).add_payload(22, b"\x01\x00\x00\x02abc")
    assert too_big.value.header == b"\x01\x00\x00\x02"
    with pytest.raises(UnexpectedRecordError, match="another handshake message") as info:
        ClientHelloCollector().add_payload(22, hello(DEFAULT_EXTS) + b"\x02\x00")
    assert info.value.header == b"\x02\x00"


def test_every_truncation_is_a_decode_error() -> None:
    msg = hello(DEFAULT_EXTS)
    for cut in range(len(msg)):
        with pytest.raises(TLSRecordError) as info:
            parse_client_hello(msg[:cut])
        assert info.value.alert is AlertDescription.decode_error, cut


def test_every_truncation_with_a_consistent_length_fails_a_field_bounds_check() -> None:
    """The handshake length is fixed up to match the cut, so the outer length check passes
    and each field's own bounds check has to catch the truncation."""
    msg = hello(DEFAULT_EXTS)
    no_extensions = len(hello(None))  # a cut right there is a valid extension-less hello
    for cut in range(4, len(msg)):
        truncated = fix_lengths(msg[4:cut])
        if cut == no_extensions:
            assert parse_client_hello(truncated).extensions == ()
            continue
        with pytest.raises(ClientHelloError, match="truncated ClientHello") as info:
            parse_client_hello(truncated)
        assert info.value.alert is AlertDescription.decode_error, cut
        assert info.value.header == truncated[:4] and 4 <= info.value.offset <= len(truncated)


def fix_lengths(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


@pytest.mark.parametrize(
    ("message", "pattern"),
    [
        (hello(DEFAULT_EXTS)[:-1] + b"\x00\x00", "length field"),
        (fix_lengths(hello(DEFAULT_EXTS)[4:] + b"\x00"), "stray bytes"),
        (hello(DEFAULT_EXTS, suites=()), "cipher_suites"),
        (hello(ext(0, vec(2, b""))), "server_name_list is empty"),
        (hello(sni(b"")), "empty or not printable"),
        (hello(sni(b"bad name")), "not printable"),
        (hello(ext(16, vec(2, b""))), "ALPN protocol_name_list is empty"),
        (hello(ext(16, vec(2, b"\x00"))), "empty ALPN"),
        (hello(ext(43, vec(1, b"\x03"))), "supported_versions"),
        (hello(ext(0, vec(2, b"\x00" + vec(2, b"a.b"))[:-1])), "truncated"),
        (hello(ext(16, vec(2, vec(1, b"h2")) + b"x")), "stray bytes"),
        (hello(DEFAULT_EXTS, session_id=b"x" * 33), "session_id"),
        (hello(sni(b"a.test") + ext(0, b"")), "twice"),
    ],
)
def test_malformed_hellos(message: bytes, pattern: str) -> None:
    with pytest.raises(ClientHelloError, match=pattern) as info:
        parse_client_hello(message)
    expected = (AlertDescription.illegal_parameter if pattern == "twice"
                else AlertDescription.decode_error)
    assert info.value.alert is expected
    assert info.value.offset >= 0


def test_not_a_client_hello() -> None:
    with pytest.raises(UnexpectedRecordError, match="not ClientHello"):
        parse_client_hello(b"\x02\x00\x00\x00")
