"""One run's load, in this process or spread over ``--workers N`` load processes.

Supports: ``LoadSpec`` (everything a load process needs, picklable), ``run_load`` (connect,
wait for the common start time, run, close -- on the current loop), and ``WorkerPool``: N
spawned processes, each running ``run_load`` on uvloop for its share of the connections and
of the rate, returning HDR-encoded histograms that the parent merges exactly.

Shutdown: workers ignore SIGINT (the parent owns Ctrl-C and stops them), exit when their pipe
closes (the parent is gone) and, on Linux, get SIGTERM when the parent dies.  ``close()``
asks them to exit, then terminates and finally kills stragglers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import bufpool

from ._client import LoadGenerator, build_templates
from ._metrics import LoadResult
from ._schedule import ClosedLoop, OpenLoop, Schedule

__all__ = ["LoadSpec", "WorkerPool", "make_loop", "run_load"]


@dataclass(frozen=True)
class LoadSpec:
    """One load process's share of a run.  Sizes in bytes, times in seconds."""

    url: str
    host_header: str
    requests: tuple[tuple[str, str, int], ...]  #: (method, path, body bytes) templates
    sequence: tuple[int, ...]  #: template index of successive requests (cycled)
    connections: int
    rate: float | None = None  #: requests/s for this process; None = closed loop
    phase_ns: int = 0  #: open loop: offset of this process's slots
    sequence_offset: int = 0
    timeout: float = 10.0
    client: str = "raw"  #: "raw" (LoadGenerator) or "aiohttp"
    connect_to: tuple[str, int] | None = None  #: dial here instead of the URL's host (proxy)
    server_hostname: str | None = None  #: SNI name when TLS
    cafile: str | None = None  #: trust this certificate (TLS)

    def split(self, n: int) -> list[LoadSpec]:
        """Shares for ``n`` processes: connections divided, rate divided, slots interleaved."""
        n = max(1, min(n, self.connections))
        out = []
        for i in range(n):
            conns = self.connections // n + (1 if i < self.connections % n else 0)
            rate = None if self.rate is None else self.rate / n
            phase = 0 if self.rate is None else int(i * 1e9 / self.rate)
            offset = self.sequence_offset + i * (len(self.sequence) // n)
            out.append(
                replace(self, connections=conns, rate=rate, phase_ns=phase, sequence_offset=offset)
            )
        return out


class Running:
    """A prepared load process: connected, waiting for ``run``."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.pool = bufpool.BufferPool(leak_detection="off")
        self.owned: list[bufpool.Lease | bufpool.LeaseChain] = []
        self.gen: Any = None

    async def connect(self) -> None:
        spec = self.spec
        ssl_context = None
        if spec.cafile is not None:
            from ._tls import client_context

            ssl_context = client_context(Path(spec.cafile))
        templates, owned = build_templates(self.pool, spec.host_header, spec.requests)
        self.owned.extend(owned)
        if spec.client == "aiohttp":
            from ._aioclient import AiohttpLoadGenerator

            bodies = []
            for _, _, size in spec.requests:
                lease = self.pool.acquire(size)
                lease.view[:] = b"x" * size
                self.owned.append(lease)
                bodies.append(lease.view if size else None)
            self.gen = AiohttpLoadGenerator(
                spec.url,
                templates,
                bodies,
                spec.sequence,
                spec.connections,
                ssl_context=ssl_context,
                timeout=spec.timeout,
                sequence_offset=spec.sequence_offset,
            )
        else:
            self.gen = LoadGenerator(
                spec.url,
                templates,
                spec.sequence,
                spec.connections,
                pool=self.pool,
                ssl_context=ssl_context,
                server_hostname=spec.server_hostname,
                connect_to=spec.connect_to,
                timeout=spec.timeout,
                sequence_offset=spec.sequence_offset,
            )
        try:
            await self.gen.connect()
        except BaseException:
            await self.close()
            raise

    def completed(self) -> int:
        """Responses so far (live progress; the raw client only)."""
        res = getattr(self.gen, "result", None)
        return res.requests if isinstance(res, LoadResult) else 0

    async def run(self, start_ns: int, end_ns: int) -> LoadResult:
        spec = self.spec
        schedule: Schedule
        if spec.rate is None:
            schedule = ClosedLoop(end_ns)
        else:
            schedule = OpenLoop(spec.rate, start_ns, end_ns, spec.phase_ns)
        result: LoadResult = await self.gen.run(schedule, start_ns, end_ns)
        return result

    async def close(self) -> None:
        if self.gen is not None:
            await self.gen.close()
            self.gen = None
        for lease in self.owned:
            lease.release()
        self.owned.clear()


async def run_load(spec: LoadSpec, start_ns: int, end_ns: int) -> LoadResult:
    """Connect, run from ``start_ns`` to ``end_ns`` (monotonic ns), close."""
    running = Running(spec)
    await running.connect()
    try:
        return await running.run(start_ns, end_ns)
    finally:
        await running.close()


def make_loop() -> asyncio.AbstractEventLoop:
    """uvloop where available, else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _worker_main(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ._server import _die_with_parent

    preexec = _die_with_parent()
    if preexec is not None:
        preexec()
    with asyncio.Runner(loop_factory=make_loop) as runner:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            spec, start_ns, end_ns = msg
            try:
                res = runner.run(run_load(spec, start_ns, end_ns))
                conn.send(("ok", res.to_wire()))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))


class WorkerError(RuntimeError):
    """A load process failed or died."""


class WorkerPool:
    """N spawned load processes, kept for the whole session."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.pipes: list[Connection] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(child,), name=f"bufpool-load-{i}", daemon=True
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    async def run(self, spec: LoadSpec, start_ns: int, end_ns: int) -> LoadResult:
        """Run ``spec`` split over the workers; the merged result."""
        shares = spec.split(len(self.procs))
        for pipe, share in zip(self.pipes, shares, strict=False):
            pipe.send((share, start_ns, end_ns))
        replies = await asyncio.gather(
            *(asyncio.to_thread(_recv, pipe) for pipe in self.pipes[: len(shares)])
        )
        merged = LoadResult()
        errors = [body for kind, body in replies if kind == "error"]
        if errors:
            raise WorkerError("load process failed: " + "; ".join(map(str, errors)))
        for _, body in replies:
            merged.merge(LoadResult.from_wire(body))
        return merged

    def close(self, grace: float = 3.0) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + grace
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for kill in (False, True):
            for proc in self.procs:
                if proc.is_alive():
                    if kill:
                        proc.kill()
                    else:
                        proc.terminate()
            for proc in self.procs:
                proc.join(1.0)
        for pipe in self.pipes:
            pipe.close()


def _recv(pipe: Connection) -> tuple[str, Any]:
    try:
        reply: tuple[str, Any] = pipe.recv()
    except (EOFError, OSError):
        return ("error", "load process exited unexpectedly")
    return reply
