"""The same load with aiohttp's client, kept to compare against the hand-written generator.

Supports the schedules, mixes and error accounting of ``_client.LoadGenerator`` with one task
per connection on an ``aiohttp.ClientSession`` (keep-alive pool of ``connections``).  It is
not the default: on this project's 2-core machine it needs several times more CPU per request
than ``LoadGenerator`` (figures in docs/loadtest.md; ``--client aiohttp`` reproduces them).
Request bodies are sent from the same pool leases (aiohttp accepts a memoryview as ``data``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from array import array
from collections.abc import Sequence

import aiohttp

from ._client import RequestTemplate
from ._metrics import LoadResult
from ._schedule import Schedule

__all__ = ["AiohttpLoadGenerator"]


class AiohttpLoadGenerator:
    """``connect()`` / ``run(schedule, start_ns, end_ns)`` / ``close()``, like LoadGenerator."""

    def __init__(
        self,
        base_url: str,
        templates: Sequence[RequestTemplate],
        bodies: Sequence[memoryview | None],
        sequence: Sequence[int],
        connections: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        sequence_offset: int = 0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.templates = list(templates)
        self.bodies = list(bodies)
        self.sequence = list(sequence)
        self.seq_pos = sequence_offset % len(self.sequence)
        self.nconn = connections
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.session: aiohttp.ClientSession | None = None

    async def connect(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.nconn, ssl=self.ssl)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self.timeout, auto_decompress=False
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def run(self, schedule: Schedule, start_ns: int, end_ns: int) -> LoadResult:
        res = LoadResult()
        latencies: array[int] = array("q")
        lags: array[int] = array("q")
        session = self.session
        assert session is not None

        async def worker() -> None:
            while True:
                now = time.monotonic_ns()
                due = schedule.next_due(now)
                if due is None:
                    return
                if due > now:
                    await asyncio.sleep((due - now) / 1e9)
                    now = time.monotonic_ns()
                lags.append(max(0, now - due))
                pos = self.seq_pos
                self.seq_pos = (pos + 1) % len(self.sequence)
                i = self.sequence[pos]
                t = self.templates[i]
                try:
                    async with session.request(
                        t.method, self.base_url + t.path, data=self.bodies[i]
                    ) as resp:
                        n = 0
                        async for chunk in resp.content.iter_any():
                            n += len(chunk)
                        status = resp.status
                except TimeoutError:
                    res.errors["timeout"] += 1
                    continue
                except aiohttp.ClientConnectorError:
                    res.errors["connect"] += 1
                    await asyncio.sleep(0.01)
                    continue
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    res.errors["disconnect"] += 1
                    continue
                except aiohttp.ClientResponseError:
                    res.errors["bad_response"] += 1
                    continue
                done = time.monotonic_ns()
                res.bytes_sent += t.wire_size
                res.bytes_received += n
                res.count_reply(n)
                res.status[status] += 1
                latencies.append(done - due)
                if done <= end_ns:
                    res.requests += 1
                else:
                    res.late += 1

        delay = (start_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(*(worker() for _ in range(self.nconn)))
        res.duration_s = (end_ns - start_ns) / 1e9
        LoadResult.record_all(res.latency, latencies)
        LoadResult.record_all(res.send_lag, lags)
        return res
