"""TLSRecordSplitter records/s against the naive splitter a user would write, one run.

Three splitters run in this process on the same streams, in alternating rounds:

  naive    ``buf += chunk``; per record ``bytes(buf[5:5 + n])`` and ``del buf[:5 + n]``
           (no validation at all; records as (type, payload bytes) tuples)
  python   ``_ReferenceSplitter``: the pure-Python scan loop (records of the active type)
  c        ``TLSRecordSplitter``: the compiled scanner and record type of
           bufpool/tls/_cscan.c when it is built

Every variant reads ``len(payload)`` of every record it hands out (the consumer's minimum).
Per workload and path the table shows the best round's ns per record and records/s, and the
ratio compiled/naive and compiled/pure-Python records/s as best-of and as the min-max over
the rounds (each round times all three back to back, so a round's ratio shares its load).

Workloads (application_data records after one handshake record):

  small   100-300 B records (issue 7's target: C >= 2x pure Python)
  mix     bench_tls.py's mix: 40% 100-300 B, 30% 1-4 KiB, 30% 16,401 B
  medium  1-4 KiB records
  full    16,401 B records (a full TLS 1.3 record)

Paths: ``feed`` (64 KiB chunks of bytes) and ``ring`` (``get_buffer`` / ``buffer_updated``
with 64 KiB reads; the copy into the ring, a socket's work, is not timed).  Timed: every
splitter call, including the expiry of the previous call's records.

    python bench/bench_tls_scan.py                # a few seconds
    python bench/bench_tls_scan.py --rounds 9 --mb 8
    python bench/bench_tls_scan.py --pure-core    # also: everything pure Python (subprocess)
    python bench/bench_tls_scan.py --parts        # where the time goes, 100-300 B records
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import bufpool
from bufpool import BufferPool
from bufpool.tls import TLSRecordSplitter
from bufpool.tls._splitter import SCANNER, _ReferenceSplitter

HELLO = bytes((22, 3, 1, 0, 4, 1, 0, 0, 0))
WORKLOADS: dict[str, Callable[[random.Random], int]] = {
    "small": lambda r: r.randint(100, 300),
    "mix": lambda r: (r.randint(100, 300) if (x := r.random()) < 0.4
                      else r.randint(1024, 4096) if x < 0.7 else 16401),
    "medium": lambda r: r.randint(1024, 4096),
    "full": lambda r: 16401,
}


def stream_of(sizes: Callable[[random.Random], int], nbytes: int, seed: int = 7
              ) -> tuple[bytes, int]:
    rng = random.Random(seed)
    source = rng.randbytes(20000)
    out = bytearray(HELLO)
    count = 1
    while len(out) < nbytes:
        n = sizes(rng)
        off = rng.randrange(0, len(source) - n)
        out += bytes((23, 3, 3)) + n.to_bytes(2, "big") + source[off:off + n]
        count += 1
    return bytes(out), count


def time_naive(chunks: list[bytes]) -> float:
    """The naive splitter: a growing bytearray, a copy per record, a delete from the front."""
    buf = bytearray()
    n = 0
    total = 0
    t0 = time.perf_counter_ns()
    for c in chunks:
        buf += c
        out = []
        while len(buf) >= 5:
            ln = buf[3] << 8 | buf[4]
            if len(buf) < 5 + ln:
                break
            out.append((buf[0], bytes(buf[5:5 + ln])))
            del buf[:5 + ln]
        for _, payload in out:
            total += len(payload)
        n += len(out)
    return (time.perf_counter_ns() - t0) / n


def time_feed(cls: type[TLSRecordSplitter], chunks: list[bytes], pool: BufferPool) -> float:
    s = cls(pool=pool)
    n = 0
    total = 0
    t0 = time.perf_counter_ns()
    for c in chunks:
        out = s.feed(c)
        for rec in out:
            total += len(rec.payload)
        n += len(out)
    s.feed(b"")  # expires the last call's records
    dt = time.perf_counter_ns() - t0
    s.close()
    return dt / n


def time_ring(cls: type[TLSRecordSplitter], stream: bytes, pool: BufferPool) -> float:
    s = cls(pool=pool)
    n = 0
    total = 0
    dt = 0
    pos = 0
    view = memoryview(stream)
    clock = time.perf_counter_ns
    while pos < len(stream):
        t0 = clock()
        buf = s.get_buffer(65536)
        dt += clock() - t0
        k = min(len(buf), len(stream) - pos, 65536)
        buf[:k] = view[pos:pos + k]
        del buf
        pos += k
        t0 = clock()
        out = s.buffer_updated(k)
        for rec in out:
            total += len(rec.payload)
        n += len(out)
        dt += clock() - t0
    t0 = clock()
    s.expire()
    dt += clock() - t0
    s.close()
    return dt / n


def measure(mb: float, rounds: int, workloads: list[str]) -> list[dict[str, Any]]:
    pool = BufferPool(leak_detection="off")
    rows = []
    for name in workloads:
        stream, count = stream_of(WORKLOADS[name], int(mb * 1e6))
        chunks = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]
        for path in ("feed", "ring"):
            per_round: list[dict[str, float]] = []
            for i in range(rounds):
                ns: dict[str, float] = {}
                order = [("naive", None), ("python", _ReferenceSplitter),
                         ("c", TLSRecordSplitter)]
                if i % 2:
                    order.reverse()
                for label, cls in order:
                    if cls is None:
                        ns[label] = time_naive(chunks)
                    elif path == "feed":
                        ns[label] = time_feed(cls, chunks, pool)
                    else:
                        ns[label] = time_ring(cls, stream, pool)
                per_round.append(ns)
            best = {k: min(r[k] for r in per_round) for k in ("naive", "python", "c")}
            vs_naive = [r["naive"] / r["c"] for r in per_round]
            vs_py = [r["python"] / r["c"] for r in per_round]
            rows.append({"workload": name, "path": path, "records": count,
                         "naive_ns": best["naive"], "python_ns": best["python"],
                         "c_ns": best["c"], "ratio": best["python"] / best["c"],
                         "vs_naive": best["naive"] / best["c"],
                         "vs_naive_range": [min(vs_naive), max(vs_naive)],
                         "vs_python_range": [min(vs_py), max(vs_py)]})
    return rows


def parts(rounds: int) -> None:
    """ns per 100-300 B record of the pieces of ``feed`` (whole-record 64 KiB chunks, so the
    scan alone sees only complete records): the compiled scan, ``feed`` with the expiry, and
    ``feed`` with every ``len(rec.payload)`` read; plus the bare consumer loop."""
    from bufpool.tls import _splitter

    pool = BufferPool(leak_detection="off")
    stream, _ = stream_of(WORKLOADS["small"], 4_000_000)
    chunks: list[bytes] = []
    cur = bytearray()
    pos = len(HELLO)
    while pos < len(stream):
        n = 5 + (stream[pos + 3] << 8 | stream[pos + 4])
        if len(cur) + n > 65536:
            chunks.append(bytes(cur))
            cur = bytearray()
        cur += stream[pos:pos + n]
        pos += n
    chunks.append(bytes(cur))
    limit = 18432

    def scan_only() -> float:
        n = 0
        t = time.perf_counter_ns()
        for c in chunks:
            out: list[Any] = []
            m = memoryview(c)
            _splitter._c_scan(m, 0, len(m), 0, out, limit, pool)
            n += len(out)
        return (time.perf_counter_ns() - t) / n

    def feed(read: bool) -> float:
        s = TLSRecordSplitter(pool=pool, mid_stream=True)
        n = total = 0
        t = time.perf_counter_ns()
        for c in chunks:
            out = s.feed(c)
            n += len(out)
            if read:
                for rec in out:
                    total += len(rec.payload)
        s.feed(b"")
        dt = time.perf_counter_ns() - t
        s.close()
        return dt / n

    def loop_only() -> float:
        lists = [[None] * 300 for _ in range(len(chunks))]
        n = total = 0
        t = time.perf_counter_ns()
        for out in lists:
            for _rec in out:
                total += 1
            n += len(out)
        return (time.perf_counter_ns() - t) / n

    pieces: list[tuple[str, Callable[[], float]]] = [
        ("feed, expiry", lambda: feed(False)),
        ("feed, expiry, len(payload)", lambda: feed(True)),
        ("bare consumer loop", loop_only),
    ]
    if SCANNER == "c":
        pieces.insert(0, ("compiled scan alone", scan_only))
    print(f"ns per 100-300 B record, best of {rounds} (scanner {SCANNER}):")
    for label, f in pieces:
        print(f"  {label:28} {min(f() for _ in range(rounds)):6.0f}")


def pure_core(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same measurement with everything pure Python (BUFPOOL_NO_EXTENSIONS=1)."""
    env = dict(os.environ, BUFPOOL_NO_EXTENSIONS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--json-stdout", "--mb", str(args.mb), "--rounds",
         str(args.rounds), "--workloads", args.workloads],
        env=env, check=True, capture_output=True, text=True,
    ).stdout
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--mb", type=float, default=2.0, help="MB of stream per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds, best kept")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--pure-core", action="store_true",
                        help="also run everything pure Python in a subprocess")
    parser.add_argument("--parts", action="store_true",
                        help="only time the pieces of feed() on 100-300 B records")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parts:
        parts(args.rounds)
        return
    rows = measure(args.mb, args.rounds, args.workloads.split(","))
    if args.json_stdout:
        print(json.dumps(rows))
        return
    print(f"Python {sys.version.split()[0]}, core {bufpool.IMPLEMENTATION}, scanner {SCANNER}; "
          f"{args.mb:g} MB per round, best of {args.rounds} alternating rounds")
    if SCANNER != "c":
        print("(the compiled scanner is not active: both columns are the pure-Python "
              "reference)")
    head = (f"{'workload':8} {'path':5} {'naive':>18} {'pure Python':>18} "
            f"{'compiled':>18} {'c/naive (rounds)':>21} {'c/python (rounds)':>21}")
    print(head)
    print("-" * len(head))

    def cell(ns: float) -> str:
        return f"{1e9 / ns / 1e6:6.2f} M/s {ns:5.0f} ns"

    for r in rows:
        nv, py, c = float(r["naive_ns"]), float(r["python_ns"]), float(r["c_ns"])
        lo, hi = r["vs_naive_range"]
        plo, phi = r["vs_python_range"]
        print(f"{r['workload']!s:8} {r['path']!s:5} {cell(nv)} {cell(py)} {cell(c)} "
              f"{nv / c:5.2f}x ({lo:.2f}-{hi:.2f}) {py / c:5.2f}x ({plo:.2f}-{phi:.2f})")
    print("(naive validates nothing and has no ring path: its figure is the same per workload)")
    if args.pure_core:
        print("\neverything pure Python (BUFPOOL_NO_EXTENSIONS=1, its own process):")
        for r in pure_core(args):
            py, nv = float(r["python_ns"]), float(r["naive_ns"])
            print(f"{r['workload']!s:8} {r['path']!s:5} {1e9 / py / 1e6:7.2f} M/s {py:6.0f} ns"
                  f"  ({nv / py:.2f}x naive)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
