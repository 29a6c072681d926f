"""SNIProxy under the attackers its limits exist for, on both loops (and both cores: run with
BUFPOOL_NO_EXTENSIONS=1 too): stalled and trickled ClientHellos, idle crowds, half-closed
tunnels with a silent peer, a client that never reads, a connection flood over the cap; and
what an operator sees (the log line, the metrics endpoint).  Waits are on the proxy's log
records (one per finished connection) and on peer events, never on sleeps."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from bufpool.tls import ProxyLimits
from tests._helpers_proxy import (
    ALERT_INTERNAL_ERROR,
    assert_pool_drained,
    bio_tls_roundtrip,
    client_hello,
    in_use_bytes,
    raw_upstream,
    rec,
    running_proxy,
    tls_echo_servers,
    tls_roundtrip,
    wait_for,
)
from tests._tls_helpers import CertBundle, make_certs

NAME = "example.com"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    return make_certs([NAME], tmp_path_factory.mktemp("limitcerts"))


@pytest_asyncio.fixture
async def echo_routes(certs: CertBundle) -> AsyncIterator[dict[str, tuple[str, int]]]:
    async with tls_echo_servers(certs, (NAME,)) as routes:
        yield routes


async def connect_raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


# ---------------------------------------------------------------------- ClientHello deadline
@pytest.mark.asyncio
async def test_stalled_partial_client_hello_is_closed_at_its_deadline_with_memory_back() -> None:
    limits = ProxyLimits(hello_timeout=0.5)
    async with running_proxy({NAME: ("127.0.0.1", 9)}, limits=limits) as (proxy, port, log):
        reader, writer = await connect_raw(port)
        writer.write(client_hello(NAME)[:11])  # 11 bytes of a ClientHello, then silence
        await wait_for(lambda: proxy.stats.open == 1 and in_use_bytes(proxy.pool) > 0,
                       "the connection to hold its ring")
        summary = await log.next()
        assert (summary.reason, summary.alert) == ("hello_timeout", None)
        assert summary.detail == "no complete ClientHello within hello_timeout=0.5s"
        assert summary.duration >= 0.5
        assert in_use_bytes(proxy.pool) == 0  # given back when the deadline fired
        assert await asyncio.wait_for(reader.read(), 10) == b""  # a close, no alert
        writer.close()


@pytest.mark.asyncio
async def test_trickled_client_hello_is_closed_at_the_deadline_although_bytes_keep_coming(
) -> None:
    # 1 byte per 50 ms would take 26 s for a 517-byte hello: the deadline counts from accept,
    # it is not an inactivity timer.
    limits = ProxyLimits(hello_timeout=0.5)
    async with running_proxy({NAME: ("127.0.0.1", 9)}, limits=limits) as (proxy, port, log):
        _reader, writer = await connect_raw(port)
        hello = client_hello(NAME)

        async def trickle() -> None:
            try:
                for b in hello:
                    writer.write(bytes((b,)))
                    await writer.drain()
                    await asyncio.sleep(0.05)
            except ConnectionError:
                pass

        task = asyncio.create_task(trickle())
        summary = await log.next()
        assert summary.reason == "hello_timeout" and summary.bytes_up == 0
        assert in_use_bytes(proxy.pool) == 0
        assert not task.done()  # it was still sending when the proxy cut it off
        task.cancel()
        writer.close()


@pytest.mark.asyncio
async def test_one_byte_at_a_time_hello_still_works_under_the_defaults(
    certs: CertBundle, echo_routes: dict[str, tuple[str, int]],
) -> None:
    async with running_proxy(echo_routes) as (_proxy, port, log):
        payload = os.urandom(50_000)
        who, got = await asyncio.wait_for(
            bio_tls_roundtrip(port, certs, NAME, payload, first_flight_step=1), 30)
        assert (who, got) == (NAME, payload)
        summary = await log.next()
        assert summary.server_name == NAME and summary.bytes_up > len(payload)


@pytest.mark.asyncio
async def test_stalled_and_trickling_hellos_under_the_defaults_do_not_stop_real_clients(
    certs: CertBundle, echo_routes: dict[str, tuple[str, int]],
) -> None:
    hello = client_hello(NAME)
    async with running_proxy(echo_routes) as (proxy, port, _log):
        stalled = [await connect_raw(port) for _ in range(40)]
        for _, w in stalled:
            w.write(hello[:11])
        trickling = [await connect_raw(port) for _ in range(10)]
        stop = asyncio.Event()

        async def trickle(w: asyncio.StreamWriter) -> None:
            for b in hello[:-1]:
                if stop.is_set():
                    return
                w.write(bytes((b,)))
                await asyncio.sleep(0.1)

        tasks = [asyncio.create_task(trickle(w)) for _, w in trickling]
        await wait_for(lambda: proxy.stats.open == 50, "50 attackers accepted")
        for i in range(5):
            payload = os.urandom(10_000 + i)
            who, got, _ = await asyncio.wait_for(tls_roundtrip(port, certs, NAME, payload), 30)
            assert (who, got) == (NAME, payload)
        # 50 attackers hold about a kilobyte of pool memory each
        attackers = in_use_bytes(proxy.pool)
        assert attackers <= 50 * 2048, attackers
        stop.set()
        await asyncio.gather(*tasks)
        for _, w in stalled + trickling:
            w.close()


@pytest.mark.asyncio
async def test_oversized_client_hello_is_refused_as_soon_as_its_length_is_known() -> None:
    # A first record whose handshake header announces 60,000 bytes (over max_client_hello,
    # 16 KiB by default): decode_error right away instead of collecting 60 KB.
    body = b"\x01" + (60_000).to_bytes(3, "big") + b"\x03\x03" + bytes(506)
    async with running_proxy({NAME: ("127.0.0.1", 9)}) as (_proxy, port, log):
        reader, writer = await connect_raw(port)
        writer.write(rec(22, body, 0x0301))
        assert await asyncio.wait_for(reader.read(), 10) == b"\x15\x03\x03\x00\x02\x02\x32"
        summary = await log.next()
        assert (summary.reason, summary.alert) == ("bad_hello", "decode_error")
        assert summary.detail is not None and "exceeds the limit of 16384 bytes" in summary.detail
        writer.close()


@pytest.mark.asyncio
async def test_client_hello_split_into_one_byte_records_costs_its_wire_bytes_and_still_routes(
    certs: CertBundle, echo_routes: dict[str, tuple[str, int]],
) -> None:
    # A 16,000-byte ClientHello sent as 1-byte handshake records (6 wire bytes each, 96 KB),
    # all but the last: the held records once cost a 64-byte slot and two objects each
    # (1,064 KiB of pool and ~10 MiB RSS per connection); now the pool holds about the wire
    # bytes.  A real client whose hello comes in 1-byte records is still routed, byte-exact.
    body = b"\x01" + (16_000 - 4).to_bytes(3, "big") + b"\x03\x03" + bytes(16_000 - 6)
    wire = b"".join(rec(22, body[i:i + 1], 0x0301) for i in range(len(body) - 1))
    async with running_proxy(echo_routes) as (proxy, port, _log):
        conns = [await connect_raw(port) for _ in range(4)]
        for _, w in conns:
            w.write(wire)

        def all_held() -> bool:
            clients = [t.client for t in proxy._tunnels]
            return len(clients) == 4 and all(
                c is not None and c.collector is not None and c.collector.records == len(body) - 1
                for c in clients)

        await wait_for(all_held, "every 1-byte record of 4 hellos received")
        per_conn = in_use_bytes(proxy.pool) / 4
        # the wire bytes held, packed, plus a ring grown to at most 64 KiB
        assert per_conn <= 1.25 * len(wire) + 65536, per_conn
        payload = os.urandom(20_000)
        who, got = await asyncio.wait_for(bio_tls_roundtrip(
            port, certs, NAME, payload, first_flight_step=65536, first_flight_records=1), 30)
        assert (who, got) == (NAME, payload)
        for _, w in conns:
            w.transport.abort()


# ---------------------------------------------------------------------- memory per connection
@pytest.mark.asyncio
async def test_300_idle_connections_cost_about_a_kilobyte_of_pool_memory_each() -> None:
    async with running_proxy({NAME: ("127.0.0.1", 9)}) as (proxy, port, log):
        conns = [await connect_raw(port) for _ in range(300)]
        for _, w in conns[::2]:
            w.write(client_hello(NAME)[:11])  # half of them sent a partial ClientHello
        await wait_for(lambda: proxy.stats.open == 300, "300 connections accepted")
        for _ in range(3):  # and the partial hellos were read
            await wait_for(lambda: proxy.pool.stats().in_use >= 300, "300 rings")
        held = in_use_bytes(proxy.pool)
        assert held <= 300 * 1024, f"{held} bytes for 300 idle connections"
        assert proxy.pool.stats().in_use == 300  # one small ring each, nothing else
        for _, w in conns:
            w.close()
        for _ in range(300):
            await log.next()
        assert in_use_bytes(proxy.pool) == 0


@pytest.mark.asyncio
async def test_rings_grow_with_the_traffic_and_a_tunnel_still_moves_16_kib_records(
    certs: CertBundle, echo_routes: dict[str, tuple[str, int]],
) -> None:
    async with running_proxy(echo_routes) as (_proxy, port, log):
        payload = os.urandom(2 * 1024 * 1024)
        who, got, _ = await asyncio.wait_for(tls_roundtrip(port, certs, NAME, payload), 60)
        assert (who, got) == (NAME, payload)
        summary = await log.next()
        assert summary.bytes_up > len(payload) and summary.bytes_down > len(payload)


@pytest.mark.asyncio
async def test_a_tunnel_gone_quiet_after_a_burst_shrinks_its_rings_back_to_a_kilobyte() -> None:
    limits = ProxyLimits(shrink_after=0.3)
    hello = client_hello(NAME)
    async with raw_upstream() as (ups, up_port), \
            running_proxy({NAME: ("127.0.0.1", up_port)}, limits=limits) as (proxy, port, log):
        reader, writer = await connect_raw(port)
        burst = b"".join(rec(23, os.urandom(16_000)) for _ in range(20))
        writer.write(hello + burst)
        await wait_for(lambda: ups and len(ups[0].received) == len(hello) + len(burst),
                       "the burst upstream")
        up = ups[0]
        assert up.transport is not None
        reply = rec(22, b"\x02\x00\x00\x00") + burst
        up.transport.write(reply)
        assert await asyncio.wait_for(reader.readexactly(len(reply)), 10) == reply
        (tunnel,) = proxy._tunnels
        sides = (tunnel.client, tunnel.upstream)
        assert all(s is not None for s in sides)
        # quiet now: both rings go back to 1 KiB (two 1 KiB slots: nothing else is held)
        await wait_for(lambda: in_use_bytes(proxy.pool) == 2 * 1024, "the rings to shrink")
        for side in sides:
            assert side is not None and side.ring.capacity == 1024 and side.ring.grows >= 4
        # and the next burst grows them again, bytes intact
        up.received.clear()
        writer.write(burst)
        await wait_for(lambda: len(up.received) == len(burst), "the second burst")
        assert bytes(up.received) == burst
        up.transport.write(burst)
        assert await asyncio.wait_for(reader.readexactly(len(burst)), 10) == burst
        writer.close()
        up.transport.close()
        assert (await log.next()).bytes_down == len(reply) + len(burst)


@pytest.mark.asyncio
async def test_a_trickle_after_a_burst_cannot_keep_the_grown_ring() -> None:
    # Grow the client's ring with one burst, then send a 6-byte record far more often than
    # shrink_after: reads never stop, yet the side forwarded fewer than initial_buffer bytes
    # per window, so its ring goes back to 1 KiB (before: 64 KiB kept for 1.5 B/s under the
    # defaults, a record every 4 s against shrink_after=5 s).
    limits = ProxyLimits(shrink_after=1.0)
    hello = client_hello(NAME)
    async with raw_upstream() as (ups, up_port), \
            running_proxy({NAME: ("127.0.0.1", up_port)}, limits=limits) as (proxy, port, _log):
        _reader, writer = await connect_raw(port)
        burst = b"".join(rec(23, os.urandom(16_000)) for _ in range(20))
        writer.write(hello + burst)
        await wait_for(lambda: ups and len(ups[0].received) == len(hello) + len(burst),
                       "the burst upstream")
        (tunnel,) = proxy._tunnels
        client = tunnel.client
        assert client is not None and client.ring.capacity == 65536
        stop = asyncio.Event()
        tick = rec(23, b"k")

        async def trickle() -> None:
            while not stop.is_set():
                writer.write(tick)
                await asyncio.sleep(0.05)

        task = asyncio.create_task(trickle())
        try:
            await wait_for(lambda: client.ring.capacity == 1024, "the trickled ring to shrink")
            assert not task.done()  # still trickling: reads never paused long enough
            last = tunnel.last
            await wait_for(lambda: tunnel.last > last, "one more trickled read")
        finally:
            stop.set()
            await task
        assert client.ring.capacity == 1024
        # the tunnel still forwards, and a burst grows the ring again, bytes intact
        up = ups[0]
        up.received.clear()
        writer.write(burst)
        await wait_for(lambda: up.received.endswith(burst), "the second burst")
        assert client.ring.capacity == 65536
        writer.close()


@pytest.mark.asyncio
async def test_a_flood_of_tiny_records_is_forwarded_with_a_lease_per_read_not_per_record() -> None:
    # 6-byte records: one pooled lease each used to reach the upstream's write queue, which
    # asyncio 3.12+ and uvloop keep as views (an upstream that did not read held ~12,600 of
    # them, 934 KiB of quarantined 64-byte slots per connection, for a 64 KiB high-water mark).
    # Packed per read, a flood costs about its bytes, in order and byte-exact.
    hello = client_hello(NAME)
    flood = b"".join(rec(23, bytes((i % 251,))) for i in range(3000))
    async with raw_upstream() as (ups, up_port), \
            running_proxy({NAME: ("127.0.0.1", up_port)}) as (proxy, port, _log):
        _reader, writer = await connect_raw(port)
        writer.write(hello)
        await wait_for(lambda: ups and len(ups[0].received) == len(hello), "the hello upstream")
        before = sum(t.hits + t.misses for t in proxy.pool.stats().tiers)
        writer.write(flood)
        await wait_for(lambda: len(ups[0].received) == len(hello) + len(flood), "the flood")
        acquired = sum(t.hits + t.misses for t in proxy.pool.stats().tiers) - before
        assert bytes(ups[0].received) == hello + flood
        assert acquired <= 100, acquired  # reads (and ring growth), not 3000 records
        assert proxy.stats.bytes_up == len(hello) + len(flood)
        writer.close()


# ---------------------------------------------------------------------- half-close
@pytest.mark.asyncio
async def test_client_closes_and_upstream_stays_silent_everything_is_released() -> None:
    limits = ProxyLimits(half_close_timeout=0.5)
    hello = client_hello(NAME)
    async with raw_upstream() as (ups, up_port), \
            running_proxy({NAME: ("127.0.0.1", up_port)}, limits=limits) as (proxy, port, log):
        _reader, writer = await connect_raw(port)
        data = rec(23, os.urandom(3000))
        writer.write(hello + data)
        await wait_for(lambda: ups and len(ups[0].received) == len(hello) + len(data),
                       "the upstream to get the hello and a record")
        up = ups[0]
        writer.close()  # the client is gone; the upstream never says a word
        await asyncio.wait_for(up.got_eof.wait(), 10)  # the half-close was passed on
        summary = await log.next()
        assert summary.reason == "half_close_timeout"
        assert (summary.bytes_up, summary.bytes_down) == (len(hello) + len(data), 0)
        # the upstream connection was closed too: the upstream (which stopped reading at EOF)
        # learns it from the reset its writes provoke
        for _ in range(1000):
            if up.lost.is_set() or up.transport is None:
                break
            up.transport.write(rec(22, b"\x02\x00\x00\x00"))
            await asyncio.sleep(0.01)
        assert up.lost.is_set()
        await assert_pool_drained(proxy.pool)
        assert proxy.stats.open == 0 and proxy.stats.tunnels_open == 0


@pytest.mark.asyncio
async def test_the_side_that_sent_eof_gives_its_ring_back_while_the_tunnel_stays_half_open(
) -> None:
    hello = client_hello(NAME)
    async with raw_upstream() as (ups, up_port), \
            running_proxy({NAME: ("127.0.0.1", up_port)}) as (proxy, port, log):
        _, writer = await connect_raw(port)
        writer.write(hello)
        await wait_for(lambda: ups and len(ups[0].received) == len(hello), "the tunnel")
        up = ups[0]
        (tunnel,) = proxy._tunnels
        client_side = tunnel.client
        assert client_side is not None and client_side._ring is not None
        assert not client_side._ring.closed
        rings = proxy.pool.stats().in_use  # the client's ring and the upstream's
        writer.close()
        await asyncio.wait_for(up.got_eof.wait(), 10)
        # the default half-close deadline (30 s) is far away: the tunnel is still open ...
        assert proxy.stats.open == 1 and tunnel.phase == "open"
        # ... but the client side's ring went back when its EOF arrived
        assert client_side._ring.closed and proxy.pool.stats().in_use == rings - 1
        assert up.transport is not None
        up.transport.close()  # the upstream finishes: both directions are done
        assert (await log.next()).reason in ("eof", "client_closed")


@pytest.mark.asyncio
async def test_upstream_closes_and_client_stays_silent_everything_is_released() -> None:
    limits = ProxyLimits(half_close_timeout=0.5)
    hello = client_hello(NAME)
    async with raw_upstream() as (ups, up_port), \
            running_proxy({NAME: ("127.0.0.1", up_port)}, limits=limits) as (proxy, port, log):
        reader, writer = await connect_raw(port)
        writer.write(hello)
        await wait_for(lambda: ups and len(ups[0].received) == len(hello), "the hello upstream")
        up = ups[0]
        reply = rec(22, b"\x02\x00\x00\x00") + rec(23, os.urandom(5000))
        assert up.transport is not None
        up.transport.write(reply)
        up.transport.write_eof()
        got = await asyncio.wait_for(reader.read(), 10)  # until the proxy passes the EOF on
        assert got == reply
        summary = await log.next()  # the client never closes: the half-close deadline does
        assert summary.reason == "half_close_timeout"
        assert (summary.bytes_up, summary.bytes_down) == (len(hello), len(reply))
        await assert_pool_drained(proxy.pool)
        writer.close()


@pytest.mark.asyncio
async def test_half_close_lets_the_upstream_answer_after_the_client_finished_sending() -> None:
    hello = client_hello(NAME)
    async with raw_upstream() as (ups, up_port), \
            running_proxy({NAME: ("127.0.0.1", up_port)}) as (_proxy, port, log):
        reader, writer = await connect_raw(port)
        request = rec(23, b"q" * 700)
        writer.write(hello + request)
        writer.write_eof()  # done sending; still reading
        await wait_for(lambda: ups and ups[0].got_eof.is_set(), "the EOF upstream")
        up = ups[0]
        assert bytes(up.received) == hello + request
        reply = rec(22, b"\x02\x00\x00\x00") + b"".join(
            rec(23, os.urandom(n)) for n in (16_000, 300, 16_401, 9000))
        assert up.transport is not None
        up.transport.write(reply)
        up.transport.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == reply
        summary = await log.next()
        assert summary.reason == "eof"
        assert (summary.bytes_up, summary.bytes_down) == (len(hello) + len(request), len(reply))
        writer.close()


# ---------------------------------------------------------------------- idle tunnels
@pytest.mark.asyncio
async def test_idle_tunnel_is_aborted_at_the_idle_timeout_and_activity_keeps_one_alive() -> None:
    limits = ProxyLimits(idle_timeout=1.0)
    hello = client_hello(NAME)
    async with raw_upstream() as (ups, up_port), \
            running_proxy({NAME: ("127.0.0.1", up_port)}, limits=limits) as (proxy, port, log):
        (_r1, w1), (_r2, w2) = await connect_raw(port), await connect_raw(port)
        w1.write(hello)
        w2.write(hello)
        await wait_for(lambda: len(ups) == 2 and all(len(u.received) == len(hello) for u in ups),
                       "two tunnels")
        busy_w = w1  # kept busy: a record every 50 ms, 20 times the rate the limit needs
        sends = 0
        done = asyncio.Event()

        async def keep_busy() -> None:
            nonlocal sends
            while not done.is_set():
                busy_w.write(rec(23, b"k" * 100))
                sends += 1
                await asyncio.sleep(0.05)

        task = asyncio.create_task(keep_busy())
        summary = await log.next()
        assert summary.reason == "idle_timeout" and summary.duration >= 1.0
        assert proxy.stats.open == 1  # the busy one is still there
        done.set()
        await task
        assert sends > 5
        for w in (w1, w2):
            w.close()
        assert (await log.next()).reason in ("client_closed", "half_close_timeout", "eof")


@pytest.mark.asyncio
async def test_client_that_never_reads_is_cut_at_the_idle_timeout_with_memory_back() -> None:
    limits = ProxyLimits(idle_timeout=0.5)
    hello = client_hello(NAME)
    async with raw_upstream() as (ups, up_port), \
            running_proxy({NAME: ("127.0.0.1", up_port)}, limits=limits) as (proxy, port, log):
        _reader, writer = await connect_raw(port)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(hello)
        await wait_for(lambda: ups and len(ups[0].received) == len(hello), "the tunnel")
        up = ups[0]
        assert up.transport is not None
        up.transport.write(rec(22, b"\x02\x00\x00\x00"))
        chunk = rec(23, bytes(16000))
        paused = asyncio.Event()
        up.transport.set_write_buffer_limits(high=65536)
        for _ in range(400):  # 6.4 MB at a client that never reads
            if up.lost.is_set():
                break
            up.transport.write(chunk)
            if up.transport.get_write_buffer_size() > 65536:
                paused.set()
                break
        await asyncio.wait_for(paused.wait(), 10)  # the proxy stopped reading the upstream
        summary = await log.next()
        assert summary.reason == "idle_timeout"
        assert summary.bytes_down > 0
        await assert_pool_drained(proxy.pool)
        writer.close()


# ---------------------------------------------------------------------- connection cap
@pytest.mark.asyncio
async def test_connection_cap_refuses_cleanly_and_serves_again_below_it(
    certs: CertBundle, echo_routes: dict[str, tuple[str, int]],
) -> None:
    limits = ProxyLimits(max_connections=3)
    async with running_proxy(echo_routes, limits=limits) as (proxy, port, log):
        held = [await connect_raw(port) for _ in range(3)]
        await wait_for(lambda: proxy.stats.open == 3, "three connections")
        reader, writer = await connect_raw(port)
        writer.write(client_hello(NAME))
        assert await asyncio.wait_for(reader.read(), 10) == ALERT_INTERNAL_ERROR  # then EOF
        writer.close()
        summary, line = await log.next_line()
        assert (summary.reason, summary.alert) == ("over_capacity", "internal_error")
        assert line.endswith("close=over_capacity alert=internal_error "
                             "detail='max_connections=3 were open'")
        # a real TLS client over the cap sees the alert by name
        ctx = certs.client_context()
        with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
            await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname=NAME), 30)
        assert (await log.next()).reason == "over_capacity"
        held[0][1].close()
        assert (await log.next()).reason == "client_closed"
        payload = os.urandom(1000)
        who, got, _ = await asyncio.wait_for(tls_roundtrip(port, certs, NAME, payload), 30)
        assert (who, got) == (NAME, payload)
        assert proxy.stats.refusals == {"internal_error": 2}
        for _, w in held[1:]:
            w.close()


@pytest.mark.asyncio
async def test_default_cap_holds_against_a_flood_of_idle_sockets_and_serves_after_it(
    certs: CertBundle, echo_routes: dict[str, tuple[str, int]],
) -> None:
    # The cheapest attacker against the cap: open sockets that send nothing, then more.
    cap = ProxyLimits().max_connections
    assert cap == 1024
    async with running_proxy(echo_routes) as (proxy, port, log):
        flood = [await connect_raw(port) for _ in range(cap)]
        await wait_for(lambda: proxy.stats.open == cap, "the cap filled", timeout=60)
        assert in_use_bytes(proxy.pool) <= cap * 1024  # a kilobyte each
        extra = [await connect_raw(port) for _ in range(20)]
        for reader, _ in extra:  # each gets the alert then EOF (or a reset once refusals pile)
            try:
                got = await asyncio.wait_for(reader.read(), 10)
            except ConnectionError:
                got = b""
            assert got in (ALERT_INTERNAL_ERROR, b"")
        assert proxy.stats.open == cap
        for _ in range(20):
            assert (await log.next()).reason == "over_capacity"
        for _, w in flood + extra:
            w.close()
        for _ in range(cap):
            await log.next()
        payload = os.urandom(5000)
        who, got, _ = await asyncio.wait_for(tls_roundtrip(port, certs, NAME, payload), 30)
        assert (who, got) == (NAME, payload)


@pytest.mark.asyncio
async def test_refused_clients_that_never_close_are_bounded_in_number_and_time() -> None:
    limits = ProxyLimits(max_connections=1)
    async with running_proxy({NAME: ("127.0.0.1", 9)}, limits=limits) as (proxy, port, log):
        _, holder = await connect_raw(port)
        await wait_for(lambda: proxy.stats.open == 1, "the cap filled")
        (r1, w1), (_, w2) = await connect_raw(port), await connect_raw(port)
        # neither closes; the second arrives while the first still lingers: aborted at once
        summary = await log.next()
        assert summary.reason == "over_capacity" and summary.duration < 1.0
        assert len(proxy._refused) <= 1
        # the first is dropped after its linger (1 s) although it never closes
        summary = await log.next()
        assert summary.reason == "over_capacity" and summary.duration >= 1.0
        assert await asyncio.wait_for(r1.read(), 10) == ALERT_INTERNAL_ERROR
        for w in (w1, w2, holder):
            w.close()


# ---------------------------------------------------------------------- operations
async def http_get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return head, body


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in metrics:\n{text}")


@pytest.mark.asyncio
async def test_metrics_endpoint_reports_the_counts_after_a_scripted_run(
    certs: CertBundle, echo_routes: dict[str, tuple[str, int]],
) -> None:
    limits = ProxyLimits(max_connections=2)
    async with running_proxy(echo_routes, limits=limits) as (proxy, port, log):
        metrics = await proxy.start_metrics("127.0.0.1", 0)
        mport = metrics.sockets[0].getsockname()[1]
        summaries = []
        for size in (1000, 20_000):  # two tunnels
            payload = os.urandom(size)
            who, got, _ = await asyncio.wait_for(tls_roundtrip(port, certs, NAME, payload), 30)
            assert (who, got) == (NAME, payload)
            summaries.append(await log.next())
        reader, writer = await connect_raw(port)  # an unknown name
        writer.write(client_hello("nobody.invalid"))
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
        summaries.append(await log.next())
        reader, writer = await connect_raw(port)  # plaintext HTTP
        writer.write(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
        summaries.append(await log.next())
        held = [await connect_raw(port) for _ in range(2)]  # fill the cap, then one more
        await wait_for(lambda: proxy.stats.open == 2, "the cap filled")
        reader, writer = await connect_raw(port)
        writer.write(client_hello(NAME))
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
        summaries.append(await log.next())

        head, text = await http_get(mport, "/metrics")
        assert head.startswith("HTTP/1.1 200 OK") and "text/plain; version=0.0.4" in head
        assert metric(text, "bufpool_proxy_connections_total") == 7
        assert metric(text, "bufpool_proxy_connections_open") == 2
        assert metric(text, 'bufpool_proxy_refusals_total{alert="unrecognized_name"}') == 1
        assert metric(text, 'bufpool_proxy_refusals_total{alert="http_400"}') == 1
        assert metric(text, 'bufpool_proxy_refusals_total{alert="internal_error"}') == 1
        assert metric(text, 'bufpool_proxy_closed_total{reason="over_capacity"}') == 1
        assert metric(text, 'bufpool_proxy_bytes_total{direction="up"}') == sum(
            s.bytes_up for s in summaries)
        assert metric(text, 'bufpool_proxy_bytes_total{direction="down"}') == sum(
            s.bytes_down for s in summaries)
        assert metric(text, "bufpool_proxy_pool_in_use_bytes") == in_use_bytes(proxy.pool) > 0
        assert "bufpool_pool_reserved_bytes " in text  # the pool's own stats follow
        head, _ = await http_get(mport, "/other")
        assert head.startswith("HTTP/1.1 404")
        for _, w in held:
            w.close()


@pytest.mark.asyncio
async def test_log_line_names_client_sni_upstream_bytes_duration_and_close_reason(
    certs: CertBundle, echo_routes: dict[str, tuple[str, int]],
) -> None:
    async with running_proxy(echo_routes) as (_proxy, port, log):
        payload = os.urandom(30_000)
        _, got, client = await asyncio.wait_for(tls_roundtrip(port, certs, NAME, payload), 30)
        assert got == payload
        summary, line = await log.next_line()
        upstream = f"127.0.0.1:{echo_routes[NAME][1]}"
        assert (summary.client, summary.server_name, summary.upstream) == (client, NAME, upstream)
        assert summary.bytes_up > len(payload) and summary.bytes_down > len(payload)
        assert summary.reason in ("eof", "client_closed", "upstream_closed")
        assert summary.alert is None and summary.detail is None and 0 < summary.duration < 60
        assert line == (
            f"client={client} sni={NAME} upstream={upstream} up={summary.bytes_up} "
            f"down={summary.bytes_down} duration={summary.duration:.3f}s "
            f"close={summary.reason} alert=-"
        )
