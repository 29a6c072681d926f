"""The zero-copy receive path (``setup(app, zero_copy_receive=True)``) on real sockets.

Every test runs on both loops (conftest).  Each checks that the fast path was actually taken
(``app[RECEIVE_KEY]`` counters) where it should be, that bodies arrive byte-exact, and that
every lease is back in the pool afterwards (``assert_drained``).
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web, web_protocol
from aiohttp.base_protocol import BaseProtocol

import bufpool
import bufpool.aiohttp as bpa
from tests._helpers_aiohttp import (
    assert_drained,
    make_app,
    make_pool,
    raw_connect,
    read_response,
    served_runner,
    wait_for,
)
from tests._tls_helpers import make_certs

pytestmark = pytest.mark.asyncio


async def _read_all(request: web.Request) -> web.Response:
    data = await request.read()
    return web.json_response({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})


async def _stream(request: web.Request) -> web.Response:
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_chunked(10_000):
        h.update(chunk)
        n += len(chunk)
    return web.json_response({"size": n, "sha256": h.hexdigest()})


async def _ignore(request: web.Request) -> web.Response:
    return web.Response(text="ignored")


def fast_app(**kw: Any) -> tuple[web.Application, Any]:
    pool = make_pool(on_exhausted=kw.pop("on_exhausted", "raise"), max_bytes=kw.pop(
        "max_bytes", 64 << 20))
    kw.setdefault("zero_copy_receive", True)
    app = make_app(pool, **kw)
    app.router.add_post("/read", _read_all)
    app.router.add_post("/stream", _stream)
    app.router.add_post("/ignore", _ignore)
    return app, pool


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def gated(
    gate: asyncio.Event, protocols: list[Any], text: str
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler that records its connection's protocol, then answers ``text`` once ``gate``
    is set."""

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        protocols.append(request.transport.get_protocol())
        await gate.wait()
        return web.Response(text=text)

    return handler


