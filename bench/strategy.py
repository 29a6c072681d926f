"""Choosing a buffer strategy: plain bytearray, BufferPool leases, LeaseChain, RingBuffer.

Measures, for each strategy, in one run:

1. Reuse determinism -- a stale reference is kept past release (a) as the very view handed
   out and (b) as a slice derived from it; the memory is then reused by the next owner, who
   writes its own pattern.  Counted over many trials: did the stale reference raise, keep
   the old bytes, or show the next owner's bytes?
2. acquire+release cost (ns/op, timeit-style best of 5) for 1 KiB and 16 KiB buffers, one
   thread and two threads (two threads: total wall time / total ops; CPython's GIL means this
   shows contention cost, not parallel speed-up).
3. Memory control under churn, each in a fresh subprocess: 64 connections each holding one
   in-flight message, messages of random sizes (64 B .. 256 KiB, log-uniform), 200k messages:
   RSS growth at peak over the pre-run baseline, minor page faults, and waste (bytes reserved
   but not asked for).
4. Setup/teardown: building and dropping a BufferPool; creating and closing a pool-backed
   RingBuffer (what PooledProtocol does per connection).

    python bench/strategy.py                 # about 30-60 s on a 2-core VM
    python bench/strategy.py --quick         # fewer iterations, a few seconds
    python bench/strategy.py --markdown out.md --json out.json

RingBuffer is per connection and not thread-safe: its "two threads" figure gives each thread
its own ring.  Its acquire+release is one receive: get_buffer + buffer_updated + consume.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import bufpool

STRATEGIES = ("bytearray", "lease", "chain", "ring")
LABELS = {
    "bytearray": "bytearray per buffer",
    "lease": "BufferPool lease",
    "chain": "LeaseChain",
    "ring": "RingBuffer (+PooledProtocol)",
}


# ---------------------------------------------------------------- 1. reuse determinism


def _probe(view: memoryview, marker: int) -> str:
    """'raised' | 'old' | 'foreign' for a stale view after the memory was reused."""
    try:
        first = view[0]
    except ValueError:
        return "raised"
    return "old" if first == marker else "foreign"


def determinism(trials: int) -> dict[str, dict[str, dict[str, int]]]:
    out: dict[str, dict[str, dict[str, int]]] = {}
    pool = bufpool.BufferPool(leak_detection="off")
    for name in STRATEGIES:
        counts = {
            "direct": {"raised": 0, "old": 0, "foreign": 0},
            "slice": {"raised": 0, "old": 0, "foreign": 0},
        }
        ring = bufpool.RingBuffer(4096, pool=pool)
        for t in range(trials):
            old_marker, new_marker = 1 + t % 100, 101 + t % 100
            if name == "bytearray":
                buf = bytearray(1024)
                buf[:] = bytes([old_marker]) * 1024
                direct = memoryview(buf)
                sl = direct[:16]
                del buf  # "release": drop our reference
                nxt = bytearray(1024)
                nxt[:] = bytes([new_marker]) * 1024
            elif name in ("lease", "chain"):
                holder: Any = pool.acquire(1024) if name == "lease" else pool.acquire_chain(1024)
                direct = holder.view if name == "lease" else holder.views()[0]
                direct[:] = bytes([old_marker]) * len(direct)
                sl = direct[:16]
                holder.release()
                # The next owners of this size class: several, to catch any reuse.
                nexts = [pool.acquire(1024) for _ in range(4)]
                for lease in nexts:
                    lease.view[:] = bytes([new_marker]) * 1024
            else:
                v = ring.get_buffer()
                v[:1024] = bytes([old_marker]) * 1024
                ring.buffer_updated(1024)
                del v
                direct = ring.peek(1024)
                sl = direct[:16]
                ring.consume(1024)
                # The connection receives its next message into the same ring.
                while True:
                    v = ring.get_buffer()
                    k = min(len(v), 1024)
                    v[:k] = bytes([new_marker]) * k
                    ring.buffer_updated(k)
                    del v
                    if len(ring) >= 2048 - 1024 or ring.free == 0:
                        break
                ring.consume(len(ring))
            counts["direct"][_probe(direct, old_marker)] += 1
            counts["slice"][_probe(sl, old_marker)] += 1
            del direct, sl
            if name in ("lease", "chain"):
                for lease in nexts:
                    lease.release()
                del nexts
        ring.close()
        out[name] = counts
    return out


# ---------------------------------------------------------------- 2. acquire+release ns


def _op(
    name: str, size: int, pool: bufpool.BufferPool, ring: bufpool.RingBuffer
) -> Callable[[int], None]:
    if name == "bytearray":

        def run(n: int) -> None:
            for _ in range(n):
                b = bytearray(size)
                del b

    elif name == "lease":
        acquire = pool.acquire

        def run(n: int) -> None:
            for _ in range(n):
                acquire(size).release()

    elif name == "chain":
        acquire_chain = pool.acquire_chain

        def run(n: int) -> None:
            for _ in range(n):
                acquire_chain(size).release()

    else:
        get_buffer, buffer_updated, consume = ring.get_buffer, ring.buffer_updated, ring.consume

        def run(n: int) -> None:
            for _ in range(n):
                get_buffer()
                buffer_updated(size)
                consume(size)

    return run


def speed(ops: int, sizes: tuple[int, ...]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in STRATEGIES:
        row: dict[str, float] = {}
        for size in sizes:
            for threads in (1, 2):
                pool = bufpool.BufferPool(leak_detection="off")
                rings = [bufpool.RingBuffer(65536, pool=pool) for _ in range(threads)]
                fns = [_op(name, size, pool, rings[i]) for i in range(threads)]
                best = math.inf
                for _ in range(5):
                    if threads == 1:
                        t0 = time.perf_counter_ns()
                        fns[0](ops)
                        dt = time.perf_counter_ns() - t0
                    else:
                        barrier = threading.Barrier(threads + 1)

                        def work(fn: Callable[[int], None], barrier: threading.Barrier) -> None:
                            barrier.wait()
                            fn(ops)

                        ts = [threading.Thread(target=work, args=(fn, barrier)) for fn in fns]
                        for t in ts:
                            t.start()
                        barrier.wait()
                        t0 = time.perf_counter_ns()
                        for t in ts:
                            t.join()
                        dt = time.perf_counter_ns() - t0
                    best = min(best, dt / (ops * threads))
                for r in rings:
                    r.close()
                row[f"{size}B x{threads}"] = round(best, 1)
        out[name] = row
    return out


# ---------------------------------------------------------------- 3. churn (subprocess)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def churn_child(name: str, messages: int, conns: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    lo, hi = math.log(64), math.log(256 * 1024)
    sizes = [int(math.exp(rng.uniform(lo, hi))) for _ in range(messages)]
    slots = [rng.randrange(conns) for _ in range(messages)]
    pool = bufpool.BufferPool(leak_detection="off")
    rings = (
        [bufpool.RingBuffer(4096, pool=pool, max_capacity=1 << 20) for _ in range(conns)]
        if name == "ring"
        else []
    )
    held: list[Any] = [None] * conns
    gc.collect()
    base_rss = _rss_kib()
    peak_rss = base_rss
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    requested = reserved_wasted = 0
    peak_live = live = 0
    live_sizes = [0] * conns
    t0 = time.perf_counter()
    for i, (size, c) in enumerate(zip(sizes, slots, strict=True)):
        old = held[c]
        if old is not None and name in ("lease", "chain"):
            old.release()
        held[c] = None
        live -= live_sizes[c]
        if name == "bytearray":
            b = bytearray(size)
            b[0] = 1
            b[-1] = 1
            held[c] = b
        elif name == "lease":
            lease = pool.acquire(size)
            lease.view[0] = 1
            held[c] = lease
        elif name == "chain":
            chain = pool.acquire_chain(size)
            for v in chain.views():
                v[0] = 1
            held[c] = chain
        else:
            ring = rings[c]
            ring.consume(len(ring))
            left = size
            while left:
                v = ring.get_buffer()
                k = min(len(v), left)
                v[0] = 1
                ring.buffer_updated(k)
                del v
                left -= k
            reserved_wasted += ring.capacity - size
        requested += size
        live_sizes[c] = size
        live += size
        peak_live = max(peak_live, live)
        if i % 1000 == 0:
            peak_rss = max(peak_rss, _rss_kib())
    elapsed = time.perf_counter() - t0
    peak_rss = max(peak_rss, _rss_kib())
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    stats = pool.stats()
    if name in ("lease", "chain"):
        waste: float | None = stats.waste_ratio
    elif name == "ring":
        waste = reserved_wasted / (reserved_wasted + requested)
    else:
        waste = None
    for h in held:
        if h is not None and name in ("lease", "chain"):
            h.release()
    for r in rings:
        r.close()
    return {
        "rss_growth_mib": round((peak_rss - base_rss) / 1024, 1),
        "peak_live_mib": round(peak_live / (1 << 20), 1),
        "minor_faults": ru1.ru_minflt - ru0.ru_minflt,
        "waste_ratio": None if waste is None else round(waste, 3),
        "heap_fallbacks": stats.heap_fallbacks,
        "pool_reserved_mib": round(stats.reserved_bytes / (1 << 20), 1),
        "us_per_message": round(elapsed / messages * 1e6, 2),
    }


def churn(messages: int, conns: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Median over ``repeats`` fresh processes (glibc's dynamic mmap threshold makes single
    runs of the bytearray case vary by several times in page faults)."""
    out: dict[str, dict[str, Any]] = {}
    for name in STRATEGIES:
        runs = []
        for _ in range(repeats):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--churn-child",
                    name,
                    "--messages",
                    str(messages),
                    "--conns",
                    str(conns),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(proc.stdout))
        med = {
            k: (statistics.median(r[k] for r in runs) if runs[0][k] is not None else None)
            for k in runs[0]
        }
        med["minor_faults_range"] = [
            min(r["minor_faults"] for r in runs),
            max(r["minor_faults"] for r in runs),
        ]
        out[name] = med
    return out


