"""A load-test session's pieces: settings, targets, one measured steady run, the records.

Supports: the embedded A/B comparison (the example app with the pool off and on, each in its
own subprocess, optionally under gunicorn or behind the TLS SNI proxy) and any ``--url``.
Runs are interleaved -- round 1: A then B, round 2: A then B, ... -- so drift in the machine
(other load, thermal, page cache) lands on both configurations alike.  During each run the
server's process tree is sampled every 100 ms (RSS) and its page faults and CPU time are taken
as deltas; the pool stats endpoint is read before and after.

Everything started here is stopped in ``finally`` blocks, also on Ctrl-C (asyncio turns
SIGINT into cancellation of the main task) and on any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit

from ._abuse import AbuseResult
from ._flood import FloodResult
from ._metrics import LoadResult, ServerSampler, ServerUsage, pool_delta, scrape_pool_stats
from ._schedule import Mix, request_sequence
from ._server import ServerError, ServerProcess, find_example
from ._workers import LoadSpec, Running, WorkerPool

__all__ = [
    "SCENARIOS",
    "AbuseRecord",
    "FloodRecord",
    "RunRecord",
    "Session",
    "Settings",
    "Target",
]

#: Scenario names, in the order a default run takes them.
SCENARIOS: Final = ("steady", "flood", "abuse")

#: Embedded configurations, baseline first.
BASELINE = "no-pool"
CANDIDATE = "pool"
_SNI = {BASELINE: "no-pool.bufpool.test", CANDIDATE: "pool.bufpool.test"}


@dataclass
class Settings:
    """What the command line asked for.  Sizes in bytes, times in seconds."""

    duration: float = 4.0
    rounds: int = 2
    warmup: float = 1.0
    rate: float | None = None
    connections: int = 64
    mix: Mix = field(default_factory=lambda: Mix.parse_sizes("1k:1,16k:1,256k:1"))
    reply: Mix = field(default_factory=lambda: Mix.parse_sizes("4k"))
    reply_given: bool = False
    method: Mix = field(default_factory=lambda: Mix.parse_methods("POST"))
    url: str | None = None
    server_pid: int | None = None
    stats_url: str | None = None
    workers: int = 1
    server_workers: int = 0
    server_loop: str = "uvloop"
    tls: bool = False
    client: str = "raw"
    timeout: float = 10.0
    seed: int = 1
    app: Path | None = None
    #: Extra environment for both embedded servers (e.g. glibc malloc tunables); the
    #: comparison stays fair because pool off and pool on get the same.
    server_env: dict[str, str] = field(default_factory=dict)
    quiet: bool = False
    #: Scenarios to run, in this order (see SCENARIOS).
    scenarios: tuple[str, ...] = ("steady", "flood", "abuse")
    #: flood: simultaneous uploads, bytes per upload, seconds of idle tail after the last reply.
    flood_clients: int = 96
    flood_body: int = 8 * 1024 * 1024
    flood_idle: float = 8.0
    #: abuse: measured seconds per run, attackers of each kind, legitimate connections, body
    #: bytes the stalling/trickling heads declare, reply bytes the non-readers ask for.
    abuse_duration: float = 3.0
    attackers: int = 16
    abuse_connections: int = 16
    attack_declared: int = 8 * 1024 * 1024
    attack_reply: int = 8 * 1024 * 1024

    @property
    def mode(self) -> str:
        return "closed" if self.rate is None else "open"

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "duration_s": self.duration,
            "rounds": self.rounds,
            "warmup_s": self.warmup,
            "rate": self.rate,
            "connections": self.connections,
            "mix": self.mix.describe(),
            "reply": self.reply.describe(),
            "reply_given": self.reply_given,
            "method": self.method.describe(),
            "url": self.url,
            "workers": self.workers,
            "server_workers": self.server_workers,
            "server_loop": self.server_loop,
            "tls": self.tls,
            "client": self.client,
            "timeout_s": self.timeout,
            "seed": self.seed,
            "server_env": dict(self.server_env),
            "scenarios": list(self.scenarios),
            "flood": {
                "clients": self.flood_clients,
                "body_bytes": self.flood_body,
                "idle_s": self.flood_idle,
            },
            "abuse": {
                "duration_s": self.abuse_duration,
                "attackers_per_kind": self.attackers,
                "legit_connections": self.abuse_connections,
                "declared_body_bytes": self.attack_declared,
                "no_read_reply_bytes": self.attack_reply,
            },
        }


@dataclass
class Target:
    """One configuration to load: where to connect and what to sample."""

    name: str
    url: str
    requests: tuple[tuple[str, str, int], ...] = ()
    server: ServerProcess | None = None
    server_pid: int | None = None
    stats_url: str | None = None
    connect_to: tuple[str, int] | None = None
    server_hostname: str | None = None
    cafile: str | None = None


@dataclass
class RunRecord:
    """One measured run."""

    config: str
    round: int
    load: LoadResult
    server: ServerUsage | None
    pool: dict[str, Any] | None


@dataclass
class FloodRecord:
    """One flood run (one configuration, one round)."""

    config: str
    round: int
    result: FloodResult


@dataclass
class AbuseRecord:
    """One abuse run (one configuration, one round)."""

    config: str
    round: int
    result: AbuseResult


@dataclass
class Session:
    """Everything measured, in run order.  ``configs``/``runs`` are the steady scenario's."""

    settings: Settings
    configs: list[str]
    runs: list[RunRecord] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    flood: list[FloodRecord] = field(default_factory=list)
    abuse: list[AbuseRecord] = field(default_factory=list)
    #: Wall-clock seconds of each scenario, servers' start and stop included.
    wall_s: dict[str, float] = field(default_factory=dict)

    def by_config(self) -> dict[str, tuple[LoadResult, ServerUsage | None, dict[str, Any] | None]]:
        """Rounds of each configuration combined: histograms merged, durations added."""
        out: dict[str, tuple[LoadResult, ServerUsage | None, dict[str, Any] | None]] = {}
        for name in self.configs:
            load = LoadResult()
            usage: ServerUsage | None = None
            pool: dict[str, Any] | None = None
            hits = misses = 0
            for run in self.runs:
                if run.config != name:
                    continue
                load.append(run.load)
                if run.server is not None:
                    usage = usage or ServerUsage()
                    usage.append(run.server)
                if run.pool:
                    pool = dict(run.pool)
                    hits += int(run.pool.get("hits", 0))
                    misses += int(run.pool.get("misses", 0))
            if pool is not None and hits + misses:
                pool["hits"], pool["misses"] = hits, misses
                pool["hit_rate"] = hits / (hits + misses)
            out[name] = (load, usage, pool)
        return out