def chunked(path: str, body: bytes, rng: random.Random) -> bytes:
    out = [f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode()]
    pos = 0
    while pos < len(body):
        k = rng.randrange(1, 200_000)
        out.append(b"%x\r\n" % len(body[pos : pos + k]) + body[pos : pos + k] + b"\r\n")
        pos += k
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def digest(body: bytes) -> dict[str, Any]:
    return {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


async def test_bodies_byte_exact_in_random_splits() -> None:
    """Random sizes 0 B - 4 MiB, written in random splits, several requests pipelined on one
    connection: every body arrives exact (read_body, no copy), all through the fast path."""
    rng = random.Random(15)
    app, pool = fast_app(max_body_size=8 << 20)
    sizes = [0, 1, 65536, 65537, 4 << 20] + [rng.choice((rng.randrange(0, 70_000),
                                                        rng.randrange(0, 4 << 20)))
                                             for _ in range(7)]
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        bodies = [rng.randbytes(n) for n in sizes]
        # Every third body chunked (random chunk sizes): aiohttp's parser takes it, and the
        # next request is back on the fast path.
        stream = b"".join(
            chunked("/upload", b, rng) if k % 3 == 2 else post("/upload", b)
            for k, b in enumerate(bodies)
        )
        pos = 0

        async def send() -> None:
            nonlocal pos
            while pos < len(stream):
                k = rng.choice((1, 7, 1000, 65536, 300_000))
                writer.write(stream[pos : pos + k])
                pos += k
                await writer.drain()

        sender = asyncio.create_task(send())
        for body in bodies:
            status, _, got = await asyncio.wait_for(read_response(reader), 30)
            assert status == 200
            answer = json.loads(got)
            assert {"size": answer["size"], "sha256": answer["sha256"]} == digest(body)
        await sender
        writer.close()
    state = app[bpa.RECEIVE_KEY]
    assert state.active is True
    n_chunked = len(sizes) // 3
    assert (state.fast, state.forwarded, state.passthrough) == (
        len(sizes) - n_chunked, n_chunked, 0)
    await assert_drained(pool)


async def test_byte_by_byte_request_then_keepalive() -> None:
    app, pool = fast_app()
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        body = bytes(range(256)) * 3
        for b in post("/upload", body):
            writer.write(bytes([b]))
            await writer.drain()
        status, _, got = await asyncio.wait_for(read_response(reader), 10)
        assert status == 200 and json.loads(got)["sha256"] == digest(body)["sha256"]
        writer.write(post("/upload", b"second"))
        status, _, got = await asyncio.wait_for(read_response(reader), 10)
        assert status == 200 and json.loads(got)["size"] == 6
        writer.close()
    assert app[bpa.RECEIVE_KEY].fast == 2
    await assert_drained(pool)


@pytest.mark.parametrize("path", ["/read", "/stream"])
async def test_request_read_and_streaming_handlers(path: str) -> None:
    """request.read() and request.content.iter_chunked work on fast-path bodies."""
    app, pool = fast_app()
    rng = random.Random(3)
    async with served_runner(app) as port, aiohttp.ClientSession() as session:
        for n in (0, 5, 65536, 200_000, 1 << 20):
            body = rng.randbytes(n)
            async with session.post(f"http://127.0.0.1:{port}{path}", data=body) as resp:
                assert resp.status == 200
                assert await resp.json() == digest(body)
    assert app[bpa.RECEIVE_KEY].fast == 5
    await assert_drained(pool)


async def _first_use(request: web.Request) -> web.Response:
    """Uses the untouched body as aiohttp's StreamReader first (``op``), then reads it all."""
    content = request.content
    op = request.query["op"]
    seen: list[Any] = []
    data = b""
    if op == "at_eof":
        seen.append(content.at_eof())
    elif op == "exception":
        seen.append(content.exception())
    elif op == "limits":
        seen.append(list(content.get_read_buffer_limits()))
    elif op == "total_raw_bytes":
        seen.append(content.total_raw_bytes)
    elif op == "fields":  # the public fields, read as attributes
        seen.extend([content.total_bytes, content.total_compressed_bytes])
    elif op == "read_then_counts":  # counted once (aiohttp's post() checks client_max_size)
        data = await request.read()
        seen.extend([content.total_bytes, content.total_raw_bytes])
    elif op == "repr":
        seen.append(repr(content).startswith("<ReceivedBody"))
    elif op == "readany":
        while chunk := await content.readany():
            data += chunk
    elif op == "readexactly":
        data = await content.readexactly(int(request.headers["Content-Length"]))
    elif op == "readline":
        while line := await content.readline():
            data += line
    elif op == "iter_any":
        async for chunk in content.iter_any():
            data += chunk
    elif op == "readchunk":
        while True:
            chunk, _end = await content.readchunk()
            if not chunk:
                break
            data += chunk
    if not data:
        data = await request.read()
    built = content._reader  # type: ignore[attr-defined]
    return web.json_response({"seen": seen, "built": built, **digest(data)})


_FIRST_USES = {
    # op: what it shows of a 12,000-byte body that came whole with its head
    "at_eof": [False], "exception": [None], "limits": None, "total_raw_bytes": [12_000],
    "repr": [True], "fields": [12_000, None], "read_then_counts": [12_000, 12_000],
    "readany": [], "readexactly": [],
    "readline": [], "iter_any": [],
    "readchunk": [],
}


@pytest.mark.parametrize("op", sorted(_FIRST_USES))
async def test_a_body_used_as_a_stream_reader_first_behaves_as_one(op: str) -> None:
    """A fast-path body builds its StreamReader part only when something uses it as one
    (``LAZY_READER``): whatever StreamReader method or property comes first, it sees the
    whole StreamReader (fields set before it was built, such as ``total_bytes``, kept) and
    the body reads back byte-exact.  One that only ``read_body`` takes never builds it."""
    from bufpool.aiohttp._received import LAZY_READER

    assert LAZY_READER  # (aiohttp 3.14's StreamReader keeps its fields in slots)
    app, pool = fast_app()
    app.router.add_post("/first", _first_use)
    built: list[bool] = []

    async def taken(request: web.Request) -> web.Response:
        body = await bpa.read_body(request)
        built.append(request.content._reader)  # type: ignore[attr-defined]
        return web.Response(text=str(len(body)))

    app.router.add_post("/taken", taken)
    body = bytes(range(256)) * 46 + b"\n" * 224  # 12,000 bytes with line ends in them
    assert len(body) == 12_000
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:  # (each request in one write: whole with its head)
            writer.write(post(f"/first?op={op}", body))
            status, _h, first = await asyncio.wait_for(read_response(reader), 10)
            assert status == 200, first
            answer = json.loads(first)
            assert answer["built"] is True  # (built once, by the first use)
            assert answer["size"] == len(body)
            assert answer["sha256"] == hashlib.sha256(body).hexdigest()
            if _FIRST_USES[op] is not None:
                assert answer["seen"] == _FIRST_USES[op]
            else:  # the limits aiohttp's own StreamReader reports for this server's limit
                limit = answer["seen"][0][0]
                assert answer["seen"] == [[limit, 2 * limit]] and limit > 0
            writer.write(post("/taken", body))
            status, _h, second = await asyncio.wait_for(read_response(reader), 10)
            assert (status, second) == (200, str(len(body)).encode())
        finally:
            writer.close()
    assert built == [False]
    assert app[bpa.RECEIVE_KEY].fast == 2
    await assert_drained(pool)


async def test_closed_connections_are_freed_without_the_cycle_collector() -> None:
    """A connection whose requests held whole bodies (its admission hold refers to it) is
    freed by reference counting once closed: no cycle is left for the collector (there was
    one through the hold; found by an attacker review)."""
    app, pool = fast_app()

    async def taken(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await bpa.read_body(request))))

    app.router.add_post("/taken", taken)

    def alive() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is bpa._fastpath.ZeroCopyProtocol)

    gc.collect()
    gc.disable()
    try:
        async with served_runner(app) as port:
            for _ in range(5):
                reader, writer = await raw_connect(port)
                writer.write(post("/taken", b"x" * 1000))
                status, _h, body = await asyncio.wait_for(read_response(reader), 10)
                assert (status, body) == (200, b"1000")
                writer.close()
            assert app[bpa.RECEIVE_KEY].fast == 5
            # every server-side connection sees its close and lets go of its protocol
            assert await wait_for(lambda: alive() == 0), alive()
    finally:
        gc.enable()
    await assert_drained(pool)


async def test_unread_body_is_dropped_and_connection_kept() -> None:
    """A handler that never reads a 1 MiB body: the next pipelined request is still served
    (the rest of the body is discarded as it arrives, as aiohttp lingers over it)."""
    app, pool = fast_app()
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        writer.write(post("/ignore", b"x" * (1 << 20)) + post("/upload", b"after"))
        status, _, got = await asyncio.wait_for(read_response(reader), 10)
        assert (status, got) == (200, b"ignored")
        status, _, got = await asyncio.wait_for(read_response(reader), 10)
        assert status == 200 and json.loads(got)["size"] == 5
        writer.close()
    await assert_drained(pool)


