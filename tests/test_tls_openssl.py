"""The splitter and the ClientHello parser against real OpenSSL sessions (ssl.MemoryBIO pairs):
TLS 1.2 and 1.3, SNI and ALPN, both directions, random chunkings including 1-byte feeds."""

from __future__ import annotations

import gc
import os
import random
import ssl

import pytest

import bufpool
from bufpool.tls import (
    ClientHelloCollector,
    ContentType,
    TLSRecordSplitter,
    parse_client_hello,
)
from tests._tls_helpers import Capture, CertBundle, make_certs, openssl_session

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    return make_certs(["example.com", "other.test"], tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def capture(request: pytest.FixtureRequest, certs: CertBundle) -> Capture:
    rnd = random.Random(7)
    return openssl_session(
        certs,
        server_name="example.com",
        version=VERSIONS[request.param],
        alpn_client=["h2", "http/1.1"],
        alpn_server=["http/1.1"],
        c2s=rnd.randbytes(150_000),
        s2c=rnd.randbytes(300_000),
    )


def chunkings(data: bytes, seed: int) -> list[list[bytes]]:
    rnd = random.Random(seed)
    # 1-byte feeds over the handshake and the first records, then the rest in one piece
    head = min(len(data), 20_000)
    out = [[data], [data[i:i + 1] for i in range(head)] + [data[head:]]]
    for top in (7, 600, 20_000, 70_000):
        parts, pos = [], 0
        while pos < len(data):
            n = rnd.randint(1, top)
            parts.append(data[pos:pos + n])
            pos += n
        out.append(parts)
    return out


def split_all(chunks: list[bytes], pool: bufpool.BufferPool) -> list[tuple[int, int, bytes]]:
    s = TLSRecordSplitter(pool=pool)
    got = []
    for c in chunks:
        got.extend((int(r.content_type), r.version, bytes(r.raw)) for r in s.feed(c))
    assert s.buffered == 0
    s.feed_eof()
    s.close()
    return got


def test_session_negotiated_what_the_test_asked(capture: Capture) -> None:
    assert capture.alpn == "http/1.1" and capture.client_hello_sni == "example.com"
    assert len(capture.payload_c2s) == 150_000 and len(capture.payload_s2c) == 300_000


@pytest.mark.parametrize("direction", ["client_to_server", "server_to_client"])
def test_every_chunking_gives_the_same_valid_records(capture: Capture, direction: str) -> None:
    stream: bytes = getattr(capture, direction)
    pool = bufpool.BufferPool()
    reference = split_all([stream], pool)
    assert b"".join(raw for _, _, raw in reference) == stream
    assert reference[0][0] == ContentType.handshake
    kinds = {ct for ct, _, _ in reference}
    assert ContentType.application_data in kinds
    for ct, version, raw in reference:
        assert 20 <= ct <= 24 and version >> 8 == 3
        assert 0 < len(raw) - 5 <= 16384 + 2048
    for chunks in chunkings(stream, 1)[1:]:
        assert split_all(chunks, pool) == reference
    gc.collect()
    pool.reclaim()
    assert pool.stats().in_use == 0 and pool.stats().quarantined == 0


def test_client_hello_carries_what_the_client_set(capture: Capture) -> None:
    pool = bufpool.BufferPool()
    s = TLSRecordSplitter(pool=pool)
    collector = ClientHelloCollector()
    hello = None
    for i in range(len(capture.client_to_server)):  # one byte at a time
        for r in s.feed(capture.client_to_server[i:i + 1]):
            hello = collector.add(r)
        if hello is not None:
            break
    s.close()
    assert hello is not None
    assert hello.server_name == "example.com"
    assert hello.alpn_protocols == ("h2", "http/1.1")
    if capture.version == "TLSv1.3":
        assert hello.supported_versions == (0x0304,)
        assert hello.max_version == 0x0304
    else:
        assert 0x0304 not in hello.supported_versions and hello.max_version == 0x0303
    assert hello.legacy_version == 0x0303 and len(hello.random) == 32
    assert hello.cipher_suites and hello.compression_methods == b"\x00"
    assert [t for t, _ in hello.extensions].count(0) == 1


def test_records_through_the_buffer_protocol_path_match(capture: Capture) -> None:
    pool = bufpool.BufferPool()
    s = TLSRecordSplitter(pool=pool, ring_capacity=40_000)
    stream = capture.server_to_client
    rnd = random.Random(3)
    got = bytearray()
    pos = 0
    while pos < len(stream):
        buf = s.get_buffer(-1)
        n = min(len(buf), len(stream) - pos, rnd.randint(1, 30_000))
        buf[:n] = stream[pos:pos + n]
        del buf
        pos += n
        for r in s.buffer_updated(n):
            got += r.raw
    assert bytes(got) == stream
    s.close()
    gc.collect()
    pool.reclaim()
    assert pool.stats().in_use == 0


def test_parse_client_hello_directly_from_handshake_payloads(certs: CertBundle) -> None:
    cap = openssl_session(certs, server_name="other.test", version=ssl.TLSVersion.TLSv1_3,
                          c2s=os.urandom(10), s2c=os.urandom(10))
    s = TLSRecordSplitter()
    first = s.feed(cap.client_to_server)[0]
    hello = parse_client_hello(first.payload)
    s.close()
    assert hello.server_name == "other.test" and hello.alpn_protocols == ()
