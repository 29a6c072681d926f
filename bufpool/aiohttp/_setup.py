"""``setup(app, ...)``: installs the integration on an aiohttp application.

One call stores the pool (``app[POOL_KEY]``) and settings, puts the lifetime middleware first
(outermost) in ``app.middlewares``, registers a ``cleanup_ctx`` that gives idle memory back at
shutdown, and adds the stats routes when asked.  Call it before the application starts (its
middleware list freezes then).  Under gunicorn each worker process builds its own application,
so each has its own pool.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .._pool import BufferPool
from ._endpoint import stats_handler
from ._fastpath import ReceiveOptions
from ._fastpath import install as install_receive
from ._headers import SUPPORTED as HEADER_REUSE_SUPPORTED
from ._headers import HeaderMaps
from ._lifetime import make_middleware
from ._settings import (
    DEFAULT_ACQUIRE_TIMEOUT,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_POOL_MAX_BYTES,
    POOL_KEY,
    SETTINGS_KEY,
    Settings,
)

__all__ = ["setup"]

log = logging.getLogger("bufpool.aiohttp")


def setup(
    app: web.Application,
    *,
    pool: BufferPool | None = None,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    acquire_timeout: float | None = DEFAULT_ACQUIRE_TIMEOUT,
    retry_after: int = 1,
    stats_path: str | None = None,
    prometheus_path: str | None = None,
    reuse_headers: bool = False,
    zero_copy_receive: bool | ReceiveOptions = False,
) -> BufferPool:
    """Install bufpool on ``app`` and return its pool.

    pool
        The BufferPool to serve from; default a new pool with a 64 MiB budget and
        ``on_exhausted="raise"`` (owned by the app: trimmed at shutdown).  With a "raise" pool
        ``read_body`` first leases synchronously and only waits when that fails (cheaper per
        request); with other policies it always goes through ``acquire_async``.
    max_body_size
        Largest request body ``read_body`` accepts, in bytes; larger ones get 413.
    acquire_timeout
        Seconds ``read_body`` waits for pool memory before answering 503 (None: no limit).
    retry_after
        Seconds put in the 503's Retry-After header.
    stats_path, prometheus_path
        Serve pool stats at ``stats_path`` (JSON, or Prometheus text on ``Accept:
        text/plain``) and always as Prometheus text at ``prometheus_path``.
    reuse_headers
        Recycle response header maps of ``pooled_response`` across requests (see
        ``_headers``).  Off by default: measured slower than fresh maps on aiohttp 3.14.5 /
        multidict 7.2.1 (``bench/bench_headers.py``).
    zero_copy_receive
        True (or a ``ReceiveOptions``) receives plain Content-Length bodies straight into
        pool slots (``_fastpath``; ``read_body`` then takes them without a copy); every other
        request takes aiohttp's normal path.  Needs this ``app`` to be the one the runner
        serves; checks aiohttp's internals at startup and logs one line if it stays off.
    """
    if not isinstance(max_body_size, int) or max_body_size < 0:
        raise ValueError(f"max_body_size must be a non-negative int (bytes), got {max_body_size!r}")
    if acquire_timeout is not None and acquire_timeout < 0:
        raise ValueError(f"acquire_timeout must be >= 0 seconds or None, got {acquire_timeout!r}")
    if retry_after < 0:
        raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
    if SETTINGS_KEY in app:
        raise RuntimeError("bufpool.aiohttp.setup() was already called for this application")
    owns_pool = pool is None
    if pool is None:
        pool = BufferPool(max_bytes=DEFAULT_POOL_MAX_BYTES, on_exhausted="raise")
    header_maps = HeaderMaps() if reuse_headers and HEADER_REUSE_SUPPORTED else None
    app[POOL_KEY] = pool
    app[SETTINGS_KEY] = settings = Settings(
        pool=pool,
        max_body_size=max_body_size,
        acquire_timeout=acquire_timeout,
        retry_after=retry_after,
        owns_pool=owns_pool,
        header_maps=header_maps,
        largest=pool.classes[-1],
    )
    app.middlewares.insert(0, make_middleware(settings))
    if zero_copy_receive:  # issue 15: kernel-to-slot receive path (see _fastpath)
        options = zero_copy_receive if isinstance(zero_copy_receive, ReceiveOptions) else None
        install_receive(app, settings, options or ReceiveOptions())
    app.cleanup_ctx.append(_lifecycle)
    if stats_path is not None:
        app.router.add_get(stats_path, stats_handler(), name="bufpool-stats")
    if prometheus_path is not None:
        app.router.add_get(prometheus_path, stats_handler(prometheus=True), name="bufpool-metrics")
    return pool


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Startup: nothing.  Shutdown: reclaim quarantine; trim a pool the app owns."""
    yield
    settings = app[SETTINGS_KEY]
    pool = settings.pool
    pool.reclaim()
    stats = pool.stats()
    if stats.in_use:
        log.warning("bufpool: %d leases still in use at application shutdown", stats.in_use)
    if settings.owns_pool:
        pool.trim(keep_initial=False)
