"""The ``abuse`` scenario's load: legitimate traffic while cheap attackers hold connections.

Attackers (each its own connection, ``per_kind`` of each kind):

* ``stall``   -- sends a request head declaring a ``declared``-byte body, then nothing.
* ``trickle`` -- the same head, then one body byte every 100 ms.
* ``no-read`` -- asks for a large reply (``GET read_path``, e.g. ``/bytes/8388608``) with a
  4 KiB receive buffer and never reads it.

Legitimate traffic is the steady mix from the normal load generator on its own connections.
The two are counted apart: the legitimate side is a ``LoadResult``; each attacker records when
the server cut it off (seconds since its head was sent) and how -- ``HTTP 408`` (any status the
server answered), ``closed`` (FIN without a reply), ``reset`` -- or stays ``open`` to the end.

Cut-offs are noticed by one task that looks at every attacker socket each 50 ms (non-blocking
``recv`` for the two that read, ``poll`` for ``POLLRDHUP``/``POLLERR`` for the one that must
not read): time resolution 50 ms, cost O(attackers) per tick.  A non-reader cannot see a
graceful close (the FIN waits behind reply bytes it never takes, and asyncio's ``abort()`` is a
plain ``close()``, no RST), so when the server's pid is known its sockets are also listed
(psutil, every 200 ms): a non-reader whose server-side socket the server process was seen
holding and no longer holds counts as ``closed`` (one never accepted stays ``open``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import psutil

from ._metrics import LoadResult

__all__ = ["ATTACK_KINDS", "AbuseResult", "Attacker", "AttackCrew", "pinned_bytes"]

ATTACK_KINDS: Final = ("stall", "trickle", "no-read")
_TICK: Final = 0.05
_TRICKLE_EVERY: Final = 0.1
_STATUS: Final = re.compile(rb"HTTP/1\.[01] (\d{3})")
_POLL_GONE: Final = getattr(select, "POLLRDHUP", 0) | select.POLLERR | select.POLLHUP


@dataclass
class Attacker:
    """One attacker connection and what became of it.  Times in seconds since its head."""

    kind: str
    sock: socket.socket | None = None
    started: float = 0.0
    cut_s: float | None = None
    how: str = "open"
    sent: int = 0
    next_byte: float = 0.0
    seen: bytes = b""
    port: int = 0  #: our local port: the server's peer port for this connection
    held: bool = False  #: the server process was seen holding this connection's socket

    def cut(self, how: str, now: float) -> None:
        if self.cut_s is None:
            self.cut_s = round(now - self.started, 3)
            self.how = how
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "cut_s": self.cut_s, "how": self.how, "sent": self.sent}


def pinned_bytes(stats: dict[str, Any] | None) -> int | None:
    """Bytes of pool slots held by live leases, from a stats-endpoint dict (None: no pool)."""
    if not stats or not isinstance(stats.get("tiers"), list):
        return None
    return sum(
        int(t.get("in_use", 0)) * int(t.get("slot_size", t.get("size", 0))) for t in stats["tiers"]
    )


class AttackCrew:
    """``per_kind`` attackers of each kind against ``host:port``; ``start`` then ``stop``."""

    def __init__(
        self,
        host: str,
        port: int,
        per_kind: int,
        *,
        declared: int,
        post_path: str = "/process",
        read_path: str = "/bytes/8388608",
        server_pid: int | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.declared = declared
        self.post_path, self.read_path = post_path, read_path
        self.attackers = [Attacker(kind) for kind in ATTACK_KINDS for _ in range(per_kind)]
        self._task: asyncio.Task[None] | None = None
        self._poll = select.poll()
        self._by_fd: dict[int, Attacker] = {}
        self._server = psutil.Process(server_pid) if server_pid else None
        self._ticks = 0
        self._connect_error = ""

    def _head(self, kind: str) -> bytes:
        host = f"Host: {self.host}:{self.port}\r\nUser-Agent: bufpool-loadtest-attacker\r\n"
        if kind == "no-read":
            return f"GET {self.read_path} HTTP/1.1\r\n{host}\r\n".encode("latin-1")
        return (
            f"POST {self.post_path} HTTP/1.1\r\n{host}Content-Type: application/octet-stream\r\n"
            f"Content-Length: {self.declared}\r\n\r\n"
        ).encode("latin-1")

    async def _open(self, a: Attacker) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if a.kind == "no-read":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            await loop.sock_connect(sock, (self.host, self.port))
            await loop.sock_sendall(sock, self._head(a.kind))
        except OSError as exc:
            sock.close()
            a.how = "connect failed"
            a.cut_s = 0.0
            self._connect_error = exc.strerror or str(exc)
            return
        a.sock = sock
        a.port = sock.getsockname()[1]
        a.started = time.monotonic()
        a.next_byte = a.started + _TRICKLE_EVERY
        if a.kind == "no-read":
            self._poll.register(sock.fileno(), _POLL_GONE)
            self._by_fd[sock.fileno()] = a

    async def start(self) -> None:
        """Connect every attacker and send its head; then watch them until ``stop``."""
        await asyncio.gather(*(self._open(a) for a in self.attackers))
        if self.attackers and all(a.how == "connect failed" for a in self.attackers):
            raise ConnectionError(
                f"cannot connect to {self.host}:{self.port}: {self._connect_error}"
            )
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            self.check()

    def check(self) -> None:
        """One look at every live attacker (also called once more by ``stop``)."""
        now = time.monotonic()
        for fd, events in self._poll.poll(0):
            a = self._by_fd.pop(fd, None)
            if a is None:
                continue
            self._poll.unregister(fd)
            a.cut("reset" if events & (select.POLLERR | select.POLLHUP) else "closed", now)
        self._ticks += 1
        if self._server is not None and self._by_fd and self._ticks % 4 == 0:
            held = self._server_peer_ports()
            if held is not None:
                for fd, a in list(self._by_fd.items()):
                    if a.port in held:
                        a.held = True
                    elif a.held:  # accepted, then let go (not: still in the listen backlog)
                        self._poll.unregister(fd)
                        del self._by_fd[fd]
                        a.cut("closed", now)
        for a in self.attackers:
            if a.sock is None or a.kind == "no-read":
                continue
            try:
                data = a.sock.recv(4096)
            except BlockingIOError:
                data = None
            except OSError:
                a.cut("reset", now)
                continue
            if data == b"":
                m = _STATUS.match(a.seen)
                a.cut(f"HTTP {m.group(1).decode()}" if m else "closed", now)
                continue
            if data:
                a.seen = (a.seen + data)[:64]
                m = _STATUS.match(a.seen)
                if m is not None:
                    a.cut(f"HTTP {m.group(1).decode()}", now)
                    continue
            if a.kind == "trickle" and now >= a.next_byte and a.sent < self.declared:
                try:
                    a.sent += a.sock.send(b"x")
                except BlockingIOError:
                    pass
                except OSError:
                    a.cut("reset", now)
                    continue
                a.next_byte = now + _TRICKLE_EVERY

    def _server_peer_ports(self) -> set[int] | None:
        """Peer ports of every TCP socket the server's process tree holds (None: unknown)."""
        assert self._server is not None
        try:
            procs = [self._server, *self._server.children(recursive=True)]
        except psutil.Error:
            return None
        ports: set[int] = set()
        for proc in procs:
            # psutil >= 6 names it net_connections; 5.9 (our floor) only has connections.
            listing = getattr(proc, "net_connections", None) or proc.connections
            try:
                conns = listing("tcp")
            except psutil.Error:
                continue
            ports.update(c.raddr.port for c in conns if c.raddr)
        return ports

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.check()
        for a in self.attackers:
            if a.sock is not None:
                if a.kind == "no-read":
                    with contextlib.suppress(KeyError, ValueError):
                        self._poll.unregister(a.sock.fileno())
                a.sock.close()
                a.sock = None
        self._by_fd.clear()


