"""Exceptions and warnings raised by bufpool.

Every failure mode has its own class, all under :class:`BufPoolError`, so callers can catch
exactly the fault they can handle.  Messages name the limit or the fault.
"""

from __future__ import annotations

__all__ = [
    "BufPoolError",
    "BufferFull",
    "ChainTooLarge",
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
    """A request the pool can never serve: a contiguous lease beyond the largest size class
    under ``on_exhausted="raise"``, or one above it larger than ``max_heap_bytes``."""


class ChainTooLarge(RequestTooLarge, PoolExhausted):
    """A chain larger than the whole budget (``acquire_chain``, ``acquire_chain_async``): it
    could never be served, so it fails at once, holding nothing, instead of waiting.

    Also a PoolExhausted, so code that handled the failure of such a chain (after its wait)
    keeps handling it."""


class LeaseReleasedError(BufPoolError):
    """A lease was released more times than it was retained, or used after its release."""


class BufferFull(BufPoolError):
    """A :class:`~bufpool.RingBuffer` is at ``max_capacity``; nothing already buffered was lost."""


class LeakWarning(ResourceWarning):
    """A lease was garbage-collected without being released.

    Its slot went back to the pool once no view of it was alive.  The message gives the lease
    size and, when leak detection sampled the lease, where it was acquired.
    """
