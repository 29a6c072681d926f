"""Pooled writes reach a slow reader byte-exact although the lease is released right after
``write``/``writelines`` and the pool keeps handing out (and scribbling over) new leases.

The reader is a plain blocking socket in a thread with a small SO_RCVBUF that starts reading
only after everything was written, so the transport really queues megabytes.  Every asyncio
test here runs on the default loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time

import pytest

from bufpool import BufferPool, Lease
from bufpool.aio import drain_complete, write_lease
from tests._helpers_streams import HOST, TIMEOUT, assert_pool_clean, wait_until

TOTAL = 8 * 1024 * 1024
SLOT = 65536
FF = {n: b"\xff" * n for n in (100, 1500, 16000, SLOT)}


def pattern(start: int, n: int) -> bytes:
    """Bytes that never contain 0xFF: any 0xFF received came from reused memory."""
    return bytes((start + i) % 251 for i in range(251)) * (n // 251 + 2)


def expected_stream(n: int) -> bytes:
    return pattern(0, n)[:n]


def loop_keeps_references(loop: asyncio.AbstractEventLoop) -> bool:
    """Measured (FINDINGS §1): only 3.11's selector transport copies what it queues."""
    uv = type(loop).__module__.startswith("uvloop")
    return uv or sys.version_info >= (3, 12)


class SlowReader:
    """Accepts one connection with a small receive buffer; reads only after ``start()``,
    in small pieces with pauses, until ``total`` bytes arrived or the peer closed."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.received = bytearray()
        self.done = threading.Event()
        self._go = threading.Event()
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited
        self.lsock.bind((HOST, 0))
        self.lsock.listen(1)
        self.port = self.lsock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def start(self) -> None:
        self._go.set()

    def _run(self) -> None:
        try:
            conn, _ = self.lsock.accept()
            with conn:
                self._go.wait(TIMEOUT)
                deadline = time.monotonic() + TIMEOUT
                while len(self.received) < self.total and time.monotonic() < deadline:
                    chunk = conn.recv(32768)
                    if not chunk:
                        break
                    self.received += chunk
                    time.sleep(0.0005)
        finally:
            self.lsock.close()
            self.done.set()


async def connect(reader: SlowReader) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, HOST, reader.port)
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return transport


async def scribble_until(pool: BufferPool, done: threading.Event) -> int:
    """Keep acquiring leases from the pool, filling them with 0xFF, releasing them."""
    rounds = 0
    while not done.is_set():
        leases: list[Lease] = [pool.acquire(SLOT) for _ in range(16)]
        leases += [pool.acquire(n) for n in (100, 1500, 16000)]
        for lease in leases:
            lease.view[:] = FF[len(lease)]
            lease.release()
        del leases, lease
        rounds += 1
        await asyncio.sleep(0.001)
    return rounds


async def check_delivery(
    pool: BufferPool, transport: asyncio.Transport, reader: SlowReader
) -> None:
    loop = asyncio.get_running_loop()
    queued = transport.get_write_buffer_size()
    assert queued > 1024 * 1024, f"only {queued} bytes queued: the test would prove nothing"
    stats = pool.stats()
    assert stats.in_use == 0  # every lease was released right after the write call
    if loop_keeps_references(loop):
        assert stats.quarantined > 0, "queued slots must be quarantined, not free"
    else:
        assert stats.quarantined == 0  # 3.11 selector copied into its own buffer

    reader.start()
    rounds = await scribble_until(pool, reader.done)
    reader.thread.join(TIMEOUT)
    assert rounds > 0
    assert len(reader.received) == reader.total
    assert b"\xff" not in reader.received
    assert reader.received == expected_stream(reader.total)

    await drain_complete(transport, timeout=TIMEOUT)
    assert transport.get_write_buffer_size() == 0
    assert_pool_clean(pool)  # the transport dropped its views: quarantine reclaimed
    transport.close()


@pytest.mark.asyncio
async def test_released_leases_written_one_by_one_arrive_unchanged() -> None:
    pool = BufferPool()
    reader = SlowReader(TOTAL)
    transport = await connect(reader)
    data = expected_stream(TOTAL)
    for off in range(0, TOTAL, SLOT):
        lease = pool.acquire(SLOT)
        lease.view[:] = data[off : off + SLOT]
        write_lease(transport, lease)  # writes, then releases our ownership at once
        assert lease.released
        del lease
        # The next owner of any free slot scribbles over it immediately.
        with pool.acquire(SLOT) as other:
            other.view[:] = FF[SLOT]
    await check_delivery(pool, transport, reader)


@pytest.mark.asyncio
async def test_released_chain_written_with_writelines_arrives_unchanged() -> None:
    pool = BufferPool()
    reader = SlowReader(TOTAL)
    transport = await connect(reader)
    data = expected_stream(TOTAL)
    chain = pool.acquire_chain(TOTAL)
    assert len(chain.leases) == TOTAL // SLOT
    off = 0
    for view in chain.views():
        view[:] = data[off : off + len(view)]
        off += len(view)
    del view
    write_lease(transport, chain)  # writelines, then release every lease of the chain
    assert chain.released
    del chain
    with pool.acquire_chain(TOTAL) as other:
        for view in other.views():
            view[:] = FF[SLOT]
        del view
    await check_delivery(pool, transport, reader)


@pytest.mark.asyncio
async def test_control_unpooled_memory_overwritten_after_write_is_corrupted() -> None:
    """Without the pool's promise the same setup does see reuse (except on 3.11 selector,
    which copies): so the tests above would catch a broken quarantine."""
    reader = SlowReader(TOTAL)
    transport = await connect(reader)
    buf = bytearray(expected_stream(TOTAL))
    transport.write(memoryview(buf))
    assert transport.get_write_buffer_size() > 1024 * 1024
    buf[:] = b"\xff" * TOTAL  # what a pool without quarantine would let the next owner do
    reader.start()
    await wait_until(reader.done.is_set)
    reader.thread.join(TIMEOUT)
    corrupted = reader.received.count(0xFF)
    if loop_keeps_references(asyncio.get_running_loop()):
        assert corrupted > 1024 * 1024
    else:
        assert corrupted == 0
    transport.close()
