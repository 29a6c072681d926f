"""End-to-end: Python ssl clients -> examples/sni_proxy.py -> two Python ssl servers, routed
by SNI, TLS 1.2 and 1.3, 10 MiB each way byte-exact, on both loops; refusals for unknown
names and plaintext HTTP; no pooled memory left in use afterwards."""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import os
import ssl
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import bufpool
from examples.sni_proxy import ClientSide, start_proxy
from tests._tls_helpers import CertBundle, make_certs

NAMES = ("example.com", "other.test")
SIZE = 10 * 1024 * 1024
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    return make_certs(list(NAMES), tmp_path_factory.mktemp("proxycerts"))


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


class Setup:
    def __init__(self, pool: bufpool.BufferPool, proxy_port: int, certs: CertBundle) -> None:
        self.pool = pool
        self.port = proxy_port
        self.certs = certs


@pytest_asyncio.fixture
async def setup(certs: CertBundle) -> AsyncIterator[Setup]:
    servers = []
    routes = {}
    for name in NAMES:
        ctx = certs.server_context(name)
        srv = await asyncio.start_server(
            functools.partial(echo_with_name, name), "127.0.0.1", 0, ssl=ctx
        )
        servers.append(srv)
        routes[name] = ("127.0.0.1", srv.sockets[0].getsockname()[1])
    pool = bufpool.BufferPool()
    proxy = await start_proxy(routes, "127.0.0.1", 0, pool=pool)
    try:
        yield Setup(pool, proxy.sockets[0].getsockname()[1], certs)
    finally:
        proxy.close()
        for srv in servers:
            srv.close()
        await proxy.wait_closed()
        for srv in servers:
            await srv.wait_closed()
    await assert_pool_drained(pool)


async def assert_pool_drained(pool: bufpool.BufferPool) -> None:
    for _ in range(500):  # connections finish closing on the next loop iterations
        gc.collect()
        pool.reclaim()
        st = pool.stats()
        if st.in_use == 0 and st.quarantined == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pooled memory still in use: {pool.stats()}")


async def roundtrip(port: int, certs: CertBundle, name: str, version: ssl.TLSVersion,
                    size: int) -> tuple[str, str | None]:
    ctx = certs.client_context(version=version)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=name
    )
    payload = os.urandom(size)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, size, 131072):
            writer.write(view[i:i + 131072])
            await writer.drain()

    sender = asyncio.create_task(send())
    who = (await reader.readline()).decode().strip()
    got = await reader.readexactly(size)
    await sender
    version_used = writer.get_extra_info("ssl_object").version()
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    return who, version_used


@pytest.mark.asyncio
@pytest.mark.parametrize("version", sorted(VERSIONS))
async def test_routes_by_sni_and_forwards_10_mib_each_way(setup: Setup, version: str) -> None:
    results = await asyncio.wait_for(
        asyncio.gather(*(
            roundtrip(setup.port, setup.certs, name, VERSIONS[version], SIZE) for name in NAMES
        )),
        timeout=90,
    )
    expected = "TLSv1.2" if version == "1.2" else "TLSv1.3"
    assert results == [(name, expected) for name in NAMES]


@pytest.mark.asyncio
async def test_unknown_name_is_refused_with_unrecognized_name(setup: Setup) -> None:
    ctx = setup.certs.client_context()
    ctx.check_hostname = False
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", setup.port, ssl=ctx,
                                    server_hostname="nobody.invalid"),
            timeout=30,
        )


@pytest.mark.asyncio
async def test_plain_http_client_gets_a_clear_refusal(setup: Setup) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), timeout=30)  # until the proxy closes
    writer.close()
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"expects TLS" in reply


@pytest.mark.asyncio
async def test_garbage_gets_an_alert_and_close(setup: Setup) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(b"\x16\x09\x01\x00\x05hello")  # handshake with a bad version byte
    reply = await asyncio.wait_for(reader.read(), timeout=30)
    writer.close()
    assert reply == b"\x15\x03\x03\x00\x02\x02\x46"  # fatal protocol_version


class BlackHole:
    """A loopback port whose connects hang: a listen(0) socket whose accept queue is full."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port: int = self.sock.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port))  # fills the queue

    def close(self) -> None:
        self.filler.close()
        self.sock.close()


def client_hello(name: str) -> bytes:
    """The ClientHello records an ssl client sends for ``name``, captured via MemoryBIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def connect_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__qualname__", "") == "ClientSide.connect"]


@pytest.mark.asyncio
async def test_black_holed_upstream_is_refused_after_the_connect_timeout() -> None:
    hole = BlackHole()
    pool = bufpool.BufferPool()
    proxy = await start_proxy({"example.com": ("127.0.0.1", hole.port)}, pool=pool,
                              connect_timeout=0.3)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.sockets[0].getsockname()[1])
        writer.write(client_hello("example.com"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await asyncio.wait_for(reader.read(), timeout=10)  # until the proxy closes
        waited = loop.time() - started
        writer.close()
        assert reply == b"\x15\x03\x03\x00\x02\x02\x50"  # fatal internal_error
        assert 0.25 <= waited < 5, waited
        assert connect_tasks() == []
    finally:
        proxy.close()
        await proxy.wait_closed()
        hole.close()
    await assert_pool_drained(pool)


@pytest.mark.asyncio
async def test_client_connection_lost_while_its_upstream_connects_cancels_the_connect() -> None:
    # While the upstream connects the client side does not read (its records are held), so
    # a client that leaves is only noticed through the timeout; a connection lost otherwise
    # (aborted here) cancels the connect at once instead of leaving it to run out.
    hole = BlackHole()
    pool = bufpool.BufferPool()
    proxy = await start_proxy({"example.com": ("127.0.0.1", hole.port)}, pool=pool,
                              connect_timeout=60)
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.sockets[0].getsockname()[1])
        writer.write(client_hello("example.com"))
        for _ in range(500):
            if connect_tasks():
                break
            await asyncio.sleep(0.01)
        (task,) = connect_tasks()
        assert pool.stats().in_use >= 2  # the client's ring and its held ClientHello record
        side: ClientSide = task.get_coro().cr_frame.f_locals["self"]  # type: ignore[union-attr]
        assert side.connecting is task and side.transport is not None
        side.transport.abort()
        await asyncio.wait_for(asyncio.wait([task]), timeout=10)
        assert task.cancelled() and side.connecting is None
        writer.close()
    finally:
        proxy.close()
        await proxy.wait_closed()
        hole.close()
    await assert_pool_drained(pool)


def test_command_line_runs_and_prints_listening(tmp_path: object) -> None:
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "examples/sni_proxy.py", "--listen", "127.0.0.1:0",
         "--route", "example.com=127.0.0.1:9"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
