"""A TLS passthrough proxy that routes by SNI without decrypting anything.

    python examples/sni_proxy.py --listen 127.0.0.1:8443 \\
        --route example.com=127.0.0.1:9001 --route '*.other.test=127.0.0.1:9002' \\
        [--metrics 127.0.0.1:9100] [--loop uvloop]

A thin command line over :class:`bufpool.tls.SNIProxy` (docs/tls.md has the details): it
prints ``listening on HOST:PORT`` (and ``metrics on HOST:PORT``), logs one line per finished
connection to stderr, and runs until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from bufpool.tls import ProxyLimits, RouteTable, SNIProxy

Route = tuple[str, int]
DEFAULT_LISTEN = ("127.0.0.1", 8443)
DEFAULTS = ProxyLimits()

DESCRIPTION = f"""\
A TLS passthrough proxy: reads each client's ClientHello, picks the upstream by its SNI
name and forwards the encrypted bytes both ways, record by record, in pooled memory.

Listens on {DEFAULT_LISTEN[0]}:{DEFAULT_LISTEN[1]} unless --listen says otherwise.

How names match: ASCII case-insensitively, a trailing dot ignored (Example.COM. is
example.com); '*.example.com' matches exactly one more label (a.example.com, not
example.com nor a.b.example.com); an exact route wins over a wildcard.

What clients get instead of a tunnel: an unknown name, or no SNI at all, a fatal TLS
unrecognized_name alert; malformed TLS the fatal alert that fits (decode_error,
protocol_version, record_overflow, unexpected_message); plaintext HTTP a 400 Bad Request;
an upstream that refuses or does not accept in time, or a full proxy (--max-connections),
a fatal internal_error alert.  A client without a complete ClientHello at its deadline is
closed without an alert (none fits a timeout).  Then the connection is closed."""

EPILOG = """\
Each finished connection logs one line (logger bufpool.tls.proxy, INFO):
  client=ADDR sni=NAME upstream=HOST:PORT up=BYTES down=BYTES duration=SECONDSs
  close=REASON alert=ALERT
--metrics serves Prometheus text at GET /metrics (connections open/total, refusals by
alert, closes by reason, bytes each way, pool stats)."""


def _hostport(text: str) -> Route:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _route(text: str) -> tuple[str, Route]:
    name, sep, target = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    return name, _hostport(target)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sni_proxy.py", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", type=_hostport, default="{}:{}".format(*DEFAULT_LISTEN),
                   metavar="HOST:PORT",
                   help="address to accept clients on (default %(default)s; port 0 picks one)")
    p.add_argument("--route", type=_route, action="append", default=[],
                   metavar="NAME=HOST:PORT", help="an upstream for a server name; repeatable")
    p.add_argument("--hello-timeout", type=_seconds, default=DEFAULTS.hello_timeout,
                   metavar="SECONDS", help="time from accept to a complete ClientHello "
                   "(default %(default)s)")
    p.add_argument("--connect-timeout", type=_seconds, default=DEFAULTS.connect_timeout,
                   metavar="SECONDS", help="time an upstream has to accept; then the client "
                   "gets internal_error (default %(default)s)")
    p.add_argument("--idle-timeout", type=_seconds, default=DEFAULTS.idle_timeout,
                   metavar="SECONDS", help="close a tunnel that carried nothing either way for "
                   "this long; 0 = never (default %(default)s)")
    p.add_argument("--half-close-timeout", type=_seconds, default=DEFAULTS.half_close_timeout,
                   metavar="SECONDS", help="close a tunnel this long after one side sent EOF if "
                   "nothing moves the other way; also the time a closing connection may take "
                   "to flush (default %(default)s)")
    p.add_argument("--shrink-after", type=_seconds, default=DEFAULTS.shrink_after,
                   metavar="SECONDS", help="shrink a quiet tunnel's receive rings back to "
                   "--initial-buffer after this long without a read, or a side's ring when it "
                   "forwarded less than --initial-buffer bytes in such a window; 0 = never "
                   "(default %(default)s)")
    p.add_argument("--max-connections", type=int, default=DEFAULTS.max_connections, metavar="N",
                   help="client connections open at once; more are refused with "
                   "internal_error; 0 = no cap (default %(default)s)")
    p.add_argument("--max-client-hello", type=int, default=DEFAULTS.max_client_hello,
                   metavar="BYTES", help="largest ClientHello accepted (default %(default)s)")
    p.add_argument("--initial-buffer", type=int, default=DEFAULTS.initial_buffer,
                   metavar="BYTES", help="first receive ring per connection side, doubled as "
                   "data arrives up to 64 KiB (default %(default)s)")
    p.add_argument("--metrics", type=_hostport, default=None, metavar="HOST:PORT",
                   help="serve Prometheus text at http://HOST:PORT/metrics (default: off)")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="per-connection lines are INFO (default %(default)s)")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    return p


def limits_from(args: argparse.Namespace) -> ProxyLimits:
    return ProxyLimits(
        hello_timeout=args.hello_timeout,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout or None,
        half_close_timeout=args.half_close_timeout,
        shrink_after=args.shrink_after or None,
        max_connections=args.max_connections or None,
        max_client_hello=args.max_client_hello,
        initial_buffer=args.initial_buffer,
    )


def routes_from(args: argparse.Namespace) -> RouteTable:
    names = [name.lower().rstrip(".") for name, _ in args.route]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--route given twice for {', '.join(twice)}")
    return RouteTable(dict(args.route))


async def serve(args: argparse.Namespace) -> None:
    proxy = SNIProxy(routes_from(args), limits=limits_from(args))
    server = await proxy.start(*args.listen)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    if args.metrics is not None:
        metrics = await proxy.start_metrics(*args.metrics)
        mhost, mport = metrics.sockets[0].getsockname()[:2]
        print(f"metrics on {mhost}:{mport}", flush=True)
    try:
        await server.serve_forever()
    finally:
        await proxy.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.route:
        parser.error("give at least one --route NAME=HOST:PORT")
    try:
        limits_from(args)
        routes_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(serve(args))
        except KeyboardInterrupt:
            sys.exit(130)


if __name__ == "__main__":
    main()