ProgressHook = Callable[[str, float, Callable[[], int]], Any]


def _requests_for(settings: Settings, base_path: str | None) -> tuple[tuple[str, str, int], ...]:
    """Template list (method, path, body bytes) in the index order of request_sequence."""
    out = []
    for method, size, reply in itertools.product(
        settings.method.values(), settings.mix.values(), settings.reply.values()
    ):
        assert isinstance(method, str) and isinstance(size, int) and isinstance(reply, int)
        body = 0 if method in ("GET", "HEAD") else size
        if base_path is None:  # the embedded example
            path = f"/bytes/{reply}" if method in ("GET", "HEAD") else f"/process?reply={reply}"
        elif settings.reply_given:
            parts = urlsplit(base_path)
            query = [*parse_qsl(parts.query), ("reply", str(reply))]
            path = f"{parts.path or '/'}?{urlencode(query)}"
        else:
            path = base_path
        out.append((method, path, body))
    return tuple(out)


def _sequence(settings: Settings) -> tuple[int, ...]:
    ns, nr = len(settings.mix.choices), len(settings.reply.choices)
    seq = request_sequence([settings.method, settings.mix, settings.reply], settings.seed)
    return tuple((m * ns + s) * nr + r for m, s, r in seq)


def _spec(settings: Settings, target: Target) -> LoadSpec:
    parts = urlsplit(target.url)
    host_header = target.server_hostname or parts.netloc
    return LoadSpec(
        url=target.url,
        host_header=host_header,
        requests=target.requests,
        sequence=_sequence(settings),
        connections=settings.connections,
        rate=settings.rate,
        timeout=settings.timeout,
        client=settings.client,
        connect_to=target.connect_to,
        server_hostname=target.server_hostname,
        cafile=target.cafile,
    )