async def test_expect_100_continue_body_takes_fast_path() -> None:
    app, pool = fast_app()
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        body = b"z" * 100_000
        writer.write(
            f"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert line.startswith(b"HTTP/1.1 100")
        writer.write(body)
        status, _, got = await asyncio.wait_for(read_response(reader), 10)
        assert status == 200 and json.loads(got)["sha256"] == digest(body)["sha256"]
        writer.close()
    state = app[bpa.RECEIVE_KEY]
    assert state.fast == 1 and state.forwarded == 0
    await assert_drained(pool)


async def test_compressed_body_normal_path_then_fast_again() -> None:
    """A gzip body goes through aiohttp's parser (decoded there); the next request on the
    same connection is back on the fast path."""
    app, pool = fast_app()
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        plain = b"hello compressed world " * 1000
        packed = gzip.compress(plain)
        writer.write(
            post("/upload", packed, "Content-Encoding: gzip\r\n") + post("/upload", b"x" * 70_000)
        )
        status, _, got = await asyncio.wait_for(read_response(reader), 10)
        assert status == 200 and json.loads(got)["sha256"] == digest(plain)["sha256"]
        status, _, got = await asyncio.wait_for(read_response(reader), 10)
        assert status == 200 and json.loads(got)["size"] == 70_000
        writer.close()
    state = app[bpa.RECEIVE_KEY]
    assert (state.forwarded, state.fast, state.passthrough) == (1, 1, 0)
    await assert_drained(pool)


async def test_chunked_body_on_aiohttp_parser_then_fast_again() -> None:
    app, pool = fast_app()
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" + post("/upload", b"next")
        )
        status, _, got = await asyncio.wait_for(read_response(reader), 10)
        assert status == 200 and json.loads(got)["sha256"] == digest(b"hello world")["sha256"]
        status, _, got = await asyncio.wait_for(read_response(reader), 10)
        assert status == 200 and json.loads(got)["size"] == 4
        writer.close()
    state = app[bpa.RECEIVE_KEY]
    assert (state.forwarded, state.fast, state.passthrough) == (1, 1, 0)  # back on the fast path
    await assert_drained(pool)


async def test_chunk_extension_keeps_connection_on_aiohttp_parser() -> None:
    """A chunk extension is outside what the scanner accepts: aiohttp's parser keeps the
    connection for good (answers still right)."""
    app, pool = fast_app()
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n0\r\n\r\n" + post("/upload", b"next")
        )
        for size in (5, 4):
            status, _, got = await asyncio.wait_for(read_response(reader), 10)
            assert status == 200 and json.loads(got)["size"] == size
        writer.close()
    state = app[bpa.RECEIVE_KEY]
    assert (state.forwarded, state.fast, state.passthrough) == (1, 0, 1)
    await assert_drained(pool)


async def test_websocket_upgrade_works() -> None:
    app, pool = fast_app()

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data.upper())
        return ws

    app.router.add_get("/ws", ws_echo)
    async with (
        served_runner(app) as port,
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws,
    ):
        for word in ("a", "bc" * 50_000):
            await ws.send_str(word)
            assert (await ws.receive(timeout=10)).data == word.upper()
    assert app[bpa.RECEIVE_KEY].passthrough == 1
    await assert_drained(pool)


async def _part_of_a_body_then_abort(
    port: int, path: str, ready: Callable[[], Awaitable[None]]
) -> None:
    """A client that sends the head of a 1 MiB POST and 300,000 of its bytes, waits for
    ``ready()`` (the server's side of the test), then goes away without a FIN (abort)."""
    _, writer = await raw_connect(port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {1 << 20}\r\n\r\n".encode()
        + b"y" * 300_000
    )
    await writer.drain()
    await ready()
    writer.transport.abort()


async def test_truncated_body_releases_everything() -> None:
    """The client disconnects in the middle of a 1 MiB body: the handler's read_body fails
    (ConnectionResetError), every slot taken so far goes back."""
    app, pool = fast_app()
    seen: list[BaseException] = []
    started = asyncio.Event()

    async def watch(request: web.Request) -> web.Response:
        started.set()
        try:
            await bpa.read_body(request)
        except BaseException as exc:
            seen.append(exc)
            raise
        return web.Response(text="unexpected")

    async def slots_taken() -> None:
        await asyncio.wait_for(started.wait(), 10)
        assert await wait_for(lambda: pool.stats().in_use >= 4)

    app.router.add_post("/watch", watch)
    async with served_runner(app) as port:
        await _part_of_a_body_then_abort(port, "/watch", slots_taken)
        assert await wait_for(lambda: bool(seen))
        assert isinstance(seen[0], ConnectionResetError)
    await assert_drained(pool)


async def test_a_stream_reader_waiting_on_a_truncated_body_is_woken() -> None:
    """A handler streams the body (``request.content.readany()``, so the body's StreamReader
    part is built) and waits for bytes that never come: the client disconnects.  The
    disconnect reaches the waiting reader as an exception at once, and the handler ends."""
    app, pool = fast_app()
    seen: list[BaseException] = []
    waiting = asyncio.Event()

    async def stream(request: web.Request) -> web.Response:
        content = request.content
        try:
            while True:
                if not await content.readany():
                    break
                if content.total_bytes >= 300_000:
                    waiting.set()
        except BaseException as exc:
            seen.append(exc)
            raise
        return web.Response(text="unexpected")

    async def streaming() -> None:
        await asyncio.wait_for(waiting.wait(), 10)

    app.router.add_post("/stream-wait", stream)
    async with served_runner(app) as port:
        await _part_of_a_body_then_abort(port, "/stream-wait", streaming)
        assert await wait_for(lambda: bool(seen))
    await assert_drained(pool)


