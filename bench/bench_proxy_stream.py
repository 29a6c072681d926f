"""Throughput and CPU of examples/sni_proxy.py for one bulk tunnel: rings starting at 64 KiB
(``--initial-buffer 65536``, the previous behaviour) against 1 KiB (the default), interleaved
in one run, a fresh proxy process per measurement.

    python bench/bench_proxy_stream.py [--repeat 3] [--loop asyncio|uvloop]

The client sends a real ClientHello, then application_data records of one size (the proxy
never decrypts, so record framing is all it sees); a plain TCP sink upstream counts bytes.
Client and sink share this process, the proxy runs alone in its own: its CPU seconds
(utime + stime from /proc) per 100 MB are the figure to compare; MB/s is bounded by the
client here.  Prints each pair and the min-max of the ratios (1 KiB start / 64 KiB start).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_proxy_memory import PROXY, client_hello  # noqa: E402


def rec(ct: int, payload: bytes) -> bytes:
    return struct.pack(">BHH", ct, 0x0303, len(payload)) + payload


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(initial: int, record_size: int, total: int, loop_name: str) -> tuple[float, float]:
    """(MB/s, proxy CPU seconds per 100 MB) for ``total`` bytes through one tunnel."""
    got = 0
    done = asyncio.Event()
    target = 0

    class Sink(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            nonlocal got
            got += len(data)
            if got >= target:
                done.set()

    loop = asyncio.get_running_loop()
    sink = await loop.create_server(Sink, "127.0.0.1", 0)
    up_port = sink.sockets[0].getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, PROXY, "--listen", "127.0.0.1:0", "--loop", loop_name,
         "--route", f"example.com=127.0.0.1:{up_port}", "--initial-buffer", str(initial),
         "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        hello = client_hello()
        chunk = b"".join(rec(23, os.urandom(record_size))
                         for _ in range(max(1, 262144 // (record_size + 5))))
        n = max(1, total // len(chunk))
        target = len(hello) + n * len(chunk)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        writer.write(hello)
        for _ in range(n):
            writer.write(chunk)
            await writer.drain()
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        writer.close()
        return target / elapsed / 1e6, cpu / (target / 1e8)
    finally:
        proc.terminate()
        proc.wait(10)
        sink.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = ap.parse_args()
    print(f"proxy loop: {args.loop}; shared machine: figures are noisy, compare the ratios")
    for size, total in ((200, 60_000_000), (16384, 1_500_000_000)):
        mb_ratios, cpu_ratios = [], []
        for _ in range(args.repeat):
            old = await run(65536, size, total, args.loop)
            new = await run(1024, size, total, args.loop)
            mb_ratios.append(new[0] / old[0])
            cpu_ratios.append(new[1] / old[1])
            print(f"{size:>6} B records: 64 KiB start {old[0]:7.0f} MB/s {old[1]:5.2f} CPU-s/100MB"
                  f" | 1 KiB start {new[0]:7.0f} MB/s {new[1]:5.2f} CPU-s/100MB", flush=True)
        print(f"{size:>6} B records: ratio 1 KiB/64 KiB  MB/s {min(mb_ratios):.2f}-"
              f"{max(mb_ratios):.2f}  proxy CPU per byte {min(cpu_ratios):.2f}-"
              f"{max(cpu_ratios):.2f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
