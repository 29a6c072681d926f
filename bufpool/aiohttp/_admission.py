"""Admission of request bodies into a memory budget, their deadlines, and overload preemption.

Operations (each O(1) unless noted):

* ``reserve_now(stream, reader, n, length)`` / ``await reserve(...)``: admit a body that will
  hold ``n`` bytes of pool slots.  Evidence first: a body is admitted only once its client
  has sent ``min(length, EVIDENCE_BYTES)`` body bytes (counted in aiohttp's stream plus the
  socket's kernel receive queue, ``FIONREAD``) or the whole body; until then it waits
  without any reservation (a head that declares 8 MiB and sends nothing pins nothing).
  Among bodies with evidence, FIFO: a body is admitted only when its whole reservation fits
  next to every body admitted before it, so admitted bodies can always finish (no two
  bodies each hold part of what the other needs).  While a body waits, its connection's
  reading is paused, so aiohttp buffers nothing more for it (TCP backpressure; the bytes
  wait in the kernel, where the evidence check sees them).
* ``grow_now(ticket, n)`` / ``await grow(...)``: enlarge an admitted body's reservation
  (bodies of unknown length).  Growth goes before new admissions; a growth that only other
  waiting bodies could satisfy fails at once (``GrowthRefused``) instead of deadlocking.
* ``ticket.progress(n)``: ``n`` body bytes arrived.  Memory is leased slot by slot as bytes
  arrive, inside the reservation, so the process holds what clients sent.
* ``release(ticket)``: the body's memory is back; waiters are served in order.
* ``watch_send(transport, n)``: a pooled reply of ``n`` bytes is being written.

Bodies waiting for evidence are looked at every ``EVIDENCE_POLL`` s (O(such waiters), one
``ioctl`` each); the same ``body_timeout`` and ``body_min_rate`` deadlines apply to them from
their head (408), and ``acquire_timeout`` starts only once they have shown their evidence.

Deadlines (checked every ``tick`` seconds while anything is tracked, O(tracked) per check):
no body byte for ``body_timeout`` s, or slower than ``body_min_rate`` after ``body_grace`` s,
cuts the body (its stream raises :class:`BodyCut`, answered 408); no write progress on a
pooled reply for ``send_timeout`` s aborts the connection.  Under pressure (a body waited
``preempt_after`` s for memory) these deadlines shrink to ``preempt_idle`` s: every body with
no byte for that long, or below ``body_min_rate`` with that grace, is cut (those holding the
most unfilled reservation first), and stalled pooled replies are aborted.  Under pressure the
rate is also judged per ``preempt_idle`` window (bytes that arrived before do not buy time
later).  Sooner still, while any body waits (however briefly), a body that did not move
after its admission (below ``body_min_rate`` beyond the bytes that admitted it, for
``preempt_after`` s from the check that first saw it) is cut: the client that sends its
evidence and then stalls or trickles.  A body that keeps sending at ``body_min_rate`` or
more is never cut.  See
``docs/aiohttp.md`` for the anchors (nginx, Apache, Envoy, Go).

Quiet for ``idle_trim_after`` s: ``pool.trim()`` and glibc ``malloc_trim(0)`` give memory back.

Another receive path (e.g. a BufferedProtocol below aiohttp's parser) uses it the same way as
``read_body``: ``adm = app[SETTINGS_KEY].admission``; ``t = adm.reserve_now(stream, reader,
slot_bytes(pool, length), length) or await adm.reserve(...)`` (``stream.set_exception``
receives a :class:`BodyCut`; ``stream.total_bytes``/``is_eof()`` and the socket of
``reader.transport`` give the evidence, a stream without them counts as evident;
``reader.pause_reading``/``resume_reading`` hold the socket while it waits);
``t.received += n`` as bytes land; ``t.begin_wait()``/``t.end_wait()`` around a wait
for a pool slot; ``t.done()`` when the body is complete; ``adm.release(t)`` once its memory
is released.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import ctypes.util
import logging
import select
import struct
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

from .._pool import BufferPool

__all__ = [
    "DETACHED",
    "EVIDENCE_BYTES",
    "EVIDENCE_POLL",
    "Admission",
    "AdmissionStats",
    "AdmissionTimeout",
    "BodyCut",
    "BodyTicket",
    "GrowthRefused",
    "SendWatch",
    "slot_bytes",
]

log = logging.getLogger("bufpool.aiohttp")

WAITING, READING, DONE, CUT, RELEASED, HELD = range(6)

#: Body bytes a client must have sent (or its whole body, if smaller) before its body is
#: admitted into the budget (16 KiB: about one initial TCP congestion window, so a client
#: sending at line rate shows it within one round trip of its head).
EVIDENCE_BYTES: Final = 16384
#: Seconds between looks at bodies that wait for their evidence (only while there are any).
EVIDENCE_POLL: Final = 0.02

try:
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except ImportError:  # not POSIX: the kernel queue is not looked at
    _FIONREAD = None
_ZERO = b"\0\0\0\0"


class BodyStream(Protocol):
    """Where a cut is delivered: aiohttp's ``StreamReader`` (``request.content``)."""

    def set_exception(self, exc: BaseException) -> None: ...


class FlowControl(Protocol):
    """A connection whose reading can be paused: aiohttp's ``RequestHandler``."""

    transport: Any

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class _Detached:
    """The stream of a hold whose connection is gone: nothing to watch, nothing to cut."""

    __slots__ = ()
    transport = None

    def set_exception(self, exc: BaseException) -> None:
        pass


#: See ``_Detached`` (``Admission.new_hold``).
DETACHED: Final[Any] = _Detached()


