"""The zero-copy receive path follows the body admission (``_admission``) of ``read_body``.

Real servers on 127.0.0.1, both loops (conftest).  Every body here goes the fast path (checked
with ``app[RECEIVE_KEY]``); after each test no lease is in use and no reservation is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import bufpool
import bufpool.aiohttp as bpa
from tests._helpers_aiohttp import (
    Attackers,
    assert_drained,
    make_app,
    raw_connect,
    read_response,
    served_runner,
    wait_for,
)

pytestmark = pytest.mark.asyncio

MiB = 1 << 20


def _data(size: int, seed: int) -> bytes:
    return (hashlib.sha256(seed.to_bytes(4, "big")).digest() * (size // 32 + 1))[:size]


def _head(length: int, path: str = "/upload") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n".encode()


async def _no_reservation_left(app: web.Application) -> None:
    assert await wait_for(lambda: bpa.admission_stats(app).reserved_bytes == 0)
    stats = bpa.admission_stats(app)
    assert (stats.reserved_bytes, stats.bodies, stats.waiting) == (0, 0, 0), stats


def _add_slow_route(app: web.Application, gate: asyncio.Event, pause: float = 0.0) -> None:
    """``POST /slow``: reads its body, then waits for ``gate`` (and ``pause`` seconds) before
    answering its size: pipelined requests to it fill aiohttp's queue."""

    async def slow(request: web.Request) -> web.Response:
        body = await bpa.read_body(request)
        await gate.wait()
        if pause:
            await asyncio.sleep(pause)
        return web.Response(text=str(len(body)))

    app.router.add_post("/slow", slow)


#: 32 pipelined requests to /slow with empty bodies: aiohttp's queue of waiting requests full.
#: (Requests with bodies cannot fill it: the fast path reads no head while a connection holds
#: BODIES_AHEAD bodies.)
_QUEUE_FULL = _head(0, "/slow") * 32


async def _queue_full_then(writer: asyncio.StreamWriter, body: bytes, sent: int) -> None:
    """``_QUEUE_FULL``, then the head of an upload of ``body`` and its first ``sent``
    bytes."""
    writer.write(_QUEUE_FULL + _head(len(body)) + body[:sent])
    await writer.drain()

async def _post_all(port: int, bodies: list[bytes]) -> list[tuple[int, Any]]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0)  # keep-alive (Connection: close bodies
    ) as session:  # take aiohttp's parser)

        async def one(body: bytes) -> tuple[int, Any]:
            async with session.post(f"http://127.0.0.1:{port}/upload", data=body) as resp:
                got = await resp.json() if resp.status == 200 else await resp.text()
                return resp.status, got

        return await asyncio.gather(*(one(b) for b in bodies))


async def test_flood_of_bodies_several_times_the_budget_is_served() -> None:
    """32 x 1 MiB uploads at once against a 4 MiB pool (defaults otherwise): every body is
    admitted whole in FIFO order before it leases, so admitted bodies always finish; all are
    served byte-exact, no 503, no deadlock.  (Leasing slot by slot without admission fills
    the pool with partial bodies that each wait for their next slot: nobody finishes.)"""
    pool = bufpool.BufferPool(max_bytes=4 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB, zero_copy_receive=True)
    bodies = [_data(MiB, i) for i in range(32)]
    async with served_runner(app) as port:
        results = await asyncio.wait_for(_post_all(port, bodies), 30)
        assert [s for s, _ in results] == [200] * len(bodies), results
        for (_, got), body in zip(results, bodies, strict=True):
            assert got["size"] == len(body)
            assert got["sha256"] == hashlib.sha256(body).hexdigest()
        stats = bpa.admission_stats(app)
        assert stats.admission_timeouts == 0 and stats.admitted >= len(bodies)
        assert stats.cut_body_timeout + stats.cut_min_rate + stats.cut_preempted == 0
        assert app[bpa.RECEIVE_KEY].fast >= len(bodies)
        await _no_reservation_left(app)
    await assert_drained(pool)


