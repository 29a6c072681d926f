"""Length-prefixed framing server on ``bufpool.aio.PooledProtocol``.

Protocol: each request frame is a 4-byte big-endian length and that many payload bytes; the
server answers every frame with a frame holding the SHA-256 of its payload (32 bytes).  A
frame longer than ``--max-frame`` bytes gets an error frame (text starting with ``error:``)
and the connection is closed: the limit bounds memory per connection.

Frames are hashed in place from the ring (``peek``): no copy unless a frame straddles the
ring's end (then one counted copy).  Replies are written from pooled leases.

    python examples/framing_server.py --port 8889 --loop uvloop --max-frame 1048576
    python examples/framing_server.py --tls  # TLS terminated in the server, decrypted into the ring
"""

from __future__ import annotations

import hashlib

from _stream_cli import parse_args, run  # examples/_stream_cli.py, beside this script

from bufpool import BufferPool, RingBuffer
from bufpool.aio import PooledProtocol

HEADER = 4


class Framing(PooledProtocol):
    pool: BufferPool

    def __init__(self, pool: BufferPool, max_frame: int) -> None:
        super().__init__(pool, capacity=65536, max_capacity=max(65536, HEADER + max_frame))
        self.max_frame = max_frame

    def data_available(self, ring: RingBuffer) -> None:
        while len(ring) >= HEADER:
            n = int.from_bytes(ring.peek(HEADER), "big")
            if n > self.max_frame:
                self.reply(f"error: frame of {n} bytes exceeds max_frame={self.max_frame}".encode())
                assert self.transport is not None
                self.transport.close()
                ring.clear()
                return
            if len(ring) < HEADER + n:
                return
            digest = hashlib.sha256(ring.peek(HEADER + n)[HEADER:]).digest()
            ring.consume(HEADER + n)
            self.reply(digest)

    def reply(self, payload: bytes) -> None:
        lease = self.pool.acquire(HEADER + len(payload))
        view = lease.view
        view[:HEADER] = len(payload).to_bytes(HEADER, "big")
        view[HEADER:] = payload
        del view
        self.write_lease(lease)


def main() -> None:
    args = parse_args(
        "Length-prefixed framing server on bufpool.aio.PooledProtocol",
        8889,
        lambda p: p.add_argument("--max-frame", type=int, default=1 << 20, help="bytes"),
    )
    pool = BufferPool()
    run(args, pool, lambda: Framing(pool, args.max_frame))


if __name__ == "__main__":
    main()