async def test_leases_follow_arrival_not_content_length() -> None:
    """A 4 MiB declared body of which 100 KiB arrived holds about 100 KiB of slots, not
    4 MiB (slots are leased as room is needed)."""
    app, pool = fast_app(max_body_size=8 << 20)
    async with served_runner(app) as port:
        _, writer = await raw_connect(port)
        writer.write(
            f"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {4 << 20}\r\n\r\n".encode()
            + b"q" * 100_000
        )
        await writer.drain()
        assert await wait_for(lambda: pool.stats().in_use >= 2)
        held = pool.stats().in_use
        assert held <= 3, f"{held} slots for 100 KiB received"
        writer.close()
    await assert_drained(pool)


async def test_pool_exhausted_mid_body_gets_503() -> None:
    """The body is admitted (its 3 MiB fit the budget) but pool memory outside the budget is
    held (as by pooled replies): no slot comes within acquire_timeout for the rest of the
    body, 503 + Retry-After, the connection closes; the held slots and the reservation go
    back."""
    app, pool = fast_app(max_bytes=4 << 20, max_body_size=3 << 20, acquire_timeout=0.2)
    async with served_runner(app) as port:
        hog = pool.acquire_chain(3 << 20)  # leave about 1 MiB
        try:
            reader, writer = await raw_connect(port)
            writer.write(post("/upload", b"m" * (3 << 20)))
            status, headers, text = await asyncio.wait_for(read_response(reader), 20)
            assert status == 503 and headers.get("retry-after") == "1"
            assert b"acquire_timeout=0.2" in text
            writer.close()
        finally:
            hog.release()
        assert bpa.admission_stats(app).admitted == 1
        assert await wait_for(lambda: bpa.admission_stats(app).reserved_bytes == 0)
    await assert_drained(pool)


async def test_tls_bodies_through_fast_path(tmp_path: Any) -> None:
    """SSLProtocol calls get_buffer too: bodies decrypted straight into slots."""
    certs = make_certs(["localhost"], tmp_path)
    server_ctx, client_ctx = certs.server_context("localhost"), certs.client_context()
    app, pool = fast_app()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        rng = random.Random(7)
        async with aiohttp.ClientSession() as session:
            for n in (10, 70_000, 1 << 20):
                body = rng.randbytes(n)
                async with session.post(
                    f"https://localhost:{port}/upload", data=body, ssl=client_ctx
                ) as resp:
                    got = await resp.json()
                    assert got["sha256"] == digest(body)["sha256"]
    finally:
        await runner.cleanup()
    assert app[bpa.RECEIVE_KEY].fast == 3
    await assert_drained(pool)


async def _upload_once(app: web.Application, data: bytes) -> None:
    """One POST /upload to a served ``app``, answered 200 with the body's size."""
    async with (
        served_runner(app) as port,
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/upload", data=data) as resp,
    ):
        assert resp.status == 200 and (await resp.json())["size"] == len(data)


async def test_self_test_falls_back_when_an_internal_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing private attribute: one log line, the fast path stays off, requests are
    served by aiohttp's normal path."""
    monkeypatch.delattr(BaseProtocol, "_pause_reading_for_buffer")
    app, pool = fast_app()
    with caplog.at_level(logging.WARNING, logger="bufpool.aiohttp"):
        await _upload_once(app, b"abc")
    state = app[bpa.RECEIVE_KEY]
    assert state.active is False and "_pause_reading_for_buffer" in state.reason
    lines = [r for r in caplog.records if "zero_copy_receive is off" in r.getMessage()]
    assert len(lines) == 1
    assert state.fast == 0
    await assert_drained(pool)


async def test_self_test_falls_back_when_requests_no_longer_end_with_set_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """read_body's kept bodies come back when aiohttp's ``RequestHandler.start`` ends each
    request with ``payload.set_exception``: a ``start`` that does not show it turns the fast
    path off (here a wrapper, which still serves through the original)."""
    original = web_protocol.RequestHandler.start

    async def start(self: web_protocol.RequestHandler) -> None:
        await original(self)

    monkeypatch.setattr(web_protocol.RequestHandler, "start", start)
    app, pool = fast_app()
    await _upload_once(app, b"abcd")
    state = app[bpa.RECEIVE_KEY]
    assert state.active is False and "set_exception" in state.reason and state.fast == 0
    await assert_drained(pool)


