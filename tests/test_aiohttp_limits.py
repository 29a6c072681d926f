"""Limits with clear statuses and nothing leaked: 413, 503 + Retry-After, 400."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _helpers_aiohttp import (
    assert_drained,
    make_app,
    make_pool,
    raw_connect,
    read_response,
    served,
    served_runner,
    wait_for,
)
from aiohttp import web

import bufpool
import bufpool.aiohttp as bpa


def _recording_app(
    pool: bufpool.BufferPool,
    seen: list[Any],
    kept: list[BaseException] | None = None,
    **setup_kw: Any,
) -> web.Application:
    """/read: read_body; on an HTTP error records (status, in_use right then) and re-raises.
    ``kept`` collects the exceptions (tracebacks and all), as a logger might."""

    async def read(request: web.Request) -> web.Response:
        try:
            body = await bpa.read_body(request)
        except web.HTTPException as exc:
            seen.append((exc.status, pool.stats().in_use))
            if kept is not None:
                kept.append(exc)
            raise
        except BaseException as exc:
            seen.append((type(exc).__name__, pool.stats().in_use))
            if kept is not None:
                kept.append(exc)
            raise
        seen.append((200, len(body)))
        return web.Response(text=str(len(body)))

    app = make_app(pool, **setup_kw)
    app.router.add_post("/read", read)
    return app


def _add_holder(app: web.Application) -> tuple[asyncio.Event, asyncio.Event]:
    """Adds POST /hold: reads its body, sets ``holding``, keeps the body until ``let_go``."""
    holding = asyncio.Event()
    let_go = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        body = await bpa.read_body(request)
        holding.set()
        await let_go.wait()
        return web.Response(text=str(len(body)))

    app.router.add_post("/hold", hold)
    return holding, let_go


async def _trickle(data: bytes, piece: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_413_by_content_length_names_the_limit_before_reading() -> None:
    pool = make_pool()
    seen: list[Any] = []
    async with served(_recording_app(pool, seen, max_body_size=1000)) as client:
        resp = await client.post("/read", data=b"x" * 1001)
        assert resp.status == 413
        text = await resp.text()
        assert "max_body_size=1000" in text and "1001 bytes" in text
        assert seen == [(413, 0)]
        assert pool.stats().hits + pool.stats().misses == 0  # refused before leasing a byte
        ok = await client.post("/read", data=b"x" * 1000)  # exactly the limit is fine
        assert ok.status == 200 and await ok.text() == "1000"
    await assert_drained(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("encoded", [False, True])
async def test_413_streamed_releases_partial_leases_at_once(encoded: bool) -> None:
    """Chunked (or compressed) bodies: refused once the limit is crossed, and the slots
    already filled are back in the pool before the handler even sees the 413."""
    pool = make_pool()
    seen: list[Any] = []
    limit = 300_000
    data = bytes(range(256)) * 2000  # 512,000 bytes
    async with served(_recording_app(pool, seen, max_body_size=limit)) as client:
        if encoded:
            resp = await client.post(
                "/read", data=gzip.compress(data), headers={"Content-Encoding": "gzip"}
            )
        else:
            resp = await client.post("/read", data=_trickle(data))
        assert resp.status == 413
        text = await resp.text()
        assert text.startswith(f"request body exceeds max_body_size={limit} bytes")
        # it says where reading stopped: past the limit (a decoded chunk can be large)
        received = int(text.split("stopped reading at ")[1].split()[0])
        assert limit < received <= len(data)
        assert seen == [(413, 0)]
    await assert_drained(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["heap", "raise"])
async def test_503_with_retry_after_when_the_budget_stays_spent(policy: str) -> None:
    # A budget of exactly one 64 KiB slot and no preallocation.  "raise" pools take the
    # synchronous fast path first, "heap" pools always wait in acquire_async.
    pool = bufpool.BufferPool(max_bytes=65536, initial_slots=0, on_exhausted=policy)  # type: ignore[arg-type]
    seen: list[Any] = []
    app = _recording_app(pool, seen, acquire_timeout=0.2, retry_after=7, max_body_size=65536)
    holding, let_go = _add_holder(app)
    async with served(app) as client:
        first = asyncio.ensure_future(client.post("/hold", data=b"a" * 60_000))
        await asyncio.wait_for(holding.wait(), 10)
        resp = await client.post("/read", data=b"b" * 60_000)
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "7"
        text = await resp.text()
        assert "acquire_timeout=0.2" in text and "60000 bytes of request body" in text
        assert seen == [(503, 1)]  # only the holder's lease is in use
        assert bpa.admission_stats(app).admission_timeouts == 1
        let_go.set()
        r1 = await first
        assert r1.status == 200 and await r1.text() == "60000"
        again = await client.post("/read", data=b"c" * 60_000)  # room again
        assert again.status == 200
    await assert_drained(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["heap", "raise"])
async def test_503_for_a_chain_that_does_not_fit_leases_nothing(policy: str) -> None:
    """A 132,072-byte body needs two 64 KiB slots and a 1 KiB one; the body budget is three
    64 KiB slots and a holder's body keeps one.  The body is never admitted (it would not fit
    next to the holder), answers 503 and leased nothing meanwhile."""
    pool = bufpool.BufferPool(max_bytes=3 * 65536, initial_slots=0, on_exhausted=policy)  # type: ignore[arg-type]
    seen: list[Any] = []
    app = _recording_app(pool, seen, acquire_timeout=0.2, max_body_size=3 * 65536)
    holding, let_go = _add_holder(app)
    async with served(app) as client:
        first = asyncio.ensure_future(client.post("/hold", data=b"a" * 60_000))
        await asyncio.wait_for(holding.wait(), 10)
        resp = await client.post("/read", data=b"b" * 132_072)
        assert resp.status == 503
        assert "132072 bytes of request body" in await resp.text()
        assert seen == [(503, 1)]  # only the holder's slot
        let_go.set()
        assert (await first).status == 200
        again = await client.post("/read", data=b"b" * 132_072)
        assert again.status == 200 and await again.text() == "132072"
    await assert_drained(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["heap", "raise"])
async def test_waiting_for_memory_succeeds_when_it_frees_in_time(policy: str) -> None:
    pool = bufpool.BufferPool(max_bytes=65536, initial_slots=0, on_exhausted=policy)  # type: ignore[arg-type]
    seen: list[Any] = []
    app = _recording_app(pool, seen, acquire_timeout=10.0, max_body_size=65536)
    holding, let_go = _add_holder(app)
    async with served(app) as client:
        first = asyncio.ensure_future(client.post("/hold", data=b"a" * 60_000))
        await asyncio.wait_for(holding.wait(), 10)
        second = asyncio.ensure_future(client.post("/read", data=b"b" * 60_000))
        # /read waits for memory
        assert await wait_for(lambda: bpa.admission_stats(app).waiting == 1)
        let_go.set()  # the waiting /read gets the holder's slot
        resp = await second
        assert resp.status == 200 and await resp.text() == "60000"
        assert (await first).status == 200
    await assert_drained(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["heap", "raise"])
async def test_two_bodies_waiting_for_chains_do_not_deadlock(policy: str) -> None:
    """Budget: four 64 KiB slots, all held.  Two 192 KiB bodies (three slots each) wait.  The
    slots come back one by one: taken piece by piece, each body would get two and both would
    wait for a third forever (503 at the timeout).  Chains wait their turn: both get 200."""
    pool = bufpool.BufferPool(max_bytes=4 * 65536, initial_slots=0, on_exhausted=policy)  # type: ignore[arg-type]
    seen: list[Any] = []
    app = _recording_app(pool, seen, acquire_timeout=5.0, max_body_size=3 * 65536)
    held = [pool.acquire(65536) for _ in range(4)]
    async with served(app) as client:
        readers = [
            asyncio.ensure_future(client.post("/read", data=bytes([c]) * 3 * 65536)) for c in b"bc"
        ]
        # one admitted body waits for slots, the other for admission
        assert await wait_for(lambda: bpa.admission_stats(app).waiting == 2)
        for lease in held:
            lease.release()
            await asyncio.sleep(0.05)
        for resp in await asyncio.gather(*readers):
            assert resp.status == 200 and await resp.text() == str(3 * 65536)
        assert seen == [(200, 3 * 65536), (200, 3 * 65536)]
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_400_on_malformed_chunked_framing() -> None:
    """Bad chunk framing after a valid 32 KiB chunk: 400 and nothing leased.

    (aiohttp's C parser reports such an error only when it arrives with the headers; one that
    arrives later, while the handler already reads, is queued as a separate bad message and
    never reaches the body stream (aiohttp 3.14.5) — see docs/aiohttp.md.)"""
    pool = make_pool()
    seen: list[Any] = []
    async with served(_recording_app(pool, seen)) as client:
        reader, writer = await raw_connect(client.port)  # type: ignore[arg-type]
        writer.write(
            b"POST /read HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"8000\r\n" + b"z" * 0x8000 + b"\r\nZZ\r\nabc\r\n"
        )
        status, _headers, body = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        assert status == 400
        assert body  # aiohttp's parser message, or ours ("malformed request body: ...")
        assert seen in ([], [(400, 0)])
    await assert_drained(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_400_on_undecodable_compressed_body(encoding: str) -> None:
    pool = make_pool()
    seen: list[Any] = []
    good = (gzip.compress if encoding == "gzip" else zlib.compress)(b"hello" * 50_000)
    bad = good[:40] + bytes(x ^ 0x5A for x in good[40:200]) + good[200:]
    async with served(_recording_app(pool, seen)) as client:
        resp = await client.post(
            "/read", data=bad, headers={"Content-Encoding": encoding, "Connection": "close"}
        )
        assert resp.status == 400
        text = await resp.text()
        assert text.startswith("malformed request body:") and encoding in text
        assert seen == [(400, 0)]
        # the same connection pool and server keep working
        ok = await client.post("/read", data=good, headers={"Content-Encoding": encoding})
        assert ok.status == 200 and await ok.text() == str(5 * 50_000)
    await assert_drained(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("cancellation", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
async def test_truncated_upload_then_client_gone_leaks_nothing(
    chunked: bool, cancellation: bool
) -> None:
    """The client sends part of the body and half-closes: aiohttp drops the connection (no
    status can be sent); the handler sees the failure inside read_body and nothing leaks,
    even while the exception and its traceback are kept (as a logger would keep them)."""
    pool = make_pool()
    seen: list[Any] = []
    kept: list[BaseException] = []
    app = _recording_app(pool, seen, kept)
    async with served_runner(app, handler_cancellation=cancellation) as port:
        reader, writer = await raw_connect(port)
        if chunked:
            head = b"POST /read HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            writer.write(head + b"10000\r\n" + b"q" * 30_000)
        else:
            head = b"POST /read HTTP/1.1\r\nHost: t\r\nContent-Length: 300000\r\n\r\n"
            writer.write(head + b"q" * 100_000)
        await writer.drain()
        for _ in range(200):
            if pool.stats().in_use:
                break
            await asyncio.sleep(0.01)
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert rest == b"" or rest.startswith(b"HTTP/1.1 400")
        for _ in range(500):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert len(seen) == 1 and seen[0][0] != 200
    assert len(kept) == 1 and kept[0].__traceback__ is not None
    await assert_drained(pool)  # the kept traceback pins no slot (quarantine drains)
    del kept
