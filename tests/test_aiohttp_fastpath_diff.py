"""Differential test: the zero-copy receive path answers every request shape exactly as plain
aiohttp does (statuses and bodies of every response, in order, and where the connection ends).

Reference: a plain aiohttp app (``await request.read()``, no bufpool).  Under test: the same
routes on ``setup(app, zero_copy_receive=True)`` with ``read_body``.  Each case is sent in one
write on a raw socket, followed by a ``Connection: close`` sentinel request, and read to EOF;
both loops (conftest).  Request smuggling shapes must get the same status on both.
"""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import pytest
from aiohttp import web

import bufpool.aiohttp as bpa
from tests._helpers_aiohttp import assert_drained, make_pool, read_response, served_runner

pytestmark = pytest.mark.asyncio

SENTINEL = b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def _head(*lines: str, method: str = "POST", target: str = "/upload") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\n" + "".join(f"{x}\r\n" for x in lines)
            + "\r\n").encode()


_GZ = gzip.compress(b"compressed " * 500)

CASES: dict[str, bytes] = {
    "get": b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
    "post": _head("Host: t", "Content-Length: 5") + b"hello",
    "post-empty": _head("Host: t", "Content-Length: 0"),
    "post-no-length": _head("Host: t"),
    "pipelined": (_head("Host: t", "Content-Length: 3") + b"abc") * 3,
    "http10": b"POST /upload HTTP/1.0\r\nContent-Length: 4\r\n\r\nabcd",
    "large": _head("Host: t", "Content-Length: 300000") + b"L" * 300_000,
    "cl-te": _head("Host: t", "Content-Length: 5", "Transfer-Encoding: chunked")
    + b"0\r\n\r\n",
    "te-cl": _head("Host: t", "Transfer-Encoding: chunked", "Content-Length: 5")
    + b"0\r\n\r\n",
    "te-gzip-chunked": _head("Host: t", "Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n",
    "te-identity": _head("Host: t", "Transfer-Encoding: identity", "Content-Length: 3") + b"abc",
    "chunked": _head("Host: t", "Transfer-Encoding: chunked") + b"3\r\nabc\r\n0\r\n\r\n",
    "chunked-bad-size": _head("Host: t", "Transfer-Encoding: chunked") + b"zz\r\nabc\r\n0\r\n\r\n",
    "dup-cl-same": _head("Host: t", "Content-Length: 3", "Content-Length: 3") + b"abc",
    "dup-cl-diff": _head("Host: t", "Content-Length: 3", "Content-Length: 5") + b"abcde",
    "cl-list": _head("Host: t", "Content-Length: 3, 3") + b"abc",
    "cl-plus": _head("Host: t", "Content-Length: +3") + b"abc",
    "cl-minus": _head("Host: t", "Content-Length: -3") + b"abc",
    "cl-garbage": _head("Host: t", "Content-Length: 3x") + b"abc",
    "cl-hex": _head("Host: t", "Content-Length: 0x3") + b"abc",
    "cl-space-inside": _head("Host: t", "Content-Length: 1 2") + b"abc",
    "cl-huge": _head("Host: t", "Content-Length: 99999999999999999999999") + b"abc",
    "cl-short": _head("Host: t", "Content-Length: 5") + b"hel",
    "space-before-colon": _head("Host: t", "Content-Length : 3") + b"abc",
    "bare-lf": b"POST /upload HTTP/1.1\nHost: t\nContent-Length: 3\n\nabc",
    "bare-lf-one-line": b"POST /upload HTTP/1.1\r\nHost: t\nContent-Length: 3\r\n\r\nabc",
    "bare-cr": b"POST /upload HTTP/1.1\rHost: t\r\nContent-Length: 3\r\n\r\nabc",
    "leading-crlf": b"\r\n" + _head("Host: t", "Content-Length: 3") + b"abc",
    "obs-fold": _head("Host: t", "X-A: a", " b", "Content-Length: 3") + b"abc",
    "nul-in-header": _head("Host: t", "X-A: a\x00b", "Content-Length: 3") + b"abc",
    "no-host": _head("Content-Length: 3") + b"abc",
    "bad-method": b"P@ST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
    "bad-version": b"POST /upload HTTP/9.9\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
    "long-field": _head("Host: t", "X-Long: " + "v" * 9000, "Content-Length: 3") + b"abc",
    "long-target": _head("Host: t", "Content-Length: 3", target="/" + "p" * 9000) + b"abc",
    "many-headers": _head("Host: t", *[f"X-{i}: {i}" for i in range(200)],
                          "Content-Length: 3") + b"abc",
    "head-over-64k": _head("Host: t", *[f"X-{i}: {'v' * 100}" for i in range(700)],
                           "Content-Length: 3") + b"abc",
    "gzip": _head("Host: t", "Content-Encoding: gzip", f"Content-Length: {len(_GZ)}") + _GZ,
    # (Bad gzip is left out: read_body answers it 400 where request.read() raises into a 500;
    # a handler difference, on aiohttp's path in both servers.)
    "expect-other": _head("Host: t", "Expect: something", "Content-Length: 3") + b"abc",
    # (An unknown Upgrade keeps the connection waiting on both; covered by the WebSocket test.)
    "connect": b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n",
    "unknown-path": _head("Host: t", "Content-Length: 3", target="/nowhere") + b"abc",
    "absolute-form": _head("Host: t", "Content-Length: 3", target="http://t/upload") + b"abc",
}


async def plain_upload(request: web.Request) -> web.Response:
    return web.Response(text=f"size={len(await request.read())}")


async def pooled_upload(request: web.Request) -> web.Response:
    return web.Response(text=f"size={len(await bpa.read_body(request))}")


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _apps() -> tuple[web.Application, web.Application, Any]:
    plain = web.Application(client_max_size=8 << 20)
    plain.router.add_post("/upload", plain_upload)
    plain.router.add_get("/health", health)
    pool = make_pool(on_exhausted="raise")
    fast = web.Application(client_max_size=8 << 20)
    bpa.setup(fast, pool=pool, max_body_size=8 << 20, zero_copy_receive=True)
    fast.router.add_post("/upload", pooled_upload)
    fast.router.add_get("/health", health)
    return plain, fast, pool


def _responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in ``raw`` (Content-Length framed); a trailing
    unparsable rest is returned as status -1."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\r\n\r\n", pos)
        if end < 0:
            out.append((-1, raw[pos:]))
            break
        lines = raw[pos:end].split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = raw[end + 4 : end + 4 + length]
        out.append((status, body))
        pos = end + 4 + length
    return out


