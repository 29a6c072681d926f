"""Per-application settings of the integration, their defaults, and the typed keys.

``setup()`` stores one :class:`Settings` under :data:`SETTINGS_KEY` and the pool under
:data:`POOL_KEY`; handlers reach the pool through ``request.config_dict[POOL_KEY]`` (so
sub-applications see the parent's pool), ``read_body`` and ``pooled_response`` reach the
settings through the ``RequestLeases`` of each request.

Every default below names the server it mirrors; ``docs/aiohttp.md`` explains the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from aiohttp import web

from .._pool import BufferPool
from ._headers import HeaderMaps

if TYPE_CHECKING:
    from ._admission import Admission

__all__ = [
    "DEFAULT_ACQUIRE_TIMEOUT",
    "DEFAULT_BODY_GRACE",
    "DEFAULT_BODY_MIN_RATE",
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_COPY_REPLIES_UPTO",
    "DEFAULT_IDLE_TRIM_AFTER",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_POOL_MAX_BYTES",
    "DEFAULT_PREEMPT_AFTER",
    "DEFAULT_PREEMPT_IDLE",
    "DEFAULT_SEND_TIMEOUT",
    "POOL_KEY",
    "SETTINGS_KEY",
    "Settings",
]

#: Largest request body ``read_body`` accepts by default, in bytes (8 MiB).
DEFAULT_MAX_BODY_SIZE: Final = 8 * 1024 * 1024
#: Budget of the pool ``setup()`` makes when none is given, in bytes (64 MiB).
DEFAULT_POOL_MAX_BYTES: Final = 64 * 1024 * 1024
#: Seconds a body may wait for admission (memory) before 503 + Retry-After.  Long on
#: purpose: a flood waits behind TCP backpressure and is served (128 x 8 MiB against 64 MiB
#: took under 4 s here); a wait this long means the server is overloaded, not busy.
DEFAULT_ACQUIRE_TIMEOUT: Final = 60.0
#: Seconds without a single body byte before 408 (nginx ``client_body_timeout`` 60s: the time
#: between two successive reads, not for the whole body).
DEFAULT_BODY_TIMEOUT: Final = 60.0
#: Minimum average body rate in bytes/s, and the grace in seconds before it applies: a body
#: is cut (408) once ``now > admitted + grace + received / min_rate`` (Apache
#: ``mod_reqtimeout`` default ``body=20,MinRate=500``).
DEFAULT_BODY_MIN_RATE: Final = 500.0
DEFAULT_BODY_GRACE: Final = 20.0
#: Seconds without write progress on a pooled reply before the connection is aborted and its
#: slots come back (nginx ``send_timeout`` 60s; Go ``WriteTimeout`` bounds the whole write).
DEFAULT_SEND_TIMEOUT: Final = 60.0
#: Overload preemption (Envoy overload manager: ``reduce_timeouts`` shrinks idle timeouts
#: under pressure, ``reset_high_memory_stream`` resets the streams holding the most memory).
#: Once a body has waited this many seconds for memory, admitted bodies and pooled replies
#: that made no progress for DEFAULT_PREEMPT_IDLE seconds (or are below ``body_min_rate``
#: with that grace instead of ``body_grace``) are cut, those holding the most first.  While
#: any body waits, a body that did not move after its admission (below ``body_min_rate``
#: beyond the bytes that admitted it) for DEFAULT_PREEMPT_AFTER seconds is cut at once.
DEFAULT_PREEMPT_AFTER: Final = 0.5
DEFAULT_PREEMPT_IDLE: Final = 1.0
#: ``pooled_response`` bodies of at most this many bytes (64 KiB, one slot of the default
#: classes) are copied into one ``bytes`` and their lease released at once: no lifetime
#: tracking, no write deadline.  Measured (``bench/bench_aiohttp_reply.py``, docs/aiohttp.md
#: "Performance"): up to 64 KiB the copy costs less server CPU than tracking the reply; Linux's
#: MSG_ZEROCOPY documentation, for the kernel's own copy, likewise puts the point where
#: avoiding a copy pays above about 10 KB, not at a few KB.
DEFAULT_COPY_REPLIES_UPTO: Final = 64 * 1024
#: Seconds of quiet (no body admitted, no reply being sent) after which idle pool slots and
#: free C heap are given back (``pool.trim()`` + glibc ``malloc_trim``).
DEFAULT_IDLE_TRIM_AFTER: Final = 5.0


@dataclass(slots=True)
class Settings:
    """What ``setup()`` was told.  Sizes in bytes, times in seconds (None: no limit)."""

    pool: BufferPool
    max_body_size: int
    acquire_timeout: float | None
    retry_after: int
    owns_pool: bool
    header_maps: HeaderMaps | None = field(default=None)
    #: Nominal size of the pool's largest class: bodies above it become a LeaseChain.
    largest: int = 65536
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT
    body_min_rate: float | None = DEFAULT_BODY_MIN_RATE
    body_grace: float = DEFAULT_BODY_GRACE
    send_timeout: float | None = DEFAULT_SEND_TIMEOUT
    preempt_after: float | None = DEFAULT_PREEMPT_AFTER
    preempt_idle: float = DEFAULT_PREEMPT_IDLE
    idle_trim_after: float | None = DEFAULT_IDLE_TRIM_AFTER
    #: Replies of at most this many bytes are copied and their lease released at once.
    copy_replies_upto: int = DEFAULT_COPY_REPLIES_UPTO
    #: Bytes of pool slots request bodies may hold or have promised at once.
    body_budget: int = 0
    admission: Admission | None = field(default=None, repr=False)
    #: The pool's slot sizes (bytes, ascending) and its largest slot: reservations.
    slot_sizes: tuple[int, ...] = ()
    largest_slot: int = 65536


#: The application's pool (a ``web.AppKey``): ``app[POOL_KEY]``.
POOL_KEY: Final = web.AppKey("bufpool.pool", BufferPool)
#: The integration's settings: ``app[SETTINGS_KEY]``.
SETTINGS_KEY: Final = web.AppKey("bufpool.aiohttp.settings", Settings)
