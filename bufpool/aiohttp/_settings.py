"""Per-application settings of the integration and the typed keys that find them.

``setup()`` stores one :class:`Settings` under :data:`SETTINGS_KEY` and the pool under
:data:`POOL_KEY`; handlers reach the pool through ``request.config_dict[POOL_KEY]`` (so
sub-applications see the parent's pool), ``read_body`` and ``pooled_response`` reach the
settings through the ``RequestLeases`` the middleware puts on each request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from .._pool import BufferPool
from ._headers import HeaderMaps

__all__ = [
    "DEFAULT_ACQUIRE_TIMEOUT",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_POOL_MAX_BYTES",
    "POOL_KEY",
    "SETTINGS_KEY",
    "Settings",
]

#: Largest request body ``read_body`` accepts by default, in bytes (8 MiB).
DEFAULT_MAX_BODY_SIZE: Final = 8 * 1024 * 1024
#: Seconds ``read_body`` waits for pool memory before answering 503.
DEFAULT_ACQUIRE_TIMEOUT: Final = 1.0
#: Budget of the pool ``setup()`` makes when none is given, in bytes (64 MiB).
DEFAULT_POOL_MAX_BYTES: Final = 64 * 1024 * 1024


@dataclass(slots=True)
class Settings:
    """What ``setup()`` was told.  Sizes in bytes, times in seconds."""

    pool: BufferPool
    max_body_size: int
    acquire_timeout: float | None
    retry_after: int
    owns_pool: bool
    header_maps: HeaderMaps | None = field(default=None)
    #: Nominal size of the pool's largest class: bodies above it become a LeaseChain.
    largest: int = 65536


#: The application's pool (a ``web.AppKey``): ``app[POOL_KEY]``.
POOL_KEY: Final = web.AppKey("bufpool.pool", BufferPool)
#: The integration's settings: ``app[SETTINGS_KEY]``.
SETTINGS_KEY: Final = web.AppKey("bufpool.aiohttp.settings", Settings)
