"""The load generator: HTTP/1.1 keep-alive connections driven by a schedule.

Supports: any method, fixed request bodies from a weighted mix, Content-Length, chunked and
read-until-close responses, plain TCP or TLS (with SNI), open-loop (``OpenLoop``, latency from
the due time) and closed-loop (``ClosedLoop``) schedules.  One request in flight per
connection (no pipelining), reconnect after errors and ``Connection: close``.

Why a hand-written client: it is callback-driven (no task or future per request) on
``asyncio.BufferedProtocol``, so one load process on uvloop drives an aiohttp server as fast as
wrk does on a 2-core machine; aiohttp's own client costs several times more CPU per request
(``--client aiohttp`` keeps it for comparison; see docs/loadtest.md for the measured figures).

bufpool at work: every request (head + body) is built once into pool leases and written from
them on every send -- the leases live for the whole run, so the transport may keep referencing
them; each connection receives into one 64 KiB lease via ``get_buffer``/``buffer_updated``.
Response bodies are counted and discarded, never copied; only header blocks (bounded by the
receive buffer, 64 KiB) are copied to parse them.

Costs: O(1) per request plus O(header bytes) parsing.  Memory: one 64 KiB lease per connection
plus the request templates; latencies are kept as 8 bytes per request until the run ends.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import urlsplit

import bufpool

from ._metrics import LoadResult
from ._schedule import Schedule

__all__ = ["LoadGenerator", "RequestTemplate", "build_templates"]

#: Receive buffer per connection (bytes): the pool's 64 KiB class.
RECV_BUFFER: Final = 65536
_HEAD_END: Final = re.compile(rb"\r\n\r\n")
_LINE_END: Final = re.compile(rb"\r\n")
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED: Final = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.IGNORECASE)
_CLOSE: Final = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_STATUS: Final = re.compile(rb"HTTP/1\.[01] (\d{3})")

_EMPTY: Final = memoryview(b"")

# Response framing states.
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_CLOSE = range(7)


@dataclass(frozen=True, slots=True)
class RequestTemplate:
    """One ready-to-send request: ``views`` are pool memory valid until the generator closes."""

    method: str
    path: str
    body_size: int
    views: tuple[memoryview, ...]
    wire_size: int
    no_response_body: bool


def build_templates(
    pool: bufpool.BufferPool,
    host_header: str,
    requests: Sequence[tuple[str, str, int]],
    extra_headers: Sequence[tuple[str, str]] = (),
) -> tuple[list[RequestTemplate], list[bufpool.Lease | bufpool.LeaseChain]]:
    """Build (method, path, body bytes) requests into pool leases; returns templates and the
    leases to release when the run is over."""
    templates: list[RequestTemplate] = []
    owned: list[bufpool.Lease | bufpool.LeaseChain] = []
    for method, path, body_size in requests:
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {host_header}",
            "User-Agent: bufpool-loadtest",
        ]
        if body_size or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {body_size}")
            lines.append("Content-Type: application/octet-stream")
        lines.extend(f"{k}: {v}" for k, v in extra_headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        total = len(head) + body_size
        chain = pool.acquire_chain(total)
        owned.append(chain)
        _fill(chain.views(), head)
        templates.append(
            RequestTemplate(method, path, body_size, tuple(chain.views()), total, method == "HEAD")
        )
    return templates, owned


def _fill(views: Sequence[memoryview], head: bytes) -> None:
    """Head bytes, then a repeating printable pattern as the body."""
    pattern = bytes(range(33, 127)) * 700  # 65,800 bytes, longer than any slot
    pos = 0
    for v in views:
        n = len(v)
        if pos < len(head):
            k = min(n, len(head) - pos)
            v[:k] = head[pos : pos + k]
            v[k:] = pattern[: n - k]
        else:
            v[:] = pattern[:n]
        pos += n


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive HTTP/1.1 connection; sends when told, reports when a response ends."""

    def __init__(self, gen: LoadGenerator) -> None:
        self.gen = gen
        self.lease = gen.pool.acquire(RECV_BUFFER)
        self.buf = self.lease.view
        self.filled = 0
        self.transport: asyncio.Transport | None = None
        self.state = _HEAD
        self.left = 0  # body bytes (or chunk bytes) still to skip
        self.close_after = False
        self.status = 0
        self.due = 0
        self.sent_at = 0
        self.template: RequestTemplate | None = None
        self.received = 0
        self.body_bytes = 0
        self.fail_kind = ""
        self.timer: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[None] = gen.loop.create_future()

    # -- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.filled >= RECV_BUFFER:
            # Header block larger than the whole buffer: give up on this response.
            self.fail("bad_response")
            self.filled = 0
        return self.buf[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        self.filled += nbytes
        try:
            self._parse()
        except ValueError:
            self.fail("bad_response")

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.template is not None:
            if self.state == _UNTIL_CLOSE:
                self.close_after = True
                self._complete()
            else:
                self.gen.on_error(self, self.fail_kind or "disconnect")
        self.fail_kind = ""
        if not self.lost.done():
            self.lost.set_result(None)
        self.gen.on_lost(self)

    # -- sending and parsing -----------------------------------------------------------------

    def send(self, template: RequestTemplate, due: int) -> None:
        transport = self.transport
        assert transport is not None
        self.template = template
        self.due = due
        self.state = _HEAD
        self.received = 0
        self.body_bytes = 0
        self.sent_at = time.monotonic_ns()
        for v in template.views:
            transport.write(v)

    def fail(self, kind: str) -> None:
        if self.transport is not None:
            self.fail_kind = kind
            self.transport.abort()  # connection_lost reports the in-flight request

    def _parse(self) -> None:
        buf = self.buf
        pos = 0
        end = self.filled
        while pos < end:
            state = self.state
            if state == _HEAD:
                m = _HEAD_END.search(buf, pos, end)
                if m is None:
                    break
                head = bytes(buf[pos : m.end()])
                pos = m.end()
                self._head(head)
            elif state == _BODY:
                take = min(self.left, end - pos)
                self.body_bytes += take
                self.left -= take
                pos += take
                if not self.left:
                    self._complete()
            elif state == _UNTIL_CLOSE:
                self.body_bytes += end - pos
                pos = end
            elif state == _CHUNK_SIZE:
                m = _LINE_END.search(buf, pos, end)
                if m is None:
                    break
                size = int(bytes(buf[pos : m.start()]).split(b";", 1)[0].strip(), 16)
                pos = m.end()
                if size:
                    self.left = size
                    self.state = _CHUNK_DATA
                else:
                    self.state = _TRAILER
            elif state == _CHUNK_DATA:
                take = min(self.left, end - pos)
                self.body_bytes += take
                self.left -= take
                pos += take
                if not self.left:
                    self.left = 2
                    self.state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                take = min(self.left, end - pos)
                self.left -= take
                pos += take
                if not self.left:
                    self.state = _CHUNK_SIZE
            else:  # _TRAILER: lines until an empty one
                m = _LINE_END.search(buf, pos, end)
                if m is None:
                    break
                empty = m.start() == pos
                pos = m.end()
                if empty:
                    self._complete()
        if pos >= end:
            self.filled = 0
        elif pos:
            rest = bytes(buf[pos:end])
            buf[: len(rest)] = rest
            self.filled = len(rest)

    def _head(self, head: bytes) -> None:
        m = _STATUS.match(head)
        if m is None:
            raise ValueError("not an HTTP/1.x status line")
        self.status = int(m.group(1))
        self.close_after = _CLOSE.search(head) is not None
        template = self.template
        if template is None:
            raise ValueError("response without a request")
        if template.no_response_body or self.status in (204, 304) or self.status < 200:
            if self.status < 200:
                return  # interim response (100 Continue): the real one follows
            self._complete()
            return
        if _CHUNKED.search(head) is not None:
            self.state = _CHUNK_SIZE
            return
        cl = _CONTENT_LENGTH.search(head)
        if cl is None:
            self.state = _UNTIL_CLOSE
            return
        self.left = int(cl.group(1))
        if self.left:
            self.state = _BODY
        else:
            self._complete()

    def _complete(self) -> None:
        self.state = _HEAD
        template = self.template
        assert template is not None
        self.template = None
        self.gen.on_response(self, template, self.status)
        if self.close_after and self.transport is not None:
            self.transport.close()


class LoadGenerator:
    """Runs one load process's share of a run on the current event loop.

    ``connections`` keep-alive connections to ``url`` are opened first (not timed); the
    schedule then decides when each request is due; ``sequence`` picks which template each
    successive request uses.  ``run()`` returns a LoadResult.  Failed requests are counted by
    kind and the connection is re-opened; nothing is retried.
    """

    def __init__(
        self,
        url: str,
        templates: Sequence[RequestTemplate],
        sequence: Sequence[int],
        connections: int,
        *,
        pool: bufpool.BufferPool,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_to: tuple[str, int] | None = None,
        timeout: float = 10.0,
        sequence_offset: int = 0,
    ) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        if connect_to is not None:
            self.host, self.port = connect_to
        self.ssl_context = ssl_context
        if parts.scheme == "https" and ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self.server_hostname = server_hostname or (parts.hostname if self.ssl_context else None)
        self.templates = list(templates)
        self.sequence = list(sequence)
        self.seq_pos = sequence_offset % len(self.sequence)
        self.nconn = connections
        self.timeout_ns = int(timeout * 1e9)
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.conns: list[_Connection] = []
        self.schedule: Schedule | None = None
        self.end_ns = 0
        self.stopping = False
        self.result = LoadResult()
        self.latencies: array[int] = array("q")
        self.lags: array[int] = array("q")
        self.in_flight = 0
        self.idle: asyncio.Event = asyncio.Event()
        self.reopening: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open every connection; a failure here raises ConnectionError naming the target."""
        opened = await asyncio.gather(
            *(self._open() for _ in range(self.nconn)), return_exceptions=True
        )
        conns = [c for c in opened if isinstance(c, _Connection)]
        failed = [e for e in opened if not isinstance(e, _Connection)]
        self.conns = conns
        if failed:
            for conn in conns:  # on_lost gives back their receive buffers
                if conn.transport is not None:
                    conn.transport.abort()
            for conn in conns:
                await conn.lost
            exc = failed[0]
            if not isinstance(exc, OSError | ssl.SSLError | TimeoutError):
                raise exc
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConnectionError(f"cannot connect to {self.host}:{self.port}: {why}") from exc

    async def _open(self) -> _Connection:
        conn = _Connection(self)
        try:
            await self.loop.create_connection(
                lambda: conn,
                self.host,
                self.port,
                ssl=self.ssl_context,
                server_hostname=self.server_hostname if self.ssl_context else None,
            )
        except BaseException:
            conn.buf = _EMPTY
            conn.lease.release()
            raise
        return conn

    async def run(self, schedule: Schedule, start_ns: int, end_ns: int) -> LoadResult:
        """Drive the connections from ``start_ns`` to ``end_ns`` (monotonic ns), then wait up
        to the request timeout for requests still in flight."""
        self.schedule = schedule
        self.end_ns = end_ns
        delay = (start_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        watchdog = self.loop.create_task(self._watchdog())
        try:
            for conn in list(self.conns):
                self._next(conn)
            await asyncio.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9))
            self.stopping = True
            for conn in self.conns:
                if conn.timer is not None:
                    conn.timer.cancel()
                    conn.timer = None
            if self.in_flight:
                self.idle.clear()
                try:
                    await asyncio.wait_for(self.idle.wait(), self.timeout_ns / 1e9)
                except TimeoutError:
                    pass
        finally:
            self.stopping = True
            watchdog.cancel()
            for task in list(self.reopening):
                task.cancel()
        res = self.result
        res.duration_s = (end_ns - start_ns) / 1e9
        LoadResult.record_all(res.latency, self.latencies)
        LoadResult.record_all(res.send_lag, self.lags)
        self.latencies = array("q")
        self.lags = array("q")
        return res

    async def close(self) -> None:
        """Close every connection and give back the receive buffers."""
        self.stopping = True
        pending = list(self.reopening)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        conns = list(self.conns)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.abort()
        for conn in conns:
            await conn.lost  # on_lost gives back the receive buffer

    # -- per-request callbacks ----------------------------------------------------------------

    def _next(self, conn: _Connection) -> None:
        if self.stopping or conn.transport is None:
            return
        now = time.monotonic_ns()
        assert self.schedule is not None
        due = self.schedule.next_due(now)
        if due is None:
            return
        if due > now:
            conn.timer = self.loop.call_at(
                self.loop.time() + (due - now) / 1e9, self._send_due, conn, due
            )
            return
        self._send(conn, due, now)

    def _send_due(self, conn: _Connection, due: int) -> None:
        conn.timer = None
        if self.stopping:
            return
        if conn.transport is None:
            # Lost while waiting for its due time: that slot could not be sent.
            self.result.errors["disconnect"] += 1
            return
        now = time.monotonic_ns()
        if now < due:
            # uvloop's clock is cached per loop iteration and its timers have millisecond
            # resolution, so a timer can fire early: never send before the due time.
            conn.timer = self.loop.call_at(
                self.loop.time() + (due - now) / 1e9, self._send_due, conn, due
            )
            return
        self._send(conn, due, now)

    def _send(self, conn: _Connection, due: int, now: int) -> None:
        seq = self.sequence
        pos = self.seq_pos
        template = self.templates[seq[pos]]
        pos += 1
        self.seq_pos = 0 if pos == len(seq) else pos
        if now > due:
            self.lags.append(now - due)
        else:
            self.lags.append(0)
        self.in_flight += 1
        conn.send(template, due)
        self.result.bytes_sent += template.wire_size

    def on_response(self, conn: _Connection, template: RequestTemplate, status: int) -> None:
        now = time.monotonic_ns()
        self.in_flight -= 1
        res = self.result
        if now <= self.end_ns:
            res.requests += 1
        else:
            res.late += 1
        res.status[status] += 1
        res.bytes_received += conn.received
        res.count_reply(conn.body_bytes)
        self.latencies.append(now - conn.due)
        conn.received = 0
        if self.stopping and not self.in_flight:
            self.idle.set()
        if not conn.close_after:
            self._next(conn)

    def on_error(self, conn: _Connection, kind: str) -> None:
        self.in_flight -= 1
        conn.template = None
        conn.received = 0
        self.result.errors[kind] += 1
        if self.stopping and not self.in_flight:
            self.idle.set()

    def on_lost(self, conn: _Connection) -> None:
        """A connection closed (by either side): replace it unless the run is over."""
        if conn in self.conns:
            self.conns.remove(conn)
            conn.buf = _EMPTY  # drop our view so the slot can go straight back
            conn.lease.release()
        if not self.stopping and self.schedule is not None:
            task = self.loop.create_task(self._reopen())
            self.reopening.add(task)
            task.add_done_callback(self.reopening.discard)

    async def _reopen(self) -> None:
        """Open a replacement connection and carry on with the schedule."""
        while not self.stopping:
            try:
                conn = await self._open()
            except (OSError, ssl.SSLError, TimeoutError):
                if time.monotonic_ns() <= self.end_ns:
                    self.result.errors["connect"] += 1
                await asyncio.sleep(0.01)
                continue
            self.conns.append(conn)
            if self.stopping:
                return
            self._next(conn)
            return

    async def _watchdog(self) -> None:
        """Abort connections whose request has been in flight longer than the timeout."""
        while True:
            await asyncio.sleep(0.2)
            limit = time.monotonic_ns() - self.timeout_ns
            for conn in list(self.conns):
                if conn.template is not None and conn.sent_at and conn.sent_at < limit:
                    conn.fail("timeout")
