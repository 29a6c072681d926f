"""Pooled writes: send leases and lease chains through an asyncio transport and release them
right away.

Supports: ``write_lease(transport, lease_or_chain)`` (``write`` for a lease, ``writelines``
for a chain, then the caller's ownership is released) and ``drain_complete(transport)``, which
waits until the transport has handed every queued byte to the kernel.

Why releasing right after the call is safe: transports keep a reference to the memory they
were given while it is queued (3.12+ selector transports queue the very memoryview, uvloop a
view derived from it; 3.11 selector transports copy).  The pool puts a released slot back on
its free list only when no view of it is alive, so a slot still queued in a transport sits in
quarantine and is reclaimed once the transport drops it.  The bytes go out exactly as written
on every loop, with no copy and no waiting.

``drain()`` is not "sent": it returns once writing is no longer paused, with up to the
low-water mark (16 KiB on the selector loop) still queued.  Use ``drain_complete`` when a
caller needs "everything left the process" (e.g. before timing, or before closing a socket
it does not own).  It polls ``get_write_buffer_size()`` with a backoff from 0 up to
``max_interval`` seconds: O(queued time / max_interval) wake-ups.
"""

from __future__ import annotations

import asyncio

from .._lease import Lease, LeaseChain

__all__ = ["drain_complete", "write_lease"]


def write_lease(transport: asyncio.WriteTransport, data: Lease | LeaseChain) -> None:
    """Write the bytes of ``data`` and release it (one ``release()``; also when writing
    raises).

    A lease goes out with ``transport.write(lease.view)``, a chain with
    ``transport.writelines(chain.views())`` (one vectored send where the loop supports it).
    The memory stays out of circulation until the transport no longer references it.
    """
    try:
        if isinstance(data, LeaseChain):
            transport.writelines(data.views())
        else:
            transport.write(data.view)
    finally:
        data.release()


async def drain_complete(
    transport: asyncio.WriteTransport,
    *,
    timeout: float | None = None,
    max_interval: float = 0.005,
) -> None:
    """Wait until ``transport.get_write_buffer_size() == 0``: every byte written so far was
    handed to the kernel (or dropped by an abort).  Raises TimeoutError after ``timeout``
    seconds.  ``max_interval`` (seconds) bounds the polling interval."""
    delay = 0.0
    async with asyncio.timeout(timeout):
        while transport.get_write_buffer_size():
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, 0.0002), max_interval)
