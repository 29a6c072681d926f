"""Request bodies read straight into pool memory: ``read_body`` and ``PooledBody``.

Supports Content-Length and chunked uploads, and compressed bodies as aiohttp decodes them
(``Content-Encoding: gzip``/``deflate``).  Goals: never join the body into one ``bytes``; peak
memory about 1x the body plus what aiohttp buffers (at most about two 64 KiB chunks), against
about 2x for ``await request.read()`` (bytearray growth, then a copy to ``bytes``).

Layout: a body up to the pool's largest class (64 KiB by default) is one lease; a larger one is
a LeaseChain of largest-class slots, never one giant allocation.  With a Content-Length the
memory is leased once up front; without one the first lease grows through the classes (its
bytes copied, at most 64 KiB in all) and further slots are appended.

Bounds: O(body bytes) work, one copy of each byte; a body over ``max_body_size`` is refused
with 413 before any byte is read when Content-Length says so, otherwise as soon as the limit is
crossed, and every slot taken so far is released at once.

Lifetime: the PooledBody and its views are valid until the request ends (the middleware
releases them) or until ``PooledBody.release()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from hashlib import sha256

from aiohttp import hdrs, web
from aiohttp.http import HttpProcessingError
from aiohttp.web import RequestPayloadError

from .._errors import PoolExhausted
from .._lease import Lease, LeaseChain
from ._errors import BodyAlreadyRead, BodyNotContiguous
from ._fastpath import received_body
from ._lifetime import owner_of
from ._settings import Settings

__all__ = ["PooledBody", "read_body"]

_EMPTY = memoryview(b"")


class PooledBody:
    """A request body held in pool memory: one lease, a LeaseChain, or nothing (0 bytes).

    Valid until the request ends or ``release()``; copy with ``tobytes()`` to keep it longer.
    """

    __slots__ = ("_owned", "_request", "_size")

    def __init__(
        self, owned: Lease | LeaseChain | None, request: web.BaseRequest | None = None
    ) -> None:
        self._owned = owned
        self._request = request
        self._size = 0 if owned is None else len(owned)

    def __len__(self) -> int:
        """Body size in bytes."""
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    @property
    def owned(self) -> Lease | LeaseChain | None:
        """The lease or chain holding the bytes (None for an empty body)."""
        return self._owned

    @property
    def contiguous(self) -> bool:
        """True when the whole body is one memoryview (one lease, or empty)."""
        owned = self._owned
        return not isinstance(owned, LeaseChain) or len(owned.leases) <= 1

    def views(self) -> list[memoryview]:
        """The body's memoryviews in order (none for an empty body); valid until release."""
        owned = self._owned
        if owned is None:
            return []
        if isinstance(owned, Lease):
            return [owned.view]
        return owned.views()

    def __iter__(self) -> Iterator[memoryview]:
        return iter(self.views())

    def memoryview(self) -> memoryview:
        """The body as one read-write memoryview, when it is in one slot.

        Raises BodyNotContiguous for a body held in several slots (larger than the pool's
        largest class): use ``views()`` or ``tobytes()`` then.
        """
        owned = self._owned
        if owned is None:
            return _EMPTY
        if isinstance(owned, Lease):
            return owned.view
        leases = owned.leases
        if len(leases) == 1:
            return leases[0].view
        raise BodyNotContiguous(
            f"this {self._size}-byte body is held in {len(leases)} pool slots (it is larger "
            f"than the largest size class); use .views() to walk it or .tobytes() for a copy"
        )

    def tobytes(self) -> bytes:
        """One joined copy of the body, safe to keep after the request ends."""
        owned = self._owned
        return b"" if owned is None else owned.tobytes()

    def sha256(self) -> str:
        """Hex SHA-256 of the body, hashed view by view (no joined copy)."""
        h = sha256()
        for view in self.views():
            h.update(view)
        return h.hexdigest()

    @property
    def released(self) -> bool:
        owned = self._owned
        return owned is None or owned.released

    def release(self) -> None:
        """Give the memory back before the request ends (optional; idempotent)."""
        owned = self._owned
        if owned is None or owned.released:
            return
        if self._request is not None:
            owner_of(self._request).forget(owned)
        owned.release()

    def __repr__(self) -> str:
        kind = type(self._owned).__name__ if self._owned is not None else "empty"
        return f"<PooledBody {self._size} B ({kind})>"


