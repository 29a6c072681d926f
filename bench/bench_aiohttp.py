"""aiohttp with bufpool vs plain aiohttp: the same example server, two subprocesses, one run.

Both servers (``examples/aiohttp_app.py`` with and without ``--no-pool``) start side by side and
are loaded in turn (A B A B ...), so machine drift hits both alike.  Load: 64 connections,
``POST /process`` with request bodies of 1 / 16 / 256 KiB in equal thirds and 4 KiB responses
(the issue's scenario).  Load generator: ``wrk`` with a Lua script for the mix when it is on
PATH, else an aiohttp-client closed loop (uvloop, hdrhistogram).

Reported per configuration (median over rounds): req/s, p50/p99 latency (ms), peak RSS (MiB,
the kernel's VmHWM for the server process, plus the highest sampled RSS during the loaded
runs), minor page faults per run, server CPU seconds per run; then the ratios pool / plain.

    python bench/bench_aiohttp.py                    # short: 2 rounds x 3 s per side
    python bench/bench_aiohttp.py --duration 20 --rounds 3 --loop uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "aiohttp_app.py"
SIZES = (1024, 16 * 1024, 256 * 1024)
REPLY = 4096
MIB = 1024 * 1024

LUA = """
local sizes = {%s}
local reqs = {}
local i = 0
init = function(args)
  for k, n in ipairs(sizes) do
    reqs[k] = wrk.format("POST", "/process?reply=%d",
      {["Content-Type"] = "application/octet-stream"}, string.rep("b", n))
  end
end
request = function()
  i = i %% #reqs + 1
  return reqs[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, ' ..
    '"errors": %%d, "status_errors": %%d, "bytes": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status, summary.bytes))
end
"""


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[str]
    url: str
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    def minflt(self) -> int:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[7])  # field 10 (minflt), counted after "pid (comm)"

    def hwm_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)


def start(name: str, pooled: bool, loop: str) -> Server:
    args = [sys.executable, str(EXAMPLE), "--port", "0", "--loop", loop]
    if not pooled:
        args.append("--no-pool")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, cwd=ROOT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"{name} server did not start: {line!r}")
    return Server(name, proc, line.split()[-1])


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; keeps the maximum."""

    def __init__(self, ps: psutil.Process, interval: float = 0.05) -> None:
        self.ps, self.interval, self.peak = ps, interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.ps.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def run_wrk(url: str, duration: float, connections: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
         "-s", str(script), f"{url}/process?reply={REPLY}"],
        capture_output=True, text=True, check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            d = json.loads(line[len("BENCHJSON "):])
            return {
                "rps": d["requests"] / (d["duration_us"] / 1e6),
                "p50_ms": d["p50_us"] / 1000,
                "p99_ms": d["p99_us"] / 1000,
                "errors": d["errors"] + d["status_errors"],
                "requests": d["requests"],
            }
    raise RuntimeError(f"no result from wrk:\n{out}")


def run_client(url: str, duration: float, connections: int) -> dict[str, float]:
    """Closed-loop load with aiohttp's client when wrk is not installed."""
    import aiohttp
    from hdrh.histogram import HdrHistogram

    async def main() -> dict[str, float]:
        hist = HdrHistogram(1, 60_000_000, 3)
        bodies = [b"b" * n for n in SIZES]
        errors = 0
        done = 0
        conn = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=conn) as s:
            loop = asyncio.get_running_loop()
            end = loop.time() + duration

            async def worker(k: int) -> None:
                nonlocal errors, done
                i = k
                while loop.time() < end:
                    t0 = time.perf_counter()
                    try:
                        async with s.post(f"{url}/process?reply={REPLY}",
                                          data=bodies[i % 3]) as r:
                            await r.read()
                            if r.status != 200:
                                errors += 1
                    except aiohttp.ClientError:
                        errors += 1
                    hist.record_value(int((time.perf_counter() - t0) * 1e6))
                    done += 1
                    i += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(connections)))
            elapsed = time.perf_counter() - t0
        return {"rps": done / elapsed, "p50_ms": hist.get_value_at_percentile(50) / 1000,
                "p99_ms": hist.get_value_at_percentile(99) / 1000, "errors": errors,
                "requests": done}

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


