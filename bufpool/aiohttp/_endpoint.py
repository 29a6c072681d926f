"""The pool stats endpoint: JSON by default, Prometheus text on ``Accept: text/plain``.

Each call takes one ``pool.stats()`` snapshot (O(size classes)) and one admission snapshot
(O(bodies and replies tracked)); the JSON has the latter under ``"aiohttp"``, the Prometheus
text as ``bufpool_aiohttp_*`` metrics.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from ._settings import POOL_KEY, SETTINGS_KEY

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
        adm = request.config_dict[SETTINGS_KEY].admission
        admitted = adm.stats() if adm is not None else None
        text_wanted = _wants_text(request) if prometheus is None else prometheus
        if text_wanted:
            text = stats.prometheus()
            if admitted is not None:
                text += admitted.prometheus()
            resp = web.Response(body=text.encode())
            resp.headers[hdrs.CONTENT_TYPE] = PROMETHEUS_CONTENT_TYPE
            return resp
        data = stats.as_dict()
        if admitted is not None:
            data["aiohttp"] = admitted.as_dict()
        return web.Response(
            text=json.dumps(data, separators=(",", ":")),
            content_type="application/json",
        )

    return bufpool_stats
