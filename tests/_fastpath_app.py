"""A small app with zero_copy_receive for the entry-point tests (gunicorn, web.run_app):
``POST /upload`` answers the body's size (read_body), ``GET /receive`` the fast path's state."""

from __future__ import annotations

from aiohttp import web

import bufpool
import bufpool.aiohttp as bpa


async def upload(request: web.Request) -> web.Response:
    body = await bpa.read_body(request)
    return web.json_response({"size": len(body), "sha256": body.sha256()})


async def receive_state(request: web.Request) -> web.Response:
    state = request.app[bpa.RECEIVE_KEY]
    return web.json_response({"active": state.active, "reason": state.reason,
                              "fast": state.fast})


def create_app() -> web.Application:
    app = web.Application()
    bpa.setup(app, pool=bufpool.BufferPool(max_bytes=16 << 20, on_exhausted="raise"),
              zero_copy_receive=True)
    app.router.add_post("/upload", upload)
    app.router.add_get("/receive", receive_state)
    return app


async def app_factory() -> web.Application:
    return create_app()
