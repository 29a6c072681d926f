"""Lease lifetimes under failure and slow peers: every lease released, no byte corrupted.

The pool's promise (a slot is reused only once no view of it is alive) is what makes releasing
at request end safe even while a transport still queues the response; these tests would fail
if a slot were handed out again early: scribblers fill fresh leases with 0xFF, a byte the
response pattern never contains.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
from typing import Any

import pytest
from _helpers_aiohttp import (
    PATTERN_LEN,
    SCRIBBLE,
    assert_drained,
    fill_pattern,
    make_app,
    make_pool,
    pattern,
    raw_connect,
    read_response,
    scribble,
    served,
    served_runner,
    wait_for,
)
from aiohttp import web
from conftest import loop_kind

import bufpool
import bufpool.aiohttp as bpa

#: aiohttp skips ``transport.writelines`` on interpreters before 3.12.9 / 3.13.2 (its
#: CVE-2024-12254 gate) and joins headers and body into new bytes; on newer ones it hands the
#: caller's memoryview to the transport, which keeps it (FINDINGS 1).  Tests that take this
#: fixture run both ways, whatever interpreter runs them.
WRITELINES = ["joined", "writelines"]


@pytest.fixture(params=WRITELINES)
def aiohttp_writes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    import aiohttp.http_writer as http_writer

    assert hasattr(http_writer, "SKIP_WRITELINES")
    monkeypatch.setattr(http_writer, "SKIP_WRITELINES", request.param == "joined")
    return str(request.param)


def _app_with_probe(pool: bufpool.BufferPool, events: list[Any]) -> web.Application:
    """/read: read_body, record the outcome, reply; /stall: read_body then wait forever."""

    async def read(request: web.Request) -> web.Response:
        try:
            body = await bpa.read_body(request)
        except BaseException as exc:
            events.append(type(exc).__name__)
            raise
        events.append("ok")
        return web.Response(text=str(len(body)))

    async def stall(request: web.Request) -> web.Response:
        await bpa.read_body(request)
        events.append("stalling")
        try:
            await asyncio.Event().wait()
        except BaseException as exc:
            events.append(type(exc).__name__)
            raise
        raise AssertionError("unreachable")

    app = make_app(pool)
    app.router.add_post("/read", read)
    app.router.add_post("/stall", stall)
    return app


@pytest.mark.asyncio
@pytest.mark.parametrize("cancellation", [False, True])
async def test_client_disconnect_mid_upload(cancellation: bool) -> None:
    pool = make_pool()
    events: list[Any] = []
    app = _app_with_probe(pool, events)
    async with served_runner(app, handler_cancellation=cancellation) as port:
        _reader, writer = await raw_connect(port)
        writer.write(b"POST /read HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n")
        writer.write(b"u" * 300_000)
        await writer.drain()
        assert await wait_for(lambda: pool.stats().in_use > 0)  # read_body holds the chain
        writer.transport.abort()  # vanish mid-upload
        assert await wait_for(lambda: bool(events))
        assert events[0] != "ok"
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_client_disconnect_mid_download() -> None:
    pool = make_pool()
    size = 8 * 1024 * 1024
    async with served_runner(make_app(pool)) as port:
        reader, writer = await raw_connect(port, rcvbuf=16384)
        try:
            writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            assert f"Content-Length: {size}".encode() in head
            got = await asyncio.wait_for(reader.readexactly(200_000), 10)
            assert got == pattern(200_000)
            assert pool.stats().in_use > 0  # the chain is leased while the response is written
        finally:
            writer.transport.abort()  # vanish mid-download (also when an assert failed)
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_handler_exceptions_release_everything() -> None:
    pool = make_pool()

    async def fail_after_read(request: web.Request) -> web.Response:
        await bpa.read_body(request)
        raise RuntimeError("handler bug")

    async def fail_after_response(request: web.Request) -> web.StreamResponse:
        body = await bpa.read_body(request)
        bpa.pooled_response(request, body)
        extra = pool.acquire(5000)
        bpa.pooled_response(request, extra)  # the request owns it now
        raise web.HTTPConflict(text="changed my mind")

    app = make_app(pool)
    app.router.add_post("/fail", fail_after_read)
    app.router.add_post("/conflict", fail_after_response)
    async with served(app) as client:
        for size in (10, 70_000, 500_000):
            r = await client.post("/fail", data=b"e" * size)
            assert r.status == 500
            r = await client.post("/conflict", data=b"e" * size)
            assert r.status == 409 and await r.text() == "changed my mind"
            assert pool.stats().in_use == 0
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_handler_cancelled_when_client_leaves() -> None:
    pool = make_pool()
    events: list[Any] = []
    app = _app_with_probe(pool, events)
    async with served_runner(app, handler_cancellation=True) as port:
        _reader, writer = await raw_connect(port)
        writer.write(b"POST /stall HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n")
        writer.write(b"s" * 200_000)
        await writer.drain()
        assert await wait_for(lambda: "stalling" in events)
        assert pool.stats().in_use == 4  # a chain of four 64 KiB slots
        writer.transport.abort()
        assert await wait_for(lambda: "CancelledError" in events)
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_timeout_inside_read_body_releases_at_once() -> None:
    pool = make_pool()
    seen: list[int] = []

    async def impatient(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(0.2):
                await bpa.read_body(request)
        except TimeoutError:
            seen.append(pool.stats().in_use)
            return web.Response(status=408, text="too slow", headers={"Connection": "close"})
        return web.Response(text="fast")

    app = make_app(pool)
    app.router.add_post("/impatient", impatient)
    async with served(app) as client:
        reader, writer = await raw_connect(client.port)  # type: ignore[arg-type]
        head = b"POST /impatient HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"c000\r\n" + b"t" * 0xC000 + b"\r\n")  # 48 KiB, then silence
        status, _h, body = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        assert (status, body) == (408, b"too slow")
        assert seen == [0]
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_throttled_reader_gets_every_byte_while_the_pool_churns(aiohttp_writes: str) -> None:
    """A 4 MiB pooled response to a reader with small socket buffers; meanwhile other
    requests echo random bodies and scribble 0xFF on fresh leases of every class.  Near the
    end the reader stops until the response's slots are released with bytes still queued in
    the transport (quarantined), and the churn goes on during that window."""
    pool = make_pool()
    size = 4 * 1024 * 1024

    async def big(request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:  # keep the backlog in the transport, not in the kernel
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        owned = pool.acquire_chain(size)
        fill_pattern(owned.views())
        return bpa.pooled_response(request, owned)

    async def scribbler(request: web.Request) -> web.Response:
        return web.Response(text=str(scribble(pool)))

    app = make_app(pool)
    app.router.add_get("/big", big)
    app.router.add_post("/scribble", scribbler)
    async with served(app) as client:
        reader, writer = await raw_connect(client.port, rcvbuf=16384)  # type: ignore[arg-type]
        writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        stop = asyncio.Event()

        async def churn() -> int:
            rng = random.Random(7)
            rounds = 0
            while not stop.is_set():
                data = rng.randbytes(rng.choice((100, 5000, 20_000, 70_000, 300_000)))
                r = await client.post("/echo", data=data)
                assert await r.read() == data
                r = await client.post("/scribble")
                assert r.status == 200
                rounds += 1
            return rounds

        churner = asyncio.ensure_future(churn())
        received = bytearray()
        paused = False
        quarantined_seen = False
        while len(received) < size:
            if not paused and len(received) >= size - 96 * 1024:
                paused = True  # stop reading: let the server finish and release
                quarantined_seen = await wait_for(lambda: pool.stats().quarantined > 0, 2.0)
                await asyncio.sleep(0.1)  # more churn while the slots wait in quarantine
            chunk = await reader.read(16384)
            assert chunk, "server closed early"
            received += chunk
            await asyncio.sleep(0.0005)  # throttled
        stop.set()
        rounds = await churner
        writer.close()
        assert rounds > 3
        assert received.count(SCRIBBLE) == 0
        assert bytes(received) == pattern(size)
        if loop_kind() == "uvloop" or sys.version_info >= (3, 12):
            # this transport keeps a reference to the memory it queues (FINDINGS 1): the
            # slots really waited in quarantine while the churn ran
            assert quarantined_seen
    await assert_drained(pool)


def _inner_release_app(pool: bufpool.BufferPool, naive: list[bytearray] | None) -> web.Application:
    """The FINDINGS case: a handler returns ``Response(body=mv)`` of a leased slot, and an
    inner middleware releases the slot right after the handler returned, before aiohttp has
    written a byte, then scribbles on every fresh slot it can get.

    With ``naive`` (a plain bytearray free list) the slot really is reused at once: the control
    showing the scenario catches early reuse."""
    current: list[Any] = []

    @web.middleware
    async def release_right_after(request: web.Request, handler: Any) -> web.StreamResponse:
        resp = await handler(request)
        assert not resp.prepared  # nothing has been written yet
        owned = current.pop()
        if naive is None:
            owned.release()
            scribble(pool, sizes=(65536,), per_class=64)
        else:
            naive.append(owned)
            for buf in naive:
                buf[:] = bytes([SCRIBBLE]) * len(buf)
        return resp

    async def handler(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if naive is None:
            lease = pool.acquire(n)
            lease.view[:] = pattern(n)
            current.append(lease)
            return web.Response(body=lease.view)
        buf = naive.pop() if naive else bytearray(n)
        buf[:] = pattern(n)
        current.append(buf)
        return web.Response(body=memoryview(buf))

    app = web.Application(middlewares=[release_right_after])
    bpa.setup(app, pool=pool)
    app.router.add_get("/r/{n}", handler)
    return app


@pytest.mark.asyncio
async def test_release_in_middleware_right_after_handler_returned_is_safe(
    aiohttp_writes: str,
) -> None:
    pool = make_pool()
    async with served(_inner_release_app(pool, None)) as client:
        for n in (1000, 4096, 40_000, 65536):
            for _ in range(5):
                r = await client.get(f"/r/{n}")
                body = await r.read()
                assert body.count(SCRIBBLE) == 0
                assert body == pattern(n)
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_naive_reuse_in_the_same_place_corrupts_every_byte(aiohttp_writes: str) -> None:
    """Control for the test above: the same code with a free list that does not track views."""
    naive: list[bytearray] = []
    pool = make_pool()
    async with served(_inner_release_app(pool, naive)) as client:
        r = await client.get("/r/40000")
        body = await r.read()
        assert len(body) == 40_000
        assert body == bytes([SCRIBBLE]) * 40_000  # every byte overwritten before it was sent
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_pooled_response_memory_is_leased_until_written(aiohttp_writes: str) -> None:
    """The middleware writes the response before releasing: a slot reused right after the
    middleware returns would be too late to hurt; and large chain responses stay intact."""
    pool = make_pool()
    async with served(make_app(pool)) as client:
        for n in (0, 1, 2047, 2048, 65536, 65537, 3 * 1024 * 1024 + 5):
            r = await client.get(f"/bytes/{n}")
            assert r.headers["Content-Length"] == str(n)
            body = await r.read()
            assert body == pattern(n)
            scribble(pool)
        head = await client.head(f"/bytes/{PATTERN_LEN}")
        assert head.status == 200 and await head.read() == b""
    await assert_drained(pool)
