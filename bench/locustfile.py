"""Locust scenarios of the harness (steady, flood, abuse), for load from more than one machine.

Against the example app (``examples/aiohttp_app.py``) or any server with the same endpoints.
Pick the scenario with ``BUFPOOL_SCENARIO`` (default ``steady``); tune with environment
variables, sizes in the harness's syntax (``16k``, ``8m``):

steady  ``POST /process?reply=R`` with bodies from a weighted mix, closed loop.
    BUFPOOL_MIX="1k:1,16k:1,256k:1"   body sizes and weights
    BUFPOOL_REPLY=4096                reply size in bytes
    BUFPOOL_WAIT=0                    seconds each user waits between requests
flood   every user uploads one ``BUFPOOL_FLOOD_BODY`` body (default 8m) to ``/process`` at
    once (spawn them all in the first second: ``-u 96 -r 96``), then stays idle.
abuse   legitimate users send the steady mix while ``BUFPOOL_ATTACKERS`` (default 16, per load
    process) connections of each kind attack: ``stall`` (a head declaring
    ``BUFPOOL_ATTACK_BODY`` bytes, default 8m, then nothing), ``trickle`` (the same head, then
    1 byte per 100 ms), ``no-read`` (``GET /bytes/BUFPOOL_ATTACK_BODY``, 4 KiB receive buffer,
    never read).  ``-u`` counts all users; the attackers are taken from it first.

Commands (docs/loadtest.md has more)::

    BUFPOOL_SCENARIO=flood locust -f bench/locustfile.py --headless -u 96 -r 96 -t 20s \\
        --host http://SERVER:8080
    BUFPOOL_SCENARIO=abuse locust -f bench/locustfile.py --headless -u 64 -r 64 -t 30s \\
        --host http://SERVER:8080
    # distributed: add --master --expect-workers N here, and on each load machine
    BUFPOOL_SCENARIO=abuse locust -f bench/locustfile.py --worker --master-host MASTER

Attackers report to Locust's statistics as request type ``ATTACK``: one entry per kind and
outcome (``stall cut off: HTTP 408``, ``trickle cut off: reset``, ``no-read still open``),
with the seconds until the cut-off as the "response time" (in ms).  A non-reader only sees a
reset: a graceful close stays behind the reply bytes it never reads (the harness, which can see
the server's sockets, counts those too).  Locust does not correct for coordinated omission and
does not sample the server's memory; watch the server's RSS yourself (or use the harness on
one machine).  Locust is an optional extra (``pip install locust``).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from typing import ClassVar
from urllib.parse import urlsplit

from locust import FastHttpUser, User, constant, events, task
from locust.exception import StopUser

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if m is None:
        raise ValueError(f"bad size {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _mix(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        size, _, weight = part.partition(":")
        out.append((_size(size), int(weight or 1)))
    return out


SCENARIO = os.environ.get("BUFPOOL_SCENARIO", "steady").strip().lower()
if SCENARIO not in ("steady", "flood", "abuse"):
    raise ValueError(f"BUFPOOL_SCENARIO must be steady, flood or abuse, got {SCENARIO!r}")
MIX = _mix(os.environ.get("BUFPOOL_MIX", "1k:1,16k:1,256k:1"))
REPLY = int(os.environ.get("BUFPOOL_REPLY", "4096"))
FLOOD_BODY = _size(os.environ.get("BUFPOOL_FLOOD_BODY", "8m"))
ATTACKERS = int(os.environ.get("BUFPOOL_ATTACKERS", "16"))
ATTACK_BODY = _size(os.environ.get("BUFPOOL_ATTACK_BODY", "8m"))
PATTERN = bytes(range(33, 127)) * (max(size for size, _ in MIX) // 94 + 1)
BODIES = [(PATTERN[:size], weight) for size, weight in MIX]


def _make_task(body: bytes) -> Callable[[FastHttpUser], None]:
    def send(user: FastHttpUser) -> None:
        user.client.post(
            f"/process?reply={REPLY}",
            data=body,
            headers={"Content-Type": "application/octet-stream"},
            name=f"/process body={len(body)}",
        )

    return send


class PoolUser(FastHttpUser):
    """steady (and abuse's legitimate side): one keep-alive connection sending the mix."""

    abstract = SCENARIO == "flood"
    wait_time = constant(float(os.environ.get("BUFPOOL_WAIT", "0")))
    tasks: ClassVar[dict[Callable[[FastHttpUser], None], int]] = {
        _make_task(body): weight for body, weight in BODIES
    }


class FloodUser(FastHttpUser):
    """flood: one large upload, then idle until the run ends."""

    abstract = SCENARIO != "flood"
    wait_time = constant(3600)
    body = b"x" * FLOOD_BODY if SCENARIO == "flood" else b""

    @task
    def upload(self) -> None:
        if getattr(self, "done", False):
            return
        self.done = True
        self.client.post(
            f"/process?reply={REPLY}",
            data=self.body,
            headers={"Content-Type": "application/octet-stream"},
            name=f"flood /process body={FLOOD_BODY}",
        )


#: Attackers not cut off yet; reported as "still open" when the test starts stopping (before
#: Locust writes its statistics).
LIVE: set[_Attacker] = set()


@events.test_stopping.add_listener
def _report_still_open(**_kwargs: object) -> None:
    for attacker in list(LIVE):
        attacker.report_open()


class _Attacker(User):
    """One attacking connection (raw socket; gevent makes it cooperative)."""

    abstract = True
    kind = ""
    fixed_count = ATTACKERS if SCENARIO == "abuse" else 0
    wait_time = constant(0)

    def on_start(self) -> None:
        parts = urlsplit(self.host or "http://127.0.0.1")
        self.addr = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.kind == "no-read":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(self.addr)
        netloc = f"{self.addr[0]}:{self.addr[1]}"
        if self.kind == "no-read":
            head = f"GET /bytes/{ATTACK_BODY} HTTP/1.1\r\nHost: {netloc}\r\n\r\n"
        else:
            head = (
                f"POST /process HTTP/1.1\r\nHost: {netloc}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {ATTACK_BODY}\r\n\r\n"
            )
        self.sock.sendall(head.encode("latin-1"))
        self.started = time.monotonic()
        self.outcome = ""
        LIVE.add(self)

    def _fire(self, outcome: str) -> None:
        LIVE.discard(self)
        self.outcome = outcome
        self.environment.events.request.fire(
            request_type="ATTACK",
            name=f"{self.kind} {outcome}",
            response_time=(time.monotonic() - self.started) * 1000,
            response_length=0,
            exception=None,
            context={},
        )
        self.sock.close()

    def report_open(self) -> None:
        if not self.outcome:
            self._fire("still open")

    def _report(self, outcome: str) -> None:
        if not self.outcome:  # else already reported (e.g. "still open" at the stop)
            self._fire(outcome)
        raise StopUser()

    def _look(self, peek: bool) -> None:
        """Wait up to 100 ms for the server: a reply, a close or a reset ends this attacker."""
        self.sock.settimeout(0.1)
        try:
            data = self.sock.recv(64, socket.MSG_PEEK if peek else 0)
        except TimeoutError:
            return
        except OSError:
            self._report("cut off: reset")
            return
        if peek and data:
            return  # reply bytes are arriving; a non-reader leaves them there
        m = _STATUS.match(data)
        self._report(f"cut off: HTTP {m.group(1).decode()}" if m else "cut off: closed")

    def on_stop(self) -> None:
        self.report_open()


class StallUser(_Attacker):
    abstract = SCENARIO != "abuse"
    kind = "stall"

    @task
    def stall(self) -> None:
        self._look(peek=False)


class TrickleUser(_Attacker):
    abstract = SCENARIO != "abuse"
    kind = "trickle"

    @task
    def trickle(self) -> None:
        try:
            self.sock.sendall(b"x")
        except OSError:
            self._report("cut off: reset")
        self._look(peek=False)


class NoReadUser(_Attacker):
    abstract = SCENARIO != "abuse"
    kind = "no-read"

    @task
    def hold(self) -> None:
        self._look(peek=True)
        time.sleep(0.1)  # peeking returns at once while reply bytes wait unread
