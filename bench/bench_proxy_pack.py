"""Proxy CPU and MB/s for one tunnel of small records: this tree against a baseline tree, in
one run, interleaved (what packing a read's small records into one lease is worth).

The baseline is a source tree of another revision with its extensions built or copied in,
e.g. ``git archive 7a93c74 | tar -x -C /tmp/pre && cp bufpool/*.so /tmp/pre/bufpool/ &&
cp bufpool/tls/*.so /tmp/pre/bufpool/tls/``.  Each measurement starts that tree's
examples/sni_proxy.py as its own process (``PYTHONPATH`` = the tree) with the default limits,
and sends a real ClientHello then ``--mb`` MB of application_data records of ``--size``
bytes (see bench_proxy_stream.run).  Prints per round both sides and the ratio ranges
this/baseline; a shared machine makes MB/s noisy, proxy CPU per byte less so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_proxy_stream as stream

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="source tree of the other revision")
    ap.add_argument("--size", type=int, default=200, help="record payload bytes")
    ap.add_argument("--mb", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = ap.parse_args()
    print(f"proxy loop {args.loop}, {args.size} B records, {args.mb} MB per run; shared "
          "machine: compare the ratios")
    sides = {"baseline": os.path.abspath(args.baseline), "this": HERE}
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for rnd in range(args.rounds):
        for name, root in sides.items():
            stream.PROXY = os.path.join(root, "examples", "sni_proxy.py")
            os.environ["PYTHONPATH"] = root
            mbs, cpu = await stream.run(1024, args.size, args.mb * 1_000_000, args.loop)
            got[name].append((mbs, cpu))
            print(f"round {rnd + 1} {name:>8}: {mbs:7.0f} MB/s {cpu:5.2f} proxy CPU-s/100MB",
                  flush=True)
    pairs = list(zip(got["this"], got["baseline"], strict=True))
    mb = [t[0] / b[0] for t, b in pairs]
    cpu = [t[1] / b[1] for t, b in pairs]
    print(f"this/baseline: MB/s {min(mb):.2f}-{max(mb):.2f}, proxy CPU per byte "
          f"{min(cpu):.2f}-{max(cpu):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
