"""TLSRecordProtocol rings that start small (``initial_capacity``) over real loopback sockets on
both loops: records stay whole and in order while the ring grows, a bulk sender grows it to
full size, a small first flight does not, ``release_buffers`` gives the ring back early; and
``RingBuffer.reserve``, the growth step it uses."""

from __future__ import annotations

import asyncio

import pytest

import bufpool
from bufpool import BufferFull, RingBuffer
from tests._tls_helpers import HELLO, rec
from tests.test_tls_protocol import drained, record_mix, serve, wait_until


def test_reserve_grows_by_doubling_and_keeps_wrapped_data() -> None:
    pool = bufpool.BufferPool()
    with RingBuffer(1024, max_capacity=65536, pool=pool) as ring:
        ring.write(bytes(range(256)) * 3)  # 768 bytes
        ring.consume(700)
        ring.write(b"x" * 900)  # wraps: 968 bytes, head at 700
        data = b"".join(bytes(v) for v in ring.readable_views())
        ring.reserve(100)  # 56 free: grows to 2048
        assert (ring.capacity, ring.free, ring.grows) == (2048, 2048 - 968, 1)
        assert b"".join(bytes(v) for v in ring.readable_views()) == data
        ring.reserve(1000)  # already free: nothing happens
        assert (ring.capacity, ring.grows) == (2048, 1)
        with pytest.raises(BufferFull, match="max_capacity=65536"):
            ring.reserve(65536)
        assert ring.capacity == 2048 and len(ring) == 968  # nothing changed
    assert pool.stats().in_use == 0


@pytest.mark.asyncio
async def test_records_stay_whole_while_a_small_ring_grows_and_a_bulk_sender_grows_it_fully(
) -> None:
    pool = bufpool.BufferPool()
    server, port, made = await serve(pool, initial_capacity=1024)
    records = record_mix(300)
    small = [rec(23, bytes([i % 256]) * 200) for i in range(3000)]  # 600 KB of small records
    stream = b"".join(records + small)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(stream)
    await writer.drain()
    proto = await asyncio.wait_for(made, 30)
    await wait_until(lambda: len(proto.got) == len(records) + len(small))
    assert proto.got == records + small
    assert proto.ring.capacity == 65536  # a bulk sender is read in full-size pieces
    writer.close()
    await asyncio.wait_for(proto.lost, 30)
    server.close()
    await server.wait_closed()
    await drained(pool)


@pytest.mark.asyncio
async def test_a_small_first_flight_leaves_the_ring_at_its_initial_size() -> None:
    pool = bufpool.BufferPool()
    server, port, made = await serve(pool, initial_capacity=1024)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    first = HELLO + rec(22, bytes(512), 0x0301)  # about a real TLS 1.3 ClientHello's size
    writer.write(first)
    proto = await asyncio.wait_for(made, 30)
    await wait_until(lambda: len(proto.got) == 2)
    assert proto.ring.capacity == 1024 and proto.ring.grows == 0
    assert pool.stats().in_use == 1  # just the 1 KiB ring
    writer.close()
    await asyncio.wait_for(proto.lost, 30)
    server.close()
    await server.wait_closed()
    await drained(pool)


@pytest.mark.asyncio
async def test_release_buffers_after_eof_gives_the_ring_back_with_the_connection_open() -> None:
    pool = bufpool.BufferPool()
    loop = asyncio.get_running_loop()
    eof_seen: asyncio.Future[None] = loop.create_future()

    from tests.test_tls_protocol import Collector

    class HalfClose(Collector):
        def eof_received(self) -> bool | None:
            super().eof_received()
            self.release_buffers()
            eof_seen.set_result(None)
            return True  # keep writing

    made: asyncio.Future[HalfClose] = loop.create_future()

    def factory() -> HalfClose:
        p = HalfClose(pool, initial_capacity=1024)
        made.set_result(p)
        return p

    server = await loop.create_server(factory, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(HELLO + rec(23, b"a" * 3000))
    writer.write_eof()
    proto = await asyncio.wait_for(made, 30)
    await asyncio.wait_for(eof_seen, 30)
    assert proto.got == [HELLO, rec(23, b"a" * 3000)]
    assert pool.stats().in_use == 0 and proto.transport is not None  # ring gone, still open
    proto.transport.write(b"bye")
    proto.transport.close()
    assert await asyncio.wait_for(reader.read(), 30) == b"bye"
    await asyncio.wait_for(proto.lost, 30)
    writer.close()
    server.close()
    await server.wait_closed()
    await drained(pool)


def test_shrink_moves_the_data_into_smaller_storage_and_gives_the_old_back() -> None:
    pool = bufpool.BufferPool()
    with RingBuffer(1024, max_capacity=65536, pool=pool) as ring:
        ring.write(b"a" * 5000)  # grows to 8192
        ring.consume(4900)
        ring.write(b"b" * 50)
        data = b"".join(bytes(v) for v in ring.readable_views())
        assert ring.capacity == 8192
        assert not ring.shrink(100)  # 150 bytes buffered: does not fit
        assert not ring.shrink(8192) and not ring.shrink(0)
        assert ring.shrink(1024)
        assert (ring.capacity, len(ring), ring.max_capacity) == (1024, 150, 65536)
        assert b"".join(bytes(v) for v in ring.readable_views()) == data
        assert [t.in_use for t in pool.stats().tiers if t.size in (1024, 16384)] == [1, 0]
        ring.write(b"c" * 3000)  # grows again
        assert ring.capacity == 4096 and ring.read() == data + b"c" * 3000
    assert pool.stats().in_use == 0
    closed = RingBuffer(2048)
    closed.close()
    assert not closed.shrink(1024)
