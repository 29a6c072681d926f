"""Shared pieces of the stream tests: a length-prefixed frame collector on PooledProtocol,
a loopback server helper, and pool-cleanliness checks."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import ssl
import struct
from collections.abc import Callable

from bufpool import BufferPool, RingBuffer
from bufpool.aio import PooledProtocol

HOST = "127.0.0.1"
TIMEOUT = 30.0  # generous: the machine is shared


def frame(payload: bytes) -> bytes:
    """4-byte big-endian length, then the payload."""
    return struct.pack(">I", len(payload)) + payload


async def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.0005)


def assert_pool_clean(pool: BufferPool) -> None:
    gc.collect()
    pool.reclaim()
    stats = pool.stats()
    assert stats.in_use == 0, stats
    assert stats.heap_in_use == 0, stats
    assert stats.quarantined == 0, stats


class FrameCollector(PooledProtocol):
    """Parses 4-byte-length frames in place; keeps copies of the payloads for checking.

    Frames longer than ``max_frame`` bytes abort the connection.  On EOF it answers with one
    frame (frame count + SHA-256 of all payloads), written from a pool lease, then closes.
    """

    def __init__(self, pool: BufferPool, *, max_frame: int = 1 << 20, **kwargs: int) -> None:
        super().__init__(pool, **kwargs)
        self.frames: list[bytes] = []
        self.chunks: list[int] = []
        self.hints: set[int] = set()
        self.received = 0
        self.max_frame = max_frame
        self.digest = hashlib.sha256()
        self.eof = False
        self.lost = False
        # Only the type: the exception's traceback can reference the receive view (and so the
        # ring's slot) through the loop's frames.
        self.lost_exc: type[Exception] | None = None
        self.buffered_at_loss = -1
        self.ring_grows = 0
        self.ring_copies = 0
        self.aborted = False

    def get_buffer(self, sizehint: int) -> memoryview:
        self.hints.add(sizehint)
        return super().get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.chunks.append(nbytes)
        self.received += nbytes
        super().buffer_updated(nbytes)

    def data_available(self, ring: RingBuffer) -> None:
        while len(ring) >= 4:
            n = int.from_bytes(ring.peek(4), "big")
            if n > self.max_frame:
                self.aborted = True
                assert self.transport is not None
                self.transport.abort()
                return
            if len(ring) < 4 + n:
                return
            payload = ring.peek(4 + n)[4:]
            self.digest.update(payload)
            self.frames.append(bytes(payload))
            del payload
            ring.consume(4 + n)

    def eof_received(self) -> bool | None:
        self.eof = True
        reply = struct.pack(">I", len(self.frames)) + self.digest.digest()
        assert self.pool is not None
        lease = self.pool.acquire(4 + len(reply))
        lease.view[:] = frame(reply)
        self.write_lease(lease)
        assert self.transport is not None
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        ring = self.ring
        self.buffered_at_loss = len(ring)
        self.ring_grows = ring.grows
        self.ring_copies = ring.copies
        self.lost = True
        self.lost_exc = None if exc is None else type(exc)
        super().connection_lost(exc)


class Server:
    """A loopback server whose protocols are kept for inspection."""

    def __init__(
        self, factory: Callable[[], PooledProtocol], *, ssl: ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        self.factory = factory
        self.ssl = ssl
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.protocols: list[PooledProtocol] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def _make(self) -> PooledProtocol:
        proto = self.factory()
        self.protocols.append(proto)
        return proto

    async def __aenter__(self) -> Server:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._make, HOST, 0, ssl=self.ssl, ssl_handshake_timeout=self.ssl_handshake_timeout
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def protocol(self) -> PooledProtocol:
        await wait_until(lambda: bool(self.protocols))
        return self.protocols[0]
