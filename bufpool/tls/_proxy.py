"""SNIProxy: a TLS passthrough proxy that routes by SNI, decrypting nothing.  Floor 3.

For each accepted client: read records until the ClientHello is complete (it may span records
and reads), pick the upstream by its server_name, connect, replay the ClientHello records, then
forward both directions record by record (each record copied once into a pooled lease and sent
with ``write_lease``).

Supports: deadlines (ClientHello, upstream connect, idle tunnel, half-closed tunnel, each in
:class:`ProxyLimits`), a connection cap refused with a fatal ``internal_error`` alert, TCP
half-close passed through both ways, write backpressure (a side whose transport is full pauses
reading on the other), one ``logging`` line per finished connection (logger
``bufpool.tls.proxy``) and counters in Prometheus text (:meth:`SNIProxy.metrics_text`,
:meth:`SNIProxy.start_metrics`).

Memory per connection (bytes of pool memory): the receive ring starts at
``limits.initial_buffer`` (1 KiB) and doubles only when a read finds it full, up to
``limits.max_buffer`` (64 KiB); the ClientHello records are held, packed back to back in
pooled leases of at least :data:`HOLD_CHUNK` bytes (pool memory about the wire bytes held, however
finely the hello is split into records; at most ``limits.max_client_hello`` handshake bytes)
until the upstream accepts.  A side that sent EOF gives its
ring back at once; every deadline that closes a connection gives all of its memory back at once.

Lifetimes: a connection's pooled memory lives from accept to the ``connection_lost`` of both
of its transports; forwarded records sit in quarantine until their transport has sent them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, cast

from bufpool import BufferPool, Lease, RingBuffer
from bufpool.aio import write_lease

from ._client_hello import ClientHelloCollector
from ._errors import AlertDescription, NotTLSError, TLSRecordError, alert_record
from ._protocol import TLSRecordProtocol
from ._records import TLSRecord
from ._splitter import MIN_RING_CAPACITY, RECORD_POOL_CLASSES

__all__ = [
    "CLOSE_REASONS",
    "ConnectionSummary",
    "ProxyLimits",
    "ProxyStats",
    "Route",
    "RouteTable",
    "SNIProxy",
    "normalize_name",
]

logger = logging.getLogger("bufpool.tls.proxy")

Route = tuple[str, int]

#: Seconds a client has from accept to a complete ClientHello (nginx ``preread_timeout``
#: defaults to 30 s, Envoy's listener filter timeout to 15 s; a real client sends its hello
#: in the first round trip).
DEFAULT_HELLO_TIMEOUT: Final = 10.0
#: Seconds an upstream has to accept the TCP connection.
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: Seconds an established tunnel may carry nothing either way (Envoy's tcp_proxy
#: ``idle_timeout`` defaults to 1 hour).  None: no idle limit.
DEFAULT_IDLE_TIMEOUT: Final = 3600.0
#: Seconds a half-closed tunnel (one side sent EOF) may carry nothing in the direction still
#: open, and seconds a closing connection may take to flush (HAProxy ``timeout client-fin``).
DEFAULT_HALF_CLOSE_TIMEOUT: Final = 30.0
#: Seconds without a read after which an established tunnel's rings (grown by a burst) shrink
#: back to ``initial_buffer``; also the window in which a side that forwarded fewer than
#: ``initial_buffer`` bytes shrinks its ring (a trickle cannot keep a grown ring).  None: never.
DEFAULT_SHRINK_AFTER: Final = 5.0
#: Client connections open at once (each also holds an upstream connection: two sockets).
DEFAULT_MAX_CONNECTIONS: Final = 1024
#: Seconds a refused (over-capacity) client may take to close after our alert.
REFUSAL_LINGER: Final = 1.0
#: Largest ClientHello accepted, bytes (nginx ``preread_buffer_size`` is 16k).
DEFAULT_MAX_CLIENT_HELLO: Final = 16384
#: First ring size per connection side, bytes (a TLS 1.3 OpenSSL ClientHello is 517 bytes).
DEFAULT_INITIAL_BUFFER: Final = 1024
#: Largest ring per connection side, bytes.
DEFAULT_MAX_BUFFER: Final = 65536
#: Smallest pooled lease the records before the tunnel are packed into, bytes: a ClientHello
#: split into 1-byte handshake records (6 wire bytes each) costs its wire bytes, not a 64-byte
#: slot and two objects per record.
HOLD_CHUNK: Final = 512
#: Records shorter than this (bytes) are packed with the other small records of the same read
#: into one pooled lease of at most PACK_LIMIT bytes before being forwarded: a write queue
#: (asyncio 3.12+ and uvloop keep the written views) then holds one slot per read, not a
#: 64-byte slot and a memoryview per 6-byte record.
PACK_BELOW: Final = 512
PACK_LIMIT: Final = 16384

HTTP_REFUSAL: Final = (
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 53\r\n\r\nThis port expects TLS; plaintext HTTP is not served.\n"
)

#: Why a connection ended (the ``close`` field of the log line, the ``reason`` label).
CLOSE_REASONS: Final = {
    "eof": "both sides finished (EOF each way)",
    "client_closed": "the client's connection ended or was reset",
    "upstream_closed": "the upstream's connection ended or was reset",
    "hello_timeout": "no complete ClientHello within hello_timeout (closed, no alert fits)",
    "unknown_name": "no route for the SNI name, or no SNI (alert unrecognized_name)",
    "bad_hello": "malformed TLS before the tunnel (the alert the error names)",
    "plaintext_http": "an HTTP request on the TLS port (400 Bad Request)",
    "connect_failed": "the upstream refused or was unreachable (alert internal_error)",
    "connect_timeout": "the upstream did not accept within connect_timeout (internal_error)",
    "over_capacity": "max_connections were open (alert internal_error)",
    "idle_timeout": "the tunnel carried nothing for idle_timeout (both sides aborted)",
    "half_close_timeout": "half-closed and silent for half_close_timeout (both aborted)",
    "bad_record": "a side sent bytes that are not TLS records mid-tunnel (both closed)",
    "shutdown": "the proxy was closed",
}

Reason = Literal[
    "eof", "client_closed", "upstream_closed", "hello_timeout", "unknown_name", "bad_hello",
    "plaintext_http", "connect_failed", "connect_timeout", "over_capacity", "idle_timeout",
    "half_close_timeout", "bad_record", "shutdown",
]


def normalize_name(name: str) -> str:
    """Route-table form of a DNS name: ASCII lowercase, one trailing dot dropped."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


