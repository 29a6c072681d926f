"""Request bodies the zero-copy receive path wrote straight into pool slots.

Operations: ``ReceivedBody`` is the payload (``request.content``) of a fast-path request: the
kernel writes the body into slots leased one at a time as ``get_buffer`` needs room (never the
whole Content-Length up front); ``take()`` hands the slots to ``read_body`` without a copy;
any ``StreamReader`` read (``request.read()``, ``request.content.*``, multipart, streaming
handlers) first turns what is held into ``bytes`` chunks (one copy, as aiohttp's parser makes)
and from then on it behaves as aiohttp's own ``StreamReader``.

``SlotSource`` is what the receive path asks about memory: admit this body, lease its next
slot.  ``AdmittedSlots`` answers with the application's ``Admission``, so a body received here
follows the rules of ``read_body`` on aiohttp's parser: its whole slot reservation admitted in
FIFO order (reading paused while it waits), slots leased inside it as bytes arrive, progress
reported to its ticket (``body_timeout``, ``body_min_rate``, preemption: 408), 503 after
``acquire_timeout``.

Lifetime: slots and the ticket belong to the ReceivedBody until ``take()`` (then to the
request, released when it ends) or until the body fails, is abandoned (aiohttp calls
``set_exception`` after the response), is read as a stream (slots copied out, ticket
released) or the connection is lost: all release at once.  Bounds: O(body bytes) work; memory
held is what arrived plus at most one partly filled slot.
"""

from __future__ import annotations

import asyncio
import functools
import types
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiohttp import hdrs, web
from aiohttp.log import internal_logger
from aiohttp.streams import StreamReader

from .._errors import PoolExhausted
from .._lease import Lease, LeaseChain
from ._admission import AdmissionTimeout, BodyTicket, slot_bytes
from ._settings import Settings

if TYPE_CHECKING:
    from ._fastpath import ZeroCopyProtocol

__all__ = ["AdmittedSlots", "ReceivedBody", "SlotSource"]


class SlotSource(Protocol):
    """Where a body's memory comes from: its admission into the body budget, then one slot
    at a time, as bytes arrive.

    ``admit_now`` answers at once (False: the caller pauses reading and awaits ``admit``);
    ``lease_now`` answers at once (None: not admitted yet, or no slot free: the caller pauses
    reading and awaits ``lease_wait``).  ``take_whole`` is the common case in one step: a
    body whose bytes all came with its head is admitted, leased and copied at once (False:
    nothing done, take the steps above).  The waits raise ``web.HTTPException`` (503) when no
    room comes in time.
    """

    def admit_now(self, body: ReceivedBody, /) -> bool: ...

    async def admit(self, body: ReceivedBody, /) -> None: ...

    def lease_now(self, body: ReceivedBody, size: int, /) -> Lease | None: ...

    def take_whole(self, body: ReceivedBody, data: memoryview, /) -> bool: ...

    async def lease_wait(self, body: ReceivedBody, size: int, /) -> Lease: ...


