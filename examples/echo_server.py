"""Echo server on ``bufpool.aio.PooledProtocol``.

Received bytes land in the connection's ring buffer (pool memory, no per-read allocation);
each batch is copied once into a pooled lease chain and written back with ``write_lease``,
which releases the chain at once — the pool keeps those slots out of circulation until the
transport has sent them.  Reading pauses while the peer does not read our writes.

    python examples/echo_server.py --port 8888 --loop uvloop
    python examples/echo_server.py --tls     # TLS terminated in the server, decrypted into the ring
"""

from __future__ import annotations

from _stream_cli import parse_args, run  # examples/_stream_cli.py, beside this script

from bufpool import BufferPool, RingBuffer
from bufpool.aio import PooledProtocol


class Echo(PooledProtocol):
    pool: BufferPool

    def data_available(self, ring: RingBuffer) -> None:
        chain = self.pool.acquire_chain(len(ring))
        for view in chain.views():
            ring.readinto(view)
        self.write_lease(chain)

    # Write backpressure: stop reading while the transport's queue is above its high mark.
    def pause_writing(self) -> None:
        self.pause_reading()

    def resume_writing(self) -> None:
        self.resume_reading()


def main() -> None:
    args = parse_args("Echo server on bufpool.aio.PooledProtocol", 8888)
    pool = BufferPool()
    run(args, pool, lambda: Echo(pool))


if __name__ == "__main__":
    main()
