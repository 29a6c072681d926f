"""Zero-copy receive for aiohttp: request bodies written by the kernel into pool slots.

``ZeroCopyProtocol`` is an ``asyncio.BufferedProtocol`` that *wraps* aiohttp's
``RequestHandler`` (uvloop calls ``get_buffer`` only on protocols that are not
``asyncio.Protocol`` instances, and ``RequestHandler`` is one).  Per request:

* The head is received into a small per-server scratch buffer, its end found at the first
  ``CRLF CRLF``, and exactly those bytes parsed by aiohttp's own ``HttpRequestParser`` built
  with ``response_with_body=False`` (same limits as the handler's parser; llhttp then ends the
  message at the head).
* A plain Content-Length body (no Transfer-Encoding, Content-Encoding, Upgrade/CONNECT,
  Expect other than ``100-continue``, within ``max_body_size``) gets a ``ReceivedBody``: the
  message is queued on the handler at once (as aiohttp does), and ``get_buffer`` returns the
  free part of the body's current slot, leased one slot at a time as room is needed.
* Every other request goes through the handler's own parser, byte for byte: with a known
  length (Content-Encoding, other Expect, oversize) the bytes up to its end are fed to
  ``handler.data_received`` and the fast path resumes once that parser completed the message;
  chunked, upgrades, parse errors, bare LF and heads longer than ``max_head_size`` hand the
  rest of the connection to it (``PASSTHROUGH``).  Answers are therefore aiohttp's own.

Memory and deadlines: the application's ``Admission`` (``AdmittedSlots``), exactly as for
``read_body`` on aiohttp's parser: a body's slot reservation is admitted in FIFO order when its
head is parsed (an ``Expect: 100-continue`` body's when the handler asks for it or its first
byte arrives), reading paused while it waits; slots are leased as bytes arrive; the body is cut
with 408 by ``body_timeout`` / ``body_min_rate`` / preemption (``setup()``'s defaults) and gets
503 after ``acquire_timeout``.  A cut closes the connection lingering (``_LingeringClose``).
Once a body is read as a stream it holds no pool memory and is aiohttp's ``StreamReader``; the
unread rest of a body after its request is bounded by aiohttp's own lingering read
(``lingering_time``) and close.  Bounds: O(bytes) work;
head search resumes where it stopped (no rescans); memory per connection: the partial head
(at most ``max_head_size``) and, per body, what arrived plus one slot.

aiohttp internals used are listed and checked in ``_compat`` at startup; when any is missing
or behaves differently the server runs aiohttp's normal path and logs one line.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http import HttpProcessingError, HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_server import Server

from ._admission import DETACHED, EVIDENCE_BYTES, READING, BodyCut, BodyTicket
from ._chunked import ChunkScanner
from ._compat import check_internals
from ._headscan import scan_head
from ._linger import LingeringClose as _LingeringClose
from ._linger import close_lingering
from ._received import AdmittedSlots, ReceivedBody, SlotSource
from ._settings import Settings

__all__ = [
    "RECEIVE_KEY",
    "ReceiveOptions",
    "ReceiveState",
    "ZeroCopyProtocol",
    "install",
    "received_body",
]

log = logging.getLogger("bufpool.aiohttp")

#: Bytes of the per-server scratch buffer heads (and bytes behind them) are received into:
#: a body of up to 16 KiB behind a head of up to 4 KiB arrives whole in one read, and is
#: then admitted and copied into its slot in one step.
SCRATCH_SIZE: Final = 20 * 1024


@dataclass(frozen=True, slots=True)
class ReceiveOptions:
    """Knobs of the zero-copy receive path, in bytes.  Its bodies' deadlines and memory are
    ``setup()``'s (``body_timeout``, ``body_min_rate``, ``acquire_timeout`` ...)."""

    #: Longest head searched for its end; longer heads go to aiohttp's parser, which applies
    #: its own limits (max_line_size, max_field_size, max_headers).
    max_head_size: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.max_head_size < 1024:
            raise ValueError(f"max_head_size must be >= 1024 bytes, got {self.max_head_size!r}")


