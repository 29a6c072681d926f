"""bufpool: pooled byte buffers for asyncio network stacks.

Floor 1 (memory core, no I/O) is re-exported here.  Adapters live in ``bufpool.aio``,
``bufpool.tls`` and ``bufpool.aiohttp``.
"""

from ._classes import DEFAULT_CLASSES, TLS12_MAX_RECORD, TLS13_MAX_RECORD
from ._errors import (
    BufferFull,
    BufPoolError,
    ChainTooLarge,
    LeakWarning,
    LeaseReleasedError,
    PoolExhausted,
    RequestTooLarge,
)
from ._impl import IMPLEMENTATION
from ._lease import Lease, LeaseChain
from ._pool import BufferPool, report_leaks
from ._ring import RingBuffer
from ._stats import PoolStats, TierStats

__all__ = [
    "DEFAULT_CLASSES",
    "IMPLEMENTATION",
    "TLS12_MAX_RECORD",
    "TLS13_MAX_RECORD",
    "BufPoolError",
    "BufferFull",
    "BufferPool",
    "ChainTooLarge",
    "LeakWarning",
    "Lease",
    "LeaseChain",
    "LeaseReleasedError",
    "PoolExhausted",
    "PoolStats",
    "RequestTooLarge",
    "RingBuffer",
    "TierStats",
    "report_leaks",
]

__version__ = "0.1.0"

from ._leak import apply_warning_switches as _apply_warning_switches

_apply_warning_switches()  # BUFPOOL_LEAKS=error, -W error::bufpool.LeakWarning
