"""Floods and pinning attacks: plain aiohttp vs ``bpa.setup`` defaults, side by side.

Both servers are ``examples/aiohttp_app.py`` in subprocesses (``--no-pool``: ``await
request.read()`` with ``client_max_size`` raised to the 8 MiB body limit; pooled: a 64 MiB
pool, 8 MiB ``max_body_size``, every other setting at its default).  Each scenario runs on a
fresh server of each kind, alternating (plain, pooled, plain, pooled, ...).

flood
    N clients each upload 8 MiB at once (``POST /upload``).  Reported: how many got 200 with
    the exact digest, wall time, the server's RSS at start, its peak (VmHWM) growth, and its
    RSS after ``--idle`` seconds of quiet (VmRSS, from /proc).  Targets (issue 12): 100%
    served, peak growth <= 0.25x plain, RSS after idle <= plain + 24 MiB.
pinning
    Header-only holders and 1 B / 100 ms tricklers declare bodies that fill the whole body
    budget (8 MiB each), then legitimate uploads (1 MiB and 16 KiB) run.  Reported: the
    share answered 200 within 10 s.  Target: >= 95% (plain: 100%).
stall
    The same attackers, but each first sends 16 KiB of its body (the evidence that gets a
    body admitted) before it stalls or trickles, and reconnects as soon as it is cut off;
    the legitimate uploads start one every 100 ms, so some meet stallers that were just
    admitted.  Reported: the share served within 10 s, the median and slowest upload.

    python bench/bench_aiohttp_abuse.py                       # 96 clients, 2 rounds, uvloop
    python bench/bench_aiohttp_abuse.py --clients 128 --rounds 3 --loop asyncio
    python bench/bench_aiohttp_abuse.py --only stall --rounds 3   # the attacks alone
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "aiohttp_app.py"
MIB = 1 << 20
BODY = 8 * MIB


class Server:
    def __init__(self, pooled: bool, loop: str) -> None:
        cmd = [sys.executable, str(EXAMPLE), "--port", "0", "--loop", loop,
               "--max-body-size", str(BODY)]
        if not pooled:
            cmd.append("--no-pool")
        self.pooled = pooled
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = line.split("listening on ", 1)[1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def mem(self) -> dict[str, float]:
        """VmRSS and VmHWM in MiB."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) / 1024
        return out

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()


async def flood(server: Server, clients: int, idle: float) -> dict[str, Any]:
    data = os.urandom(BODY)
    digest = hashlib.sha256(data).hexdigest()
    base = server.mem()["VmRSS"]
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    ok = 0
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        async def one() -> None:
            nonlocal ok
            async with session.post(server.url + "/upload", data=data) as resp:
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status == 200:
                    got = await resp.json()
                    ok += got["sha256"] == digest and got["size"] == BODY

        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(clients)], return_exceptions=True)
        wall = time.perf_counter() - t0
    peak = server.mem()["VmHWM"]
    await asyncio.sleep(idle)  # the quiet period being measured
    after = server.mem()["VmRSS"]
    return {"ok": ok, "statuses": statuses, "wall": wall, "base": base,
            "peak_growth": peak - base, "after_idle": after, "after_growth": after - base}


async def _budget(server: Server) -> int:
    """The pooled server's body budget (from its stats route); plain servers: 64 MiB."""
    if not server.pooled:
        return 64 * MIB
    async with aiohttp.ClientSession() as session, session.get(
        server.url + "/bufpool/stats"
    ) as resp:
        return int((await resp.json())["aiohttp"]["budget"])


