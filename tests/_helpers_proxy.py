"""Shared helpers for the SNI proxy tests: upstreams (TLS echo, silent raw), a log capture that
tests await on, captured ClientHellos, TLS sessions driven by hand over a raw socket, and pool
accounting."""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import bufpool
from bufpool.tls import ConnectionSummary, ProxyLimits, SNIProxy
from tests._tls_helpers import CertBundle

#: The fatal alerts the proxy sends, as the 7 bytes on the wire.
ALERT_INTERNAL_ERROR = b"\x15\x03\x03\x00\x02\x02\x50"
ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"


def rec(ct: int, payload: bytes, version: int = 0x0303) -> bytes:
    return struct.pack(">BHH", ct, version, len(payload)) + payload


def client_hello(name: str | None) -> bytes:
    """The ClientHello records an ssl client sends for ``name``, captured via MemoryBIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class LogCapture(logging.Handler):
    """Collects the proxy's per-connection summaries; ``await next()`` waits for one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.queue: asyncio.Queue[tuple[ConnectionSummary, str]] = asyncio.Queue()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        summary = getattr(record, "tls_connection", None)
        if summary is not None:
            self.queue.put_nowait((summary, record.getMessage()))

    async def next(self, timeout: float = 20) -> ConnectionSummary:
        summary, _ = await asyncio.wait_for(self.queue.get(), timeout)
        return summary

    async def next_line(self, timeout: float = 20) -> tuple[ConnectionSummary, str]:
        return await asyncio.wait_for(self.queue.get(), timeout)


_logger_seq = 0


@asynccontextmanager
async def running_proxy(
    routes: dict[str, tuple[str, int]], *, limits: ProxyLimits | None = None,
    pool: bufpool.BufferPool | None = None,
) -> AsyncIterator[tuple[SNIProxy, int, LogCapture]]:
    """A started proxy on 127.0.0.1 with a fresh logger captured; aborted and checked for
    leftover pool memory afterwards."""
    global _logger_seq
    _logger_seq += 1
    log = logging.getLogger(f"tests.sni_proxy.{_logger_seq}")
    log.setLevel(logging.INFO)
    log.propagate = False
    capture = LogCapture()
    log.addHandler(capture)
    proxy = SNIProxy(routes, pool=pool, limits=limits, log=log)
    server = await proxy.start("127.0.0.1", 0)
    try:
        yield proxy, server.sockets[0].getsockname()[1], capture
    finally:
        await proxy.aclose()
        log.removeHandler(capture)
    await assert_pool_drained(proxy.pool)


def in_use_bytes(pool: bufpool.BufferPool) -> int:
    """Slot bytes held by live pooled leases (what connections cost the pool)."""
    return sum(t.in_use * t.slot_size for t in pool.stats().tiers)


async def assert_pool_drained(pool: bufpool.BufferPool) -> None:
    for _ in range(1000):  # connections finish closing on the next loop iterations
        gc.collect()
        pool.reclaim()
        st = pool.stats()
        if st.in_use == 0 and st.quarantined == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pooled memory still in use: {pool.stats()}")


async def wait_for(predicate: object, what: str, timeout: float = 20) -> None:
    """Wait until ``predicate()`` is true, checking on every loop turn (bounded)."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class RawUpstream(asyncio.Protocol):
    """A plain TCP upstream that records what arrives and never answers unless told to."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.got_eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.made = asyncio.Event()
        self.want = 0
        self.got_enough = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.made.set()

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.want and len(self.received) >= self.want:
            self.got_enough.set()

    def eof_received(self) -> bool:
        self.got_eof.set()
        return True  # keep our write side open: a silent upstream

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


@asynccontextmanager
async def raw_upstream() -> AsyncIterator[tuple[list[RawUpstream], int]]:
    conns: list[RawUpstream] = []

    def factory() -> RawUpstream:
        p = RawUpstream()
        conns.append(p)
        return p

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield conns, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for c in conns:
            if c.transport is not None:
                c.transport.abort()
        await server.wait_closed()


async def echo_with_name(name: str, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
    """Say who we are, then echo everything until the client closes."""
    writer.write(name.encode() + b"\n")
    try:
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@asynccontextmanager
async def tls_echo_servers(
    certs: CertBundle, names: tuple[str, ...]
) -> AsyncIterator[dict[str, tuple[str, int]]]:
    """One TLS echo server per name (its certificate), as a routes mapping."""
    import functools

    servers = []
    routes: dict[str, tuple[str, int]] = {}
    for name in names:
        srv = await asyncio.start_server(
            functools.partial(echo_with_name, name), "127.0.0.1", 0,
            ssl=certs.server_context(name),
        )
        servers.append(srv)
        routes[name] = ("127.0.0.1", srv.sockets[0].getsockname()[1])
    try:
        yield routes
    finally:
        for srv in servers:
            srv.close()
        for srv in servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 10)
            except TimeoutError:
                pass


async def tls_roundtrip(port: int, certs: CertBundle, name: str, payload: bytes,
                        *, version: ssl.TLSVersion | None = None) -> tuple[str, bytes, str]:
    """A real ssl client through the proxy: (who answered, echoed bytes, client address)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=certs.client_context(version=version), server_hostname=name)
    sockname = writer.get_extra_info("sockname")
    writer.write(payload)
    who = (await reader.readline()).decode().strip()
    got = await reader.readexactly(len(payload))
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass
    return who, got, f"{sockname[0]}:{sockname[1]}"


def refragment(flight: bytes, size: int) -> bytes:
    """The handshake records of ``flight`` re-split into records of ``size`` payload bytes
    (handshake messages may span records: RFC 8446 section 5.1)."""
    body = bytearray()
    pos = 0
    while pos < len(flight):
        ct, version, n = struct.unpack_from(">BHH", flight, pos)
        assert ct == 22
        body += flight[pos + 5:pos + 5 + n]
        pos += 5 + n
    return b"".join(rec(22, bytes(body[i:i + size]), version)
                    for i in range(0, len(body), size))


async def bio_tls_roundtrip(port: int, certs: CertBundle, name: str, payload: bytes,
                            *, first_flight_step: int, pause: float = 0.002,
                            first_flight_records: int | None = None) -> tuple[str, bytes]:
    """A real TLS client (ssl.SSLObject over MemoryBIOs) on a raw socket whose first flight
    (the ClientHello) goes out ``first_flight_step`` bytes per write, ``pause`` seconds apart
    (re-split into records of ``first_flight_records`` payload bytes when given); then the
    handshake and an echo of ``payload`` run normally."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    import socket

    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = certs.client_context().wrap_bio(incoming, outgoing, server_hostname=name)

    async def flush(step: int | None = None) -> None:
        data = outgoing.read()
        if step is not None and first_flight_records is not None:
            data = refragment(data, first_flight_records)
        if step is None:
            writer.write(data)
        else:
            for i in range(0, len(data), step):
                writer.write(data[i:i + step])
                await writer.drain()
                await asyncio.sleep(pause)
        await writer.drain()

    async def fill() -> None:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("proxy closed the connection during the handshake")
        incoming.write(data)

    first = True
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            await flush(first_flight_step if first else None)
            first = False
            await fill()
    await flush()
    obj.write(payload)
    await flush()
    got = bytearray()
    while True:
        try:
            got += obj.read(65536)
        except ssl.SSLWantReadError:
            await flush()
            await fill()
            continue
        if b"\n" in got and len(got) - got.index(b"\n") - 1 >= len(payload):
            break
    writer.close()
    who, _, rest = bytes(got).partition(b"\n")
    return who.decode(), rest