async def read_body(request: web.Request) -> PooledBody:
    """Read the whole request body into pool memory.

    Statuses raised (as aiohttp HTTP exceptions, nothing left leased): 413 when the body is
    over ``max_body_size`` (the message names the limit), 503 with Retry-After when the pool
    had no room within ``acquire_timeout`` seconds, 400 when the body is malformed or
    truncated (bad chunked framing, bad compressed data, fewer bytes than Content-Length).
    ConnectionResetError propagates when the client went away.

    The body is owned by the request: released when it ends.  Calling ``read_body`` again
    returns the same PooledBody; calling it after other code consumed the body stream
    (``request.read()``, ``post()``, ``json()``, ``text()``) raises BodyAlreadyRead.
    """
    owner = owner_of(request)
    if owner.body is not None:
        return owner.body
    content = request.content
    if content.at_eof() and content.total_bytes:
        raise BodyAlreadyRead(
            f"the {content.total_bytes}-byte body of {request.method} {request.path} was "
            "already consumed (request.read(), .post(), .json(), .text() or request.content) "
            "before bufpool.aiohttp.read_body(); read it with read_body() only"
        )
    settings = owner.settings
    if not request.body_exists:
        # No body at all (aiohttp's shared EMPTY_PAYLOAD): its readchunk() flips to
        # (b"", True) for good after the first call in the process, which made
        # _read_streamed spin forever on a later bodiless POST.
        owner.body = body = PooledBody(None, request)
        return body
    received = received_body(request)  # issue 15: already in slots (zero_copy_receive)
    if received is not None and not received.streaming:
        owned = await received.take()  # no copy: the slots the kernel wrote into
        if owned is not None:
            owner.items.append(owned)
        owner.body = body = PooledBody(owned, request)
        return body
    length = request.content_length
    if length is not None and hdrs.CONTENT_ENCODING not in request.headers:
        owned = await _read_sized(request, settings, length)
    else:
        owned = await _read_streamed(request, settings)
    if owned is not None:
        owner.items.append(owned)
    owner.body = body = PooledBody(owned, request)
    return body


def _too_large(limit: int, size: int, *, declared: bool) -> web.HTTPRequestEntityTooLarge:
    """413 naming the limit; ``size`` is the Content-Length (``declared``) or the count of
    (decoded) body bytes received when reading stopped."""
    if declared:
        text = f"request body of {size} bytes (Content-Length) exceeds max_body_size={limit} bytes"
    else:
        text = f"request body exceeds max_body_size={limit} bytes (stopped reading at {size} bytes)"
    return web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size, text=text)


def _exhausted(settings: Settings, size: int, exc: PoolExhausted) -> web.HTTPServiceUnavailable:
    """503 + Retry-After: no pool room for ``size`` more bytes within the timeout."""
    return web.HTTPServiceUnavailable(
        headers={hdrs.RETRY_AFTER: str(settings.retry_after)},
        text=(
            f"no buffer memory for {size} bytes of request body within acquire_timeout="
            f"{settings.acquire_timeout} s; retry later ({exc})"
        ),
    )


#: What aiohttp raises from ``request.content`` for a body it cannot parse or decode.
_MALFORMED = (HttpProcessingError, RequestPayloadError)


def _malformed(exc: BaseException) -> web.HTTPBadRequest:
    cause = exc.__cause__ if isinstance(exc, RequestPayloadError) else exc
    detail = getattr(cause, "message", "") or str(cause) or repr(cause)
    return web.HTTPBadRequest(text=f"malformed request body: {detail.strip()}")


def _acquire_now(settings: Settings, size: int) -> Lease | LeaseChain | None:
    """``size`` bytes at once from a "raise" pool (no coroutine per slot), or None: then
    ``_acquire`` waits.  Other policies never fail a plain acquire, so they go the async way
    (which waits instead of spilling or falling back to the heap when the budget is spent)."""
    pool = settings.pool
    if pool.on_exhausted != "raise":
        return None
    try:
        return pool.acquire(size) if size <= settings.largest else pool.acquire_chain(size)
    except PoolExhausted:
        return None


