"""End-to-end: Python ssl clients -> examples/sni_proxy.py -> two Python ssl servers, routed
by SNI, TLS 1.2 and 1.3, 10 MiB each way byte-exact, on both loops; refusals for unknown
names and plaintext HTTP; no pooled memory left in use afterwards."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import ssl
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import bufpool
from examples.sni_proxy import start_proxy
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
            lambda r, w, n=name: echo_with_name(n, r, w), "127.0.0.1", 0, ssl=ctx
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
