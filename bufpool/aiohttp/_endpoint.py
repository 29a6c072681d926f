"""The pool stats endpoint: JSON by default, Prometheus text on ``Accept: text/plain``.

Each call takes one ``pool.stats()`` snapshot: O(size classes) work.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from ._settings import POOL_KEY

__all__ = ["PROMETHEUS_CONTENT_TYPE", "stats_handler"]

#: Content type of the Prometheus text exposition format 0.0.4.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _wants_text(request: web.BaseRequest) -> bool:
    accept = request.headers.get(hdrs.ACCEPT, "")
    return "text/plain" in accept and "application/json" not in accept


def stats_handler(
    *, prometheus: bool | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler serving the pool stats; ``prometheus`` forces the format (None: by Accept)."""

    async def bufpool_stats(request: web.Request) -> web.Response:
        stats = request.config_dict[POOL_KEY].stats()
        text_wanted = _wants_text(request) if prometheus is None else prometheus
        if text_wanted:
            resp = web.Response(body=stats.prometheus().encode())
            resp.headers[hdrs.CONTENT_TYPE] = PROMETHEUS_CONTENT_TYPE
            return resp
        return web.Response(
            text=json.dumps(stats.as_dict(), separators=(",", ":")),
            content_type="application/json",
        )

    return bufpool_stats
