"""Per-request ownership of pooled memory, and when it ends.

Every lease ``read_body`` takes and every lease handed to ``pooled_response`` is recorded on
the request, with the body's admission ticket.  All of it is released when the request ends,
after its response was written, in one of two ways:

* **Task lifetime** (the default, no middleware): the first ``read_body``/``pooled_response``
  call of a request adds a done-callback to the request's handler task.  aiohttp runs each
  request in its own task (``RequestHandler._handle_request``, web_protocol.py), which calls
  the handler and then ``finish_response`` (``prepare`` + ``write_eof`` + access log), so the
  task ends only once the response was written or the client went away.  Routes that never
  use the pool pay nothing, and aiohttp adds no ``_fix_request_current_app`` layer.  The call
  must come from that task itself (not a task the handler spawned); ``NotSetUp`` says so.
* **Middleware** (``setup(app, middleware=True)`` or ``middleware()`` placed by hand): the
  owner exists from the start of the request (helpers work from any task) and is released in
  a ``finally``.  When the handler returns, aiohttp has not written the response yet
  (``resp.prepared`` is False; FINDINGS section 4), so when the request holds pooled memory the
  middleware calls ``prepare()`` and ``write_eof()`` itself (aiohttp's later calls are no-ops)
  and only then releases.

Recycled header maps (``reuse_headers``) follow the same rule: a map goes back to the free list
only once its headers are on the wire.  Whatever the transport still queues after that keeps the
slot alive through its memoryview, and the pool quarantines the slot until the view dies (the
core promise), so even a release right after the handler returned would never corrupt a
response.

Cost per request that uses the pool: one small object, one request-dict store and one
done-callback; releases are O(leases held).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from .._lease import Lease, LeaseChain
from ._errors import NotSetUp
from ._headers import HeaderMaps
from ._settings import SETTINGS_KEY, Settings

if TYPE_CHECKING:
    from ._admission import BodyTicket
    from ._body import PooledBody

__all__ = [
    "OWNED_KEY", "RequestLeases", "app_settings", "make_middleware", "middleware", "owner_of",
]

log = logging.getLogger("bufpool.aiohttp")

#: Code of the coroutine aiohttp runs each request in (one task per request); None if this
#: aiohttp has no such method (then ``setup()`` installs the middleware instead).
HANDLER_CODE: Final[Any] = getattr(
    getattr(RequestHandler, "_handle_request", None), "__code__", None
)

def _task_lookup() -> Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]:
    """``asyncio.current_task(loop)`` without a Python frame: the C function where asyncio
    has one (3.12+), else (3.11) the lookup in the task map its Python version does."""
    import _asyncio

    current = getattr(_asyncio, "current_task", None)
    if current is not None:
        return current  # type: ignore[no-any-return]
    tasks = getattr(asyncio.tasks, "_current_tasks", None)
    if isinstance(tasks, dict) and asyncio.current_task is asyncio.tasks.current_task:
        return tasks.get
    return asyncio.current_task


_current_task: Final = _task_lookup()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestLeases:
    """The pooled memory one request owns; valid until the request ends.

    Calling it (``owned(task)``) is ``close()``: the object itself is the handler task's
    done-callback, so no bound method is made per request."""

    __slots__ = ("body", "header_maps", "headers", "items", "settings", "ticket")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.items: list[Lease | LeaseChain] = []
        self.header_maps: HeaderMaps | None = settings.header_maps
        #: Header maps lent to this request's responses, returned at the end (made on the
        #: first loan).
        self.headers: list[CIMultiDict[str]] | None = None
        #: What ``read_body`` returned, so that a second call returns the same body.
        self.body: PooledBody | None = None
        #: The body's admission into the budget, released with the body's memory.
        self.ticket: BodyTicket | None = None

    def release_ticket(self) -> None:
        """Give the body's admission back (its memory was released)."""
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            ticket.adm.release(ticket)

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

    def lend(self, headers: CIMultiDict[str]) -> None:
        """Record a header map from ``header_maps``, given back when the request ends."""
        if self.headers is None:
            self.headers = [headers]
        else:
            self.headers.append(headers)

    def close(self, task: asyncio.Task[Any] | None = None) -> None:
        """Release everything still held; keeps going past errors and re-raises the first.

        Also the done-callback of the request's handler task (``task``): an error then goes
        to the loop's exception handler, like any callback's."""
        self.body = None  # it refers back to the request: break the cycle
        items = self.items
        first: BaseException | None = None
        if items:
            self.items = []
            for item in items:
                if item.released:
                    continue
                try:
                    item.release()
                except BaseException as exc:  # keep releasing the rest
                    first = first or exc
        lent = self.headers
        if lent is not None:
            self.headers = None
            maps = self.header_maps
            if maps is not None:
                for headers in lent:
                    maps.give(headers)
        ticket = self.ticket
        if ticket is not None:
            self.ticket = None
            ticket.adm.release(ticket)
        if first is not None:
            raise first

    __call__ = close


