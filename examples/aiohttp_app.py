"""Upload / echo / hash service on aiohttp, with or without bufpool: the load-test target.

Run::

    python examples/aiohttp_app.py [--host 127.0.0.1] [--port 8080] [--no-pool]
        [--loop uvloop|asyncio] [--max-body-size BYTES] [--pool-max-bytes BYTES]

``--port 0`` binds a free port.  When ready the server prints exactly one line,
``listening on http://HOST:PORT``, to stdout.  Under gunicorn (one pool per worker)::

    BUFPOOL_APP_POOLED=1 gunicorn examples.aiohttp_app:app_factory \
        --worker-class aiohttp.GunicornUVLoopWebWorker -w 2

Endpoints (the same in both modes; ``--no-pool`` uses ``await request.read()`` and bytes, what
an aiohttp user writes without bufpool):

``POST /upload``            JSON ``{"size": n, "sha256": hex}`` of the body
``POST /echo``              the body back (sent from pool memory in pool mode)
``POST /process?reply=N``   reads the body, replies N bytes (default 4096) of a fixed pattern,
                            header ``X-Received: <body size>``; no hashing (the load-test path)
``GET /bytes/{n}``          n bytes of the pattern

In pool mode, generated replies (``/process``, ``/bytes``) over 64 KiB are sent from pool slots
(``pooled_response``); smaller ones as ``bytes``, as ``pooled_response`` would copy them anyway
(``copy_replies_upto``), so the two modes differ there only in how the body is received.
``GET /health``             200 "ok"
``GET /bufpool/stats``      pool stats JSON (Prometheus text on ``Accept: text/plain``); 404
                            without the pool

Pool mode receives request bodies straight into pool slots (``zero_copy_receive``; env
``BUFPOOL_APP_ZERO_COPY_RECEIVE=0`` turns that off).

After startup the server calls ``gc.freeze()`` (env ``BUFPOOL_APP_GC_FREEZE=0``: not), with
or without the pool.

Body over ``--max-body-size`` -> 413; body stalled, too slow, or preempted under memory
pressure -> 408; no memory within the acquire timeout (60 s by default) -> 503 with
Retry-After; malformed or truncated upload -> 400.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import sys
from typing import Final

from aiohttp import web

import bufpool
import bufpool.aiohttp as bpa

DEFAULT_MAX_BODY_SIZE: Final = 8 * 1024 * 1024
DEFAULT_POOL_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_REPLY: Final = 4096
#: Replies up to this many bytes go out as ``bytes`` in pool mode too (setup()'s
#: ``copy_replies_upto``, left at its default: pooled_response would copy them).
COPY_REPLIES_UPTO: Final = bpa.DEFAULT_COPY_REPLIES_UPTO
#: Largest reply /process and /bytes serve, in bytes.
MAX_REPLY: Final = 64 * 1024 * 1024
_PATTERN_LEN: Final = 1 << 16
#: A fixed non-trivial pattern (never 0xFF, so reused memory would show).
PATTERN: Final = bytes((i * 7 + 13) % 251 for i in range(_PATTERN_LEN))


def pattern_bytes(n: int) -> bytes:
    """The first ``n`` bytes of the endless repetition of PATTERN."""
    reps, rest = divmod(n, _PATTERN_LEN)
    return PATTERN * reps + PATTERN[:rest]


_PATTERN_VIEW: Final = memoryview(PATTERN)


def _fill_pattern(views: list[memoryview]) -> None:
    if len(views) == 1 and len(views[0]) <= _PATTERN_LEN:  # the common case: one copy
        views[0][:] = _PATTERN_VIEW[: len(views[0])]
        return
    pos = 0
    for view in views:
        off = 0
        while off < len(view):
            start = (pos + off) % _PATTERN_LEN
            k = min(len(view) - off, _PATTERN_LEN - start)
            view[off : off + k] = PATTERN[start : start + k]
            off += k
        pos += len(view)


def _byte_count(raw: str, what: str) -> int:
    """``raw`` as a byte count within 0..MAX_REPLY; 400 naming ``what`` otherwise."""
    try:
        n = int(raw)
    except ValueError:
        text = f"{what} must be an integer byte count, got {raw!r}"
        raise web.HTTPBadRequest(text=text) from None
    if not 0 <= n <= MAX_REPLY:
        raise web.HTTPBadRequest(text=f"{what} must be within 0..{MAX_REPLY} bytes, got {n}")
    return n


def _reply_size(request: web.Request, default: int = DEFAULT_REPLY) -> int:
    raw = request.query.get("reply")
    return default if raw is None else _byte_count(raw, "reply")


def _path_size(request: web.Request) -> int:
    return _byte_count(request.match_info["n"], "size")


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


# ---------------------------------------------------------------- pool mode
async def pooled_upload(request: web.Request) -> web.Response:
    body = await bpa.read_body(request)
    return web.json_response({"size": len(body), "sha256": body.sha256()})


async def pooled_echo(request: web.Request) -> web.StreamResponse:
    body = await bpa.read_body(request)
    return bpa.pooled_response(request, body)


def _pattern_lease(request: web.Request, n: int) -> bufpool.Lease | bufpool.LeaseChain:
    """``n`` bytes of the pattern in pool memory: one lease up to the largest class, else a
    chain."""
    pool = request.app[bpa.POOL_KEY]
    try:
        owned = pool.acquire(n) if n <= pool.classes[-1] else pool.acquire_chain(n)
    except bufpool.PoolExhausted as exc:
        raise web.HTTPServiceUnavailable(headers={"Retry-After": "1"}, text=str(exc)) from None
    _fill_pattern([owned.view] if isinstance(owned, bufpool.Lease) else owned.views())
    return owned


def _pattern_reply(request: web.Request, n: int) -> web.StreamResponse:
    """``n`` bytes of the pattern: as ``bytes`` up to COPY_REPLIES_UPTO (``pooled_response``
    would copy them out of the pool anyway, see ``setup(copy_replies_upto=...)``, so a
    generated small reply gains nothing from a lease), else sent from pool memory."""
    if n <= COPY_REPLIES_UPTO:
        return web.Response(body=pattern_bytes(n), content_type="application/octet-stream")
    return bpa.pooled_response(request, _pattern_lease(request, n))


async def pooled_process(request: web.Request) -> web.StreamResponse:
    n = _reply_size(request)
    body = await bpa.read_body(request)
    resp = _pattern_reply(request, n)
    resp.headers["X-Received"] = str(len(body))
    return resp


async def pooled_bytes(request: web.Request) -> web.StreamResponse:
    return _pattern_reply(request, _path_size(request))


# ---------------------------------------------------------------- plain mode
async def plain_upload(request: web.Request) -> web.Response:
    data = await request.read()
    return web.json_response({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})


async def plain_echo(request: web.Request) -> web.Response:
    data = await request.read()
    return web.Response(body=data, content_type="application/octet-stream")


async def plain_process(request: web.Request) -> web.Response:
    n = _reply_size(request)
    data = await request.read()
    return web.Response(
        body=pattern_bytes(n),
        content_type="application/octet-stream",
        headers={"X-Received": str(len(data))},
    )


async def plain_bytes(request: web.Request) -> web.Response:
    return web.Response(
        body=pattern_bytes(_path_size(request)), content_type="application/octet-stream"
    )


# ---------------------------------------------------------------- app
def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    return default if raw is None else raw.strip().lower() not in ("0", "false", "no", "")


def create_app(
    *,
    pooled: bool = True,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    pool_max_bytes: int = DEFAULT_POOL_MAX_BYTES,
) -> web.Application:
    """The example application; ``pooled=False`` is the same service without bufpool."""
    # client_max_size bounds request.read() (plain mode); read_body uses max_body_size.
    app = web.Application(client_max_size=max_body_size)
    if pooled:
        bpa.setup(
            app,
            pool=bufpool.BufferPool(max_bytes=pool_max_bytes, on_exhausted="raise"),
            max_body_size=max_body_size,
            stats_path="/bufpool/stats",
            prometheus_path="/bufpool/metrics",
            # Bodies received straight into pool slots (env BUFPOOL_APP_ZERO_COPY_RECEIVE=0: off).
            zero_copy_receive=_env_flag("BUFPOOL_APP_ZERO_COPY_RECEIVE", True),
        )
        upload, echo, process, nbytes = pooled_upload, pooled_echo, pooled_process, pooled_bytes
    else:
        upload, echo, process, nbytes = plain_upload, plain_echo, plain_process, plain_bytes
    app.router.add_post("/upload", upload)
    app.router.add_post("/echo", echo)
    app.router.add_post("/process", process)
    app.router.add_get("/bytes/{n}", nbytes)
    app.router.add_get("/health", health)
    return app


async def app_factory() -> web.Application:
    """For gunicorn's aiohttp workers; env ``BUFPOOL_APP_POOLED=0`` turns the pool off."""
    pooled = _env_flag("BUFPOOL_APP_POOLED", True)
    max_body = int(os.environ.get("BUFPOOL_APP_MAX_BODY_SIZE", DEFAULT_MAX_BODY_SIZE))
    pool_max = int(os.environ.get("BUFPOOL_APP_POOL_MAX_BYTES", DEFAULT_POOL_MAX_BYTES))
    return create_app(pooled=pooled, max_body_size=max_body, pool_max_bytes=pool_max)


async def serve(app: web.Application, host: str, port: int) -> None:
    """Run ``app`` until cancelled; prints the listening line once bound."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        if _env_flag("BUFPOOL_APP_GC_FREEZE", True):
            # Startup objects (imports, routes, the pool's slots) out of the collector's
            # sight, in both modes alike: a full collection then scans only what requests
            # made (see docs/aiohttp.md, "Garbage collector").
            gc.freeze()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        sys.stdout.write(f"listening on http://{shown}:{bound_port}\n")
        sys.stdout.flush()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="bufpool example aiohttp server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 binds a free port")
    p.add_argument("--no-pool", action="store_true", help="plain aiohttp: request.read()")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--max-body-size", type=int, default=DEFAULT_MAX_BODY_SIZE, metavar="BYTES")
    p.add_argument("--pool-max-bytes", type=int, default=DEFAULT_POOL_MAX_BYTES, metavar="BYTES")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    app = create_app(
        pooled=not args.no_pool,
        max_body_size=args.max_body_size,
        pool_max_bytes=args.pool_max_bytes,
    )
    coro = serve(app, args.host, args.port)
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
