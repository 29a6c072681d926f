"""bufpool's load-test harness (floor 4, tools): ``python -m bufpool loadtest``.

Supports: an A/B comparison of the example aiohttp app with the pool off and on (servers
started as subprocesses, runs interleaved A B A B) in three scenarios -- ``steady`` (the
mix below), ``flood`` (many large uploads at once, then an idle tail, RSS every 50 ms) and
``abuse`` (legitimate load among stalling, trickling and non-reading attackers) -- with the
per-round spread of every ratio and a verdict per scenario, or any server given by ``--url``;
open-loop constant-rate load with latency from each request's scheduled send time
(coordinated-omission corrected, as wrk2 does) or closed-loop maximum throughput; HDR
latency percentiles; server RSS over time, page faults and CPU (psutil); pool stats scraped
from the server; several load processes with merged histograms; TLS through the SNI proxy;
a terminal table, JSON, markdown and a matplotlib chart.  See docs/loadtest.md.

The package imports aiohttp, rich, psutil, hdrhistogram and (lazily) matplotlib; those are the
``bench`` extra of the distribution.
"""

from ._cli import build_parser, main
from ._client import LoadGenerator, RequestTemplate, build_templates
from ._metrics import LoadResult, ServerSampler, ServerUsage
from ._schedule import ClosedLoop, Mix, OpenLoop, Schedule, parse_size
from ._server import ServerError, ServerProcess, find_example
from ._workers import LoadSpec, WorkerPool, run_load

__all__ = [
    "ClosedLoop",
    "LoadGenerator",
    "LoadResult",
    "LoadSpec",
    "Mix",
    "OpenLoop",
    "RequestTemplate",
    "Schedule",
    "ServerError",
    "ServerProcess",
    "ServerSampler",
    "ServerUsage",
    "WorkerPool",
    "build_parser",
    "build_templates",
    "find_example",
    "main",
    "parse_size",
    "run_load",
]