async def test_pipelined_bodies_on_one_connection_reserve_in_turn() -> None:
    """Six 512 KiB bodies pipelined in one write on one connection against a 1 MiB budget:
    each is admitted in turn as the one before it is released; all served in order."""
    pool = bufpool.BufferPool(max_bytes=MiB + 256 * 1024, on_exhausted="raise")
    app = make_app(pool, max_body_size=512 * 1024, body_budget=MiB, zero_copy_receive=True)
    bodies = [_data(512 * 1024, 50 + i) for i in range(6)]
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        writer.write(b"".join(_head(len(b)) + b for b in bodies))
        await writer.drain()
        for body in bodies:
            status, _headers, text = await asyncio.wait_for(read_response(reader), 20)
            assert status == 200, text
            assert b'"sha256": "%s"' % hashlib.sha256(body).hexdigest().encode() in text
        writer.close()
        assert app[bpa.RECEIVE_KEY].fast == len(bodies)
        await _no_reservation_left(app)
    await assert_drained(pool)


async def test_holders_and_tricklers_hold_nothing_while_uploads_are_served_with_the_defaults(
) -> None:
    """``setup(app, zero_copy_receive=True)`` defaults (64 MiB pool, 8 MiB bodies): header-only
    holders and 1 B / 100 ms tricklers declare more than the whole body budget on the fast
    path first.  They never show the admission's evidence (``EVIDENCE_BYTES`` of body), so
    they reserve nothing and queue ahead of nobody: legit 1 MiB and 16 KiB uploads that
    arrive after them are all served within 10 s, none of them cut or refused."""
    app = web.Application()
    pool = bpa.setup(app, zero_copy_receive=True)

    async def upload(request: web.Request) -> web.Response:
        body = await bpa.read_body(request)
        return web.json_response({"size": len(body), "sha256": body.sha256()})

    app.router.add_post("/upload", upload)
    async with served_runner(app) as port:
        budget = bpa.admission_stats(app).budget
        sizes = [bpa.DEFAULT_MAX_BODY_SIZE] * (budget // bpa.DEFAULT_MAX_BODY_SIZE + 4)
        attackers = Attackers(port)
        for i, size in enumerate(sizes):
            await (attackers.hold(size) if i % 2 else attackers.trickle(size))
        assert await wait_for(
            lambda: bpa.admission_stats(app).waiting_for_evidence == len(sizes)
        )
        assert bpa.admission_stats(app).reserved_bytes == 0
        try:
            bodies = [_data(MiB, i) for i in range(16)] + [_data(16384, i) for i in range(8)]
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            results = await asyncio.wait_for(_post_all(port, bodies), 20)
            assert loop.time() - t0 <= 10.0
            assert [s for s, _ in results] == [200] * len(bodies), results
            for (_, got), body in zip(results, bodies, strict=True):
                assert got["sha256"] == hashlib.sha256(body).hexdigest()
            stats = bpa.admission_stats(app)
            assert stats.waiting_for_evidence == len(sizes)  # still there, holding nothing
            assert (stats.cut_preempted, stats.admission_timeouts) == (0, 0)
        finally:
            await attackers.close()
        # Hung-up heads leave the wait for evidence (the poll sees the hang-up).
        assert await wait_for(lambda: bpa.admission_stats(app).waiting == 0)
        await _no_reservation_left(app)
    await assert_drained(pool)


async def test_body_timeout_and_min_rate_cut_fast_path_bodies_without_pressure() -> None:
    """No memory pressure: a header-only holder meets ``body_timeout``, a trickler meets
    ``body_min_rate`` after ``body_grace`` (setup()'s deadlines, shortened here); each 408
    names its limit, the connection closes; a legitimate upload meanwhile is 200."""
    pool = bufpool.BufferPool(max_bytes=8 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB, body_timeout=0.3, body_min_rate=2000,
                   body_grace=0.4, preempt_after=None, zero_copy_receive=True)
    async with served_runner(app) as port:
        attackers = Attackers(port)
        await attackers.hold(MiB)
        await attackers.trickle(MiB)
        try:
            (status,) = [s for s, _ in await _post_all(port, [_data(500_000, 7)])]
            assert status == 200
            (s1, t1), (s2, t2) = await attackers.statuses()
            with contextlib.suppress(ConnectionResetError):  # the server closed: EOF
                assert await asyncio.wait_for(attackers.conns[0][0].read(), 10) == b""
        finally:
            await attackers.close()
        assert s1 == 408 and "body_timeout=0.3 s" in t1, t1
        assert s2 == 0 or (s2 == 408 and "body_min_rate=2000 bytes/s" in t2), t2
        stats = bpa.admission_stats(app)
        assert (stats.cut_body_timeout, stats.cut_min_rate, stats.cut_preempted) == (1, 1, 0)
        assert app[bpa.RECEIVE_KEY].timeouts == 2
        await _no_reservation_left(app)
    await assert_drained(pool)


async def test_admission_wait_that_cannot_end_in_time_gets_503() -> None:
    """A body holds the whole budget (admitted, still sending nothing) and preemption is
    later than ``acquire_timeout``: the next body's admission wait runs out, 503 +
    Retry-After naming acquire_timeout; its connection closes, nothing stays reserved."""
    pool = bufpool.BufferPool(max_bytes=4 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=2 * MiB, body_budget=2 * MiB, acquire_timeout=0.2,
                   zero_copy_receive=True)
    async with served_runner(app) as port:
        attackers = Attackers(port)
        await attackers.hold(2 * MiB, first=bpa.EVIDENCE_BYTES)
        try:
            assert await wait_for(lambda: bpa.admission_stats(app).bodies == 1)
            reader, writer = await raw_connect(port)
            writer.write(_head(MiB) + b"w" * (bpa.EVIDENCE_BYTES + 1000))
            status, headers, text = await asyncio.wait_for(read_response(reader), 10)
            assert status == 503 and headers.get("retry-after") == "1"
            assert b"acquire_timeout=0.2" in text
            writer.close()
        finally:
            await attackers.close()
        assert bpa.admission_stats(app).admission_timeouts == 1
        await _no_reservation_left(app)
    await assert_drained(pool)


async def test_a_body_held_by_aiohttps_pipelining_queue_is_not_charged_for_it() -> None:
    """aiohttp stops reading a connection once 32 pipelined requests wait in its queue.  The
    body that was arriving then must not meet ``body_timeout`` for that pause (the server's
    doing, not the client's): 33 pipelined requests behind a slow first handler (32 with
    empty bodies), the last body half sent; after the handlers run it is sent in full and
    every request gets 200."""
    gate = asyncio.Event()
    pool = bufpool.BufferPool(max_bytes=8 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB, body_timeout=0.3, body_min_rate=None,
                   preempt_after=None, zero_copy_receive=True)

    _add_slow_route(app, gate)
    last = _data(200_000, 9)
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            await _queue_full_then(writer, last, 40_000)
            # The queue filled and the last body is admitted (held): wait for that, then
            # for several body_timeouts of the pause.
            assert await wait_for(lambda: bpa.admission_stats(app).bodies >= 1)
            await asyncio.sleep(1.2)  # 4 x body_timeout: a charged body would be cut
            assert bpa.admission_stats(app).cut_body_timeout == 0
            gate.set()
            writer.write(last[40_000:])
            await writer.drain()
            for _ in range(32):
                status, _h, text = await asyncio.wait_for(read_response(reader), 20)
                assert (status, text) == (200, b"0")
            status, _h, text = await asyncio.wait_for(read_response(reader), 20)
            assert status == 200, text
            assert b'"sha256": "%s"' % hashlib.sha256(last).hexdigest().encode() in text
        finally:
            gate.set()  # (the slow handlers end however the test went)
            writer.close()
        assert bpa.admission_stats(app).cut_body_timeout == 0
        await _no_reservation_left(app)
    await assert_drained(pool)


async def test_a_held_body_is_still_preempted_when_its_memory_is_needed() -> None:
    """The hold is no shelter from memory pressure: a client that keeps aiohttp's queue full
    (here: handlers that do not finish) holds a body's reservation only until another body
    needs the budget; then the held body is preempted (408) and the upload is served."""
    gate = asyncio.Event()
    pool = bufpool.BufferPool(max_bytes=4 * MiB, on_exhausted="raise")
    app = make_app(pool, max_body_size=MiB, body_budget=MiB, body_timeout=60,
                   preempt_after=0.2, preempt_idle=0.3, zero_copy_receive=True)

    _add_slow_route(app, gate)
    held = _data(700_000, 11)
    async with served_runner(app) as port:
        _reader, writer = await raw_connect(port)
        try:
            await _queue_full_then(writer, held, 40_000)
            assert await wait_for(lambda: bpa.admission_stats(app).reserved_bytes >= 700_000)
            # 700 KB held + 500 KB > the 1 MiB budget: the upload waits, then preempts.
            (status, got), = await _post_all(port, [_data(500_000, 12)])
            assert status == 200, got
            stats = bpa.admission_stats(app)
            assert stats.cut_preempted == 1 and stats.cut_body_timeout == 0, stats
        finally:
            gate.set()
            writer.close()
        await _no_reservation_left(app)
    await assert_drained(pool)


@pytest.mark.parametrize("policy", ["heap", "raise"])
async def test_a_body_that_completes_while_held_is_never_cut(policy: str) -> None:
    """32 pipelined requests (empty bodies) fill aiohttp's queue, then a 33rd arrives whole
    in the same write.  Its body is whole: no deadline may cut it once the queue drains (on a "heap"
    pool it takes the general path, on a "raise" pool the whole-body one)."""
    pool = bufpool.BufferPool(max_bytes=8 * MiB, on_exhausted=policy)
    app = make_app(pool, max_body_size=MiB, body_timeout=0.3, body_min_rate=None,
                   preempt_after=None, zero_copy_receive=True)
    gate = asyncio.Event()

    _add_slow_route(app, gate, 0.05)  # the queue drains over ~1.6 s: over body_timeout
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            writer.write(_QUEUE_FULL + _head(10) + b"ABCDEFGHIJ")
            await writer.drain()
            assert await wait_for(lambda: app[bpa.RECEIVE_KEY].fast >= 33)
            await asyncio.sleep(1.0)  # several body_timeouts while the queue is full
            gate.set()
            for _ in range(32):
                status, _h, text = await asyncio.wait_for(read_response(reader), 20)
                assert (status, text) == (200, b"0")
            status, _h, text = await asyncio.wait_for(read_response(reader), 20)
            assert status == 200, text
        finally:
            gate.set()
            writer.close()
        assert bpa.admission_stats(app).cut_body_timeout == 0
        await _no_reservation_left(app)
    await assert_drained(pool)


async def test_a_pipelined_body_short_of_evidence_in_a_paused_socket_is_served() -> None:
    """Pipelined bodies of 16-64 KiB behind padded heads, sent as a few tiny writes and then
    all at once (found by fuzzing): a later body waited for its 16 KiB of evidence while its
    connection's reading was paused and the kernel queue had stopped at about 13 KB, so the
    evidence never came and the upload hung until the min-rate cut.  Bodies short of their
    evidence are now read on into their overflow: every body is served, bytes exact."""
    sizes = [16383, 30000, 16385, 30000, 16383, 16385, 16384, 65536, 20000]
    pads = [882, 1646, -1, -1, -1, -1, 422, 637, 405]

    def head(n: int, pad: int) -> bytes:
        extra = "" if pad < 0 else "X-Pad: " + "a" * pad + "\r\n"
        return f"POST /upload HTTP/1.1\r\nHost: t\r\n{extra}Content-Length: {n}\r\n\r\n".encode()

    pool = bufpool.BufferPool(max_bytes=16 * MiB)
    app = make_app(pool, max_body_size=MiB, zero_copy_receive=True)
    bodies = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    stream = b"".join(head(len(b), p) + b for b, p in zip(bodies, pads, strict=True))
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            i = 0
            for k in (100, 7, 1):
                writer.write(stream[i : i + k])
                i += k
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(stream[i:])
            await writer.drain()
            for body in bodies:
                status, _h, text = await asyncio.wait_for(read_response(reader), 10)
                assert status == 200, text
                assert hashlib.sha256(body).hexdigest().encode() in text
        finally:
            writer.close()
        await _no_reservation_left(app)
    await assert_drained(pool)
