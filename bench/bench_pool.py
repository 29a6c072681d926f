"""Memory-core benchmark: acquire+release vs ``bytearray(n)`` and ``memoryview(bytearray(n))``,
vs a single-class pool, for BOTH implementations side by side; and the waste ratio on three
size traces.

    python bench/bench_pool.py            # ~10 s
    python bench/bench_pool.py --quick    # ~4 s
    python bench/bench_pool.py --json out.json

The implementation (compiled or pure Python) is fixed at import, so the timings run in two
subprocesses of this script (one with ``BUFPOOL_NO_EXTENSIONS=1``); each also times the
baselines itself, so every ratio divides numbers taken in one process.  Timings are the best
of ``--repeat`` runs of ``--number`` iterations (timeit), in ns per cycle:

* ``bytearray(n)``: allocate, zero and free n bytes: what a user writes without a pool;
* ``memoryview(bytearray(n))``: the same when the caller needs a view (as pooled code does);
* ``acq+rel``: ``pool.acquire(n).release()`` (leak_detection="sample");
* ``acq+view+rel``: ``lease = acquire(n); lease.view; lease.release()``: what users do (the
  compiled lease makes its view on first use, so the bare figure flatters it);
* ``leak off``, ``with``-block, and a single 64 KiB class pool (the naive design).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import timeit
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import bufpool
from bufpool import BufferPool

ROOT = Path(__file__).resolve().parent.parent
CLASSES = (64, 256, 1024, 4096, 16384, 65536)

#: name -> (statement, pool); ``n`` is the request size.
CASES: dict[str, tuple[str, str]] = {
    "bytearray": ("bytearray(n)", "sample"),
    "memoryview": ("memoryview(bytearray(n))", "sample"),
    "acq+rel": ("acq(n).release()", "sample"),
    "acq+view+rel": ("lease = acq(n); lease.view; lease.release()", "sample"),
    "leak off": ("acq(n).release()", "off"),
    "with": ("with acq(n) as lease: pass", "sample"),
    "1-class 64K": ("lease = acq(n); lease.view; lease.release()", "single64k"),
}


def worker(number: int, repeat: int) -> dict[str, Any]:
    """Inside a subprocess: ns per cycle for every case and class, this implementation."""
    pools = {
        "sample": BufferPool(leak_detection="sample"),
        "off": BufferPool(leak_detection="off"),
        "single64k": BufferPool(classes=(65536,), leak_detection="sample"),
    }
    ns: dict[str, dict[str, float]] = {}
    for name, (stmt, which) in CASES.items():
        acq = pools[which].acquire
        row = ns[name] = {}
        for n in CLASSES:
            env = {"acq": acq, "n": n}
            best = min(timeit.repeat(stmt, number=number, repeat=repeat, globals=env))
            row[str(n)] = best / number * 1e9
    for p in pools.values():
        st = p.stats()
        assert st.in_use == 0 and st.quarantined == 0, st
    return {"implementation": bufpool.IMPLEMENTATION, "ns": ns}


def run_worker(pure: bool, number: int, repeat: int, script: str = __file__) -> dict[str, Any]:
    """Run ``script --worker`` on one implementation (pure Python if ``pure``); its JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUFPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if pure:
        env["BUFPOOL_NO_EXTENSIONS"] = "1"
    cmd = [sys.executable, script, "--worker", "--number", str(number), "--repeat", str(repeat)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def print_speed(c: dict[str, Any], py: dict[str, Any]) -> None:
    if c["implementation"] != "c":
        print("NOTE: the C extension is not built here; the C columns are pure Python too.")
    for label, case, base in (
        ("acquire(n).release() vs bytearray(n)", "acq+rel", "bytearray"),
        ("acquire(n) + lease.view + release() vs bytearray(n)", "acq+view+rel", "bytearray"),
        (
            "acquire(n) + lease.view + release() vs memoryview(bytearray(n))",
            "acq+view+rel",
            "memoryview",
        ),
    ):
        print(f"\n{label}, ns per cycle (ratio = pool / baseline; lower is better)")
        print(
            f"{'n':>6} | {'base C':>7} {'C pool':>7} {'ratio':>6} | "
            f"{'base Py':>7} {'Py pool':>8} {'ratio':>6} | {'C/Py':>5}"
        )
        for n in map(str, CLASSES):
            bc, cc = c["ns"][base][n], c["ns"][case][n]
            bp, pp = py["ns"][base][n], py["ns"][case][n]
            print(
                f"{n:>6} | {bc:7.1f} {cc:7.1f} {cc / bc:5.2f}x | "
                f"{bp:7.1f} {pp:8.1f} {pp / bp:5.2f}x | {cc / pp:5.2f}"
            )
    print("\nother pool variants, ns per cycle (C | pure Python)")
    print(f"{'n':>6} | {'leak off':>15} | {'with-block':>15} | {'1-class 64K +view':>17}")
    for n in map(str, CLASSES):
        cols = [f"{c['ns'][k][n]:6.1f} | {py['ns'][k][n]:6.1f}" for k in ("leak off", "with")]
        one = f"{c['ns']['1-class 64K'][n]:6.1f} | {py['ns']['1-class 64K'][n]:6.1f}"
        print(f"{n:>6} | {cols[0]:>15} | {cols[1]:>15} | {one:>17}")


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
    ap.add_argument("--quick", action="store_true", help="fewer iterations (~4 s)")
    ap.add_argument("--number", type=int, default=20_000, help="loops per timing")
    ap.add_argument("--repeat", type=int, default=3, help="timings per case (min kept)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    number, repeat = (5_000, 3) if args.quick else (args.number, args.repeat)
    if args.worker:
        print(json.dumps(worker(number, repeat)))
        return 0
    print(
        f"bufpool {bufpool.__version__}, Python {platform.python_version()}, "
        f"{number} loops x best of {repeat}; both implementations, each in its own subprocess"
    )
    c = run_worker(False, number, repeat)
    py = run_worker(True, number, repeat)
    print_speed(c, py)
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
                {"python": sys.version, "c": c, "python_impl": py, "waste": wrows}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
