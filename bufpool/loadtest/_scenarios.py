"""The scenarios of a session, each A/B in interleaved rounds: ``run_session``.

Supports: ``steady`` (warm-up, then the closed- or open-loop mix, optionally over several load
processes), ``flood`` (``_flood.run_flood`` per server and round) and ``abuse`` (legitimate
load beside ``_abuse.AttackCrew``, pool memory scraped every 200 ms).  Each scenario starts its
own servers (a fresh pair without ``--url``) and stops them in ``finally`` blocks, also on
Ctrl-C (asyncio turns SIGINT into cancellation of the main task) and on any failure; rounds go
A B A B so drift on the machine lands on both configurations alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ._abuse import AbuseResult, AttackCrew, sample_pool
from ._flood import run_flood
from ._metrics import ServerSampler, scrape_pool_stats
from ._run import (
    SCENARIOS,
    AbuseRecord,
    FloodRecord,
    ProgressHook,
    RunRecord,
    Session,
    Settings,
    Target,
    _one_run,
    _sample,
    _spec,
    _start_embedded,
    _url_target,
)
from ._server import ServerError
from ._workers import Running, WorkerPool

__all__ = ["run_session"]


async def _targets(
    settings: Settings, stack: contextlib.AsyncExitStack, say: Callable[[str], None]
) -> list[Target]:
    if settings.url is not None:
        return [_url_target(settings)]
    say("starting the example server twice (pool off, pool on)")
    return await _start_embedded(settings, stack)


async def _run_steady(
    settings: Settings,
    session: Session,
    progress: ProgressHook | None,
    say: Callable[[str], None],
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        targets = await _targets(settings, stack, say)
        workers: WorkerPool | None = None
        if settings.workers > 1:
            workers = WorkerPool(settings.workers)
            stack.callback(workers.close)
        session.configs = [t.name for t in targets]
        if settings.warmup > 0:
            for t in targets:
                await _one_run(settings, t, workers, f"warm-up {t.name}", settings.warmup, progress)
        for rnd in range(1, settings.rounds + 1):
            for t in targets:
                label = f"steady {rnd}/{settings.rounds} {t.name}"
                load, usage, pool = await _one_run(
                    settings, t, workers, label, settings.duration, progress
                )
                session.runs.append(RunRecord(t.name, rnd, load, usage, pool))


def _host_port(target: Target) -> tuple[str, int]:
    if target.server is not None:
        return target.server.host, target.server.port
    parts = urlsplit(target.url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _scraper(target: Target) -> Callable[[], Any]:
    url = target.stats_url

    async def scrape() -> dict[str, Any] | None:
        if url is None:
            return None
        return await asyncio.to_thread(scrape_pool_stats, url, 5.0, None)

    return scrape


def _url_path(settings: Settings) -> str:
    parts = urlsplit(settings.url or "")
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


async def _run_flood(settings: Settings, session: Session, say: Callable[[str], None]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        targets = await _targets(settings, stack, say)
        reply = int(settings.reply.values()[0])
        path = f"/process?reply={reply}" if settings.url is None else _url_path(settings)
        for rnd in range(1, settings.rounds + 1):
            for t in targets:
                say(
                    f"flood {rnd}/{settings.rounds} {t.name}: {settings.flood_clients} x "
                    f"{settings.flood_body / 2**20:g} MiB at once, then "
                    f"{settings.flood_idle:g} s idle"
                )
                host, port = _host_port(t)
                result = await run_flood(
                    host,
                    port,
                    path,
                    clients=settings.flood_clients,
                    body=settings.flood_body,
                    idle=settings.flood_idle,
                    timeout=max(settings.timeout, 30.0),
                    server_pid=t.server_pid,
                    stats=_scraper(t) if t.stats_url else None,
                )
                if t.server is not None and not t.server.alive():
                    raise ServerError(
                        f"server {t.name!r} exited during the flood:\n{t.server.output_tail()}"
                    )
                session.flood.append(FloodRecord(t.name, rnd, result))


async def _abuse_run(
    settings: Settings, target: Target, label: str, progress: ProgressHook | None
) -> AbuseResult:
    host, port = _host_port(target)
    if settings.url is None:
        post_path, read_path = "/process", f"/bytes/{settings.attack_reply}"
    else:
        post_path = read_path = _url_path(settings)
    crew = AttackCrew(
        host,
        port,
        settings.attackers,
        declared=settings.attack_declared,
        post_path=post_path,
        read_path=read_path,
        server_pid=target.server_pid,
    )
    res = AbuseResult(duration_s=settings.abuse_duration)
    sampler = ServerSampler(target.server_pid) if target.server_pid else None
    t0 = time.monotonic()
    if sampler is not None:
        sampler.start()
    sampling = asyncio.ensure_future(_sample(sampler, target.server)) if sampler else None
    pool_task = (
        asyncio.ensure_future(sample_pool(_scraper(target), t0, res.pool))
        if target.stats_url
        else None
    )
    legit_settings = dataclasses.replace(settings, connections=settings.abuse_connections)
    running = Running(_spec(legit_settings, target))
    shown = None
    try:
        await crew.start()
        await asyncio.sleep(0.2)  # let the attackers' heads land first
        await running.connect()
        start_ns = time.monotonic_ns() + 20_000_000
        end_ns = start_ns + int(settings.abuse_duration * 1e9)
        if progress is not None:
            shown = progress(label, settings.abuse_duration, running.completed)
        res.legit = await running.run(start_ns, end_ns)
        crew.check()
    finally:
        if shown is not None:
            with contextlib.suppress(Exception):
                shown()
        await running.close()
        await crew.stop()
        for task in (pool_task, sampling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ServerError):
                    await task
    res.attackers = crew.attackers
    if sampler is not None:
        usage = sampler.stop()
        res.rss = [(round(t, 3), v) for t, v in usage.rss_samples]
        res.rss_peak = usage.rss_peak
    if target.server is not None and not target.server.alive():
        raise ServerError(
            f"server {target.name!r} exited during the abuse run:\n{target.server.output_tail()}"
        )
    return res


async def _run_abuse(
    settings: Settings,
    session: Session,
    progress: ProgressHook | None,
    say: Callable[[str], None],
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        targets = await _targets(settings, stack, say)
        for rnd in range(1, settings.rounds + 1):
            for t in targets:
                label = f"abuse {rnd}/{settings.rounds} {t.name}"
                say(
                    f"{label}: {settings.abuse_connections} legitimate connections, "
                    f"{settings.attackers} x stall / trickle / no-read attackers"
                )
                result = await _abuse_run(settings, t, label, progress)
                session.abuse.append(AbuseRecord(t.name, rnd, result))


async def run_session(
    settings: Settings,
    progress: ProgressHook | None = None,
    on_status: Callable[[str], None] | None = None,
) -> Session:
    """Run each scenario in turn -- fresh servers for each, rounds interleaved A B A B --
    and stop everything it started, also on failure or Ctrl-C."""
    say = on_status or (lambda _msg: None)
    session = Session(settings, [])
    for name in settings.scenarios:
        t0 = time.monotonic()
        try:
            if name == "steady":
                await _run_steady(settings, session, progress, say)
            elif name == "flood":
                await _run_flood(settings, session, say)
            elif name == "abuse":
                await _run_abuse(settings, session, progress, say)
            else:
                raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        except ConnectionError as exc:
            if settings.url is None:
                raise
            raise ConnectionError(f"{settings.url}: {exc}") from exc
        session.wall_s[name] = round(time.monotonic() - t0, 1)
    return session
