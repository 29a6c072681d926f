"""Reuse of response header maps (``CIMultiDict``) across requests.

aiohttp builds a new ``CIMultiDict`` for every response.  ``StreamResponse`` accepts a
pre-built map through its internal ``_real_headers`` argument (aiohttp >= 3.9.4), which lets a
response adopt a recycled map without copying it.  ``CIMultiDict.clear()`` frees the map's
hash table, so reuse saves the map *object* (one allocation), not its table.  Measured on
aiohttp 3.14.5 / multidict 7.2.1 (``bench/bench_headers.py``): reuse is 90-140 ns *slower*
per response than a fresh map (``clear()`` + refill costs more than a new map), so
``setup(reuse_headers=...)`` defaults to off; the path stays correct and tested.

Lifetime: a map handed to a response belongs to it until the request ends; the middleware
writes that response before giving the map back (a map returned earlier could be cleared and
refilled by a concurrent request while aiohttp still has to serialize it).  It is cleared only
when taken again, so aiohttp's access log, which runs right after the middleware returns
without yielding to the loop, still sees the response's headers.  Bound: at most ``limit``
idle maps are kept (O(limit) memory).
"""

from __future__ import annotations

import inspect
from typing import Final

from aiohttp import web
from multidict import CIMultiDict

__all__ = ["SUPPORTED", "HeaderMaps"]


def _supports_real_headers() -> bool:
    try:
        return "_real_headers" in inspect.signature(web.StreamResponse.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic builds
        return False


#: True when this aiohttp lets a response adopt a map without copying it.
SUPPORTED: Final = _supports_real_headers()


class HeaderMaps:
    """A free list of response header maps.  Not thread-safe (one event loop per app)."""

    __slots__ = ("_free", "limit", "made", "reused")

    def __init__(self, limit: int = 1024) -> None:
        self._free: list[CIMultiDict[str]] = []
        self.limit = limit
        self.reused = 0  #: maps handed out again
        self.made = 0  #: maps created because none was idle

    def take(self) -> CIMultiDict[str]:
        """An empty map, recycled when one is idle."""
        free = self._free
        if free:
            headers = free.pop()
            headers.clear()
            self.reused += 1
            return headers
        self.made += 1
        return CIMultiDict()

    def give(self, headers: CIMultiDict[str]) -> None:
        """Return a map whose response is finished; it is cleared on its next ``take()``."""
        if len(self._free) < self.limit:
            self._free.append(headers)

    def __len__(self) -> int:
        return len(self._free)
