"""The chunk-framing scanner the fast path trusts to hand a connection back (sans-IO)."""

from __future__ import annotations

import random

import pytest

from bufpool.aiohttp._chunked import ChunkScanner

HEAD = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


def _scan(stream: bytes, splits: list[int]) -> tuple[int, bool]:
    """Feed ``stream`` in pieces; returns (absolute end, done) at the first end found."""
    scanner = ChunkScanner(len(HEAD))
    pos = 0
    for k in [*splits, len(stream)]:
        piece = stream[pos : pos + k] if k else b""
        stop, done = scanner.scan(piece, 0, len(piece))
        if done:
            return pos + stop, True
        pos += len(piece)
        if pos >= len(stream):
            break
    return pos, False


def test_finds_the_end_in_any_split() -> None:
    rng = random.Random(15)
    for _ in range(200):
        body = b"".join(b"%x\r\n" % n + b"d" * n + b"\r\n" for n in
                        (rng.randrange(1, 3000) for _ in range(rng.randrange(0, 5))))
        message = HEAD + body + b"0\r\n\r\n"
        after = b"GET / HTTP/1.1\r\n\r\n"
        splits = [rng.randrange(1, 50) for _ in range(400)]
        assert _scan(message + after, splits) == (len(message), True)


@pytest.mark.parametrize(
    "body",
    [
        b"5;ext=1\r\nhello\r\n0\r\n\r\n",  # extension
        b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",  # trailer
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after the size
        b"5 \r\nhello\r\n0\r\n\r\n",  # whitespace
        b"5\r\nhelloXX0\r\n\r\n",  # data not ended by CRLF
        b"+5\r\nhello\r\n0\r\n\r\n",  # sign
        b"11111111111111111\r\n",  # 17 hex digits
    ],
)
def test_anything_unusual_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        _scan(HEAD + body, [1] * len(HEAD + body))
