"""Echo server on ``bufpool.aio.PooledProtocol``.

Received bytes land in the connection's ring buffer (pool memory, no per-read allocation);
each batch is copied once into a pooled lease chain and written back with ``write_lease``,
which releases the chain at once — the pool keeps those slots out of circulation until the
transport has sent them.  Reading pauses while the peer does not read our writes.

    python examples/echo_server.py --port 8888 --loop uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import weakref
from collections.abc import Callable

from bufpool import BufferPool, RingBuffer
from bufpool.aio import PooledProtocol


class Echo(PooledProtocol):
    pool: BufferPool

    def data_available(self, ring: RingBuffer) -> None:
        chain = self.pool.acquire_chain(len(ring))
        for view in chain.views():
            ring.readinto(view)
        self.write_lease(chain)

    # Write backpressure: stop reading while the transport's queue is above its high mark.
    def pause_writing(self) -> None:
        self.pause_reading()

    def resume_writing(self) -> None:
        self.resume_reading()


# ---------------------------------------------------------------- command line and lifecycle
# --host/--port/--loop; prints "listening on HOST:PORT" when ready; on SIGINT/SIGTERM closes
# every connection and prints the pool's stats as one JSON line ("stats {...}").


def parse_args(
    description: str, extra: Callable[[argparse.ArgumentParser], object] | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888, help="0 picks a free port")
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
    args = parse_args("Echo server on bufpool.aio.PooledProtocol")
    pool = BufferPool()
    run(args, pool, lambda: Echo(pool))


if __name__ == "__main__":
    main()
