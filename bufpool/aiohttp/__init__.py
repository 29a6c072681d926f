"""bufpool for aiohttp servers: request bodies read into pool memory, responses sent from it.

Floor 3 (adapter).  Usage::

    app = web.Application()
    bufpool.aiohttp.setup(app, pool=bufpool.BufferPool(max_bytes=64 << 20), max_body_size=8 << 20)

    async def upload(request):
        body = await bufpool.aiohttp.read_body(request)   # PooledBody, valid until request end
        return bufpool.aiohttp.pooled_response(request, body)  # sent from pool memory

Memory: bodies are admitted into a budget once their client sent 16 KiB (or all) of them,
FIFO among those, and leased slot by slot as bytes arrive;
stalled or trickling bodies are cut (408) by deadlines, and under memory pressure the stalled
bodies and unsent replies holding the most go first; idle memory is given back.

Statuses: 413 body over ``max_body_size``; 408 body stalled, too slow or preempted; 503 +
Retry-After when no memory came free within ``acquire_timeout``; 400 malformed or truncated
body.  Every lease a request took is released when it ends, after its response was written;
see ``docs/aiohttp.md``.
"""

from ._admission import EVIDENCE_BYTES, AdmissionStats, BodyCut
from ._body import PooledBody, read_body
from ._endpoint import PROMETHEUS_CONTENT_TYPE
from ._errors import BodyAlreadyRead, BodyNotContiguous, NotSetUp
from ._fastpath import RECEIVE_KEY, ReceiveOptions, ReceiveState
from ._headers import SUPPORTED as HEADER_REUSE_SUPPORTED
from ._headers import HeaderMaps
from ._lifetime import RequestLeases, middleware, owner_of
from ._response import PooledResponse, pooled_response
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
from ._setup import admission_stats, setup

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
    "EVIDENCE_BYTES",
    "HEADER_REUSE_SUPPORTED",
    "POOL_KEY",
    "PROMETHEUS_CONTENT_TYPE",
    "RECEIVE_KEY",
    "SETTINGS_KEY",
    "AdmissionStats",
    "BodyAlreadyRead",
    "BodyCut",
    "BodyNotContiguous",
    "HeaderMaps",
    "NotSetUp",
    "PooledBody",
    "PooledResponse",
    "ReceiveOptions",
    "ReceiveState",
    "RequestLeases",
    "Settings",
    "admission_stats",
    "middleware",
    "owner_of",
    "pooled_response",
    "read_body",
    "setup",
]
