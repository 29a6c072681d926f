"""Lingering close: a connection that answered an error before reading the whole request
body is half-closed, not closed, so that a client still uploading reads the answer.

Closing a socket whose receive queue holds unread bytes (or that receives more afterwards)
makes the kernel send a reset, and a reset can discard the response the client was sent
before it read it (RFC 7230 section 6.6 describes the failure and the staged close that
avoids it; nginx's ``lingering_close``, on by default, does the same).

``LingeringClose`` stands in for the transport a protocol closes: ``close()`` sends a FIN
after the queued response (``write_eof``) and closes for good when the peer ends its side
(the protocol's ``eof_received`` returns a falsy value) or after ``LINGER`` seconds.
Meanwhile the connection keeps reading and the protocol drops what arrives (aiohttp's
``RequestHandler`` ignores input once it is closing; the zero-copy protocol's DEAD state does
the same).  Bounds: one timer per cut connection; no bytes kept.

Used by the zero-copy receive path (``_fastpath``) and by ``read_body`` on aiohttp's own
parser (``_body``) when a body is cut (408) or refused mid-way.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

__all__ = ["LINGER", "LingeringClose", "close_lingering"]

#: Seconds a half-closed connection keeps reading (and dropping) before it closes for good.
LINGER: Final = 2.0


class LingeringClose:
    """The transport as a protocol sees it once its response is the last one.

    ``close()`` half-closes and lingers (see the module docstring); everything else is the
    real transport's.  Valid as long as the real transport.
    """

    # (__weakref__: asyncio's native sendfile keeps the transport it was given, this proxy,
    # in the loop's weak map of transports; without it aiohttp's FileResponse failed on a
    # lingering connection)
    __slots__ = ("__weakref__", "_loop", "_transport")

    LINGER: Final = LINGER

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        transport = self._transport
        if transport.is_closing():
            return
        try:
            if transport.can_write_eof():  # (TLS cannot: it stays open, reading, instead)
                transport.write_eof()
            # Dropped input must keep flowing: a paused socket would fill its receive queue,
            # and that queue is what makes the final close a reset.
            transport.resume_reading()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        self._loop.call_later(self.LINGER, transport.close)


def close_lingering(protocol: Any) -> None:
    """Make ``protocol``'s next ``transport.close()`` (aiohttp's ``RequestHandler`` closing
    after the response) a lingering close.  Idempotent; nothing when there is no transport."""
    transport = getattr(protocol, "transport", None)
    if transport is None or isinstance(transport, LingeringClose):
        return
    protocol.transport = LingeringClose(transport, asyncio.get_running_loop())
