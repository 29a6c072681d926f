"""Shared pieces of the aiohttp integration tests: a test app, a served context, drain checks.

Everything runs for real: an aiohttp server on 127.0.0.1 (port 0) and a real client.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import bufpool
import bufpool.aiohttp as bpa

#: Never contains 0xFF: a 0xFF byte received means reused (scribbled) memory.
PATTERN_LEN = 251 * 64
PATTERN = bytes((i * 7 + 13) % 251 for i in range(PATTERN_LEN))
SCRIBBLE = 0xFF


def pattern(n: int, offset: int = 0) -> bytes:
    reps = (offset + n) // PATTERN_LEN + 1
    return (PATTERN * reps)[offset : offset + n]


def fill_pattern(views: list[memoryview]) -> None:
    pos = 0
    for view in views:
        view[:] = pattern(len(view), pos % PATTERN_LEN)
        pos += len(view)


def lease_for(pool: bufpool.BufferPool, n: int) -> bufpool.Lease | bufpool.LeaseChain:
    return pool.acquire(n) if n <= pool.classes[-1] else pool.acquire_chain(n)


def views_of(owned: bufpool.Lease | bufpool.LeaseChain) -> list[memoryview]:
    return [owned.view] if isinstance(owned, bufpool.Lease) else owned.views()


def scribble(pool: bufpool.BufferPool, sizes: tuple[int, ...] = (64, 1024, 4096, 16384, 65536),
             per_class: int = 16) -> int:
    """Take fresh leases of every class, fill them with 0xFF, release them; returns how many."""
    taken: list[bufpool.Lease] = []
    try:
        for size in sizes:
            for _ in range(per_class):
                lease = pool.acquire(size)
                lease.view[:] = bytes([SCRIBBLE]) * len(lease)
                taken.append(lease)
    finally:
        for lease in taken:
            lease.release()
    return len(taken)


def make_pool(**kw: Any) -> bufpool.BufferPool:
    kw.setdefault("max_bytes", 64 << 20)
    return bufpool.BufferPool(**kw)


async def upload(request: web.Request) -> web.Response:
    body = await bpa.read_body(request)
    return web.json_response(
        {"size": len(body), "sha256": body.sha256(), "contiguous": body.contiguous,
         "pieces": len(body.views())}
    )


async def echo(request: web.Request) -> web.StreamResponse:
    body = await bpa.read_body(request)
    return bpa.pooled_response(request, body)


async def pattern_bytes(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    owned = lease_for(request.app[bpa.POOL_KEY], n)
    fill_pattern(views_of(owned))
    return bpa.pooled_response(request, owned)


def make_app(pool: bufpool.BufferPool, **setup_kw: Any) -> web.Application:
    app = web.Application()
    bpa.setup(app, pool=pool, **setup_kw)
    app.router.add_post("/upload", upload)
    app.router.add_post("/echo", echo)
    app.router.add_get("/bytes/{n}", pattern_bytes)
    return app


@asynccontextmanager
async def served(app: web.Application, **server_kw: Any) -> AsyncIterator[TestClient[Any, Any]]:
    """A real server on 127.0.0.1:0 and a client for it; both closed on exit."""
    server = TestServer(app, host="127.0.0.1", port=0, **server_kw)
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def assert_drained(pool: bufpool.BufferPool, timeout: float = 10.0) -> None:
    """No lease in use, and quarantine drains once the connections let go (polled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        gc.collect()
        pool.reclaim()
        stats = pool.stats()
        if (stats.in_use == 0 and stats.quarantined == 0 and stats.heap_in_use == 0) or (
            loop.time() > deadline
        ):
            break
        await asyncio.sleep(0.02)
    assert stats.in_use == 0, f"{stats.in_use} leases still in use"
    assert stats.heap_in_use == 0, f"{stats.heap_in_use} heap leases still in use"
    assert stats.quarantined == 0, f"{stats.quarantined} slots still quarantined"
    assert stats.leaked == 0, f"{stats.leaked} leases leaked"


async def raw_connect(port: int, rcvbuf: int | None = None) -> tuple[
    asyncio.StreamReader, asyncio.StreamWriter
]:
    """A plain TCP connection to the test server (for malformed or throttled traffic)."""
    if rcvbuf is None:
        return await asyncio.open_connection("127.0.0.1", port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=rcvbuf)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length (or up to EOF)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return status, headers, body


@asynccontextmanager
async def served_runner(app: web.Application, **runner_kw: Any) -> AsyncIterator[int]:
    """``web.AppRunner`` + ``TCPSite`` on 127.0.0.1:0 (aiohttp's production defaults, e.g.
    handler_cancellation=False); yields the port."""
    runner = web.AppRunner(app, **runner_kw)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass; returns its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return bool(predicate())
        await asyncio.sleep(0.01)
    return True


def post_head(path: str, length: int | None, *, chunked: bool = False) -> bytes:
    """A POST request head declaring ``length`` body bytes (or chunked framing)."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return f"POST {path} HTTP/1.1\r\nHost: t\r\n{framing}\r\n\r\n".encode()


class Attackers:
    """Raw connections that declare a body and then send nothing, or 1 byte per 100 ms."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def hold(self, length: int, first: int = 0) -> None:
        """Declare ``length`` bytes, send ``first`` of them, then nothing."""
        reader, writer = await raw_connect(self.port)
        writer.write(post_head("/upload", length) + b"x" * first)
        self.conns.append((reader, writer))

    async def trickle(self, length: int, first: int = 0) -> None:
        reader, writer = await raw_connect(self.port)
        writer.write(post_head("/upload", length) + b"x" * first)
        self.conns.append((reader, writer))

        async def drip() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while not writer.is_closing():
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(0.1)  # the attacker's pace, not a synchronisation

        self.tasks.append(asyncio.ensure_future(drip()))

    async def statuses(self, timeout: float = 10.0) -> list[tuple[int, str]]:
        """Each attacker's answer (status, text); the server closes the connection after.

        A trickler whose next byte meets the closed socket gets a reset, which can discard
        the 408 before it is read: that answer is (0, "reset")."""
        out = []
        for reader, _writer in self.conns:
            try:
                status, _headers, body = await asyncio.wait_for(read_response(reader), timeout)
            except ConnectionResetError:
                out.append((0, "reset"))
                continue
            out.append((status, body.decode(errors="replace")))
        return out

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for _reader, writer in self.conns:
            writer.close()
