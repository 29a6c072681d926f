"""A TLS passthrough proxy that routes by SNI without decrypting anything.

    python examples/sni_proxy.py --listen 127.0.0.1:8443 \\
        --route example.com=127.0.0.1:9001 --route other.test=127.0.0.1:9002 [--loop uvloop]

For each client connection: read records until the ClientHello is complete (it may span
records and reads), pick the upstream by its server_name, connect, replay the ClientHello
records, then forward both directions record by record.  Every record is copied once into a
pooled lease and written with ``write_lease`` (released at once; the pool keeps the slot out
of circulation until the transport has sent it).  Refusals: an unknown or missing name gets a
fatal ``unrecognized_name`` alert, malformed TLS the alert its error names, and plaintext HTTP
a ``400 Bad Request`` saying the port speaks TLS; then the connection is closed.  An upstream
that refuses or does not answer within ``connect_timeout`` seconds (10 by default) gets the
client a fatal ``internal_error`` alert and a close, so a black-holed upstream never pins a
client and its held ClientHello records.

Flow control: when one side's transport is above its write-buffer high-water mark, reading
from the other side pauses until it drains.

Importable: ``await start_proxy(routes, host, port, pool=..., connect_timeout=...)`` returns the
asyncio.Server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping

import bufpool
from bufpool.aio import write_lease
from bufpool.tls import (
    AlertDescription,
    ClientHelloCollector,
    DetachedRecord,
    NotTLSError,
    TLSRecord,
    TLSRecordError,
    TLSRecordProtocol,
    alert_record,
)

Route = tuple[str, int]

#: Seconds to wait for an upstream connection before refusing the client.
DEFAULT_CONNECT_TIMEOUT = 10.0

HTTP_REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 53\r\n\r\nThis port expects TLS; plaintext HTTP is not served.\n"
)


def normalize(name: str) -> str:
    return name.lower().rstrip(".")


class _Side(TLSRecordProtocol):
    """Common forwarding: every record goes to ``peer`` through a pooled lease."""

    peer: _Side | None = None

    def forward(self, record: TLSRecord) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            return
        write_lease(peer.transport, record.detach().lease)

    def pause_writing(self) -> None:  # our transport is full: stop reading from the peer
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def close_peer(self) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            if peer.transport is not None:
                peer.transport.close()  # flushes what was queued

    eof_in = False  # the other end of our transport sent EOF

    def eof_received(self) -> bool | None:
        super().eof_received()
        self.eof_in = True
        peer = self.peer
        if self.error is not None or peer is None or peer.transport is None:
            return None
        if peer.eof_in or not peer.transport.can_write_eof():
            self.close_peer()  # both directions finished: close both connections
            return None
        peer.transport.write_eof()
        return True  # half-close: keep our write side open for the peer's remaining bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self.close_peer()
        super().connection_lost(exc)


class Upstream(_Side):
    def record_received(self, record: TLSRecord) -> None:
        self.forward(record)

    def record_error(self, exc: TLSRecordError) -> None:
        self.close_peer()
        super().record_error(exc)


class ClientSide(_Side):
    """The accepted client connection."""

    def __init__(self, routes: Mapping[str, Route], pool: bufpool.BufferPool,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        super().__init__(pool)
        self.routes = routes
        self.connect_timeout = connect_timeout
        #: The upstream connect in progress (kept so it is not garbage-collected mid-way,
        #: and cancelled if the client goes away first).
        self.connecting: asyncio.Task[None] | None = None
        self.collector: ClientHelloCollector | None = ClientHelloCollector()
        self.held: list[DetachedRecord] = []
        self.server_name: str | None = None

    def record_received(self, record: TLSRecord) -> None:
        if self.peer is not None:
            self.forward(record)
            return
        if self.transport is None or self.transport.is_closing():
            return  # refused: ignore the rest of this read
        self.held.append(record.detach())
        collector = self.collector
        if collector is None:  # connecting: hold records until the upstream is there
            return
        try:
            hello = collector.add(record)
        except TLSRecordError as exc:
            self.refuse(alert_record(exc.alert))
            return
        if hello is None:
            return
        self.collector = None
        name = normalize(hello.server_name or "")
        self.server_name = name
        route = self.routes.get(name)
        if route is None:
            self.refuse(alert_record(AlertDescription.unrecognized_name))
            return
        self.pause_reading()
        self.connecting = asyncio.get_running_loop().create_task(self.connect(route))

    async def connect(self, route: Route) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, up = await loop.create_connection(lambda: Upstream(self.pool), *route)
        except (OSError, TimeoutError):  # refused, unreachable, or no answer in time
            self.connecting = None
            self.refuse(alert_record(AlertDescription.internal_error))
            return
        self.connecting = None
        if self.transport is None or up.transport is None:  # client went away meanwhile
            if up.transport is not None:
                up.transport.close()
            self.drop_held()
            return
        self.peer, up.peer = up, self
        # Resume first: if the held records fill the upstream's buffer, its pause_writing
        # pauses us again (resuming afterwards would undo that pause).
        self.resume_reading()
        held, self.held = self.held, []
        for rec in held:
            write_lease(up.transport, rec.lease)

    def refuse(self, reply: bytes) -> None:
        self.drop_held()
        if self.transport is not None:
            self.transport.write(reply)
            self.transport.close()

    def record_error(self, exc: TLSRecordError) -> None:
        if self.peer is None:
            if isinstance(exc, NotTLSError) and "HTTP request" in exc.looks_like:
                self.refuse(HTTP_REFUSAL)
            else:
                self.refuse(alert_record(exc.alert))
            return
        self.close_peer()
        super().record_error(exc)

    def drop_held(self) -> None:
        held, self.held = self.held, []
        for rec in held:
            rec.release()

    def connection_lost(self, exc: Exception | None) -> None:
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()  # the client is gone: stop waiting for its upstream
        self.drop_held()
        super().connection_lost(exc)


async def start_proxy(
    routes: Mapping[str, Route],
    host: str = "127.0.0.1",
    port: int = 0,
    pool: bufpool.BufferPool | None = None,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> asyncio.Server:
    """Listen on ``host:port`` (0 picks a free port) and route by SNI over ``routes``
    (name -> (host, port)); returns the started server.  ``connect_timeout``: seconds an
    upstream may take to accept before the client is refused with ``internal_error``."""
    if not connect_timeout > 0:
        raise ValueError(f"connect_timeout must be positive seconds, got {connect_timeout}")
    pool = pool if pool is not None else bufpool.BufferPool()
    table = {normalize(k): v for k, v in routes.items()}
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: ClientSide(table, pool, connect_timeout), host, port
    )


def _hostport(text: str) -> Route:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _route(text: str) -> tuple[str, Route]:
    name, sep, target = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    return name, _hostport(target)


async def _serve(listen: Route, routes: dict[str, Route], connect_timeout: float) -> None:
    server = await start_proxy(routes, *listen, connect_timeout=connect_timeout)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_hostport, default=("127.0.0.1", 8443))
    parser.add_argument(
        "--route", type=_route, action="append", default=[], help="NAME=HOST:PORT, repeatable"
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
        help="refuse a client whose upstream does not accept within this time (default 10)",
    )
    args = parser.parse_args(argv)
    if not args.route:
        parser.error("give at least one --route NAME=HOST:PORT")
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(_serve(args.listen, dict(args.route), args.connect_timeout))
        except KeyboardInterrupt:
            sys.exit(130)


if __name__ == "__main__":
    main()