async def _until_closed(port: int, data: bytes) -> list[tuple[int, bytes]]:
    """Send ``data`` in one write and nothing more; the responses until the server closes
    (a reset or 20 s without EOF end the list with status -2 or -3)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        chunks = []
        try:
            async with asyncio.timeout(20):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
        except ConnectionResetError:
            return [*_responses(b"".join(chunks)), (-2, b"reset")]
        except TimeoutError:
            return [*_responses(b"".join(chunks)), (-3, b"no EOF within 20 s")]
        return _responses(b"".join(chunks))
    finally:
        writer.close()


async def _exchange(port: int, data: bytes) -> list[tuple[int, bytes]]:
    """``data`` then a closing request (SENTINEL): every response until the server closes."""
    return await _until_closed(port, data + SENTINEL)


async def test_same_answers_as_plain_aiohttp() -> None:
    plain, fast, pool = _apps()
    differences = {}
    async with served_runner(plain) as plain_port, served_runner(fast) as fast_port:
        for name, data in CASES.items():
            want = await _exchange(plain_port, data)
            got = await _exchange(fast_port, data)
            if want != got:
                differences[name] = (want, got)
            await assert_drained(pool)  # every case gives its slots back
    assert not differences, differences
    state = fast[bpa.RECEIVE_KEY]
    assert state.active is True
    assert state.fast >= 10 and state.forwarded >= 2 and state.passthrough >= 10
    await assert_drained(pool)


async def test_a_read_whose_tail_cannot_start_a_request_is_answered_as_plain_aiohttp() -> None:
    """aiohttp's parser judges each read whole: when bytes after the requests it completed in
    a read cannot start another request, it answers 400 at once and serves none of them.  The
    fast path would otherwise serve those requests and wait for the rest of a head; it gives
    the same single 400, at once (found by an attacker review)."""
    plain, fast, pool = _apps()
    reads = [
        _head("Host: t", "Content-Length: 5") + b"hello@",
        _head("Host: t", "content-length: 5") + b"hello@",
        (_head("Host: t", "Content-Length: 3") + b"abc") * 2 + b"\x01",
        b"GET /health HTTP/1.1\r\nHost: t\r\n\r\ndGET /h",
    ]
    async with served_runner(plain) as plain_port, served_runner(fast) as fast_port:
        for data in reads:
            want = await _until_closed(plain_port, data)
            got = await _until_closed(fast_port, data)
            assert [status for status, _ in want] == [400], want
            assert got == want, (data, got)
            await assert_drained(pool)


async def _partial_then_wait(port: int, data: bytes, byte_by_byte: bool) -> list[Any]:
    """Send an unfinished head (in one write, or a byte per write) and nothing more: the
    responses until the server closes (status -3 when it keeps waiting 20 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for k in range(len(data)) if byte_by_byte else [None]:
            writer.write(data if k is None else data[k : k + 1])
            await writer.drain()
        chunks = []
        try:
            async with asyncio.timeout(20):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
        except (ConnectionResetError, TimeoutError) as exc:
            return [*_responses(b"".join(chunks)), type(exc).__name__]
        return _responses(b"".join(chunks))
    finally:
        writer.close()


@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["one-write", "byte-by-byte"])
async def test_a_head_aiohttp_rejects_before_its_end_is_answered_at_once(
    byte_by_byte: bool,
) -> None:
    """aiohttp's parser judges a head as its bytes come: a bad header line gets its 400
    before the head's end arrives.  The fast path, which looks for the head's end first,
    used to wait for it (and when the rest came with the client's EOF, closed without the
    400; found by an attacker review).  Now aiohttp's parser sees the unfinished head as it
    grows, and the answer comes at the same moment as plain aiohttp's."""
    plain, fast, pool = _apps()
    heads = [
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length:+5\r\n",
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5x\r\nX-A: 1\r\n",
        b"P@ST /upload HTTP/1.1\r\nHost: t\r\n",
        b"POST /upload HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n",
        b"POST /upload HTTP/1.1\r\nHost : t\r\n",
        # requests this read completed, then an unfinished head that fails: one 400
        _head("Host: t", "Content-Length: 3") + b"abc" + b"POST /upload HTTP/1.1\r\nA\x01: b\r\n",
    ]
    async with served_runner(plain) as plain_port, served_runner(fast) as fast_port:
        for data in heads:
            if byte_by_byte and not data.startswith(b"POST /upload HTTP/1.1\r\nHost: t\r\nC"):
                continue  # (one head byte by byte is enough for the incremental probe)
            want = await _partial_then_wait(plain_port, data, byte_by_byte)
            got = await _partial_then_wait(fast_port, data, byte_by_byte)
            assert [r[0] for r in want if isinstance(r, tuple)] == [400], want
            if byte_by_byte:  # (aiohttp quotes the bytes of the read that failed: they differ)
                want, got = ([r[0] if isinstance(r, tuple) else r for r in x] for x in (want, got))
            assert got == want, (data, got)
            await assert_drained(pool)
    # An unfinished head that is fine so far still waits for its end on both.
    async with served_runner(fast) as fast_port:
        reader, writer = await asyncio.open_connection("127.0.0.1", fast_port)
        try:
            for piece in (b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Le", b"ngth: 3\r\n",
                          b"\r\nabc"):
                writer.write(piece)
                await writer.drain()
            status, _h, body = await asyncio.wait_for(read_response(reader), 10)
            assert (status, body) == (200, b"size=3")
        finally:
            writer.close()
    await assert_drained(pool)


async def test_smuggling_shapes_are_refused() -> None:
    """The shapes that could desynchronise a proxy and a server end in 400 on both, with the
    sentinel never answered (the connection closes at the error)."""
    plain, fast, pool = _apps()
    async with served_runner(plain) as plain_port, served_runner(fast) as fast_port:
        for name in ("cl-te", "te-cl", "dup-cl-diff", "cl-plus", "cl-minus", "cl-garbage",
                     "space-before-colon", "bare-lf"):
            for port in (plain_port, fast_port):
                answers = await _exchange(port, CASES[name])
                assert [s for s, _ in answers] == [400], (name, port, answers)
    await assert_drained(pool)
