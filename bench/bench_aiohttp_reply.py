"""Server CPU per request of the reply path: ``pooled_response`` vs a plain ``web.Response``.

One aiohttp server process (this one) serves three apps on three ports, each ``GET /r/{n}``
answering ``n`` bytes of a fixed pattern:

* ``plain``:   ``web.Response(body=PATTERN[:n])`` (a bytes slice, what an aiohttp user writes);
* ``pooled``:  a pool lease filled with the pattern, ``pooled_response(request, lease)`` with
  the integration's defaults (small replies copied out, see ``copy_replies_upto``);
* ``zc``:      the same with ``setup(copy_replies_upto=0)``: every reply sent zero-copy and watched;
* ``copy``:    the same with every reply copied out of the pool;
* ``zcloop``:  ``zc`` with a chain written one aiohttp ``write()`` per slot (no
  ``transport.writelines()`` for the middle slots; ``--modes`` picks among them all).

A client subprocess (uvloop, raw sockets, ``--conns`` keep-alive connections, one request in
flight per connection) drives one app at a time, A B C A B C ..., so drift hits all alike.
Measured in the server: ``time.process_time()`` over ``--requests`` requests (the client's
CPU is not in it), divided per request.  Each line prints the median us/request of every
mode and the min..max over rounds of the per-round ratio to plain, then the young-generation
garbage collections the server ran per 1000 requests (``gc.get_stats()``; a request that
keeps more tracked objects alive triggers them more often).

    python bench/bench_aiohttp_reply.py                   # 5 rounds, 1/4/16/64/256 KiB
    python bench/bench_aiohttp_reply.py --rounds 9 --sizes 4096 --loop asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from typing import Any

CLIENT = r'''
import asyncio, sys

class Conn(asyncio.Protocol):
    def __init__(self, done):
        self.buf = bytearray(); self.need = -1; self.left = 0; self.done = done
    def connection_made(self, t):
        self.t = t
    def go(self, req, n, fut):
        self.req = req; self.left = n; self.fut = fut; self.need = -1
        self.t.write(req)
    def data_received(self, data):
        buf = self.buf; buf += data
        while True:
            if self.need < 0:
                i = buf.find(b"\r\n\r\n")
                if i < 0: return
                head = bytes(buf[:i]).lower()
                j = head.index(b"content-length:") + 15
                k = head.find(b"\r\n", j)
                self.need = i + 4 + int(head[j:] if k < 0 else head[j:k])
            if len(buf) < self.need: return
            del buf[:self.need]; self.need = -1; self.left -= 1
            if self.left <= 0:
                self.fut.set_result(None); return
            self.t.write(self.req)

async def main(port, conns):
    loop = asyncio.get_running_loop()
    cs = []
    for _ in range(conns):
        _, c = await loop.create_connection(lambda: Conn(None), "127.0.0.1", port)
        cs.append(c)
    out = sys.stdout
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line: return
        path, n = line.split()
        req = f"GET {path} HTTP/1.1\r\nHost: b\r\n\r\n".encode()
        per = int(n) // conns
        futs = []
        for c in cs:
            f = loop.create_future(); futs.append(f); c.go(req, per, f)
        await asyncio.gather(*futs)
        out.write(f"{per * conns}\n"); out.flush()

import uvloop
uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
'''


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1024,4096,16384,65536,262144")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=4000, help="per measurement (1 KiB..16 KiB)")
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--modes", default="plain,pooled,zc")
    p.add_argument("--writelines", action="store_true",
                   help="let aiohttp hand header + body to transport.writelines() (what it does "
                        "on Python >= 3.12.9 / 3.13.2) instead of joining them into one bytes")
    return p.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    from aiohttp import http_writer, web

    import bufpool
    import bufpool.aiohttp as bpa
    from bufpool.aiohttp import _response

    if args.writelines:
        http_writer.SKIP_WRITELINES = False  # type: ignore[misc]
    sizes = [int(s) for s in args.sizes.split(",")]
    pattern = bytes((i * 7 + 13) % 251 for i in range(max(sizes)))
    pview = memoryview(pattern)

    async def plain(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        return web.Response(body=pattern[:n], content_type="application/octet-stream")

    async def pooled(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        pool = request.app[bpa.POOL_KEY]
        owned: Any = pool.acquire(n) if n <= pool.classes[-1] else pool.acquire_chain(n)
        pos = 0
        for view in [owned.view] if isinstance(owned, bufpool.Lease) else owned.views():
            view[:] = pview[pos : pos + len(view)]
            pos += len(view)
        return bpa.pooled_response(request, owned)

    def make(mode: str) -> web.Application:
        app = web.Application()
        if mode == "plain":
            app.router.add_get("/r/{n}", plain)
            return app
        kw: dict[str, Any] = {}
        if mode in ("zc", "zcloop"):
            kw["copy_replies_upto"] = 0
        elif mode == "copy":
            kw["copy_replies_upto"] = 1 << 40
        bpa.setup(app, pool=bufpool.BufferPool(max_bytes=256 << 20, on_exhausted="raise"), **kw)
        app.router.add_get("/r/{n}", pooled)
        return app

    modes = args.modes.split(",")
    runners, clients = [], {}
    for mode in modes:
        runner = web.AppRunner(make(mode), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        clients[mode] = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(port), str(args.conns),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
    gc.freeze()

    young: dict[str, list[float]] = {}
    # zcloop: zc with a chain's slots written one aiohttp write() each (no writelines)
    lines_on = [True]
    hands_lines = _response._hands_lines

    def switched(writer: Any, transport: Any) -> bool:
        return lines_on[0] and hands_lines(writer, transport)

    _response._hands_lines = switched  # type: ignore[assignment]

    async def measure(mode: str, n: int, count: int) -> float:
        proc = clients[mode]
        assert proc.stdin is not None and proc.stdout is not None
        lines_on[0] = mode != "zcloop"
        g0 = gc.get_stats()[0]["collections"]
        t0 = time.process_time()
        proc.stdin.write(f"/r/{n} {count}\n".encode())
        done = int(await proc.stdout.readline())
        cpu = (time.process_time() - t0) / done * 1e6
        young.setdefault(mode, []).append((gc.get_stats()[0]["collections"] - g0) * 1000 / done)
        return cpu

    print(f"python {sys.version.split()[0]}, loop {args.loop}, {args.conns} connections, "
          f"aiohttp writelines {not http_writer.SKIP_WRITELINES}, "
          f"{args.rounds} rounds; server CPU us/request (median); ratio to plain min..max")
    try:
        for n in sizes:
            count = max(400, args.requests * 16384 // max(n, 16384))
            for mode in modes:  # warm-up
                await measure(mode, n, count // 4)
            per: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(args.rounds):
                for mode in modes:
                    per[mode].append(await measure(mode, n, count))
            line = f"{n:>7} B:"
            for mode in modes:
                line += f"  {mode} {statistics.median(per[mode]):6.2f}"
            if "plain" in per:
                for mode in modes:
                    if mode == "plain":
                        continue
                    ratios = [a / b for a, b in zip(per[mode], per["plain"], strict=True)]
                    diffs = [a - b for a, b in zip(per[mode], per["plain"], strict=True)]
                    line += (f" | {mode}/plain {statistics.median(ratios):.3f} "
                             f"({min(ratios):.3f}..{max(ratios):.3f}) "
                             f"+{statistics.median(diffs):.2f} us")
            print(line, flush=True)
            print("          young GC collections per 1000 requests: " + "  ".join(
                f"{m} {statistics.median(young[m]):.1f}" for m in modes), flush=True)
            young.clear()
    finally:
        for proc in clients.values():
            assert proc.stdin is not None
            proc.stdin.close()
            await proc.wait()
        for runner in runners:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(_run(args))
    else:
        asyncio.run(_run(args))


if __name__ == "__main__":
    main()