class AdmittedSlots:
    """``SlotSource`` backed by the application's ``Admission`` (the rules ``read_body``
    follows on aiohttp's parser): a body's whole slot reservation is admitted in FIFO order
    (``Admission.reserve``) before any slot is leased, slots are leased inside it as bytes
    arrive, and a wait for a slot held outside the budget (pooled replies) is reported to the
    ticket (``begin_wait``/``end_wait``).  Either wait lasts at most ``acquire_timeout``
    seconds, then 503 with Retry-After.  The ticket is the body's (``ReceivedBody.ticket``)
    until it is released with the body's memory."""

    __slots__ = ("_adm", "_largest", "_pool", "_retry_after", "_sizes", "_sync", "_timeout")

    def __init__(self, settings: Settings) -> None:
        assert settings.admission is not None
        self._adm = settings.admission
        self._pool = settings.pool
        self._timeout = settings.acquire_timeout
        self._retry_after = settings.retry_after
        self._sizes = settings.slot_sizes
        self._largest = settings.largest
        self._sync = settings.pool.on_exhausted == "raise"

    def reservation(self, length: int) -> int:
        """Bytes of pool slots a body of ``length`` bytes is admitted for (as read_body)."""
        if length <= self._largest:
            sizes = self._sizes
            return sizes[bisect_left(sizes, length)]
        return slot_bytes(self._pool, length)

    def admit_now(self, body: ReceivedBody, /) -> bool:
        ticket = self._adm.reserve_now(
            _CutNotice(body), None, self.reservation(body.length), body.length
        )
        if ticket is None:
            return False
        body.admitted(ticket)
        return True

    async def admit(self, body: ReceivedBody, /) -> None:
        # reader=None: the receive path pauses its own reading while the body waits.
        try:
            ticket = await self._adm.reserve(
                _CutNotice(body), None, self.reservation(body.length), body.length
            )
        except AdmissionTimeout as exc:
            raise self._unavailable(f"{body.length} bytes of request body", exc) from None
        body.admitted(ticket)

    def lease_now(self, body: ReceivedBody, size: int, /) -> Lease | None:
        if body.ticket is None or not self._sync:
            return None
        pool = self._pool
        try:
            return pool.acquire(size)
        except PoolExhausted:
            pool.trim()  # free slots of other classes count against the pool's budget
            try:
                return pool.acquire(size)
            except PoolExhausted:
                return None

    def take_whole(self, body: ReceivedBody, data: memoryview, /) -> bool:
        n = len(data)
        if not self._sync or n > self._largest:
            return False
        sizes = self._sizes
        size = sizes[bisect_left(sizes, n)]
        adm = self._adm
        # Admitted into its connection's hold, a DONE ticket whose stream is the connection:
        # the admission only asks it for its ``transport`` (the write-progress watch).
        conn = body._conn
        hold = conn.hold
        if hold is None:
            hold = conn.hold = adm.new_hold(conn)
        if not adm.hold_whole(hold, size):
            return False
        try:
            lease = self._pool.acquire(n)
        except PoolExhausted:  # (trimming and waiting are the general path's)
            adm.unhold_whole(hold, size)
            return False
        lease.copy_from(data)  # (no view made: a handler that only needs len() pays none)
        body.whole(lease, size)
        return True

    async def lease_wait(self, body: ReceivedBody, size: int, /) -> Lease:
        lease = self.lease_now(body, size)
        if lease is not None:
            return lease
        ticket = body.ticket
        if ticket is not None:
            ticket.begin_wait()  # held outside the budget: the server's wait, not the client's
        try:
            return await self._pool.acquire_async(size, timeout=self._timeout)
        except PoolExhausted as exc:
            raise self._unavailable(f"the next {size} bytes of request body", exc) from None
        finally:
            if ticket is not None:
                ticket.end_wait()

    def _unavailable(self, what: str, exc: Exception) -> web.HTTPServiceUnavailable:
        return web.HTTPServiceUnavailable(
            headers={hdrs.RETRY_AFTER: str(self._retry_after)},
            text=(
                f"no buffer memory for {what} within acquire_timeout={self._timeout} s; "
                f"retry later ({exc})"
            ),
        )


class _CutNotice:
    """The ticket's ``stream``: a cut (``BodyCut``) goes to the body's connection, which
    answers 408 and closes (lingering)."""

    __slots__ = ("body",)

    def __init__(self, body: ReceivedBody) -> None:
        self.body = body

    def set_exception(self, exc: BaseException) -> None:
        self.body._conn.body_cut(self.body, exc)

    # The admission's evidence check reads these, as it reads aiohttp's StreamReader: a body
    # is admitted only once its client has shown bytes (here or in the kernel's queue).
    @property
    def total_bytes(self) -> int:
        """Body bytes the connection has received for this body so far."""
        body = self.body
        return max(body.received, body.ahead)

    def is_eof(self) -> bool:
        # Over TLS the bytes a paused connection holds sit in the TLS layer, where neither the
        # body nor the kernel's queue shows them: no evidence wait there (FIFO + preemption).
        body = self.body
        transport = body._conn._transport
        if transport is not None and transport.get_extra_info("ssl_object") is not None:
            return True
        return self.total_bytes >= body.length

    def exception(self) -> BaseException | None:
        return None

    @property
    def transport(self) -> Any:
        """The body's connection (for the admission's write-progress watch)."""
        return self.body._conn._transport

    def held(self) -> bool:
        """True while aiohttp's full queue of pipelined requests holds the connection's
        reading (asked by the admission's periodic check for a held ticket)."""
        return bool(self.body._conn._handler._buffer_paused)

    @property
    def fd(self) -> int:
        """The connection's socket, so the admission can count bytes still in the kernel."""
        transport = self.body._conn._transport
        sock = None if transport is None else transport.get_extra_info("socket")
        try:
            return int(sock.fileno()) if sock is not None else -1
        except (AttributeError, OSError, ValueError):
            return -1


