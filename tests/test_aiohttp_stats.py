"""setup() conventions, the stats endpoint (JSON / Prometheus text) and header-map reuse."""

from __future__ import annotations

import pytest
from _helpers_aiohttp import assert_drained, make_app, make_pool, served
from aiohttp import web

import bufpool
import bufpool.aiohttp as bpa


@pytest.mark.asyncio
async def test_stats_json_and_prometheus_by_accept_and_by_path() -> None:
    pool = make_pool()
    app = make_app(pool, stats_path="/bufpool/stats", prometheus_path="/metrics")
    async with served(app) as client:
        for size in (100, 70_000):
            r = await client.post("/upload", data=b"s" * size)
            assert r.status == 200
        r = await client.get("/bufpool/stats")
        assert r.status == 200 and r.content_type == "application/json"
        stats = await r.json()
        assert stats["in_use"] == 0 and stats["leaked"] == 0
        assert stats["hits"] + stats["misses"] >= 3  # 1 lease + a 2-slot chain
        assert [t["size"] for t in stats["tiers"]] == list(pool.classes)
        adm = stats["aiohttp"]  # the admission snapshot rides along
        assert adm["admitted"] == 2 and adm["reserved_bytes"] == 0
        assert adm["budget"] == bpa.admission_stats(app).budget > 0
        assert adm["reply_bytes_pinned"] == 0
        r = await client.get("/bufpool/stats", headers={"Accept": "text/plain"})
        text = await r.text()
        assert r.headers["Content-Type"] == bpa.PROMETHEUS_CONTENT_TYPE
        assert "# TYPE bufpool_in_use gauge" in text and "\nbufpool_in_use 0\n" in text
        assert 'bufpool_tier_slots{size="65536"' in text
        assert "\nbufpool_aiohttp_reply_bytes_pinned 0\n" in text
        assert "\nbufpool_aiohttp_admitted_total 2\n" in text
        r = await client.get("/metrics")  # always text
        assert r.headers["Content-Type"] == bpa.PROMETHEUS_CONTENT_TYPE
        assert "bufpool_hits_total" in await r.text()
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_no_stats_route_unless_asked() -> None:
    pool = make_pool()
    async with served(make_app(pool)) as client:
        r = await client.get("/bufpool/stats")
        assert r.status == 404


def test_setup_conventions() -> None:
    app = web.Application()
    pool = bpa.setup(app, max_body_size=1234)
    assert isinstance(bpa.POOL_KEY, web.AppKey)
    assert app[bpa.POOL_KEY] is pool and isinstance(pool, bufpool.BufferPool)
    settings = app[bpa.SETTINGS_KEY]
    assert settings.max_body_size == 1234 and settings.owns_pool
    # no middleware: lifetimes follow each request's handler task
    assert len(app.middlewares) == 0 and len(app.cleanup_ctx) == 1
    assert settings.acquire_timeout == bpa.DEFAULT_ACQUIRE_TIMEOUT == 60.0
    assert settings.body_timeout == bpa.DEFAULT_BODY_TIMEOUT == 60.0
    assert settings.send_timeout == bpa.DEFAULT_SEND_TIMEOUT == 60.0
    with pytest.raises(RuntimeError, match="already called"):
        bpa.setup(app)
    with pytest.raises(ValueError, match="max_body_size"):
        bpa.setup(web.Application(), max_body_size=-1)
    for name in ("acquire_timeout", "body_timeout", "send_timeout", "preempt_after",
                 "body_min_rate", "idle_trim_after", "body_grace", "preempt_idle"):
        with pytest.raises(ValueError, match=name):
            bpa.setup(web.Application(), **{name: -1.0})