class BodyCut(TimeoutError):
    """A body was cut off by a deadline or under memory pressure; the message names it.

    A ``TimeoutError`` so that aiohttp's lingering read after the 408 treats it as one.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AdmissionTimeout(Exception):
    """No room for a body's reservation within ``acquire_timeout`` seconds (503)."""


class GrowthRefused(Exception):
    """A body of unknown length cannot grow: only bodies that wait themselves hold the
    budget, so waiting could never end (503)."""


class BodyTicket:
    """One body's admission: its reservation (bytes of pool slots) and progress.

    Valid from admission until ``Admission.release``; times are loop seconds.
    """

    __slots__ = (
        "adm",
        "admitted_at",
        "base",
        "fd",
        "fut",
        "last",
        "looked",
        "mark",
        "mark_at",
        "need",
        "paused",
        "queued_at",
        "reader",
        "received",
        "seen",
        "shown",
        "size",
        "slow",
        "state",
        "stream",
        "timer",
        "want",
        "wlast",
        "wsize",
    )

    #: Set by the first periodic check that sees the body reading (unset before, so that
    #: admission pays nothing for them): ``base`` is what the body had received by then, at
    #: least EVIDENCE_BYTES (what admitted it); ``looked`` how many seconds after admission
    #: that check came.  Progress after admission is measured from there (``_cut_unmoved``).
    base: int
    looked: float

    def __init__(self, adm: Admission, stream: BodyStream, reader: FlowControl | None) -> None:
        self.adm = adm
        self.stream = stream
        self.reader = reader
        self.size = 0  #: bytes reserved
        self.received = 0  #: body bytes that arrived (the reader adds to it)
        self.seen = 0  #: ``received`` at the last check: progress is measured there
        self.want = 0  #: bytes asked for while waiting
        self.state = WAITING
        self.admitted_at = 0.0
        self.last = 0.0  #: when a body byte last arrived (or admission)
        self.queued_at = 0.0
        self.fut: asyncio.Future[None] | None = None
        #: Evidence still missing: body bytes to see before admission (0: evident).
        self.need = 0
        self.shown = 0  #: body bytes seen while waiting for the evidence
        self.fd = -1  #: the connection's plain TCP socket, for FIONREAD (-1: none, or TLS)
        self.paused = False  #: this ticket paused the connection's reading
        self.timer: asyncio.Timeout | None = None  #: acquire_timeout, started at evidence
        #: ``received`` at ``mark_at``: the rate over the last preempt_idle window
        self.mark = 0
        self.mark_at = 0.0
        self.slow = False  #: the last whole window was below body_min_rate
        #: Once the body is whole (DONE): its connection's write buffer at the last check,
        #: and when it last changed (a request holding pool memory whose replies do not
        #: move meets send_timeout, see ``Admission._watch_done``).
        self.wsize = 0
        self.wlast = 0.0

    def progress(self, n: int) -> None:
        """``n`` body bytes arrived (the same as ``ticket.received += n``: the periodic
        check notices the progress, so a chunk costs no clock read)."""
        self.received += n

    def done(self) -> None:
        """The whole body arrived: no more body deadlines (the reservation stays)."""
        if self.state == READING or self.state == HELD:  # (whole while held: done too)
            self.state = DONE

    def begin_wait(self) -> None:
        """The body waits for a pool slot held outside admission (counts as pressure)."""
        if self.state == READING:
            self.state = WAITING
            self.queued_at = self.adm.loop.time()
            self.adm._slot_waiters.add(self)
            self.adm._arm()

    def end_wait(self) -> None:
        adm = self.adm
        adm._slot_waiters.discard(self)
        if self.state == WAITING:
            self.state = READING
            now = adm.loop.time()
            self.admitted_at += now - self.queued_at  # waiting was the server's doing
            self.last = now

    def hold(self) -> None:
        """The server stopped reading this body's connection for its own reasons (e.g.
        aiohttp's queue of pipelined requests is full): no body deadline runs meanwhile,
        except preemption under memory pressure (no progress for ``preempt_idle``)."""
        if self.state == READING:
            self.state = HELD
            self.queued_at = self.adm.loop.time()

    def unhold(self) -> None:
        """Reading resumed: the deadlines go on, not counting the time held."""
        if self.state == HELD:
            self.state = READING
            now = self.adm.loop.time()
            self.admitted_at += now - self.queued_at  # the server's pause, not the client's
            self.last = now

    def __repr__(self) -> str:
        return f"<BodyTicket {self.received}/{self.size} B state={self.state}>"


class SendWatch:
    """A pooled reply being written to ``transport``; progress = its write buffer moved."""

    __slots__ = ("finished", "last", "last_size", "nbytes", "seen", "transport", "written")

    def __init__(self, transport: asyncio.WriteTransport, nbytes: int, now: float) -> None:
        self.transport = transport
        self.nbytes = nbytes
        self.written = 0  #: bytes handed to the transport so far (updated by the writer)
        self.seen = 0
        self.last = now
        self.last_size = -1
        self.finished = False

    def pinned(self) -> int:
        """Pool bytes this reply still pins (all until written; then what the transport
        queues, at most the reply)."""
        if not self.finished:
            return self.nbytes
        try:
            return min(self.nbytes, self.transport.get_write_buffer_size())
        except Exception:  # a closed transport
            return 0


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    """Snapshot of the integration's memory admission.  Bytes, counts since setup."""

    budget: int  #: body_budget
    reserved_bytes: int  #: reserved by admitted bodies (leased or promised)
    bodies: int  #: admitted bodies not yet released
    waiting: int  #: bodies waiting for admission, growth or a slot
    waiting_bytes: int  #: what the admission/growth waiters ask for
    waiting_for_evidence: int  #: of ``waiting``: bodies whose client has not sent enough yet
    admitted: int
    admission_timeouts: int  #: 503 after acquire_timeout
    growth_refused: int  #: 503: unknown-length body could not grow
    cut_body_timeout: int  #: 408: no byte for body_timeout
    cut_min_rate: int  #: 408: below body_min_rate after body_grace
    cut_preempted: int  #: 408: stalled under memory pressure
    replies_sending: int  #: pooled replies tracked (being written or draining)
    reply_bytes_pinned: int  #: pool bytes pinned by pooled replies not yet sent
    send_aborted_timeout: int  #: aborted after send_timeout without progress
    send_aborted_preempted: int  #: aborted stalled under memory pressure
    idle_trims: int  #: idle-decay trims done
    idle_trimmed_bytes: int  #: pool bytes they gave back

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def prometheus(self, prefix: str = "bufpool_aiohttp") -> str:
        lines = []
        for name, value in self.as_dict().items():
            kind = "gauge" if name in _GAUGES else "counter"
            metric = f"{prefix}_{name}" + ("_total" if kind == "counter" else "")
            lines.append(f"# TYPE {metric} {kind}")
            lines.append(f"{metric} {value}")
        return "\n".join(lines) + "\n"