async def pinning(
    server: Server, legit: int, first: int = 0, stagger: float = 0.0
) -> dict[str, Any]:
    """Attackers that fill the body budget and reconnect whenever they are cut off, each
    sending ``first`` body bytes before it stalls or trickles, while ``legit`` uploads (half
    1 MiB, half 16 KiB, the i-th starting ``i * stagger`` s in) run; share served within
    10 s each, median and slowest seconds."""
    loop = asyncio.get_running_loop()
    budget = await _budget(server)
    sizes = [BODY] * (budget // BODY)
    rest = (budget - sum(sizes)) // 65536 * 65536
    if rest:
        sizes.append(rest)
    stop = asyncio.Event()
    cuts = 0

    async def attacker(size: int, trickle: bool) -> None:
        nonlocal cuts
        head = f"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n"
        while not stop.is_set():
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(head.encode() + b"x" * first)
            try:
                while not stop.is_set():
                    if trickle:
                        writer.write(b"x")
                        await writer.drain()
                    try:
                        async with asyncio.timeout(0.1):  # the attacker's pace
                            if await reader.read(65536) == b"":
                                cuts += 1
                                break  # cut off: come back at once
                    except TimeoutError:
                        pass
            except (ConnectionError, OSError):
                cuts += 1
            finally:
                writer.close()

    attackers = [asyncio.ensure_future(attacker(n, i % 2 == 1)) for i, n in enumerate(sizes)]
    await asyncio.sleep(2.0)  # the attack is under way when legitimate traffic comes
    served = 0
    times: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(size: int, delay: float) -> None:
            nonlocal served
            await asyncio.sleep(delay)  # arrivals spread over the attack
            t0 = loop.time()
            try:
                async with asyncio.timeout(10):
                    async with session.post(server.url + "/upload", data=b"l" * size) as resp:
                        await resp.read()
                        if resp.status == 200:
                            served += 1
            except (TimeoutError, aiohttp.ClientError):
                pass
            times.append(loop.time() - t0)

        kinds = [MIB if i % 2 else 16384 for i in range(legit)]
        await asyncio.gather(*[one(s, i * stagger) for i, s in enumerate(kinds)])
    stop.set()
    await asyncio.gather(*attackers, return_exceptions=True)
    return {"served": served / legit, "max_s": max(times), "p50_s": statistics.median(times),
            "cuts": cuts, "attackers": len(sizes)}


async def run(args: argparse.Namespace) -> None:
    what = "stall only" if args.only else f"{args.clients} x 8 MiB, idle {args.idle} s"
    print(f"# shared 2-core VM; loop={args.loop}, {what}")
    ratios: dict[str, list[float]] = {"peak": [], "after_minus_plain": [], "served": [],
                                      "stall_served": [], "stall_p50": [], "stall_max": []}
    for rnd in range(args.rounds):
        if args.only in (None, "stall"):
            for pooled in (False, True):
                server = Server(pooled, args.loop)
                try:
                    p = await pinning(server, args.legit, first=16384, stagger=0.1)
                finally:
                    server.stop()
                name = "pooled" if pooled else "plain "
                print(f"round {rnd} stall   {name}: legit served {p['served']:.0%}, median "
                      f"{p['p50_s']:.2f} s, slowest {p['max_s']:.2f} s ({p['attackers']} "
                      f"attackers, cut {p['cuts']} times)", flush=True)
                if pooled:
                    ratios["stall_served"].append(p["served"])
                    ratios["stall_p50"].append(p["p50_s"])
                    ratios["stall_max"].append(p["max_s"])
        if args.only == "stall":
            continue
        res: dict[bool, dict[str, Any]] = {}
        for pooled in (False, True):
            server = Server(pooled, args.loop)
            try:
                r = await flood(server, args.clients, args.idle)
            finally:
                server.stop()
            res[pooled] = r
            name = "pooled" if pooled else "plain "
            print(f"round {rnd} flood   {name}: {r['ok']}/{args.clients} ok {r['statuses']} "
                  f"in {r['wall']:.1f} s; RSS base {r['base']:.0f} MiB, peak +"
                  f"{r['peak_growth']:.0f}, after {args.idle:.0f} s idle {r['after_idle']:.0f} "
                  f"(+{r['after_growth']:.0f})", flush=True)
        ratios["peak"].append(res[True]["peak_growth"] / res[False]["peak_growth"])
        ratios["after_minus_plain"].append(res[True]["after_idle"] - res[False]["after_idle"])
        for pooled in (False, True):
            server = Server(pooled, args.loop)
            try:
                p = await pinning(server, args.legit)
            finally:
                server.stop()
            name = "pooled" if pooled else "plain "
            print(f"round {rnd} pinning {name}: legit served {p['served']:.0%}, slowest "
                  f"{p['max_s']:.1f} s ({p['attackers']} attackers, cut {p['cuts']} times)",
                  flush=True)
            if pooled:
                ratios["served"].append(p["served"])
    def span(xs: list[float], fmt: str) -> str:
        return f"median {format(statistics.median(xs), fmt)} (min {format(min(xs), fmt)}, " \
               f"max {format(max(xs), fmt)})"
    if ratios["stall_served"]:
        print(f"stall legit served with pool: {span(ratios['stall_served'], '.0%')}; median "
              f"s {span(ratios['stall_p50'], '.2f')}; slowest s {span(ratios['stall_max'], '.2f')}")
    if args.only == "stall":
        return
    print(f"flood peak RSS growth pooled/plain: {span(ratios['peak'], '.3f')}  (target <= 0.25)")
    print(f"flood RSS after idle, pooled - plain MiB: {span(ratios['after_minus_plain'], '.0f')}"
          "  (target <= 24)")
    print(f"pinning legit served with pool: {span(ratios['served'], '.0%')}  (target >= 95%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--idle", type=float, default=15.0)
    p.add_argument("--legit", type=int, default=30)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--only", choices=("stall",), default=None,
                   help="run only this scenario (default: all)")
    args = p.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
