"""End-to-end: Python ssl clients -> bufpool.tls.SNIProxy -> two Python ssl servers, routed
by SNI, TLS 1.2 and 1.3, 10 MiB each way byte-exact, on both loops; refusals for unknown
names and plaintext HTTP; name matching; the command line; no pooled memory left in use
afterwards.  Deadlines, memory, half-close, the cap and metrics: test_sni_proxy_limits.py."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import ssl
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import bufpool
from bufpool.tls import ProxyLimits, RouteTable, SNIProxy
from bufpool.tls._proxy import ClientSide
from tests._helpers_proxy import (
    ALERT_INTERNAL_ERROR,
    assert_pool_drained,
    client_hello,
    echo_with_name,
    running_proxy,
    tls_roundtrip,
)
from tests._tls_helpers import CertBundle, make_certs

NAMES = ("example.com", "other.test")
SIZE = 10 * 1024 * 1024
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    return make_certs(list(NAMES), tmp_path_factory.mktemp("proxycerts"))


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
    proxy = SNIProxy(routes, pool=pool)
    server = await proxy.start("127.0.0.1", 0)
    try:
        yield Setup(pool, server.sockets[0].getsockname()[1], certs)
    finally:
        await proxy.aclose()
        for srv in servers:
            srv.close()
        for srv in servers:
            await srv.wait_closed()
    await assert_pool_drained(pool)


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


def connect_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__qualname__", "") == "ClientSide.connect"]


async def start_proxy(routes: dict[str, tuple[str, int]], *, pool: bufpool.BufferPool,
                      connect_timeout: float) -> tuple[SNIProxy, int]:
    proxy = SNIProxy(routes, pool=pool, limits=ProxyLimits(connect_timeout=connect_timeout))
    server = await proxy.start("127.0.0.1", 0)
    return proxy, server.sockets[0].getsockname()[1]


@pytest.mark.asyncio
async def test_black_holed_upstream_is_refused_after_the_connect_timeout() -> None:
    hole = BlackHole()
    pool = bufpool.BufferPool()
    proxy, port = await start_proxy({"example.com": ("127.0.0.1", hole.port)}, pool=pool,
                                    connect_timeout=0.3)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(client_hello("example.com"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await asyncio.wait_for(reader.read(), timeout=10)  # until the proxy closes
        waited = loop.time() - started
        writer.close()
        assert reply == ALERT_INTERNAL_ERROR
        assert 0.25 <= waited < 5, waited
        assert connect_tasks() == []
    finally:
        await proxy.aclose()
        hole.close()
    await assert_pool_drained(pool)


@pytest.mark.asyncio
async def test_client_connection_lost_while_its_upstream_connects_cancels_the_connect() -> None:
    # While the upstream connects the client side does not read (its records are held), so
    # a client that leaves is only noticed through the timeout; a connection lost otherwise
    # (aborted here) cancels the connect at once instead of leaving it to run out.
    hole = BlackHole()
    pool = bufpool.BufferPool()
    proxy, port = await start_proxy({"example.com": ("127.0.0.1", hole.port)}, pool=pool,
                                    connect_timeout=60)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(client_hello("example.com"))
        for _ in range(500):
            if connect_tasks():
                break
            await asyncio.sleep(0.01)
        (task,) = connect_tasks()
        assert pool.stats().in_use >= 2  # the client's ring and its held ClientHello record
        side: ClientSide = task.get_coro().cr_frame.f_locals["self"]  # type: ignore[union-attr]
        assert side.tunnel.connecting is task and side.transport is not None
        side.transport.abort()
        await asyncio.wait_for(asyncio.wait([task]), timeout=10)
        assert task.cancelled() and side.tunnel.connecting is None
        writer.close()
    finally:
        await proxy.aclose()
        hole.close()
    await assert_pool_drained(pool)


def test_route_table_matching_rules() -> None:
    table = RouteTable({"Example.COM.": ("a", 1), "*.wild.test": ("w", 2),
                        "exact.wild.test": ("e", 3)})
    assert table.lookup("example.com") == ("a", 1)
    assert table.lookup("EXAMPLE.com.") == ("a", 1)  # case and one trailing dot ignored
    assert table.lookup("a.wild.test") == ("w", 2)
    assert table.lookup("A.Wild.Test.") == ("w", 2)
    assert table.lookup("exact.wild.test") == ("e", 3)  # exact beats wildcard
    assert table.lookup("wild.test") is None  # the wildcard needs one more label
    assert table.lookup("a.b.wild.test") is None  # ... exactly one
    assert table.lookup("other.com") is None
    assert table.lookup(None) is None and table.lookup("") is None
    with pytest.raises(ValueError, match="leading"):
        RouteTable({"a.*.test": ("x", 1)})


@pytest.mark.asyncio
async def test_mixed_case_name_routes_through_a_wildcard_with_a_real_tls_client(
    tmp_path: object,
) -> None:
    from tests._helpers_proxy import tls_echo_servers

    certs = make_certs(["*.wild.test"], str(tmp_path))
    async with tls_echo_servers(certs, ("*.wild.test",)) as routes, \
            running_proxy(routes) as (_, port, log):
        who, got, _ = await asyncio.wait_for(
            tls_roundtrip(port, certs, "Api.Wild.Test", b"x" * 1000), 30)
        assert (who, got) == ("*.wild.test", b"x" * 1000)
        summary = await log.next()
        assert summary.server_name == "Api.Wild.Test"  # logged as the client sent it


@pytest.mark.asyncio
async def test_unknown_name_is_logged_as_a_refusal() -> None:
    async with running_proxy({"example.com": ("127.0.0.1", 9)}) as (proxy, port, log):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(client_hello("nobody.invalid"))
        assert await asyncio.wait_for(reader.read(), 30) == b"\x15\x03\x03\x00\x02\x02\x70"
        writer.close()
        summary = await log.next()
        assert (summary.reason, summary.alert, summary.server_name, summary.upstream) == (
            "unknown_name", "unrecognized_name", "nobody.invalid", None)
        assert summary.detail == "no route for 'nobody.invalid'"
        assert proxy.stats.refusals == {"unrecognized_name": 1}


def test_limits_are_validated_with_messages_naming_the_limit() -> None:
    for kwargs, match in (
        ({"hello_timeout": 0}, "hello_timeout must be a positive number of seconds"),
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"max_connections": 0}, "max_connections must be >= 1"),
        ({"max_client_hello": 10}, "max_client_hello must be >= 64 bytes"),
        ({"max_buffer": 16384}, "max_buffer must be at least 36874 bytes"),
        ({"initial_buffer": 0}, "initial_buffer"),
    ):
        with pytest.raises(ValueError, match=match):
            ProxyLimits(**kwargs)  # type: ignore[arg-type]
    assert ProxyLimits(idle_timeout=None, shrink_after=None, max_connections=None)


def test_help_states_listen_address_matching_and_refusals() -> None:
    import subprocess

    out = subprocess.run([sys.executable, "examples/sni_proxy.py", "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    flat = " ".join(out.split())
    assert "Listens on 127.0.0.1:8443" in flat
    assert "case-insensitively" in flat and "trailing dot" in flat and "*.example.com" in flat
    assert "unknown name, or no SNI at all, a fatal TLS unrecognized_name alert" in flat
    for flag, default in (("--hello-timeout", "10.0"), ("--connect-timeout", "10.0"),
                          ("--idle-timeout", "3600.0"), ("--half-close-timeout", "30.0"),
                          ("--max-connections", "1024")):
        assert flag in flat
        options = flat[flat.index("options:"):]
        after = options[options.index(flag):]
        assert f"(default {default})" in after[:300], flag


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