#: Request-dict key of the request's RequestLeases: a typed ``web.RequestKey`` where aiohttp
#: has it (3.13+), a plain string before.
OWNED_KEY: Final[Any] = (
    web.RequestKey("bufpool.aiohttp.owned", RequestLeases)
    if hasattr(web, "RequestKey")
    else "bufpool.aiohttp.owned"
)


#: The context the task-lifetime releases run in (see ``_own``).
_RELEASE_CONTEXT: Final = contextvars.Context()


def owner_of(
    request: web.BaseRequest, task: asyncio.Task[Any] | None = None
) -> RequestLeases:
    """The request's RequestLeases, made on first use (task lifetime, see module docstring).

    NotSetUp when ``setup()`` never saw the application, or when called (first) from a task
    other than the request's handler task without the middleware.  ``task``: the handler
    task when it is known already (a body the zero-copy receive path kept for ``read_body``
    was checked then), so the owner may be made from any task.
    """
    state = getattr(request, "_state", None)  # the request's dict (no KeyError per request)
    if type(state) is not dict:
        state = None
    owned: RequestLeases | None = (
        state.get(OWNED_KEY) if state is not None else request.get(OWNED_KEY)
    )
    return _own(request, state, task) if owned is None else owned


def app_settings(request: web.BaseRequest) -> Settings:
    """The settings ``setup()`` stored on the request's application (or a parent); NotSetUp
    when there are none."""
    try:
        # The matched app first (one lookup in its dict); a sub-application finds its parent's.
        app = request.app  # type: ignore[attr-defined]
        state = getattr(app, "_state", None)
        found = state.get(SETTINGS_KEY) if type(state) is dict else app.get(SETTINGS_KEY)
        return found or request.config_dict[SETTINGS_KEY]  # type: ignore[attr-defined,no-any-return]
    except (KeyError, AttributeError):
        raise NotSetUp(
            "bufpool.aiohttp.setup(app, ...) was never called for this request's application "
            "(call it before the application starts)"
        ) from None


def handler_task(request: web.BaseRequest) -> asyncio.Task[Any]:
    """The task aiohttp runs ``request`` in, which must be the caller's (NotSetUp if not)."""
    loop = getattr(request, "_loop", None)  # (no getpid() per request)
    task = _current_task(loop if loop is not None else asyncio.get_running_loop())
    coro = task.get_coro() if task is not None else None
    if HANDLER_CODE is None or getattr(coro, "cr_code", None) is not HANDLER_CODE:
        raise NotSetUp(
            "bufpool.aiohttp.read_body()/pooled_response() was first called outside the "
            "request's own handler task (e.g. in a task the handler spawned): call it from "
            "the handler first, or install the middleware (setup(app, middleware=True) or "
            "bufpool.aiohttp.middleware())"
        )
    assert task is not None
    return task


def _own(
    request: web.BaseRequest, state: dict[Any, Any] | None,
    task: asyncio.Task[Any] | None = None,
) -> RequestLeases:
    """A new RequestLeases for ``request`` (stored in ``state``, its dict, when not None),
    released when ``task`` (default: the caller's, which must be the handler task) ends."""
    settings = app_settings(request)
    if task is None:
        task = handler_task(request)
    owned = RequestLeases(settings)
    if state is not None:
        state[OWNED_KEY] = owned
    else:
        request[OWNED_KEY] = owned
    # calls owned.close(task); in one shared empty context (no context copy per request:
    # the release reads no context variables)
    task.add_done_callback(owned, context=_RELEASE_CONTEXT)
    return owned


def make_middleware(settings: Settings | None = None) -> Middleware:
    """The lifetime middleware; with ``settings`` bound to one application, else it finds
    them per request (``request.config_dict``)."""

    @web.middleware
    async def bufpool_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if settings is None:
            try:
                found = request.config_dict[SETTINGS_KEY]
            except KeyError:
                raise NotSetUp(
                    "bufpool.aiohttp.middleware() is installed but setup(app, ...) was never "
                    "called for this application"
                ) from None
        else:
            found = settings
        owned = RequestLeases(found)
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
                    owned.headers = None
            return resp
        finally:
            owned.close()

    return bufpool_middleware


def middleware() -> Middleware:
    """The lifetime middleware for apps that compose their middlewares by hand::

        app = web.Application(middlewares=[bufpool.aiohttp.middleware(), auth, ...])
        bufpool.aiohttp.setup(app, ...)

    Put it outermost.  With it the helpers also work from tasks the handler spawns; without
    it (the default) lifetimes follow the handler task and cost no middleware.
    """
    return make_middleware(None)
