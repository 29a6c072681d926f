"""Memory-core benchmark: acquire+release vs ``bytearray(n)``, vs a single-class pool, and the
waste ratio on three size traces.  Both sides run in the same process, interleaved per class.

    python bench/bench_pool.py            # ~10 s
    python bench/bench_pool.py --quick    # ~2 s
    python bench/bench_pool.py --json out.json

Timings are the best of ``--repeat`` runs of ``--number`` iterations (timeit), in ns per
allocate+free cycle.  "bytearray(n)" allocates and zeroes n bytes and frees them: what a user
writes without a pool.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import timeit
from collections.abc import Callable, Iterable

import bufpool
from bufpool import BufferPool

CLASSES = (64, 256, 1024, 4096, 16384, 65536)


def best_ns(stmt: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e9


def bench_speed(number: int, repeat: int) -> list[dict[str, object]]:
    rows = []
    pools = {
        "sample": BufferPool(leak_detection="sample"),
        "off": BufferPool(leak_detection="off"),
        "single64k": BufferPool(classes=(65536,), leak_detection="sample"),
    }
    for n in CLASSES:
        acq_s, acq_o, acq_1 = (p.acquire for p in pools.values())
        t_base = best_ns(lambda n=n: bytearray(n), number, repeat)
        t_pool = best_ns(lambda: acq_s(n).release(), number, repeat)
        t_off = best_ns(lambda: acq_o(n).release(), number, repeat)
        t_single = best_ns(lambda: acq_1(n).release(), number, repeat)
        t_with = best_ns(_with_block(pools["sample"], n), number, repeat)
        rows.append(
            {
                "size": n,
                "bytearray_ns": round(t_base, 1),
                "pool_ns": round(t_pool, 1),
                "pool_ratio": round(t_pool / t_base, 2),
                "pool_leak_off_ns": round(t_off, 1),
                "with_block_ns": round(t_with, 1),
                "single_class_64k_ns": round(t_single, 1),
            }
        )
    for p in pools.values():
        assert p.stats().in_use == 0
    return rows


def _with_block(pool: BufferPool, n: int) -> Callable[[], None]:
    acquire = pool.acquire

    def run() -> None:
        with acquire(n):
            pass

    return run


def trace_uniform(rnd: random.Random, k: int) -> list[int]:
    return [rnd.randint(1, 65536) for _ in range(k)]


def trace_tls(rnd: random.Random, k: int) -> list[int]:
    # Record sizes on the wire, header included: FINDINGS section 3/5 mix.
    out = []
    for _ in range(k):
        r = rnd.random()
        if r < 0.4:
            out.append(rnd.randint(100, 300))
        elif r < 0.7:
            out.append(rnd.randint(1024, 4096))
        else:
            out.append(
                rnd.choice(
                    (16401 + 5, 16408 + 5, bufpool.TLS13_MAX_RECORD, bufpool.TLS12_MAX_RECORD)
                )
            )
    return out


def trace_http(rnd: random.Random, k: int) -> list[int]:
    # Request bodies: many small JSON bodies, some uploads; log-uniform 16 B .. 1 MiB.
    return [int(2 ** rnd.uniform(4, 20)) for _ in range(k)]


def waste(pool: BufferPool, sizes: Iterable[int]) -> float:
    held = []
    for n in sizes:
        held.append(pool.acquire_chain(n) if n > pool.classes[-1] else pool.acquire(n))
    ratio = pool.stats().waste_ratio
    for h in held:
        h.release()
    return ratio


def bench_waste(k: int) -> list[dict[str, object]]:
    rows = []
    traces = {
        "uniform 1 B-64 KiB": trace_uniform,
        "TLS record mix": trace_tls,
        "HTTP body mix": trace_http,
    }
    for name, make in traces.items():
        sizes = make(random.Random(1), k)
        big = 1 << 34
        rows.append(
            {
                "trace": name,
                "bufpool_default": round(waste(BufferPool(max_bytes=big), sizes), 3),
                "no_tls_headroom": round(waste(BufferPool(max_bytes=big, headroom={}), sizes), 3),
                "single_class_64k": round(
                    waste(BufferPool(classes=(65536,), max_bytes=big), sizes), 3
                ),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (~2 s)")
    ap.add_argument("--number", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    number, repeat = (20_000, 3) if args.quick else (args.number, args.repeat)
    impl = getattr(bufpool, "IMPLEMENTATION", "python")
    print(
        f"bufpool {bufpool.__version__} ({impl}), Python {platform.python_version()}, "
        f"{number} x best of {repeat}"
    )
    speed = bench_speed(number, repeat)
    print("\nacquire+release, ns per cycle (ratio = pool / bytearray(n); lower is better)")
    print(
        f"{'size':>6} {'bytearray':>10} {'pool':>8} {'ratio':>6} {'leak off':>9} "
        f"{'with-block':>10} {'1-class 64K':>11}"
    )
    for r in speed:
        print(
            f"{r['size']:>6} {r['bytearray_ns']:>10} {r['pool_ns']:>8} {r['pool_ratio']:>6} "
            f"{r['pool_leak_off_ns']:>9} {r['with_block_ns']:>10} {r['single_class_64k_ns']:>11}"
        )
    wrows = bench_waste(2000 if args.quick else 20000)
    print("\nwaste ratio (slot bytes not asked for / slot bytes leased; lower is better)")
    print(f"{'trace':<20} {'bufpool':>8} {'no headroom':>12} {'1-class 64K':>12}")
    for w in wrows:
        print(
            f"{w['trace']:<20} {w['bufpool_default']:>8} {w['no_tls_headroom']:>12} "
            f"{w['single_class_64k']:>12}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"python": sys.version, "implementation": impl, "speed": speed, "waste": wrows},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
