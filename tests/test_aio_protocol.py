"""PooledProtocol over real loopback sockets, on the default loop and on uvloop (every test
runs as [asyncio] and [uvloop]).  Each test ends with the pool holding nothing."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random
import socket
import struct
import warnings
from collections.abc import Callable

import pytest

import bufpool
from bufpool import BufferPool, RingBuffer
from bufpool.aio import PooledProtocol
from tests._helpers_streams import (
    HOST,
    FrameCollector,
    Server,
    assert_pool_clean,
    frame,
    wait_until,
)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


@pytest.mark.asyncio
async def test_one_byte_chunks_reassemble_frames_across_the_wrap() -> None:
    pool = BufferPool()
    payloads = [b"", b"a", bytes(range(40)), b"xyz" * 10, b"\x00" * 3]
    stream = b"".join(frame(p) for p in payloads)
    async with Server(lambda: FrameCollector(pool, capacity=16, max_capacity=64)) as srv:
        _reader, writer = await asyncio.open_connection(HOST, srv.port)
        proto = await srv.protocol()
        assert isinstance(proto, FrameCollector)
        for i in range(len(stream)):
            writer.write(stream[i : i + 1])
            await wait_until(lambda i=i: proto.received == i + 1)  # type: ignore[misc]
        assert proto.chunks == [1] * len(stream)  # the handshake made every read one byte
        assert proto.frames == payloads
        await _close(writer)
        await wait_until(lambda: proto.lost)
    assert proto.ring_grows >= 1  # 44-byte frame in a 16-byte ring
    assert proto.buffered_at_loss == 0
    assert_pool_clean(pool)


@pytest.mark.asyncio
async def test_large_burst_of_mixed_frames_is_byte_exact() -> None:
    pool = BufferPool()
    rng = random.Random(3)
    payloads = [rng.randbytes(rng.choice([0, 7, 300, 4000, 16384, 70_000])) for _ in range(300)]
    stream = b"".join(frame(p) for p in payloads)
    assert len(stream) > 4 * 1024 * 1024
    async with Server(lambda: FrameCollector(pool, capacity=4096, max_capacity=256 * 1024)) as srv:
        _reader, writer = await asyncio.open_connection(HOST, srv.port)
        writer.write(stream)
        await writer.drain()
        proto = await srv.protocol()
        assert isinstance(proto, FrameCollector)
        await wait_until(lambda: len(proto.frames) == len(payloads))
        assert proto.frames == payloads
        assert max(proto.chunks) > 1
        assert proto.hints <= {-1, 65536}  # selector asks -1, uvloop 65536
        await _close(writer)
        await wait_until(lambda: proto.lost)
    assert proto.ring_grows >= 1
    assert proto.ring_copies >= 1  # some frames straddled the wrap and were linearized
    assert_pool_clean(pool)


@pytest.mark.asyncio
async def test_half_close_processes_everything_and_replies_before_closing() -> None:
    pool = BufferPool()
    payloads = [bytes([i]) * (i * 97) for i in range(60)]
    async with Server(lambda: FrameCollector(pool)) as srv:
        reader, writer = await asyncio.open_connection(HOST, srv.port)
        writer.write(b"".join(frame(p) for p in payloads))
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 30)
        proto = await srv.protocol()
        assert isinstance(proto, FrameCollector)
        count, digest = struct.unpack(">I32s", reply[4:])
        assert int.from_bytes(reply[:4], "big") == 36
        assert count == len(payloads)
        assert digest == hashlib.sha256(b"".join(payloads)).digest()
        assert proto.eof
        await _close(writer)
        await wait_until(lambda: proto.lost)
    assert_pool_clean(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_connection_lost_mid_frame_releases_the_ring(how: str) -> None:
    pool = BufferPool()
    async with Server(lambda: FrameCollector(pool, capacity=1024)) as srv:
        sock = socket.create_connection((HOST, srv.port))
        sock.sendall(frame(b"done") + struct.pack(">I", 1000) + b"p" * 300)
        proto = await srv.protocol()
        assert isinstance(proto, FrameCollector)
        await wait_until(lambda: proto.received == 8 + 304)
        assert proto.frames == [b"done"]
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await wait_until(lambda: proto.lost)
    assert proto.buffered_at_loss == 304  # the partial frame was held until the end
    if how == "reset":
        assert proto.lost_exc is not None and issubclass(proto.lost_exc, ConnectionError)
    else:
        assert proto.eof
    assert proto.transport is None
    with pytest.raises(RuntimeError, match="not connected"):
        proto.ring  # noqa: B018
    assert_pool_clean(pool)


@pytest.mark.asyncio
async def test_abort_from_the_hook_releases_the_ring() -> None:
    pool = BufferPool()
    async with Server(lambda: FrameCollector(pool, max_frame=100)) as srv:
        _reader, writer = await asyncio.open_connection(HOST, srv.port)
        writer.write(frame(b"ok") + struct.pack(">I", 101) + b"x" * 50)
        proto = await srv.protocol()
        assert isinstance(proto, FrameCollector)
        await wait_until(lambda: proto.lost)
        assert proto.aborted and proto.frames == [b"ok"]
        await _close(writer)
    assert_pool_clean(pool)


class Lazy(PooledProtocol):
    """Consumes nothing in the hook: the test takes data out through the protocol."""


@pytest.mark.asyncio
async def test_reading_pauses_when_the_ring_is_full_and_resumes_on_consume() -> None:
    pool = BufferPool()
    total = 1024 * 1024
    data = bytes(random.Random(5).randbytes(total))
    protos: list[Lazy] = []

    def make() -> Lazy:
        protos.append(Lazy(pool, capacity=4096, max_capacity=16384))
        return protos[-1]

    async with Server(make) as srv:
        _reader, writer = await asyncio.open_connection(HOST, srv.port)
        writer.write(data)
        await wait_until(lambda: bool(protos))
        proto = protos[0]
        transport = proto.transport
        assert transport is not None

        # First pause: full at max.  App-level pause on top must keep it paused after consume.
        await wait_until(lambda: proto.reading_paused)
        assert len(proto.ring) == 16384 == proto.ring.capacity
        assert not transport.is_reading()
        got = bytearray(proto.read(4096))
        assert proto.reading_paused  # 12288 bytes left > resume_below (8192)
        proto.pause_reading()
        got += proto.read(len(proto.ring))
        assert not transport.is_reading()  # the application still holds it
        proto.resume_reading()
        assert transport.is_reading()

        pauses = 1
        while len(got) < total:
            want = min(16384, total - len(got))
            await wait_until(lambda: len(proto.ring) == want)  # noqa: B023
            if proto.reading_paused:
                pauses += 1
                assert not transport.is_reading()
            if pauses % 2:
                got += proto.read(len(proto.ring))
            else:  # consume straight from the ring, then ask for the resume check
                ring = proto.ring
                got += bytes(ring.peek(len(ring)))
                ring.consume(len(ring))
                proto.maybe_resume_reading()
            assert not proto.reading_paused and transport.is_reading()
        assert got == data
        assert pauses > 10
        await _close(writer)
        await wait_until(lambda: proto.transport is None)
    assert_pool_clean(pool)


@pytest.mark.asyncio
async def test_pooled_ring_memory_counts_in_the_pool_while_connected() -> None:
    pool = BufferPool()
    async with Server(lambda: FrameCollector(pool, capacity=16384)) as srv:
        _reader, writer = await asyncio.open_connection(HOST, srv.port)
        proto = await srv.protocol()
        tier = next(t for t in pool.stats().tiers if t.size == 16384)
        assert tier.in_use == 1
        assert isinstance(proto.ring, RingBuffer) and proto.ring.pool is pool
        await _close(writer)
        await wait_until(lambda: proto.transport is None)
    assert_pool_clean(pool)


def test_loop_closed_with_the_connection_open_returns_ring_memory_as_a_counted_leak(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """asyncio never calls connection_lost when the loop itself is closed under an open
    connection.  The ring's slot still comes back: through the pool's leak path, counted in
    ``leaked`` and reported as LeakWarning (see docs/streams.md)."""
    pool = BufferPool()
    lost: list[Exception | None] = []

    class Tracked(PooledProtocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)
            super().connection_lost(exc)

    peer: list[socket.socket] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Tracked(pool), HOST, 0)
        sock = socket.create_connection((HOST, server.sockets[0].getsockname()[1]))
        peer.append(sock)
        sock.sendall(b"abc")
        await wait_until(lambda: pool.stats().in_use == 1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # unclosed transport/server
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())
        gc.collect()
    with pytest.warns(bufpool.LeakWarning, match="65536-byte lease"):
        bufpool.report_leaks()
    peer[0].close()
    assert lost == []
    stats = pool.stats()
    assert stats.leaked == 1
    assert_pool_clean(pool)