async def test_self_test_falls_back_when_the_parser_keeps_the_bytearray_it_is_fed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The receive path feeds aiohttp's parser a bytearray slice of its scratch buffer: a
    parser that kept those bytearrays in ``raw_headers`` (instead of copying them to bytes)
    turns the fast path off."""
    from bufpool.aiohttp import _compat

    real = _compat.HttpRequestParser

    class KeepsWhatItIsFed:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._parser = real(*args, **kwargs)

        def feed_data(self, data: Any) -> Any:
            messages, upgraded, tail = self._parser.feed_data(data)
            kept = [
                (msg._replace(raw_headers=tuple(
                    (bytearray(name), bytearray(value)) for name, value in msg.raw_headers
                )), payload)
                for msg, payload in messages
            ]
            return kept, upgraded, tail

    monkeypatch.setattr(_compat, "HttpRequestParser", KeepsWhatItIsFed)
    app, pool = fast_app()
    await _upload_once(app, b"abcde")
    state = app[bpa.RECEIVE_KEY]
    assert state.active is False and "raw_headers" in state.reason and state.fast == 0
    await assert_drained(pool)


async def test_off_by_default() -> None:
    pool = make_pool()
    app = make_app(pool)
    assert bpa.RECEIVE_KEY not in app
    await _upload_once(app, b"abc")
    await assert_drained(pool)



async def test_queued_bodies_released_when_client_leaves() -> None:
    """Thirteen pipelined requests with complete bodies behind a slow handler: the connection
    holds BODIES_AHEAD of them (the one being handled and one queued; the rest of the stream
    waits, unread), then the client disconnects: every held body's slots go back (the
    queued one was never read), and nothing waits on."""
    from bufpool.aiohttp._fastpath import AHEAD, BODIES_AHEAD

    app, pool = fast_app()
    gate = asyncio.Event()
    protocols: list[Any] = []
    app.router.add_post("/slow", gated(gate, protocols, "late"))
    async with served_runner(app) as port:
        _, writer = await raw_connect(port)
        writer.write(post("/slow", b"s" * 1000) + post("/ignore", b"i" * 70_000) * 12)
        await writer.drain()
        assert await wait_for(lambda: len(protocols) == 1)
        (protocol,) = protocols
        assert await wait_for(lambda: protocol._state == AHEAD)
        assert app[bpa.RECEIVE_KEY].fast == BODIES_AHEAD
        assert len(protocol._live) == BODIES_AHEAD
        assert pool.stats().in_use >= BODIES_AHEAD
        writer.transport.abort()
        await asyncio.sleep(0)
        gate.set()
    await assert_drained(pool)


async def test_a_keep_alive_connection_tracks_only_bodies_in_flight() -> None:
    """Bodies taken by read_body, read as a stream, read in part, or left unread leave the
    connection's list of live bodies when their request ends: a long keep-alive connection
    does not accumulate them (nor, counting them, stop reading heads: BODIES_AHEAD)."""
    seen: list[int] = []

    async def take(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await bpa.read_body(request))))

    async def live(request: web.Request) -> web.Response:
        assert request.transport is not None
        seen.append(len(request.transport.get_protocol()._live))  # type: ignore[attr-defined]
        return web.Response(text="ok")

    app, pool = fast_app()
    app.router.add_post("/take", take)
    app.router.add_post("/stream", _read_all)
    app.router.add_post("/ignore", _ignore)
    app.router.add_get("/live", live)

    async def partial(request: web.Request) -> web.Response:
        # A stream read in part while the rest still arrives: the request ends first.
        return web.Response(text=str(len(await request.content.readexactly(1000))))

    app.router.add_post("/partial", partial)
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            body = b"z" * 3000
            for path in ("/take", "/stream", "/ignore") * 20:
                head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
                writer.write(head.encode() + body)
                status, _, _ = await read_response(reader)
                assert status == 200
            long = b"p" * 100_000
            for _ in range(4):
                writer.write(post("/partial", long)[: -len(long) + 2000])
                status, _, text = await asyncio.wait_for(read_response(reader), 10)
                assert (status, text) == (200, b"1000")
                writer.write(long[2000:])  # the rest, dropped
            writer.write(b"GET /live HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, _ = await read_response(reader)
            assert status == 200
        finally:
            writer.close()
    assert seen == [0]
    await assert_drained(pool)


async def test_read_body_memory_outlives_a_lost_connection_until_the_handler_ends() -> None:
    """read_body's slots stay the request's until aiohttp ends it: a client that vanishes
    while its handler still works takes nothing away (the handler still reads its body),
    and the memory comes back once the handler is done."""
    app, pool = fast_app()
    started, go = asyncio.Event(), asyncio.Event()
    requests: list[web.Request] = []
    seen: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        body = await bpa.read_body(request)
        requests.append(request)
        started.set()
        await go.wait()
        seen.append(body.sha256())  # raises if the slots were released under it
        return web.Response(text="late")

    app.router.add_post("/slow", slow)
    data = random.Random(5).randbytes(20_000)
    async with served_runner(app) as port:
        _reader, writer = await raw_connect(port)
        writer.write(post("/slow", data))
        await asyncio.wait_for(started.wait(), 10)
        writer.transport.abort()
        assert await wait_for(lambda: requests[0].protocol.transport is None)
        assert pool.stats().in_use == 1  # still the handler's
        go.set()
        assert await wait_for(lambda: bool(seen))
        assert seen == [digest(data)["sha256"]]
    await assert_drained(pool)


@pytest.mark.parametrize("copy_upto", [None, 0])
async def test_read_body_lease_handed_on_is_released_once(copy_upto: int | None) -> None:
    """A handler that keeps its own reference to read_body's lease (``retain``) and passes
    the lease to pooled_response (copied, or sent from the pool with copy_replies_upto=0), or
    releases the body early: when the request ends exactly the request's reference is gone,
    the handler's survives.  read_body called twice returns the same body."""
    kw: dict[str, Any] = {} if copy_upto is None else {"copy_replies_upto": copy_upto}
    app, pool = fast_app(**kw)
    kept: list[bufpool.Lease] = []

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await bpa.read_body(request)
        assert await bpa.read_body(request) is body
        lease = body.owned
        assert isinstance(lease, bufpool.Lease)
        kept.append(lease.retain())
        if request.query.get("early"):
            body.release()
            assert lease.refcount == 1
            return web.Response(text="released")
        return bpa.pooled_response(request, body if request.query.get("whole") else lease)

    app.router.add_post("/relay", relay)
    rng = random.Random(9)
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        for path, n in (
            ("/relay", 1000), ("/relay", 60_000), ("/relay?whole=1", 2000),
            ("/relay?whole=1", 50_000), ("/relay?early=1", 3000),
        ):
            data = rng.randbytes(n)
            writer.write(post(path, data))
            status, _, got = await asyncio.wait_for(read_response(reader), 10)
            assert status == 200
            assert got == (b"released" if "early" in path else data)
            lease = kept[-1]
            # the request's reference goes when it ends; the handler's stays
            assert await wait_for(lambda: app[bpa.RECEIVE_KEY].fast == len(kept))
            await asyncio.sleep(0.05)  # (a release that came late would show here)
            assert (lease.refcount, lease.released) == (1, False)
        writer.close()
        assert pool.stats().in_use == len(kept)
        for lease in kept:
            lease.release()
    await assert_drained(pool)


