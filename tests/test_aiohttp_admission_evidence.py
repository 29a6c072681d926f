"""The admission's shortcuts keep its rules: evidence at the first look, FIFO for whole bodies.

A body whose head arrived with less than ``EVIDENCE_BYTES`` behind it, but whose next bytes
already wait in the socket's receive queue, is admitted at once by ``reserve_now`` (no waiting
task, no paused reading); one that has really shown nothing still reserves nothing.  A body
that came whole with its head (``hold_whole``, into its connection's hold) never overtakes a body
waiting in the FIFO, and what a hold holds is reserved until given back.
Real sockets (a connected pair), both loops.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

import bufpool
from bufpool.aiohttp._admission import EVIDENCE_BYTES, Admission, BodyCut

MiB = 1 << 20


class _Stream:
    """What the fast path hands the admission: bytes shown so far and its socket."""

    def __init__(self, fd: int, shown: int = 0) -> None:
        self.fd = fd
        self.total_bytes = shown
        self.cut: BaseException | None = None

    def is_eof(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return None

    def set_exception(self, exc: BaseException) -> None:
        self.cut = exc


def _admission() -> Admission:
    pool = bufpool.BufferPool(max_bytes=8 * MiB, on_exhausted="raise")
    return Admission(
        pool, budget=4 * MiB, acquire_timeout=60, body_timeout=60, body_min_rate=500,
        body_grace=20, send_timeout=60, preempt_after=0.5, preempt_idle=1.0,
        idle_trim_after=None,
    )


async def _queued(sock: socket.socket, n: int) -> None:
    """Wait until ``n`` bytes sit in ``sock``'s receive queue (MSG_PEEK, not a clock)."""
    loop = asyncio.get_running_loop()
    while len(sock.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)) < n:
        fut = loop.create_future()
        loop.add_reader(sock.fileno(), fut.set_result, None)
        try:
            await fut
        finally:
            loop.remove_reader(sock.fileno())


@pytest.mark.asyncio
async def test_bytes_waiting_in_the_kernel_are_evidence_at_the_first_look() -> None:
    adm = _admission()
    server, client = socket.socketpair()
    server.setblocking(False)
    try:
        shown = 1000  # what came in the same read as the head
        stream = _Stream(server.fileno(), shown)
        # Nothing behind the head yet: no reservation, the caller waits for the evidence.
        assert adm.reserve_now(stream, None, MiB, MiB) is None
        assert adm.reserved == 0
        # Not enough yet: 1000 shown + 10000 queued < 16 KiB.
        client.sendall(b"x" * 10000)
        await _queued(server, 10000)
        assert adm.reserve_now(stream, None, MiB, MiB) is None
        assert adm.reserved == 0
        # The rest of the evidence is in the kernel: admitted now, no wait.
        client.sendall(b"x" * (EVIDENCE_BYTES - shown - 10000))
        await _queued(server, EVIDENCE_BYTES - shown)
        ticket = adm.reserve_now(stream, None, MiB, MiB)
        assert ticket is not None
        assert adm.reserved == MiB
        adm.release(ticket)
        assert adm.reserved == 0
        assert stream.cut is None
    finally:
        server.close()
        client.close()
        adm.close()


@pytest.mark.asyncio
async def test_a_small_body_needs_only_itself_as_evidence() -> None:
    adm = _admission()
    server, client = socket.socketpair()
    server.setblocking(False)
    try:
        stream = _Stream(server.fileno(), 0)
        assert adm.reserve_now(stream, None, 4096, 3000) is None
        client.sendall(b"y" * 3000)  # the whole (small) body, still in the kernel
        await _queued(server, 3000)
        ticket = adm.reserve_now(stream, None, 4096, 3000)
        assert ticket is not None and adm.reserved == 4096
        adm.release(ticket)
    finally:
        server.close()
        client.close()
        adm.close()


@pytest.mark.asyncio
async def test_a_closed_socket_is_no_evidence() -> None:
    adm = _admission()
    server, client = socket.socketpair()
    fd = server.fileno()
    stream = _Stream(fd, 0)
    server.close()
    client.close()
    try:
        assert adm.reserve_now(stream, None, MiB, MiB) is None  # ioctl fails: not admitted
        assert adm.reserved == 0
        assert not isinstance(stream.cut, BodyCut)
    finally:
        adm.close()


class _Whole(_Stream):
    """A body that has shown all its bytes (evidence complete)."""

    def is_eof(self) -> bool:
        return True


