"""HTTP features around the middleware: HEAD, Expect: 100-continue, pipelining, streaming,
file and websocket routes that never call read_body, and misuse of read_body.

Every test runs a real aiohttp server on 127.0.0.1 with a real client (raw sockets where the
exact bytes on the wire matter) and ends with every lease back and the quarantine drained.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
from _helpers_aiohttp import (
    assert_drained,
    make_app,
    make_pool,
    pattern,
    raw_connect,
    read_response,
    served,
)
from aiohttp import web

import bufpool.aiohttp as bpa


@pytest.mark.asyncio
async def test_pipelined_requests_on_one_connection_including_head() -> None:
    """Several requests written back to back on one keep-alive connection: each answer is
    complete and in order; a HEAD answer carries Content-Length but no body bytes (a body
    there would be read as the start of the next answer)."""
    pool = make_pool()
    async with served(make_app(pool)) as client:
        reader, writer = await raw_connect(client.port)  # type: ignore[arg-type]
        bodies = [b"a" * 10, b"b" * 70_000, b""]
        wire = b"".join(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
            for b in bodies
        )
        wire += b"HEAD /bytes/5000 HTTP/1.1\r\nHost: t\r\n\r\n"
        wire += b"GET /bytes/3000 HTTP/1.1\r\nHost: t\r\n\r\n"
        writer.write(wire)
        for body in bodies:
            status, _headers, got = await asyncio.wait_for(read_response(reader), 10)
            assert (status, got) == (200, body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 5000\r\n" in head
        status, _headers, got = await asyncio.wait_for(read_response(reader), 10)
        assert (status, got) == (200, pattern(3000))
        writer.close()
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_expect_100_continue() -> None:
    """The client waits for ``100 Continue`` before sending the body; the answer is exact."""
    pool = make_pool()
    data = bytes(range(256)) * 300
    async with served(make_app(pool)) as client:
        r = await client.post("/upload", data=data, expect100=True)
        assert r.status == 200
        got = await r.json()
        assert got["sha256"] == hashlib.sha256(data).hexdigest()
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_routes_that_never_read_the_body_are_untouched(tmp_path: Path) -> None:
    """FileResponse, a handler streaming with write(), and a websocket echo work unchanged
    behind the middleware (it only steps in for requests that hold pooled memory)."""
    pool = make_pool()
    path = tmp_path / "file.bin"
    path.write_bytes(pattern(200_000))

    async def file(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path)

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b"%d;" % i)
        return resp

    async def ws(request: web.Request) -> web.StreamResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str(msg.data.upper())
        return sock

    app = make_app(pool)
    app.router.add_get("/file", file)
    app.router.add_get("/stream", stream)
    app.router.add_get("/ws", ws)
    async with served(app) as client:
        r = await client.get("/file")
        assert await r.read() == pattern(200_000)
        r = await client.get("/stream")
        assert await r.read() == b"0;1;2;3;4;"
        async with client.ws_connect("/ws") as conn:
            await conn.send_str("hello")
            assert await asyncio.wait_for(conn.receive_str(), 10) == "HELLO"
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_read_body_twice_returns_the_same_body() -> None:
    """A second read_body (say, in a middleware and again in the handler) is the same body,
    not a bogus "truncated" 400 from reading an exhausted stream."""
    pool = make_pool()
    seen: list[Any] = []

    async def twice(request: web.Request) -> web.Response:
        first = await bpa.read_body(request)
        second = await bpa.read_body(request)
        seen.append(second is first)
        return web.Response(text=second.sha256())

    app = make_app(pool)
    app.router.add_post("/twice", twice)
    async with served(app) as client:
        for size in (5, 70_000):
            data = b"t" * size
            r = await client.post("/twice", data=data)
            assert r.status == 200, await r.text()
            assert await r.text() == hashlib.sha256(data).hexdigest()
    assert seen == [True, True]
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_read_body_after_request_read_names_the_mistake() -> None:
    """The body already consumed by ``request.read()`` is an application bug: a 500 with an
    error naming it, never a 400 blaming the client for a truncated upload."""
    pool = make_pool()
    seen: list[str] = []

    async def consumed(request: web.Request) -> web.Response:
        await request.read()
        try:
            await bpa.read_body(request)
        except Exception as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
            raise
        return web.Response(text="unreachable")

    app = make_app(pool)
    app.router.add_post("/consumed", consumed)
    async with served(app) as client:
        r = await client.post("/consumed", data=b"c" * 1000)
        assert r.status == 500
    assert len(seen) == 1
    assert seen[0].startswith("BodyAlreadyRead:") and "request.read()" in seen[0]
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_reused_header_maps_never_leak_into_a_response_written_later() -> None:
    """Reuse on, empty pooled bodies (the request holds no slot) and an ``on_response_prepare``
    hook that yields: each response still carries only its own headers."""
    pool = make_pool()

    async def tagged(request: web.Request) -> web.StreamResponse:
        tag = request.match_info["tag"]
        body = await bpa.read_body(request)  # empty: nothing leased
        return bpa.pooled_response(request, body, headers={"X-Tag": tag})

    async def slow_prepare(request: web.Request, response: web.StreamResponse) -> None:
        await asyncio.sleep(0.01)

    app = make_app(pool, reuse_headers=True)
    app.router.add_post("/t/{tag}", tagged)
    app.on_response_prepare.append(slow_prepare)
    async with served(app) as client:

        async def one(i: int) -> None:
            r = await client.post(f"/t/{i}")
            assert r.status == 200
            assert r.headers.getall("X-Tag") == [str(i)]

        await asyncio.gather(*(one(i) for i in range(20)))
    await assert_drained(pool)
