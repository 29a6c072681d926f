"""Command line and lifecycle shared by the stream examples (``echo_server.py``,
``framing_server.py``); imported from the script's own folder.

``--host``/``--port``/``--loop``/``--tls``; prints ``listening on HOST:PORT`` when ready; on
SIGINT or SIGTERM stops accepting, aborts every open connection, waits (at most
``CLOSE_TIMEOUT`` seconds) until each one's ``connection_lost`` has given its ring back, and
prints the pool's stats as one JSON line (``stats {...}``).

``--tls``: terminate TLS in the server (``loop.create_server(..., ssl=ctx)``).  A throwaway
self-signed certificate for ``localhost`` and 127.0.0.1 (ECDSA P-256, valid one day) is made
with ``cryptography`` at start in a temporary directory, removed at exit; its path is printed
right after the listening line (``certificate PATH``) for clients to trust, e.g.
``openssl s_client -connect 127.0.0.1:8888 -CAfile PATH``.  Both loops' SSL transports
decrypt straight into the protocol's ``get_buffer`` view, so plaintext lands in the ring's
pool memory as it does without TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import ssl
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

from _tls_cert import server_context  # examples/_tls_cert.py, beside this module

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
    parser.add_argument(
        "--tls", action="store_true",
        help="terminate TLS with a throwaway self-signed certificate (path printed at start)",
    )
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.SelectorEventLoop


async def serve(
    host: str,
    port: int,
    pool: BufferPool,
    factory: Callable[[], PooledProtocol],
    tls: tuple[ssl.SSLContext, Path] | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    protocols: weakref.WeakSet[PooledProtocol] = weakref.WeakSet()

    def make() -> PooledProtocol:
        proto = factory()
        protocols.add(proto)
        return proto

    server = await loop.create_server(make, host, port, ssl=tls[0] if tls else None)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    if tls is not None:
        print(f"certificate {tls[1]}", flush=True)
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
    directory = Path(tempfile.mkdtemp(prefix="bufpool-example-tls-")) if args.tls else None
    try:
        tls = server_context(directory) if directory is not None else None
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            runner.run(serve(args.host, args.port, pool, factory, tls))
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
