"""Zero-copy receive vs plain aiohttp: the main job's harness, one body size at a time.

For each body size, runs ``python -m bufpool loadtest --mix SIZE:1`` (the example app with
``--no-pool`` and in pooled mode, where ``zero_copy_receive`` is on; rounds interleaved
A B A B ... in one run) and prints, per round and as the median with the min-max spread, the
ratios pooled / plain of req/s, server CPU per request and minor page faults per request.

    python bench/bench_aiohttp_receive.py                       # 16k, 256k, 1m; 3 x 5 s each
    python bench/bench_aiohttp_receive.py --sizes 1m --rounds 5 --duration 10
    python bench/bench_aiohttp_receive.py --server-env BUFPOOL_APP_ZERO_COPY_RECEIVE=0

The last form measures the pooled app with the fast path off (read_body on aiohttp's
parser), the baseline the fast path improves on.  Targets (issue 15): 1 MiB >= 1.3x req/s,
<= 0.75x CPU/request, <= 0.2x faults; 256 KiB >= 1.15x req/s; 16 KiB >= 0.97x req/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _per_request(run: dict[str, Any], key: str) -> float:
    server = run["server"]
    return float(server[key]) / max(1, int(run["requests"]))


def _ratios(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_round.setdefault(int(run["round"]), {})[run["config"]] = run
    out: dict[str, list[float]] = {"req/s": [], "CPU/request": [], "faults/request": []}
    for rnd in sorted(by_round):
        pair = by_round[rnd]
        a, b = pair["no-pool"], pair["pool"]
        out["req/s"].append(b["rps"] / a["rps"])
        out["CPU/request"].append(
            _per_request(b, "cpu_seconds") / _per_request(a, "cpu_seconds")
        )
        fa = _per_request(a, "minor_faults")
        out["faults/request"].append(_per_request(b, "minor_faults") / fa if fa else 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16k,256k,1m", help="comma-separated body sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--json", type=Path, help="write the ratios here")
    args = p.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            out = Path(tmp) / f"{size}.json"
            cmd = [
                sys.executable, "-m", "bufpool", "loadtest", "--mix", f"{size}:1",
                "--rounds", str(args.rounds), "--duration", str(args.duration),
                "--connections", str(args.connections), "--reply", "4k", "--quiet",
                "--json", str(out),
            ]
            for env in args.server_env:
                cmd += ["--server-env", env]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            data = json.loads(out.read_text())
            ratios = _ratios(data["runs"])
            rps = {c: [r["rps"] for r in data["runs"] if r["config"] == c]
                   for c in ("no-pool", "pool")}
            results[size] = {"ratios": ratios, "rps": rps}
            print(f"body {size}: req/s plain {rps['no-pool']} pooled {rps['pool']}")
            for name, values in ratios.items():
                shown = " ".join(f"{v:.2f}" for v in values)
                print(
                    f"  {name:15s} median {statistics.median(values):.2f}x "
                    f"(spread {min(values):.2f}-{max(values):.2f}; rounds {shown})"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