@pytest.mark.asyncio
async def test_a_whole_small_body_does_not_overtake_a_waiting_one() -> None:
    adm = _admission()  # budget 4 MiB
    holder = adm.reserve_now(_Whole(-1), None, 3 * MiB, 3 * MiB)
    assert holder is not None
    # A 2 MiB body with its evidence waits in the FIFO (3 + 2 > 4 MiB).
    waiter = asyncio.ensure_future(adm.reserve(_Whole(-1), None, 2 * MiB, 2 * MiB))
    await asyncio.sleep(0)
    assert not waiter.done() and adm.reserved == 3 * MiB
    # 4 KiB would fit next to the holder, but the FIFO has a waiter: not admitted ahead of it.
    hold = adm.new_hold(_Whole(-1))
    assert not adm.hold_whole(hold, 4096)
    assert (adm.reserved, hold.size, hold in adm.bodies) == (3 * MiB, 0, False)
    adm.release(holder)
    ticket = await asyncio.wait_for(waiter, 5)
    assert adm.reserved == 2 * MiB
    # Nobody waits any more: admitted at once; two bodies of one connection share its hold.
    assert adm.hold_whole(hold, 4096) and adm.hold_whole(hold, 1024)
    assert (adm.reserved, hold.size, hold in adm.bodies) == (2 * MiB + 5120, 5120, True)
    assert adm.stats().bodies == 2  # the waiter's ticket and the hold
    # One of them goes to another owner: its bytes move to a ticket of their own.
    own = adm.split_hold(hold, 1024, _Whole(-1))
    assert (adm.reserved, hold.size, own.size) == (2 * MiB + 5120, 4096, 1024)
    adm.release(own)
    adm.unhold_whole(hold, 4096)
    assert (adm.reserved, hold.size, hold in adm.bodies) == (2 * MiB, 0, False)
    # The budget bounds a hold as any body: 2 MiB more does not fit next to the waiter's.
    assert not adm.hold_whole(hold, 2 * MiB + 1)
    adm.release(ticket)
    assert (adm.reserved, len(adm.bodies)) == (0, 0)
    adm.close()


@pytest.mark.asyncio
async def test_a_body_cancelled_right_after_its_grant_gives_the_reservation_back() -> None:
    """A body that waited for its evidence, was promoted and granted, and whose waiting task
    is cancelled before it resumes (its connection was lost in that loop turn): the
    reservation comes back (it stayed reserved for good before)."""
    adm = _admission()
    stream = _Stream(-1)  # no socket: the evidence can only come from the stream
    task = asyncio.ensure_future(adm.reserve(stream, None, MiB, MiB))
    await asyncio.sleep(0)
    assert adm.reserved == 0 and not task.done()  # waiting for its evidence
    stream.total_bytes = EVIDENCE_BYTES
    adm._poll()  # the periodic look: promoted and granted in this same turn ...
    assert adm.reserved == MiB
    task.cancel()  # ... and cancelled before the waiting task runs
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (adm.reserved, len(adm.bodies)) == (0, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("zero_copy", [False, True], ids=["parser", "zero_copy"])
@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_a_small_encoded_body_split_over_two_writes_is_admitted(
    zero_copy: bool, encoding: str
) -> None:
    """A Content-Encoding body (read_body's streamed path) shorter than EVIDENCE_BYTES on the
    wire, whose second part arrives after the handler began waiting: its evidence is all of
    its Content-Length, counted in wire (compressed) bytes.  It used to wait for 16 KiB that
    never come, with reading paused, until a deadline (found by an attacker review)."""
    import gzip

    from aiohttp import web

    import bufpool.aiohttp as bpa
    from tests._helpers_aiohttp import assert_drained, make_pool, read_response, served_runner

    plain = bytes((i * 7) % 251 for i in range(3000))
    body = gzip.compress(plain) if encoding == "gzip" else plain[:300]
    started = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        started.set()
        received = await bpa.read_body(request)
        return web.Response(text=f"{len(received)} {received.sha256()}")

    pool = make_pool(on_exhausted="raise")
    app = web.Application()
    bpa.setup(app, pool=pool, zero_copy_receive=zero_copy)
    app.router.add_post("/upload", upload)
    async with served_runner(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            head = (
                f"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Encoding: {encoding}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            writer.write(head + body[:50])
            await started.wait()  # the handler waits for the rest (its admission first)
            writer.write(body[50:])
            async with asyncio.timeout(20):  # (a safety net: the answer comes at once)
                status, _, reply = await read_response(reader)
        finally:
            writer.close()
    decoded = plain if encoding == "gzip" else body
    import hashlib

    assert status == 200
    assert reply.decode() == f"{len(decoded)} {hashlib.sha256(decoded).hexdigest()}"
    await assert_drained(pool)
