"""TLS record splitting over loopback: TLSRecordProtocol vs what a user would write by hand.

A client process streams a realistic TLS record mix (one handshake record, then
application_data records: 40% 100-300 B, 30% 1-4 KiB, 30% full TLS 1.3 records of 16,401 B
payload) to a server in this process, which splits and validates every record with:

  ceiling       BufferedProtocol into one fixed 256 KiB buffer, no parsing (loopback limit)
  naive         asyncio.Protocol: ``buf += data``, ``bytes`` slice per record, ``del buf[:n]``
  streamreader  ``readexactly(5)`` then ``readexactly(length)``
  tls           bufpool.tls.TLSRecordProtocol, ``record_received`` per record (zero-copy views)
  tls-detach    the same, every record ``detach()``-ed into a pooled lease and released
                (what a forwarding proxy does); reports that pool's waste ratio

All variants validate headers the same way (type 20..24, version major 3, length limit).
Server CPU (user+sys, ``getrusage``) is measured between connection_made and EOF; the client
is another process.  Also an in-process line: ``TLSRecordSplitter.feed`` over 64 KiB chunks.

    python bench/bench_tls.py                   # 40 MB per run, both loops, a few seconds
    python bench/bench_tls.py --mb 200 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bufpool import BufferPool
from bufpool.tls import RECORD_POOL_CLASSES, TLSRecord, TLSRecordProtocol, TLSRecordSplitter

HOST = "127.0.0.1"
VARIANTS = ("ceiling", "naive", "streamreader", "tls", "tls-detach")
#: The six default BufferPool classes, for the detached-waste comparison line.
DEFAULT_CLASSES = (64, 256, 1024, 4096, 16384, 65536)
LOOPS = ("asyncio", "uvloop")
LIMIT = 16384 + 2048
HELLO = bytes((22, 3, 1, 0, 4, 1, 0, 0, 0))


def record_block(seed: int = 11, target: int = 4 * 1024 * 1024) -> tuple[bytes, int]:
    """About ``target`` bytes of application_data records, and how many."""
    rng = random.Random(seed)
    source = rng.randbytes(20000)
    out = bytearray()
    count = 0
    while len(out) < target:
        r = rng.random()
        n = rng.randint(100, 300) if r < 0.4 else rng.randint(1024, 4096) if r < 0.7 else 16401
        off = rng.randrange(0, len(source) - n)
        out += bytes((23, 3, 3)) + n.to_bytes(2, "big") + source[off:off + n]
        count += 1
    return bytes(out), count


def run_client(port: int, reps: int) -> None:
    block, _ = record_block()
    view = memoryview(block)
    with socket.create_connection((HOST, port)) as sock:
        sock.sendall(HELLO)
        for _ in range(reps):
            sock.sendall(view)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


@dataclass
class Run:
    records: int
    nbytes: int
    wall: float
    cpu: float


class Meter:
    def __init__(self) -> None:
        self.done: asyncio.Future[Run] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        self.ru = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()

    def stop(self, records: int, nbytes: int) -> None:
        wall = time.perf_counter() - self.t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru.ru_utime - self.ru.ru_utime + ru.ru_stime - self.ru.ru_stime
        if not self.done.done():
            self.done.set_result(Run(records, nbytes, wall, cpu))


def check(ct: int, major: int, n: int) -> None:
    if not 20 <= ct <= 24 or major != 3 or n > LIMIT:
        raise ValueError(f"bad header {ct} {major} {n}")


class Ceiling(asyncio.BufferedProtocol):
    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.buf = memoryview(bytearray(256 * 1024))
        self.nbytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.meter.start()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes

    def eof_received(self) -> bool | None:
        self.meter.stop(0, self.nbytes)
        return None


class Naive(asyncio.Protocol):
    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.buf = bytearray()
        self.records = self.nbytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.meter.start()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 5:
            n = (buf[3] << 8) | buf[4]
            check(buf[0], buf[1], n)
            if len(buf) < 5 + n:
                break
            rec = bytes(buf[:5 + n])
            del buf[:5 + n]
            self.records += 1
            self.nbytes += len(rec)

    def eof_received(self) -> bool | None:
        self.meter.stop(self.records, self.nbytes)
        return None


def stream_handler(meter: Meter) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        meter.start()
        records = nbytes = 0
        try:
            while True:
                hdr = await reader.readexactly(5)
                n = (hdr[3] << 8) | hdr[4]
                check(hdr[0], hdr[1], n)
                body = await reader.readexactly(n)
                records += 1
                nbytes += 5 + len(body)
        except asyncio.IncompleteReadError:
            pass
        meter.stop(records, nbytes)
        writer.close()

    return handle


class Records(TLSRecordProtocol):
    def __init__(self, meter: Meter, pool: BufferPool, detach_pool: BufferPool | None,
                 ring: int) -> None:
        super().__init__(pool, capacity=ring)
        self.meter = meter
        self.detach_pool = detach_pool
        self.records = self.nbytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.meter.start()

    def record_received(self, record: TLSRecord) -> None:
        self.records += 1
        self.nbytes += len(record.raw)
        if self.detach_pool is not None:
            record.detach(self.detach_pool).release()

    def eof_received(self) -> bool | None:
        super().eof_received()
        self.meter.stop(self.records, self.nbytes)
        return None


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.SelectorEventLoop


async def one_run(variant: str, reps: int, ring: int) -> tuple[Run, float | None]:
    loop = asyncio.get_running_loop()
    meter = Meter()
    # the ring gets a size class of its own so it is pooled memory, not a heap fallback
    pool = BufferPool(classes=sorted({64, 256, 1024, 4096, 16384, 65536, ring}),
                      leak_detection="off")
    detach_pool = (
        BufferPool(classes=RECORD_POOL_CLASSES, leak_detection="off")
        if variant == "tls-detach"
        else None
    )
    if variant == "streamreader":
        server = await asyncio.start_server(stream_handler(meter), HOST, 0)
    elif variant == "ceiling":
        server = await loop.create_server(lambda: Ceiling(meter), HOST, 0)
    elif variant == "naive":
        server = await loop.create_server(lambda: Naive(meter), HOST, 0)
    else:
        server = await loop.create_server(lambda: Records(meter, pool, detach_pool, ring), HOST, 0)
    port = server.sockets[0].getsockname()[1]
    client = subprocess.Popen([sys.executable, __file__, "--client", str(port), str(reps)])
    run = await asyncio.wait_for(meter.done, 600)
    await asyncio.to_thread(client.wait, 60)
    server.close()
    await server.wait_closed()
    waste = None
    if detach_pool is not None:
        waste = detach_pool.stats().waste_ratio
    return run, waste


def in_process(block: bytes, reps: int) -> float:
    """ns per record for TLSRecordSplitter.feed over 64 KiB chunks, no sockets."""
    stream = HELLO + block * reps
    chunks = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]
    s = TLSRecordSplitter(pool=BufferPool(leak_detection="off"))
    t0 = time.perf_counter()
    n = 0
    for c in chunks:
        n += len(s.feed(c))
    dt = time.perf_counter() - t0
    s.close()
    return dt / n * 1e9


def detached_waste(block: bytes, classes: tuple[int, ...]) -> float:
    """Waste ratio of detaching every record of ``block`` into a pool with ``classes``."""
    pool = BufferPool(classes=classes, leak_detection="off")
    s = TLSRecordSplitter(pool=pool, mid_stream=True)
    for r in s.feed(block):
        r.detach().release()
    s.close()
    st = pool.stats()
    ring_tier = next(t for t in st.tiers if t.size == 65536)
    leased = sum(t.leased_bytes for t in st.tiers) - ring_tier.leased_bytes
    asked = sum(t.requested_bytes for t in st.tiers) - ring_tier.requested_bytes
    return 1 - asked / leased


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--mb", type=int, default=40, help="MB per measured connection")
    parser.add_argument("--repeat", type=int, default=1, help="measured runs per variant")
    parser.add_argument("--loops", default=",".join(LOOPS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--ring-kb", type=int, default=256, help="TLSRecordProtocol ring (KiB)")
    parser.add_argument("--json", help="also write results to this file")
    parser.add_argument("--client", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run_client(*args.client)
        return
    block, block_records = record_block()
    reps = max(1, args.mb * 1_000_000 // len(block))
    expected = reps * block_records + 1
    results: dict[str, dict[str, dict[str, float]]] = {}
    for loop_name in args.loops.split(","):
        runs: dict[str, list[tuple[Run, float | None]]] = {v: [] for v in args.variants.split(",")}
        for _ in range(args.repeat + 1):  # the first round warms up
            for variant in runs:
                with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
                    runs[variant].append(runner.run(one_run(variant, reps, args.ring_kb * 1024)))
        results[loop_name] = {}
        for variant, got in runs.items():
            measured = got[1:]
            for run, _ in measured:
                assert run.records in (expected, 0), (variant, run.records, expected)
                assert run.nbytes == reps * len(block) + len(HELLO), (variant, run.nbytes)
            med = statistics.median
            row = {
                "MB/s": med(r.nbytes / r.wall / 1e6 for r, _ in measured),
                "records/s": med(expected / r.wall for r, _ in measured),
                "cpu_us_per_record": med(r.cpu / expected * 1e6 for r, _ in measured),
            }
            wastes = [w for _, w in measured if w is not None]
            if wastes:
                row["waste_ratio"] = med(wastes)
            results[loop_name][variant] = row
    sans_io = in_process(block, max(1, reps // 4))
    six = detached_waste(block, DEFAULT_CLASSES)
    report(results, sans_io, args, expected, six)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "sans_io_ns_per_record": sans_io},
                      f, indent=2)


def report(results: dict[str, dict[str, dict[str, float]]], sans_io: float,
           args: argparse.Namespace, records: int, six: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"TLS record splitting over loopback: {records:,} records "
                        f"({args.mb} MB) per run, median of {args.repeat}, ring {args.ring_kb} KiB")
    for col in ("loop", "variant", "MB/s", "records/s", "server CPU µs/rec", "x naive rec/s",
                "% of ceiling MB/s", "detached waste"):
        table.add_column(col, justify="right")
    for loop_name, rows in results.items():
        naive = rows.get("naive")
        ceiling = rows.get("ceiling")
        for variant, m in rows.items():
            parsed = variant != "ceiling"
            table.add_row(
                loop_name, variant, f"{m['MB/s']:,.0f}",
                f"{m['records/s']:,.0f}" if parsed else "-",
                f"{m['cpu_us_per_record']:.2f}",
                f"{m['records/s'] / naive['records/s']:.2f}x" if naive and parsed else "-",
                f"{100 * m['MB/s'] / ceiling['MB/s']:.0f}%" if ceiling else "-",
                f"{100 * m['waste_ratio']:.1f}%" if "waste_ratio" in m else "-",
            )
    console = Console()
    console.print(table)
    console.print(f"in-process TLSRecordSplitter.feed, 64 KiB chunks: {sans_io:.0f} ns/record")
    console.print(f"detached waste with the six default classes {DEFAULT_CLASSES}: "
                  f"{100 * six:.1f}% (tls-detach row: bufpool.tls.RECORD_POOL_CLASSES)")


if __name__ == "__main__":
    main()
