"""Errors of the aiohttp integration that are not HTTP statuses.

Bad input from the network becomes an HTTP status (413, 400, 503) raised as an aiohttp
``HTTPException``; the classes here are for mistakes in the application's own code.
"""

from __future__ import annotations

from .._errors import BufPoolError

__all__ = ["BodyAlreadyRead", "BodyNotContiguous", "NotSetUp"]


class BodyAlreadyRead(BufPoolError, RuntimeError):
    """``read_body`` was called after other code consumed the request body stream
    (``request.read()``, ``.post()``, ``.json()``, ``.text()`` or ``request.content``)."""


class BodyNotContiguous(BufPoolError, ValueError):
    """``PooledBody.memoryview()`` was called on a body held in several slots (a LeaseChain).

    Use ``views()`` to walk the pieces, or ``tobytes()`` for one joined copy.
    """


class NotSetUp(BufPoolError, RuntimeError):
    """A bufpool.aiohttp helper was used on an application that ``setup()`` never saw."""
