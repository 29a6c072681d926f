"""Per-request ownership of pooled memory and the middleware that ends it.

Every lease ``read_body`` takes and every lease handed to ``pooled_response`` is recorded on
the request.  The middleware (installed outermost by ``setup()``) releases them all in a
``finally`` when the request ends: normal return, exception, client disconnect, cancellation.

Why the middleware also finishes the response: when the handler returns, aiohttp has not
written the response yet (``resp.prepared`` is False; FINDINGS section 4), so the body's memory
would be released before the bytes left.  When the request holds pooled memory the middleware
therefore calls ``prepare()`` and ``write_eof()`` itself (aiohttp's own later calls are no-ops)
and releases afterwards.  The same holds for recycled header maps (``reuse_headers``): a map
goes back to the free list only once its headers are on the wire, else a concurrent request
could clear and refill it before aiohttp serializes it (one client's headers sent to another).
Whatever the transport still queues after that keeps the slot alive through its memoryview,
and the pool quarantines the slot until the view dies (the core promise), so even a release
right after the handler returned would never corrupt a response.

Cost per request: one small object and one request-dict store; releases are O(leases held).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict

from .._lease import Lease, LeaseChain
from ._errors import NotSetUp
from ._headers import HeaderMaps
from ._settings import Settings

if TYPE_CHECKING:
    from ._body import PooledBody

__all__ = ["OWNED_KEY", "RequestLeases", "make_middleware", "owner_of"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestLeases:
    """The pooled memory one request owns; valid until the request ends."""

    __slots__ = ("body", "header_maps", "headers", "items", "settings")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.items: list[Lease | LeaseChain] = []
        self.header_maps: HeaderMaps | None = settings.header_maps
        #: Header maps lent to this request's responses, returned at the end.
        self.headers: list[CIMultiDict[str]] = []
        #: What ``read_body`` returned, so that a second call returns the same body.
        self.body: PooledBody | None = None

    def adopt(self, owned: Lease | LeaseChain) -> None:
        """Take over one reference: released when the request ends (unless already)."""
        for item in self.items:
            if item is owned:
                return
        self.items.append(owned)

    def forget(self, owned: Lease | LeaseChain) -> None:
        """Stop owning ``owned`` (the caller released it or took it over)."""
        items = self.items
        for i, item in enumerate(items):
            if item is owned:
                del items[i]
                return

    def close(self) -> None:
        """Release everything still held; keeps going past errors and re-raises the first."""
        items, self.items = self.items, []
        self.body = None  # it refers back to the request: break the cycle
        first: BaseException | None = None
        for item in items:
            if item.released:
                continue
            try:
                item.release()
            except BaseException as exc:  # keep releasing the rest
                first = first or exc
        maps = self.header_maps
        if maps is not None:
            for headers in self.headers:
                maps.give(headers)
        self.headers = []
        if first is not None:
            raise first


#: Request-dict key of the request's RequestLeases: a typed ``web.RequestKey`` where aiohttp
#: has it (3.13+), a plain string before.
OWNED_KEY: Final[Any] = (
    web.RequestKey("bufpool.aiohttp.owned", RequestLeases)
    if hasattr(web, "RequestKey")
    else "bufpool.aiohttp.owned"
)


def owner_of(request: web.BaseRequest) -> RequestLeases:
    """The request's RequestLeases; NotSetUp when the middleware is not installed."""
    try:
        owned: RequestLeases = request[OWNED_KEY]
    except KeyError:
        raise NotSetUp(
            "no bufpool middleware saw this request: call bufpool.aiohttp.setup(app, ...) "
            "before the application starts"
        ) from None
    return owned


def make_middleware(settings: Settings) -> Middleware:
    """The middleware for one application (it closes over the app's settings)."""

    @web.middleware
    async def bufpool_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        owned = RequestLeases(settings)
        request[OWNED_KEY] = owned
        try:
            resp = await handler(request)
            if (owned.items or owned.headers) and isinstance(resp, web.StreamResponse):
                # Send it now, while the memory and header maps are still the request's
                # (see module docstring).
                try:
                    await resp.prepare(request)
                    await resp.write_eof()
                except ConnectionError:
                    # Client gone; aiohttp meets the same error and drops the connection, but
                    # may still read the headers: never lend these maps again.
                    owned.headers.clear()
            return resp
        finally:
            owned.close()

    return bufpool_middleware
