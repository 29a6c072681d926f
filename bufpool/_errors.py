"""Exceptions and warnings raised by bufpool.

Every failure mode has its own class, all under :class:`BufPoolError`, so callers can catch
exactly the fault they can handle.  Messages name the limit or the fault.
"""

from __future__ import annotations

__all__ = [
    "BufPoolError",
    "BufferFull",
    "LeakWarning",
    "LeaseReleasedError",
    "PoolExhausted",
    "RequestTooLarge",
]


class BufPoolError(Exception):
    """Base class of every error bufpool raises on purpose."""


class PoolExhausted(BufPoolError):
    """The pool's byte budget is spent and the policy (or a timeout) says not to wait."""


class RequestTooLarge(BufPoolError, ValueError):
    """A contiguous lease beyond the largest size class, under ``on_exhausted="raise"``."""


class LeaseReleasedError(BufPoolError):
    """A lease was released more times than it was retained, or used after its release."""


class BufferFull(BufPoolError):
    """A :class:`~bufpool.RingBuffer` is at ``max_capacity``; nothing already buffered was lost."""


class LeakWarning(ResourceWarning):
    """A lease was garbage-collected without being released.

    Its slot went back to the pool once no view of it was alive.  The message gives the lease
    size and, when leak detection sampled the lease, where it was acquired.
    """
