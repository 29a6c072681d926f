"""The ``flood`` scenario's load: many large uploads at once, then an idle tail.

Supports: ``N`` connections opened first (not timed), then at one instant each sends one
``POST`` with a ``body``-byte body and reads the reply; after the last reply the server is left
idle for ``idle`` seconds.  The server's process tree is sampled every ``interval`` seconds
(default 50 ms) from before the flood to the end of the idle tail, so the RSS series shows the
rise, the peak and what the server keeps afterwards.

Every upload ends in exactly one outcome: an HTTP status (any code, also one sent before the
body was finished, e.g. 413 or 503), or an error kind -- ``reset`` (the server aborted the
connection), ``closed`` (it closed without replying), ``timeout`` (no reply within the request
timeout), ``connect`` (no connection).

Client memory is bounded: bodies are written from one shared 256 KiB block in a loop that waits
on the transport's flow control (``drain``), so N uploads never hold N bodies in this process.
Costs: O(body) per upload in 256 KiB writes; one coroutine per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from ._metrics import LoadResult, ServerSampler, ServerUsage

__all__ = ["FloodResult", "run_flood"]

_BLOCK: Final = memoryview(bytes(range(33, 127)) * (262144 // 94 + 1))[:262144]
_STATUS: Final = re.compile(rb"HTTP/1\.[01] (\d{3})")
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


@dataclass
class FloodResult:
    """One flood run against one server.  Times in seconds, sizes in bytes."""

    clients: int = 0
    body_bytes: int = 0
    idle_s: float = 0.0
    #: Seconds from the start signal to the last reply (or failure).
    flood_s: float = 0.0
    load: LoadResult = field(default_factory=LoadResult)
    #: RSS of the server tree, (seconds since the start signal, bytes); negative = before.
    rss: list[tuple[float, int]] = field(default_factory=list)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after_idle: int = 0
    pool_after_idle: dict[str, Any] | None = None

    @property
    def served(self) -> int:
        """Uploads answered with a 2xx status."""
        return sum(n for s, n in self.load.status.items() if 200 <= s < 300)

    def outcomes(self) -> Counter[str]:
        """``HTTP 200``, ``HTTP 503``, ``reset``, ... -> count."""
        out: Counter[str] = Counter({f"HTTP {s}": n for s, n in self.load.status.items()})
        out.update(self.load.errors)
        return out


async def _read_reply(reader: asyncio.StreamReader) -> int:
    """Read one response (head, then a Content-Length body or until close); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    m = _STATUS.match(head)
    if m is None:
        raise ValueError("not an HTTP/1.x status line")
    cl = _CONTENT_LENGTH.search(head)
    if cl is not None:
        left = int(cl.group(1))
        while left:
            chunk = await reader.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
    return int(m.group(1))


async def _upload(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: bytes,
    body: int,
    timeout: float,
) -> int | str:
    """Send one upload and read its reply: the status, or an error kind."""
    reply = asyncio.ensure_future(_read_reply(reader))
    try:
        async with asyncio.timeout(timeout):
            try:
                writer.write(head)
                left = body
                while left and not reply.done():
                    n = min(left, len(_BLOCK))
                    writer.write(_BLOCK[:n])
                    left -= n
                    await writer.drain()
            except (ConnectionError, OSError):
                pass  # the server stopped reading: its reply (or the reset) tells why
            status = await reply
            return status
    except TimeoutError:
        return "timeout"
    except asyncio.IncompleteReadError:
        return "closed"
    except ConnectionResetError:
        return "reset"
    except (ConnectionError, OSError, ValueError, asyncio.LimitOverrunError):
        return "closed"
    finally:
        if not reply.done():
            reply.cancel()
        with contextlib.suppress(BaseException):
            await reply


async def run_flood(
    host: str,
    port: int,
    path: str,
    *,
    clients: int,
    body: int,
    idle: float,
    timeout: float,
    server_pid: int | None,
    interval: float = 0.05,
    stats: Any = None,
) -> FloodResult:
    """One flood against ``host:port``: ``clients`` uploads of ``body`` bytes to ``path``.

    ``stats`` is an optional zero-argument coroutine function returning the pool stats dict,
    called once after the idle tail.
    """
    res = FloodResult(clients=clients, body_bytes=body, idle_s=idle)
    sampler = ServerSampler(server_pid) if server_pid else None
    if sampler is not None:
        sampler.start()
    t0 = time.monotonic()  # the sampler's time zero (to within microseconds)
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        assert sampler is not None
        while not stop_sampling.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), interval)
            sampler.sample()

    sampling = asyncio.ensure_future(sample()) if sampler else None
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bufpool-loadtest\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {body}\r\n\r\n"
    ).encode("latin-1")
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = []
    latencies: array[int] = array("q")
    try:
        opened = await asyncio.gather(
            *(asyncio.open_connection(host, port) for _ in range(clients)),
            return_exceptions=True,
        )
        for item in opened:
            if isinstance(item, BaseException):
                if not isinstance(item, OSError):
                    raise item
                res.load.errors["connect"] += 1
                conns.append(None)
            else:
                conns.append(item)
        if clients and not any(conns):
            raise ConnectionError(f"cannot connect to {host}:{port}: every connection failed")
        await asyncio.sleep(max(0.0, 0.3 - (time.monotonic() - t0)))  # a baseline sample
        start = time.monotonic_ns()
        sampler_offset = time.monotonic() - t0  # sampler time of the start signal

        async def one(pair: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
            outcome = await _upload(pair[0], pair[1], head, body, timeout)
            if isinstance(outcome, int):
                latencies.append(time.monotonic_ns() - start)
                res.load.status[outcome] += 1
                res.load.requests += 1
                res.load.bytes_sent += len(head) + body
            else:
                res.load.errors[outcome] += 1

        await asyncio.gather(*(one(p) for p in conns if p is not None))
        res.flood_s = (time.monotonic_ns() - start) / 1e9
        res.load.duration_s = res.flood_s
        for pair in conns:
            if pair is not None:
                pair[1].transport.abort()
        conns.clear()
        await asyncio.sleep(idle)
        if stats is not None:
            res.pool_after_idle = await stats()
    finally:
        for pair in conns:
            if pair is not None:
                pair[1].transport.abort()
        stop_sampling.set()
        if sampling is not None:
            await sampling
    LoadResult.record_all(res.load.latency, latencies)
    if sampler is not None:
        usage: ServerUsage = sampler.stop()
        res.rss = [(round(t - sampler_offset, 3), v) for t, v in usage.rss_samples]
        before = [v for t, v in res.rss if t <= 0] or [res.rss[0][1]]
        res.rss_before = before[-1]
        res.rss_peak = usage.rss_peak
        res.rss_after_idle = res.rss[-1][1]
    return res
