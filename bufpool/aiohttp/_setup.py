"""``setup(app, ...)``: installs the integration on an aiohttp application.

One call stores the pool (``app[POOL_KEY]``) and settings, makes the application's body
admission (``_admission``), registers a ``cleanup_ctx`` that stops its timers and gives idle
memory back at shutdown, and adds the stats routes when asked.  By default no middleware is
added: request lifetimes follow each request's handler task (see ``_lifetime``);
``middleware=True`` puts the lifetime middleware first (outermost).  Call it before the
application starts.  Under gunicorn each worker process builds its own application, so each
has its own pool.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .._pool import BufferPool
from ._admission import Admission, AdmissionStats, slot_bytes
from ._endpoint import stats_handler
from ._errors import NotSetUp
from ._fastpath import ReceiveOptions
from ._fastpath import install as install_receive
from ._headers import SUPPORTED as HEADER_REUSE_SUPPORTED
from ._headers import HeaderMaps
from ._lifetime import HANDLER_CODE, make_middleware
from ._settings import (
    DEFAULT_ACQUIRE_TIMEOUT,
    DEFAULT_BODY_GRACE,
    DEFAULT_BODY_MIN_RATE,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_COPY_REPLIES_UPTO,
    DEFAULT_IDLE_TRIM_AFTER,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_POOL_MAX_BYTES,
    DEFAULT_PREEMPT_AFTER,
    DEFAULT_PREEMPT_IDLE,
    DEFAULT_SEND_TIMEOUT,
    POOL_KEY,
    SETTINGS_KEY,
    Settings,
)

__all__ = ["admission_stats", "setup"]

log = logging.getLogger("bufpool.aiohttp")


def _seconds(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be >= 0 seconds or None, got {value!r}")


def setup(
    app: web.Application,
    *,
    pool: BufferPool | None = None,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    acquire_timeout: float | None = DEFAULT_ACQUIRE_TIMEOUT,
    retry_after: int = 1,
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
    body_min_rate: float | None = DEFAULT_BODY_MIN_RATE,
    body_grace: float = DEFAULT_BODY_GRACE,
    send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
    preempt_after: float | None = DEFAULT_PREEMPT_AFTER,
    preempt_idle: float = DEFAULT_PREEMPT_IDLE,
    idle_trim_after: float | None = DEFAULT_IDLE_TRIM_AFTER,
    body_budget: int | None = None,
    middleware: bool = False,
    stats_path: str | None = None,
    prometheus_path: str | None = None,
    reuse_headers: bool = False,
    zero_copy_receive: bool | ReceiveOptions = False,
    copy_replies_upto: int = DEFAULT_COPY_REPLIES_UPTO,
) -> BufferPool:
    """Install bufpool on ``app`` and return its pool.  Sizes in bytes, times in seconds.

    pool
        The BufferPool to serve from; default a new pool with a 64 MiB budget and
        ``on_exhausted="raise"`` (owned by the app: trimmed at shutdown).
    max_body_size
        Largest request body ``read_body`` accepts (8 MiB); larger ones get 413.  ValueError
        when the body budget could never hold one such body.
    acquire_timeout
        How long a body waits for memory (admission, or a slot held by pooled replies) before
        503 + Retry-After (60 s; None: no limit).  Floods wait behind TCP backpressure.
    retry_after
        Seconds put in the 503's Retry-After header.
    body_timeout
        No body byte for this long: 408 (60 s, nginx ``client_body_timeout``); also for a
        body still waiting for its first ``EVIDENCE_BYTES`` (16 KiB) before admission.
    body_min_rate, body_grace
        Body slower than ``body_min_rate`` bytes/s on average once ``body_grace`` s passed:
        408 (500 B/s after 20 s, Apache ``mod_reqtimeout`` ``body=20,MinRate=500``).
    send_timeout
        No write progress on a pooled reply for this long: connection aborted, slots back
        (60 s, nginx ``send_timeout``).
    preempt_after, preempt_idle
        Once a body waited ``preempt_after`` s (0.5) for memory, admitted bodies with no byte
        for ``preempt_idle`` s (1.0), or below ``body_min_rate`` with that grace or over the
        last ``preempt_idle`` window, are cut
        (408), those holding the most unfilled reservation first, until the waiters fit; and
        pooled replies with no write progress for ``preempt_idle`` s are aborted (Envoy's
        overload manager).  While any body waits, a body that sent less than
        ``body_min_rate`` beyond its first 16 KiB in the ``preempt_after`` s after its
        admission is cut at once (evidence, then a stall).  None: no preemption.
    idle_trim_after
        Quiet for this long (5 s): ``pool.trim()`` and glibc ``malloc_trim(0)`` give idle
        memory back.  None: never.
    body_budget
        Bytes of pool slots request bodies may hold or have promised at once; default the
        pool's ``max_bytes`` minus what its smaller classes hold at setup.
    middleware
        Install the lifetime middleware (outermost) instead of following each request's
        handler task; see ``bufpool.aiohttp.middleware()`` to place it by hand.
    stats_path, prometheus_path
        Serve pool and admission stats at ``stats_path`` (JSON, or Prometheus text on
        ``Accept: text/plain``) and always as Prometheus text at ``prometheus_path``.
    reuse_headers
        Recycle response header maps of ``pooled_response`` across requests (see
        ``_headers``).  Off by default: measured slower than fresh maps on aiohttp 3.14.5 /
        multidict 7.2.1 (``bench/bench_headers.py``).
    zero_copy_receive
        True (or a ``ReceiveOptions``) receives plain Content-Length bodies straight into
        pool slots (``_fastpath``; ``read_body`` then takes them without a copy), under the
        same admission and deadlines as ``read_body`` (above); every other request takes
        aiohttp's normal path.  Needs this ``app`` to be the one the runner
        serves; checks aiohttp's internals at startup and logs one line if it stays off.
    copy_replies_upto
        ``pooled_response`` copies a body of at most this many bytes (64 KiB) into one
        ``bytes`` and releases its lease at once: such a reply costs about what a plain
        ``web.Response`` does.  Larger bodies are sent from pool memory without a copy,
        watched by ``send_timeout``.  0: every non-empty body is sent from pool memory.
    """
    if not isinstance(max_body_size, int) or max_body_size < 0:
        raise ValueError(f"max_body_size must be a non-negative int (bytes), got {max_body_size!r}")
    for name, value in (
        ("acquire_timeout", acquire_timeout),
        ("body_timeout", body_timeout),
        ("body_min_rate", body_min_rate),
        ("send_timeout", send_timeout),
        ("preempt_after", preempt_after),
        ("idle_trim_after", idle_trim_after),
    ):
        _seconds(name, value)
    _seconds("body_grace", body_grace, allow_none=False)
    _seconds("preempt_idle", preempt_idle, allow_none=False)
    if not isinstance(copy_replies_upto, int) or copy_replies_upto < 0:
        raise ValueError(
            f"copy_replies_upto must be a non-negative int (bytes), got {copy_replies_upto!r}"
        )
    if retry_after < 0:
        raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
    if SETTINGS_KEY in app:
        raise RuntimeError("bufpool.aiohttp.setup() was already called for this application")
    owns_pool = pool is None
    if pool is None:
        pool = BufferPool(max_bytes=DEFAULT_POOL_MAX_BYTES, on_exhausted="raise")
    if body_budget is None:
        tiers = pool.stats().tiers
        body_budget = pool.max_bytes - sum(t.slots * t.slot_size for t in tiers[:-1])
    elif not isinstance(body_budget, int) or not 0 < body_budget <= pool.max_bytes:
        raise ValueError(
            f"body_budget must be an int in 1..pool.max_bytes={pool.max_bytes}, "
            f"got {body_budget!r}"
        )
    need = slot_bytes(pool, max_body_size)
    if need > body_budget:
        raise ValueError(
            f"max_body_size={max_body_size} bytes needs {need} bytes of pool slots, more than "
            f"the body budget of {body_budget} bytes (pool max_bytes={pool.max_bytes}): no "
            f"such body could ever be admitted; lower max_body_size or give a larger pool"
        )
    header_maps = HeaderMaps() if reuse_headers and HEADER_REUSE_SUPPORTED else None
    admission = Admission(
        pool,
        budget=body_budget,
        acquire_timeout=acquire_timeout,
        body_timeout=body_timeout,
        body_min_rate=body_min_rate,
        body_grace=body_grace,
        send_timeout=send_timeout,
        preempt_after=preempt_after,
        preempt_idle=preempt_idle,
        idle_trim_after=idle_trim_after,
    )
    app[POOL_KEY] = pool
    app[SETTINGS_KEY] = settings = Settings(
        pool=pool,
        max_body_size=max_body_size,
        acquire_timeout=acquire_timeout,
        retry_after=retry_after,
        owns_pool=owns_pool,
        header_maps=header_maps,
        largest=pool.classes[-1],
        body_timeout=body_timeout,
        body_min_rate=body_min_rate,
        body_grace=body_grace,
        send_timeout=send_timeout,
        preempt_after=preempt_after,
        preempt_idle=preempt_idle,
        idle_trim_after=idle_trim_after,
        copy_replies_upto=copy_replies_upto,
        body_budget=body_budget,
        admission=admission,
        slot_sizes=pool.slot_sizes,
        largest_slot=slot_bytes(pool, pool.classes[-1]),
    )
    if middleware or HANDLER_CODE is None:
        app.middlewares.insert(0, make_middleware(settings))
    if zero_copy_receive:  # kernel-to-slot receive path (see _fastpath)
        options = zero_copy_receive if isinstance(zero_copy_receive, ReceiveOptions) else None
        install_receive(app, settings, options or ReceiveOptions())
    app.cleanup_ctx.append(_lifecycle)
    if stats_path is not None:
        app.router.add_get(stats_path, stats_handler(), name="bufpool-stats")
    if prometheus_path is not None:
        app.router.add_get(prometheus_path, stats_handler(prometheus=True), name="bufpool-metrics")
    return pool


def admission_stats(app: web.Application) -> AdmissionStats:
    """The admission snapshot of an application ``setup()`` saw (O(bodies + replies))."""
    try:
        settings = app[SETTINGS_KEY]
    except KeyError:
        raise NotSetUp("bufpool.aiohttp.setup(app, ...) was never called for this app") from None
    assert settings.admission is not None
    return settings.admission.stats()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Startup: nothing.  Shutdown: stop timers; reclaim quarantine; trim a pool the app owns."""
    yield
    settings = app[SETTINGS_KEY]
    if settings.admission is not None:
        settings.admission.close()
    pool = settings.pool
    pool.reclaim()
    stats = pool.stats()
    if stats.in_use:
        log.warning("bufpool: %d leases still in use at application shutdown", stats.in_use)
    if settings.owns_pool:
        pool.trim(keep_initial=False)
