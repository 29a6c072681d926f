"""TLS for ``--tls``: a throwaway certificate and a TLS-terminating launcher for the example.

Supports: ``make_certificate(dir, names)`` -- a self-signed ECDSA P-256 certificate (valid one
day, SubjectAltName = the given DNS names plus 127.0.0.1) written as PEM, generated at run
time with ``cryptography``; ``client_context(cert)`` -- a client SSLContext trusting exactly
that certificate; and, run as ``python -m bufpool.loadtest._tls APP.py --cert C --key K
[--no-pool] [--loop uvloop|asyncio]``, the example app served over TLS: it imports the example
file by path, builds ``create_app(pooled=...)`` and serves it on 127.0.0.1 with a free port,
printing ``listening on https://HOST:PORT``.

The SNI proxy (``examples/sni_proxy.py``) sits in front and routes each configuration by its
server name; the load generator connects to the proxy with SNI set, so the TLS handshake and
every record pass through the proxy unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import ipaddress
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["client_context", "make_certificate"]


def make_certificate(directory: Path, names: Sequence[str]) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` for ``names`` into ``directory``; returns both."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def client_context(cert: Path) -> ssl.SSLContext:
    """Verify the server against exactly ``cert`` (hostname checked against the SNI name)."""
    ctx = ssl.create_default_context(cafile=str(cert))
    return ctx


def _load_example(path: Path) -> object:
    spec = importlib.util.spec_from_file_location("bufpool_example_app", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _serve(app_path: Path, cert: Path, key: Path, pooled: bool) -> None:
    from aiohttp import web

    module = _load_example(app_path)
    app = module.create_app(pooled=pooled)  # type: ignore[attr-defined]
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx, backlog=1024)
        await site.start()
        host, port = runner.addresses[0][:2]
        sys.stdout.write(f"listening on https://{host}:{port}\n")
        sys.stdout.flush()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="serve the example app over TLS")
    p.add_argument("app", type=Path)
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--no-pool", action="store_true")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = p.parse_args(argv)
    coro = _serve(args.app, args.cert, args.key, not args.no_pool)
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