async def test_read_body_admission_returns_when_the_reply_fails_on_a_lost_connection() -> None:
    """A client that uploads to an echo handler and vanishes without reading the reply:
    aiohttp's writing fails after the handler returned (it never ends the request the usual
    way), and still the body's slots and its admission come back."""
    app, pool = fast_app(copy_replies_upto=0)
    async with served_runner(app) as port:
        for _ in range(3):
            reader, writer = await raw_connect(port, rcvbuf=4096)
            data = random.Random(2).randbytes(4 << 20)
            writer.write(post("/echo", data))
            await reader.readexactly(16)  # the reply started
            assert bpa.admission_stats(app).bodies == 1
            writer.transport.abort()
            assert await wait_for(lambda: bpa.admission_stats(app).bodies == 0)
    stats = bpa.admission_stats(app)
    assert (stats.bodies, stats.reserved_bytes) == (0, 0)
    await assert_drained(pool)


@pytest.mark.parametrize("what", ["body", "lease"])
async def test_pooled_response_from_a_spawned_task_after_read_body(what: str) -> None:
    """read_body in the handler, then pooled_response (sent from the pool) built in a task
    the handler spawned: served, whatever the body's framing (fast path or aiohttp's parser
    for chunked), and nothing leaks (the owner is made on the handler task read_body
    checked)."""
    app, pool = fast_app(copy_replies_upto=0)

    async def spawned(request: web.Request) -> web.StreamResponse:
        body = await bpa.read_body(request)

        async def build() -> web.StreamResponse:
            return bpa.pooled_response(request, body if what == "body" else body.owned)

        return await asyncio.wait_for(asyncio.ensure_future(build()), 10)

    app.router.add_post("/spawned", spawned)
    data = random.Random(11).randbytes(3000)
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        writer.write(post("/spawned", data) + chunked("/spawned", data, random.Random(1)))
        for _ in range(2):
            status, _, got = await asyncio.wait_for(read_response(reader), 10)
            assert (status, got) == (200, data)
        writer.close()
    state = app[bpa.RECEIVE_KEY]
    assert (state.fast, state.forwarded) == (1, 1)
    assert pool.stats().leaked == 0
    await assert_drained(pool)


async def test_a_connection_waiting_with_bodies_ahead_stays_paused_when_aiohttps_queue_drains(
) -> None:
    """aiohttp resumes reading by itself once its queue of pipelined requests drains, even
    while this protocol paused the connection (a head waiting for BODIES_AHEAD).  A client
    that queues GETs, then two uploads the handler sits on, then keeps sending, would then
    have everything it sends kept in the connection's pending bytes, without bound.  The
    connection must go back to paused at its next read (at most one read kept), and every
    request is still answered, in order, once the handler goes on."""
    from bufpool.aiohttp._fastpath import AHEAD

    app, pool = fast_app()
    gets_gate = asyncio.Event()
    uploads_gate = asyncio.Event()
    protocols: list[Any] = []

    async def get(request: web.Request) -> web.Response:
        return web.Response(text="get")

    async def sit(request: web.Request) -> web.Response:
        await uploads_gate.wait()
        return web.Response(text="sat")

    app.router.add_get("/first", gated(gets_gate, protocols, "first"))
    app.router.add_get("/get", get)
    app.router.add_post("/sit", sit)
    small = b"s" * 1000
    body = b"u" * 65536
    more = 128  # 8 MiB of further uploads
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            # One read: aiohttp's queue fills (it pauses reading), two bodies are held and
            # the third head waits (this protocol pauses reading too).
            writer.write(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n"
                         + b"GET /get HTTP/1.1\r\nHost: t\r\n\r\n" * 31
                         + post("/sit", small) * 3)
            await asyncio.wait_for(writer.drain(), 10)
            assert await wait_for(lambda: len(protocols) == 1)
            (protocol,) = protocols
            assert await wait_for(lambda: protocol._state == AHEAD)
            writer.write(post("/sit", body) * more)  # not drained: the server stops reading
            gets_gate.set()  # aiohttp's queue drains: it resumes the transport
            for text in [b"first"] + [b"get"] * 31:
                status, _h, got = await asyncio.wait_for(read_response(reader), 10)
                assert (status, got) == (200, text)
            transport = protocol._transport
            assert await wait_for(lambda: not transport.is_reading()), "reading not paused"
            assert protocol._state == AHEAD
            assert len(protocol._pending) <= 2 * 65536 + 4096, len(protocol._pending)
            uploads_gate.set()
            for _ in range(3 + more):
                status, _h, got = await asyncio.wait_for(read_response(reader), 10)
                assert (status, got) == (200, b"sat")
        finally:
            gets_gate.set()
            uploads_gate.set()
            writer.close()
    await assert_drained(pool)