_GAUGES = frozenset(
    {"budget", "reserved_bytes", "bodies", "waiting", "waiting_bytes", "waiting_for_evidence",
     "replies_sending", "reply_bytes_pinned"}
)


def slot_bytes(pool: BufferPool, n: int) -> int:
    """Bytes of pool slots a body of ``n`` bytes occupies: one slot up to the largest class,
    else a chain of largest-class slots and one slot for the rest (as ``acquire_chain``)."""
    sizes = pool.slot_sizes
    largest = pool.classes[-1]
    full, rest = divmod(n, largest)
    total = full * sizes[bisect.bisect_left(sizes, largest)]
    if rest:
        total += sizes[bisect.bisect_left(sizes, rest)]
    return total


def _load_malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (returns free heap pages to the OS), or None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load_malloc_trim()


class Admission:
    """The body budget of one application, its FIFO queue, deadlines and preemption.

    Times in seconds (None: no such deadline), sizes in bytes.  One event loop at a time.
    """

    def __init__(
        self,
        pool: BufferPool,
        *,
        budget: int,
        acquire_timeout: float | None,
        body_timeout: float | None,
        body_min_rate: float | None,
        body_grace: float,
        send_timeout: float | None,
        preempt_after: float | None,
        preempt_idle: float,
        idle_trim_after: float | None,
    ) -> None:
        self.pool = pool
        self.budget = budget
        self.acquire_timeout = acquire_timeout
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate
        self.body_grace = body_grace
        self.send_timeout = send_timeout
        self.preempt_after = preempt_after
        self.preempt_idle = preempt_idle
        self.idle_trim_after = idle_trim_after
        limits = [x for x in (body_timeout, send_timeout, preempt_after) if x]
        limits.append(preempt_idle)
        #: Seconds between checks: a quarter of the shortest deadline, 20-250 ms.
        self.tick = max(0.02, min(0.25, min(limits) / 4))
        self.reserved = 0
        self.bodies: set[BodyTicket] = set()
        self._waiters: deque[BodyTicket] = deque()
        self._growers: deque[BodyTicket] = deque()
        self._slot_waiters: set[BodyTicket] = set()
        #: Bodies waiting for their evidence (no reservation, not in the FIFO yet).
        self._unready: dict[BodyTicket, None] = {}
        self._poll_handle: asyncio.TimerHandle | None = None
        self._next_poll = 0.0
        self.sends: set[SendWatch] = set()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._handle: asyncio.TimerHandle | None = None
        self._next_check = 0.0
        self._trim_handle: asyncio.TimerHandle | None = None
        self._dirty = False
        self.admitted = 0
        #: Bumped by every admission and pooled reply: the idle trim waits for it to rest.
        self.activity = 0
        self._trim_seen = -1
        self.counts = dict.fromkeys(
            ("admission_timeouts", "growth_refused", "cut_body_timeout",
             "cut_min_rate", "cut_preempted", "send_aborted_timeout",
             "send_aborted_preempted", "idle_trims", "idle_trimmed_bytes"),
            0,
        )

    # ------------------------------------------------------------------ admission
    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # first use, or the app runs again on another loop
            self.loop = loop
            self._handle = self._trim_handle = self._poll_handle = None
        return loop

    def reserve_now(
        self, stream: BodyStream, reader: FlowControl | None, nbytes: int,
        length: int | None = None,
    ) -> BodyTicket | None:
        """Admit a body of ``nbytes`` reserved bytes (``length`` body bytes, None: unknown)
        now, or None (then ``reserve``): the budget has room, nobody with evidence waits
        ahead, and the body's evidence is in aiohttp's stream or the socket's kernel queue."""
        loop = self.loop
        if loop is None or not loop.is_running():  # (no getpid() per request)
            loop = self._bind()
        if self._waiters or self._growers or self.reserved + nbytes > self.budget:
            return None
        shown = _wire_bytes(stream)
        if shown is not None:
            need = EVIDENCE_BYTES if length is None or length > EVIDENCE_BYTES else length
            if shown < need and not stream.is_eof() and not _queued_enough(  # type: ignore[attr-defined]
                stream, reader, need - shown
            ):
                return None  # reserve() waits for the evidence
        # The hot path of every pooled request: _admit written out.
        ticket = BodyTicket(self, stream, reader)
        self.reserved += nbytes
        ticket.size = nbytes
        ticket.state = READING
        ticket.admitted_at = ticket.last = loop.time()
        self.bodies.add(ticket)
        self.admitted += 1
        self.activity += 1
        self._dirty = True
        if self._handle is None:
            self._next_check = ticket.last + self.tick
            self._handle = loop.call_later(self.tick, self._check)
        return ticket

    def new_hold(self, connection: Any) -> BodyTicket:
        """A connection's hold: one DONE ticket for the whole bodies its requests hold (see
        ``hold_whole``); ``connection.transport`` is watched for write progress (its stream:
        a DONE ticket's stream is never cut).  In ``bodies`` while it holds any; never
        ``release`` it.  When the connection is lost its stream becomes ``DETACHED``."""
        hold = BodyTicket(self, connection, None)
        hold.state = DONE
        return hold

    def hold_whole(self, hold: BodyTicket, nbytes: int) -> bool:
        """Admit a body whose bytes are all in memory already (nothing to wait for, no
        deadline left) into its connection's ``hold``: ``nbytes`` reserved now if the budget
        has room and nobody waits ahead (FIFO), else False.  No ticket per body: the
        common request costs two additions here and two subtractions in ``unhold_whole``.
        While a hold holds bytes, its connection's replies must keep moving
        (``send_timeout``, and ``preempt_idle`` under pressure), as for any whole body."""
        if self._waiters or self._growers or self.reserved + nbytes > self.budget:
            return False
        self.reserved += nbytes
        if not hold.size:
            hold.wsize = 0  # (a new holding period: no stale write-progress mark)
            self.bodies.add(hold)
            if self._handle is None:  # the periodic check also schedules the idle trim
                loop = self.loop
                if loop is None or not loop.is_running():  # (no getpid() per request)
                    loop = self._bind()
                self._next_check = loop.time() + self.tick
                self._handle = loop.call_later(self.tick, self._check)
        hold.size += nbytes
        self.admitted += 1
        self.activity += 1
        self._dirty = True
        return True

    def unhold_whole(self, hold: BodyTicket, nbytes: int) -> None:
        """Give back ``nbytes`` that ``hold_whole`` put in ``hold``; serve waiters in order."""
        self.reserved -= nbytes
        hold.size -= nbytes
        if not hold.size:
            self.bodies.discard(hold)
        if self._growers or self._waiters:
            self._serve()

    def split_hold(self, hold: BodyTicket, nbytes: int, stream: BodyStream) -> BodyTicket:
        """Move ``nbytes`` of ``hold`` to a DONE ticket of their own (``stream``'s), which
        is released as any other: for a body whose memory goes to another owner."""
        ticket = BodyTicket(self, stream, None)
        ticket.state = DONE
        ticket.size = ticket.received = nbytes
        self.bodies.add(ticket)
        hold.size -= nbytes
        if not hold.size:
            self.bodies.discard(hold)
        return ticket

    def _admit(self, ticket: BodyTicket, nbytes: int, now: float) -> None:
        self.reserved += nbytes
        ticket.size = nbytes
        ticket.want = 0
        ticket.state = READING
        ticket.admitted_at = ticket.last = now
        self.bodies.add(ticket)
        self.admitted += 1
        self.activity += 1
        self._dirty = True
        self._arm()

    async def reserve(
        self, stream: BodyStream, reader: FlowControl | None, nbytes: int,
        length: int | None = None,
    ) -> BodyTicket:
        """Admit a body of ``nbytes`` reserved bytes (``length`` body bytes, None: unknown).

        Waits, with the connection's reading paused, first for the body's evidence (no
        reservation meanwhile; BodyCut after ``body_timeout`` without a byte or below
        ``body_min_rate`` after ``body_grace``), then in FIFO order among bodies with
        evidence; AdmissionTimeout ``acquire_timeout`` s after the evidence.
        """
        ticket = self.reserve_now(stream, reader, nbytes, length)
        if ticket is not None:
            return ticket
        ticket = BodyTicket(self, stream, reader)
        need = EVIDENCE_BYTES if length is None else min(length, EVIDENCE_BYTES)
        ticket.need = need
        # (a receive path that pauses its own reading passes reader=None and an fd on its stream)
        ticket.fd = _socket_fd(reader) if reader is not None else getattr(stream, "fd", -1)
        self._evidence(ticket)
        if not ticket.need and not self._waiters and not self._growers and (
            self.reserved + nbytes <= self.budget
        ):  # the bytes were in the kernel: admitted with no wait and no pause
            self._admit(ticket, nbytes, self.loop.time())
            return ticket
        if ticket.need:
            await self._wait(ticket, nbytes, None)
        else:
            await self._wait(ticket, nbytes, self._waiters)
        return ticket

    def _evidence(self, ticket: BodyTicket, kernel: bool = True) -> bool:
        """Update ``ticket.shown``/``need`` from the stream and (``kernel``) the socket's
        receive queue; True if the client sent a byte since the last look."""
        stream: Any = ticket.stream
        shown = _wire_bytes(stream)
        if shown is None or stream.is_eof() or stream.exception() is not None:
            ticket.need = 0  # (a failed stream: reading it raises the failure at once)
            return True
        if not kernel:
            pass  # poll found nothing readable: the kernel's queue is empty
        elif ticket.fd >= 0 and _FIONREAD is not None:
            try:
                shown += struct.unpack("i", fcntl.ioctl(ticket.fd, _FIONREAD, _ZERO))[0]
            except OSError:  # closed meanwhile: the stream's own error ends the wait
                pass
        moved = shown != ticket.shown
        ticket.shown = shown
        if shown >= ticket.need:
            ticket.need = 0
        return bool(moved)

    def grow_now(self, ticket: BodyTicket, nbytes: int) -> bool:
        """Add ``nbytes`` to an admitted body's reservation now if it fits."""
        if self._growers or self.reserved + nbytes > self.budget:
            return False
        self.reserved += nbytes
        ticket.size += nbytes
        return True

    async def grow(self, ticket: BodyTicket, nbytes: int) -> None:
        """Add ``nbytes`` to ``ticket``'s reservation, waiting ahead of new admissions.

        GrowthRefused when no other admitted body is moving (all that hold the budget
        wait themselves): waiting could never end.  AdmissionTimeout after the timeout.
        """
        if self.grow_now(ticket, nbytes):
            return
        if not any(b is not ticket and b.state != WAITING for b in self.bodies):
            self.counts["growth_refused"] += 1
            raise GrowthRefused(
                f"a body of unknown length needs {nbytes} more bytes but the body budget "
                f"({self.budget} bytes) is held by bodies that wait themselves"
            )
        self._slot_waiters.discard(ticket)
        await self._wait(ticket, nbytes, self._growers)

    async def _wait(
        self, ticket: BodyTicket, nbytes: int, queue: deque[BodyTicket] | None
    ) -> None:
        """Wait in ``queue`` (None: for the evidence first, then in ``_waiters``)."""
        loop = self.loop
        fut: asyncio.Future[None] = loop.create_future()
        ticket.fut = fut
        ticket.want = nbytes
        was = ticket.state
        ticket.state = WAITING
        ticket.queued_at = ticket.last = loop.time()
        if queue is None:
            self._unready[ticket] = None
            self._arm_poll()
        else:
            queue.append(ticket)
            if queue is self._waiters:
                self._serve()  # evident only now (the kernel's queue): it may fit at once
        self._arm()
        reader = ticket.reader
        # Paused at once, unless it waits for evidence and its bytes could not be seen
        # while paused (TLS: they would sit decrypted-to-be in the TLS layer, not in the
        # kernel): then aiohttp reads until the evidence is in its stream (at most its own
        # 2 x read_bufsize high-water mark) and the connection is paused on promotion.
        ticket.paused = _pause(reader) if queue is not None or ticket.fd >= 0 else False
        try:
            async with asyncio.timeout(
                self.acquire_timeout if queue is not None else None
            ) as timer:
                ticket.timer = timer
                await fut
        except BaseException as exc:
            granted = fut.done() and not fut.cancelled() and fut.exception() is None
            if not granted:
                fut.cancel()
                self._unready.pop(ticket, None)
                for q in (self._waiters, self._growers):
                    try:
                        q.remove(ticket)
                    except ValueError:
                        pass
                if isinstance(exc, BodyCut):
                    raise
                ticket.state = was if queue is self._growers else RELEASED
                self._serve()  # those behind it may fit now
                if isinstance(exc, TimeoutError):
                    self.counts["admission_timeouts"] += 1
                    raise AdmissionTimeout(
                        f"no room for {nbytes} bytes within acquire_timeout="
                        f"{self.acquire_timeout} s (body budget {self.budget} bytes, "
                        f"{self.reserved} reserved, {len(self._waiters)} bodies waiting)"
                    ) from None
                raise
            if not isinstance(exc, TimeoutError):  # cancelled after the grant: give back
                if queue is not self._growers:  # (a grower's ticket stays its body's)
                    self.release(ticket)
                raise
        finally:
            ticket.fut = None
            ticket.timer = None
            if ticket.paused:
                ticket.paused = False
                _resume(reader)

    def release(self, ticket: BodyTicket) -> None:
        """Give the body's reservation back (idempotent) and serve waiters in order."""
        if ticket.state == RELEASED:
            return
        ticket.state = RELEASED
        if self._slot_waiters:
            self._slot_waiters.discard(ticket)
        if ticket in self.bodies:
            self.bodies.discard(ticket)
            self.reserved -= ticket.size
        ticket.size = 0
        if self._growers or self._waiters:
            self._serve()

    def _serve(self) -> None:
        budget = self.budget
        now = self.loop.time()
        growers = self._growers
        while growers:
            t = growers[0]
            if t.fut is None or t.fut.done():
                growers.popleft()
                continue
            if self.reserved + t.want > budget:
                return  # growth first: nothing overtakes a waiting grower
            growers.popleft()
            self.reserved += t.want
            t.size += t.want
            t.want = 0
            t.state = READING
            t.admitted_at += now - t.queued_at
            t.last = now
            t.fut.set_result(None)
        waiters = self._waiters
        while waiters:
            t = waiters[0]
            if t.fut is None or t.fut.done():
                waiters.popleft()
                continue
            if self.reserved + t.want > budget:
                return
            waiters.popleft()
            self._admit(t, t.want, now)
            t.fut.set_result(None)

    def _arm_poll(self) -> None:
        if self._poll_handle is None:
            self._next_poll = self.loop.time() + EVIDENCE_POLL
            self._poll_handle = self.loop.call_later(EVIDENCE_POLL, self._poll)

    def _poll(self) -> None:
        """Look at the bodies waiting for evidence: promote those that showed it (to the
        end of the FIFO, whose ``acquire_timeout`` starts now), cut those past a deadline."""
        self._poll_handle = None
        now = self.loop.time()
        lag = now - self._next_poll
        timeout = self.body_timeout
        rate = self.body_min_rate
        grace = self.body_grace
        promoted = False
        events = _readable([t.fd for t in self._unready])
        for t in list(self._unready):
            fut = t.fut
            if fut is None or fut.done():
                self._unready.pop(t, None)
                continue
            if lag > EVIDENCE_POLL:  # this process did not run: not the client's doing
                t.last += lag
                t.queued_at += lag
            ev = _POLL_ALL if events is None else events.get(t.fd, 0)
            if ev & _POLL_GONE:
                # The client hung up (or half-closed): let aiohttp read what is left and
                # see the end; the stream then ends or fails, and the body is let through
                # to meet that at once.
                _resume(t.reader)
                t.need = 0
            elif self._evidence(t, bool(ev & select.POLLIN)):
                t.last = now
            if not t.need:
                del self._unready[t]
                if not t.paused:
                    t.paused = _pause(t.reader)
                t.queued_at = now  # pressure counts from here
                if t.timer is not None and self.acquire_timeout is not None:
                    t.timer.reschedule(now + self.acquire_timeout)
                self._waiters.append(t)
                promoted = True
            elif timeout is not None and now - t.last > timeout:
                self._cut_waiting(t, "body_timeout", _idle_text(timeout, t.shown))
            elif rate and now > t.queued_at + grace + t.shown / rate:
                self._cut_waiting(t, "min_rate",
                                  _slow_text(rate, grace, t.shown, now - t.queued_at))
        if promoted:
            self._serve()
        if self._unready:
            self._arm_poll()

    def _cut_waiting(self, ticket: BodyTicket, reason: str, message: str) -> None:
        del self._unready[ticket]
        self._cut(ticket, reason, message)
        assert ticket.fut is not None
        ticket.fut.set_exception(BodyCut(reason, message))

    # ------------------------------------------------------------------ replies
    def watch_send(self, transport: asyncio.WriteTransport, nbytes: int) -> SendWatch:
        """Track a pooled reply of ``nbytes`` being written (write deadline, preemption).

        The writer adds to ``watch.written`` as it hands bytes over and sets
        ``watch.finished`` at the end; the watch drops itself once the transport drained.
        """
        loop = self.loop
        if loop is None or not loop.is_running():  # (no getpid() per request)
            loop = self._bind()
        watch = SendWatch(transport, nbytes, -1.0)  # the next check starts its clock
        self.sends.add(watch)
        self.activity += 1
        self._dirty = True
        if self._handle is None:
            self._arm()
        return watch

    # ------------------------------------------------------------------ deadlines
    def _arm(self) -> None:
        if self._handle is None and self.loop is not None:
            self._next_check = self.loop.time() + self.tick
            self._handle = self.loop.call_later(self.tick, self._check)

    def _cut(self, ticket: BodyTicket, reason: str, message: str) -> None:
        ticket.state = CUT
        self.counts[f"cut_{reason}"] += 1
        log.info("bufpool: request body cut: %s", message)
        ticket.stream.set_exception(BodyCut(reason, message))

    def _watch_done(self, t: BodyTicket, now: float, send_timeout: float | None) -> None:
        """A whole (or held) body's request still holds its memory: while its connection's write
        buffer holds bytes that do not move (the client does not read its replies, whatever
        they are: pooled, copied or plain), nginx's ``send_timeout`` applies, so such a
        client cannot keep a body's reservation (an idle buffer is a handler at work)."""
        tr = _ticket_transport(t)
        if tr is None or tr.is_closing():
            return
        size = tr.get_write_buffer_size()
        if not size or size != t.wsize:
            t.wsize = size
            t.wlast = now
        elif send_timeout is not None and now - t.wlast > send_timeout:
            self._abort_holder(t, tr, "timeout",
                               f"no write progress for send_timeout={send_timeout} s while "
                               f"the request holds {t.size} bytes of body memory")

    def _abort_holder(
        self, t: BodyTicket, tr: asyncio.WriteTransport, reason: str, message: str
    ) -> None:
        t.wsize = 0
        self._abort_transport(tr, reason, f"connection aborted: {message}")

    def _abort(self, watch: SendWatch, reason: str, message: str) -> None:
        self.sends.discard(watch)
        self._abort_transport(watch.transport, reason, f"pooled reply aborted: {message}")

    def _abort_transport(self, tr: asyncio.WriteTransport, reason: str, message: str) -> None:
        """Abort a connection whose writes stalled (``reason``: timeout or preempted)."""
        self.counts[f"send_aborted_{reason}"] += 1
        log.info("bufpool: %s", message)
        tr.abort()

    def _check(self) -> None:
        self._handle = None
        now = self.loop.time()
        # A check that comes late means this process did not run (CPU contention, a long
        # callback, GC): that stall is the server's, so no client is charged with it.
        lag = now - self._next_check
        if lag > self.tick:
            for t in self.bodies:
                t.last += lag
                t.admitted_at += lag
                t.mark_at += lag
                t.wlast += lag
            for w in self.sends:
                w.last += lag
        timeout = self.body_timeout
        rate = self.body_min_rate
        grace = self.body_grace
        window = self.preempt_idle
        send_timeout = self.send_timeout
        for t in list(self.bodies):
            if t.state != READING:
                if t.state == DONE:
                    self._watch_done(t, now, send_timeout)
                elif t.state == HELD:
                    if not _still_held(t):
                        t.unhold()
                    else:  # held by a full queue: its replies must still move
                        self._watch_done(t, now, send_timeout)
                continue
            if not hasattr(t, "base"):  # the first look since admission (see _cut_unmoved)
                t.base = max(t.received, EVIDENCE_BYTES)
                t.looked = now - t.admitted_at
            if t.mark_at < t.admitted_at:  # admitted, or back from a wait: a new window
                t.mark_at = t.admitted_at
                t.mark = t.received
            elif rate and now - t.mark_at >= window:
                t.slow = t.received - t.mark < rate * (now - t.mark_at)
                t.mark = t.received
                t.mark_at = now
            if t.received != t.seen:
                t.seen = t.received
                t.last = now
            elif timeout is not None and now - t.last > timeout:
                self._cut(t, "body_timeout", _idle_text(timeout, t.received))
            elif rate and now > t.admitted_at + grace + t.received / rate:
                self._cut(t, "min_rate", _slow_text(rate, grace, t.received, now - t.admitted_at))
        for w in list(self.sends):
            tr = w.transport
            if tr.is_closing():
                self.sends.discard(w)
                continue
            size = tr.get_write_buffer_size()
            if w.last < 0:
                w.last = now
            if w.finished and size == 0:
                self.sends.discard(w)
            elif size != w.last_size or w.written != w.seen:
                w.last_size = size
                w.seen = w.written
                w.last = now
            elif send_timeout is not None and now - w.last > send_timeout:
                self._abort(w, "timeout",
                            f"no write progress for send_timeout={send_timeout} s "
                            f"({w.pinned()} pooled bytes unsent)")
        if self.preempt_after is not None:
            self._preempt(now)
        if self.bodies or self._waiters or self._growers or self.sends or self._unready:
            self._arm()
        elif self._dirty and self.idle_trim_after is not None and self._trim_handle is None:
            self._trim_seen = self.activity
            self._trim_handle = self.loop.call_later(self.idle_trim_after, self._idle_trim)

    def _preempt(self, now: float) -> None:
        after = self.preempt_after
        assert after is not None
        waiting = [t for t in (*self._growers, *self._waiters) if t.fut is not None
                   and not t.fut.done()]
        if not waiting and not self._slot_waiters:
            return
        self._cut_unmoved(now, after)
        pressed = [t for t in waiting if now - t.queued_at >= after]
        slot_pressed = any(now - t.queued_at >= after for t in self._slot_waiters)
        if not pressed and not slot_pressed:
            return
        idle = self.preempt_idle
        # Replies that do not move pin pool memory: abort them under any pressure.
        for w in list(self.sends):
            if now - w.last >= idle and w.last_size != 0:
                self._abort(w, "preempted",
                            f"no write progress for {now - w.last:.1f} s under memory pressure "
                            f"(preempt_idle={idle} s; {w.pinned()} pooled bytes unsent)")
        # Requests holding whole bodies whose replies do not move: the same (their memory
        # comes back when the connection goes).
        for t in list(self.bodies):
            if t.state == DONE and t.wsize and now - t.wlast >= idle:
                tr = _ticket_transport(t)
                if tr is not None and not tr.is_closing():
                    self._abort_holder(t, tr, "preempted",
                                       f"no write progress for {now - t.wlast:.1f} s under "
                                       f"memory pressure while the request holds {t.size} "
                                       f"bytes of body memory (preempt_idle={idle} s)")
        rate = self.body_min_rate
        stalled = [
            t for t in self.bodies if (t.state == READING and (
                now - t.last >= idle
                or (rate and (t.slow or now > t.admitted_at + idle + t.received / rate))
            )) or (t.state == HELD and now - t.last >= idle)
        ]
        # (A held body is exempt from deadlines only while nobody needs its memory: a client
        # that fills aiohttp's queue and never reads its replies could otherwise hold one.)
        # Under pressure every body deadline shrinks to preempt_idle (Envoy's reduce_timeouts);
        # those holding the most unfilled reservation go first (reset_high_memory_stream).
        stalled.sort(key=lambda t: t.size - t.received, reverse=True)
        for t in stalled:
            self._cut(t, "preempted",
                      f"request body stalled under memory pressure: {t.received} bytes in "
                      f"{now - t.admitted_at:.1f} s, none for {now - t.last:.1f} s"
                      + (" or below body_min_rate over the last preempt_idle" if t.slow else "")
                      + f" (preempt_idle={idle} s, body_min_rate={rate} bytes/s)")

    def _cut_unmoved(self, now: float, after: float) -> None:
        """A body waits for memory (for any time): cut every admitted body that, in the
        ``after`` (preempt_after) seconds or more since it was first looked at, received less
        than ``body_min_rate`` bytes/s beyond what admitted it (nothing at all without a
        rate), those holding the most unfilled reservation first.

        The cheapest pinning attack once heads must show EVIDENCE_BYTES: send them, then
        nothing, and hold the whole declared length.  Such a body has not moved since it was
        admitted; an honest one moves at once (its bytes wait in the kernel while it waits,
        or it is sending at line rate).  No ``preempt_after`` of pressure first and no
        ``preempt_idle`` of silence: it waited its ``after`` already.  O(bodies).
        """
        rate = self.body_min_rate or 0.0
        unmoved: list[tuple[BodyTicket, float]] = []
        for t in self.bodies:
            if t.state != READING:
                continue
            try:
                base = t.base
            except AttributeError:  # not looked at yet: its time starts at the first look
                continue
            elapsed = now - t.admitted_at - t.looked  # waits and server stalls excluded
            if elapsed >= after and t.received - base < max(1.0, rate * elapsed):
                unmoved.append((t, elapsed))
        unmoved.sort(key=lambda te: te[0].size - te[0].received, reverse=True)
        floor = f"body_min_rate={rate:g} bytes/s" if rate else "no byte"
        for t, elapsed in unmoved:
            self._cut(t, "preempted",
                      f"request body did not move after its admission, under memory pressure: "
                      f"{max(0, t.received - t.base)} bytes in {elapsed:.1f} s after the "
                      f"{t.base} that admitted it (below {floor} since admission, "
                      f"preempt_after={after} s)")

    def _idle_trim(self) -> None:
        """Runs ``idle_trim_after`` s after a check found nothing tracked: trims if nothing
        was admitted or sent since (else waits another period)."""
        self._trim_handle = None
        if self.bodies or self._waiters or self._growers or self.sends or self._unready:
            return  # busy again: the next quiet check re-arms this
        assert self.idle_trim_after is not None
        if self.activity != self._trim_seen:
            self._trim_seen = self.activity
            self._trim_handle = self.loop.call_later(self.idle_trim_after, self._idle_trim)
            return
        self._dirty = False
        freed = self.pool.trim()
        if _malloc_trim is not None:
            _malloc_trim(0)
        self.counts["idle_trims"] += 1
        self.counts["idle_trimmed_bytes"] += freed

    def close(self) -> None:
        """Stop the timers (application shutdown)."""
        for handle in (self._handle, self._trim_handle, self._poll_handle):
            if handle is not None:
                handle.cancel()
        self._handle = self._trim_handle = self._poll_handle = None

    def stats(self) -> AdmissionStats:
        c = self.counts
        waiting = [t for t in (*self._waiters, *self._growers) if t.fut and not t.fut.done()]
        return AdmissionStats(
            budget=self.budget,
            reserved_bytes=self.reserved,
            bodies=len(self.bodies),
            waiting=len(waiting) + len(self._slot_waiters) + len(self._unready),
            waiting_bytes=sum(t.want for t in waiting),
            waiting_for_evidence=len(self._unready),
            admitted=self.admitted,
            admission_timeouts=c["admission_timeouts"],
            growth_refused=c["growth_refused"],
            cut_body_timeout=c["cut_body_timeout"],
            cut_min_rate=c["cut_min_rate"],
            cut_preempted=c["cut_preempted"],
            replies_sending=len(self.sends),
            reply_bytes_pinned=sum(w.pinned() for w in self.sends),
            send_aborted_timeout=c["send_aborted_timeout"],
            send_aborted_preempted=c["send_aborted_preempted"],
            idle_trims=c["idle_trims"],
            idle_trimmed_bytes=c["idle_trimmed_bytes"],
        )


