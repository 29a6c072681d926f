"""Fuzzing the splitter and ClientHello parser: random bytes and mutated real OpenSSL streams.

Only TLSRecordError subclasses may escape; pending bytes stay under one maximal record plus
header; every lease goes back to the pool."""

from __future__ import annotations

import gc
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bufpool
from bufpool.tls import (
    MAX_CIPHERTEXT,
    ClientHelloCollector,
    TLSRecordError,
    TLSRecordSplitter,
    parse_client_hello,
)
from tests._tls_helpers import real_tls_streams

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
POOL = bufpool.BufferPool(leak_detection="off")


@pytest.fixture(scope="module")
def real_streams(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return real_tls_streams(tmp_path_factory.mktemp("fuzzcerts"), c2s=5000, s2c=40000)


def run(stream: bytes, cuts: list[int], *, via_ring: bool = False,
        pool: bufpool.BufferPool = POOL) -> None:
    """Feed ``stream`` split at ``cuts``; check the invariants whatever happens."""
    s = TLSRecordSplitter(pool=pool)
    collector = ClientHelloCollector()
    pieces = []
    last = 0
    for c in sorted(set(x % (len(stream) + 1) for x in cuts)):
        pieces.append(stream[last:c])
        last = c
    pieces.append(stream[last:])
    def check(records: list) -> None:  # type: ignore[type-arg]
        nonlocal collector
        assert s.buffered <= 5 + MAX_CIPHERTEXT
        for r in records:
            assert 20 <= r.content_type <= 24 and r.version >> 8 == 3
            if not collector.complete and r.content_type == 22:
                try:
                    collector.add(r)
                except TLSRecordError:
                    collector = ClientHelloCollector()

    try:
        for piece in pieces:
            if via_ring:
                buf = s.get_buffer(-1)
                n = min(len(buf), len(piece))
                buf[:n] = piece[:n]
                del buf
                check(s.buffer_updated(n))
                if n < len(piece):
                    check(s.feed(piece[n:]))
            else:
                check(s.feed(piece))
        s.feed_eof()
    except TLSRecordError as exc:
        assert exc.offset >= 0 and 1 <= len(exc.header) <= 5, exc
    finally:
        s.close()


@SETTINGS
@given(st.binary(max_size=3000), st.lists(st.integers(0, 4000), max_size=20), st.booleans())
def test_random_bytes(data: bytes, cuts: list[int], via_ring: bool) -> None:
    run(data, cuts, via_ring=via_ring)


@SETTINGS
@given(
    st.integers(0, 3),
    st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.lists(st.integers(0, 100_000), max_size=30),
    st.booleans(),
)
def test_mutated_real_streams(
    real_streams: list[bytes], which: int, flips: list[tuple[int, int]], cuts: list[int],
    via_ring: bool,
) -> None:
    data = bytearray(real_streams[which])
    for at, value in flips:
        data[at % len(data)] = value
    run(bytes(data), cuts, via_ring=via_ring)


@SETTINGS
@given(st.binary(max_size=600))
def test_client_hello_parser_random(data: bytes) -> None:
    try:
        parse_client_hello(b"\x01" + len(data).to_bytes(3, "big") + data)
    except TLSRecordError:
        pass


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=6))
def test_client_hello_parser_mutated(real_streams: list[bytes], flips: list[tuple[int, int]]
                                     ) -> None:
    msg = bytearray(real_streams[2][5:5 + int.from_bytes(real_streams[2][3:5], "big")])
    for at, value in flips:
        msg[at % len(msg)] = value
    try:
        parse_client_hello(bytes(msg))
    except TLSRecordError:
        pass


def test_no_lease_leaked_by_fuzzing(real_streams: list[bytes]) -> None:
    """Self-contained: its own pool, its own seeded inputs (random bytes, mutated and
    truncated real streams, every chunking style, both input paths), then the pool's books."""
    pool = bufpool.BufferPool(leak_detection="paranoid")
    rnd = random.Random(20261201)
    for i in range(120):
        if i % 3 == 0:
            data = rnd.randbytes(rnd.randrange(3000))
        else:
            buf = bytearray(real_streams[i % len(real_streams)])
            for _ in range(rnd.randrange(4)):  # i % 4 == 0 keeps some streams intact
                buf[rnd.randrange(len(buf))] = rnd.randrange(256)
            data = bytes(buf[:rnd.randrange(len(buf) + 1)] if i % 5 == 0 else buf)
        cuts = [rnd.randrange(len(data) + 1) for _ in range(rnd.choice((0, 3, 30, 300)))]
        run(data, cuts, via_ring=bool(i % 2), pool=pool)
    gc.collect()
    pool.reclaim()
    stats = pool.stats()
    ring_and_joins = sum(t.hits + t.misses for t in stats.tiers)
    assert ring_and_joins > 120  # a ring per run, plus joined records: the pool was exercised
    assert stats.in_use == 0 and stats.quarantined == 0 and stats.leaked == 0, stats
