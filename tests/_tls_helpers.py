"""Shared TLS test helpers: certificates made with ``cryptography`` and OpenSSL sessions driven
through ``ssl.MemoryBIO`` pairs, capturing each direction's exact byte stream."""

from __future__ import annotations

import datetime
import ssl
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class CertBundle:
    """A CA and one leaf certificate per name, written as PEM files under ``directory``."""

    directory: Path
    ca_path: Path
    leaves: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (cert, key)

    def server_context(self, name: str, *, version: ssl.TLSVersion | None = None,
                       alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert, key = self.leaves[name]
        ctx.load_cert_chain(cert, key)
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def client_context(self, *, version: ssl.TLSVersion | None = None,
                       alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca_path)
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


def rec(ct: int, payload: bytes, version: int = 0x0303) -> bytes:
    """One TLS record: 5-byte header (type, legacy version, length) and ``payload``."""
    return struct.pack(">BHH", ct, version, len(payload)) + payload


#: A minimal first record: a handshake record (legacy version 0x0301) holding a 4-byte
#: handshake header, enough to satisfy the first-record rule.
HELLO = rec(22, b"\x01\x00\x00\x00", 0x0301)


def make_certs(names: list[str], directory: str | Path | None = None) -> CertBundle:
    """A fresh EC P-256 CA and a leaf per DNS name (valid one day)."""
    d = Path(directory or tempfile.mkdtemp(prefix="bufpool-tls-"))
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bufpool test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = d / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    bundle = CertBundle(d, ca_path)
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path = d / f"{name}.pem"
        key_path = d / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        bundle.leaves[name] = (cert_path, key_path)
    return bundle


@dataclass
class Capture:
    """Bytes each side put on the wire, in order, plus what was negotiated."""

    client_to_server: bytes
    server_to_client: bytes
    version: str | None
    alpn: str | None
    client_hello_sni: str | None
    payload_c2s: bytes
    payload_s2c: bytes


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO, log: bytearray) -> int:
    data = src.read()
    if data:
        log += data
        dst.write(data)
    return len(data)


def openssl_session(
    certs: CertBundle,
    *,
    server_name: str,
    version: ssl.TLSVersion,
    alpn_client: list[str] | None = None,
    alpn_server: list[str] | None = None,
    c2s: bytes = b"",
    s2c: bytes = b"",
) -> Capture:
    """Run a full TLS session between two ``ssl.SSLObject``s over MemoryBIOs: handshake, then
    ``c2s`` bytes from the client and ``s2c`` from the server, then close_notify both ways."""
    cctx = certs.client_context(version=version, alpn=alpn_client)
    sctx = certs.server_context(server_name, version=version, alpn=alpn_server)
    seen_sni: list[str | None] = []

    def sni_cb(obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        seen_sni.append(name)

    sctx.sni_callback = sni_cb  # type: ignore[assignment]
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    up = bytearray()
    down = bytearray()

    def step(obj: ssl.SSLObject) -> bool:
        try:
            obj.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False

    c_done = s_done = False
    for _ in range(50):
        c_done = c_done or step(client)
        _pump(c_out, s_in, up)
        s_done = s_done or step(server)
        _pump(s_out, c_in, down)
        if c_done and s_done:
            break
    assert c_done and s_done, "handshake did not finish"
    got_c2s = bytearray()
    got_s2c = bytearray()

    def drain(obj: ssl.SSLObject, into: bytearray) -> None:
        while True:
            try:
                chunk = obj.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                return
            if not chunk:
                return
            into += chunk

    # send in pieces of varying size so records of many lengths appear
    sizes = [1, 100, 300, 1500, 4096, 16384, 20000, 70000]
    for payload, sender, receiver, out_bio, in_bio, log, got in (
        (c2s, client, server, c_out, s_in, up, got_c2s),
        (s2c, server, client, s_out, c_in, down, got_s2c),
    ):
        pos = 0
        i = 0
        while pos < len(payload):
            n = sizes[i % len(sizes)]
            sender.write(payload[pos:pos + n])
            pos += n
            i += 1
            _pump(out_bio, in_bio, log)
            drain(receiver, got)
        # TLS 1.3 session tickets etc. flow back
        _pump(s_out, c_in, down)
        _pump(c_out, s_in, up)
        drain(client, got_s2c)
        drain(server, got_c2s)
    for obj, out_bio, in_bio, log in ((client, c_out, s_in, up), (server, s_out, c_in, down)):
        try:
            obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        _pump(out_bio, in_bio, log)
    return Capture(
        client_to_server=bytes(up),
        server_to_client=bytes(down),
        version=client.version(),
        alpn=client.selected_alpn_protocol(),
        client_hello_sni=seen_sni[0] if seen_sni else None,
        payload_c2s=bytes(got_c2s),
        payload_s2c=bytes(got_s2c),
    )


def real_tls_streams(directory: str | Path, *, c2s: int, s2c: int) -> list[bytes]:
    """Captured byte streams of real OpenSSL sessions (TLS 1.2, then 1.3; SNI example.com,
    ALPN h2) carrying ``c2s``/``s2c`` bytes of application data: for each version the
    client-to-server stream, then the server-to-client one."""
    certs = make_certs(["example.com"], directory)
    out: list[bytes] = []
    for v in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        cap = openssl_session(certs, server_name="example.com", version=v,
                              alpn_client=["h2"], c2s=bytes(c2s), s2c=bytes(s2c))
        out += [cap.client_to_server, cap.server_to_client]
    return out