async def _acquire(settings: Settings, size: int) -> Lease | LeaseChain:
    """``size`` bytes of the app's pool as one lease (up to the largest class) or a chain,
    waiting at most ``acquire_timeout`` seconds in all; 503 after that."""
    pool = settings.pool
    timeout = settings.acquire_timeout
    owned = _acquire_now(settings, size)
    if owned is not None:
        return owned
    try:
        if size <= settings.largest:
            return await pool.acquire_async(size, timeout=timeout)
        # One chain at a time and one deadline across its pieces (see acquire_chain_async):
        # two bodies each holding part of what the other needs would wait forever.
        return await pool.acquire_chain_async(size, timeout=timeout)
    except PoolExhausted as exc:
        raise _exhausted(settings, size, exc) from None


async def _read_sized(
    request: web.Request, settings: Settings, length: int
) -> Lease | LeaseChain | None:
    """Content-Length known and not encoded: lease ``length`` bytes once, then fill."""
    if length > settings.max_body_size:
        raise _too_large(settings.max_body_size, length, declared=True)
    if length == 0:
        return None
    owned = _acquire_now(settings, length)  # the common case, without a coroutine
    if owned is None:
        owned = await _acquire(settings, length)
    try:
        await _fill(request, owned, length)
    except BaseException:
        owned.release()
        raise
    return owned


async def _fill(request: web.Request, owned: Lease | LeaseChain, length: int) -> None:
    """Copy ``length`` body bytes into ``owned``'s views, in order.

    On failure the frame drops its views before the exception leaves: a traceback kept by a
    logger must not pin the slots (they would stay quarantined as long as it lives).
    """
    views = [owned.view] if isinstance(owned, Lease) else owned.views()
    readchunk = request.content.readchunk
    vi = 0
    view = views[0]
    off = 0
    got = 0
    try:
        while got < length:
            data, end_of_chunk = await readchunk()
            n = len(data)
            if not n:
                if end_of_chunk:
                    continue
                raise web.HTTPBadRequest(
                    text=f"request body truncated: {got} of {length} bytes (Content-Length)"
                )
            if n > length - got:  # the parser caps at Content-Length; stay safe anyway
                n = length - got
            room = len(view) - off
            if n <= room and n == len(data):
                view[off : off + n] = data
                off += n
            else:
                src = memoryview(data)
                p = 0
                while p < n:
                    if off == len(view):
                        vi += 1
                        view = views[vi]
                        off = 0
                    k = min(len(view) - off, n - p)
                    view[off : off + k] = src[p : p + k]
                    off += k
                    p += k
                src.release()
            got += n
    except BaseException as exc:
        del view, views
        if isinstance(exc, _MALFORMED):
            raise _malformed(exc) from None
        raise


async def _read_streamed(request: web.Request, settings: Settings) -> Lease | LeaseChain | None:
    """Unknown length (chunked, or decoded from Content-Encoding): grow as bytes arrive."""
    pool = settings.pool
    limit = settings.max_body_size
    largest = settings.largest
    # Sizes a growing first lease steps through: whole slots of each class up to the largest.
    steps = [s for s in pool.slot_sizes if s <= largest] or [largest]
    readchunk = request.content.readchunk
    leases: list[Lease] = []
    cur: Lease | None = None
    filled = 0
    total = 0
    try:
        while True:
            try:
                data, end_of_chunk = await readchunk()
            except _MALFORMED as exc:
                raise _malformed(exc) from None
            n = len(data)
            if not n:
                if end_of_chunk:
                    continue
                break
            if total + n > limit:
                raise _too_large(limit, total + n, declared=False)
            src = memoryview(data)
            p = 0
            while p < n:
                if cur is None or filled == len(cur):
                    need = filled + n - p
                    if cur is not None and len(leases) == 1 and len(cur) < largest:
                        # Grow the only lease to the next class that fits (copying <= 64 KiB).
                        size = next((s for s in steps if s >= need), largest)
                        bigger = await _acquire(settings, size)
                        assert isinstance(bigger, Lease)
                        bigger.view[:filled] = cur.view[:filled]
                        cur.release()
                        leases[0] = cur = bigger
                    else:
                        size = next((s for s in steps if s >= n - p), largest)
                        if cur is not None:
                            size = largest
                        fresh = await _acquire(settings, size)
                        assert isinstance(fresh, Lease)
                        leases.append(fresh)
                        cur = fresh
                        filled = 0
                k = min(len(cur) - filled, n - p)
                cur.view[filled : filled + k] = src[p : p + k]
                filled += k
                p += k
            src.release()
            total += n
        if cur is None:
            return None
        cur.truncate(filled)
        if len(leases) == 1:
            return cur
        return LeaseChain(leases)
    except BaseException:
        for lease in leases:
            lease.release()
        raise