class RouteTable:
    """Server name -> upstream (host, port).

    Matching: names compare ASCII case-insensitively and a trailing dot is ignored
    (``Example.COM.`` matches ``example.com``).  A ``*.example.com`` entry matches exactly one
    more label (``a.example.com``; not ``example.com``, not ``a.b.example.com``), as in
    certificate wildcards (RFC 6125 section 6.4.3); an exact entry wins over a wildcard.
    A missing or unknown name has no route.
    """

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self._exact: dict[str, Route] = {}
        self._wild: dict[str, Route] = {}
        for name, target in routes.items():
            key = normalize_name(name)
            if key.startswith("*."):
                self._wild[key[2:]] = target
            elif "*" in key or not key:
                raise ValueError(f"route name {name!r}: only a leading '*.' label is supported")
            else:
                self._exact[key] = target

    def lookup(self, name: str | None) -> Route | None:
        if not name:
            return None
        key = normalize_name(name)
        hit = self._exact.get(key)
        if hit is None and self._wild:
            _, dot, parent = key.partition(".")
            if dot:
                hit = self._wild.get(parent)
        return hit

    def __len__(self) -> int:
        return len(self._exact) + len(self._wild)


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Deadlines (seconds; None = no limit), the connection cap and buffer sizes (bytes)."""

    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    half_close_timeout: float = DEFAULT_HALF_CLOSE_TIMEOUT
    shrink_after: float | None = DEFAULT_SHRINK_AFTER
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    max_client_hello: int = DEFAULT_MAX_CLIENT_HELLO
    initial_buffer: int = DEFAULT_INITIAL_BUFFER
    max_buffer: int = DEFAULT_MAX_BUFFER

    def __post_init__(self) -> None:
        for name in ("hello_timeout", "connect_timeout", "half_close_timeout", "idle_timeout",
                     "shrink_after"):
            value = getattr(self, name)
            if value is None and name in ("idle_timeout", "shrink_after"):
                continue
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_client_hello < 64:
            raise ValueError(f"max_client_hello must be >= 64 bytes, got {self.max_client_hello}")
        if self.max_buffer < MIN_RING_CAPACITY:
            raise ValueError(
                f"max_buffer must be at least {MIN_RING_CAPACITY} bytes (two maximal records), "
                f"got {self.max_buffer}"
            )
        if not 0 < self.initial_buffer <= self.max_buffer:
            raise ValueError(
                f"initial_buffer ({self.initial_buffer} bytes) must be within "
                f"1..max_buffer ({self.max_buffer} bytes)"
            )


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    """One finished connection: the fields of its log line (bytes, seconds)."""

    client: str
    server_name: str | None
    upstream: str | None
    bytes_up: int  #: client -> upstream
    bytes_down: int  #: upstream -> client
    duration: float
    reason: str
    alert: str | None  #: the fatal alert sent to the client, "http_400", or None
    #: What went wrong, naming the limit or the fault (None for ordinary closes).
    detail: str | None = None

    def line(self) -> str:
        text = (
            f"client={self.client} sni={self.server_name or '-'} "
            f"upstream={self.upstream or '-'} up={self.bytes_up} down={self.bytes_down} "
            f"duration={self.duration:.3f}s close={self.reason} alert={self.alert or '-'}"
        )
        return text if self.detail is None else f"{text} detail={self.detail!r}"


class ProxyStats:
    """Counters since the proxy started (bytes, connections)."""

    def __init__(self) -> None:
        self.accepted = 0  #: client connections accepted (refused ones included)
        self.open = 0  #: client connections open now
        self.tunnels_open = 0  #: of those, with an upstream connected
        self.bytes_up = 0  #: client -> upstream, forwarded
        self.bytes_down = 0  #: upstream -> client, forwarded
        self.closed: Counter[str] = Counter()  #: finished connections by reason
        self.refusals: Counter[str] = Counter()  #: refusals by alert sent

    def prometheus(self, prefix: str = "bufpool_proxy") -> str:
        """Prometheus text exposition (0.0.4) of the counters."""
        out = [
            f"# HELP {prefix}_connections_open Client connections open",
            f"# TYPE {prefix}_connections_open gauge",
            f"{prefix}_connections_open {self.open}",
            f"# HELP {prefix}_tunnels_open Client connections with an upstream connected",
            f"# TYPE {prefix}_tunnels_open gauge",
            f"{prefix}_tunnels_open {self.tunnels_open}",
            f"# HELP {prefix}_connections_total Client connections accepted",
            f"# TYPE {prefix}_connections_total counter",
            f"{prefix}_connections_total {self.accepted}",
            f"# HELP {prefix}_bytes_total Bytes forwarded",
            f"# TYPE {prefix}_bytes_total counter",
            f'{prefix}_bytes_total{{direction="up"}} {self.bytes_up}',
            f'{prefix}_bytes_total{{direction="down"}} {self.bytes_down}',
            f"# HELP {prefix}_refusals_total Clients refused, by the alert sent",
            f"# TYPE {prefix}_refusals_total counter",
        ]
        out += [f'{prefix}_refusals_total{{alert="{k}"}} {v}'
                for k, v in sorted(self.refusals.items())]
        out += [f"# HELP {prefix}_closed_total Finished connections, by close reason",
                f"# TYPE {prefix}_closed_total counter"]
        out += [f'{prefix}_closed_total{{reason="{k}"}} {v}'
                for k, v in sorted(self.closed.items())]
        return "\n".join(out) + "\n"


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in str(host) else f"{host}:{peer[1]}"
    return str(peer) if peer else "-"


class _Tunnel:
    """One client connection and its upstream: state, deadlines, counters, the log line."""

    __slots__ = (
        "alert", "bytes_down", "bytes_up", "client", "client_addr", "connecting", "detail",
        "finished",
        "last", "loop", "phase", "proxy", "reason", "route", "server_name", "shrink_at",
        "shrink_mark", "shrunk",
        "started", "timer", "upstream",
    )

    def __init__(self, proxy: SNIProxy, loop: asyncio.AbstractEventLoop) -> None:
        self.proxy = proxy
        self.loop = loop
        self.client: ClientSide | None = None
        self.upstream: UpstreamSide | None = None
        self.client_addr = "-"
        self.server_name: str | None = None
        self.route: Route | None = None
        self.started = loop.time()
        self.last = self.started  # loop time of the last byte received on either side
        self.bytes_up = 0
        self.bytes_down = 0
        self.reason: Reason | None = None
        self.alert: str | None = None
        self.detail: str | None = None
        #: hello -> connecting -> open -> closing
        self.phase: Literal["hello", "connecting", "open", "closing"] = "hello"
        self.timer: asyncio.TimerHandle | None = None
        #: The upstream connect in progress (kept so it is not garbage-collected mid-way).
        self.connecting: asyncio.Task[None] | None = None
        self.finished = False
        self.shrunk = False  # rings shrunk since the last read
        self.shrink_at = 0.0  # loop time of the next trickle check
        self.shrink_mark = (0, 0)  # (bytes_up, bytes_down) at the last trickle check

    # ------------------------------------------------------------------ bookkeeping
    def end(self, reason: Reason, alert: str | None = None, detail: str | None = None) -> None:
        """Record why the connection ends (the first reason wins)."""
        if self.reason is None:
            self.reason = reason
            self.alert = alert
            self.detail = detail

    def arm(self, when: float, callback: Callable[[], None]) -> None:
        timer = self.timer
        if timer is not None:
            timer.cancel()
        self.timer = self.loop.call_at(when, callback)

    def disarm(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()

    def maybe_finish(self) -> None:
        if self.finished or self.connecting is not None:
            return
        client, up = self.client, self.upstream
        if (client is not None and client.transport is not None) or (
            up is not None and up.transport is not None
        ):
            return
        self.finished = True
        self.disarm()
        self.proxy._finished(self)

    # ------------------------------------------------------------------ deadlines
    def hello_deadline(self) -> None:
        self.timer = None
        client = self.client
        if self.phase != "hello" or client is None or client.transport is None:
            return
        self.end("hello_timeout", detail=f"no complete ClientHello within hello_timeout="
                 f"{self.proxy.limits.hello_timeout}s")
        client.drop()

    def activity_deadline(self) -> None:
        """Idle, half-closed too long, or quiet enough to shrink the rings?  Checked lazily:
        the timer re-arms for the next due time while bytes still move."""
        self.timer = None
        if self.phase != "open":
            return
        now = self.loop.time()
        limit = self.activity_limit()
        if limit is not None and now >= self.last + limit:
            if self.half_closed():
                self.end("half_close_timeout", detail=f"half-closed and nothing received for "
                         f"{limit}s")
            else:
                self.end("idle_timeout", detail=f"nothing received either way for "
                         f"idle_timeout={limit}s")
            self.abort_all()
            return
        shrink = self.proxy.limits.shrink_after
        if shrink is not None and not self.shrunk and now >= self.last + shrink:
            self.shrunk = True
            for side in (self.client, self.upstream):
                if side is not None:
                    side.shrink_ring()
        elif shrink is not None and not self.shrunk and now >= self.shrink_at:
            # reads keep coming: shrink each side that forwarded less than initial_buffer
            # bytes in the window (a trickle), so a burst's ring cannot be kept for 1 B/s
            floor = self.proxy.limits.initial_buffer
            up, down = self.shrink_mark
            if self.client is not None and self.bytes_up - up < floor:
                self.client.shrink_ring()
            if self.upstream is not None and self.bytes_down - down < floor:
                self.upstream.shrink_ring()
            self.start_shrink_window(now)
        self.watch_activity()

    def start_shrink_window(self, now: float) -> None:
        shrink = self.proxy.limits.shrink_after
        if shrink is not None:
            self.shrink_at = now + shrink
            self.shrink_mark = (self.bytes_up, self.bytes_down)

    def half_closed(self) -> bool:
        return (self.client is not None and self.client.eof_in) or (
            self.upstream is not None and self.upstream.eof_in)

    def activity_limit(self) -> float | None:
        limits = self.proxy.limits
        if self.half_closed():
            idle = limits.idle_timeout
            return limits.half_close_timeout if idle is None else min(
                idle, limits.half_close_timeout)
        return limits.idle_timeout

    def watch_activity(self) -> None:
        """Arm the timer for the next of: the idle/half-close deadline, the ring shrink."""
        if self.phase != "open":
            return  # closing has its own timer (the flush deadline)
        due = None
        limit = self.activity_limit()
        if limit is not None:
            due = self.last + limit
        shrink = self.proxy.limits.shrink_after
        if shrink is not None and not self.shrunk:
            check = min(self.last + shrink, self.shrink_at)
            due = check if due is None else min(due, check)
        if due is None:
            self.disarm()
        else:
            self.arm(due, self.activity_deadline)

    # ------------------------------------------------------------------ closing
    def close_all(self) -> None:
        """Close both sides after flushing what is queued; abort whatever is still open
        ``half_close_timeout`` seconds later (a peer that does not read cannot pin it)."""
        if self.phase == "closing":
            return
        self.phase = "closing"
        for side in (self.client, self.upstream):
            if side is not None:
                side.release_buffers()
                if side.transport is not None:
                    side.transport.close()
        self.arm(self.loop.time() + self.proxy.limits.half_close_timeout, self.abort_all)

    def abort_all(self) -> None:
        """Abort both sides now: queued bytes are dropped, all memory comes back."""
        self.phase = "closing"
        self.disarm()
        for side in (self.client, self.upstream):
            if side is not None:
                side.release_buffers()
                if side.transport is not None:
                    side.transport.abort()

    # ------------------------------------------------------------------ summary
    def summary(self) -> ConnectionSummary:
        route = self.route
        return ConnectionSummary(
            client=self.client_addr,
            server_name=self.server_name,
            upstream=f"{route[0]}:{route[1]}" if route is not None else None,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            duration=self.loop.time() - self.started,
            reason=self.reason or "client_closed",
            alert=self.alert,
            detail=self.detail,
        )


class _Side(TLSRecordProtocol):
    """Common forwarding: every record goes to the other side through a pooled lease; the
    small records of one read are packed into one lease (up to :data:`PACK_LIMIT` bytes)."""

    tunnel: _Tunnel
    eof_in = False  # the other end of our transport sent EOF
    #: The lease small records of the current read are packed into, and its bytes used.
    pack: Lease | None = None
    packed = 0

    def __init__(self, tunnel: _Tunnel) -> None:
        limits = tunnel.proxy.limits
        super().__init__(tunnel.proxy.pool, capacity=limits.max_buffer,
                         initial_capacity=limits.initial_buffer)
        self.tunnel = tunnel

    @property
    def peer(self) -> _Side | None:
        raise NotImplementedError

    def count(self, nbytes: int) -> None:
        raise NotImplementedError

    def data_available(self, ring: RingBuffer) -> None:
        tunnel = self.tunnel
        tunnel.last = tunnel.loop.time()
        if tunnel.shrunk:  # quiet no more: watch for the next quiet spell
            tunnel.shrunk = False
            tunnel.start_shrink_window(tunnel.last)
            tunnel.watch_activity()
        try:
            super().data_available(ring)
        finally:
            self.flush_pack()

    def forward(self, record: TLSRecord) -> None:
        peer = self.peer
        if self.tunnel.phase != "open" or peer is None or peer.transport is None:
            return
        raw = record.raw
        n = len(raw)
        self.count(n)
        if n >= PACK_BELOW:
            self.flush_pack()  # keep the order
            write_lease(peer.transport, record.detach().lease)
            return
        pack, used = self.pack, self.packed
        if pack is None or used + n > len(pack):
            self.flush_pack()
            ring = self._ring
            want = min(len(ring), PACK_LIMIT) if ring is not None else n
            pack = self.pack = self.tunnel.proxy.pool.acquire(max(n, want))
            used = 0
        pack.view[used:used + n] = raw
        self.packed = used + n

    def flush_pack(self) -> None:
        """Write the packed small records to the peer (at the end of each read)."""
        pack, used = self.pack, self.packed
        if pack is None:
            return
        self.pack = None
        self.packed = 0
        peer = self.peer
        try:
            if self.tunnel.phase == "open" and peer is not None and peer.transport is not None:
                peer.transport.write(pack.view[:used])
        finally:
            pack.release()  # the slot stays out of circulation while the write queue has it

    def pause_writing(self) -> None:  # our transport is full: stop reading from the peer
        peer = self.peer
        if peer is not None and not peer.eof_in:  # after EOF it reads nothing anyway
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.eof_in:  # its ring is gone: never read again
            peer.resume_reading()

    def eof_received(self) -> bool | None:
        super().eof_received()  # a stream that ends inside a record -> record_error
        self.eof_in = True
        tunnel = self.tunnel
        if self.error is not None or tunnel.phase != "open":
            return None
        self.release_buffers()  # nothing more will arrive on this side
        peer = self.peer
        if peer is None or peer.transport is None:
            return None
        if peer.eof_in or not peer.transport.can_write_eof():
            tunnel.end("eof")
            tunnel.close_all()  # both directions finished
            return True
        peer.transport.write_eof()
        tunnel.watch_activity()  # now bounded by half_close_timeout
        return True  # half-close: keep our write side open for the peer's remaining bytes

    def record_error(self, exc: TLSRecordError) -> None:
        side = "client" if isinstance(self, ClientSide) else "upstream"
        self.tunnel.end("bad_record", detail=f"{side}: {exc}")
        self.tunnel.close_all()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        tunnel = self.tunnel
        peer = self.peer
        if tunnel.phase != "closing" and peer is not None and peer.transport is not None:
            tunnel.end("client_closed" if isinstance(self, ClientSide) else "upstream_closed")
            tunnel.close_all()
        tunnel.maybe_finish()


class UpstreamSide(_Side):
    """The proxy's connection to the upstream chosen by SNI."""

    @property
    def peer(self) -> _Side | None:
        return self.tunnel.client

    def count(self, nbytes: int) -> None:
        self.tunnel.bytes_down += nbytes
        self.tunnel.proxy.stats.bytes_down += nbytes

    def record_received(self, record: TLSRecord) -> None:
        self.forward(record)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tunnel = self.tunnel
        client = tunnel.client
        if tunnel.phase == "closing" or client is None or client.transport is None:
            self.transport.abort()  # type: ignore[union-attr]  # the client left meanwhile


