"""Memory of examples/sni_proxy.py under idle and stalled clients: RSS of the proxy process and
pool memory in use (from its --metrics endpoint), rings starting at 64 KiB (the old behaviour,
``--initial-buffer 65536``) against rings starting at 1 KiB (the default), interleaved in one
run.

    python bench/bench_proxy_memory.py [--idle 300] [--stalled 500] [--large 100] [--quiet 100]
        [--repeat 2] [--loop asyncio|uvloop]

Scenarios, each from a fresh proxy process:
  idle     N connections that send nothing;
  stalled  N connections that send 11 bytes of a ClientHello and wait (closed by the
           --hello-timeout of 2 s: memory after the deadline is printed too);
  large    N connections that send 15,000 bytes of a 16,000-byte ClientHello record and wait;
  quiet    N tunnels to a sink upstream that each pass 256 KB of 16 KB records and go quiet
           (64 KiB rings vs 1 KiB rings with --shrink-after 1: "after" is 3 s later, the
           tunnels still open).
RSS is VmRSS of the proxy; "pool" is slot bytes held by live leases.  Each figure is the
proxy's value with the clients connected minus its value before they connected.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY = os.path.join(HERE, "..", "examples", "sni_proxy.py")


def client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="example.com")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


class Sink(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while self.request.recv(262144):
            pass


class SinkServer(socketserver.ThreadingTCPServer):
    request_queue_size = 1024
    daemon_threads = True


class Proxy:
    loop = "asyncio"

    def __init__(self, initial_buffer: int, hello_timeout: float, upstream: int = 9,
                 shrink_after: float = 5.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, PROXY, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
             "--route", f"example.com=127.0.0.1:{upstream}", "--max-connections", "0",
             "--hello-timeout", str(hello_timeout), "--initial-buffer", str(initial_buffer),
             "--shrink-after", str(shrink_after), "--log-level", "WARNING",
             "--loop", self.loop],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline().rsplit(":", 1)[1])
        self.metrics_port = int(self.proc.stdout.readline().rsplit(":", 1)[1])

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024  # type: ignore[union-attr]

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def wait_open(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.metrics()["bufpool_proxy_connections_open"] != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"proxy never reached {n} open connections")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def quiet(n: int, initial: int) -> tuple[int, int, int, int]:
    """(rss, pool) deltas right after N tunnels passed a burst, then 3 s later (still open)."""
    sink = SinkServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    proxy = Proxy(initial, hello_timeout=10.0, upstream=sink.server_address[1],
                  shrink_after=1.0)
    try:
        time.sleep(0.3)
        rss0, pool0 = proxy.rss(), proxy.metrics()["bufpool_proxy_pool_in_use_bytes"]
        hello = client_hello()
        burst = b"".join(b"\x17\x03\x03" + (16000).to_bytes(2, "big") + bytes(16000)
                         for _ in range(16))
        socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", proxy.port))
            s.sendall(hello + burst)
            socks.append(s)
        deadline = time.monotonic() + 60
        want = n * (len(hello) + len(burst))
        while proxy.metrics()['bufpool_proxy_bytes_total{direction="up"}'] < want:
            if time.monotonic() > deadline:
                raise RuntimeError("the bursts did not get through")
            time.sleep(0.02)
        rss1 = proxy.rss()
        pool1 = proxy.metrics()["bufpool_proxy_pool_in_use_bytes"]
        time.sleep(3)
        rss2 = proxy.rss()
        pool2 = proxy.metrics()["bufpool_proxy_pool_in_use_bytes"]
        for s in socks:
            s.close()
        return rss1 - rss0, int(pool1 - pool0), rss2 - rss0, int(pool2 - pool0)
    finally:
        proxy.close()
        sink.shutdown()


def scenario(kind: str, n: int, initial: int) -> tuple[int, int, int, int]:
    """(rss delta, pool delta) with the clients connected, then after they are gone."""
    if kind == "quiet":
        return quiet(n, initial)
    proxy = Proxy(initial, hello_timeout=2.0)
    try:
        time.sleep(0.3)
        rss0, pool0 = proxy.rss(), proxy.metrics()["bufpool_proxy_pool_in_use_bytes"]
        hello = client_hello()
        socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", proxy.port))
            if kind == "stalled":
                s.sendall(hello[:11])
            elif kind == "large":
                s.sendall(b"\x16\x03\x01" + (16000).to_bytes(2, "big")
                          + b"\x01" + (15996).to_bytes(3, "big") + bytes(15000 - 4))
            socks.append(s)
        proxy.wait_open(n)
        time.sleep(0.5)  # let the last reads land
        rss1 = proxy.rss()
        pool1 = proxy.metrics()["bufpool_proxy_pool_in_use_bytes"]
        if kind == "idle":
            for s in socks:
                s.close()
        proxy.wait_open(0)  # idle: closed by us; stalled/large: by the hello deadline
        time.sleep(0.3)
        rss2 = proxy.rss()
        pool2 = proxy.metrics()["bufpool_proxy_pool_in_use_bytes"]
        for s in socks:
            s.close()
        return rss1 - rss0, int(pool1 - pool0), rss2 - rss0, int(pool2 - pool0)
    finally:
        proxy.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=int, default=300)
    ap.add_argument("--stalled", type=int, default=500)
    ap.add_argument("--large", type=int, default=100)
    ap.add_argument("--quiet", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = ap.parse_args()
    Proxy.loop = args.loop
    print(f"proxy loop: {args.loop}")
    kib = 1024
    print(f"{'scenario':<16}{'ring start':>11}{'RSS +KiB':>10}{'pool +KiB':>11}"
          f"{'per conn':>10}{'RSS after':>11}{'pool after':>11}")
    for _ in range(args.repeat):
        for kind, n in (("idle", args.idle), ("stalled", args.stalled), ("large", args.large),
                        ("quiet", args.quiet)):
            for initial in (65536, 1024):  # interleaved: old behaviour, then the default
                rss, pool, rss_after, pool_after = scenario(kind, n, initial)
                print(f"{kind + ' x' + str(n):<16}{initial:>11}{rss // kib:>10}"
                      f"{pool // kib:>11}{pool / n / kib:>9.1f}K"
                      f"{rss_after // kib:>11}{pool_after // kib:>11}", flush=True)
    print("(RSS/pool after: once the clients are gone or cut by the 2 s hello deadline; "
          "quiet: 3 s after the bursts, tunnels open; all relative to before the clients "
          "connected; shared 2-core machine)")


if __name__ == "__main__":
    main()
