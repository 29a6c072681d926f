"""TLS termination into pool memory: ``PooledProtocol`` behind ``loop.create_server(...,
ssl=ctx)`` with real TLS clients over loopback, on the default loop and on uvloop (every test
runs as [asyncio] and [uvloop]).

Both loops' SSL transports call the application protocol's ``get_buffer`` and decrypt
straight into the view it returns (asyncio ``sslproto._do_read__buffered``, uvloop
``sslproto.pyx``), so the plaintext lands in the ring's pooled slot.  Each test ends with the
pool holding nothing."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from bufpool import BufferPool, RingBuffer
from bufpool.aio import PooledProtocol
from tests._helpers_streams import (
    HOST,
    TIMEOUT,
    FrameCollector,
    Server,
    assert_pool_clean,
    frame,
    wait_until,
)
from tests._tls_helpers import CertBundle, make_certs

NAME = "localhost"
VERSIONS = {"tls12": ssl.TLSVersion.TLSv1_2, "tls13": ssl.TLSVersion.TLSv1_3}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    return make_certs([NAME], Path(tmp_path_factory.mktemp("aiotls")))


@pytest.fixture(params=sorted(VERSIONS))
def version(request: pytest.FixtureRequest) -> Iterator[ssl.TLSVersion]:
    yield VERSIONS[request.param]


class TLSFrames(FrameCollector):
    """FrameCollector for TLS: over TLS the peer's close_notify ends the connection (asyncio
    and uvloop ignore a True from ``eof_received`` and log a warning), so EOF is only noted."""

    def eof_received(self) -> bool | None:
        self.eof = True
        return None


class Echo(PooledProtocol):
    """The echo example's protocol, counting what the SSL transport asked for."""

    pool: BufferPool

    def __init__(self, pool: BufferPool, **kwargs: int) -> None:
        super().__init__(pool, **kwargs)
        self.get_buffers = 0
        self.decrypted = 0
        self.pooled_views = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        view = super().get_buffer(sizehint)
        self.get_buffers += 1
        lease = self.ring._lease
        if lease is not None and view.obj is lease.view.obj:
            self.pooled_views += 1  # a view of the ring's pooled slot, not a loop buffer
        return view

    def buffer_updated(self, nbytes: int) -> None:
        self.decrypted += nbytes
        super().buffer_updated(nbytes)

    def data_available(self, ring: RingBuffer) -> None:
        chain = self.pool.acquire_chain(len(ring))
        for view in chain.views():
            ring.readinto(view)
        self.write_lease(chain)

    def pause_writing(self) -> None:
        self.pause_reading()

    def resume_writing(self) -> None:
        self.resume_reading()


async def _connect(
    certs: CertBundle, port: int, version: ssl.TLSVersion | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        HOST, port, ssl=certs.client_context(version=version), server_hostname=NAME
    )


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass


@pytest.mark.asyncio
async def test_tls_echo_is_byte_exact_and_decrypts_into_pooled_ring(
    certs: CertBundle, version: ssl.TLSVersion
) -> None:
    pool = BufferPool()
    data = random.Random(3).randbytes(2 * 1024 * 1024 + 11)
    ctx = certs.server_context(NAME, version=version)
    async with Server(lambda: Echo(pool), ssl=ctx) as srv:
        reader, writer = await _connect(certs, srv.port, version)
        proto = await srv.protocol()
        assert isinstance(proto, Echo)

        async def send() -> None:
            rng = random.Random(4)
            pos = 0
            while pos < len(data):
                n = rng.choice((1, 100, 1500, 16384, 70_000))
                writer.write(data[pos:pos + n])
                pos += n
                await writer.drain()

        sender = asyncio.create_task(send())
        got = await asyncio.wait_for(reader.readexactly(len(data)), TIMEOUT)
        await sender
        assert got == data
        assert proto.decrypted == len(data)
        assert proto.get_buffers >= 1
        assert proto.pooled_views == proto.get_buffers  # every receive view was pool memory
        assert writer.get_extra_info("ssl_object").version() == (
            "TLSv1.3" if version is ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
        await _close(writer)
        await wait_until(lambda: proto.transport is None)
    assert_pool_clean(pool)


@pytest.mark.asyncio
async def test_tls_frames_across_ring_wrap_and_growth_then_close_notify(
    certs: CertBundle, version: ssl.TLSVersion
) -> None:
    pool = BufferPool()
    rng = random.Random(5)
    payloads = [rng.randbytes(rng.choice((0, 1, 200, 3000, 16384, 40_000))) for _ in range(60)]
    stream = b"".join(frame(p) for p in payloads)
    ctx = certs.server_context(NAME, version=version)
    factory = lambda: TLSFrames(pool, capacity=4096, max_capacity=1 << 17)  # noqa: E731
    async with Server(factory, ssl=ctx) as srv:
        _reader, writer = await _connect(certs, srv.port, version)
        proto = await srv.protocol()
        assert isinstance(proto, TLSFrames)
        for i in range(0, len(stream), 7000):  # chunks unrelated to frames and TLS records
            writer.write(stream[i:i + 7000])
        await writer.drain()
        await wait_until(lambda: len(proto.frames) == len(payloads))
        await _close(writer)  # close_notify, then TCP close
        await wait_until(lambda: proto.lost)
    assert proto.frames == payloads
    assert proto.eof  # the peer's close_notify reached eof_received
    assert proto.ring_grows >= 1  # 40 KB frames in a 4 KiB ring
    assert proto.buffered_at_loss == 0
    assert_pool_clean(pool)


class Hold(PooledProtocol):
    """Consumes nothing by itself: the test takes data out with ``read``."""

    def __init__(self, pool: BufferPool) -> None:
        super().__init__(pool, capacity=16384, max_capacity=65536, resume_below=16384)
        self.paused_seen = False

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        self.paused_seen |= self.reading_paused


@pytest.mark.asyncio
async def test_tls_full_ring_pauses_the_ssl_transport_and_resumes_byte_exact(
    certs: CertBundle,
) -> None:
    pool = BufferPool()
    data = random.Random(6).randbytes(1024 * 1024)
    async with Server(lambda: Hold(pool), ssl=certs.server_context(NAME)) as srv:
        _reader, writer = await _connect(certs, srv.port)
        proto = await srv.protocol()
        assert isinstance(proto, Hold)
        writer.write(data)
        sender = asyncio.create_task(writer.drain())  # completes as the test reads
        await wait_until(lambda: proto.reading_paused)
        ring = proto.ring
        assert len(ring) == ring.max_capacity == 65536  # full, and not grown past its bound
        assert not proto.transport.is_reading()  # type: ignore[union-attr]
        got = bytearray()
        while len(got) < len(data):
            await wait_until(lambda: len(proto.ring) > 0)
            got += proto.read()  # resumes the transport once below resume_below
        await sender
        assert proto.paused_seen
        assert bytes(got) == data
        await _close(writer)
        await wait_until(lambda: proto.transport is None)
    assert_pool_clean(pool)


@pytest.mark.asyncio
async def test_tls_client_abort_mid_frame_releases_the_ring(certs: CertBundle) -> None:
    pool = BufferPool()
    async with Server(lambda: TLSFrames(pool), ssl=certs.server_context(NAME)) as srv:
        _reader, writer = await _connect(certs, srv.port)
        proto = await srv.protocol()
        assert isinstance(proto, TLSFrames)
        writer.write(frame(b"whole") + struct.pack(">I", 100_000) + b"x" * 30_000)
        await writer.drain()
        await wait_until(lambda: proto.received >= 4 + 5 + 4 + 30_000)
        assert pool.stats().in_use >= 1  # the ring holds the partial frame
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # no close_notify, a TCP reset
        await wait_until(lambda: proto.lost)
    assert proto.frames == [b"whole"]
    assert not proto.eof
    assert proto.buffered_at_loss == 4 + 30_000  # dropped with the ring, which went back
    assert_pool_clean(pool)


@pytest.mark.asyncio
async def test_tls_server_abort_from_data_available_releases_the_ring(
    certs: CertBundle,
) -> None:
    pool = BufferPool()
    factory = lambda: TLSFrames(pool, max_frame=1000)  # noqa: E731
    async with Server(factory, ssl=certs.server_context(NAME)) as srv:
        reader, writer = await _connect(certs, srv.port)
        proto = await srv.protocol()
        assert isinstance(proto, TLSFrames)
        writer.write(frame(b"ok") + struct.pack(">I", 1001) + b"y" * 2000)
        await writer.drain()
        await wait_until(lambda: proto.lost)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
            await asyncio.wait_for(reader.readexactly(1), TIMEOUT)
        await _close(writer)
    assert proto.aborted and proto.frames == [b"ok"]
    assert_pool_clean(pool)


@pytest.mark.asyncio
async def test_tls_failed_or_stalled_handshake_takes_no_pool_memory(
    certs: CertBundle,
) -> None:
    pool = BufferPool()
    made: list[TLSFrames] = []

    def factory() -> TLSFrames:
        proto = TLSFrames(pool)
        made.append(proto)
        return proto

    loop = asyncio.get_running_loop()
    ctx = certs.server_context(NAME)
    async with Server(factory, ssl=ctx, ssl_handshake_timeout=1.0) as srv:
        # plaintext on the TLS port: the handshake fails, the connection closes
        reader, writer = await asyncio.open_connection(HOST, srv.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:  # closed by the server (an alert or nothing before it, a FIN or a reset)
            await asyncio.wait_for(reader.read(), TIMEOUT)
        except ConnectionResetError:
            pass
        writer.close()
        # silence after connecting: closed at the handshake timeout
        sock = socket.create_connection((HOST, srv.port))
        sock.setblocking(False)
        try:
            assert await asyncio.wait_for(loop.sock_recv(sock, 1), TIMEOUT) == b""
        except ConnectionResetError:
            pass
        finally:
            sock.close()
        assert pool.stats().in_use == 0
        # a real client still gets through afterwards
        _r, w = await _connect(certs, srv.port)
        w.write(frame(b"after"))
        await w.drain()
        await wait_until(lambda: any(p.frames == [b"after"] for p in made))
        await _close(w)
        await wait_until(lambda: all(p.transport is None for p in made))
    assert all(p.ring_grows == 0 for p in made)
    assert sum(1 for p in made if p.lost) == 1  # only the real client got a ring
    assert_pool_clean(pool)


def test_tls_echo_with_a_blocking_stdlib_client_both_loops(
    certs: CertBundle, loop_factory: object
) -> None:
    """The server on its own loop thread, a plain ``ssl.SSLSocket`` client (what
    ``openssl s_client`` would be): byte-exact both ways, pool clean after."""
    import threading

    pool = BufferPool()
    ready = threading.Event()
    state: dict[str, object] = {}
    protos: list[Echo] = []

    def make() -> Echo:
        protos.append(Echo(pool))
        return protos[-1]

    def serve() -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(make, HOST, 0, ssl=certs.server_context(NAME))
            state["port"] = server.sockets[0].getsockname()[1]
            stop = asyncio.Event()
            state["stop"] = (loop, stop)
            ready.set()
            await stop.wait()
            server.close()
            await server.wait_closed()
            await wait_until(lambda: all(p.transport is None for p in protos))

        with asyncio.Runner(loop_factory=loop_factory) as runner:  # type: ignore[arg-type]
            runner.run(main())

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert ready.wait(TIMEOUT)
        data = random.Random(7).randbytes(300_000)
        raw = socket.create_connection((HOST, int(state["port"])), timeout=TIMEOUT)  # type: ignore[call-overload]
        with certs.client_context().wrap_socket(raw, server_hostname=NAME) as tls:
            got = bytearray()
            for i in range(0, len(data), 50_000):
                tls.sendall(data[i:i + 50_000])
                while len(got) < i + min(50_000, len(data) - i):
                    got += tls.recv(65536)
            assert bytes(got) == data
    finally:
        loop, stop = state["stop"]  # type: ignore[misc]
        loop.call_soon_threadsafe(stop.set)
        t.join(TIMEOUT)
    assert len(protos) == 1 and protos[0].decrypted == len(data)
    assert_pool_clean(pool)
