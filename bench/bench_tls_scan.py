"""TLSRecordSplitter records/s: the compiled scanner vs the pure-Python reference, one run.

Both splitters run in this process on the same streams, in alternating rounds (best round
kept, the usual timeit practice on a shared machine): ``TLSRecordSplitter`` (the compiled
scanner of bufpool/tls/_cscan.c when it is built) and ``_ReferenceSplitter`` (the pure-Python
``_scan``/expiry loops, whatever is built).  Everything else (pool, ring, joins) is shared.

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


def time_feed(cls: type[TLSRecordSplitter], chunks: list[bytes], pool: BufferPool) -> float:
    s = cls(pool=pool)
    n = 0
    t0 = time.perf_counter_ns()
    for c in chunks:
        n += len(s.feed(c))
    s.feed(b"")  # expires the last call's records
    dt = time.perf_counter_ns() - t0
    s.close()
    return dt / n


def time_ring(cls: type[TLSRecordSplitter], stream: bytes, pool: BufferPool) -> float:
    s = cls(pool=pool)
    n = 0
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
        n += len(s.buffer_updated(k))
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
            best: dict[str, float] = {}
            for _ in range(rounds):
                for label, cls in (("python", _ReferenceSplitter), ("c", TLSRecordSplitter)):
                    ns = (time_feed(cls, chunks, pool) if path == "feed"
                          else time_ring(cls, stream, pool))
                    best[label] = min(best.get(label, ns), ns)
            rows.append({"workload": name, "path": path, "records": count,
                         "python_ns": best["python"], "c_ns": best["c"],
                         "ratio": best["python"] / best["c"]})
    return rows


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
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = measure(args.mb, args.rounds, args.workloads.split(","))
    if args.json_stdout:
        print(json.dumps(rows))
        return
    print(f"Python {sys.version.split()[0]}, core {bufpool.IMPLEMENTATION}, scanner {SCANNER}; "
          f"{args.mb:g} MB per round, best of {args.rounds} alternating rounds")
    if SCANNER != "c":
        print("(the compiled scanner is not active: both columns are the pure-Python "
              "reference)")
    head = (f"{'workload':8} {'path':5} {'pure Python':>20} {'compiled scanner':>20} "
            f"{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        py, c = float(r["python_ns"]), float(r["c_ns"])
        print(f"{r['workload']!s:8} {r['path']!s:5} "
              f"{1e9 / py / 1e6:7.2f} M/s {py:6.0f} ns  {1e9 / c / 1e6:7.2f} M/s {c:6.0f} ns "
              f"{py / c:6.2f}x")
    if args.pure_core:
        print("\neverything pure Python (BUFPOOL_NO_EXTENSIONS=1, its own process):")
        for r in pure_core(args):
            py = float(r["python_ns"])
            print(f"{r['workload']!s:8} {r['path']!s:5} {1e9 / py / 1e6:7.2f} M/s {py:6.0f} ns")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