def load(server: Server, args: argparse.Namespace, script: Path | None,
         duration: float) -> dict[str, float]:
    flt0, cpu0 = server.minflt(), server.cpu()
    with RssSampler(server.ps) as rss:
        if script is not None:
            res = run_wrk(server.url, duration, args.connections, script)
        else:
            res = run_client(server.url, duration, args.connections)
    res["minflt"] = server.minflt() - flt0
    res["cpu_s"] = server.cpu() - cpu0
    res["rss_peak_mib"] = rss.peak / MIB
    res["cpu_us_per_req"] = res["cpu_s"] / max(1, res["requests"]) * 1e6
    res["minflt_per_req"] = res["minflt"] / max(1, res["requests"])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds (default 2)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--client", choices=("auto", "wrk", "aiohttp"), default="auto")
    p.add_argument("--json", type=Path, help="write all runs and the summary here")
    args = p.parse_args()

    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    if args.client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not on PATH (Debian: apt-get install wrk)")
    tmp = tempfile.TemporaryDirectory()
    script: Path | None = None
    if use_wrk:
        script = Path(tmp.name) / "mix.lua"
        script.write_text(LUA % (", ".join(map(str, SIZES)), REPLY))

    servers = [start("pool", True, args.loop), start("plain", False, args.loop)]
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    try:
        warm = max(1.0, args.duration / 3)
        for s in servers:  # warm-up, not recorded
            load(s, args, script, warm)
        for r in range(args.rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for s in order:
                res = load(s, args, script, args.duration)
                runs[s.name].append(res)
                print(f"round {r + 1} {s.name:5s} {res['rps']:9.0f} req/s  "
                      f"p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms  "
                      f"minflt {res['minflt']:>9,d}  rss {res['rss_peak_mib']:6.1f} MiB  "
                      f"cpu {res['cpu_us_per_req']:5.0f} us/req  errors {int(res['errors'])}",
                      flush=True)
        hwm = {s.name: s.hwm_mib() for s in servers}
    finally:
        for s in servers:
            s.proc.terminate()
            s.proc.wait(10)
        tmp.cleanup()

    keys = ("rps", "p50_ms", "p99_ms", "rss_peak_mib", "minflt", "minflt_per_req", "cpu_s",
            "cpu_us_per_req")
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in keys}
               for name, rs in runs.items()}
    for name in summary:
        summary[name]["vmhwm_mib"] = hwm[name]
    ratios = {k: summary["pool"][k] / summary["plain"][k] if summary["plain"][k] else
              float("nan") for k in (*keys, "vmhwm_mib")}
    print()
    print(f"aiohttp {_version('aiohttp')}, Python {sys.version.split()[0]}, loop {args.loop}, "
          f"{args.connections} connections, bodies 1/16/256 KiB in thirds, {REPLY} B replies, "
          f"{'wrk' if use_wrk else 'aiohttp client'}, {args.rounds} x {args.duration:g} s")
    print(f"{'':14s}{'plain':>12s}{'pool':>12s}{'pool/plain':>12s}   target")
    targets = {"rps": ">= 1.05", "p99_ms": "<= 1.0", "vmhwm_mib": "<= 1.0", "minflt": "<= 0.1",
               "minflt_per_req": "<= 0.1"}
    for k in ("rps", "p50_ms", "p99_ms", "vmhwm_mib", "rss_peak_mib", "minflt", "minflt_per_req",
              "cpu_s", "cpu_us_per_req"):
        print(f"{k:14s}{summary['plain'][k]:12.2f}{summary['pool'][k]:12.2f}"
              f"{ratios[k]:12.3f}   {targets.get(k, '')}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary, "ratios": ratios,
                                         "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=2))


def _version(mod: str) -> str:
    from importlib.metadata import version

    return version(mod)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
