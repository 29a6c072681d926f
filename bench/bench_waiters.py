"""What waiting costs: CPU of a process whose coroutines wait in ``acquire_async`` on a spent
pool, against the same process idle, per second of waiting.

    python bench/bench_waiters.py                     # ~20 s, this checkout
    python bench/bench_waiters.py --root OTHER_TREE   # the same against another checkout

Scenarios (default loop, one 1 KiB slot, budget spent; N waiters for ``--seconds``):

* ``held``: the slot is held by a lease; nothing can come back without a release() call;
* ``quarantined``: the slot was released while a view of it lives, so it can come back with
  no call to report it (its last view dies): the only case that still needs the poll.

Each case runs in its own subprocess (``--root`` on PYTHONPATH), interleaved with an idle
baseline (``asyncio.sleep``) in the same process; printed as CPU ms per second of waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import asyncio, json, sys, time
import bufpool

async def main(n, seconds, scenario):
    loop = asyncio.get_running_loop()
    t0 = time.process_time()
    await asyncio.sleep(seconds)
    idle = time.process_time() - t0
    pool = bufpool.BufferPool(classes=(1024,), initial_slots=1, max_bytes=1024,
                              on_exhausted="raise", leak_detection="off")
    lease = pool.acquire(100)
    view = None
    if scenario == "quarantined":
        view = lease.view
        lease.release()
    tasks = [asyncio.create_task(pool.acquire_async(100)) for _ in range(n)]
    await asyncio.sleep(0)
    assert pool.stats().waiting == n
    t0 = time.process_time()
    await asyncio.sleep(seconds)  # only the waiting itself is timed, not the cleanup
    busy = time.process_time() - t0
    assert not any(t.done() for t in tasks)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if scenario == "held":
        lease.release()
    del view
    print(json.dumps({"idle_ms": idle * 1e3 / seconds, "wait_ms": busy * 1e3 / seconds,
                      "impl": bufpool.IMPLEMENTATION}))

asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]))
"""


def run(root: Path, n: int, seconds: float, scenario: str, pure: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUFPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    if pure:
        env["BUFPOOL_NO_EXTENSIONS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(n), str(seconds), scenario],
        env=env, capture_output=True, text=True, check=True, cwd=root,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout to measure")
    ap.add_argument("--waiters", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--pure", action="store_true", help="the pure-Python core")
    args = ap.parse_args()
    print(f"root {args.root}; CPU ms per second of waiting (idle = the same process asleep)")
    print(f"{'scenario':>12} {'waiters':>8} {'idle':>7} {'waiting':>8}")
    for scenario in ("held", "quarantined"):
        for n in args.waiters:
            r = run(args.root, n, args.seconds, scenario, args.pure)
            print(f"{scenario:>12} {n:>8} {r['idle_ms']:>7.2f} {r['wait_ms']:>8.1f}  ({r['impl']})")


if __name__ == "__main__":
    main()
