"""In-process record parsing, no sockets: where a RingBuffer's per-record cost goes.

The record stream of ``bench_stream.py`` (5-byte header with a 2-byte big-endian length at
offset 3; 40% 100-300 B, 30% 1-4 KiB, 30% 16 KiB) is cut into ``--chunk-kb`` chunks (what a
socket read would deliver) and parsed by:

  naive        ``buf += chunk``; ``bytes`` slice per record; ``del buf[:n]``
  hand         one fixed buffer, parse by offset, move the tail to the front (what a
               hand-written BufferedProtocol does)
  ring-peek    RingBuffer: ``peek(5)``, ``peek(size)``, ``consume(size)`` per record
  ring-frame   RingBuffer: ``peek_frame(5, 3, 2)``, ``consume`` per record
  ring-batch   RingBuffer: parse the contiguous readable view by offset, one ``consume``
               per batch, ``peek`` only for a record that straddles the wrap

Each variant checks every record's type byte and the record count.  Prints ns/record, GB/s
and the ratio to naive, best of ``--repeat``.

    python bench/bench_ring.py            # ~2 s
    python bench/bench_ring.py --mb 400 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_stream import HEADER, RECORD_TYPE, record_block

from bufpool import BufferPool, RingBuffer


def naive(chunks: list[bytes]) -> int:
    buf = bytearray()
    records = 0
    for chunk in chunks:
        buf += chunk
        while len(buf) >= HEADER:
            size = HEADER + int.from_bytes(buf[3:5], "big")
            if len(buf) < size:
                break
            rec = bytes(buf[:size])
            del buf[:size]
            if rec[0] != RECORD_TYPE:
                raise ValueError("bad record")
            records += 1
    return records


def hand(chunks: list[bytes]) -> int:
    store = bytearray(256 * 1024)
    mv = memoryview(store)
    end = 0
    records = 0
    for chunk in chunks:
        n = len(chunk)
        mv[end : end + n] = chunk  # stands in for recv_into
        end += n
        pos = 0
        while end - pos >= HEADER:
            size = HEADER + (mv[pos + 3] << 8 | mv[pos + 4])
            if end - pos < size:
                break
            if mv[pos] != RECORD_TYPE:
                raise ValueError("bad record")
            records += 1
            pos += size
        if pos:
            mv[: end - pos] = mv[pos:end]
            end -= pos
    return records


def _feed(ring: RingBuffer, chunk: bytes) -> None:
    view = ring.get_buffer(-1)
    n = len(chunk)
    if n <= len(view):
        view[:n] = chunk
        del view
        ring.buffer_updated(n)
    else:
        del view
        ring.buffer_updated(0)
        ring.write(chunk)


def ring_peek(chunks: list[bytes], pool: BufferPool | None = None) -> int:
    records = 0
    with RingBuffer(256 * 1024, max_capacity=1 << 20, pool=pool) as ring:
        for chunk in chunks:
            _feed(ring, chunk)
            while len(ring) >= HEADER:
                hdr = ring.peek(HEADER)
                size = HEADER + (hdr[3] << 8 | hdr[4])
                if len(ring) < size:
                    break
                rec = ring.peek(size)
                if rec[0] != RECORD_TYPE:
                    raise ValueError("bad record")
                ring.consume(size)
                records += 1
    return records


def ring_frame(chunks: list[bytes], pool: BufferPool | None = None) -> int:
    records = 0
    with RingBuffer(256 * 1024, max_capacity=1 << 20, pool=pool) as ring:
        for chunk in chunks:
            _feed(ring, chunk)
            while (rec := ring.peek_frame(HEADER, 3, 2)) is not None:
                if rec[0] != RECORD_TYPE:
                    raise ValueError("bad record")
                ring.consume(len(rec))
                records += 1
    return records


def ring_batch(chunks: list[bytes], pool: BufferPool | None = None) -> int:
    records = 0
    with RingBuffer(256 * 1024, max_capacity=1 << 20, pool=pool) as ring:
        for chunk in chunks:
            _feed(ring, chunk)
            while len(ring) >= HEADER:
                view = ring.readable_views()[0]
                end = len(view)
                pos = 0
                while end - pos >= HEADER:
                    size = HEADER + (view[pos + 3] << 8 | view[pos + 4])
                    if end - pos < size:
                        break
                    if view[pos] != RECORD_TYPE:
                        raise ValueError("bad record")
                    records += 1
                    pos += size
                del view
                if pos:
                    ring.consume(pos)
                    continue
                # The next record straddles the wrap point (or is incomplete).
                hdr = ring.peek(HEADER)
                size = HEADER + (hdr[3] << 8 | hdr[4])
                if len(ring) < size:
                    break
                if ring.peek(size)[0] != RECORD_TYPE:
                    raise ValueError("bad record")
                ring.consume(size)
                records += 1
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=100, help="MB parsed per variant and repeat")
    parser.add_argument("--chunk-kb", type=int, default=64, help="bytes per simulated read (KiB)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    block, block_records = record_block()
    reps = max(1, args.mb * 1_000_000 // len(block))
    data = block * reps
    step = args.chunk_kb * 1024
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    want = reps * block_records
    pool = BufferPool(classes=(64, 256, 1024, 4096, 16384, 65536, 262144))
    variants: dict[str, Callable[[list[bytes]], int]] = {
        "naive": naive,
        "hand": hand,
        "ring-peek": ring_peek,
        "ring-peek (pool)": lambda c: ring_peek(c, pool),
        "ring-frame": ring_frame,
        "ring-frame (pool)": lambda c: ring_frame(c, pool),
        "ring-batch": ring_batch,
        "ring-batch (pool)": lambda c: ring_batch(c, pool),
    }
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            got = fn(chunks)
            dt = time.perf_counter() - t0
            if got != want:
                raise AssertionError(f"{name}: {got} records, expected {want}")
            best[name] = min(best.get(name, dt), dt)
    print(
        f"{len(data) / 1e6:.0f} MB, {want:,} records, {args.chunk_kb} KiB reads, "
        f"best of {args.repeat}, Python {sys.version.split()[0]}"
    )
    print(f"{'variant':<20}{'ns/record':>12}{'GB/s':>8}{'x naive':>9}")
    for name, dt in best.items():
        print(
            f"{name:<20}{dt / want * 1e9:>12.0f}{len(data) / dt / 1e9:>8.2f}"
            f"{best['naive'] / dt:>8.2f}x"
        )


if __name__ == "__main__":
    main()