@dataclass(slots=True)
class ReceiveState:
    """Whether the fast path runs for this application, and what it did (counters)."""

    options: ReceiveOptions
    #: None until the server is built; then True, or False with ``reason``.
    active: bool | None = None
    reason: str = ""
    #: Requests whose body (or lack of one) went the fast path.
    fast: int = 0
    #: Requests fed to aiohttp's parser with a known end (the fast path resumed after).
    forwarded: int = 0
    #: Connections handed to aiohttp's parser for good (chunked, upgrade, parse error ...).
    passthrough: int = 0
    #: Fast-path bodies cut by the admission's deadlines or preemption (408).
    timeouts: int = 0


#: ``app[RECEIVE_KEY]``: the ReceiveState of an application set up with zero_copy_receive.
RECEIVE_KEY: Final = web.AppKey("bufpool.aiohttp.receive", ReceiveState)


class _Context:
    """Shared by one server's connections (one event loop)."""

    __slots__ = (
        "largest", "limit", "loop", "max_body", "options", "scratch", "scratch_buf", "slots",
        "state",
    )

    def __init__(
        self, settings: Settings, state: ReceiveState, slots: SlotSource, limit: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.state = state
        self.options = state.options
        self.slots = slots
        self.largest = settings.largest
        self.max_body = settings.max_body_size
        self.limit = limit
        self.loop = loop
        self.scratch_buf = bytearray(SCRATCH_SIZE)
        self.scratch = memoryview(self.scratch_buf)


class _Handler(RequestHandler):
    """aiohttp's ``RequestHandler`` (the same object, its class swapped: no new fields) whose
    own resumes of reading respect the wrapping protocol's pauses.

    aiohttp resumes the transport itself once its queue of pipelined requests drains, or a
    payload's reader takes its buffered bytes, whatever else paused it.  A connection that
    the protocol paused (a head waiting for BODIES_AHEAD, a message waiting for aiohttp's
    parser, a body waiting for a slot) would then read on, one read per resume, into its
    pending bytes: a client that refills aiohttp's queue with GETs from those pending bytes
    grew them without bound (an attacker review: 1.55 MB from 1.6 MB sent, and quadratic
    parsing).  The protocol resumes reading itself when its pause ends (``_pause``).
    """

    __slots__ = ()

    def _resume_transport_reading(self) -> None:
        transport = self.transport
        if transport is not None:
            protocol = transport.get_protocol()
            if type(protocol) is ZeroCopyProtocol and (
                protocol._paused or protocol._stream_paused
            ):
                return
        super()._resume_transport_reading()


class ZeroCopyServer(Server):
    """aiohttp's ``Server`` whose protocol factory wraps each ``RequestHandler``."""

    _bufpool_receive: _Context

    def __call__(self) -> ZeroCopyProtocol:  # type: ignore[override]
        handler = Server.__call__(self)
        if type(handler) is RequestHandler:
            handler.__class__ = _Handler
        return ZeroCopyProtocol(handler, self._bufpool_receive)


# Connection states.
HEAD: Final = 0  # between messages / inside a head
BODY: Final = 1  # receiving a ReceivedBody
FORWARD: Final = 2  # feeding one message with a known end to aiohttp's parser
VERIFY: Final = 3  # waiting for aiohttp's parser to complete that message
DISCARD: Final = 4  # dropping the rest of an abandoned body
PASSTHROUGH: Final = 5  # everything goes to aiohttp's parser, for good
DEAD: Final = 6  # failed; the connection closes after the response
AHEAD: Final = 7  # a head waits (reading paused) until a queued body goes: see BODIES_AHEAD

#: Bodies a connection may hold in memory at once (the request being handled and one queued
#: behind it) before the next head waits, its reading paused: a client that pipelines
#: uploads behind a slow handler holds two bodies, not aiohttp's queue of 32 (nginx and Go's
#: http.Server read the next request only once the current one is done).
BODIES_AHEAD: Final = 2

_CRLF2: Final = b"\r\n\r\n"
#: ``_probe_head``'s verdicts on an unfinished head (0: aiohttp's parser waits for more).
_HEAD_FAILS: Final = 1
_HEAD_ENDS: Final = 2

#: What the stream-processing methods accept: a read's bytes, the pending head, or a view
#: of the scratch buffer.
_Buf = bytes | bytearray | memoryview


class ZeroCopyProtocol(asyncio.BufferedProtocol):
    """One connection: receives heads into scratch and bodies into slots, queues requests
    on the wrapped ``RequestHandler`` (which runs them as usual)."""

    __slots__ = (
        "_batch",
        "_body",
        "_chunks",
        "_ctx",
        "_discard_left",
        "_fwd_left",
        "_fwd_payload",
        "_handler",
        "_head_probe",
        "_into_slot",
        "_live",
        "_parser",
        "_paused",
        "_pending",
        "_probed",
        "_rest_ok",
        "_scan",
        "_state",
        "_stream_paused",
        "_transport",
        "_waiting",
        "hold",
        "slots",
    )

    def __init__(self, handler: RequestHandler, ctx: _Context) -> None:
        self._handler = handler
        self._ctx = ctx
        self.slots = ctx.slots
        self._parser = HttpRequestParser(
            handler, ctx.loop, ctx.limit,
            max_line_size=handler.max_line_size,
            max_field_size=handler.max_field_size,
            max_headers=handler.max_headers,
            payload_exception=RequestPayloadError,
            response_with_body=False,
            auto_decompress=False,
        )
        self._state = HEAD
        self._body: ReceivedBody | None = None
        #: Bodies that may still hold slots (insertion-ordered; taken and failed ones leave).
        self._live: dict[ReceivedBody, None] = {}
        #: (start, message, payload) queued during the current ``_feed`` (see _passthrough).
        self._batch: list[tuple[int, Any, Any]] | None = None
        self._pending = bytearray()
        #: True while ``_pending`` is known to parse cleanly from its start (see _feed).
        self._rest_ok = False
        self._scan = 0
        #: aiohttp's verdict on the unfinished head in ``_pending`` so far (see _probe_head):
        #: its parser, and how many of the head's bytes it was fed.
        self._head_probe: HttpRequestParser | None = None
        self._probed = 0
        self._into_slot = False
        self._fwd_left = 0
        self._fwd_payload: Any = None
        self._chunks: ChunkScanner | None = None
        self._discard_left = 0
        self._transport: asyncio.Transport | None = None
        self._paused = False  # paused by this protocol (slot wait, verify, stream backlog)
        self._stream_paused = False
        self._waiting: set[asyncio.Task[None]] = set()
        #: The admission's hold for this connection's whole bodies (made by ``slots`` at the
        #: first one; see ``Admission.hold_whole``).
        self.hold: BodyTicket | None = None

    @property
    def transport(self) -> asyncio.Transport | None:
        """The connection (None once lost): what the admission watches while ``hold``
        holds memory (its replies must keep moving)."""
        return self._transport

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._handler.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._handler.connection_lost(exc)
        self._state = DEAD
        self._transport = None
        hold = self.hold
        if hold is not None:  # (its stream was this connection: no cycle left behind)
            hold.stream = DETACHED
        for task in self._waiting:
            task.cancel()
        lost = ConnectionResetError("Connection lost")
        live, self._live = self._live, {}
        for body in live:
            if not body.taken:
                body.fail(lost)
            elif body.kept:  # read_body's: released once the handler is done with it
                body.release_kept_after_task()
        self._body = None
        self._pending = bytearray()

    def eof_received(self) -> bool | None:
        if self._state == DEAD and self._transport is not None:
            self._transport.close()  # the lingering close is over: the peer ended its side
            return True
        self._handler.eof_received()
        return None

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state == BODY:
            body = self._body
            assert body is not None
            view = body.slot_view()
            if view is not None:
                self._into_slot = True
                return view
            self._into_slot = False
            remaining = body.remaining
            scratch = self._ctx.scratch
            return scratch if remaining >= len(scratch) else scratch[:remaining]
        self._into_slot = False
        return self._ctx.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._into_slot:
            self._into_slot = False
            body = self._body
            assert body is not None
            if body.slot_filled(nbytes):
                self._body_arrived()
            return
        state = self._state
        data = self._ctx.scratch[:nbytes]
        if state == BODY:
            body = self._body
            assert body is not None
            if body.bytes_arrived(data):
                self._body_arrived()
            if body.needs_slot:
                self._want_slot(body)
        elif state == PASSTHROUGH:
            self._handler.data_received(bytes(data))
        elif (state == HEAD and not self._pending and len(self._live) < BODIES_AHEAD
              and self._head_then_body(data, nbytes)):
            return
        elif state != DEAD:
            self._feed(bytes(data))

    def _head_then_body(self, data: memoryview, nbytes: int) -> bool:
        """The common read: one whole head and the start of its fast-path body, nothing
        after it (``scan_head``).  Handled in the scratch buffer (no copy of the read);
        False: let ``_feed`` do it."""
        scratch = self._ctx.scratch_buf
        end = scan_head(scratch, nbytes)
        if end < 0:
            return False
        # (One head, and no bytes after its body: no later request in this read can fail,
        # so nothing would be taken back; no batch.)
        # A bytearray slice of the scratch buffer (aiohttp's C parser turns it into bytes:
        # two small copies, as fast as bytes(data[:end])); what the parser keeps of it is
        # bytes (checked by _compat).  No bare LF: scan_head checked.
        i = self._route(scratch[:end], data, 0, end)
        if i < nbytes and self._state == BODY:
            body = self._body
            assert body is not None
            if body.bytes_arrived(data[i:nbytes]):
                self._body_arrived()
            if body.needs_slot:
                self._want_slot(body)
        elif i < nbytes:
            self._feed(bytes(data[i:nbytes]))
        return True

    # ------------------------------------------------------------ the byte stream
    def _feed(self, data: bytes) -> None:
        """Process bytes that arrived outside a slot, in order, across message boundaries."""
        handler = self._handler
        if handler._close or handler._force_close:
            return  # aiohttp ignores input once closing, so do we
        if data:
            self._rest_ok = False  # (new bytes: the rest of the stream is unchecked again)
        pending = self._pending
        buf: bytes | bytearray
        if pending:
            pending += data
            buf = pending
        else:
            buf = data
        i = 0
        n = len(buf)
        self._batch = []
        while i < n:
            state = self._state
            if state == HEAD:
                end = buf.find(_CRLF2, max(i, self._scan))
                if end < 0:
                    if n - i > self._ctx.options.max_head_size:
                        i = self._passthrough(buf, i)
                    else:
                        verdict = self._probe_head(buf, i, n)
                        if verdict:
                            # aiohttp's parser already rejects this head before its end (and,
                            # after requests it completed in this read, answers none of them),
                            # or ends it without a CRLF CRLF: the same answer, at once.  The
                            # client may still be sending its head: its 400 closes lingering,
                            # so that it reads the answer rather than a reset.
                            if verdict == _HEAD_FAILS:
                                close_lingering(self._handler)
                            i = self._passthrough(buf, i, fails=verdict == _HEAD_FAILS)
                        else:
                            self._scan = max(i, n - 3)
                    break
                self._scan = 0
                self._head_probe = None
                if len(self._live) >= BODIES_AHEAD:  # wait for a queued body to go
                    if self._batch and not self._rest_ok:
                        # Requests of this read are queued: if the rest of it fails to
                        # parse, aiohttp answers none of them (see _passthrough).  Asked
                        # once per read, not once per head that waits.
                        if self._parse_fails(buf[i:]):
                            i = self._passthrough(buf, i, fails=True)
                            break
                        self._rest_ok = True
                    self._state = AHEAD
                    continue
                i = self._start_message(buf, i, end + 4)
            elif state == BODY:
                body = self._body
                assert body is not None
                k = min(body.remaining, n - i)
                arrived = body.bytes_arrived(memoryview(buf)[i : i + k] if buf is data else
                                             buf[i : i + k])
                i += k
                if arrived:
                    self._body_arrived()
                if body.needs_slot:
                    self._want_slot(body)
            elif state == FORWARD:
                chunks = self._chunks
                if chunks is None:
                    k = min(self._fwd_left, n - i)
                else:
                    try:
                        stop, done = chunks.scan(buf, i, n)
                    except ValueError:
                        i = self._passthrough(buf, i)
                        continue
                    k = stop - i
                    self._fwd_left = k if done else k + 1  # _forward ends the message iff done
                i = self._forward(buf, i, k)
            elif state == DISCARD:
                k = min(self._discard_left, n - i)
                i += k
                self._discard_left -= k
                if not self._discard_left:
                    self._state = HEAD
            elif state in (VERIFY, AHEAD):
                # The rest waits unread, here and in the kernel: if aiohttp closes the
                # connection meanwhile (an error, keep-alive off), a plain close would reset
                # it and could discard replies already sent; it closes lingering instead.
                self._pause(True)
                close_lingering(handler)
                break
            elif state == PASSTHROUGH:
                i = self._passthrough(buf, i)
            else:
                i = n
        self._batch = None
        if buf is pending:
            del pending[:i]
            self._scan = max(0, self._scan - i)
        elif i < n:
            pending += buf[i:]
            self._scan = max(0, self._scan - i)

    def _start_message(self, buf: _Buf, start: int, end: int) -> int:
        """A complete head is ``buf[start:end]``: route its request; returns where the next
        bytes of the stream start."""
        head = bytes(buf[start:end])
        if head.count(b"\n") != head.count(b"\r\n"):
            return self._passthrough(buf, start)  # bare LF: aiohttp's parser judges
        return self._route(head, buf, start, end)

    def _route(self, head: bytes | bytearray, buf: _Buf, start: int, end: int) -> int:
        """``_start_message`` once the head (a copy of ``buf[start:end]``) is known to end
        every line in CRLF."""
        try:
            messages, upgraded, tail = self._parser.feed_data(head)  # type: ignore[arg-type]
        except HttpProcessingError:
            return self._passthrough(buf, start)  # same bytes, same error, same status
        if len(messages) != 1 or upgraded or tail:
            return self._passthrough(buf, start)
        msg = messages[0][0]
        headers = msg.headers
        if msg.should_close or msg.upgrade or msg.method == hdrs.METH_CONNECT:
            # (after Connection: close aiohttp refuses any byte in the same read)
            return self._passthrough(buf, start)
        te = headers.get(hdrs.TRANSFER_ENCODING)
        if te is not None or msg.chunked:
            if (
                msg.chunked
                and te is not None
                and te.strip().lower() == "chunked"
                and hdrs.CONTENT_LENGTH not in headers
            ):
                # aiohttp's parser takes it; the fast path resumes after a plainly framed
                # body (see ChunkScanner), else stays off on this connection.
                self._state = FORWARD
                self._fwd_payload = None
                self._fwd_left = 1
                self._chunks = ChunkScanner(end - start)
                self._ctx.state.forwarded += 1
                return start
            return self._passthrough(buf, start)
        raw = headers.get(hdrs.CONTENT_LENGTH)
        try:
            length = 0 if raw is None else int(raw)
        except ValueError:
            return self._passthrough(buf, start)
        if length < 0:
            return self._passthrough(buf, start)
        expect = headers.get(hdrs.EXPECT)
        continued = expect is not None and expect.lower() == "100-continue"
        if (
            hdrs.CONTENT_ENCODING in headers
            or (expect is not None and not continued)
            or length > self._ctx.max_body
        ):
            self._state = FORWARD
            self._fwd_left = end - start + length
            self._fwd_payload = None
            self._chunks = None
            self._ctx.state.forwarded += 1
            return start
        self._ctx.state.fast += 1
        batch = self._batch
        if not length:
            self._deliver(msg, EMPTY_PAYLOAD)
            if batch is not None:
                batch.append((start, msg, EMPTY_PAYLOAD))
            return end
        ctx = self._ctx
        body = ReceivedBody(self, length, ctx.largest, ctx.limit, ctx.loop)
        self._live[body] = None
        self._body = body
        self._state = BODY
        self._deliver(msg, body)
        if batch is not None:
            batch.append((start, msg, body))
        if continued:  # admitted when wanted or when its first byte arrives
            return end
        ahead = len(buf) - end
        if ahead >= length and self.slots.take_whole(
            body, (buf if type(buf) is memoryview else memoryview(buf))[end : end + length]
        ):
            self._body = None  # the whole body came with its head: complete already
            self._state = HEAD
            return end + length
        body.ahead = min(ahead, length)  # evidence for the admission
        self._admit(body)
        return end

    def _deliver(self, msg: Any, payload: Any) -> None:
        """Queue one request on the handler, as its ``data_received`` does."""
        handler = self._handler
        handler._request_count += 1
        handler._messages.append((msg, payload))
        waiter = handler._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not handler._buffer_paused and len(handler._messages) >= handler._max_msg_queue_size:
            handler._pause_reading_for_buffer()

    def _forward(self, buf: _Buf, i: int, k: int) -> int:
        """Feed ``k`` bytes of a known-length message to aiohttp's parser."""
        handler = self._handler
        first = self._fwd_payload is None
        count = handler._request_count
        handler.data_received(bytes(buf[i : i + k]))
        if first:
            messages = handler._messages
            if handler._request_count != count + 1 or not messages or isinstance(
                messages[-1][0], _ErrInfo
            ):
                # Not the one message expected: aiohttp's parser keeps the connection.
                return self._passthrough(buf, i + k)
            self._fwd_payload = messages[-1][1]
        self._fwd_left -= k
        i += k
        if not self._fwd_left:
            payload = self._fwd_payload
            if payload.is_eof():
                self._fwd_payload = None
                self._state = HEAD
            else:
                self._state = VERIFY
                payload.on_eof(self._verify_soon)
        return i

    def _verify_soon(self) -> None:
        self._ctx.loop.call_soon(self._verified)

    def _verified(self) -> None:
        """aiohttp's parser completed the forwarded message: back to the fast path."""
        if self._state != VERIFY:
            return
        self._fwd_payload = None
        self._go_on()

    def _ahead_gone(self) -> None:
        """A body left: the head waiting in AHEAD goes on when few enough are held."""
        if self._state == AHEAD and len(self._live) < BODIES_AHEAD:
            self._go_on()

    def _go_on(self) -> None:
        """Back to HEAD, reading resumed, and what waited in ``_pending`` processed."""
        self._state = HEAD
        self._pause(False)
        if self._pending:
            self._scan = 0
            self._feed(b"")  # (processed in place: a head at a time costs no copy of the rest)

    def _passthrough(self, buf: _Buf, i: int, fails: bool = False) -> int:
        """Hand the stream from ``buf[i:]`` on to aiohttp's parser, for good (``fails``: the
        caller found already that ``buf[i:]`` fails to parse).

        aiohttp parses each read as a whole: a parse error anywhere in it drops the requests
        before the error in that same read.  So when the rest of this read fails to parse,
        the requests this protocol queued from the same read (none started yet: the handler
        runs on a later loop turn) are taken back and aiohttp's parser gets the read from the
        first of them, answering exactly as it would have.
        """
        batch = self._batch
        if batch and (fails or self._parse_fails(buf[i:])):
            handler = self._handler
            messages = handler._messages
            for _start, msg, payload in reversed(batch):
                if not messages or messages[-1][0] is not msg:
                    break  # not ours to take back (cannot happen: the handler did not run)
                messages.pop()
                handler._request_count -= 1
                self._ctx.state.fast -= 1
                if isinstance(payload, ReceivedBody):
                    payload.fail(ConnectionResetError("request taken back"))
                i = _start
            self._body = None
            batch.clear()
        if self._state != PASSTHROUGH:
            self._state = PASSTHROUGH
            self._ctx.state.passthrough += 1
            self._pause(False)
        if i < len(buf):
            self._handler.data_received(bytes(buf[i:]))
        return len(buf)

    def _probe_head(self, buf: _Buf, i: int, n: int) -> int:
        """What aiohttp's parser makes of the unfinished head ``buf[i:n]`` so far: 0 (it
        waits for more), _HEAD_FAILS (it raises now) or _HEAD_ENDS (it ended the head, which
        has no CRLF CRLF).  Incremental: a parser per unfinished head is fed only the bytes
        it has not seen, so a head sent byte by byte costs O(its length)."""
        probe = self._head_probe
        if probe is None:
            probe = self._head_probe = self._throwaway_parser()
            self._probed = 0
        start = i + self._probed
        if start >= n:
            return 0
        self._probed = n - i
        try:
            messages, _upgraded, _tail = probe.feed_data(bytes(buf[start:n]))
        except HttpProcessingError:
            self._head_probe = None
            return _HEAD_FAILS
        if messages:
            self._head_probe = None
            return _HEAD_ENDS
        return 0

    def _throwaway_parser(self) -> HttpRequestParser:
        """A parser with the handler's limits whose messages go nowhere: what aiohttp's
        parser would make of some bytes, asked without touching the handler."""
        handler = self._handler
        return HttpRequestParser(
            _NullFlow(),  # type: ignore[arg-type]
            self._ctx.loop,
            self._ctx.limit,
            max_line_size=handler.max_line_size,
            max_field_size=handler.max_field_size,
            max_headers=handler.max_headers,
            payload_exception=RequestPayloadError,
        )

    def _parse_fails(self, rest: _Buf) -> bool:
        """Would aiohttp's parser raise on ``rest`` (from a message boundary)?  A throwaway
        parser with the handler's limits answers; only asked on the way to PASSTHROUGH."""
        probe = self._throwaway_parser()
        try:
            probe.feed_data(bytes(rest))
        except HttpProcessingError:
            return True
        return False

    def _body_arrived(self) -> None:
        """The current body's last byte arrived (it may still wait for a slot)."""
        self._body = None
        self._state = HEAD

    # ------------------------------------------------------------ slots and flow control
    def _admit(self, body: ReceivedBody) -> None:
        """Admit ``body``'s reservation now, or wait for it in FIFO order (reading paused).

        When aiohttp paused reading because its queue of pipelined requests is full (see
        ``_deliver``), the admitted body is held: its deadlines do not run until reading
        resumes (the admission's periodic check sees the pause over), since the pause is
        the server's, not the client's.
        """
        if not self.slots.admit_now(body):
            self._want_slot(body)
        elif (
            self._handler._buffer_paused
            and body.ticket is not None
            and body.ticket.state == READING  # (a body already whole is DONE: never held)
        ):
            body.ticket.hold()

    def _want_slot(self, body: ReceivedBody) -> None:
        """No admission yet or no slot free: pause reading (while ``body`` still arrives) and
        wait (``SlotSource.admit``, then ``lease_wait``).

        A body still short of its admission evidence (``EVIDENCE_BYTES`` or all of it) keeps
        being read into its overflow until it has shown that much: a paused socket's kernel
        queue can stop short of 16 KiB (pipelined heads ahead of it take room), and the
        evidence would then never come.  So the overflow holds at most the evidence plus one
        read (36 KiB) per connection."""
        if body is self._body and (
            body.ticket is not None or body.received >= min(body.length, EVIDENCE_BYTES)
        ):
            self._pause(True)
        if body.waiting:
            return  # one wait at a time per body
        body.waiting = True
        task = self._ctx.loop.create_task(self._wait_slot(body))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    async def _wait_slot(self, body: ReceivedBody) -> None:
        slots = self.slots
        try:
            if body.ticket is None and body.holds:
                await slots.admit(body)
            while body.needs_slot and body.ticket is not None:
                lease = await slots.lease_wait(body, body.next_slot_size())
                body.add_slot(lease)
        except web.HTTPException as exc:
            self._fail(body, exc)
            return
        except BodyCut:
            return  # cut while waiting: the body was failed (408) through its ticket's stream
        finally:
            body.waiting = False
        if self._state != DEAD and not any(b.waiting for b in self._live):
            self._pause(False)

    def _pause(self, on: bool) -> None:
        transport = self._transport
        if transport is None:
            self._paused = on
        elif on:
            self._paused = True
            # (Checked, not assumed from ``_paused``: aiohttp resumes the transport itself
            # once its queue of pipelined requests drains, whatever this protocol paused it
            # for; the next read then pauses it again, so at most one read waits in
            # ``_pending``.)
            if transport.is_reading():
                transport.pause_reading()
        elif self._paused and self._state != AHEAD and self._state != VERIFY:
            # (AHEAD and VERIFY resume only through _go_on: a slot wait that ends meanwhile
            # must not let the client's stream pile up in ``_pending``)
            self._paused = False
            if not (self._stream_paused or self._handler._buffer_paused
                    or self._handler._reading_paused):
                transport.resume_reading()

    # StreamReader's protocol interface (a ReceivedBody read as a stream pauses/resumes us).
    @property
    def connected(self) -> bool:
        return self._transport is not None

    @property
    def _reading_paused(self) -> bool:
        return self._stream_paused

    def pause_reading(self) -> None:
        if not self._stream_paused and self._transport is not None:
            self._stream_paused = True
            self._transport.pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._stream_paused:
            self._stream_paused = False
            if not self._paused and self._transport is not None:
                self._transport.resume_reading()

    # Calls from ReceivedBody.
    def body_wanted(self, body: ReceivedBody) -> None:
        """A handler waits for ``body`` with ``read_body`` (an Expect: 100-continue body is
        admitted now, if its first byte did not do it already)."""
        if body.ticket is None and not body.waiting and body.holds:
            self._admit(body)

    def body_cut(self, body: ReceivedBody, exc: BaseException) -> None:
        """The admission cut ``body`` (a ``BodyCut`` naming the deadline): 408, and the
        connection closes lingering."""
        self._ctx.state.timeouts += 1
        self._fail(body, web.HTTPRequestTimeout(text=str(exc)))

    def body_streaming(self, body: ReceivedBody) -> None:
        """``body`` became a plain stream: its overflow went into it, no slot is needed."""
        if body is self._body and self._paused and self._state == BODY:
            self._pause(False)

    def body_done(self, body: ReceivedBody) -> None:
        """``body`` was released, failed, or its request ended: the connection no longer
        tracks it (so finished bodies do not outlive their requests), and a head waiting for
        BODIES_AHEAD may go on."""
        self._live.pop(body, None)
        if self._state == AHEAD:
            self._ctx.loop.call_soon(self._ahead_gone)

    def body_abandoned(self, body: ReceivedBody) -> None:
        """The request ended before its body did: drop the rest of it as it arrives."""
        if body is self._body and self._state == BODY:
            self._body = None
            self._discard_left = body.remaining
            self._state = DISCARD if self._discard_left else HEAD
            self._pause(False)

    def _fail(self, body: ReceivedBody, exc: BaseException) -> None:
        """``body`` cannot complete: its readers get ``exc`` (an HTTP status); what still
        arrives is dropped and the connection closes once the response went out, lingering
        (see ``_LingeringClose``) so that a client still sending reads that response."""
        body.fail(exc)
        if body is self._body:
            self._body = None
            self._state = DEAD
            self._pause(False)
            transport = self._transport
            handler = self._handler
            if transport is not None and handler.transport is transport:
                handler.transport = _LingeringClose(transport, self._ctx.loop)  # type: ignore[assignment]
            handler.close()

    # DEAD connections keep reading (and dropping) until the lingering close ends them.


class _NullFlow:
    """Flow-control stand-in for the throwaway parser of ``_parse_fails``."""

    connected = True
    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


def received_body(request: web.BaseRequest) -> ReceivedBody | None:
    """The request's ReceivedBody when the fast path received it, else None."""
    payload = request._payload
    return payload if type(payload) is ReceivedBody else None


def install(app: web.Application, settings: Settings, options: ReceiveOptions) -> ReceiveState:
    """Make the server that runs ``app`` receive bodies through ZeroCopyProtocol.

    Every entry point (``web.run_app``, ``AppRunner``, gunicorn's aiohttp workers) builds its
    ``Server`` through ``app._make_handler``; this wraps that call on this application: the
    internals are checked (``_compat``), then the server's class becomes ZeroCopyServer.
    """
    state = ReceiveState(options=options)
    original = app._make_handler

    def make_handler(**kwargs: Any) -> Server:
        server = original(**kwargs)
        reason = check_internals(server)
        if reason is not None:
            state.active = False
            state.reason = reason
            log.warning(
                "bufpool.aiohttp: zero_copy_receive is off (aiohttp %s: %s); bodies take "
                "aiohttp's normal path", aiohttp.__version__, reason,
            )
            return server
        probe = Server.__call__(server)
        ctx = _Context(
            settings, state, AdmittedSlots(settings), probe._read_bufsize, server._loop,
        )
        server.__class__ = ZeroCopyServer
        server._bufpool_receive = ctx  # type: ignore[attr-defined]
        state.active = True
        return server

    # Application has no __slots__; an instance attribute shadows the method (and keeps
    # AIOHTTP_DEBUG's "custom attribute" warning quiet).
    object.__setattr__(app, "_make_handler", make_handler)
    app[RECEIVE_KEY] = state
    return state
