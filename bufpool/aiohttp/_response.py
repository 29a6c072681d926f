"""Responses whose body comes from pool memory: ``pooled_response``.

Small bodies (at most ``copy_replies_upto`` bytes, 64 KiB by default) are copied into one
``bytes`` when the response is made and their lease goes back to the pool at once: the reply
then costs what a plain ``web.Response`` costs (no per-request lifetime tracking, no write
deadline, no header-map loan), and the copy is cheaper than that tracking up to about one
largest-class slot (docs/aiohttp.md, "Performance").

Larger bodies are sent from pool memory without a copy: the memoryviews are written to
aiohttp's payload writer one by one (a LeaseChain is streamed, never joined); the headers go
out with the first piece in one transport write.  Content-Length is always set.  Header maps
are taken from the application's free list when reuse is on (see ``_headers``).

Lifetime of a zero-copy body: the request takes over one reference to the lease or chain and
releases it when the request ends, after the response was written; views a transport still
queues keep the slot quarantined until they die (the core promise), so nothing is overwritten
early.  A PooledResponse is valid until its request ends.

Write deadline of a zero-copy body: while it is written, and afterwards while the transport
still queues part of it, the reply is watched by the application's admission
(``send_timeout``, nginx's ``send_timeout``: no write progress for that long aborts the
connection, and the slots come back once the transport dropped its views); under memory
pressure a stalled reply is aborted sooner (``preempt_idle``).
``admission_stats(app).reply_bytes_pinned`` shows what unsent replies hold.  A copied body
holds no pool memory; like a plain ``web.Response``, it is bounded by aiohttp's own write
flow control only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiohttp import hdrs, http_writer, web
from multidict import CIMultiDict

from .._lease import Lease, LeaseChain
from ._admission import Admission
from ._body import PooledBody
from ._fastpath import received_body
from ._headers import SUPPORTED as HEADER_REUSE_SUPPORTED
from ._lifetime import OWNED_KEY, RequestLeases, app_settings, owner_of

__all__ = ["PooledResponse", "pooled_response"]

Body = Lease | LeaseChain | PooledBody


class PooledResponse(web.StreamResponse):
    """A StreamResponse that writes the given memoryviews as its body on ``write_eof()``.

    The views must stay valid until the response is written: ``pooled_response`` ensures
    that by letting the request own their leases (or, up to ``copy_replies_upto``, by
    copying them into one ``bytes``: ``copied``).  Nothing of the body is written for HEAD
    requests and for 1xx/204/304 statuses (Content-Length is still announced).

    aiohttp internals used: ``_send_headers_immediately`` (aiohttp >= 3.10; coalesces the
    headers with the first body piece, a harmless no-op if it goes away), ``_req`` (the
    request between ``prepare`` and ``write_eof``) and ``_real_headers`` (checked at import,
    see ``_headers``).
    """

    _send_headers_immediately = False  # coalesce the headers with the first body piece
    _views: Sequence[memoryview] = ()
    _nbytes = 0
    #: The body copied out of the pool (``pooled_response`` up to ``copy_replies_upto``).
    _copy: bytes | None = None
    _was_copied = False
    #: The application's admission (write deadline); set by ``pooled_response`` for bodies
    #: sent from pool memory.
    admission: Admission | None = None

    def __init__(
        self,
        views: Sequence[memoryview],
        *,
        status: int = 200,
        reason: str | None = None,
        headers: CIMultiDict[str] | None = None,
    ) -> None:
        if headers is not None and HEADER_REUSE_SUPPORTED:
            super().__init__(status=status, reason=reason, _real_headers=headers)
        else:
            super().__init__(status=status, reason=reason, headers=headers)
        self._views = views
        self._nbytes = n = sum(map(len, views))
        # What the content_length setter does, without its checks (new, unchunked response).
        self._headers[hdrs.CONTENT_LENGTH] = str(n)

    @property
    def body_views(self) -> Sequence[memoryview]:
        """The views still to be written (empty once written); of the private copy when
        ``copied``."""
        data = self._copy
        return self._views if data is None else (memoryview(data),)

    @property
    def copied(self) -> bool:
        """True when the body was copied out of the pool and its lease released at once
        (up to ``copy_replies_upto``); False when it is sent from pool memory."""
        return self._was_copied

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:  # aiohttp's own call after the middleware sent it
            return
        req = self._req
        status = self.status
        # RFC 9110 sections 9.3.2, 15.2, 15.3.5, 15.4.5: no content in these answers.
        bodiless = req is None or req.method == hdrs.METH_HEAD or status < 200 or status in (
            204, 304)
        copy = self._copy
        if copy is not None:
            self._copy = None
            if bodiless:
                await super().write_eof(data)
            elif data:
                await self.write(copy)
                await super().write_eof(data)
            else:
                await super().write_eof(copy)
            return
        views, self._views = self._views, ()  # a second call writes nothing more
        adm = self.admission
        if not views or bodiless or adm is None:
            await super().write_eof(data)
            return
        transport = req.transport  # type: ignore[union-attr]
        if transport is None:  # the client is gone
            await super().write_eof(data)
            return
        watch = adm.watch_send(transport, self._nbytes)
        try:
            if len(views) == 1 and not data:
                # A one-slot body goes out with the end of the message: headers and body in
                # one transport write, one coroutine less.  (Like aiohttp's, this write_eof
                # drains; a chain's last piece does not wait, as below.)
                # aiohttp annotates bytes but accepts (and asserts) bytes, bytearray, memoryview.
                await super().write_eof(views[0])  # type: ignore[arg-type]
                return
            writer = self._payload_writer
            if len(views) > 2 and _hands_lines(writer, transport):
                # Headers and the first slot through aiohttp, the middle slots in one
                # transport.writelines() (one writev, not one send per slot), then the last
                # slot through aiohttp again: as with one write() per slot, the request
                # waits while the transport is over its high-water mark and ends with at
                # most about one slot still queued.  The transport keeps views of what it
                # cannot send at once (the quarantine covers them).
                first, last = views[0], views[-1]
                await self.write(first)
                watch.written = len(first)
                if transport.is_closing():
                    raise ConnectionResetError("Cannot write to closing transport")
                middle = self._nbytes - len(first) - len(last)
                transport.writelines(views[1:-1])
                # What aiohttp's own write() would have counted (access log, Content-Length).
                writer.output_size += middle  # type: ignore[union-attr]
                writer.length -= middle  # type: ignore[operator, union-attr]
                watch.written += middle
                await writer.drain()  # type: ignore[union-attr]
                await self.write(last)
                watch.written = self._nbytes
            else:
                for view in views:
                    await self.write(view)
                    watch.written += len(view)
            await super().write_eof(data)
        finally:
            # Watched until the transport drained what it still queues (or the deadline).
            watch.finished = True
            if not transport.get_write_buffer_size():  # all sent (or the transport closed)
                adm.sends.discard(watch)


def _hands_lines(writer: Any, transport: Any) -> bool:
    """True when the rest of a chain may go to ``transport.writelines()`` directly: aiohttp's
    plain StreamWriter with nothing between ``write()`` and the transport (no compression,
    chunking, chunk signal or body-write hook) and a transport whose writelines keeps
    memoryviews correctly.  Any attribute missing (another aiohttp): False."""
    return (
        type(writer) is http_writer.StreamWriter
        and getattr(writer, "_compress", True) is None
        and getattr(writer, "_on_chunk_sent", True) is None
        and getattr(writer, "on_body_write", None) is None
        and writer.chunked is False
        and isinstance(writer.length, int)
        # aiohttp's own verdict (it uses writelines on Python >= 3.12.9 / 3.13.2, where
        # asyncio's is fixed), read per call like aiohttp does; uvloop's is always fine.
        and (not getattr(http_writer, "SKIP_WRITELINES", True)
             or type(transport).__module__.startswith("uvloop"))
    )


def pooled_response(
    request: web.Request,
    body: Body,
    *,
    status: int = 200,
    reason: str | None = None,
    content_type: str | None = "application/octet-stream",
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
) -> PooledResponse:
    """A response whose body is the bytes of ``body`` (a Lease, LeaseChain or PooledBody).

    A body of at most ``copy_replies_upto`` bytes (``setup()``, 64 KiB by default) is copied
    into one ``bytes`` here and one reference to its memory released at once
    (``resp.copied``).  A larger body is sent from pool memory without a copy: the request
    takes over one reference and releases it when the request ends.  Either way: do not
    release ``body`` yourself, nor use it afterwards (``retain()`` first if you keep using
    it).
    ``content_type`` is set unless ``headers`` already has a Content-Type.
    """
    state = getattr(request, "_state", None)  # the request's dict (no KeyError per request)
    owner: RequestLeases | None = (
        state.get(OWNED_KEY) if type(state) is dict else request.get(OWNED_KEY)
    )
    settings = app_settings(request) if owner is None else owner.settings
    # A fast-path body read_body kept: its handler task is known (the owner can be made
    # from any task, as once read_body made it), and it lets go of what is handed on here.
    received = received_body(request)
    if received is not None and not received.kept:
        received = None
    if len(body) <= settings.copy_replies_upto:
        if received is not None and not isinstance(body, PooledBody):
            received.disown(body)  # (_copied releases it; a PooledBody does that itself)
        return _copied(owner, body, status, reason, content_type, headers)
    if owner is None:
        owner = owner_of(request, None if received is None else received.task)
    if isinstance(body, PooledBody):
        owned = body.owned
        views = body.views()
        body._hand_over()
    else:
        owned = body
        views = [body.view] if isinstance(body, Lease) else body.views()
        if received is not None:
            received.disown(body)
    if owned is not None:
        owner.adopt(owned)
    maps = owner.header_maps
    if maps is not None:
        real = maps.take()
        owner.lend(real)
    else:
        real = CIMultiDict()
    if headers is not None:
        real.extend(headers)
    if content_type is not None and hdrs.CONTENT_TYPE not in real:
        real[hdrs.CONTENT_TYPE] = content_type
    resp = PooledResponse(views, status=status, reason=reason, headers=real)
    resp.admission = settings.admission
    return resp


def _copied(
    owner: RequestLeases | None,
    body: Body,
    status: int,
    reason: str | None,
    content_type: str | None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> PooledResponse:
    """``pooled_response`` below the threshold: copy, release now, nothing to track."""
    data = body.tobytes()
    if isinstance(body, PooledBody):
        body.release()  # forgets it (and its admission) if the request owns it
    else:
        if owner is not None:
            owner.forget(body)  # it may already be the request's (e.g. read_body's lease)
        body.release()
    real: CIMultiDict[str] = CIMultiDict() if headers is None else CIMultiDict(headers)
    if content_type is not None and hdrs.CONTENT_TYPE not in real:
        real[hdrs.CONTENT_TYPE] = content_type
    real[hdrs.CONTENT_LENGTH] = str(len(data))
    resp = PooledResponse.__new__(PooledResponse)
    if HEADER_REUSE_SUPPORTED:
        web.StreamResponse.__init__(resp, status=status, reason=reason, _real_headers=real)
    else:  # pragma: no cover - aiohttp < 3.9.4 copies the map
        web.StreamResponse.__init__(resp, status=status, reason=reason, headers=real)
    resp._copy = data
    resp._was_copied = True
    return resp
