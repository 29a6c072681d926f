"""TLSRecordProtocol over real loopback sockets on both loops: records in order, flow control,
clean close with the error on bad input, all pool memory back at the end."""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import Callable

import pytest

import bufpool
from bufpool.tls import (
    TLSRecord,
    TLSRecordError,
    TLSRecordProtocol,
    TruncatedRecordError,
    UnexpectedRecordError,
)
from tests._tls_helpers import HELLO, rec


def record_mix(count: int, seed: int = 0) -> list[bytes]:
    rnd = random.Random(seed)
    out = [HELLO]
    for i in range(count):
        r = rnd.random()
        n = rnd.randint(100, 300) if r < 0.4 else rnd.randint(1024, 4096) if r < 0.7 else 16401
        out.append(rec(23, bytes([i % 256]) * n))
    return out


class Collector(TLSRecordProtocol):
    def __init__(self, pool: bufpool.BufferPool, **kw: object) -> None:
        super().__init__(pool, **kw)  # type: ignore[arg-type]
        self.got: list[bytes] = []
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future()
        )
        self.errors: list[TLSRecordError] = []

    def record_received(self, record: TLSRecord) -> None:
        self.got.append(bytes(record.raw))

    def record_error(self, exc: TLSRecordError) -> None:
        self.errors.append(exc)
        super().record_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(exc)


async def serve(pool: bufpool.BufferPool, **kw: object
                ) -> tuple[asyncio.Server, int, asyncio.Future[Collector]]:
    loop = asyncio.get_running_loop()
    made: asyncio.Future[Collector] = loop.create_future()

    def factory() -> Collector:
        proto = Collector(pool, **kw)
        if not made.done():
            made.set_result(proto)
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], made


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def drained(pool: bufpool.BufferPool) -> None:
    """Wait (bounded) until the closing connections gave every slot back."""

    def clean() -> bool:
        gc.collect()
        pool.reclaim()
        st = pool.stats()
        return st.in_use == 0 and st.quarantined == 0

    try:
        await wait_until(clean)
    except TimeoutError:
        raise AssertionError(f"pool not drained: {pool.stats()}") from None


@pytest.mark.asyncio
@pytest.mark.parametrize("chunk", [1, 997, 65536])
async def test_records_arrive_whole_and_in_order(chunk: int) -> None:
    pool = bufpool.BufferPool()
    server, port, made = await serve(pool)
    records = record_mix(40 if chunk == 1 else 400)
    stream = b"".join(records)
    if chunk == 1:
        stream = stream[:60_000]
        records = [r for r in records if sum(map(len, records[:records.index(r) + 1])) <= 60_000]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(0, len(stream), chunk):
        writer.write(stream[i:i + chunk])
        if chunk == 1 and i % 64 == 0:
            await writer.drain()
            await asyncio.sleep(0)
    await writer.drain()
    writer.close()
    proto = await asyncio.wait_for(made, 30)
    await asyncio.wait_for(proto.lost, 30)
    assert b"".join(proto.got) == b"".join(records)
    assert proto.got == records
    if len(b"".join(records)) < len(stream):  # the cut 1-byte stream ends inside a record
        assert [type(e) for e in proto.errors] == [TruncatedRecordError]
    else:
        assert proto.errors == []
    server.close()
    await server.wait_closed()
    await drained(pool)


@pytest.mark.asyncio
async def test_bad_record_closes_cleanly_with_the_error() -> None:
    pool = bufpool.BufferPool()
    server, port, made = await serve(pool)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HELLO + rec(23, b"fine") + rec(42, b"bad") + rec(23, b"never"))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 30) == b""  # the server closed
    proto = await asyncio.wait_for(made, 30)
    await asyncio.wait_for(proto.lost, 30)
    assert proto.got == [HELLO, rec(23, b"fine")]
    assert isinstance(proto.error, UnexpectedRecordError)
    assert proto.errors == [proto.error] and proto.error.offset == len(HELLO) + 9
    writer.close()
    server.close()
    await server.wait_closed()
    await drained(pool)


@pytest.mark.asyncio
async def test_stream_ending_inside_a_record_reports_truncation() -> None:
    pool = bufpool.BufferPool()
    server, port, made = await serve(pool)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HELLO + rec(23, b"abcdef")[:8])
    await writer.drain()
    writer.write_eof()
    proto = await asyncio.wait_for(made, 30)
    await asyncio.wait_for(proto.lost, 30)
    writer.close()
    assert proto.got == [HELLO]
    assert isinstance(proto.error, TruncatedRecordError) and proto.error.offset == len(HELLO)
    server.close()
    await server.wait_closed()
    await drained(pool)


@pytest.mark.asyncio
async def test_pause_reading_stops_delivery_until_resumed() -> None:
    pool = bufpool.BufferPool()

    class Pausing(Collector):
        def record_received(self, record: TLSRecord) -> None:
            super().record_received(record)
            if len(self.got) == 50:
                self.pause_reading()

    loop = asyncio.get_running_loop()
    made: asyncio.Future[Pausing] = loop.create_future()

    def factory() -> Pausing:
        p = Pausing(pool)
        made.set_result(p)
        return p

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    records = [HELLO] + [rec(23, bytes(16384))] * 600  # ~9.8 MB: more than socket buffers
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(records))
    proto = await asyncio.wait_for(made, 30)
    await wait_until(lambda: len(proto.got) >= 50)
    frozen = len(proto.got)
    assert proto.reading_paused
    assert proto.transport is not None and not proto.transport.is_reading()
    assert 50 <= frozen <= 50 + 65536 // 16389 + 1  # at most the rest of one read
    for _ in range(20):  # let the loop run: a paused transport delivers nothing
        await asyncio.sleep(0.01)
    assert len(proto.got) == frozen
    proto.resume_reading()
    await asyncio.wait_for(writer.drain(), 30)
    writer.close()
    await asyncio.wait_for(proto.lost, 30)
    assert len(proto.got) == len(records) and proto.got == records
    server.close()
    await server.wait_closed()
    await drained(pool)


@pytest.mark.asyncio
async def test_real_openssl_stream_over_the_socket(tmp_path: object) -> None:
    import ssl

    from tests._tls_helpers import make_certs, openssl_session

    certs = make_certs(["example.com"])
    cap = openssl_session(certs, server_name="example.com", version=ssl.TLSVersion.TLSv1_3,
                          c2s=bytes(300_000), s2c=b"x")
    pool = bufpool.BufferPool()
    server, port, made = await serve(pool)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(cap.client_to_server)
    await writer.drain()
    writer.close()
    proto = await asyncio.wait_for(made, 30)
    await asyncio.wait_for(proto.lost, 30)
    assert proto.error is None
    assert b"".join(proto.got) == cap.client_to_server
    server.close()
    await server.wait_closed()
    await drained(pool)


def test_too_small_ring_is_refused_when_the_protocol_is_built() -> None:
    """Not at connection_made, where the loop would only log it."""
    with pytest.raises(ValueError, match="at least 36874 bytes"):
        TLSRecordProtocol(bufpool.BufferPool(), capacity=36873)
    TLSRecordProtocol(bufpool.BufferPool(), capacity=36874)
