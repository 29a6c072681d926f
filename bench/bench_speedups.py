"""acquire+release per size class: compiled core vs pure-Python core vs ``bytearray(n)``.

Both implementations are measured in the same run: the implementation is fixed at import,
so each runs in its own subprocess (``BUFPOOL_NO_EXTENSIONS=1`` for pure Python), and each
subprocess also times ``bytearray(n)`` itself, so every ratio compares numbers taken in one
process, minutes apart at most.  Rounds alternate between the two subprocesses and the best
(minimum) of all rounds is kept, the usual timeit practice on a shared machine.

Rows per class (n = the class's nominal size, default pool, leak_detection="sample"):

* ``acquire(n).release()``                  vs ``bytearray(n)``
* ``lease = acquire(n); lease.view; release`` vs ``memoryview(bytearray(n))`` (what a caller
  who needs a view would otherwise write)

Usage::

    python bench/bench_speedups.py            # a few seconds
    python bench/bench_speedups.py --long     # more loops and rounds
    python bench/bench_speedups.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path
from typing import Any

import bench_pool  # this script's folder is on sys.path when run as a script

CLASSES = (64, 256, 1024, 4096, 16384, 65536)

CASES = {
    "acquire+release": "acq(n).release()",
    "acquire+view+release": "lease = acq(n); lease.view; lease.release()",
    "bytearray": "bytearray(n)",
    "memoryview(bytearray)": "memoryview(bytearray(n))",
}


def worker(number: int, repeat: int) -> dict[str, Any]:
    """Runs inside a subprocess: ns per op for every case and class."""
    import bufpool

    pool = bufpool.BufferPool(leak_detection="sample")
    out: dict[str, Any] = {"implementation": bufpool.IMPLEMENTATION, "ns": {}}
    for name, stmt in CASES.items():
        row = {}
        for n in CLASSES:
            env = {"acq": pool.acquire, "n": n}
            best = min(timeit.repeat(stmt, number=number, repeat=repeat, globals=env))
            row[str(n)] = best / number * 1e9
        out["ns"][name] = row
    st = pool.stats()
    assert st.in_use == 0 and st.quarantined == 0, st
    return out


def run_worker(pure: bool, number: int, repeat: int) -> dict[str, Any]:
    return bench_pool.run_worker(pure, number, repeat, script=__file__)


def merge(best: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if best is None:
        return new
    for case, row in new["ns"].items():
        for n, v in row.items():
            best["ns"][case][n] = min(best["ns"][case][n], v)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--long", action="store_true", help="more loops and rounds (about a minute)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per side")
    ap.add_argument("--number", type=int, default=None, help="loops per timing")
    ap.add_argument("--repeat", type=int, default=None, help="timings per round (min kept)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    number = args.number or (100_000 if args.long else 20_000)
    repeat = args.repeat or (5 if args.long else 3)
    if args.worker:
        print(json.dumps(worker(number, repeat)))
        return
    rounds = args.rounds or (5 if args.long else 2)
    c: dict[str, Any] | None = None
    py: dict[str, Any] | None = None
    for _ in range(rounds):
        c = merge(c, run_worker(False, number, repeat))
        py = merge(py, run_worker(True, number, repeat))
    assert c is not None and py is not None
    print(f"Python {sys.version.split()[0]}; best of {rounds} rounds x {repeat} x {number} loops")
    if c["implementation"] != "c":
        print("NOTE: the C extension is not built here; the 'c' column is pure Python too.")
    print()
    header = (
        f"{'n':>6} | {'bytearray':>9} | {'C acq+rel':>9} {'ratio':>6} | "
        f"{'Py acq+rel':>10} {'ratio':>6} | {'C/Py':>5}"
    )
    print("acquire(n).release() vs bytearray(n), ns per op (ratio = pool / bytearray)")
    print(header)
    print("-" * len(header))
    for n in map(str, CLASSES):
        ba_c, ba_py = c["ns"]["bytearray"][n], py["ns"]["bytearray"][n]
        ca, pa = c["ns"]["acquire+release"][n], py["ns"]["acquire+release"][n]
        print(
            f"{n:>6} | {ba_c:9.1f} | {ca:9.1f} {ca / ba_c:5.2f}x | "
            f"{pa:10.1f} {pa / ba_py:5.2f}x | {ca / pa:5.2f}"
        )
    print()
    print("with the view: acquire + .view + release vs memoryview(bytearray(n)), ns per op")
    header2 = (
        f"{'n':>6} | {'mv(ba(n))':>9} | {'C +view':>9} {'ratio':>6} | "
        f"{'Py +view':>10} {'ratio':>6} | {'vs ba(n)':>8}"
    )
    print(header2)
    print("-" * len(header2))
    for n in map(str, CLASSES):
        mv_c, mv_py = c["ns"]["memoryview(bytearray)"][n], py["ns"]["memoryview(bytearray)"][n]
        cv, pv = c["ns"]["acquire+view+release"][n], py["ns"]["acquire+view+release"][n]
        ba_c = c["ns"]["bytearray"][n]
        print(
            f"{n:>6} | {mv_c:9.1f} | {cv:9.1f} {cv / mv_c:5.2f}x | "
            f"{pv:10.1f} {pv / mv_py:5.2f}x | {cv / ba_c:7.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"c": c, "python": py}, indent=2))


if __name__ == "__main__":
    main()