_POLL_GONE: Final = getattr(select, "POLLRDHUP", 0) | select.POLLERR | select.POLLHUP
_POLL_ALL: Final = select.POLLIN


def _readable(fds: list[int]) -> dict[int, int] | None:
    """``poll`` events of the sockets ``fds`` (one system call), or None without poll."""
    if not hasattr(select, "poll"):
        return None
    p = select.poll()
    mask = select.POLLIN | _POLL_GONE
    for fd in fds:
        if fd >= 0:
            p.register(fd, mask)
    return dict(p.poll(0))


def _idle_text(timeout: float, received: int) -> str:
    """The 408 text of ``body_timeout`` (``received``: body bytes so far)."""
    return f"no request body bytes for body_timeout={timeout} s ({received} bytes received)"


def _slow_text(rate: float, grace: float, received: int, seconds: float) -> str:
    """The 408 text of ``body_min_rate`` after ``body_grace``."""
    return (
        f"request body slower than body_min_rate={rate:g} bytes/s after body_grace={grace:g} s "
        f"({received} bytes in {seconds:.1f} s)"
    )


def _ticket_transport(ticket: BodyTicket) -> Any:
    """The connection a body came on: its stream's ``transport`` (the zero-copy receive
    path) or its reader's (aiohttp's ``RequestHandler``); None if neither says."""
    tr = getattr(ticket.stream, "transport", None)
    if tr is None and ticket.reader is not None:
        tr = getattr(ticket.reader, "transport", None)
    return tr


