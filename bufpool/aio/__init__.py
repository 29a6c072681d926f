"""bufpool.aio: the asyncio adapter (floor 3).

``PooledProtocol`` receives straight into a :class:`~bufpool.RingBuffer`; ``write_lease``
sends pooled memory and releases it at once; ``drain_complete`` waits until a transport's
queue is empty.  Works the same on the default event loop and on uvloop.
"""

from ._protocol import PooledProtocol
from ._writes import drain_complete, write_lease

__all__ = ["PooledProtocol", "drain_complete", "write_lease"]
