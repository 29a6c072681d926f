"""The zero-copy receive switch under the entry points users run: gunicorn's aiohttp workers
(plain and uvloop) and ``web.run_app``, each in a subprocess serving ``tests/_fastpath_app``;
the worker that answered reports the fast path active and the body arrives exact."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def digest(body: bytes) -> dict[str, Any]:
    return {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def _serve_and_check(cmd: list[str], port: int) -> None:
    """Start ``cmd`` (serving tests._fastpath_app on ``port``), upload through it, and check
    the worker that answered ran the fast path."""
    root = ROOT
    proc = subprocess.Popen(cmd, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/receive", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("server never came up") from None
                time.sleep(0.1)  # polling a subprocess's startup, not a correctness wait
        body = bytes(range(256)) * 4000
        req = urllib.request.Request(f"{base}/upload", data=body, method="POST")
        got = json.loads(urllib.request.urlopen(req, timeout=10).read())
        assert got == digest(body)
        state = json.loads(urllib.request.urlopen(f"{base}/receive", timeout=10).read())
        assert state["active"] is True, state
    finally:
        proc.send_signal(signal.SIGTERM if "gunicorn" in cmd[0] else signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("worker", ["GunicornWebWorker", "GunicornUVLoopWebWorker"])
def test_switch_works_under_gunicorn_workers(worker: str) -> None:
    port = _free_port()
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    _serve_and_check([gunicorn, "tests._fastpath_app:app_factory", "--worker-class",
                      f"aiohttp.{worker}", "-w", "1", "-b", f"127.0.0.1:{port}",
                      "--log-level", "warning"], port)


def test_switch_works_under_web_run_app() -> None:
    port = _free_port()
    code = ("from aiohttp import web\nfrom tests._fastpath_app import create_app\n"
            f"web.run_app(create_app(), host='127.0.0.1', port={port}, print=None)\n")
    _serve_and_check([sys.executable, "-c", code], port)
