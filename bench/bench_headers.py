"""What reusing response header maps (CIMultiDict) saves per response, side by side.

Three ways to build the headers of a 4 KiB octet-stream response with one custom header, as
the example server's ``/process`` does, each timed in the same run (best of ``--repeat``):

* ``web.Response(body=..., content_type=..., headers=...)`` — what a plain aiohttp user writes;
* ``StreamResponse`` with a fresh map (what ``pooled_response`` does with reuse off);
* ``StreamResponse(_real_headers=recycled)`` — reuse on: the map is taken from a free list,
  cleared and refilled (``CIMultiDict.clear()`` frees the hash table, so only the map object is
  saved, not its table).

Also the maps alone (``CIMultiDict()`` + 3 inserts vs ``clear()`` + 3 inserts), and the
saving per request set against the server CPU time per request from ``bench_aiohttp.py``.

    python bench/bench_headers.py            # about 10 s
    python bench/bench_headers.py --number 200000 --repeat 9
"""

from __future__ import annotations

import argparse
import sys
import timeit
from importlib.metadata import version

from aiohttp import web
from multidict import CIMultiDict

import bufpool.aiohttp as bpa

BODY = b"p" * 4096


def fresh_map() -> None:
    h: CIMultiDict[str] = CIMultiDict()
    h["Content-Type"] = "application/octet-stream"
    h["Content-Length"] = "4096"
    h["X-Received"] = "16384"


def make_reuse_map() -> object:
    maps = bpa.HeaderMaps()
    maps.give(CIMultiDict())

    def reuse_map() -> None:
        h = maps.take()
        h["Content-Type"] = "application/octet-stream"
        h["Content-Length"] = "4096"
        h["X-Received"] = "16384"
        maps.give(h)

    return reuse_map


def plain_response() -> None:
    web.Response(body=BODY, content_type="application/octet-stream",
                 headers={"X-Received": "16384"})


def stream_fresh() -> None:
    r = web.StreamResponse(_real_headers=CIMultiDict())  # what reuse=False amounts to
    r.headers["Content-Type"] = "application/octet-stream"
    r.headers["X-Received"] = "16384"
    r.content_length = 4096


def make_stream_reuse() -> object:
    maps = bpa.HeaderMaps()
    maps.give(CIMultiDict())

    def stream_reuse() -> None:
        h = maps.take()
        r = web.StreamResponse(_real_headers=h)
        r.headers["Content-Type"] = "application/octet-stream"
        r.headers["X-Received"] = "16384"
        r.content_length = 4096
        maps.give(h)

    return stream_reuse


def best_ns(fn: object, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--number", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--request-cpu-us", type=float, default=None,
                   help="server CPU per request in us (from bench_aiohttp.py: cpu_s/requests)")
    args = p.parse_args()
    if not bpa.HEADER_REUSE_SUPPORTED:
        print("this aiohttp has no _real_headers: reuse is off, nothing to measure")
        return
    pairs = [
        ("map: CIMultiDict() + 3 sets", fresh_map, "map: recycled clear() + 3 sets",
         make_reuse_map()),
        ("StreamResponse, fresh map", stream_fresh, "StreamResponse, recycled map",
         make_stream_reuse()),
    ]
    print(f"aiohttp {version('aiohttp')}, multidict {version('multidict')}, "
          f"Python {sys.version.split()[0]}; best of {args.repeat} x {args.number}")
    ref = best_ns(plain_response, args.number, args.repeat)
    print(f"{'web.Response(body=4 KiB, ...) (plain user)':46s}{ref:9.0f} ns")
    savings = []
    for name_a, fa, name_b, fb in pairs:
        a = best_ns(fa, args.number, args.repeat)
        b = best_ns(fb, args.number, args.repeat)
        a2 = best_ns(fa, args.number, args.repeat)  # interleave again against drift
        a = min(a, a2)
        print(f"{name_a:46s}{a:9.0f} ns")
        print(f"{name_b:46s}{b:9.0f} ns   reuse/fresh {b / a:5.3f}   saves {a - b:6.0f} ns")
        savings.append(a - b)
    if args.request_cpu_us:
        s = savings[-1]
        print(f"saving per request: {s:.0f} ns of {args.request_cpu_us:.0f} us server CPU "
              f"= {100 * s / (args.request_cpu_us * 1000):.2f}%")


if __name__ == "__main__":
    main()