def server_environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of an embedded server: ours, then ``--server-env``, then ``extra``."""
    return {**os.environ, **settings.server_env, **extra}


async def _start_embedded(settings: Settings, stack: contextlib.AsyncExitStack) -> list[Target]:
    app = settings.app or find_example()
    python = sys.executable
    targets: list[Target] = []
    cert = key = None
    scrape_ctx = None
    if settings.tls:
        from ._tls import client_context, make_certificate

        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bufpool-lt-")))
        cert, key = make_certificate(tmp, [*_SNI.values(), "localhost"])
        scrape_ctx = client_context(cert)
    for name in (BASELINE, CANDIDATE):
        pooled = name == CANDIDATE
        if settings.server_workers > 0:
            root = app.parent.parent
            argv = [
                python,
                "-m",
                "gunicorn",
                f"{app.parent.name}.{app.stem}:app_factory",
                "--worker-class",
                "aiohttp.GunicornUVLoopWebWorker"
                if settings.server_loop == "uvloop"
                else "aiohttp.GunicornWebWorker",
                "--workers",
                str(settings.server_workers),
                "--bind",
                "127.0.0.1:0",
                "--pythonpath",
                str(root),
                "--chdir",
                str(root),
                "--log-level",
                "info",
                "--graceful-timeout",
                "2",
            ]
            if cert is not None and key is not None:
                argv += ["--certfile", str(cert), "--keyfile", str(key)]
            env = server_environment(settings, BUFPOOL_APP_POOLED="1" if pooled else "0")
            server = ServerProcess(
                name,
                argv,
                env=env,
                cwd=root,
                gunicorn=True,
                ssl_context=scrape_ctx,
            )
        elif settings.tls:
            assert cert is not None and key is not None
            argv = [
                python,
                "-m",
                "bufpool.loadtest._tls",
                str(app),
                "--cert",
                str(cert),
                "--key",
                str(key),
                "--loop",
                settings.server_loop,
            ]
            if not pooled:
                argv.append("--no-pool")
            server = ServerProcess(
                name, argv, env=server_environment(settings), ssl_context=scrape_ctx
            )
        else:
            argv = [
                python,
                str(app),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--loop",
                settings.server_loop,
            ]
            if not pooled:
                argv.append("--no-pool")
            server = ServerProcess(name, argv, env=server_environment(settings))
        stack.push_async_callback(server.stop)
        await server.start()
        target = Target(
            name=name,
            url=server.url,
            requests=_requests_for(settings, None),
            server=server,
            server_pid=server.pid,
            stats_url=server.url + "/bufpool/stats",
        )
        targets.append(target)
    if settings.tls:
        assert cert is not None
        proxy_argv = [
            python,
            str(find_example("sni_proxy.py")),
            "--listen",
            "127.0.0.1:0",
            "--loop",
            "uvloop",
        ]
        for t in targets:
            assert t.server is not None
            proxy_argv += ["--route", f"{_SNI[t.name]}={t.server.host}:{t.server.port}"]
        proxy = ServerProcess("sni-proxy", proxy_argv, health_path=None)
        stack.push_async_callback(proxy.stop)
        await proxy.start()
        for t in targets:
            t.connect_to = (proxy.host, proxy.port)
            t.server_hostname = _SNI[t.name]
            t.cafile = str(cert)
            t.url = f"https://{_SNI[t.name]}:{proxy.port}"
    return targets


def _url_target(settings: Settings) -> Target:
    assert settings.url is not None
    parts = urlsplit(settings.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"--url must be http://HOST[:PORT]/PATH or https://..., got {settings.url!r}"
        )
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(
        name="target",
        url=base,
        requests=_requests_for(settings, path),
        server_pid=settings.server_pid,
        stats_url=settings.stats_url,
    )


async def _sample(sampler: ServerSampler, server: ServerProcess | None) -> None:
    while True:
        await asyncio.sleep(0.1)
        sampler.sample()
        if server is not None and not server.alive():
            raise ServerError(
                f"server {server.name!r} exited during the run (code "
                f"{server.proc.returncode if server.proc else '?'}):\n{server.output_tail()}"
            )


async def _one_run(
    settings: Settings,
    target: Target,
    workers: WorkerPool | None,
    label: str,
    duration: float,
    progress: ProgressHook | None,
) -> tuple[LoadResult, ServerUsage | None, dict[str, Any] | None]:
    spec = _spec(settings, target)
    ctx = None
    if target.cafile is not None:
        from ._tls import client_context

        ctx = client_context(Path(target.cafile))
    before = (
        await asyncio.to_thread(scrape_pool_stats, target.stats_url, 5.0, ctx)
        if target.stats_url
        else None
    )
    sampler = ServerSampler(target.server_pid) if target.server_pid else None
    running: Running | None = None
    if workers is None:
        running = Running(spec)
        await running.connect()
        start_ns = time.monotonic_ns() + 20_000_000
    else:
        start_ns = time.monotonic_ns() + 300_000_000 + 2_000_000 * spec.connections
    end_ns = start_ns + int(duration * 1e9)
    if sampler is not None:
        sampler.start()
    sampling = asyncio.ensure_future(_sample(sampler, target.server)) if sampler else None
    shown = None
    if progress is not None:
        counter = running.completed if running is not None else (lambda: -1)
        shown = progress(label, duration + (start_ns - time.monotonic_ns()) / 1e9, counter)
    try:
        load_task = asyncio.ensure_future(
            running.run(start_ns, end_ns)
            if running is not None
            else workers.run(spec, start_ns, end_ns)  # type: ignore[union-attr]
        )
        waiting = {load_task} | ({sampling} if sampling else set())
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if sampling is not None and sampling in done:
            load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load_task
            sampling.result()  # raises the ServerError
        result = await load_task
    finally:
        if sampling is not None:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServerError):
                await sampling
        if running is not None:
            await running.close()
        if shown is not None:
            with contextlib.suppress(Exception):
                shown()
    usage = sampler.stop() if sampler is not None else None
    after = (
        await asyncio.to_thread(scrape_pool_stats, target.stats_url, 5.0, ctx)
        if target.stats_url
        else None
    )
    return result, usage, (pool_delta(before, after) if after is not None else None)
