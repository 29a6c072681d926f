"""Per-request CPU of the example app in one process, without sockets: pooled vs plain.

Feeds ``POST /process`` requests (one at a time, keep-alive) into the server's protocol as
the event loop would (``get_buffer``/``buffer_updated`` for the pooled server's zero-copy
receive path, ``data_received`` with a fresh ``bytes`` for plain aiohttp: one copy of the
request on each side) and waits, on an event set by the
transport's ``write``, for each reply.  The transport is a stand-in that accepts every write
at once, so what is measured is the Python (and C-extension) work per request of aiohttp and
bufpool, free of kernel and scheduling noise; the same loop runs both servers, interleaved.

    python bench/bench_aiohttp_inproc.py                   # 1k, 16k, 256k bodies; uvloop
    python bench/bench_aiohttp_inproc.py --sizes 1k --rounds 5 --requests 20000
    python bench/bench_aiohttp_inproc.py --loop asyncio
    python bench/bench_aiohttp_inproc.py --handler read      # a request.read() route

``--handler read`` adds the same route to both apps, one that reads its body with
``await request.read()`` (what JSON and form routes do): the cost zero_copy_receive adds to
routes that do not use ``read_body``.

Prints, per body size, microseconds of CPU per request for each server (the median of the
rounds and their min-max) and the ratio pooled / plain per round.  Kernel costs (copies into
the socket, page faults of fresh buffers) are not in these figures: the harness
(``python -m bufpool loadtest``) measures them end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import aiohttp_app


class _Transport(asyncio.Transport):
    """Accepts every write at once; ``replies`` counts the writes that end a response."""

    def __init__(self, done: asyncio.Event) -> None:
        super().__init__()
        self._done = done
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def write(self, data: Any) -> None:
        self.written += len(data)
        self._done.set()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.written += len(chunk)
        self._done.set()

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _request(size: int, path: str = "/process") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: {size}\r\n\r\n"
    return head.encode() + bytes((i * 7 + 13) % 251 for i in range(size))


async def _read_route(request: web.Request) -> web.Response:
    """The same work as /process in plain mode: ``request.read()``, a 4 KiB reply."""
    data = await request.read()
    return web.Response(
        body=aiohttp_app.pattern_bytes(aiohttp_app.DEFAULT_REPLY),
        content_type="application/octet-stream",
        headers={"X-Received": str(len(data))},
    )


async def _run(pooled: bool, req: bytes, n: int) -> float:
    """CPU microseconds per request over ``n`` requests (after a warm-up)."""
    app = aiohttp_app.create_app(pooled=pooled)
    app.router.add_post("/read", _read_route)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server: Any = runner.server
    proto = server()
    done = asyncio.Event()
    transport = _Transport(done)
    proto.connection_made(transport)
    buffered = hasattr(proto, "get_buffer")

    whole = memoryview(req)
    size = len(req)

    async def one() -> None:
        done.clear()
        # Each side copies the request once, as the event loop would: uvloop reads into its
        # own buffer and hands a protocol a new ``bytes`` of what arrived (one allocation and
        # copy), or reads straight into a buffered protocol's ``get_buffer`` (one copy).
        if buffered:
            buf = proto.get_buffer(-1)
            if len(buf) >= size:  # the whole request in one read, as under load
                buf[:size] = req
                proto.buffer_updated(size)
            else:
                view = whole
                while view:
                    k = min(len(buf), len(view))
                    buf[:k] = view[:k]
                    proto.buffer_updated(k)
                    view = view[k:]
                    if view:
                        buf = proto.get_buffer(-1)
        else:
            proto.data_received(bytes(whole))
        await done.wait()
        await asyncio.sleep(0)  # let the handler task end (its done-callbacks run)

    try:
        for _ in range(min(2000, n)):
            await one()
        gc.collect()
        t0 = time.process_time()
        for _ in range(n):
            await one()
        return (time.process_time() - t0) / n * 1e6
    finally:
        proto.connection_lost(None)
        await runner.cleanup()


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1k,16k,256k", help="body sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per size")
    p.add_argument("--requests", type=int, default=10000, help="requests per round")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument(
        "--handler", choices=("read_body", "read"), default="read_body",
        help="read_body: the example's POST /process; read: a request.read() route",
    )
    args = p.parse_args(argv)

    async def bench() -> None:
        for text in args.sizes.split(","):
            req = _request(_size(text), "/process" if args.handler == "read_body" else "/read")
            pooled: list[float] = []
            plain: list[float] = []
            for _ in range(args.rounds):
                plain.append(await _run(False, req, args.requests))
                pooled.append(await _run(True, req, args.requests))
            ratios = [a / b for a, b in zip(pooled, plain, strict=True)]
            print(
                f"body {text}: plain {statistics.median(plain):.1f} us/request "
                f"({min(plain):.1f}-{max(plain):.1f}), pooled {statistics.median(pooled):.1f} "
                f"({min(pooled):.1f}-{max(pooled):.1f}); pooled/plain "
                f"{statistics.median(ratios):.2f}x (rounds {' '.join(f'{r:.2f}' for r in ratios)})"
            )

    if args.loop == "uvloop":
        import uvloop

        uvloop.run(bench())
    else:
        asyncio.run(bench())


if __name__ == "__main__":
    main()