# ---------------------------------------------------------------- 4. setup/teardown


def setup_costs(reps: int) -> dict[str, float]:
    def best(fn: Callable[[], None], n: int) -> float:
        b = math.inf
        for _ in range(5):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                fn()
            b = min(b, (time.perf_counter_ns() - t0) / n)
        return b

    def make_pool() -> None:
        p = bufpool.BufferPool(leak_detection="off")
        del p

    pool = bufpool.BufferPool(leak_detection="off")

    def ring_cycle() -> None:
        r = bufpool.RingBuffer(65536, pool=pool)
        r.close()

    def plain_bytearray() -> None:
        b = bytearray(65536)
        del b

    def plain_ring_cycle() -> None:
        r = bufpool.RingBuffer(65536)
        r.close()

    return {
        "BufferPool() build + drop (default classes, ~0.8 MiB preallocated) us": round(
            best(make_pool, max(1, reps // 100)) / 1000, 1
        ),
        "pool-backed RingBuffer(64 KiB) create + close us": round(best(ring_cycle, reps) / 1000, 2),
        "unpooled RingBuffer(64 KiB) create + close us": round(
            best(plain_ring_cycle, reps) / 1000, 2
        ),
        "bytearray(65536) + free us": round(best(plain_bytearray, reps) / 1000, 2),
    }


# ---------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    prm = res["params"]
    lines = [f"Python {prm['python']}, bufpool core implementation: {prm['implementation']}", ""]
    det = res["determinism"]
    n = res["params"]["trials"]
    lines += [
        f"**Reuse determinism** ({n} trials each: a stale reference kept past release, "
        "then the memory's next owner writes its own bytes)",
        "",
        "| strategy | stale direct view | stale derived slice |",
        "|---|---|---|",
    ]
    for name in STRATEGIES:
        cells = []
        for kind in ("direct", "slice"):
            c = det[name][kind]
            parts = [f"{k} {v}" for k, v in c.items() if v]
            cells.append(", ".join(parts))
        lines.append(f"| {LABELS[name]} | {cells[0]} | {cells[1]} |")
    sp = res["speed"]
    cols = list(next(iter(sp.values())))
    lines += [
        "",
        "**acquire + release, ns per op** (best of 5; `x2` = two threads, total wall "
        "time / total ops)",
        "",
        "| strategy | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name in STRATEGIES:
        lines.append(
            f"| {LABELS[name]} | " + " | ".join(f"{sp[name][c]:,.0f}" for c in cols) + " |"
        )
    ch = res["churn"]
    p = res["params"]
    lines += [
        "",
        f"**Churn**: {p['conns']} connections each holding one message, "
        f"{p['messages']:,} messages of 64 B - 256 KiB (log-uniform); median of "
        f"{p['repeats']} fresh processes (minor faults: median, min-max)",
        "",
        "| strategy | RSS growth MiB | peak live MiB | minor faults | waste ratio | "
        "heap fallbacks | us/message |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in STRATEGIES:
        c = ch[name]
        waste = "-" if c["waste_ratio"] is None else f"{c['waste_ratio']:.1%}"
        lo, hi = c["minor_faults_range"]
        lines.append(
            f"| {LABELS[name]} | {c['rss_growth_mib']} | {c['peak_live_mib']} | "
            f"{c['minor_faults']:,.0f} ({lo:,}-{hi:,}) | {waste} | "
            f"{c['heap_fallbacks']:,.0f} | {c['us_per_message']} |"
        )
    lines += ["", "**Setup / teardown**", "", "| what | cost |", "|---|---|"]
    for k, v in res["setup"].items():
        lines.append(f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer iterations (seconds)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--churn-child", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--conns", type=int, default=64)
    args = p.parse_args()
    if args.churn_child:
        print(json.dumps(churn_child(args.churn_child, args.messages, args.conns, seed=7)))
        return 0
    trials = 200 if args.quick else 2000
    ops = 20_000 if args.quick else 200_000
    messages = 20_000 if args.quick else args.messages
    res = {
        "params": {
            "trials": trials,
            "ops": ops,
            "messages": messages,
            "conns": args.conns,
            "repeats": 3 if args.quick else 5,
            "python": sys.version.split()[0],
            "implementation": bufpool.IMPLEMENTATION,
        },
        "determinism": determinism(trials),
        "speed": speed(ops, (1024, 16384)),
        "churn": churn(messages, args.conns, 3 if args.quick else 5),
        "setup": setup_costs(2000 if args.quick else 20_000),
    }
    text = markdown(res)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