async def test_tiny_pipelined_uploads_keep_at_most_two_reads_pending() -> None:
    """Thousands of tiny uploads pipelined in one write, on a "heap" pool (each body waits a
    loop turn for its slot): the end of that wait resumed reading while the next head
    waited for BODIES_AHEAD, so every request let one more read (20 KiB) into the pending
    bytes, which grew to hold the client's whole stream (an attacker review measured
    4.7 MB on uvloop).  Only going on from AHEAD resumes reading now: the pending bytes
    stay within two reads, and every request is answered, in order."""
    pool = bufpool.BufferPool(max_bytes=64 << 20, on_exhausted="heap")
    app = make_app(pool, zero_copy_receive=True)
    protocols: list[Any] = []
    most = 0

    async def tiny(request: web.Request) -> web.Response:
        nonlocal most
        assert request.transport is not None
        protocol = request.transport.get_protocol()
        if not protocols:
            protocols.append(protocol)
        most = max(most, len(protocol._pending))
        body = await bpa.read_body(request)
        return web.Response(text=str(len(body)))

    app.router.add_post("/tiny", tiny)
    count = 3000
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            writer.write(b"".join(post("/tiny", b"%09d" % i) for i in range(count)))
            for _ in range(count):
                status, _h, text = await asyncio.wait_for(read_response(reader), 10)
                assert (status, text) == (200, b"9")
        finally:
            writer.close()
        scratch = len(protocols[0]._ctx.scratch)
        assert 0 < most <= 2 * scratch, (most, scratch)
    await assert_drained(pool)


async def test_a_close_while_heads_wait_unread_does_not_reset_the_replies() -> None:
    """Pipelined uploads: while a head waits for BODIES_AHEAD the rest of the stream stays
    unread (here and in the kernel).  When aiohttp then closes the connection (a handler
    raised: 500), a plain close with unread bytes is a reset, and the client lost the
    replies already sent to it; plain aiohttp, having read everything, sends a FIN.  The
    connection closes lingering instead: once the server side is gone, the client still
    reads both replies, then EOF."""
    app, pool = fast_app()
    gate = asyncio.Event()
    protocols: list[Any] = []

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("a handler's bug")

    app.router.add_post("/slow", gated(gate, protocols, "slow"))
    app.router.add_post("/boom", boom)
    body = b"b" * 5000
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            writer.write(post("/slow", body) + post("/boom", body) + post("/ignore", body) * 4)
            writer.write_eof()  # (the lingering close ends when it reads the client's EOF)
            assert await wait_for(lambda: len(protocols) == 1)
            (protocol,) = protocols
            gate.set()
            # The server's side is gone before the client reads anything.
            assert await wait_for(lambda: protocol._transport is None)
            status, _h, text = await asyncio.wait_for(read_response(reader), 10)
            assert (status, text) == (200, b"slow")
            status, _h, _text = await asyncio.wait_for(read_response(reader), 10)
            assert status == 500
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
    await assert_drained(pool)


@pytest.mark.parametrize("zero_copy", [False, True], ids=["aiohttp-parser", "zero-copy"])
async def test_a_read_of_pipelined_uploads_ending_in_garbage_is_answered_as_aiohttp_does(
    zero_copy: bool,
) -> None:
    """aiohttp parses a read as a whole: four uploads and a malformed request in one read
    get one 400 and none of the four is run.  The fast path takes its queued requests of
    the read back (see _passthrough); the head that waits for BODIES_AHEAD used to split
    the read, and the requests before it ran (four 200s, then the 400)."""
    ran = 0

    async def counted(request: web.Request) -> web.Response:
        nonlocal ran
        ran += 1
        return web.Response(text="ok")

    app, pool = fast_app(zero_copy_receive=zero_copy)
    app.router.add_post("/counted", counted)
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            writer.write(post("/counted", b"c" * 100) * 4 + b"GARBAGE\r\n\r\n")  # one read
            status, _h, text = await asyncio.wait_for(read_response(reader), 10)
            assert status == 400 and b"Invalid method" in text, (status, text)
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
    assert ran == 0
    await assert_drained(pool)


async def test_pipelined_echoes_sent_from_the_pool_stay_exact_while_heads_wait() -> None:
    """Uploads pipelined to an echo that replies from the body's own slots
    (``copy_replies_upto=0``), the client reading nothing until it has sent them all: heads
    wait for BODIES_AHEAD, the connection writes through its lingering close (the real
    transport behind it), and each slot comes back only once the transport let go of its
    views.  On a pool too small to hold the bodies at once, slots are reused throughout:
    every reply is byte-exact, in order."""
    from bufpool.aiohttp._fastpath import AHEAD
    from bufpool.aiohttp._linger import LingeringClose

    app, pool = fast_app(copy_replies_upto=0, max_bytes=4 << 20, max_body_size=1 << 20,
                         body_budget=2 << 20)
    lingering: list[bool] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await bpa.read_body(request)
        if not lingering:  # the first reply waits until a head waits behind the second
            assert request.transport is not None
            protocol = request.transport.get_protocol()
            assert await wait_for(lambda: protocol._state == AHEAD)
        lingering.append(isinstance(request.transport, LingeringClose))
        return bpa.pooled_response(request, body)

    app.router.add_post("/echo-seen", echo)
    rng = random.Random(15)
    bodies = [rng.randbytes(rng.randrange(100_000, 700_000)) for _ in range(12)]
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            writer.write(b"".join(post("/echo-seen", b) for b in bodies))
            for body in bodies:
                status, _h, got = await asyncio.wait_for(read_response(reader), 20)
                assert status == 200
                assert got == body
        finally:
            writer.close()
    assert lingering == [True] * len(bodies)
    await assert_drained(pool)


