"""Request bodies read straight into pool memory: ``read_body`` and ``PooledBody``.

Supports Content-Length and chunked uploads, and compressed bodies as aiohttp decodes them
(``Content-Encoding: gzip``/``deflate``).  Goals: never join the body into one ``bytes``; peak
memory about 1x the body plus what aiohttp buffers (at most about two 64 KiB chunks), against
about 2x for ``await request.read()`` (bytearray growth, then a copy to ``bytes``).

Layout: a body up to the pool's largest class (64 KiB by default) is one lease; a larger one is
a LeaseChain of largest-class slots, never one giant allocation.

Memory: a body is first admitted into the application's body budget (``_admission``: once its
client sent ``EVIDENCE_BYTES`` or all of it, FIFO among those, its whole Content-Length
reserved, or 64 KiB steps for a body of unknown length), then leased slot
by slot as its bytes arrive, so the process holds what clients actually sent.  Without a
Content-Length the first lease grows through the classes (its bytes copied, at most 64 KiB in
all) and further slots are appended.

Bounds: O(body bytes) work, one copy of each byte; a body over ``max_body_size`` is refused
with 413 before any byte is read when Content-Length says so, otherwise as soon as the limit is
crossed, and every slot taken so far is released at once.  A body that stalls or trickles is
cut with 408 (``body_timeout``, ``body_min_rate``, preemption under memory pressure).

Lifetime: the PooledBody and its views are valid until the request ends (the middleware
releases them) or until ``PooledBody.release()``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from hashlib import sha256

from aiohttp import hdrs, web
from aiohttp.http import HttpProcessingError
from aiohttp.web import RequestPayloadError

from .._errors import PoolExhausted
from .._lease import Lease, LeaseChain
from .._pool import BufferPool
from ._admission import (
    DONE,
    READING,
    AdmissionTimeout,
    BodyCut,
    BodyTicket,
    GrowthRefused,
    slot_bytes,
)
from ._errors import BodyAlreadyRead, BodyNotContiguous
from ._fastpath import received_body
from ._lifetime import OWNED_KEY, RequestLeases, handler_task, owner_of
from ._linger import close_lingering
from ._received import ReceivedBody
from ._settings import Settings

__all__ = ["PooledBody", "read_body"]

_EMPTY = memoryview(b"")


class PooledBody:
    """A request body held in pool memory: one lease, a LeaseChain, or nothing (0 bytes).

    Valid until the request ends or ``release()``; copy with ``tobytes()`` to keep it longer.
    """

    __slots__ = ("_keeper", "_owned", "_request", "_size")

    def __init__(
        self, owned: Lease | LeaseChain | None, request: web.BaseRequest | None = None,
        *, keeper: ReceivedBody | None = None,
    ) -> None:
        self._owned = owned
        #: The request whose owner holds ``owned`` (None: the caller's, or ``keeper``'s).
        self._request = request
        #: The fast-path body that holds ``owned`` until the request ends (``read_body``).
        self._keeper = keeper
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

    def _hand_over(self) -> None:
        """The request's owner takes over the memory (``pooled_response``): the fast-path
        body that kept it lets go of it (its admission stays until the request ends)."""
        keeper = self._keeper
        if keeper is not None:
            keeper.disown(self._owned)

    def release(self) -> None:
        """Give the memory back before the request ends (optional; idempotent)."""
        owned = self._owned
        if owned is None or owned.released:
            return
        keeper = self._keeper
        if keeper is not None:
            keeper.disown(owned)
            owned.release()
            keeper.release_ticket()
        elif self._request is not None:
            owner = owner_of(self._request)
            owner.forget(owned)
            owned.release()
            owner.release_ticket()
        else:
            owned.release()

    def __repr__(self) -> str:
        kind = type(self._owned).__name__ if self._owned is not None else "empty"
        return f"<PooledBody {self._size} B ({kind})>"


async def read_body(request: web.Request) -> PooledBody:
    """Read the whole request body into pool memory.

    Statuses raised (as aiohttp HTTP exceptions, nothing left leased): 413 when the body is
    over ``max_body_size`` (the message names the limit); 408 when the body stalls, trickles
    below ``body_min_rate`` or is preempted under memory pressure (the message names the
    deadline; the connection is closed); 503 with Retry-After when no memory was free within
    ``acquire_timeout`` seconds; 400 when the body is malformed or truncated (bad chunked
    framing, bad compressed data, fewer bytes than Content-Length).  ConnectionResetError
    propagates when the client went away.

    The body is owned by the request: released when it ends.  Calling ``read_body`` again
    returns the same PooledBody; calling it after other code consumed the body stream
    (``request.read()``, ``post()``, ``json()``, ``text()``) raises BodyAlreadyRead.
    """
    received = received_body(request)  # already in slots (zero_copy_receive)
    if received is not None:  # the common case first
        pooled = received.pooled
        if pooled is not None:
            return pooled  # type: ignore[no-any-return]
        state = getattr(request, "_state", None)
        if received.holds and type(state) is dict and state.get(OWNED_KEY) is None:
            # No owner yet: the body keeps its slots and ticket itself until aiohttp ends
            # the request (no per-request owner, no done-callback).
            task = handler_task(request)
            # (a complete body needs no coroutine to wait with)
            owned = received.keep(task) if received.complete else await received.take(task)
            return _kept(received, owned)
    owner = owner_of(request)
    if owner.body is not None:
        return owner.body
    if received is not None and received.holds:
        if received.complete:
            return _took(request, owner, received, received.take_now())
        return await _take_received(request, owner, received)
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
    if received is not None and not received.streaming:
        return await _take_received(request, owner, received)  # raises its failure
    headers = request.headers
    raw = headers.get(hdrs.CONTENT_LENGTH)  # validated by aiohttp's parser
    length = int(raw) if raw is not None else None
    if length is not None and hdrs.CONTENT_ENCODING not in headers:
        if length > settings.max_body_size:
            raise _too_large(settings.max_body_size, length, declared=True)
        owned = None if length == 0 else await _read_sized(request, settings, owner, length)
    else:
        owned = await _read_streamed(request, settings, owner, length)
    if owned is not None:
        owner.items.append(owned)
    owner.body = body = PooledBody(owned, request)
    return body


async def _take_received(
    request: web.Request, owner: RequestLeases, received: ReceivedBody
) -> PooledBody:
    """The body zero_copy_receive wrote into slots: taken without a copy once whole (its
    admission ticket goes with it and ends with the request)."""
    return _took(request, owner, received, await received.take())


def _kept(received: ReceivedBody, owned: Lease | LeaseChain | None) -> PooledBody:
    body = PooledBody.__new__(PooledBody)  # PooledBody(owned, keeper=received), no call
    body._owned = owned
    body._request = None
    body._keeper = received
    body._size = 0 if owned is None else len(owned)
    received.pooled = body
    return body


def _took(
    request: web.Request, owner: RequestLeases, received: ReceivedBody,
    owned: Lease | LeaseChain | None,
) -> PooledBody:
    owner.ticket = received.hand_over_ticket()
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


def _exhausted(settings: Settings, size: int | None, exc: Exception) -> web.HTTPServiceUnavailable:
    """503 + Retry-After: no memory for the body within the timeout (or never)."""
    what = "a request body of unknown length" if size is None else f"{size} bytes of request body"
    return web.HTTPServiceUnavailable(
        headers={hdrs.RETRY_AFTER: str(settings.retry_after)},
        text=(
            f"no buffer memory for {what} within acquire_timeout="
            f"{settings.acquire_timeout} s; retry later ({exc})"
        ),
    )


def _timed_out(exc: BodyCut, request: web.Request) -> web.HTTPRequestTimeout:
    """408 naming the deadline; the connection closes after it, lingering (``_linger``: a
    client still sending reads the 408 instead of a reset; the rest of the body is dropped)."""
    resp = web.HTTPRequestTimeout(text=str(exc))
    resp.force_close()
    close_lingering(request.protocol)
    return resp


#: What aiohttp raises from ``request.content`` for a body it cannot parse or decode.
_MALFORMED = (HttpProcessingError, RequestPayloadError)


def _malformed(exc: BaseException) -> web.HTTPBadRequest:
    cause = exc.__cause__ if isinstance(exc, RequestPayloadError) else exc
    detail = getattr(cause, "message", "") or str(cause) or repr(cause)
    return web.HTTPBadRequest(text=f"malformed request body: {detail.strip()}")


def _translate(exc: BaseException, request: web.Request) -> BaseException | None:
    """The HTTP status for an error met while reading a body, or None to let it pass."""
    if isinstance(exc, BodyCut):
        return _timed_out(exc, request)
    if isinstance(exc, _MALFORMED):
        return _malformed(exc)
    return None


async def _admit(
    request: web.Request, settings: Settings, owner: RequestLeases, nbytes: int,
    length: int | None,
) -> BodyTicket:
    """Admit the body (``nbytes`` reserved) into the budget; 503 after ``acquire_timeout``,
    408 when the client sends too little while it waits for admission."""
    adm = settings.admission
    assert adm is not None
    try:
        ticket = await adm.reserve(request.content, request.protocol, nbytes, length)
    except AdmissionTimeout as exc:
        raise _exhausted(settings, length, exc) from None
    except BodyCut as exc:
        raise _timed_out(exc, request) from None
    owner.ticket = ticket
    return ticket


def _lease_now(pool: BufferPool, size: int) -> Lease | None:
    """A slot for ``size`` bytes at once from a "raise" pool, or None (then ``_lease``).

    Free slots of other classes count against the pool's budget: when the budget is spent,
    trim them once and try again.  Other policies never fail a plain acquire, so they go the
    async way (which waits instead of spilling or falling back to the heap)."""
    if pool.on_exhausted != "raise":
        return None
    try:
        return pool.acquire(size)
    except PoolExhausted:
        pool.trim()
        try:
            return pool.acquire(size)
        except PoolExhausted:
            return None


async def _lease(settings: Settings, ticket: BodyTicket, size: int, length: int | None) -> Lease:
    """One slot for ``size`` bytes inside the body's reservation; waits (at most
    ``acquire_timeout`` s) when pool memory is held outside the budget (e.g. pooled replies)."""
    lease = _lease_now(settings.pool, size)
    if lease is not None:
        return lease
    ticket.begin_wait()
    try:
        return await settings.pool.acquire_async(size, timeout=settings.acquire_timeout)
    except PoolExhausted as exc:
        raise _exhausted(settings, length, exc) from None
    finally:
        ticket.end_wait()


async def _read_sized(
    request: web.Request, settings: Settings, owner: RequestLeases, length: int
) -> Lease | LeaseChain:
    """Content-Length known and not encoded: admit ``length`` bytes, lease as they arrive."""
    if length <= settings.largest:
        sizes = settings.slot_sizes
        need = sizes[bisect_left(sizes, length)]
    else:
        need = slot_bytes(settings.pool, length)
    adm = settings.admission
    assert adm is not None
    ticket = adm.reserve_now(request._payload, request._protocol, need, length)  # hot path
    if ticket is None:
        ticket = await _admit(request, settings, owner, need, length)
    else:
        owner.ticket = ticket
    leases: list[Lease] = []
    try:
        await _fill(request, settings, ticket, leases, length)
    except BaseException:
        for lease in leases:
            lease.release()
        owner.release_ticket()
        raise
    if ticket.state == READING:  # ticket.done(), written out
        ticket.state = DONE
    if length <= settings.largest:
        return leases[0]
    return LeaseChain(leases)


async def _fill(
    request: web.Request, settings: Settings, ticket: BodyTicket, leases: list[Lease],
    length: int,
) -> None:
    """Copy ``length`` body bytes into slots leased as the bytes arrive, in order.

    On failure the frame drops its views before the exception leaves: a traceback kept by a
    logger must not pin the slots (they would stay quarantined as long as it lives).
    """
    readchunk = request.content.readchunk
    largest = settings.largest
    pool = settings.pool
    unleased = length
    view = _EMPTY
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
            ticket.received += n  # ticket.progress(n), written out
            if off == len(view):  # the slot is full (or there is none yet): lease the next
                size = min(largest, unleased)
                lease = _lease_now(pool, size) or await _lease(settings, ticket, size, length)
                leases.append(lease)
                unleased -= size
                view = lease.view
                off = 0
            if n <= len(view) - off and n == len(data):  # the chunk fits: one copy
                view[off : off + n] = data
                off += n
            else:
                src = memoryview(data)
                p = 0
                while p < n:
                    if off == len(view):  # the same as above, for a chunk across slots
                        size = min(largest, unleased)
                        lease = (_lease_now(pool, size)
                                 or await _lease(settings, ticket, size, length))
                        leases.append(lease)
                        unleased -= size
                        view = lease.view
                        off = 0
                    k = min(len(view) - off, n - p)
                    view[off : off + k] = src[p : p + k]
                    off += k
                    p += k
                src.release()
            got += n
    except BaseException as exc:
        del view
        status = _translate(exc, request)
        if status is not None:
            raise status from None
        raise


async def _read_streamed(
    request: web.Request, settings: Settings, owner: RequestLeases, wire_length: int | None,
) -> Lease | LeaseChain | None:
    """Unknown length (chunked, or decoded from Content-Encoding): admitted one largest slot
    at a time, grown as bytes arrive.  ``wire_length`` (the Content-Length of an encoded
    body, else None) bounds the admission's evidence: a body shorter than EVIDENCE_BYTES on
    the wire shows all of itself."""
    pool = settings.pool
    adm = settings.admission
    assert adm is not None
    limit = settings.max_body_size
    largest = settings.largest
    unit = slot_bytes(pool, largest)
    # Sizes a growing first lease steps through: whole slots of each class up to the largest.
    steps = [s for s in pool.slot_sizes if s <= largest] or [largest]
    ticket = await _admit(request, settings, owner, unit, wire_length)
    readchunk = request.content.readchunk
    leases: list[Lease] = []
    cur: Lease | None = None
    filled = 0
    total = 0
    slots = 1  # reserved, in largest slots
    try:
        while True:
            try:
                data, end_of_chunk = await readchunk()
            except BaseException as exc:
                status = _translate(exc, request)
                if status is not None:
                    raise status from None
                raise
            n = len(data)
            if not n:
                if end_of_chunk:
                    continue
                break
            if total + n > limit:
                raise _too_large(limit, total + n, declared=False)
            ticket.progress(n)
            src = memoryview(data)
            p = 0
            while p < n:
                if cur is None or filled == len(cur):
                    need = filled + n - p
                    if cur is not None and len(leases) == 1 and len(cur) < largest:
                        # Grow the only lease to the next class that fits (copying <= 64 KiB).
                        size = next((s for s in steps if s >= need), largest)
                        bigger = await _lease(settings, ticket, size, None)
                        bigger.view[:filled] = cur.view[:filled]
                        cur.release()
                        leases[0] = cur = bigger
                    else:
                        size = next((s for s in steps if s >= n - p), largest)
                        if cur is not None:
                            size = largest
                        if len(leases) == slots:
                            await _grow(settings, ticket, unit)
                            slots += 1
                        fresh = await _lease(settings, ticket, size, None)
                        leases.append(fresh)
                        cur = fresh
                        filled = 0
                k = min(len(cur) - filled, n - p)
                cur.view[filled : filled + k] = src[p : p + k]
                filled += k
                p += k
            src.release()
            total += n
        ticket.done()
        if cur is None:
            owner.release_ticket()
            return None
        cur.truncate(filled)
        if len(leases) == 1:
            return cur
        return LeaseChain(leases)
    except BaseException:
        for lease in leases:
            lease.release()
        owner.release_ticket()
        raise


async def _grow(settings: Settings, ticket: BodyTicket, nbytes: int) -> None:
    adm = settings.admission
    assert adm is not None
    if adm.grow_now(ticket, nbytes):
        return
    try:
        await adm.grow(ticket, nbytes)
    except (AdmissionTimeout, GrowthRefused) as exc:
        raise _exhausted(settings, None, exc) from None
