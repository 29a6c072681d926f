"""The body budget under abuse: holders, tricklers, non-reading clients, floods.

Each attack runs against a real server on 127.0.0.1 with ``setup()`` defaults unless the test
names a deadline it shortens; legitimate uploads must be served while it runs, the attackers
must be cut off with the status and message that name the limit, and nothing stays leased.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from typing import Any

import pytest
from _helpers_aiohttp import (
    Attackers,
    assert_drained,
    lease_for,
    make_app,
    raw_connect,
    read_response,
    served,
    upload,
    wait_for,
)
from _tls_helpers import make_certs
from aiohttp import web

import bufpool
import bufpool.aiohttp as bpa

MiB = 1 << 20


def _head(path: str, length: int | None, *, chunked: bool = False) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return f"POST {path} HTTP/1.1\r\nHost: t\r\n{framing}\r\n\r\n".encode()


async def _legit_upload(client: Any, size: int, seed: int) -> tuple[int, float, bool]:
    """POST ``size`` bytes to /upload; (status, seconds, digest exact)."""
    data = hashlib.sha256(seed.to_bytes(4, "big")).digest() * (size // 32 + 1)
    data = data[:size]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await asyncio.wait_for(client.post("/upload", data=data), 30)
    ok = False
    if resp.status == 200:
        got = await resp.json()
        ok = got["size"] == size and got["sha256"] == hashlib.sha256(data).hexdigest()
    else:
        await resp.read()
    return resp.status, loop.time() - t0, ok


def _fill_budget(budget: int, max_body: int) -> list[int]:
    """Declared lengths that together leave less than 16 KiB of the body budget free."""
    sizes = [max_body] * (budget // max_body)
    rest = (budget - sum(sizes)) // 65536 * 65536
    if rest:
        sizes.append(rest)
    return sizes


@pytest.mark.asyncio
async def test_declared_bodies_that_send_nothing_hold_no_budget_and_delay_nobody() -> None:
    """Header-only holders and 1 B / 100 ms tricklers connect first and declare three times
    the body budget of a default ``setup(app)``.  They wait for their evidence (16 KiB or
    the whole body) holding no reservation; legitimate 1 MiB and 16 KiB uploads that come
    after them are admitted ahead of them: all served while every attacker still waits,
    with no preemption needed (the old FIFO let them in and cut them in 1 s waves)."""
    app = web.Application()
    pool = bpa.setup(app)
    app.router.add_post("/upload", _upload)
    async with served(app) as client:
        budget = bpa.admission_stats(app).budget
        sizes = _fill_budget(budget, bpa.DEFAULT_MAX_BODY_SIZE) * 3
        attackers = Attackers(client.port)  # type: ignore[arg-type]
        try:
            for i, size in enumerate(sizes):
                await (attackers.hold(size) if i % 2 else attackers.trickle(size))
            assert await wait_for(
                lambda: bpa.admission_stats(app).waiting_for_evidence == len(sizes)
            )
            assert bpa.admission_stats(app).reserved_bytes == 0
            jobs = [_legit_upload(client, MiB, i) for i in range(20)]
            jobs += [_legit_upload(client, 16384, 100 + i) for i in range(10)]
            results = await asyncio.gather(*jobs)
            assert [r[0] for r in results] == [200] * 30 and all(r[2] for r in results)
            stats = bpa.admission_stats(app)
            # every attacker still waits, unadmitted: the uploads went past them
            assert stats.waiting_for_evidence == len(sizes), stats
            assert stats.admitted == 30 and stats.cut_preempted == 0, stats
            assert stats.reserved_bytes == 0 and stats.bodies == 0, stats
        finally:
            await attackers.close()
        # a head that hangs up while it waits leaves the queue (its stream sees the close)
        assert await wait_for(lambda: bpa.admission_stats(app).waiting == 0)
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_evidence_over_tls_is_seen_and_heads_still_hold_nothing(tmp_path: Any) -> None:
    """Over TLS a waiting body's bytes would sit in the TLS layer if its reading were paused,
    invisible to the evidence check: defaults, a TLS head that sends nothing holds no
    reservation, and a TLS client that sends its head, waits until the server has it waiting
    for evidence, then sends 64 KiB, is admitted and served (paused, it would wait 60 s)."""
    certs = make_certs(["localhost"], tmp_path)
    app = web.Application()
    pool = bpa.setup(app)
    app.router.add_post("/upload", _upload)
    runner = web.AppRunner(app)
    await runner.setup()
    conns: list[asyncio.StreamWriter] = []
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=certs.server_context("localhost"))
        await site.start()
        port = int(runner.addresses[0][1])

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            r, w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=certs.client_context(), server_hostname="localhost"
            )
            conns.append(w)
            return r, w

        _hr, holder = await connect()
        holder.write(_head("/upload", bpa.DEFAULT_MAX_BODY_SIZE))
        reader, writer = await connect()
        data = os.urandom(65536)
        writer.write(_head("/upload", len(data)))
        assert await wait_for(lambda: bpa.admission_stats(app).waiting_for_evidence == 2)
        assert bpa.admission_stats(app).reserved_bytes == 0
        writer.write(data)
        status, _h, body = await asyncio.wait_for(read_response(reader), 10)
        assert status == 200 and hashlib.sha256(data).hexdigest().encode() in body, body
        stats = bpa.admission_stats(app)
        assert stats.waiting_for_evidence == 1 and stats.admitted == 1, stats
    finally:
        for w in conns:
            w.close()
        await runner.cleanup()
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_holders_and_tricklers_cannot_starve_uploads_with_the_defaults() -> None:
    """Holders that send their 16 KiB of evidence and then nothing, and tricklers (1 B per
    100 ms after it), are admitted and hold the whole body budget of a default
    ``setup(app)`` (64 MiB pool, 8 MiB bodies, 60 s body_timeout).  Legitimate 1 MiB and
    16 KiB uploads arrive while they run: every one served, each within 10 s (the
    preemption path cuts the stalled bodies that hold the most; the 60 s deadline would be
    far too late), the attackers get 408 naming the pressure, nothing stays leased."""
    app = web.Application()
    pool = bpa.setup(app)
    app.router.add_post("/upload", _upload)
    async with served(app) as client:
        stats = bpa.admission_stats(app)
        assert stats.budget > 60 * MiB
        sizes = _fill_budget(stats.budget, bpa.DEFAULT_MAX_BODY_SIZE)
        attackers = Attackers(client.port)  # type: ignore[arg-type]
        first = bpa.EVIDENCE_BYTES
        for i, size in enumerate(sizes):
            await (attackers.hold(size, first) if i % 2 else attackers.trickle(size, first))
        assert await wait_for(lambda: bpa.admission_stats(app).bodies == len(sizes))
        assert bpa.admission_stats(app).budget - bpa.admission_stats(app).reserved_bytes < 16384
        # The attack has run for preempt_idle when the uploads come (loop time only moves
        # forward, so every attacker is then past that grace however busy the machine is).
        await asyncio.sleep(bpa.DEFAULT_PREEMPT_IDLE + 0.1)
        try:
            jobs = [_legit_upload(client, MiB, i) for i in range(20)]
            jobs += [_legit_upload(client, 16384, 100 + i) for i in range(10)]
            results = await asyncio.gather(*jobs)
            served_ok = [r for r in results if r[0] == 200 and r[2]]
            assert len(served_ok) >= 0.95 * len(results), results
            assert max(r[1] for r in results) <= 10.0, results
            answers = await attackers.statuses()
            holders = answers[1::2]  # they send nothing more, so their 408 always arrives
            assert [s for s, _ in holders] == [408] * len(holders), answers
            assert all("memory pressure" in text for _, text in holders), answers
            assert all(s in (408, 0) for s, _ in answers), answers
        finally:
            await attackers.close()
        after = bpa.admission_stats(app)
        assert after.cut_preempted >= len(sizes)
        assert after.bodies == 0 and after.reserved_bytes == 0
    await assert_drained(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("zero_copy", [False, True], ids=["read_body", "fast_path"])
async def test_evidence_then_silence_is_cut_as_soon_as_uploads_wait(zero_copy: bool) -> None:
    """The cheapest attacker once a head must show EVIDENCE_BYTES: raw sockets that declare
    8 MiB, send exactly 16 KiB, then nothing, enough of them to hold the whole body budget
    of a default ``setup(app)``.  Legitimate 1 MiB and 16 KiB uploads come right after they
    are admitted: every one is served with an exact digest, the stallers get 408 from the
    rule that cuts a body which did not move after its admission (the message says so and
    names preempt_after and body_min_rate), and nothing stays leased.

    The rule needs no preempt_idle of silence and no preempt_after of pressure first: a
    staller is cut preempt_after (0.5 s) after the check that first saw it reading, so the
    uploads wait about 0.5-0.75 s (1.0 s before; 0.1 s when the stallers were admitted long
    before).  The 10 s bound is only a safety net for a busy machine; the message is what
    tells the rules apart."""
    app = web.Application()
    pool = bpa.setup(app, zero_copy_receive=zero_copy)
    app.router.add_post("/upload", _upload)
    async with served(app) as client:
        budget = bpa.admission_stats(app).budget
        sizes = _fill_budget(budget, bpa.DEFAULT_MAX_BODY_SIZE)
        attackers = Attackers(client.port)  # type: ignore[arg-type]
        try:
            for size in sizes:
                await attackers.hold(size, bpa.EVIDENCE_BYTES)
            assert await wait_for(lambda: bpa.admission_stats(app).bodies == len(sizes))
            assert budget - bpa.admission_stats(app).reserved_bytes < 16384
            jobs = [_legit_upload(client, MiB, i) for i in range(10)]
            jobs += [_legit_upload(client, 16384, 100 + i) for i in range(5)]
            results = await asyncio.gather(*jobs)
            assert [r[0] for r in results] == [200] * 15 and all(r[2] for r in results), results
            assert max(r[1] for r in results) <= 10.0, results
            answers = await attackers.statuses()
        finally:
            await attackers.close()
        assert [s for s, _ in answers] == [408] * len(sizes), answers
        for _status, text in answers:
            assert "did not move after its admission" in text, text
            assert f"preempt_after={bpa.DEFAULT_PREEMPT_AFTER} s" in text, text
            assert "body_min_rate=500 bytes/s" in text, text
        stats = bpa.admission_stats(app)
        assert stats.cut_preempted == len(sizes), stats
        assert stats.admitted == len(sizes) + 15, stats
        assert stats.bodies == 0 and stats.reserved_bytes == 0, stats
    await assert_drained(pool)


async def _upload(request: web.Request) -> web.Response:
    body = await bpa.read_body(request)
    return web.json_response({"size": len(body), "sha256": body.sha256()})


@pytest.mark.asyncio
async def test_body_timeout_and_min_rate_answer_408_without_pressure() -> None:
    """No other traffic: a header-only holder meets body_timeout, a trickler meets
    body_min_rate after body_grace; each 408 names its limit and the connection closes."""
    pool = bufpool.BufferPool(max_bytes=8 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB, body_timeout=0.3, body_min_rate=2000,
                   body_grace=0.4, preempt_after=None)
    async with served(app) as client:
        attackers = Attackers(client.port)  # type: ignore[arg-type]
        await attackers.hold(MiB)
        await attackers.trickle(MiB)
        try:
            (s1, t1), (s2, t2) = await attackers.statuses()
            for reader, _ in attackers.conns:  # the server closes after the 408: EOF, or
                try:  # a reset when the trickler's next byte met the closed socket
                    assert await asyncio.wait_for(reader.read(), 10) == b""
                except ConnectionResetError:
                    pass
        finally:
            await attackers.close()
        assert s1 == 408 and "body_timeout=0.3 s" in t1, t1
        # the trickler's 408 can be lost to a reset (see statuses); the counters say why
        assert s2 == 0 or (
            s2 == 408 and "body_min_rate=2000 bytes/s" in t2 and "body_grace=0.4" in t2
        ), t2
        stats = bpa.admission_stats(app)
        assert (stats.cut_body_timeout, stats.cut_min_rate, stats.cut_preempted) == (1, 1, 0)
        ok = await client.post("/upload", data=b"y" * 1000)
        assert ok.status == 200
    await assert_drained(pool)


@pytest.mark.asyncio
@pytest.mark.parametrize("first", [1024, bpa.EVIDENCE_BYTES], ids=["waiting", "admitted"])
async def test_a_client_still_sending_when_cut_reads_the_whole_408(first: int) -> None:
    """aiohttp's own parser (``read_body``): a body cut below body_min_rate while its client
    keeps sending, either still waiting for its evidence (1 KiB sent) or admitted (16 KiB).
    The client goes on sending for a while after the cut and only then reads: it gets the
    whole 408 naming the limit, then the server's FIN.  A plain close would have met those
    bytes with a reset that loses the 408 (it did, on both loops, before the lingering
    close); the half-closed connection drops them instead."""
    pool = bufpool.BufferPool(max_bytes=8 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB, body_min_rate=1_000_000, body_grace=0.2,
                   preempt_after=None)
    async with served(app) as client:
        reader, writer = await raw_connect(client.port)  # type: ignore[arg-type]
        writer.write(_head("/upload", MiB) + b"x" * first)
        await writer.drain()
        assert await wait_for(lambda: bpa.admission_stats(app).cut_min_rate == 1)
        for _ in range(5):  # still uploading after the cut (the client's pace)
            writer.write(b"y" * 4096)
            await writer.drain()
            await asyncio.sleep(0.01)
        status, headers, body = await asyncio.wait_for(read_response(reader), 10)
        assert status == 408 and "body_min_rate=1e+06 bytes/s" in body.decode(), body
        assert headers.get("connection", "").lower() == "close", headers
        assert await asyncio.wait_for(reader.read(), 10) == b""  # FIN after the 408
        writer.close()
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_a_steady_slow_upload_is_never_cut_under_pressure() -> None:
    """Preemption cuts only bodies that stall or trickle below body_min_rate.  A 256 KiB
    upload sent 8 KiB every 50 ms (about 160 KB/s, 1.6 s in all) holds the whole budget while
    another upload waits for it, well past preempt_after: it is never cut, and the waiting
    upload is served after it."""
    budget = 256 * 1024
    pool = bufpool.BufferPool(max_bytes=budget, initial_slots=0, on_exhausted="raise")
    app = make_app(pool, max_body_size=budget)
    async with served(app) as client:
        data = os.urandom(budget)
        reader, writer = await raw_connect(client.port)  # type: ignore[arg-type]
        first = bpa.EVIDENCE_BYTES  # what admits it
        writer.write(_head("/upload", budget) + data[:first])
        await writer.drain()
        assert await wait_for(lambda: bpa.admission_stats(app).bodies == 1)
        waiting = asyncio.ensure_future(_legit_upload(client, budget, 1))
        assert await wait_for(lambda: bpa.admission_stats(app).waiting == 1)
        for i in range(first, budget, 8192):
            writer.write(data[i : i + 8192])
            await writer.drain()
            await asyncio.sleep(0.05)  # the client's pace
        status, _h, body = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        assert status == 200 and hashlib.sha256(data).hexdigest().encode() in body, body
        w_status, w_seconds, w_ok = await waiting
        assert w_status == 200 and w_ok
        assert w_seconds > bpa.DEFAULT_PREEMPT_AFTER  # it did wait under pressure
        assert bpa.admission_stats(app).cut_preempted == 0
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_non_reading_clients_give_pooled_reply_slots_back_under_pressure() -> None:
    """Six clients ask for a 1 MiB pooled reply each and never read it (the server's send
    buffer is pinned small, so the reply stays queued in the transport): 6 of the pool's
    8 MiB are pinned.  1 MiB uploads then wait for slots; with the defaults the stalled
    replies are aborted after the pressure threshold, their slots come back, the uploads
    are served, and stats showed the pinned bytes meanwhile."""
    pool = bufpool.BufferPool(max_bytes=8 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB)

    async def stuck(request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket")  # type: ignore[union-attr]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        owned = lease_for(request.app[bpa.POOL_KEY], MiB)
        return bpa.pooled_response(request, owned)

    app.router.add_get("/stuck", stuck)
    async with served(app) as client:
        readers = []
        for _ in range(6):
            reader, writer = await raw_connect(client.port, rcvbuf=4096)  # type: ignore[arg-type]
            writer.write(b"GET /stuck HTTP/1.1\r\nHost: t\r\n\r\n")
            readers.append((reader, writer))

        def held() -> bool:
            return bpa.admission_stats(app).reply_bytes_pinned >= 5 * MiB

        assert await wait_for(held)
        results = await asyncio.gather(*[_legit_upload(client, MiB, i) for i in range(6)])
        assert [r[0] for r in results] == [200] * 6 and all(r[2] for r in results), results
        assert max(r[1] for r in results) <= 10.0
        stats = bpa.admission_stats(app)
        assert stats.send_aborted_preempted >= 1
        for _reader, writer in readers:
            writer.close()
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_send_timeout_aborts_a_reply_nobody_reads() -> None:
    """No pressure at all: a pooled reply without write progress for send_timeout is aborted
    and its slots come back."""
    pool = bufpool.BufferPool(max_bytes=8 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB, send_timeout=0.3)

    async def stuck(request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket")  # type: ignore[union-attr]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return bpa.pooled_response(request, lease_for(request.app[bpa.POOL_KEY], 2 * MiB))

    app.router.add_get("/stuck", stuck)
    async with served(app) as client:
        _reader, writer = await raw_connect(client.port, rcvbuf=4096)  # type: ignore[arg-type]
        writer.write(b"GET /stuck HTTP/1.1\r\nHost: t\r\n\r\n")
        assert await wait_for(lambda: bpa.admission_stats(app).send_aborted_timeout == 1)
        assert bpa.admission_stats(app).reply_bytes_pinned == 0
        writer.close()
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_flood_of_bodies_several_times_the_budget_is_all_served() -> None:
    """32 x 1 MiB (Content-Length) and 8 x 256 KiB chunked bodies at once against a 4 MiB
    pool: they wait their turn (no 503, no deadlock), every digest is exact, admission never
    lets the bodies hold more than the budget."""
    pool = bufpool.BufferPool(max_bytes=4 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB)
    peak = [0]

    async def chunked_upload(client: Any, size: int, seed: int) -> tuple[int, float, bool]:
        data = os.urandom(size)

        async def gen() -> Any:
            for i in range(0, size, 32768):
                yield data[i : i + 32768]

        resp = await asyncio.wait_for(client.post("/upload", data=gen()), 30)
        got = await resp.json()
        return resp.status, 0.0, got["sha256"] == hashlib.sha256(data).hexdigest()

    async with served(app) as client:
        async def watch() -> None:
            while True:
                peak[0] = max(peak[0], bpa.admission_stats(app).reserved_bytes)
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        jobs = [_legit_upload(client, MiB, i) for i in range(32)]
        jobs += [chunked_upload(client, 256 * 1024, i) for i in range(8)]
        results = await asyncio.gather(*jobs)
        watcher.cancel()
        assert [r[0] for r in results] == [200] * 40, results
        assert all(r[2] for r in results)
        stats = bpa.admission_stats(app)
        assert stats.admitted == 40 and stats.admission_timeouts == 0
        assert 0 < peak[0] <= stats.budget
        assert pool.stats().reserved_bytes <= pool.max_bytes
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_chunked_body_over_the_limit_gets_413_even_when_the_budget_is_that_size() -> None:
    """The budget holds exactly max_body_size: a chunked body crossing it gets 413 (it got
    503 when the pool ran dry first), its slots come back at once."""
    pool = bufpool.BufferPool(max_bytes=MiB, initial_slots=0, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB)

    async def gen() -> Any:
        for _ in range(48):
            yield b"z" * 65536

    async with served(app) as client:
        resp = await client.post("/upload", data=gen())
        assert resp.status == 413
        assert f"exceeds max_body_size={MiB} bytes" in await resp.text()
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_idle_memory_is_given_back() -> None:
    """After a burst the pool keeps its high-water slots; once quiet for idle_trim_after the
    integration trims them back to the initial preallocation on its own."""
    pool = bufpool.BufferPool(max_bytes=16 * MiB, on_exhausted="raise")
    initial = pool.stats().reserved_bytes
    app = make_app(pool, max_body_size=MiB, idle_trim_after=0.2)
    async with served(app) as client:
        results = await asyncio.gather(*[_legit_upload(client, MiB, i) for i in range(8)])
        assert [r[0] for r in results] == [200] * 8
        assert await wait_for(lambda: bpa.admission_stats(app).idle_trims >= 1)
        assert pool.stats().reserved_bytes == initial
        assert bpa.admission_stats(app).idle_trimmed_bytes > 0
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_waiting_requests_do_not_buffer_their_bodies_in_aiohttp() -> None:
    """A body waiting for admission has its connection's reading paused: what aiohttp holds
    for it stays near one read (not the whole upload)."""
    pool = bufpool.BufferPool(max_bytes=MiB, initial_slots=0, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB)
    gate = asyncio.Event()
    seen: list[int] = []

    async def hold(request: web.Request) -> web.Response:
        body = await bpa.read_body(request)
        await gate.wait()
        return web.Response(text=str(len(body)))

    async def measure(request: web.Request) -> web.Response:
        seen.append(0)
        body = await bpa.read_body(request)
        return web.Response(text=str(len(body)))

    app.router.add_post("/hold", hold)
    app.router.add_post("/measure", measure)
    async with served(app) as client:
        first = asyncio.ensure_future(client.post("/hold", data=b"a" * MiB))
        assert await wait_for(lambda: bpa.admission_stats(app).reserved_bytes == MiB)
        assert await wait_for(lambda: pool.stats().in_use == 16)
        reader, writer = await raw_connect(client.port)  # type: ignore[arg-type]
        writer.write(_head("/measure", MiB))
        assert await wait_for(lambda: bpa.admission_stats(app).waiting == 1)
        # The client pushes its whole body; the server reads at most a little of it.
        payload = b"b" * MiB
        writer.write(payload)
        await writer.drain()  # the kernel took it (loopback buffers are large)
        # A round trip on another connection: the server's loop has run since, and would
        # have read the waiting socket had its reading not been paused.
        assert (await client.post("/upload", data=b"")).status == 200
        buffered = _aiohttp_buffered(client)
        # aiohttp alone would hold up to twice read_bufsize (128 KiB) before pausing.
        assert buffered < 65536, buffered
        gate.set()
        assert (await first).status == 200
        status, _h, body = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        assert status == 200 and body == str(MiB).encode()
    await assert_drained(pool)


def _aiohttp_buffered(client: Any) -> int:
    """Bytes aiohttp's request streams hold on the server's connections right now."""
    total = 0
    for proto in client.server.runner.server.connections:
        for _msg, payload in getattr(proto, "_messages", ()):
            total += getattr(payload, "_size", 0)
        req = getattr(proto, "_current_request", None)
        if req is not None:
            total += getattr(req.content, "_size", 0)
    return total


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.mark.asyncio
async def test_bodies_of_unknown_length_never_deadlock_on_growth() -> None:
    """Two chunked bodies of three 64 KiB slots each, a body budget of four: driven in
    lockstep, each grows to two slots (budget spent), A waits to grow, and B's growth could
    only come from A, which waits itself: B gets 503 naming it at once instead of both
    waiting forever; A then finishes with 200."""
    slot = 65536
    pool = bufpool.BufferPool(max_bytes=4 * slot, initial_slots=0, on_exhausted="raise")
    app = make_app(pool, max_body_size=4 * slot)
    async with served(app) as client:
        a = await raw_connect(client.port)  # type: ignore[arg-type]
        b = await raw_connect(client.port)  # type: ignore[arg-type]
        for _r, w in (a, b):
            w.write(_head("/upload", None, chunked=True))
        # heads alone reserve nothing: they wait for their evidence (a first 64 KiB chunk)
        assert await wait_for(lambda: bpa.admission_stats(app).waiting_for_evidence == 2)
        assert bpa.admission_stats(app).reserved_bytes == 0
        piece = b"p" * slot
        for _r, w in (a, b):
            w.write(_chunk(piece))
        assert await wait_for(lambda: bpa.admission_stats(app).reserved_bytes == 2 * slot)
        for expected in (3, 4):
            w = (a, b)[expected - 3][1]
            w.write(_chunk(piece))
            assert await wait_for(
                lambda e=expected: bpa.admission_stats(app).reserved_bytes == e * slot  # type: ignore[misc]
            )
        a[1].write(_chunk(piece))
        assert await wait_for(lambda: bpa.admission_stats(app).waiting == 1)
        b[1].write(_chunk(piece))
        status, _h, text = await asyncio.wait_for(read_response(b[0]), 10)
        assert status == 503 and b"unknown length" in text, text
        a[1].write(b"0\r\n\r\n")
        status, _h, body = await asyncio.wait_for(read_response(a[0]), 10)
        assert status == 200, body
        assert bpa.admission_stats(app).growth_refused == 1
        for _r, w in (a, b):
            w.close()
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_lifetimes_follow_the_handler_task_without_a_middleware() -> None:
    """Default setup: no middleware; memory is released when the handler task ends (after
    the response was written); a helper first called from a spawned task says how to fix
    it; routes that never touch the pool carry nothing."""
    pool = bufpool.BufferPool(max_bytes=8 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB)
    assert not app.middlewares
    in_use_after: list[int] = []

    async def spawned(request: web.Request) -> web.Response:
        try:
            await asyncio.ensure_future(bpa.read_body(request))
        except bpa.NotSetUp as exc:
            return web.Response(status=500, text=str(exc))
        return web.Response(text="no error")

    async def plain(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=str(OWNED in request))

    async def check(request: web.Request) -> web.Response:
        in_use_after.append(pool.stats().in_use)
        return web.Response(text="ok")

    from bufpool.aiohttp._lifetime import OWNED_KEY as OWNED

    app.router.add_post("/spawned", spawned)
    app.router.add_post("/plain", plain)
    app.router.add_get("/check", check)
    async with served(app) as client:
        resp = await client.post("/echo", data=b"e" * 300_000)
        assert resp.status == 200 and await resp.read() == b"e" * 300_000
        assert (await client.get("/check")).status == 200
        assert in_use_after == [0]  # the echo's five slots came back when its task ended
        resp = await client.post("/spawned", data=b"s" * 1000)
        assert resp.status == 500 and "middleware" in await resp.text()
        resp = await client.post("/plain", data=b"x")
        assert await resp.text() == "False"
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_the_middleware_form_composes_by_hand() -> None:
    """``bpa.middleware()`` placed by hand: helpers work from tasks the handler spawns."""
    pool = bufpool.BufferPool(max_bytes=8 * MiB, on_exhausted="raise")
    app = web.Application(middlewares=[bpa.middleware()])
    bpa.setup(app, pool=pool, max_body_size=MiB)
    assert len(app.middlewares) == 1

    async def spawned(request: web.Request) -> web.StreamResponse:
        body = await asyncio.ensure_future(bpa.read_body(request))
        return bpa.pooled_response(request, body)

    app.router.add_post("/spawned", spawned)
    async with served(app) as client:
        resp = await client.post("/spawned", data=b"m" * 200_000)
        assert resp.status == 200 and await resp.read() == b"m" * 200_000
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_admission_is_fifo_and_a_leaving_waiter_lets_the_next_in() -> None:
    """Budget four 64 KiB slots, a holder keeps two.  A (three slots, its body sent) waits;
    B (one slot) would fit but queues behind A: among bodies whose bytes are here, first
    come, first served, so A is never starved by smaller bodies.  A's wait runs out (503):
    B is admitted at once, before its own timeout
    and while the holder still holds."""
    slot = 65536
    pool = bufpool.BufferPool(max_bytes=4 * slot, initial_slots=0, on_exhausted="raise")
    app = make_app(pool, max_body_size=4 * slot, acquire_timeout=0.5)
    gate = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        body = await bpa.read_body(request)
        await gate.wait()
        return web.Response(text=str(len(body)))

    app.router.add_post("/hold", hold)
    async with served(app) as client:
        first = asyncio.ensure_future(client.post("/hold", data=b"h" * 2 * slot))
        assert await wait_for(lambda: bpa.admission_stats(app).reserved_bytes == 2 * slot)
        a = await raw_connect(client.port)  # type: ignore[arg-type]
        a[1].write(_head("/upload", 3 * slot) + b"a" * 3 * slot)
        assert await wait_for(
            lambda: (bpa.admission_stats(app).waiting,
                     bpa.admission_stats(app).waiting_for_evidence) == (1, 0)
        )
        b = await raw_connect(client.port)  # type: ignore[arg-type]
        b[1].write(_head("/upload", 1000) + b"b" * 1000)
        assert await wait_for(lambda: bpa.admission_stats(app).waiting == 2)
        status, _h, text = await asyncio.wait_for(read_response(a[0]), 10)
        assert status == 503 and b"acquire_timeout=0.5" in text, text
        status, _h, body = await asyncio.wait_for(read_response(b[0]), 10)
        assert status == 200 and b'"size": 1000' in body, body
        assert not first.done()  # the holder still holds its two slots
        stats = bpa.admission_stats(app)
        assert stats.admission_timeouts == 1 and stats.admitted == 2
        gate.set()
        assert (await first).status == 200
        for _r, w in (a, b):
            w.close()
    await assert_drained(pool)


@pytest.mark.parametrize(
    ("zero_copy", "size", "pipelined", "conns", "budget"),
    [
        (False, 256 * 1024, 2, 4, MiB),
        (True, 256 * 1024, 2, 4, MiB),
        # A connection holds at most BODIES_AHEAD (2) bodies: 16 KiB bodies take more
        # connections to fill even a smaller budget.
        (True, 16 * 1024, 3, 8, 256 * 1024),
    ],
    # (on aiohttp's parser a connection's queued requests hold no pool memory: only the
    # zero-copy path takes whole bodies as they arrive, up to BODIES_AHEAD per connection)
    ids=["aiohttp-parser", "zero-copy", "zero-copy-whole"],
)
@pytest.mark.asyncio
async def test_clients_that_never_read_replies_cannot_keep_body_memory(
    zero_copy: bool, size: int, pipelined: int, conns: int, budget: int
) -> None:
    """A request keeps its body's memory until it ends, and it ends only once its reply is
    written.  Clients that upload bodies and never read the replies (here plain
    ``web.Response`` replies, which no pooled-reply watch covers) would keep the body budget
    for ever; their connections are aborted once their replies stop moving (send_timeout,
    sooner under memory pressure), and a legitimate upload is served.  ``whole``: 16 KiB
    bodies that each come whole with their head, which the zero-copy path admits into one
    hold per connection (``Admission.hold_whole``): the hold is watched the same way."""
    pool = bufpool.BufferPool(max_bytes=4 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=256 * 1024, body_budget=budget, preempt_after=0.2,
                   preempt_idle=0.3, acquire_timeout=10, zero_copy_receive=zero_copy)
    reply = b"r" * (4 * MiB)  # more than the kernel's send buffer takes: the write stalls
    full = budget - 65536  # reserved once the holders have the budget (but a slot)

    async def hold(request: web.Request) -> web.Response:
        await bpa.read_body(request)
        return web.Response(body=reply)

    app.router.add_post("/hold", hold)
    body = b"b" * size
    async with served(app) as client:
        port = client.port
        assert port is not None
        holders = [await raw_connect(port, rcvbuf=4096) for _ in range(conns)]
        try:
            request = _head("/hold", len(body)) + body
            if size > 16 * 1024:
                for _reader, writer in holders:  # pipelined, replies never read
                    writer.write(request * pipelined)
            else:  # one at a time, each taken before the next: whole with its head
                for i in range(pipelined):
                    for _reader, writer in holders:
                        writer.write(request)
                    held = min((i + 1) * conns * size, full)
                    assert await wait_for(
                        lambda held=held: bpa.admission_stats(app).reserved_bytes >= held  # type: ignore[misc]
                    )
            assert await wait_for(lambda: bpa.admission_stats(app).reserved_bytes >= full)
            status, _secs, exact = await _legit_upload(client, min(200_000, budget // 2), 1)
            assert (status, exact) == (200, True)
            stats = bpa.admission_stats(app)
            assert stats.send_aborted_preempted + stats.send_aborted_timeout >= 1, stats
        finally:
            for _reader, writer in holders:
                writer.close()
        assert await wait_for(lambda: bpa.admission_stats(app).reserved_bytes == 0)
    await assert_drained(pool)


@pytest.mark.parametrize("middleware", [False, True], ids=["unread", "middleware-read-body"])
@pytest.mark.asyncio
async def test_uploads_pipelined_behind_a_slow_handler_hold_two_bodies_per_connection(
    middleware: bool,
) -> None:
    """A client pipelines uploads behind a handler that takes its time (and never reads the
    bodies): each body came whole with its head, and aiohttp queues up to 32 requests per
    connection, so three such connections held the whole 1 MiB budget and a legitimate
    upload got 503 (found by an attacker review; on aiohttp's parser nothing is reserved).
    The fast path now reads a connection's next head only while it holds fewer than
    BODIES_AHEAD (2) bodies, as nginx and Go read the next request only after the current
    one: the legitimate upload is served, and every pipelined request is still answered,
    in order, once the handler goes on.  ``middleware-read-body``: handlers that take their
    body through the middleware's owner (which keeps its memory until the request ends):
    such a body counted as gone once taken, and a connection held three."""
    from bufpool.aiohttp._fastpath import BODIES_AHEAD

    pool = bufpool.BufferPool(max_bytes=4 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=256 * 1024, body_budget=MiB, acquire_timeout=5,
                   zero_copy_receive=True, middleware=middleware)
    gate = asyncio.Event()
    started = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal started
        started += 1
        if middleware:
            await bpa.read_body(request)
        await gate.wait()
        return web.Response(text="slow")

    app.router.add_post("/slow", slow)
    body = b"s" * (16 * 1024)
    pipelined = 24
    async with served(app) as client:
        port = client.port
        assert port is not None
        conns = [await raw_connect(port) for _ in range(3)]
        try:
            for _reader, writer in conns:
                writer.write((_head("/slow", len(body)) + body) * pipelined)
            assert await wait_for(lambda: started == len(conns))
            assert await wait_for(
                lambda: bpa.admission_stats(app).reserved_bytes
                == len(conns) * BODIES_AHEAD * 18437  # a 16 KiB slot's bytes
            ), bpa.admission_stats(app)
            status, _secs, exact = await _legit_upload(client, 200_000, 7)
            assert (status, exact) == (200, True)
            gate.set()
            for reader, _writer in conns:
                for _ in range(pipelined):
                    status, _h, text = await asyncio.wait_for(read_response(reader), 10)
                    assert (status, text) == (200, b"slow")
            assert started == len(conns) * pipelined
        finally:
            for _reader, writer in conns:
                writer.close()
        assert await wait_for(lambda: bpa.admission_stats(app).reserved_bytes == 0)
    await assert_drained(pool)


@pytest.mark.asyncio
async def test_pipelined_uploads_behind_a_slow_handler_cannot_fill_the_default_budget() -> None:
    """``setup(app, zero_copy_receive=True)`` defaults: three clients pipeline 1 MiB uploads
    behind a handler that takes its time, enough of them to declare more than the whole
    body budget.  Each connection holds BODIES_AHEAD (2) bodies, the rest of its stream
    waits unread, and a legitimate 8 MiB upload (the default max_body_size) is served at
    once; once the handler goes on, every pipelined request is answered."""
    from bufpool.aiohttp._fastpath import BODIES_AHEAD

    app = web.Application()
    pool = bpa.setup(app, zero_copy_receive=True)
    app.router.add_post("/upload", upload)
    gate = asyncio.Event()
    started = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal started
        started += 1
        await gate.wait()
        return web.Response(text="slow")

    app.router.add_post("/slow", slow)
    body = b"p" * MiB
    async with served(app) as client:
        port = client.port
        assert port is not None
        budget = bpa.admission_stats(app).budget
        conns = [await raw_connect(port) for _ in range(3)]
        pipelined = budget // (len(conns) * len(body)) + 2  # together: over the budget
        try:
            for _reader, writer in conns:
                writer.write((_head("/slow", len(body)) + body) * pipelined)
            held = len(conns) * BODIES_AHEAD
            assert await wait_for(
                lambda: started == len(conns) and bpa.admission_stats(app).bodies == held
            ), bpa.admission_stats(app)
            assert bpa.admission_stats(app).reserved_bytes <= held * 2 * MiB
            status, _secs, exact = await _legit_upload(client, bpa.DEFAULT_MAX_BODY_SIZE, 3)
            assert (status, exact) == (200, True)
            assert bpa.admission_stats(app).admission_timeouts == 0
            gate.set()
            for reader, _writer in conns:
                for _ in range(pipelined):
                    status, _h, text = await asyncio.wait_for(read_response(reader), 20)
                    assert (status, text) == (200, b"slow")
        finally:
            gate.set()
            for _reader, writer in conns:
                writer.close()
        assert await wait_for(lambda: bpa.admission_stats(app).reserved_bytes == 0)
    await assert_drained(pool)
