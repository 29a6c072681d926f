"""Command line and lifecycle shared by the stream examples (``echo_server.py``,
``framing_server.py``); imported from the script's own folder.

``--host``/``--port``/``--loop``; prints ``listening on HOST:PORT`` when ready; on SIGINT or
SIGTERM stops accepting, aborts every open connection, waits (at most ``CLOSE_TIMEOUT``
seconds) until each one's ``connection_lost`` has given its ring back, and prints the pool's
stats as one JSON line (``stats {...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import weakref
from collections.abc import Callable

from bufpool import BufferPool
from bufpool.aio import PooledProtocol

#: Seconds to wait for aborted connections to run ``connection_lost`` at shutdown.
CLOSE_TIMEOUT = 5.0


def parse_args(
    description: str,
    default_port: int,
    extra: Callable[[argparse.ArgumentParser], object] | None = None,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
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
    try:  # connection_lost runs on a later loop iteration and releases each ring
        async with asyncio.timeout(CLOSE_TIMEOUT):
            while any(p.transport is not None for p in protocols):
                await asyncio.sleep(0.001)
    except TimeoutError:
        pass  # the stats printed below then show the rings still in use
    await server.wait_closed()
    print("stats " + json.dumps(pool.stats().as_dict()), flush=True)


def run(args: argparse.Namespace, pool: BufferPool, factory: Callable[[], PooledProtocol]) -> None:
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve(args.host, args.port, pool, factory))