@pytest.mark.parametrize("zero_copy", [False, True], ids=["aiohttp-parser", "zero-copy"])
async def test_eof_callbacks_and_wait_eof_behave_as_aiohttps_stream_reader(
    zero_copy: bool,
) -> None:
    """``request.content.on_eof`` on a body that arrived whole and is never read runs its
    callback at once; one registered before the last byte runs when it arrives; and
    ``wait_eof()`` in a task that outlives the request returns (then ``read()`` raises
    aiohttp's PayloadAccessError).  A fast-path body held in slots never ran the callbacks,
    and its wait_eof() hung once the request had ended."""
    app, pool = fast_app(zero_copy_receive=zero_copy)
    seen: dict[str, Any] = {}
    request_ended = asyncio.Event()
    after_done = asyncio.Event()
    registered = asyncio.Event()

    async def whole(request: web.Request) -> web.Response:
        content = request.content
        fired: list[int] = []
        content.on_eof(lambda: fired.append(1))
        seen["at once"] = fired == [1]

        async def after() -> None:
            await request_ended.wait()
            await asyncio.wait_for(content.wait_eof(), 10)
            try:
                await content.read()
            except Exception as exc:
                seen["read after"] = type(exc).__name__
            after_done.set()

        seen["task"] = asyncio.ensure_future(after())
        return web.Response(text="whole")

    async def split(request: web.Request) -> web.Response:
        content = request.content
        arrived = asyncio.Event()
        content.on_eof(arrived.set)
        seen["split before"] = arrived.is_set()
        registered.set()
        await asyncio.wait_for(arrived.wait(), 10)
        return web.Response(text="split")

    app.router.add_post("/whole", whole)
    app.router.add_post("/split", split)
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            writer.write(post("/whole", b"hello"))
            assert (await asyncio.wait_for(read_response(reader), 10))[2] == b"whole"
            request_ended.set()
            await asyncio.wait_for(after_done.wait(), 10)
            body = b"s" * 50_000
            writer.write(post("/split", body)[:-30_000])
            await asyncio.wait_for(registered.wait(), 10)
            writer.write(body[-30_000:])
            assert (await asyncio.wait_for(read_response(reader), 10))[2] == b"split"
        finally:
            writer.close()
    assert seen["at once"] is True
    assert seen["read after"] == "PayloadAccessError"
    assert seen["split before"] is False
    if zero_copy:
        assert app[bpa.RECEIVE_KEY].fast == 2
    await assert_drained(pool)


async def test_gets_refilling_aiohttps_queue_cannot_grow_the_pending_bytes() -> None:
    """Groups of 33 GETs and two tiny uploads, pipelined in one write (an attacker review's
    stream): the GETs fill aiohttp's queue, which resumes reading by itself each time it
    drains, while a head waits for BODIES_AHEAD.  Each resume let one more read into the
    pending bytes and each wait consumed about one group, so they grew to hold nearly the
    whole stream (1.55 MB of 1.6 MB), and the check of a waiting read's rest parsed them
    again each time.  aiohttp's resumes now respect the protocol's pause: the pending bytes
    stay within two reads, the rest-of-read check parses about the stream once, and every
    request is answered."""
    from bufpool.aiohttp import _fastpath

    app, pool = fast_app()
    protocols: list[Any] = []
    parsed = 0
    original = _fastpath.ZeroCopyProtocol._parse_fails

    def counted(self: Any, rest: Any) -> bool:
        nonlocal parsed
        parsed += len(rest)
        return original(self, rest)

    async def get(request: web.Request) -> web.Response:
        if not protocols:
            assert request.transport is not None
            protocols.append(request.transport.get_protocol())
        return web.Response(text="g")

    async def tiny(request: web.Request) -> web.Response:
        await asyncio.sleep(0)
        await bpa.read_body(request)
        return web.Response(text="p")

    app.router.add_get("/g", get)
    app.router.add_post("/p", tiny)
    group = b"GET /g HTTP/1.1\r\nHost: t\r\n\r\n" * 33 + post("/p", b"x") * 2
    groups = 200
    most = 0
    _fastpath.ZeroCopyProtocol._parse_fails = counted  # type: ignore[method-assign]
    try:
        async with served_runner(app) as port:
            reader, writer = await raw_connect(port)
            try:
                writer.write(group * groups)
                for i in range(groups * 35):
                    status, _h, text = await asyncio.wait_for(read_response(reader), 10)
                    assert (status, text) == (200, b"p" if i % 35 >= 33 else b"g")
                    most = max(most, len(protocols[0]._pending))
            finally:
                writer.close()
            scratch = len(protocols[0]._ctx.scratch)
    finally:
        _fastpath.ZeroCopyProtocol._parse_fails = original  # type: ignore[method-assign]
    assert most <= 2 * scratch, (most, scratch)
    assert parsed <= 2 * len(group) * groups, parsed
    await assert_drained(pool)


async def test_a_file_response_on_a_connection_whose_heads_waited_is_sent_whole(
    tmp_path: Any,
) -> None:
    """Two uploads, then a GET of a file and another GET, pipelined: the file's head waited
    for BODIES_AHEAD, so the connection writes through its lingering close.  asyncio's
    native sendfile keeps the transport it is given in a weak map, which the proxy could
    not enter: the file went out, then aiohttp dropped the connection with the GET after it
    unanswered.  Every reply arrives, the file byte-exact, on both loops."""
    data = random.Random(21).randbytes(300_000)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    app, pool = fast_app()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0)
        return web.Response(text="slow")

    async def file(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path)

    async def get(request: web.Request) -> web.Response:
        return web.Response(text="g")

    app.router.add_post("/slow", slow)
    app.router.add_get("/file", file)
    app.router.add_get("/g", get)
    async with served_runner(app) as port:
        reader, writer = await raw_connect(port)
        try:
            writer.write(post("/slow", b"a" * 5000) * 2 + b"GET /file HTTP/1.1\r\nHost: t\r\n\r\n"
                         + b"GET /g HTTP/1.1\r\nHost: t\r\n\r\n")
            for expected in (b"slow", b"slow", data, b"g"):
                status, _h, got = await asyncio.wait_for(read_response(reader), 10)
                assert (status, got) == (200, expected)
        finally:
            writer.close()
    await assert_drained(pool)