def test_setup_refuses_a_max_body_size_the_budget_cannot_hold() -> None:
    """Every such request would wait for memory that can never be free: refuse at setup."""
    pool = bufpool.BufferPool(max_bytes=4 << 20, initial_slots=0, on_exhausted="raise")
    with pytest.raises(ValueError) as info:
        bpa.setup(web.Application(), pool=pool, max_body_size=(4 << 20) + 1)
    text = str(info.value)
    assert f"max_body_size={(4 << 20) + 1}" in text and "body budget of 4194304 bytes" in text
    bpa.setup(web.Application(), pool=pool, max_body_size=4 << 20)  # exactly fits
    # The default pool's smaller classes keep their preallocation: 64 MiB does not fit.
    with pytest.raises(ValueError, match="body budget"):
        bpa.setup(web.Application(), max_body_size=64 << 20)
    with pytest.raises(ValueError, match="body_budget"):
        bpa.setup(web.Application(), pool=pool, body_budget=(4 << 20) + 1)


def test_middleware_goes_outermost_when_asked() -> None:
    @web.middleware
    async def other(request: web.Request, handler: object) -> web.StreamResponse:
        raise AssertionError("not called")

    app = web.Application(middlewares=[other])
    bpa.setup(app, middleware=True)
    assert app.middlewares[1] is other
    assert app.middlewares[0].__name__ == "bufpool_middleware"


@pytest.mark.asyncio
async def test_owned_pool_is_trimmed_at_cleanup_and_given_pool_is_kept() -> None:
    app = web.Application()
    owned = bpa.setup(app)
    given = make_pool()
    app2 = make_app(given)
    async with served(app) as client:
        assert (await client.get("/nothing")).status == 404
        assert owned.stats().reserved_bytes > 0
    assert owned.stats().reserved_bytes == 0  # trimmed at shutdown
    async with served(app2) as client:
        assert (await client.post("/upload", data=b"x" * 10)).status == 200
    assert given.stats().reserved_bytes > 0  # the caller's pool is the caller's business


@pytest.mark.asyncio
async def test_helpers_without_setup_raise_not_set_up() -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        try:
            await bpa.read_body(request)
        except bpa.NotSetUp as exc:
            seen.append(str(exc))
        return web.Response(text="x")

    app = web.Application()
    app.router.add_post("/", handler)
    async with served(app) as client:
        assert (await client.post("/", data=b"abc")).status == 200
    assert seen and "setup(app" in seen[0]


@pytest.mark.asyncio
async def test_header_maps_are_reused_without_leaking_headers_between_responses() -> None:
    pool = make_pool()

    async def tagged(request: web.Request) -> web.StreamResponse:
        tag = request.match_info["tag"]
        lease = pool.acquire(len(tag))
        lease.view[:] = tag.encode()
        return bpa.pooled_response(
            request, lease, content_type=f"text/x-{tag}", headers={f"X-Only-{tag}": tag}
        )

    # maps are lent to replies sent from pool memory (copied small ones need none)
    app = make_app(pool, reuse_headers=True, copy_replies_upto=0)
    app.router.add_get("/t/{tag}", tagged)
    maps = app[bpa.SETTINGS_KEY].header_maps
    assert maps is not None and bpa.HEADER_REUSE_SUPPORTED
    async with served(app) as client:
        for i in range(50):
            tag = f"t{i}"
            r = await client.get(f"/t/{tag}")
            assert await r.text() == tag
            assert r.headers["Content-Type"] == f"text/x-{tag}"
            assert r.headers[f"X-Only-{tag}"] == tag
            others = [h for h in r.headers if h.lower().startswith("x-only-")]
            assert others == [f"X-Only-{tag}"]
            assert r.headers["Content-Length"] == str(len(tag))
    assert maps.reused >= 45 and maps.made <= 5
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_reuse_is_off_by_default() -> None:
    pool = make_pool()
    app = make_app(pool)
    assert app[bpa.SETTINGS_KEY].header_maps is None
    async with served(app) as client:
        r = await client.post("/echo", data=b"hello")
        assert await r.read() == b"hello"
    await assert_drained(pool)
