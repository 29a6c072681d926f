"""Servers the harness starts: the embedded example app, gunicorn, the SNI proxy.

Supports: starting a server as a subprocess, waiting for its "listening on" line (or gunicorn's
"Listening at:" log line) and for ``GET /health``, and stopping it cleanly.  Goals: no
orphans.  Each server runs in its own session (so the terminal's Ctrl-C reaches only the
harness, which then stops servers in order), is stopped with SIGTERM to its whole process
group, then SIGKILL after a grace period, and on Linux also receives SIGTERM if the harness
dies without cleaning up (``PR_SET_PDEATHSIG``).

The example lives in ``examples/`` of the source tree, which is not an installed package: it
is found next to the ``bufpool`` package (source checkout or editable install) or under the
current directory, and started by path; gunicorn imports it as ``examples.aiohttp_app`` with
the repository root on its Python path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from ssl import SSLContext
from typing import IO, Final

import bufpool

__all__ = ["ServerError", "ServerProcess", "find_example"]

_LISTENING: Final = re.compile(r"listening on (?:(https?)://)?\[?([^\s\]]+?)\]?:(\d+)\s*$")
_GUNICORN: Final = re.compile(r"Listening at: (https?)://\[?([^\s\]]+?)\]?:(\d+)")


class ServerError(RuntimeError):
    """A server failed to start, or died while it was needed."""


def find_example(name: str = "aiohttp_app.py") -> Path:
    """Path of ``examples/<name>``: next to the bufpool package, else under the current dir."""
    here = Path(bufpool.__file__).resolve().parent.parent
    for root in (here, Path.cwd()):
        path = root / "examples" / name
        if path.is_file():
            return path
    raise ServerError(
        f"examples/{name} not found next to the bufpool package ({here}) or in the current "
        f"directory ({Path.cwd()}); run from a source checkout or pass --url"
    )


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the harness dies, else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return preexec


class ServerProcess:
    """One server subprocess.  ``await start()`` -> its base URL; ``await stop()``.

    ``stdout`` and ``stderr`` are drained by threads into the last 200 lines each
    (``output_tail()``), so a chatty server never blocks on a full pipe.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        gunicorn: bool = False,
        health_path: str | None = "/health",
        ssl_context: SSLContext | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.gunicorn = gunicorn
        self.health_path = health_path
        self.ssl_context = ssl_context
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.host = ""
        self.port = 0
        self._lines: deque[str] = deque(maxlen=200)
        self._ready = threading.Event()
        self._match: re.Match[str] | None = None
        self._threads: list[threading.Thread] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output_tail(self, n: int = 20) -> str:
        return "\n".join(list(self._lines)[-n:])

    def _drain(self, stream: IO[bytes], pattern: re.Pattern[str] | None) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self._lines.append(line)
            if pattern is not None and not self._ready.is_set():
                m = pattern.search(line)
                if m is not None:
                    self._match = m
                    self._ready.set()
        stream.close()

    async def start(self, timeout: float = 30.0) -> str:
        """Start and wait until it listens (and answers ``health_path``); returns the URL."""
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out_pat, err_pat = (None, _GUNICORN) if self.gunicorn else (_LISTENING, None)
        for stream, pat in ((self.proc.stdout, out_pat), (self.proc.stderr, err_pat)):
            t = threading.Thread(target=self._drain, args=(stream, pat), daemon=True)
            t.start()
            self._threads.append(t)
        deadline = time.monotonic() + timeout
        try:
            while not self._ready.is_set():
                if self.proc.poll() is not None:
                    await asyncio.sleep(0.05)  # let the drain threads catch the last lines
                    raise ServerError(
                        f"{self.name} exited with code {self.proc.returncode} before listening:"
                        f"\n{self.output_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"{self.name} did not print its listening line within {timeout:.0f} s:"
                        f"\n{self.output_tail()}"
                    )
                await asyncio.sleep(0.02)
            m = self._match
            assert m is not None
            scheme = m.group(1) or ("https" if self.ssl_context else "http")
            self.host, self.port = m.group(2), int(m.group(3))
            self.url = f"{scheme}://{self.host}:{self.port}"
            if self.health_path is not None:
                await self._wait_healthy(deadline)
        except BaseException:
            await self.stop()
            raise
        return self.url

    async def _wait_healthy(self, deadline: float) -> None:
        url = self.url + (self.health_path or "/")
        while True:
            ok = await asyncio.to_thread(_get_ok, url, self.ssl_context)
            if ok:
                return
            if not self.alive():
                raise ServerError(f"{self.name} exited while starting:\n{self.output_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name} never answered {url}:\n{self.output_tail()}")
            await asyncio.sleep(0.1)

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; returns the code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        # Whatever is left of the group (gunicorn workers, a stuck server) goes now.
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        code = await asyncio.to_thread(proc.wait)
        for t in self._threads:
            t.join(timeout=1.0)
        return code


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _get_ok(url: str, ssl_context: SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0, context=ssl_context) as resp:
            status: int = resp.status
            return 200 <= status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False