#: A body's lease list once it holds none any more (no mode but HELD appends; a tuple, so
#: that a stray append fails loudly instead of sharing state): one list less per request.
_NO_LEASES: Final[Any] = ()

# Modes of a ReceivedBody.
HELD = 0  # bytes in slots, nobody read them yet
TAKEN = 1  # read_body took the slots
STREAM = 2  # a StreamReader method was used: behaves as aiohttp's StreamReader
FAILED = 3  # failed, abandoned or disconnected: nothing held


#: aiohttp's StreamReader keeps its fields in slots (checked by ``_compat``): a ReceivedBody
#: builds that part on first use (see ``ReceivedBody._build_reader``), else at once.
_READER_SLOTS: Final = tuple(
    getattr(StreamReader, name) for name in getattr(StreamReader, "__slots__", ())
)
#: Its public fields, which code may read as attributes: a ReceivedBody sets them at once.
_PUBLIC_FIELDS: Final = frozenset({"total_bytes", "total_compressed_bytes"})
LAZY_READER: Final = (
    bool(_READER_SLOTS)
    and all(type(slot).__name__ == "member_descriptor" for slot in _READER_SLOTS)
    and {n for n in StreamReader.__slots__ if not n.startswith("_")} == _PUBLIC_FIELDS
)


class ReceivedBody(StreamReader):
    """A fast-path request's payload: Content-Length bytes received into pool slots.

    Valid as ``request.content`` for the request's lifetime.  ``length`` is the declared size
    in bytes, ``received`` how many have arrived.

    Its StreamReader part (a deque, a list, a timer and twenty fields) is built by the first
    call of any StreamReader method or property (``LAZY_READER``; every one that this class
    does not define builds it first, see ``_build_first``): a body that only ``read_body``
    takes, the common request, never needs it.
    """

    __slots__ = (
        "_complete",
        "_conn",
        "_done",
        "_failure",
        "_fill",
        "_kept",
        "_largest",
        "_leases",
        "_limit",
        "_mode",
        "_overflow",
        "_reader",
        "_share",
        "_task",
        "ahead",
        "length",
        "pooled",
        "received",
        "ticket",
        "waiting",
    )

    def __init__(
        self, conn: ZeroCopyProtocol, length: int, largest: int, limit: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        # The StreamReader fields this class reads itself; the rest come with _build_reader.
        self._limit = limit
        self._loop = loop
        self._eof = False
        self.total_bytes = 0
        self.total_compressed_bytes: int | None = None
        self._reader = not LAZY_READER
        if self._reader:
            StreamReader.__init__(self, conn, limit, loop=loop)  # type: ignore[arg-type]
        self._conn = conn
        self.length = length
        self.received = 0
        #: Body bytes that came in the same read as the head (known before they are fed).
        self.ahead = 0
        self._largest = largest
        self._leases: list[Lease] = []
        self._fill = 0  # bytes in the last lease
        #: Bytes that arrived while no slot could be leased (a bytearray once there are any).
        self._overflow: bytes | bytearray = b""
        self._mode = HELD
        self._complete = False
        self._done: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        #: True while the protocol waits for this body's admission or a slot.
        self.waiting = False
        #: The body's admission into the budget (None before it, and once released or handed
        #: to ``read_body`` with the slots).
        self.ticket: BodyTicket | None = None
        #: Bytes reserved for this body in its connection's hold (a whole body, see
        #: ``take_whole``; 0: none).  Given back with the slots, as a ticket would be.
        self._share = 0
        #: What ``read_body`` returned when this body kept its own slots (see ``keep``).
        self.pooled: Any = None
        self._kept: Lease | LeaseChain | None = None
        self._task: asyncio.Task[Any] | None = None

    def _build_reader(self) -> None:
        """Build the StreamReader part (once), keeping the fields set before."""
        if self._reader:
            return
        self._reader = True
        kept = []
        for slot in _READER_SLOTS:
            try:
                kept.append((slot, slot.__get__(self)))
            except AttributeError:  # not set yet
                pass
        StreamReader.__init__(self, self._conn, self._limit, loop=self._loop)  # type: ignore[arg-type]
        for slot, value in kept:
            slot.__set__(self, value)

    def _set_exception(self, exc: BaseException) -> None:
        """StreamReader's ``set_exception`` (a reader not built yet has nobody to wake)."""
        if self._reader:
            StreamReader.set_exception(self, exc)
        else:
            self._exception = exc

    # ------------------------------------------------------------ receiving (the protocol)
    @property
    def transport(self) -> Any:
        """The body's connection (read by the admission's write-progress watch when this
        body is its own ticket's stream: a whole body, see ``take_whole``)."""
        return self._conn._transport

    @property
    def remaining(self) -> int:
        return self.length - self.received

    def slot_view(self) -> memoryview | None:
        """Free room of the current slot, at most the bytes still to come; None when a new
        slot is needed and none is free right now (the protocol then waits for one)."""
        if self._mode != HELD or self._overflow:
            return None
        leases = self._leases
        if leases:
            last = leases[-1]
            if self._fill < len(last):
                return last.view[self._fill : self._fill + self.remaining]
        lease = self._conn.slots.lease_now(self, min(self.remaining, self._largest))
        if lease is None:
            return None
        leases.append(lease)
        self._fill = 0
        return lease.view

    def add_slot(self, lease: Lease) -> None:
        """A slot the protocol waited for; bytes that overflowed meanwhile move into it."""
        if self._mode != HELD:
            lease.release()
            return
        self._leases.append(lease)
        self._fill = 0
        over = self._overflow
        if over:
            assert type(over) is bytearray
            k = min(len(over), len(lease))
            lease.view[:k] = over[:k]
            self._fill = k
            del over[:k]
        self._check_complete()

    def slot_filled(self, n: int) -> bool:
        """``n`` bytes were written into the view ``slot_view`` returned; True at the end."""
        self._fill += n
        self.received += n
        self.total_bytes += n
        ticket = self.ticket
        if ticket is not None:
            ticket.received += n  # progress, seen by the admission's deadlines
        if self.received >= self.length:
            if ticket is not None:
                ticket.done()
            self._check_complete()
            return True
        return False

    def whole(self, lease: Lease, share: int) -> None:
        """All of the body arrived with its head and was copied into ``lease`` (``share``
        bytes reserved in its connection's hold): the body is complete."""
        n = len(lease)
        self._leases.append(lease)
        self._fill = self.received = self.total_bytes = n
        self._share = share
        self._complete = True

    def admitted(self, ticket: BodyTicket) -> None:
        """The body's reservation was admitted: it is the body's until released (at once
        if the body no longer holds slots: streamed, failed or abandoned meanwhile)."""
        if self._mode != HELD:
            ticket.adm.release(ticket)
            return
        self.ticket = ticket
        ticket.received = self.received
        if self.received >= self.length:
            ticket.done()

    def release_ticket(self) -> None:
        """Give the body's admission back (its slots were released or streamed)."""
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            ticket.adm.release(ticket)
        if self._share:
            self._unshare()

    def _unshare(self) -> None:
        share, self._share = self._share, 0
        hold = self._conn.hold
        assert hold is not None
        hold.adm.unhold_whole(hold, share)

    def hand_over_ticket(self) -> BodyTicket | None:
        """The ticket goes with the slots ``take()`` handed over (the request releases it;
        a share of the connection's hold becomes a ticket of its own)."""
        ticket, self.ticket = self.ticket, None
        share = self._share
        if share:
            self._share = 0
            hold = self._conn.hold
            assert hold is not None
            ticket = hold.adm.split_hold(hold, share, self)
        return ticket

    def bytes_arrived(self, data: bytes | bytearray | memoryview) -> bool:
        """Body bytes that arrived outside a slot (behind a head, into scratch): copied into
        slots (or the overflow while none is free), or fed as ``bytes`` in STREAM mode.
        ``data`` is at most ``remaining`` bytes.  True once all ``length`` bytes arrived."""
        n = len(data)
        mode = self._mode
        if mode == STREAM:
            self.received += n
            StreamReader.feed_data(self, bytes(data))
            if self.received >= self.length:
                self._finish()
                return True
            return False
        if mode != FAILED:
            p = 0
            view: memoryview | None = None
            src = memoryview(data)
            while p < n:
                view = self.slot_view()
                if view is None:
                    if not self._overflow:
                        self._overflow = bytearray()
                    self._overflow += src[p:]
                    break
                k = min(len(view), n - p)
                view[:k] = src[p : p + k]
                self._fill += k
                p += k
            del view
            src.release()
        self.received += n
        self.total_bytes += n
        ticket = self.ticket
        if ticket is not None:
            ticket.received += n
        if self.received >= self.length:
            if ticket is not None:
                ticket.done()
            self._check_complete()
            return True
        return False

    @property
    def needs_slot(self) -> bool:
        """True when arrived bytes wait in the overflow for a slot (none was free)."""
        return bool(self._overflow) and self._mode == HELD

    def next_slot_size(self) -> int:
        """Size of the slot to wait for: what waits in the overflow plus what is still to
        come, at most the largest class."""
        return min(len(self._overflow) + self.remaining, self._largest)

    def _check_complete(self) -> None:
        if self.received >= self.length and not self._overflow and not self._complete:
            self._finish()

    def _finish(self) -> None:
        self._complete = True
        if self._mode == STREAM:
            StreamReader.feed_eof(self)
            self._conn.body_done(self)  # a whole stream holds nothing a disconnect must fail
        elif self._reader and self._eof_callbacks:
            self._eof_arrived()
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    def _eof_arrived(self) -> None:
        """Every body byte arrived while the slots hold them: what aiohttp's StreamReader does
        for its ``on_eof`` callbacks at EOF (each runs once; one that raises is logged)."""
        callbacks = list(self._eof_callbacks)
        self._eof_callbacks.clear()
        for callback in callbacks:
            try:
                callback()
            except Exception:
                internal_logger.exception("Exception in eof callback")

    def on_eof(self, callback: Callable[[], None]) -> None:
        """StreamReader's: ``callback`` runs once every body byte arrived (now, if they
        have), whether or not anything read them."""
        self._build_reader()
        if self._complete and self._mode == HELD:
            self._eof_callbacks.append(callback)
            self._eof_arrived()
        else:
            StreamReader.on_eof(self, callback)

    def fail(self, exc: BaseException) -> None:
        """The body cannot complete (deadline, no memory, disconnect), or its request ended:
        release everything; readers and ``read_body`` get ``exc``."""
        if self._failure is None:
            self._failure = exc
        if self._complete:
            # Every byte had arrived: aiohttp's StreamReader was at EOF before the exception
            # (wait_eof() returns; the on_eof callbacks ran then, see _finish and on_eof).
            self._eof = True
        self._release_all()
        self.release_ticket()
        self._mode = FAILED
        self._conn.body_done(self)
        done = self._done
        if done is not None and not done.done():
            done.set_exception(exc)
            done.exception()  # retrieved: nobody may be waiting
        self._set_exception(exc)

    def _release_all(self) -> None:
        leases, self._leases = self._leases, _NO_LEASES
        self._overflow = b""
        for lease in leases:
            if not lease.released:
                lease.release()

    # ------------------------------------------------------------ read_body
    @property
    def complete(self) -> bool:
        """True once every body byte is in the slots (``take`` then returns at once)."""
        return self._complete

    async def take(self, task: asyncio.Task[Any] | None = None) -> Lease | LeaseChain | None:
        """Wait for the whole body; hand its slots over (no copy).  The caller owns them
        (``task`` given: this body keeps them, see ``keep``)."""
        if self._mode == HELD and not self._complete:
            if self._done is None:
                self._done = self._loop.create_future()
            self._conn.body_wanted(self)
            await asyncio.shield(self._done)
        return self.take_now() if task is None else self.keep(task)

    def take_now(self) -> Lease | LeaseChain | None:
        """``take`` for a body that is ``complete`` (or failed: raises its failure).  The
        connection still counts the body (``BODIES_AHEAD``) until its request ends: its
        new owner holds its memory until then."""
        return self._take_slots()

    def keep(self, task: asyncio.Task[Any]) -> Lease | LeaseChain | None:
        """``take_now``, but this body stays the owner of its slots and ticket: it releases
        them when aiohttp ends the request (``set_exception`` after the response was
        written) or, if the connection is lost first, once ``task`` (the request's handler
        task) is done.  Cheaper than a per-request owner and done-callback; ``read_body``
        uses it for a request that has no owner yet."""
        owned = self._take_slots()
        self._kept = owned
        self._task = task
        return owned

    def disown(self, owned: object) -> None:
        """``owned`` (the kept lease or chain) is someone else's now (``pooled_response``
        took it over or released it); the ticket stays until the request ends."""
        if owned is not None and self._kept is owned:
            self._kept = None

    def release_kept(self) -> None:
        """Release what ``keep`` kept (idempotent); the connection forgets this body."""
        owned, self._kept = self._kept, None
        self._task = None
        self.pooled = None  # (it refers back: no cycle left behind)
        if owned is not None and not owned.released:
            owned.release()
        share = self._share
        if share:  # (_unshare, written out: the common request's end)
            self._share = 0
            hold = self._conn.hold
            assert hold is not None
            hold.adm.unhold_whole(hold, share)
        ticket = self.ticket
        if ticket is not None:
            self.ticket = None
            ticket.adm.release(ticket)
        self._conn.body_done(self)

    def release_kept_after_task(self) -> None:
        """The connection was lost: release what ``keep`` kept once the handler is done
        with it (now, if its task already ended)."""
        task = self._task
        if task is None or task.done():
            self.release_kept()
        else:
            task.add_done_callback(lambda _t: self.release_kept())

    @property
    def kept(self) -> bool:
        """True while this body holds slots or a ticket for a ``read_body`` caller."""
        return self._task is not None

    @property
    def task(self) -> asyncio.Task[Any]:
        """The request's handler task, while ``kept``."""
        assert self._task is not None
        return self._task

    def _take_slots(self) -> Lease | LeaseChain | None:
        if self._mode == FAILED:
            assert self._failure is not None
            raise self._failure
        if self._mode != HELD:
            raise RuntimeError("the body was already read through request.content")
        leases, self._leases = self._leases, _NO_LEASES
        self._mode = TAKEN
        if not self._reader or (
            self._waiter is None and self._eof_waiter is None and not self._eof_callbacks
        ):
            # feed_eof with nobody to wake (the usual case): a HELD body never paused the
            # connection as a stream, so there is no reading to resume either
            self._eof = True
        else:
            StreamReader.feed_eof(self)
        if not leases:
            return None
        last = leases[-1]
        if len(last) != self._fill:  # (a whole body's lease has its size already)
            last.truncate(self._fill)
        if len(leases) == 1:
            return leases[0]
        return LeaseChain(leases)

    @property
    def holds(self) -> bool:
        """True while this body may still hold slots (nobody took or streamed it yet)."""
        return self._mode == HELD

    @property
    def taken(self) -> bool:
        return self._mode == TAKEN

    @property
    def streaming(self) -> bool:
        return self._mode == STREAM

    # ------------------------------------------------------------ StreamReader behaviour
    def _to_stream(self) -> None:
        """First StreamReader use: what the slots hold becomes ``bytes`` chunks (one copy)."""
        self._build_reader()  # (also for its callers' StreamReader code when not HELD)
        if self._mode != HELD:
            return
        self._mode = STREAM
        leases, self._leases = self._leases, _NO_LEASES
        # feed_data counts what it is fed, which was counted as it arrived: count it once
        # (aiohttp's post() compares total_bytes with client_max_size).
        counted = self.total_bytes
        self.total_bytes = 0
        last = len(leases) - 1
        for i, lease in enumerate(leases):
            view = lease.view if i < last else lease.view[: self._fill]
            if len(view):
                StreamReader.feed_data(self, bytes(view))
            del view
            lease.release()
        if self._overflow:
            StreamReader.feed_data(self, bytes(self._overflow))
            self._overflow = b""
        self.total_bytes = counted
        # No pool memory any more: from here on the body is aiohttp's StreamReader, as on
        # aiohttp's own parser (where request.read() and streams are not admitted either).
        self.release_ticket()
        self._conn.body_streaming(self)
        if self.received >= self.length:
            self._finish()

    def is_eof(self) -> bool:
        return self._complete or self._mode == FAILED or self._eof

    async def _wait(self, func_name: str) -> None:
        if self._mode == HELD:
            self._to_stream()
            if self._buffer or self._eof:
                return
        if self._exception is not None:
            raise self._exception
        await super()._wait(func_name)

    def read_nowait(self, n: int = -1) -> bytes:
        self._to_stream()
        return super().read_nowait(n)

    async def wait_eof(self) -> None:
        self._to_stream()
        await super().wait_eof()

    def set_exception(self, exc: BaseException, *args: Any) -> None:
        # aiohttp calls this when the request ends (PayloadAccessError) and on disconnect.
        if self._mode == STREAM:
            StreamReader.set_exception(self, exc)
            self._conn.body_abandoned(self)
            return
        if self._mode == TAKEN:
            task = self._task
            if task is not None:
                # The request ended (its task is done): what read_body kept comes back.  Or
                # the client went away while the handler still works (aiohttp cancels the
                # request's payload): then once the handler is done with it.
                if task.done():
                    self.release_kept()
                else:
                    self.release_kept_after_task()
            else:  # taken by an owner (take_now): the request ended, the count with it
                self._conn.body_done(self)
            self._set_exception(exc)
            return
        if not self._complete:
            self._conn.body_abandoned(self)
        self.fail(exc)

    def __repr__(self) -> str:
        mode = ("held", "taken", "stream", "failed")[self._mode]
        return f"<ReceivedBody {self.received}/{self.length} B {mode}>"


def _build_first(cls: type[ReceivedBody]) -> None:
    """Make each StreamReader method and property that ``cls`` does not define build the
    StreamReader part first, so code that uses a ReceivedBody as aiohttp's StreamReader (the
    user's, aiohttp's, newer StreamReader methods) always finds it whole."""

    def first(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def building(self: ReceivedBody, *args: Any, **kwargs: Any) -> Any:
            if not self._reader:
                self._build_reader()
            return fn(self, *args, **kwargs)

        return building

    mro = cls.__mro__
    for i in range(mro.index(StreamReader), len(mro) - 1):  # StreamReader and its bases
        for name, value in vars(mro[i]).items():
            if name in ("__init__", "__slots__") or any(name in vars(c) for c in mro[:i]):
                continue  # (defined closer to cls: ours, or a subclass's override)
            if isinstance(value, property):
                fget = first(value.fget) if value.fget is not None else None
                fset = first(value.fset) if value.fset is not None else None
                setattr(cls, name, property(fget, fset, None, value.__doc__))
            elif isinstance(value, types.FunctionType):
                setattr(cls, name, first(value))


if LAZY_READER:
    _build_first(ReceivedBody)
