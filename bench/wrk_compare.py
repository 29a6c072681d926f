"""Harness vs wrk: closed-loop req/s against the same embedded server, side by side.

Starts ``examples/aiohttp_app.py`` once (pool on; ``--no-pool`` for the plain app), then
alternates, round after round: wrk (``-t1 -c64``, a Lua script sending the same body mix),
the harness's own generator (``--client raw``: bufpool buffers, uvloop), and optionally the
aiohttp-client generator (``--client aiohttp``).  Prints each round, the medians, the ratio
harness/wrk (the check: within +-20%), and the load generator's own CPU per request -- the
figure that decided which client the harness uses.

    python bench/wrk_compare.py                      # 3 rounds x 3 s, about 40 s
    python bench/wrk_compare.py --duration 10 --rounds 5 --connections 64 --json out.json

Needs wrk on PATH (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bufpool.loadtest import LoadSpec, Mix, ServerProcess, find_example
from bufpool.loadtest._run import Settings, _requests_for, _sequence
from bufpool.loadtest._workers import make_loop, run_load

_LUA = """
local reqs = {}
init = function(args)
  for _, n in ipairs({%(sizes)s}) do
    table.insert(reqs, wrk.format("POST", "%(path)s",
      {["Content-Type"] = "application/octet-stream"}, string.rep("a", n)))
  end
end
local i = 0
request = function()
  i = i + 1
  return reqs[(i %% #reqs) + 1]
end
"""


def _wrk(url: str, script: Path, conns: int, seconds: float) -> dict[str, float]:
    proc = psutil.Popen(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cpu = 0.0
    while proc.poll() is None:
        try:
            t = proc.cpu_times()
            cpu = t.user + t.system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    out, _err = proc.communicate()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
        lat[f"p{pct}"] = float(value) * scale
    return {
        "rps": rps,
        "p50": lat.get("p50", 0.0),
        "p99": lat.get("p99", 0.0),
        "client_cpu_us_per_req": cpu / max(total, 1) * 1e6,
    }


def _harness(url: str, settings: Settings, client: str, seconds: float) -> dict[str, float]:
    spec = LoadSpec(
        url=url,
        host_header=url.split("//", 1)[1],
        requests=_requests_for(settings, None),
        sequence=_sequence(settings),
        connections=settings.connections,
        client=client,
    )

    async def go() -> Any:
        start = time.monotonic_ns() + 200_000_000
        return await run_load(spec, start, start + int(seconds * 1e9))

    cpu0 = time.process_time()
    with asyncio.Runner(loop_factory=make_loop) as runner:
        res = runner.run(go())
    cpu = time.process_time() - cpu0
    lat = res.latency_ms()
    return {
        "rps": res.rps,
        "p50": lat["p50"],
        "p99": lat["p99"],
        "client_cpu_us_per_req": cpu / max(res.requests, 1) * 1e6,
    }


async def _start(no_pool: bool) -> ServerProcess:
    argv = [sys.executable, str(find_example()), "--port", "0", "--loop", "uvloop"]
    if no_pool:
        argv.append("--no-pool")
    server = ServerProcess("app", argv)
    await server.start()
    return server


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--mix", default="1k:1,16k:1,256k:1")
    p.add_argument("--reply", default="4k")
    p.add_argument("--no-pool", action="store_true", help="load the plain app instead")
    p.add_argument("--clients", default="raw,aiohttp", help="harness clients to run")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    settings = Settings(
        connections=args.connections,
        mix=Mix.parse_sizes(args.mix),
        reply=Mix.parse_sizes(args.reply),
    )
    reply = settings.reply.values()[0]
    sizes = ", ".join(str(v) for v in settings.mix.values())
    clients = [c for c in args.clients.split(",") if c]
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(_start(args.no_pool))
    results: dict[str, list[dict[str, float]]] = {"wrk": [], **{c: [] for c in clients}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "mix.lua"
            script.write_text(_LUA % {"sizes": sizes, "path": f"/process?reply={reply}"})
            # Warm the server once (not recorded).
            _wrk(server.url + "/", script, args.connections, 1)
            for rnd in range(1, args.rounds + 1):
                row = {"wrk": _wrk(server.url + "/", script, args.connections, args.duration)}
                for c in clients:
                    row[c] = _harness(server.url, settings, c, args.duration)
                for name, r in row.items():
                    results[name].append(r)
                print(
                    f"round {rnd}: "
                    + "  ".join(f"{n} {r['rps']:,.0f} req/s" for n, r in row.items()),
                    flush=True,
                )
    finally:
        loop.run_until_complete(server.stop())
        loop.close()
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    print(
        f"\nmedians of {args.rounds} rounds x {args.duration:g} s, {args.connections} "
        f"connections, bodies {args.mix}, replies {args.reply}, server "
        f"{'plain' if args.no_pool else 'pool'} (aiohttp_app.py, uvloop)"
    )
    print(
        f"{'client':<10}{'req/s':>10}{'vs wrk':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'client CPU us/req':>19}"
    )
    base = med["wrk"]["rps"]
    for n, m in med.items():
        print(
            f"{n:<10}{m['rps']:>10,.0f}{m['rps'] / base:>8.2f}x{m['p50']:>9.2f}"
            f"{m['p99']:>9.2f}{m['client_cpu_us_per_req']:>19.1f}"
        )
    ok = 0.8 <= med["raw"]["rps"] / base <= 1.2 if "raw" in med else False
    print(f"\nharness (raw) within +-20% of wrk: {'yes' if ok else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "medians": med}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