@dataclass
class AbuseResult:
    """One abuse run against one server."""

    duration_s: float = 0.0
    legit: LoadResult = field(default_factory=LoadResult)
    attackers: list[Attacker] = field(default_factory=list)
    #: (seconds since the attack began, pinned bytes, reserved bytes) from the stats endpoint.
    pool: list[tuple[float, int, int]] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    rss_peak: int = 0

    @property
    def legit_ok(self) -> int:
        st = self.legit.status
        return sum(n for s, n in st.items() if 200 <= s < 300)

    @property
    def legit_total(self) -> int:
        """Legitimate requests that ended (any status, or an error), in the run or late."""
        return sum(self.legit.status.values()) + sum(self.legit.errors.values())

    @property
    def legit_success(self) -> float:
        return self.legit_ok / self.legit_total if self.legit_total else 0.0

    def cut_off(self) -> Counter[str]:
        """Attackers by outcome (``HTTP 408``, ``reset``, ``closed``, ``open``)."""
        return Counter(a.how for a in self.attackers)

    @property
    def pinned_peak(self) -> int | None:
        return max((p for _, p, _ in self.pool), default=None) if self.pool else None


async def sample_pool(
    scrape: Callable[[], Awaitable[dict[str, Any] | None]],
    t0: float,
    out: list[tuple[float, int, int]],
    interval: float = 0.2,
) -> None:
    """Append (seconds since ``t0``, pinned, reserved bytes) every ``interval`` until cancelled."""
    while True:
        stats = await scrape()
        pinned = pinned_bytes(stats)
        if stats is not None and pinned is not None:
            out.append(
                (round(time.monotonic() - t0, 3), pinned, int(stats.get("reserved_bytes", 0)))
            )
        await asyncio.sleep(interval)