class ClientSide(_Side):
    """The accepted client connection."""

    def __init__(self, tunnel: _Tunnel) -> None:
        super().__init__(tunnel)
        tunnel.client = self
        self.collector: ClientHelloCollector | None = ClientHelloCollector(
            max_size=tunnel.proxy.limits.max_client_hello)
        #: Wire bytes received before the tunnel opened: (lease, bytes used), packed in order.
        self.held: list[tuple[Lease, int]] = []

    @property
    def peer(self) -> _Side | None:
        return self.tunnel.upstream

    def count(self, nbytes: int) -> None:
        self.tunnel.bytes_up += nbytes
        self.tunnel.proxy.stats.bytes_up += nbytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tunnel = self.tunnel
        tunnel.client_addr = _address(transport)
        tunnel.arm(tunnel.started + tunnel.proxy.limits.hello_timeout, tunnel.hello_deadline)

    def record_received(self, record: TLSRecord) -> None:
        tunnel = self.tunnel
        if tunnel.phase == "open":
            self.forward(record)
            return
        if tunnel.phase != "hello" and tunnel.phase != "connecting":
            return  # closing: ignore the rest of this read
        self.hold(record.raw)
        collector = self.collector
        if collector is None:  # connecting: hold records until the upstream is there
            return
        try:
            hello = collector.add(record)
        except TLSRecordError as exc:
            self.refuse("bad_hello", exc.alert, str(exc))
            return
        if hello is None:
            return
        self.collector = None
        tunnel.server_name = hello.server_name
        route = tunnel.proxy.routes.lookup(hello.server_name)
        if route is None:
            self.refuse("unknown_name", AlertDescription.unrecognized_name,
                        "no SNI in the ClientHello" if not hello.server_name
                        else f"no route for {hello.server_name!r}")
            return
        tunnel.route = route
        tunnel.phase = "connecting"
        tunnel.disarm()  # the connect has its own deadline
        self.pause_reading()
        tunnel.connecting = tunnel.loop.create_task(self.connect(route))

    async def connect(self, route: Route) -> None:
        tunnel = self.tunnel
        loop = tunnel.loop
        try:
            async with asyncio.timeout(tunnel.proxy.limits.connect_timeout):
                _, up = await loop.create_connection(lambda: UpstreamSide(tunnel), *route)
        except TimeoutError:
            tunnel.connecting = None
            self.refuse("connect_timeout", AlertDescription.internal_error,
                        f"upstream {route[0]}:{route[1]} did not accept within "
                        f"connect_timeout={tunnel.proxy.limits.connect_timeout}s")
            return
        except OSError as exc:  # refused, unreachable
            tunnel.connecting = None
            self.refuse("connect_failed", AlertDescription.internal_error,
                        f"upstream {route[0]}:{route[1]}: {exc}")
            return
        except asyncio.CancelledError:
            tunnel.connecting = None
            tunnel.maybe_finish()
            raise
        tunnel.connecting = None
        assert isinstance(up, UpstreamSide)
        if tunnel.phase != "connecting" or self.transport is None or up.transport is None:
            if up.transport is not None:  # the client went away meanwhile
                up.transport.abort()
            self.drop_held()
            tunnel.maybe_finish()
            return
        tunnel.upstream = up
        tunnel.phase = "open"
        tunnel.proxy.stats.tunnels_open += 1
        tunnel.last = loop.time()
        tunnel.start_shrink_window(tunnel.last)
        tunnel.watch_activity()
        # Resume first: if the held records fill the upstream's buffer, its pause_writing
        # pauses us again (resuming afterwards would undo that pause).
        self.resume_reading()
        held, self.held = self.held, []
        for lease, used in held:
            self.count(used)
            try:
                up.transport.write(lease.view[:used])
            finally:
                lease.release()  # the slot stays out of circulation while the write queue has it

    def refuse(self, reason: Reason, alert: AlertDescription | None,
               detail: str | None = None) -> None:
        """Answer before any tunnel exists (a fatal alert, or the HTTP 400) and close."""
        tunnel = self.tunnel
        tunnel.end(reason, alert.name if alert is not None else "http_400", detail)
        self.drop_held()
        if self.transport is not None and tunnel.phase != "closing":
            self.transport.write(alert_record(alert) if alert is not None else HTTP_REFUSAL)
        tunnel.close_all()

    def record_error(self, exc: TLSRecordError) -> None:
        if self.tunnel.phase in ("hello", "connecting"):
            if isinstance(exc, NotTLSError) and "HTTP request" in exc.looks_like:
                self.refuse("plaintext_http", None, str(exc))
            else:
                self.refuse("bad_hello", exc.alert, str(exc))
            return
        super().record_error(exc)

    def drop(self) -> None:
        """Close now, giving every byte back (used at the hello deadline)."""
        self.drop_held()
        self.tunnel.close_all()

    def drop_held(self) -> None:
        held, self.held = self.held, []
        self.collector = None
        for lease, _ in held:
            lease.release()

    def hold(self, raw: memoryview) -> None:
        """Copy one record's wire bytes behind those already held (into the last lease while
        it has room, else into a new one of at least HOLD_CHUNK bytes)."""
        n = len(raw)
        held = self.held
        if held:
            lease, used = held[-1]
            if used + n <= len(lease):
                lease.view[used:used + n] = raw
                held[-1] = (lease, used + n)
                return
        lease = self.tunnel.proxy.pool.acquire(max(n, HOLD_CHUNK))
        lease.view[:n] = raw
        held.append((lease, n))

    def connection_lost(self, exc: Exception | None) -> None:
        tunnel = self.tunnel
        connecting = tunnel.connecting
        if connecting is not None:
            connecting.cancel()  # the client is gone: stop waiting for its upstream
        self.drop_held()
        super().connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A client over ``max_connections``: a fatal internal_error alert, our write side shut,
    its ClientHello read and dropped (so the close is a FIN, not a reset that could discard
    the alert), then closed when the client closes or after :data:`REFUSAL_LINGER` seconds.
    While ``max_connections`` refusals already linger, a new one is aborted right after the
    alert is written (a flood cannot hold more than twice the cap in sockets)."""

    def __init__(self, proxy: SNIProxy) -> None:
        self.proxy = proxy
        proxy._refused.add(self)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.started = 0.0
        self.client = "-"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        self.client = _address(transport)
        transport.write(alert_record(AlertDescription.internal_error))
        cap = self.proxy.limits.max_connections or 0
        if len(self.proxy._refused) > cap:
            transport.abort()
            return
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = loop.call_later(REFUSAL_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None
        self.proxy._refused.discard(self)
        loop = asyncio.get_running_loop()
        self.proxy._log(ConnectionSummary(
            client=self.client, server_name=None, upstream=None, bytes_up=0, bytes_down=0,
            duration=loop.time() - self.started, reason="over_capacity",
            alert=AlertDescription.internal_error.name,
            detail=f"max_connections={self.proxy.limits.max_connections} were open",
        ), refused=True)


class SNIProxy:
    """Route TLS connections by SNI over ``routes`` (name -> (host, port); see
    :class:`RouteTable` for matching).  ``pool``: where ring memory and forwarded records come
    from (default: a new pool with :data:`RECORD_POOL_CLASSES`); ``limits``: deadlines, the
    connection cap and buffer sizes; ``log``: the logger for per-connection lines (INFO).

    ``await proxy.start(host, port)`` listens; ``await proxy.aclose()`` stops listening and
    aborts every connection.
    """

    def __init__(
        self,
        routes: Mapping[str, Route] | RouteTable,
        *,
        pool: BufferPool | None = None,
        limits: ProxyLimits | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.routes = routes if isinstance(routes, RouteTable) else RouteTable(routes)
        self.pool = pool if pool is not None else BufferPool(classes=RECORD_POOL_CLASSES)
        self.limits = limits if limits is not None else ProxyLimits()
        self.log = log if log is not None else logger
        self.stats = ProxyStats()
        self.server: asyncio.Server | None = None
        self.metrics_server: asyncio.Server | None = None
        self._tunnels: set[_Tunnel] = set()
        self._refused: set[_Refused] = set()

    # ------------------------------------------------------------------ serving
    async def start(self, host: str = "127.0.0.1", port: int = 0, *,
                    backlog: int = 1024) -> asyncio.Server:
        """Listen on ``host:port`` (0 picks a free port).  Returns the started server."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, host, port, backlog=backlog)
        return self.server

    def _accept(self) -> asyncio.BaseProtocol:
        stats = self.stats
        stats.accepted += 1
        cap = self.limits.max_connections
        if cap is not None and stats.open >= cap:
            return _Refused(self)
        stats.open += 1
        tunnel = _Tunnel(self, asyncio.get_running_loop())
        self._tunnels.add(tunnel)
        return ClientSide(tunnel)

    def _finished(self, tunnel: _Tunnel) -> None:
        self._tunnels.discard(tunnel)
        self.stats.open -= 1
        if tunnel.upstream is not None:
            self.stats.tunnels_open -= 1
        self._log(tunnel.summary(), refused=tunnel.upstream is None)

    def _log(self, summary: ConnectionSummary, *, refused: bool) -> None:
        stats = self.stats
        stats.closed[summary.reason] += 1
        if refused and summary.alert is not None:
            stats.refusals[summary.alert] += 1
        self.log.info("%s", summary.line(), extra={"tls_connection": summary})

    @property
    def connections(self) -> int:
        """Client connections open now (over-capacity refusals not counted)."""
        return len(self._tunnels)

    async def aclose(self) -> None:
        """Stop listening, abort every connection (reason ``shutdown``), wait until closed."""
        for server in (self.server, self.metrics_server):
            if server is not None:
                server.close()
        for tunnel in list(self._tunnels):
            tunnel.end("shutdown")
            if tunnel.connecting is not None:
                tunnel.connecting.cancel()
            tunnel.abort_all()
        for refused in list(self._refused):
            if refused.transport is not None:
                refused.transport.abort()
        for server in (self.server, self.metrics_server):
            if server is not None:
                await server.wait_closed()

    # ------------------------------------------------------------------ metrics
    def metrics_text(self) -> str:
        """Prometheus text: the proxy's counters, then the pool's stats (``bufpool_pool_*``)."""
        st = self.pool.stats()
        in_use_bytes = sum(t.in_use * t.slot_size for t in st.tiers)
        return (
            self.stats.prometheus()
            + "# HELP bufpool_proxy_pool_in_use_bytes Slot bytes held by live pooled leases\n"
            + "# TYPE bufpool_proxy_pool_in_use_bytes gauge\n"
            + f"bufpool_proxy_pool_in_use_bytes {in_use_bytes}\n"
            + st.prometheus(prefix="bufpool_pool")
        )

    async def start_metrics(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        """Serve :meth:`metrics_text` over HTTP/1.1 at ``GET /metrics`` on ``host:port``
        (other paths: 404).  One request per connection; a request head over 8 KiB or slower
        than 5 s is dropped."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                async with asyncio.timeout(5):
                    head = await reader.readuntil(b"\r\n\r\n")
                parts = head.split(b" ", 2)
                if len(parts) == 3 and parts[0] == b"GET" and parts[1] in (b"/metrics", b"/"):
                    body = self.metrics_text().encode()
                    status = b"200 OK"
                    ctype = b"text/plain; version=0.0.4; charset=utf-8"
                else:
                    body, status, ctype = b"not found; try /metrics\n", b"404 Not Found", \
                        b"text/plain"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                             + b"\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\nConnection: close\r\n\r\n" + body)
                await writer.drain()
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ConnectionError):
                pass
            finally:
                writer.close()

        self.metrics_server = await asyncio.start_server(handle, host, port, limit=8192)
        return self.metrics_server
