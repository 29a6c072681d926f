"""Record-framing server over loopback: naive Protocol vs StreamReader vs PooledProtocol.

A client process streams TLS-like records (5-byte header: type 23, version 0x0303, 2-byte
big-endian length; mix 40% 100-300 B, 30% 1-4 KiB, 30% 16 KiB, or with ``--sizes small`` all
100-300 B) to a server in this process
as fast as it can.  The server parses every record and checks its type byte, with:

  ceiling       BufferedProtocol into one fixed buffer, no parsing (loopback + client limit)
  naive         Protocol: ``buf += data``, ``bytes`` slice per record, ``del buf[:n]``
  streamreader  ``await reader.readexactly(5)`` then ``readexactly(length)``
  pooled        ``bufpool.aio.PooledProtocol``: ``ring.peek_frame(5, 3, 2)``, ``consume``, per
                record
  pooled-batch  the same protocol parsing the ring's contiguous readable view by offset, one
                ``consume`` per batch (``peek`` only for a record straddling the wrap)

on the default loop and on uvloop.  ``--repeat`` rounds interleave all variants; in each, a
variant gets a fresh server, one warm-up connection and one measured one (median reported,
and the min-max over rounds of each round's ratio to naive, since a round's variants run
back to back under the same load).  Server CPU (user+sys) and minor page faults come from
``resource.getrusage`` of this process between connection_made and EOF; the client is a
separate process and not counted.

``--tls``: the same over TLS terminated in the server (``create_server(..., ssl=ctx)``,
``start_server(..., ssl=ctx)``; TLS 1.3, a throwaway self-signed ECDSA certificate made with
``cryptography``).  The client process encrypts with ``ssl.SSLSocket`` and ends each
connection with close_notify.  Both loops' SSL transports decrypt into the BufferedProtocol
variants' ``get_buffer`` view (the pooled ring) and hand the Protocol/StreamReader variants a
new ``bytes`` per read.  The handshake is not measured (connection_made runs after it).

    python bench/bench_stream.py                # 50 MB per connection, a few seconds
    python bench/bench_stream.py --mb 200 --repeat 5
    python bench/bench_stream.py --tls --variants naive,streamreader,pooled,pooled-batch
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bufpool import BufferPool, RingBuffer
from bufpool.aio import PooledProtocol

HOST = "127.0.0.1"
HEADER = 5
RECORD_TYPE = 23
VARIANTS = ("ceiling", "naive", "streamreader", "pooled", "pooled-batch")
LOOPS = ("asyncio", "uvloop")


# ---------------------------------------------------------------- the record stream
def record_block(
    seed: int = 7, target: int = 4 * 1024 * 1024, sizes: str = "mix"
) -> tuple[bytes, int]:
    """About ``target`` bytes of whole records and how many records they hold (``sizes``:
    "mix" 40% 100-300 B, 30% 1-4 KiB, 30% 16 KiB; "small" all 100-300 B)."""
    rng = random.Random(seed)
    source = rng.randbytes(20000)
    out = bytearray()
    count = 0
    while len(out) < target:
        r = 0.0 if sizes == "small" else rng.random()
        if r < 0.4:
            n = rng.randint(100, 300)
        elif r < 0.7:
            n = rng.randint(1024, 4096)
        else:
            n = 16384
        off = rng.randrange(0, len(source) - n)
        out += bytes((RECORD_TYPE, 3, 3)) + n.to_bytes(2, "big") + source[off : off + n]
        count += 1
    return bytes(out), count


def run_client(
    port: int, total_bytes: int, connections: int, cert: str | None = None, sizes: str = "mix"
) -> None:
    """Client process: for each connection, send whole blocks until ``total_bytes``, half-close
    (TLS: close_notify), wait for the server to close."""
    block, _ = record_block(sizes=sizes)
    reps = max(1, total_bytes // len(block))
    view = memoryview(block)
    ctx = None
    if cert is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cert)
    for _ in range(connections):
        with socket.create_connection((HOST, port)) as sock:
            if ctx is None:
                for _ in range(reps):
                    sock.sendall(view)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
                continue
            with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                for _ in range(reps):
                    tls.sendall(view)
                try:
                    tls.unwrap()  # close_notify; returns at the server's
                except (OSError, ssl.SSLError):
                    pass  # the server closed without answering it: the data was all read


# ---------------------------------------------------------------- measurement
@dataclass
class Run:
    nbytes: int = 0
    records: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    minflt: int = 0


class Meter:
    """Start at connection_made, stop at EOF; collects one Run per connection."""

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self._t0 = 0.0
        self._ru: Any = None
        self.done: asyncio.Queue[Run] = asyncio.Queue()

    def start(self) -> None:
        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self._t0 = time.perf_counter()

    def stop(self, nbytes: int, records: int) -> None:
        wall = time.perf_counter() - self._t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        r0 = self._ru
        cpu = (ru.ru_utime - r0.ru_utime) + (ru.ru_stime - r0.ru_stime)
        self.done.put_nowait(Run(nbytes, records, wall, cpu, ru.ru_minflt - r0.ru_minflt))


def bad_record(rec: Any) -> None:
    raise ValueError(f"bad record type {rec[0]}")


# ---------------------------------------------------------------- server variants
class Ceiling(asyncio.BufferedProtocol):
    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.buf = memoryview(bytearray(256 * 1024))
        self.nbytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.meter.start()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes

    def eof_received(self) -> bool | None:
        self.meter.stop(self.nbytes, 0)
        return None


class Naive(asyncio.Protocol):
    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.buf = bytearray()
        self.nbytes = 0
        self.records = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.meter.start()

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        buf = self.buf
        buf += data
        while len(buf) >= HEADER:
            size = HEADER + int.from_bytes(buf[3:5], "big")
            if len(buf) < size:
                break
            rec = bytes(buf[:size])
            del buf[:size]
            if rec[0] != RECORD_TYPE:
                bad_record(rec)
            self.records += 1

    def eof_received(self) -> bool | None:
        self.meter.stop(self.nbytes, self.records)
        return None


def stream_handler(meter: Meter) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        meter.start()
        nbytes = records = 0
        try:
            while True:
                hdr = await reader.readexactly(HEADER)
                body = await reader.readexactly(int.from_bytes(hdr[3:5], "big"))
                if hdr[0] != RECORD_TYPE:
                    bad_record(hdr)
                nbytes += HEADER + len(body)
                records += 1
        except asyncio.IncompleteReadError as exc:
            nbytes += len(exc.partial)
        meter.stop(nbytes, records)
        writer.close()

    return handle


class Pooled(PooledProtocol):
    def __init__(self, meter: Meter, pool: BufferPool, ring_size: int) -> None:
        super().__init__(pool, capacity=ring_size, max_capacity=max(ring_size, 1 << 20))
        self.meter = meter
        self.nbytes = 0
        self.records = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.meter.start()

    def data_available(self, ring: RingBuffer) -> None:
        records = 0
        consumed = 0
        while (rec := ring.peek_frame(HEADER, 3, 2)) is not None:
            if rec[0] != RECORD_TYPE:
                bad_record(rec)
            size = len(rec)
            ring.consume(size)
            records += 1
            consumed += size
        self.records += records
        self.nbytes += consumed

    def eof_received(self) -> bool | None:
        self.meter.stop(self.nbytes + len(self.ring), self.records)
        return None


class PooledBatch(Pooled):
    def data_available(self, ring: RingBuffer) -> None:
        records = 0
        consumed = 0
        while len(ring) >= HEADER:
            view = ring.readable_views()[0]
            end = len(view)
            pos = 0
            while end - pos >= HEADER:
                size = HEADER + (view[pos + 3] << 8 | view[pos + 4])
                if end - pos < size:
                    break
                if view[pos] != RECORD_TYPE:
                    bad_record(view[pos:])
                records += 1
                pos += size
            del view
            if pos:
                ring.consume(pos)
                consumed += pos
                continue
            hdr = ring.peek(HEADER)  # the next record straddles the wrap, or is incomplete
            size = HEADER + (hdr[3] << 8 | hdr[4])
            if len(ring) < size:
                break
            rec = ring.peek(size)
            if rec[0] != RECORD_TYPE:
                bad_record(rec)
            ring.consume(size)
            records += 1
            consumed += size
        self.records += records
        self.nbytes += consumed


# ---------------------------------------------------------------- driver
def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.SelectorEventLoop


async def serve_variant(variant: str, args: argparse.Namespace, per_conn: int) -> list[Run]:
    loop = asyncio.get_running_loop()
    meter = Meter()
    ring_size = args.ring_kb * 1024
    pool = BufferPool(classes=sorted({64, 256, 1024, 4096, 16384, 65536, ring_size}))
    server: asyncio.Server
    tls = args.tls_context
    if variant == "streamreader":
        server = await asyncio.start_server(stream_handler(meter), HOST, 0, ssl=tls)
    else:
        factories: dict[str, Callable[[], asyncio.BaseProtocol]] = {
            "ceiling": lambda: Ceiling(meter),
            "naive": lambda: Naive(meter),
            "pooled": lambda: Pooled(meter, pool, ring_size),
            "pooled-batch": lambda: PooledBatch(meter, pool, ring_size),
        }
        server = await loop.create_server(factories[variant], HOST, 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    connections = 2
    cmd = [sys.executable, __file__, "--client", str(port), str(per_conn), str(connections),
           "--sizes", args.sizes]
    if args.cert is not None:
        cmd += ["--client-cert", str(args.cert)]
    client = subprocess.Popen(cmd)
    runs = [await asyncio.wait_for(meter.done.get(), 600) for _ in range(connections)]
    await asyncio.to_thread(client.wait, 60)
    server.close()
    await server.wait_closed()
    if variant.startswith("pooled"):
        stats = pool.stats()
        assert stats.in_use == 0 and stats.heap_in_use == 0, stats
    return runs[1:]  # the first connection warms up


def summarize(
    runs: list[Run], block_records: int, block_len: int, per_conn: int
) -> dict[str, float]:
    reps = max(1, per_conn // block_len)
    want_bytes = reps * block_len
    for r in runs:
        assert r.nbytes == want_bytes, (r.nbytes, want_bytes)
        assert r.records in (0, reps * block_records), (r.records, reps * block_records)
    med = statistics.median
    records = reps * block_records
    return {
        "MB/s": med(r.nbytes / r.wall / 1e6 for r in runs),
        "records/s": med(records / r.wall for r in runs),
        "cpu_us_per_record": med(r.cpu / records * 1e6 for r in runs),
        "minflt": med(r.minflt for r in runs),
        "wall_s": med(r.wall for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=50, help="MB per measured connection")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (measured runs per variant)")
    parser.add_argument("--loops", default=",".join(LOOPS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--ring-kb", type=int, default=256, help="PooledProtocol ring size (KiB)")
    parser.add_argument("--sizes", choices=("mix", "small"), default="mix",
                        help="record sizes: the mix (default) or all 100-300 B")
    parser.add_argument("--tls", action="store_true",
                        help="terminate TLS in the server (TLS 1.3, throwaway certificate)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--client", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client-cert", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run_client(*args.client, cert=args.client_cert, sizes=args.sizes)
        return
    args.cert = None
    args.tls_context = None
    directory = Path(tempfile.mkdtemp(prefix="bench-stream-tls-")) if args.tls else None
    try:
        if directory is not None:
            from bufpool.loadtest._tls import make_certificate

            args.cert, key = make_certificate(directory, ["localhost"])
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(args.cert, key)
            args.tls_context = ctx
        measure_all(args)
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def measure_all(args: argparse.Namespace) -> None:
    block, block_records = record_block(sizes=args.sizes)
    per_conn = args.mb * 1_000_000
    loops = args.loops.split(",")
    variants = args.variants.split(",")
    runs: dict[tuple[str, str], list[Run]] = {(lp, v): [] for lp in loops for v in variants}
    # Rounds interleave the variants so that load from elsewhere hits them all alike.
    for _ in range(args.repeat):
        for loop_name in loops:
            for variant in variants:
                with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
                    runs[loop_name, variant] += runner.run(serve_variant(variant, args, per_conn))
    results: dict[str, dict[str, dict[str, float]]] = {
        lp: {v: summarize(runs[lp, v], block_records, len(block), per_conn) for v in variants}
        for lp in loops
    }
    if "naive" in variants:  # per-round ratios: both sides of a round ran under the same load
        for lp in loops:
            for v in variants:
                mbs = [r.nbytes / r.wall / (n.nbytes / n.wall)
                       for r, n in zip(runs[lp, v], runs[lp, "naive"], strict=True)]
                cpu = [(r.cpu / max(r.records, 1)) / (n.cpu / max(n.records, 1))
                       for r, n in zip(runs[lp, v], runs[lp, "naive"], strict=True)]
                results[lp][v].update(mbs_vs_naive_min=min(mbs), mbs_vs_naive_max=max(mbs),
                                      cpu_vs_naive_min=min(cpu), cpu_vs_naive_max=max(cpu))
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            saved = {k: v for k, v in vars(args).items() if k not in ("tls_context", "cert")}
            json.dump({"args": saved, "results": results}, f, indent=2)


def report(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"record framing ({args.sizes}) over loopback{' over TLS 1.3' if args.tls else ''}, "
        f"{args.mb} MB x {args.repeat} per variant (median), ring {args.ring_kb} KiB"
    )
    for col in (
        "loop",
        "variant",
        "MB/s",
        "records/s",
        "CPU µs/rec",
        "minor faults",
        "x naive MB/s (rounds)",
        "x naive CPU/rec (rounds)",
        "% of ceiling",
    ):
        table.add_column(col, justify="right")
    for loop_name, by_variant in results.items():
        naive = by_variant.get("naive")
        ceiling = by_variant.get("ceiling")
        for variant, m in by_variant.items():
            parsed = variant != "ceiling"
            table.add_row(
                loop_name,
                variant,
                f"{m['MB/s']:,.0f}",
                f"{m['records/s']:,.0f}" if parsed else "-",
                f"{m['cpu_us_per_record']:.2f}",
                f"{m['minflt']:,.0f}",
                f"{m['MB/s'] / naive['MB/s']:.2f}x ({m['mbs_vs_naive_min']:.2f}-"
                f"{m['mbs_vs_naive_max']:.2f})" if naive and parsed else "-",
                f"{m['cpu_us_per_record'] / naive['cpu_us_per_record']:.2f}x "
                f"({m['cpu_vs_naive_min']:.2f}-{m['cpu_vs_naive_max']:.2f})"
                if naive and parsed else "-",
                f"{100 * m['MB/s'] / ceiling['MB/s']:.0f}%" if ceiling else "-",
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
