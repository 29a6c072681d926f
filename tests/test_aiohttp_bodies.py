"""Request bodies 0 B - 2 MiB through read_body and pooled_response, hashed byte-exact.

Content-Length and chunked uploads, gzip/deflate-encoded bodies as aiohttp decodes them, and
echo round trips; after each scenario every lease is back and the quarantine drains.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import zlib
from collections.abc import AsyncIterator

import pytest
from _helpers_aiohttp import assert_drained, make_app, make_pool, served
from aiohttp import web

import bufpool
import bufpool.aiohttp as bpa

EDGE_SIZES = [0, 1, 63, 64, 65, 1000, 4096, 16384, 18437, 18438, 65535, 65536, 65537, 131072,
              200_001, 2 * 1024 * 1024]


def _sizes(seed: int, n: int = 10) -> list[int]:
    rng = random.Random(seed)
    return EDGE_SIZES + [rng.randrange(0, 2 * 1024 * 1024 + 1) for _ in range(n)]


def _body(size: int, seed: int) -> bytes:
    return random.Random(seed * 1_000_003 + size).randbytes(size)


async def _chunks(data: bytes, seed: int) -> AsyncIterator[bytes]:
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        k = rng.choice((1, 7, 100, 4096, 20_000, 70_000))
        yield data[pos : pos + k]
        pos += k


@pytest.mark.asyncio
async def test_content_length_uploads_hash_exactly() -> None:
    pool = make_pool()
    async with served(make_app(pool)) as client:
        for size in _sizes(1):
            data = _body(size, 1)
            resp = await client.post("/upload", data=data)
            assert resp.status == 200, await resp.text()
            got = await resp.json()
            assert got["size"] == size
            assert got["sha256"] == hashlib.sha256(data).hexdigest()
            # one lease up to the largest class, a chain of largest-class slots beyond
            assert got["contiguous"] == (size <= pool.classes[-1])
            assert got["pieces"] == (0 if size == 0 else -(-size // pool.classes[-1]))
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_chunked_uploads_hash_exactly() -> None:
    pool = make_pool()
    async with served(make_app(pool)) as client:
        for i, size in enumerate(_sizes(2)):
            data = _body(size, 2)
            resp = await client.post("/upload", data=_chunks(data, i))
            assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
            assert resp.status == 200, await resp.text()
            got = await resp.json()
            assert (got["size"], got["sha256"]) == (size, hashlib.sha256(data).hexdigest())
            assert got["contiguous"] == (size <= pool.classes[-1])
    await assert_drained(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_uploads_are_decoded_then_hashed(encoding: str) -> None:
    pool = make_pool()
    compress = gzip.compress if encoding == "gzip" else zlib.compress
    async with served(make_app(pool)) as client:
        for size in [0, 1, 5000, 65536, 65537, 300_000, 2 * 1024 * 1024]:
            # half random, half repetitive: compresses, so decoded > encoded
            data = _body(size // 2, 3) + bytes(size - size // 2)
            resp = await client.post(
                "/upload", data=compress(data), headers={"Content-Encoding": encoding}
            )
            assert resp.status == 200, await resp.text()
            got = await resp.json()
            assert (got["size"], got["sha256"]) == (size, hashlib.sha256(data).hexdigest())
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_echo_round_trips_from_pool_memory() -> None:
    pool = make_pool()
    async with served(make_app(pool)) as client:
        for i, size in enumerate(_sizes(4, 6)):
            data = _body(size, 4)
            body = data if i % 2 else _chunks(data, i)
            resp = await client.post("/echo", data=body)
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(size)
            assert resp.headers["Content-Type"] == "application/octet-stream"
            echoed = await resp.read()
            assert len(echoed) == size
            assert echoed == data
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_pooled_body_api() -> None:
    pool = make_pool()
    seen: dict[str, object] = {}

    async def inspect(request: web.Request) -> web.Response:
        body = await bpa.read_body(request)
        seen["len"] = len(body)
        seen["bytes"] = body.tobytes()
        seen["joined"] = b"".join(bytes(v) for v in body.views())
        if body.contiguous:
            seen["mv"] = bytes(body.memoryview())
        else:
            with pytest.raises(bpa.BodyNotContiguous, match="pool slots"):
                body.memoryview()
            seen["mv"] = None
        body.release()  # early release is allowed and idempotent
        body.release()
        seen["in_use_after_release"] = pool.stats().in_use
        return web.Response(text="ok")

    app = make_app(pool)
    app.router.add_post("/inspect", inspect)
    async with served(app) as client:
        for size in (0, 3000, 65536, 65537, 500_000):
            data = _body(size, 5)
            resp = await client.post("/inspect", data=data)
            assert resp.status == 200
            assert seen["len"] == size
            assert seen["bytes"] == data and seen["joined"] == data
            assert seen["mv"] == (data if size <= pool.classes[-1] else None)
            assert seen["in_use_after_release"] == 0
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_memory_held_is_one_body_not_two() -> None:
    """While a 1 MiB body is held, the pool holds about 1x the body (slots of 64 KiB)."""
    pool = make_pool()
    held: dict[str, int] = {}

    async def measure(request: web.Request) -> web.Response:
        body = await bpa.read_body(request)
        tiers = {t.size: t.in_use for t in pool.stats().tiers}
        held["bytes_in_use"] = sum(size * n for size, n in tiers.items())
        held["size"] = len(body)
        return web.Response(text="ok")

    app = make_app(pool)
    app.router.add_post("/measure", measure)
    async with served(app) as client:
        data = _body(1 << 20, 6)
        for body in (data, _chunks(data, 6)):
            resp = await client.post("/measure", data=body)
            assert resp.status == 200
            assert held["size"] == 1 << 20
            assert held["bytes_in_use"] == 1 << 20  # 16 slots of 64 KiB, nothing more
    await assert_drained(pool)


def test_pooled_body_of_nothing_is_empty() -> None:
    body = bpa.PooledBody(None)
    assert len(body) == 0 and not body and body.views() == [] and body.tobytes() == b""
    assert bytes(body.memoryview()) == b"" and body.contiguous and body.released
    assert body.sha256() == hashlib.sha256(b"").hexdigest()
    pool = bufpool.BufferPool()
    chain = pool.acquire_chain(70_000)
    chain_body = bpa.PooledBody(chain)
    assert not chain_body.contiguous and len(chain_body) == 70_000
    chain_body.release()
    assert chain.released
