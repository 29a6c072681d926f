"""Optional atheris target for the TLS splitter and ClientHello parser (not run in CI).

    pip install atheris
    python fuzz/tls_splitter_fuzz.py -max_len=40000 -runs=1000000

Invariants: only TLSRecordError subclasses escape; pending bytes stay below one maximal record
plus its header; the pool ends with nothing in use.
"""

from __future__ import annotations

import gc
import sys

import atheris

with atheris.instrument_imports():
    import bufpool
    from bufpool.tls import (
        MAX_CIPHERTEXT,
        ClientHelloCollector,
        TLSRecordError,
        TLSRecordSplitter,
        parse_client_hello,
    )

POOL = bufpool.BufferPool(leak_detection="off")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mid_stream = fdp.ConsumeBool()
    tls13 = fdp.ConsumeBool()
    s = TLSRecordSplitter(pool=POOL, mid_stream=mid_stream, tls13_only=tls13)
    collector = ClientHelloCollector()
    try:
        while fdp.remaining_bytes():
            piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 20000))
            for r in s.feed(piece):
                if r.content_type == 22 and not collector.complete:
                    collector.add(r)
            assert s.buffered <= 5 + MAX_CIPHERTEXT
        s.feed_eof()
    except TLSRecordError:
        pass
    finally:
        s.close()
    try:
        parse_client_hello(data)
    except TLSRecordError:
        pass
    if POOL.stats().in_use:
        gc.collect()
        assert POOL.stats().in_use == 0, POOL.stats()


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
