"""``pooled_response`` below and above ``copy_replies_upto`` on a real server (both loops).

Up to the threshold (64 KiB by default) the body is copied when the response is made and its
lease is back in the pool before anything is sent: a slot reused and overwritten right then
does not change the reply, and the request keeps no lifetime record.  Above it (or with
``copy_replies_upto=0``) the body is sent from pool memory: the lease stays out until the
request ends and the reply is watched by the write deadline.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from aiohttp import web

import bufpool
import bufpool.aiohttp as bpa
from bufpool.aiohttp._lifetime import OWNED_KEY
from tests._helpers_aiohttp import (
    assert_drained,
    fill_pattern,
    lease_for,
    make_app,
    make_pool,
    pattern,
    raw_connect,
    read_response,
    scribble,
    served,
    views_of,
    wait_for,
)

KiB = 1024


def _reply_app(pool: bufpool.BufferPool, seen: list[dict[str, Any]], **setup_kw: Any
               ) -> web.Application:
    app = make_app(pool, **setup_kw)

    async def reply(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        if "slow" in request.query:  # keep what the client does not read in the transport
            sock = request.transport.get_extra_info("socket")  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        owned = lease_for(pool, n)
        fill_pattern(views_of(owned))
        in_use = pool.stats().in_use
        resp = bpa.pooled_response(request, owned)
        seen.append({
            "copied": resp.copied,
            "returned": pool.stats().in_use == in_use - len(_leases_of(owned)),
            "tracked": OWNED_KEY in request,
            "views": len(resp.body_views),
        })
        if resp.copied:
            scribble(pool)  # fresh leases of every class (the slot just left too) get 0xFF
        return resp

    app.router.add_get("/reply/{n}", reply)
    return app


def _leases_of(owned: bufpool.Lease | bufpool.LeaseChain) -> list[Any]:
    return [owned] if isinstance(owned, bufpool.Lease) else list(owned.leases)


@pytest.mark.asyncio
async def test_small_reply_is_copied_and_its_lease_back_before_the_reply_is_sent() -> None:
    pool = make_pool()
    seen: list[dict[str, Any]] = []
    app = _reply_app(pool, seen)
    async with served(app) as client:
        for n in (0, 1, 4 * KiB, 16 * KiB, 64 * KiB):
            r = await client.get(f"/reply/{n}")
            assert r.status == 200
            assert r.headers["Content-Length"] == str(n)
            assert await r.read() == pattern(n)  # the slot was overwritten after the copy
        head = await client.head("/reply/4096")
        assert head.status == 200 and head.headers["Content-Length"] == "4096"
        assert await head.read() == b""
    assert [s["copied"] for s in seen] == [True] * 6
    assert all(s["returned"] for s in seen), seen  # back in the pool inside the handler
    assert not any(s["tracked"] for s in seen), seen  # no per-request lifetime record
    assert bpa.admission_stats(app).replies_sending == 0
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_large_reply_stays_zero_copy_and_watched_until_the_client_reads() -> None:
    """A reply above the threshold keeps its slots until sent; while a client does not read
    it, the admission sees it (the write deadline covers it) and its bytes are pinned."""
    pool = make_pool()
    seen: list[dict[str, Any]] = []
    app = _reply_app(pool, seen)
    size = 64 * KiB + 1

    async with served(app) as client:
        reader, writer = await raw_connect(client.port, rcvbuf=4096)  # type: ignore[arg-type]
        writer.write(f"GET /reply/{4 * size}?slow=1 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert await wait_for(lambda: bpa.admission_stats(app).reply_bytes_pinned > 0)
        assert bpa.admission_stats(app).replies_sending == 1
        status, _h, body = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        assert status == 200 and body == pattern(4 * size)
        r = await client.get(f"/reply/{size}")
        assert await r.read() == pattern(size)
        # both sent: the watches go (the next deadline check drops a drained reply)
        assert await wait_for(lambda: bpa.admission_stats(app).replies_sending == 0)
    assert [s["copied"] for s in seen] == [False, False]
    assert not any(s["returned"] for s in seen), seen  # still out after pooled_response
    assert all(s["tracked"] for s in seen), seen
    assert seen[1]["views"] == 2  # a 64 KiB + 1 body: a chain of two slots, not joined
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_copy_replies_upto_zero_sends_even_small_replies_from_pool_memory() -> None:
    pool = make_pool()
    seen: list[dict[str, Any]] = []
    app = _reply_app(pool, seen, copy_replies_upto=0)
    async with served(app) as client:
        for n in (1, 4 * KiB):
            r = await client.get(f"/reply/{n}")
            assert await r.read() == pattern(n)
    assert [(s["copied"], s["returned"], s["tracked"]) for s in seen] == [(False, False, True)] * 2
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_echoed_small_body_and_its_admission_are_released_when_the_reply_is_made() -> None:
    """An uploaded body sent back below the threshold: its lease and its share of the body
    budget are given back by ``pooled_response`` itself, before the reply is written."""
    pool = make_pool()
    app = make_app(pool)
    after: list[tuple[bool, int, int]] = []

    async def echo_now(request: web.Request) -> web.StreamResponse:
        body = await bpa.read_body(request)
        resp = bpa.pooled_response(request, body, status=201)
        stats = bpa.admission_stats(request.app)
        after.append((body.released, stats.bodies, stats.reserved_bytes))
        return resp

    app.router.add_post("/echo-now", echo_now)
    async with served(app) as client:
        for n in (10, 5000, 64 * KiB):
            data = bytes(range(256)) * (n // 256) + bytes(n % 256)
            r = await client.post("/echo-now", data=data)
            assert r.status == 201 and await r.read() == data
        r = await client.post("/echo-now", data=b"")
        assert r.status == 201 and await r.read() == b""
    assert after == [(True, 0, 0)] * 4
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_copied_reply_with_a_bodiless_status_sends_no_body() -> None:
    pool = make_pool()
    app = make_app(pool)

    async def not_modified(request: web.Request) -> web.StreamResponse:
        lease = pool.acquire(100)
        lease.view[:] = b"x" * 100
        resp = bpa.pooled_response(request, lease, status=int(request.match_info["s"]))
        assert resp.copied
        return resp

    app.router.add_get("/status/{s}", not_modified)
    async with served(app) as client:
        reader, writer = await raw_connect(client.port)  # type: ignore[arg-type]
        for s in (204, 304):
            # a body after these would be read as the start of the next response
            writer.write(f"GET /status/{s} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(f"HTTP/1.1 {s}".encode())
        writer.write(b"GET /bytes/7 HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _h, body = await asyncio.wait_for(read_response(reader), 10)
        assert (status, body) == (200, pattern(7))
        writer.close()
    await assert_drained(pool)


def test_copy_replies_upto_must_be_a_byte_count() -> None:
    for bad in (-1, 1.5, "4k"):
        with pytest.raises(ValueError, match="copy_replies_upto"):
            bpa.setup(web.Application(), copy_replies_upto=bad)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_chain_reply_counts_every_byte_it_sends() -> None:
    """A chain of 5 slots: on uvloop its middle slots go to the transport in one
    ``writelines()`` past aiohttp's writer, which must still count them (Content-Length
    bookkeeping, the access log's body length); the bytes arrive intact while the pool
    churns."""
    pool = make_pool()
    app = make_app(pool)
    sent: list[web.StreamResponse] = []
    n = 4 * 64 * KiB + 123

    async def chain(request: web.Request) -> web.StreamResponse:
        owned = pool.acquire_chain(n)
        fill_pattern(owned.views())
        resp = bpa.pooled_response(request, owned)
        assert not resp.copied and len(resp.body_views) == 5
        sent.append(resp)
        return resp

    app.router.add_get("/chain", chain)
    async with served(app) as client:
        reader, writer = await raw_connect(client.port)  # type: ignore[arg-type]
        for _ in range(3):
            writer.write(b"GET /chain HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            scribble(pool)
            body = await asyncio.wait_for(reader.readexactly(n), 10)
            assert body == pattern(n)
            assert await wait_for(lambda: sent[-1].body_length > 0)
            assert sent[-1].body_length == len(head) + n
        writer.close()
    await assert_drained(pool)
