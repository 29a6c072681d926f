"""Length-prefixed framing server on ``bufpool.aio.PooledProtocol``.

Protocol: each request frame is a 4-byte big-endian length and that many payload bytes; the
server answers every frame with a frame holding the SHA-256 of its payload (32 bytes).  A
frame longer than ``--max-frame`` bytes gets an error frame (text starting with ``error:``)
and the connection is closed: the limit bounds memory per connection.

Frames are hashed in place from the ring (``peek``): no copy unless a frame straddles the
ring's end (then one counted copy).  Replies are written from pooled leases.

    python examples/framing_server.py --port 8889 --loop uvloop --max-frame 1048576
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import weakref
from collections.abc import Callable

from bufpool import BufferPool, RingBuffer
from bufpool.aio import PooledProtocol

HEADER = 4


class Framing(PooledProtocol):
    pool: BufferPool

    def __init__(self, pool: BufferPool, max_frame: int) -> None:
        super().__init__(pool, capacity=65536, max_capacity=max(65536, HEADER + max_frame))
        self.max_frame = max_frame

    def data_available(self, ring: RingBuffer) -> None:
        while len(ring) >= HEADER:
            n = int.from_bytes(ring.peek(HEADER), "big")
            if n > self.max_frame:
                self.reply(f"error: frame of {n} bytes exceeds max_frame={self.max_frame}".encode())
                assert self.transport is not None
                self.transport.close()
                ring.clear()
                return
            if len(ring) < HEADER + n:
                return
            digest = hashlib.sha256(ring.peek(HEADER + n)[HEADER:]).digest()
            ring.consume(HEADER + n)
            self.reply(digest)

    def reply(self, payload: bytes) -> None:
        lease = self.pool.acquire(HEADER + len(payload))
        view = lease.view
        view[:HEADER] = len(payload).to_bytes(HEADER, "big")
        view[HEADER:] = payload
        del view
        self.write_lease(lease)


# ---------------------------------------------------------------- command line and lifecycle
# --host/--port/--loop; prints "listening on HOST:PORT" when ready; on SIGINT/SIGTERM closes
# every connection and prints the pool's stats as one JSON line ("stats {...}").


def parse_args(
    description: str, extra: Callable[[argparse.ArgumentParser], object] | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8889, help="0 picks a free port")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.SelectorEventLoop


async def serve(
    host: str, port: int, pool: BufferPool, factory: Callable[[], PooledProtocol]
) -> None:
    loop = asyncio.get_running_loop()
    protocols: weakref.WeakSet[PooledProtocol] = weakref.WeakSet()

    def make() -> PooledProtocol:
        proto = factory()
        protocols.add(proto)
        return proto

    server = await loop.create_server(make, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    await stop.wait()
    server.close()
    for proto in list(protocols):
        if proto.transport is not None:
            proto.transport.abort()
    await asyncio.sleep(0.05)  # let connection_lost run and release the rings
    await server.wait_closed()
    print("stats " + json.dumps(pool.stats().as_dict()), flush=True)


def run(args: argparse.Namespace, pool: BufferPool, factory: Callable[[], PooledProtocol]) -> None:
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve(args.host, args.port, pool, factory))


def main() -> None:
    args = parse_args(
        "Length-prefixed framing server on bufpool.aio.PooledProtocol",
        lambda p: p.add_argument("--max-frame", type=int, default=1 << 20, help="bytes"),
    )
    pool = BufferPool()
    run(args, pool, lambda: Framing(pool, args.max_frame))


if __name__ == "__main__":
    main()