def _still_held(ticket: BodyTicket) -> bool:
    """Whether the server still holds a held ticket's connection (its stream says; a stream
    that cannot tell is taken as released, so no body stays exempt by mistake)."""
    held = getattr(ticket.stream, "held", None)
    return bool(held()) if held is not None else False


def _wire_bytes(stream: Any) -> int | None:
    """Body bytes ``stream`` has taken in as they came on the wire (for a Content-Encoding
    body the compressed ones, aiohttp's ``total_compressed_bytes``; decompressed output can
    lag them), or None if it does not count them.  They are what the socket's queue adds to
    and what a Content-Length measures."""
    shown = getattr(stream, "total_bytes", None)
    if shown is None:
        return None
    compressed = getattr(stream, "total_compressed_bytes", None)
    return shown if compressed is None else int(compressed)


def _queued_enough(stream: Any, reader: FlowControl | None, need: int) -> bool:
    """True if the connection's kernel receive queue holds at least ``need`` bytes (one
    ``ioctl``; the socket is the stream's ``fd`` or the reader's transport's)."""
    if _FIONREAD is None:
        return False
    fd = getattr(stream, "fd", None)
    if fd is None:
        fd = _socket_fd(reader) if reader is not None else -1
    if fd < 0:
        return False
    try:
        queued: int = struct.unpack("i", fcntl.ioctl(fd, _FIONREAD, _ZERO))[0]
    except OSError:
        return False
    return queued >= need


def _socket_fd(reader: FlowControl | None) -> int:
    """The connection's socket descriptor (-1 if there is none, or its bytes are TLS records
    that the TLS layer reads ahead of the application)."""
    transport = getattr(reader, "transport", None)
    if transport is None or _FIONREAD is None or transport.get_extra_info("ssl_object"):
        return -1
    sock = transport.get_extra_info("socket")
    try:
        return int(sock.fileno()) if sock is not None else -1
    except (AttributeError, OSError, ValueError):
        return -1


def _pause(reader: FlowControl | None) -> bool:
    """Pause the connection's reading (aiohttp's own flow control); True if paused."""
    if reader is None or reader.transport is None:
        return False
    try:
        reader.pause_reading()
    except (AssertionError, RuntimeError, NotImplementedError):
        return False
    return True


def _resume(reader: FlowControl | None) -> None:
    if reader is None or reader.transport is None:
        return
    try:
        reader.resume_reading()
    except (AssertionError, RuntimeError, NotImplementedError):
        pass
