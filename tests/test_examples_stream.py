"""The stream examples run as real programs (``python examples/NAME.py``) on both loops and
answer a real client; on SIGTERM they report a pool with nothing in use."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0


class Example:
    def __init__(self, name: str, loop: str, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / name), "--port", "0", "--loop", loop, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line + self.proc.stderr.read()  # type: ignore[union-attr]
        host, port = line.split()[-1].rsplit(":", 1)
        self.address = (host, int(port))
        self.cert: Path | None = None
        if "--tls" in extra:
            line = self.proc.stdout.readline()
            assert line.startswith("certificate "), line
            self.cert = Path(line.split(" ", 1)[1].strip())

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=TIMEOUT)
        if self.cert is None:
            return sock
        ctx = ssl.create_default_context(cafile=str(self.cert))  # trusts exactly that one
        return ctx.wrap_socket(sock, server_hostname="localhost")

    def stop(self) -> dict[str, object]:
        """SIGTERM; returns the pool stats the example printed on its way out."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, err
        stats_line = [line for line in out.splitlines() if line.startswith("stats ")]
        assert stats_line, out + err
        stats: dict[str, object] = json.loads(stats_line[0][len("stats ") :])
        return stats


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def echo(loop_name: str) -> Iterator[Example]:
    ex = Example("echo_server.py", loop_name)
    yield ex
    if ex.proc.poll() is None:
        ex.proc.kill()
        ex.proc.wait()


@pytest.fixture
def framing(loop_name: str) -> Iterator[Example]:
    ex = Example("framing_server.py", loop_name, "--max-frame", "300000")
    yield ex
    if ex.proc.poll() is None:
        ex.proc.kill()
        ex.proc.wait()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def test_echo_server_returns_every_byte(echo: Example) -> None:
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    with echo.connect() as sock:
        # Send from a thread while reading here: the echo stream exceeds socket buffers.
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        got = recv_exactly(sock, len(data))
        sender.join(TIMEOUT)
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"  # tiny writes echo too
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # the server closes after EOF
    assert got == data
    stats = echo.stop()
    assert stats["in_use"] == 0 and stats["heap_in_use"] == 0


def test_framing_server_hashes_every_frame(framing: Example) -> None:
    rng = random.Random(2)
    payloads = [
        rng.randbytes(rng.choice([0, 1, 200, 3000, 16384, 70_000, 300_000])) for _ in range(80)
    ]
    stream = b"".join(struct.pack(">I", len(p)) + p for p in payloads)
    with framing.connect() as sock:
        sender = threading.Thread(target=sock.sendall, args=(stream,))
        sender.start()
        for p in payloads:
            (n,) = struct.unpack(">I", recv_exactly(sock, 4))
            assert n == 32
            assert recv_exactly(sock, 32) == hashlib.sha256(p).digest()
        sender.join(TIMEOUT)
    # One byte at a time works too (partial headers and payloads).
    with framing.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in struct.pack(">I", 5) + b"hello":
            sock.sendall(bytes([b]))
        assert recv_exactly(sock, 36)[4:] == hashlib.sha256(b"hello").digest()
    stats = framing.stop()
    assert stats["in_use"] == 0 and stats["heap_in_use"] == 0


def test_framing_server_rejects_an_oversized_frame_and_closes(framing: Example) -> None:
    with framing.connect() as sock:
        sock.sendall(struct.pack(">I", 2) + b"ok" + struct.pack(">I", 300_001) + b"x" * 100)
        first = recv_exactly(sock, 36)
        assert first[4:] == hashlib.sha256(b"ok").digest()
        (n,) = struct.unpack(">I", recv_exactly(sock, 4))
        message = recv_exactly(sock, n)
        assert message == b"error: frame of 300001 bytes exceeds max_frame=300000"
        assert sock.recv(1) == b""
    stats = framing.stop()
    assert stats["in_use"] == 0 and stats["heap_in_use"] == 0


@pytest.fixture
def echo_tls(loop_name: str) -> Iterator[Example]:
    ex = Example("echo_server.py", loop_name, "--tls")
    yield ex
    if ex.proc.poll() is None:
        ex.proc.kill()
        ex.proc.wait()


@pytest.fixture
def framing_tls(loop_name: str) -> Iterator[Example]:
    ex = Example("framing_server.py", loop_name, "--tls", "--max-frame", "300000")
    yield ex
    if ex.proc.poll() is None:
        ex.proc.kill()
        ex.proc.wait()


def test_echo_server_over_tls_returns_every_byte(echo_tls: Example) -> None:
    data = random.Random(3).randbytes(1024 * 1024 + 5)
    cert = echo_tls.cert
    with echo_tls.connect() as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        for i in range(0, len(data), 40_000):  # one chunk in flight: no concurrent SSL calls
            piece = data[i:i + 40_000]
            tls.sendall(piece)
            assert recv_exactly(tls, len(piece)) == piece
        tls.sendall(b"x")
        assert recv_exactly(tls, 1) == b"x"
    stats = echo_tls.stop()
    assert stats["in_use"] == 0 and stats["heap_in_use"] == 0
    assert cert is not None and not cert.exists()  # the throwaway certificate is gone


def test_framing_server_over_tls_hashes_frames_and_refuses_oversize(framing_tls: Example) -> None:
    rng = random.Random(4)
    payloads = [rng.randbytes(rng.choice([0, 1, 200, 3000, 16384, 70_000])) for _ in range(40)]
    with framing_tls.connect() as tls:
        for p in payloads:
            tls.sendall(struct.pack(">I", len(p)) + p)
            (n,) = struct.unpack(">I", recv_exactly(tls, 4))
            assert recv_exactly(tls, n) == hashlib.sha256(p).digest()
        tls.sendall(struct.pack(">I", 300_001) + b"x" * 100)
        (n,) = struct.unpack(">I", recv_exactly(tls, 4))
        assert recv_exactly(tls, n) == b"error: frame of 300001 bytes exceeds max_frame=300000"
        try:
            assert tls.recv(1) == b""  # close_notify (or a plain close) after the error
        except (ConnectionError, ssl.SSLError):
            pass
    stats = framing_tls.stop()
    assert stats["in_use"] == 0 and stats["heap_in_use"] == 0
