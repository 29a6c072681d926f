"""The example server (examples/aiohttp_app.py): its command-line contract in both modes, and
the integration under AppRunner, web.run_app and gunicorn's aiohttp uvloop worker."""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from _helpers_aiohttp import assert_drained, served_runner
from aiohttp import web

import bufpool.aiohttp as bpa
from examples.aiohttp_app import create_app, pattern_bytes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "aiohttp_app.py"
#: Bounds every client call on a child server: a hung child fails the test, never stalls it.
_CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30)


def _first_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The child's first stdout line, waiting at most ``timeout`` seconds (not forever)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line from the child within {timeout} s"
    return proc.stdout.readline()


def _stop(proc: subprocess.Popen[str], sig: signal.Signals, timeout: float = 20.0) -> int:
    """Send ``sig`` and wait at most ``timeout`` seconds; a child still alive then is killed
    and the test fails.  Returns the exit code."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"child did not exit within {timeout} s of {sig.name}") from None


@contextmanager
def _example(*args: str) -> Iterator[str]:
    """Start the example as a subprocess; yields its base URL from the one stdout line."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    try:
        line = _first_line(proc)
        assert line.startswith("listening on http://127.0.0.1:"), line
        yield line.split()[-1]
    finally:
        _stop(proc, signal.SIGINT)
        assert proc.stdout is not None and proc.stdout.read() == ""  # exactly one line


async def _exercise(base: str, pooled: bool) -> None:
    body = os.urandom(300_000)
    digest = hashlib.sha256(body).hexdigest()
    async with aiohttp.ClientSession(timeout=_CLIENT_TIMEOUT) as s:
        async with s.get(f"{base}/health") as r:
            assert r.status == 200 and await r.text() == "ok"
        async with s.post(f"{base}/upload", data=body) as r:
            assert await r.json() == {"size": len(body), "sha256": digest}

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 10_000):
                yield body[i : i + 10_000]

        async with s.post(f"{base}/upload", data=chunks()) as r:
            assert await r.json() == {"size": len(body), "sha256": digest}
        async with s.post(f"{base}/echo", data=body) as r:
            assert await r.read() == body
        async with s.post(f"{base}/process", data=body[:16384]) as r:
            assert r.headers["X-Received"] == "16384"
            assert await r.read() == pattern_bytes(4096)
        async with s.post(f"{base}/process?reply=100000", data=b"") as r:
            assert r.headers["X-Received"] == "0"
            assert await r.read() == pattern_bytes(100_000)
        async with s.get(f"{base}/bytes/200000") as r:
            assert await r.read() == pattern_bytes(200_000)
        async with s.post(f"{base}/process?reply=lots", data=b"") as r:
            assert r.status == 400
            assert await r.text() == "reply must be an integer byte count, got 'lots'"
        async with s.get(f"{base}/bytes/-1") as r:
            assert r.status == 400 and "size must be within 0.." in await r.text()
        async with s.post(f"{base}/upload", data=b"x" * 2_000_001) as r:
            assert r.status == 413  # --max-body-size 2000000
        async with s.get(f"{base}/bufpool/stats") as r:
            if pooled:
                stats = await r.json()
                assert stats["in_use"] == 0 and stats["hits"] > 0
            else:
                assert r.status == 404
        if pooled:
            async with s.get(f"{base}/bufpool/stats", headers={"Accept": "text/plain"}) as r:
                assert "bufpool_in_use 0" in await r.text()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("pooled", [True, False])
def test_example_subprocess_contract(pooled: bool, loop: str) -> None:
    args = ["--loop", loop, "--max-body-size", "2000000"]
    if not pooled:
        args.append("--no-pool")
    with _example(*args) as base:
        asyncio.run(_exercise(base, pooled))


@pytest.mark.asyncio
@pytest.mark.parametrize("pooled", [True, False])
async def test_create_app_under_app_runner(pooled: bool) -> None:
    app = create_app(pooled=pooled, max_body_size=2_000_000, pool_max_bytes=16 << 20)
    async with served_runner(app) as port:
        await _exercise(f"http://127.0.0.1:{port}", pooled)
    if pooled:
        await assert_drained(app[bpa.POOL_KEY])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_health(base: str, timeout: float = 20.0) -> None:
    async def probe() -> bool:
        try:
            async with (
                aiohttp.ClientSession(timeout=_CLIENT_TIMEOUT) as s,
                s.get(f"{base}/health") as r,
            ):
                return r.status == 200
        except aiohttp.ClientError:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if asyncio.run(probe()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{base} never became healthy")


def test_example_under_web_run_app() -> None:
    code = (
        "import socket, sys\n"
        "from aiohttp import web\n"
        "from examples.aiohttp_app import create_app\n"
        "sock = socket.socket(); sock.bind(('127.0.0.1', 0))\n"
        "print(sock.getsockname()[1], flush=True)\n"
        "web.run_app(create_app(max_body_size=2000000), sock=sock, print=None)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT, text=True
    )
    try:
        base = f"http://127.0.0.1:{int(_first_line(proc))}"
        _wait_health(base)
        asyncio.run(_exercise(base, True))
    finally:
        assert _stop(proc, signal.SIGINT) == 0


@pytest.mark.parametrize("pooled", ["1", "0"])
def test_gunicorn_uvloop_workers(pooled: str) -> None:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    port = _free_port()
    env = dict(os.environ, BUFPOOL_APP_POOLED=pooled, BUFPOOL_APP_MAX_BODY_SIZE="2000000")
    proc = subprocess.Popen(
        [str(gunicorn), "examples.aiohttp_app:app_factory", "--worker-class",
         "aiohttp.GunicornUVLoopWebWorker", "-w", "2", "-b", f"127.0.0.1:{port}",
         "--graceful-timeout", "5", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_health(base)
        for _ in range(3):  # several connections: both workers answer the same way
            asyncio.run(_exercise(base, pooled == "1"))
    finally:
        rc = _stop(proc, signal.SIGTERM)
    assert rc == 0, proc.stderr.read() if proc.stderr else ""


def test_app_factory_reads_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.aiohttp_app import app_factory

    monkeypatch.setenv("BUFPOOL_APP_POOLED", "0")
    plain = asyncio.run(app_factory())
    assert bpa.POOL_KEY not in plain
    monkeypatch.setenv("BUFPOOL_APP_POOLED", "1")
    pooled = asyncio.run(app_factory())
    assert isinstance(pooled, web.Application) and bpa.POOL_KEY in pooled
